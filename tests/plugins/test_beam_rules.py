"""Beam-step rewrite: the exported decoder graphs fuse their beam tail, hand-built
tails in both exporter spellings fuse with identical outputs, tails that are not
the beam step are left alone with the reason, and the plugin's ONNX function
agrees with the numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import DECODERS

from fastertrt.plugins.beam_search import reference, spec
from fastertrt.plugins.beam_search.spec import BeamStepAttrs

VOCAB = 37


@pytest.mark.parametrize("family", DECODERS)
def test_exported_decoders_fuse_the_beam_tail(bundles, family):
    import onnx

    bundle = bundles.tiny(family)
    m = json.loads((bundle / "manifest.json").read_text())
    for name in ("prefill", "decode"):
        rw = m["graphs"][name]["rewrite"][spec.NAME]
        assert rw["blocks"] == 1 and rw["fused"] == 1 and not rw["unfused"], rw
        model = onnx.load(str(bundle / m["graphs"][name]["file"]), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count(spec.NAME) == 1 and "TopK" not in ops and "LogSoftmax" not in ops
        node = next(n for n in model.graph.node if n.op_type == spec.NAME)
        attrs = {a.name: a for a in node.attribute}
        assert attrs["candidates"].i == m["model"]["beam_candidates"] and attrs["has_bias"].i == 1


def _tail(path, *, bias=True, div="int", largest=1, axis=-1, k_const=None, mod_by=VOCAB, flat="bk",
          column=(-1, 1), candidates=2):
    """A beam tail as the dynamo exporter writes it, with one thing changeable at a time."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], []

    def const(name, values, dtype=np.int64):
        inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(op, inputs, outputs, **kw):
        nodes.append(helper.make_node(op, inputs, outputs if isinstance(outputs, list) else [outputs], **kw))
        return outputs

    lp = node("LogSoftmax", ["logits"], "lp", axis=axis)
    if bias:
        lp = node("Add", [lp, "bias"], "lp_b")
    col = node("Reshape", ["beam_scores", const("col_shape", list(column))], "col")
    acc = node("Add", [lp, col], "acc")
    beams = node("Squeeze", [node("Shape", ["beam_scores"], "bshape_k", start=1, end=2)], "beams")
    batch = node("Shape", ["beam_scores"], "bshape_b", start=0, end=1)
    width = node("Reshape", [node("Mul", [beams, const("v", VOCAB)], "kv"), const("one", [1])], "kv1")
    shape = node("Concat", [batch, width] if flat == "bk" else [width, batch], "flat_shape", axis=0)
    flat = node("Reshape", [acc, shape], "flat")
    if k_const is None:
        k = node("Reshape", [node("Mul", [const("c", candidates), beams], "ck"), const("one1", [1])], "k")
    else:
        k = const("k", [k_const])
    node("TopK", [flat, k], ["scores", "idx"], axis=-1, largest=largest, sorted=1)
    node("Mod", ["idx", const("vm", mod_by)], "tokens", fmod=0)
    if div == "int":
        node("Div", ["idx", const("vd", VOCAB)], "parents")
    else:
        f = node("Div", [node("Cast", ["idx"], "idx_f", to=TensorProto.FLOAT), const("vf", float(VOCAB), np.float32)],
                 "q")
        node("Cast", [node("Floor", [f], "fl")], "parents", to=TensorProto.INT64)
    inputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", VOCAB]),
              helper.make_tensor_value_info("beam_scores", TensorProto.FLOAT, ["batch", "beams"])]
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [VOCAB]))
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("tokens", TensorProto.INT64, None),
               helper.make_tensor_value_info("parents", TensorProto.INT64, None)]
    graph = helper.make_graph(nodes, "tail", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _run(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(batch=2, beams=3, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"logits": rng.normal(size=(batch * beams, VOCAB)).astype(np.float32),
             "beam_scores": -3 * rng.random((batch, beams), dtype=np.float32)}
    if bias:
        feeds["bias"] = np.zeros(VOCAB, np.float32)
        feeds["bias"][[3, 11]] = -np.inf
    return feeds


def _rewrite(tmp_path, src):
    from fastertrt.compiler.rewrite import rewrite_file

    dst = tmp_path / "fused.onnx"
    (report,) = [r for r in rewrite_file(src, dst, allow_partial=True) if r.plugin == spec.NAME]
    return report, dst


@pytest.mark.parametrize("div", ["int", "float"])
@pytest.mark.parametrize("bias", [True, False])
def test_hand_built_tails_fuse_with_the_same_outputs(tmp_path, div, bias):
    src = _tail(tmp_path / "tail.onnx", bias=bias, div=div)
    report, dst = _rewrite(tmp_path, src)
    assert (report.blocks, report.fused) == (1, 1), report.unfused
    for beams in (1, 2, 4):  # the node serves any beam count
        feeds = _feeds(2, beams, bias, seed=beams)
        before, after = _run(src, feeds), _run(dst, feeds)
        np.testing.assert_allclose(after[0], before[0], atol=1e-6)
        for b, a in zip(before[1:], after[1:]):
            assert a.dtype == np.int64
            np.testing.assert_array_equal(a, b)


NOT_BEAM_STEPS = {
    "smallest-k": (dict(largest=0), "largest-k"),
    "fixed-k": (dict(k_const=5), "not a fixed number of candidates per beam"),
    "mod-by-other": (dict(mod_by=VOCAB - 1), "not the vocabulary"),
    "flat-transposed": (dict(flat="kb"), "not [B, K*V]"),
    "log-softmax-over-rows": (dict(axis=0), "not the vocabulary"),
    "scores-as-row": (dict(column=(1, -1)), "column"),
}


@pytest.mark.parametrize("name", sorted(NOT_BEAM_STEPS))
def test_tails_that_are_not_the_beam_step_stay(tmp_path, name):
    kw, reason = NOT_BEAM_STEPS[name]
    report, dst = _rewrite(tmp_path, _tail(tmp_path / "tail.onnx", **kw))
    assert report.fused == 0 and report.blocks == 1
    why = " ".join(report.unfused[0]["reasons"].values())
    assert reason in why, why


def test_onnx_function_matches_numpy_reference_with_ties_and_banned_tokens(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    attrs = BeamStepAttrs(candidates=3, has_bias=1)
    ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", VOCAB]),
           helper.make_tensor_value_info("beam_scores", TensorProto.FLOAT, ["B", "K"]),
           helper.make_tensor_value_info("bias", TensorProto.FLOAT, [VOCAB])]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (("s", TensorProto.FLOAT), ("t", TensorProto.INT32), ("b", TensorProto.INT32))]
    node = helper.make_node(spec.NAME, [i.name for i in ins], ["s", "t", "b"], domain=spec.DOMAIN,
                            overload=attrs.overload(), **attrs.to_dict())
    model = helper.make_model(helper.make_graph([node], "g", ins, outs), functions=[reference.onnx_function(attrs, 18)],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(spec.DOMAIN, 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(3, 4)
    feeds["logits"][1, :] = feeds["logits"][0, :]  # beams 0 and 1 of row 0 tie everywhere ...
    feeds["beam_scores"][0, 1] = feeds["beam_scores"][0, 0]  # ... with equal running scores
    got = sess.run(None, feeds)
    want = reference.beam_step_numpy(feeds["logits"], feeds["beam_scores"], feeds["bias"], 3)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g, w)
    assert not np.isin(got[1], [3, 11]).any()  # banned tokens never come back
    assert list(got[2][0][:2]) == [0, 1]  # a tie goes to the lower flat index: beam 0 first


def test_spec_rejects_what_the_kernels_cannot_do():
    with pytest.raises(spec.BeamStepSpecError, match="candidates"):
        BeamStepAttrs(candidates=0)
    with pytest.raises(spec.BeamStepSpecError, match="rows"):
        spec.output_shapes(BeamStepAttrs(), [[7, VOCAB], [2, 3]])
    with pytest.raises(spec.BeamStepSpecError, match="exceeds"):
        spec.output_shapes(BeamStepAttrs(candidates=16), [[10, VOCAB], [1, 10]])
    assert spec.output_shapes(BeamStepAttrs(candidates=2), [["rows", VOCAB], ["b", "k"]]) == [["b", "2*k"]] * 3
