"""Faults planted into a copy of a bundle, the kinds `fastertrt compare` must
find and name: each edits one graph file of the copy (in memory, weights left
in their external files) and rewrites the manifest, so the bundle looks like
one a buggy stage produced."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def copy_bundle(bundle: Path, dst: Path) -> Path:
    """A copy with its own graph files (edited below) and linked weights."""
    from fastertrt.compiler.bundle import link_or_copy

    def copy(src, dst_file):
        (shutil.copy2 if src.endswith((".onnx", "manifest.json")) else link_or_copy)(src, dst_file)

    shutil.copytree(bundle, dst, copy_function=copy)
    return dst


def _edit(bundle: Path, file: str, change) -> dict:
    """Load `file` without its weights, let change(model) edit it, save it, rewrite
    the manifest's hashes. Returns what change returned (the fault's location)."""
    import json

    import onnx

    from fastertrt.compiler.bundle import write_manifest

    path = bundle / file
    model = onnx.load(str(path), load_external_data=False)
    where = change(model)
    onnx.save(model, str(path))
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))
    return where


def _attr(node, name):
    return next(a for a in node.attribute if a.name == name)


def attention_scale(bundle: Path, which: int = 1, factor: float = 3.0, function_too: bool = True) -> dict:
    """fused.onnx: the `which`-th attention plugin node gets a wrong softmax scale, as
    a rule that computed it wrong would write it: attribute and ONNX function agree
    (function_too=False changes the attribute alone, which only the engine would see)."""
    from fastertrt.plugins.attention.reference import onnx_function
    from fastertrt.plugins.attention.spec import ATTRS
    from fastertrt.plugins.functions import attribute_values

    def change(model):
        node = [n for n in model.graph.node if n.domain == "fastertrt" and n.op_type == "FastertrtAttention"][which]
        _attr(node, "scale").f *= factor
        if function_too:
            attrs = ATTRS.from_dict(attribute_values(node))
            node.overload = attrs.overload()
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            model.functions.append(onnx_function(attrs, opset))
        return {"node": node.name, "output": node.output[0]}

    return _edit(bundle, "fused.onnx", change)


def _weight_matmuls(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def swapped_weight(bundle: Path, first: int = 6, file: str = "fused.onnx") -> dict:
    """`file`: weight MatMuls `first` and `first + 1` read each other's weights (query
    and key of the second layer, in a BERT encoder)."""
    def change(model):
        a, b = _weight_matmuls(model)[first:first + 2]
        wa, wb = a.input[1], b.input[1]
        a.input[1], b.input[1] = wb, wa
        return {"node": a.name, "weights": (wa, wb), "output": a.output[0]}

    return _edit(bundle, file, change)


def off_by_one_mask(bundle: Path) -> dict:
    """fused.onnx: every reader of attention_mask gets the mask shifted right by one,
    so each padded row attends to one position past its last token."""
    from onnx import helper, numpy_helper

    def change(model):
        g = model.graph
        users = [n for n in g.node if "attention_mask" in n.input]
        g.initializer.extend([numpy_helper.from_array(np.array([0, 1, 0, 0], np.int64), "obo_pads"),
                              numpy_helper.from_array(np.array(1, np.int64), "obo_one"),
                              numpy_helper.from_array(np.array([0], np.int64), "obo_start"),
                              numpy_helper.from_array(np.array([-1], np.int64), "obo_end"),
                              numpy_helper.from_array(np.array([1], np.int64), "obo_axis")])
        nodes = [helper.make_node("Pad", ["attention_mask", "obo_pads", "obo_one"], ["obo_padded"], name="obo_pad"),
                 helper.make_node("Slice", ["obo_padded", "obo_start", "obo_end", "obo_axis"],
                                  ["attention_mask_off_by_one"], name="obo_slice")]
        for n in users:
            for i, name in enumerate(n.input):
                if name == "attention_mask":
                    n.input[i] = "attention_mask_off_by_one"
        for k, node in enumerate(nodes):
            g.node.insert(k, node)
        return {"nodes": [n.name for n in users], "outputs": [n.output[0] for n in users]}

    return _edit(bundle, "fused.onnx", change)


def qdq_scale(bundle: Path, which: int = 6, kind: str = "activation", factor: float = 0.05) -> dict:
    """int8.onnx: the `which`-th INT8 MatMul gets a bad activation scale (clips) or a
    bad weight scale (every channel off by `factor`)."""
    from onnx import numpy_helper

    from fastertrt.tools.compare.layers import read_initializer

    def change(model):
        g = model.graph
        producer = {o: n for n in g.node for o in n.output}
        mm = [n for n in g.node if n.op_type == "MatMul" and producer.get(n.input[0]) is not None
              and producer[n.input[0]].op_type == "DequantizeLinear"][which]
        dq = producer[mm.input[0] if kind == "activation" else mm.input[1]]
        scale_name = dq.input[1]
        old = next(t for t in g.initializer if t.name == scale_name)
        value = read_initializer(old, bundle) * np.float32(factor)
        new = numpy_helper.from_array(value.astype(np.float32), scale_name)
        g.initializer.remove(old)
        g.initializer.append(new)
        if kind == "activation":  # the QuantizeLinear reads the same scale: both sides of the pair change
            q = producer[dq.input[0]]
            assert q.input[1] == scale_name
        return {"matmul": mm.name, "dq": dq.name, "dq_output": dq.output[0], "scale": scale_name}

    return _edit(bundle, "int8.onnx", change)
