"""Model-local ONNX functions for plugin nodes (compile time): every node of a
plugin gets the reference function of its attribute set, one per overload, so
ONNX Runtime runs fused graphs and TensorRT's parser has something to inline
(which the build stage refuses)."""

from __future__ import annotations


def attach_functions(model, domain: str, name: str, node_attrs, onnx_function) -> int:
    """node_attrs(node) -> attrs with .overload(); onnx_function(attrs, opset) ->
    FunctionProto. Returns how many functions were added."""
    import onnx_ir as ir

    opset = model.opset_imports.get("", 18)
    model.opset_imports.setdefault(domain, 1)
    made = 0
    for node in model.graph:
        if node.domain != domain or node.op_type != name:
            continue
        attrs = node_attrs(node)
        node.overload = attrs.overload()
        if (domain, name, node.overload) not in model.functions:
            fn = ir.serde.deserialize_function(onnx_function(attrs, opset))
            model.functions[fn.identifier()] = fn
            made += 1
    return made


def attribute_values(node) -> dict:
    """An onnx.NodeProto's attributes as Python values (strings decoded)."""
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def check_functions(model) -> list[str]:
    """Problems with the plugin nodes of an onnx.ModelProto: a node whose attributes
    do not match the ONNX function it carries (its overload) runs one computation on
    ONNX Runtime (the function body) and another in TensorRT (the plugin reads the
    attributes), so every check made on ONNX Runtime would miss what the engine does."""
    import importlib

    from fastertrt.plugins import REGISTRY

    functions = {(f.domain, f.name, getattr(f, "overload", "")) for f in model.functions}
    problems = []
    for node in model.graph.node:
        if node.op_type not in REGISTRY or node.domain != "fastertrt":
            continue
        spec = importlib.import_module(REGISTRY[node.op_type].rsplit(".", 1)[0] + ".spec")
        try:
            expected = spec.ATTRS.from_dict(attribute_values(node)).overload()
        except ValueError as exc:
            problems.append(f"plugin node {node.name} ({node.op_type}) has invalid attributes: {exc}")
            continue
        if (node.domain, node.op_type, node.overload) not in functions:
            problems.append(f"plugin node {node.name} ({node.op_type}) names ONNX function overload "
                            f"{node.overload!r}, which the model lacks")
        elif node.overload != expected:
            problems.append(f"plugin node {node.name} ({node.op_type}) has attributes of overload {expected!r} but "
                            f"carries the function of {node.overload!r}: ONNX Runtime runs the function, TensorRT "
                            f"the attributes, so they compute different things; recompile the bundle")
    return problems
