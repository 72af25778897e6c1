"""ORT variant of a graph: the same computation in the operators ONNX Runtime's
CPU kernels run fastest. TensorRT and the reference path use the portable
graph; only the runtime's ONNX Runtime backend loads the variant.

  QuantizeLinear(x, s, int8 0) -> DequantizeLinear -> MatMul(., DequantizeLinear(W int8, w_s)) [-> Add b]
      => QuantizeLinear(x, s, uint8 128) -> com.microsoft.MatMulIntegerToFloat(xq, W, s, w_s, 128, -, b)
  (uint8 with zero point 128 holds exactly the int8 codes shifted by 128: ORT's fast CPU path is u8 x s8)
  DequantizeLinear(T int8, row scales, axis 0) -> Gather(., ids)
      => Gather(T, ids) -> Cast -> Mul(Gather(row scales, ids))      (dequantize the rows used, not the table)
  fastertrt plugin nodes => the plugin's ORT lowering where it has one (attention: MultiHeadAttention,
  GroupQueryAttention in decoder graphs)
"""

from __future__ import annotations

import collections
import importlib

import numpy as np


def _maps(graph):
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def lower_for_onnxruntime(model, causal_lm: bool = False, base_dir=None, max_positions: int = 0):
    """A new ModelProto and {what: count} of the rewrites made. causal_lm: the
    graph is a causal decoder's (its attention masks are causal). base_dir: where
    external weights live, for reading small constants (eps, exponents).
    max_positions: the model's positions (the size of rotary tables)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fastertrt.plugins import ORT_LOWERINGS

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    arrays: dict = {}

    def arr(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name], base_dir=str(base_dir or ""))
        return arrays[name]

    def const(name) -> np.ndarray | None:
        """The value of a constant (initializer or Constant node), else None."""
        if name in inits:
            return arr(name)
        if name in producer and producer[name].op_type == "Constant":
            return numpy_helper.to_array(producer[name].attribute[0].t)
        return None

    def scalar(name) -> float | None:
        value = const(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    producer, consumers = _maps(graph)
    view = GraphView(producer, consumers, const, {i.name for i in graph.input},
                     {o.name for o in graph.output}, max_positions, _shapes(graph))
    consts: dict[str, np.ndarray] = {}
    replace: dict[int, list] = {}  # id(node) -> nodes standing in its place
    counts = collections.Counter()
    u8_of: dict[str, str] = {}  # int8 Q output -> uint8 Q output
    made: set = set()  # values the plugin lowerings already compute once per graph

    def int8_q(name):
        """(x, scale) when `name` is DequantizeLinear(QuantizeLinear(x, scale, int8 0)) per tensor."""
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in inits:
            return None
        zp = arr(q.input[2])
        if zp.dtype != np.int8 or zp.size != 1 or int(zp) != 0 or q.input[1] not in inits or arr(q.input[1]).size != 1:
            return None
        return q

    def int8_weight(name):
        """(int8 [K, N] name, scale name) for DequantizeLinear(W int8 const) feeding a MatMul as B."""
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            return None
        w = arr(dq.input[0])
        if w.dtype != np.int8 or w.ndim != 2 or (len(dq.input) > 2 and dq.input[2] and np.any(arr(dq.input[2]))):
            return None
        return dq, w

    def only_use(name, op_type):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def rms_norm(pow_node):
        """x -> Pow 2 -> ReduceMean(last axis) -> Add eps -> Sqrt -> Reciprocal -> Mul x -> Mul w
        (transformers' RMSNorm): (nodes, x, w, eps, output) or None."""
        x = pow_node.input[0]
        if scalar(pow_node.input[1]) != 2.0:
            return None
        mean = only_use(pow_node.output[0], "ReduceMean")
        if mean is None or _attr(mean, "keepdims", 1) != 1:
            return None
        axes = _attr(mean, "axes") or ([scalar(mean.input[1])] if len(mean.input) > 1 else None)
        add = only_use(mean.output[0], "Add") if axes in ([-1], [-1.0]) else None
        if add is None:
            return None
        eps = scalar(add.input[1] if add.input[0] == mean.output[0] else add.input[0])
        sqrt = only_use(add.output[0], "Sqrt") if eps is not None else None
        inv = only_use(sqrt.output[0], "Reciprocal") if sqrt is not None else None
        norm = only_use(inv.output[0], "Mul") if inv is not None else None
        if norm is None or x not in norm.input:
            return None
        scale = only_use(norm.output[0], "Mul")
        if scale is None:
            return None
        w = scale.input[0] if scale.input[1] == norm.output[0] else scale.input[1]
        if w not in inits or len(inits[w].dims) != 1:
            return None
        return [pow_node, mean, add, sqrt, inv, norm, scale], x, w, eps, scale.output[0]

    for node in graph.node:
        if node.op_type == "Pow" and (found := rms_norm(node)) is not None:
            chain, x, w, eps, out_name = found
            replace[id(chain[0])] = [helper.make_node("SimplifiedLayerNormalization", [x, w], [out_name],
                                                      name=f"{node.name}_rms_norm", axis=-1, epsilon=eps,
                                                      stash_type=1)]
            for extra in chain[1:]:
                replace[id(extra)] = []
            counts["RMSNorm -> SimplifiedLayerNormalization"] += 1
        elif node.op_type in ("MatMul", "Gemm"):
            q = int8_q(node.input[0])
            wq = int8_weight(node.input[1])
            if q is None or wq is None:
                continue
            dq_w, w = wq
            n_out = w.shape[0] if node.op_type == "Gemm" and _attr(node, "transB", 0) else w.shape[1]
            scale_w = arr(dq_w.input[1]).astype(np.float32)
            axis = _attr(dq_w, "axis", 1)
            w_name = dq_w.input[0]
            if node.op_type == "Gemm":
                if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                    continue
                if _attr(node, "transB", 0):
                    w_name, axis = f"{w_name}_kn", 1 - axis
                    consts[w_name] = np.ascontiguousarray(w.T)
            if scale_w.size != 1 and axis not in (1, -1):
                continue  # scales along K: not a per-output-channel layer
            out_name, bias, dropped = node.output[0], "", [node]
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                bias = node.input[2]
            else:
                users = consumers.get(node.output[0], [])
                if len(users) == 1 and users[0].op_type == "Add":
                    other = [i for i in users[0].input if i != node.output[0]]
                    if len(other) == 1 and other[0] in inits and arr(other[0]).shape == (n_out,):
                        bias, out_name, dropped = other[0], users[0].output[0], [node, users[0]]
            qx = q.output[0]
            new = []
            if qx not in u8_of:
                u8_of[qx] = f"{qx}_u8"
                consts.setdefault("fastertrt_u8_zero_point", np.array(128, dtype=np.uint8))
                new.append(helper.make_node("QuantizeLinear", [q.input[0], q.input[1], "fastertrt_u8_zero_point"],
                                            [u8_of[qx]], name=f"{q.name or qx}_u8"))
            new.append(helper.make_node(
                "MatMulIntegerToFloat",
                [u8_of[qx], w_name, q.input[1], dq_w.input[1], "fastertrt_u8_zero_point", "", bias],
                [out_name], name=f"{node.name}_integer", domain="com.microsoft"))
            replace[id(node)] = new
            for extra in dropped[1:]:
                replace[id(extra)] = []
            counts["MatMulIntegerToFloat"] += 1
        elif node.op_type == "Gather":
            dq = producer.get(node.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or _attr(node, "axis", 0) != 0:
                continue
            table = arr(dq.input[0])
            if table.dtype != np.int8 or table.ndim != 2 or _attr(dq, "axis", 1) != 0 or len(dq.input) > 2 and dq.input[2]:
                continue
            base, ids = node.output[0], node.input[1]
            consts.setdefault("fastertrt_last_axis", np.array([-1], dtype=np.int64))
            replace[id(node)] = [
                helper.make_node("Gather", [dq.input[0], ids], [f"{base}_int8"], name=f"{node.name}_int8", axis=0),
                helper.make_node("Cast", [f"{base}_int8"], [f"{base}_codes"], name=f"{node.name}_cast",
                                 to=TensorProto.FLOAT),
                helper.make_node("Gather", [dq.input[1], ids], [f"{base}_scale"], name=f"{node.name}_scale", axis=0),
                helper.make_node("Unsqueeze", [f"{base}_scale", "fastertrt_last_axis"], [f"{base}_scale_col"],
                                 name=f"{node.name}_scale_col"),
                helper.make_node("Mul", [f"{base}_codes", f"{base}_scale_col"], [base], name=f"{node.name}_dequant")]
            counts["embedding Gather on INT8 rows"] += 1
        elif node.domain == "fastertrt" and node.op_type in ORT_LOWERINGS:
            nodes = importlib.import_module(ORT_LOWERINGS[node.op_type]).lower(node, consts, causal_lm=causal_lm,
                                                                                made=made, graph=view)
            if nodes is not None:
                replace[id(node)] = nodes
                ops = [n.op_type for n in nodes if n.domain == "com.microsoft"]
                main = next((op for op in ops if op != "RotaryEmbedding"), nodes[0].op_type)
                counts[f"{node.op_type} -> {main}"] += 1
                if ops.count("RotaryEmbedding"):
                    counts["rotary -> RotaryEmbedding"] += ops.count("RotaryEmbedding")

    nodes = []
    for node in graph.node:
        nodes.extend(replace.get(id(node), [node]))
    nodes = _drop_dead(nodes, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(v, k) for k, v in consts.items() if k in used])
    called = {(n.domain, n.op_type) for n in nodes}
    live_functions = [f for f in out.functions if (f.domain, f.name) in called]
    del out.functions[:]
    out.functions.extend(live_functions)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, dict(counts)


class GraphView:
    """What a plugin's ORT lowering may read around its node: producers and
    consumers by value name, constants, the graph's input names."""

    def __init__(self, producer: dict, consumers: dict, const, inputs: set, outputs: set, max_positions: int,
                 shapes: dict | None = None):
        self.producer, self.consumers, self.const = producer, consumers, const
        self.inputs, self.outputs, self.max_positions = inputs, outputs, max_positions
        self.shapes = shapes or {}  # value name -> dims (ints, dim names) where the file records them

    def made_by(self, name: str, *op_types: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type in op_types else None

    def uses(self, name: str) -> list:
        """Nodes that read the value (a graph output counts as one more use)."""
        return self.consumers.get(name, []) + ([None] if name in self.outputs else [])


def _shapes(graph) -> dict:
    out = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return out


def _drop_dead(nodes: list, outputs: set) -> list:
    """Remove nodes none of whose outputs is used (repeatedly)."""
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(live) == len(nodes):
            return live
        nodes = live


def write_decoder_variants(stage, graphs: dict, vocab: int, max_positions: int,
                           progress=None) -> tuple[dict, object]:
    """`{name}.ort.onnx` next to each fused decoder graph (sharing its weights
    file), checked against it on ONNX Runtime (prefill, then one-token decode
    steps: GroupQueryAttention takes several new tokens with a cache only at
    batch 1, and the runtime decodes one at a time). graphs: name -> fused file.
    Returns ({name: {"ort_file", "ort_lowered"}}, parity report)."""
    import os

    import onnx

    from fastertrt.compiler.export.parity import ParityReport
    from fastertrt.compiler.rewrite import parity as rewrite_parity
    from fastertrt.progress import quiet

    progress = progress or quiet()
    files, pairs = {}, {}
    for name, fused in graphs.items():
        dst = fused.with_name(f"{name}.ort.onnx")
        lowered, counts = lower_for_onnxruntime(onnx.load(str(fused), load_external_data=False), causal_lm=True,
                                                base_dir=fused.parent, max_positions=max_positions)
        tmp = dst.with_name(dst.name + ".tmp")
        onnx.save(lowered, str(tmp))
        os.replace(tmp, dst)
        progress.info(f"    {name}: ONNX Runtime variant {dst.name}: "
                      + (", ".join(f"{k} {v}" for k, v in counts.items()) or "no changes"))
        files[name], pairs[name] = {"ort_file": dst.name, "ort_lowered": counts}, (fused, dst)
    report = ParityReport()
    rewrite_parity.check_decoder(pairs, vocab, report, decode_lengths=(1,))
    return files, report
