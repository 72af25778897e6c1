"""FP16 / BF16 graphs for strongly typed builds.

TensorRT 11 and TensorRT-RTX take precision from the graph, not from builder
flags. This pass runs every MatMul and Gemm that has a weight in the target type: the
weights are stored converted, activations are cast on the way in and back to
FP32 on the way out. Everything else (LayerNorm, Softmax, reductions, residual
adds, embeddings) stays FP32, so nothing that sums many values can overflow
FP16; TensorRT fuses the casts into the neighbouring kernels.

Attention plugin nodes run in the target type too (their mask input stays FP32).
In graphs without the plugin (--no-plugins), attention's activation x activation
MatMuls stay FP32: TensorRT-RTX 1.7's MHA fusion aborts ("CHECK(is_softmax(...))")
when a Cast sits between Softmax and the second MatMul.
"""

from __future__ import annotations

from pathlib import Path

from fastertrt.errors import BuildError

PRECISIONS = ("fp32", "fp16", "bf16")
COMPUTE_OPS = ("MatMul", "Gemm")


def _target(precision: str):
    import ml_dtypes
    import numpy as np
    import onnx

    if precision == "fp16":
        return onnx.TensorProto.FLOAT16, np.float16
    if precision == "bf16":
        return onnx.TensorProto.BFLOAT16, ml_dtypes.bfloat16
    raise BuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def cast_model(model, precision: str) -> dict:
    """Rewrite `model` (an onnx.ModelProto) in place; returns counts for the report."""
    import onnx
    from onnx import helper, numpy_helper

    elem, np_type = _target(precision)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    float_values = _float_tensors(model)
    converted: dict[str, str] = {}  # fp32 initializer -> its converted copy
    casts: dict[str, str] = {}  # fp32 activation -> its cast
    new_nodes, n_compute = [], 0
    suffix = f"_{precision}"

    def low(name: str) -> str:
        if name in inits and inits[name].data_type == onnx.TensorProto.FLOAT:
            if name not in converted:
                arr = numpy_helper.to_array(inits[name]).astype(np_type)
                t = numpy_helper.from_array(arr, name + suffix)
                graph.initializer.append(t)
                converted[name] = t.name
            return converted[name]
        if name not in casts:
            casts[name] = name + suffix
            new_nodes.append(helper.make_node("Cast", [name], [casts[name]], to=elem, name=f"cast{suffix}/{name}"))
        return casts[name]

    for node in list(graph.node):
        if (node.op_type in COMPUTE_OPS and node.domain in ("", "ai.onnx")
                and any(i in inits for i in node.input) and all(i in float_values for i in node.input if i)):
            n_compute += 1
            for k, name in enumerate(node.input):
                if name:
                    node.input[k] = low(name)
            for k, name in enumerate(node.output):
                node.output[k] = name + suffix
                new_nodes.append(helper.make_node("Cast", [node.output[k]], [name], to=onnx.TensorProto.FLOAT,
                                                  name=f"cast_fp32/{name}"))
        elif _is_attention_plugin(node) and all(i in float_values for i in node.input if i):
            # the plugin computes in the target type with FP32 accumulation; the
            # additive mask stays FP32 (the plugin takes either)
            n_compute += 1
            names = _attention_input_names(node)
            for k, name in enumerate(node.input):
                if name and names[k] != "mask":
                    node.input[k] = low(name)
            for k, name in enumerate(node.output):
                node.output[k] = name + suffix
                new_nodes.append(helper.make_node("Cast", [node.output[k]], [name], to=onnx.TensorProto.FLOAT,
                                                  name=f"cast_fp32/{name}"))
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(_toposort(new_nodes, {i.name for i in graph.input} | set(inits) | set(converted.values())))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(kept)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return {"compute_nodes": n_compute, "weights_converted": len(converted), "fp32_weights_dropped": dropped,
            "activation_casts": len(casts)}


def _is_attention_plugin(node) -> bool:
    from fastertrt.plugins.attention import spec

    return node.domain == spec.DOMAIN and node.op_type == spec.NAME


def _attention_input_names(node) -> list[str]:
    from onnx import helper

    from fastertrt.plugins.attention.spec import AttentionAttrs

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return AttentionAttrs.from_dict(attrs).input_names()


def _float_tensors(model) -> set:
    """Names of FLOAT tensors (inputs, initializers, value_info, node outputs by shape inference)."""
    import onnx

    inferred = model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a partial answer is fine: unknown tensors are left alone
        pass
    g = inferred.graph
    names = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            names.add(vi.name)
    return names


def _toposort(nodes: list, available: set) -> list:
    """Casts were appended next to their users; order them before their consumers."""
    ready, out, pending = set(available), [], list(nodes)
    produced_by = {o: n for n in nodes for o in n.output}
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all((not i) or i in ready or i not in produced_by for i in n.input):
                out.append(n)
                ready.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise BuildError("precision pass left a cycle in the graph; this is a fastertrt bug")
        pending = rest
    return out


def write_cast_graph(src: Path, dst: Path, precision: str) -> dict:
    import onnx

    from fastertrt.compiler.export.shared_weights import load_with_weights

    model = load_with_weights(src)
    stats = cast_model(model, precision)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return stats
