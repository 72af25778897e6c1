"""Write the INT8 graph: explicit Q/DQ, laid out the way TensorRT fuses it.

  x --[Mul 1/s]--> QuantizeLinear(scale, int8 0) --> DequantizeLinear --> MatMul --> [Add bias]
  W*s as an INT8 initializer ------------------------> DequantizeLinear(per output channel) --^

One Q per activation tensor, one DQ per consuming layer (ONNX Runtime and
TensorRT both fuse a DQ into the layer it feeds). Embedding tables become INT8
with one scale per row, dequantized before the Gather. Every FP32 weight that
no longer has a user is dropped, so the file shrinks to about a quarter.
"""

from __future__ import annotations

import numpy as np
from fastertrt.calibration.calibrators import weight_amax


def _q_weight(w_kn: np.ndarray):
    scale = weight_amax(w_kn) / 127.0
    return np.clip(np.round(w_kn / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def write_int8_model(model, plan, inits: dict, ranges: dict, quantized: set):
    """A new ModelProto: `model` with the layers in `quantized` (node names)
    behind Q/DQ, using `ranges` (activation -> ActivationRange), and the plan's
    embedding tables stored INT8."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_inits: list = []
    node_edits: dict[str, dict[int, str]] = {}  # node name -> input index -> new input
    added_before: dict[str, list] = {}  # node name -> nodes to insert before it

    def init(name, arr):
        new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    zero = init("fastertrt_int8_zero", np.array(0, dtype=np.int8))
    for act in plan.activations():
        layers = [layer for layer in plan.consumers(act) if layer.node in quantized]
        if not layers:
            continue
        rng = ranges[act]
        first = layers[0].node
        pre = added_before.setdefault(first, [])
        x = act
        if rng.smooth is not None:
            x = f"{act}_smoothed"
            pre.append(helper.make_node("Mul", [act, init(f"{act}_smooth_inv", (1.0 / rng.smooth).astype(np.float32))],
                                        [x], name=f"{act}_smooth"))
        scale = init(f"{act}_scale", np.array(max(rng.amax, 1e-8) / 127.0, dtype=np.float32))
        pre.append(helper.make_node("QuantizeLinear", [x, scale, zero], [f"{act}_q"], name=f"{act}_quantize"))
        for layer in layers:
            w = layer.weight_kn(inits)
            if rng.smooth is not None:
                w = w * rng.smooth[:, None]
            wq, ws = _q_weight(w)
            if layer.transposed:
                wq = np.ascontiguousarray(wq.T)
            wq_name = init(f"{layer.weight}_{layer.node}_int8", wq)
            ws_name = init(f"{layer.weight}_{layer.node}_scale", ws)
            adq, wdq = f"{act}_dq_{layer.node}", f"{layer.weight}_dq_{layer.node}"
            added_before.setdefault(layer.node, []).extend([
                helper.make_node("DequantizeLinear", [f"{act}_q", scale, zero], [adq], name=f"{adq}_node"),
                helper.make_node("DequantizeLinear", [wq_name, ws_name], [wdq], name=f"{wdq}_node",
                                 axis=0 if layer.transposed else 1)])
            node_edits[layer.node] = {0: adq, 1: wdq}
    for emb in plan.embeddings:
        tq, scale = _q_weight(inits[emb.table].astype(np.float32).T)  # a scale per row of the table
        dq = f"{emb.table}_dq"
        added_before.setdefault(emb.node, []).append(helper.make_node(
            "DequantizeLinear", [init(f"{emb.table}_int8", np.ascontiguousarray(tq.T)),
                                 init(f"{emb.table}_row_scale", scale)], [dq], name=f"{dq}_node", axis=0))
        node_edits[emb.node] = {0: dq}

    nodes = []
    for node in graph.node:
        nodes.extend(added_before.get(node.name, []))
        for idx, name in node_edits.get(node.name, {}).items():
            node.input[idx] = name
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return out
