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
