"""What the beam-step plugin computes, in numpy (the kernels' reference) and as
the body of the model-local ONNX function every plugin node carries."""

from __future__ import annotations

import numpy as np

from fastertrt.plugins.beam_search import spec
from fastertrt.plugins.beam_search.spec import BeamStepAttrs


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def top_k_stable(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k along the last axis, descending; equal scores keep the lower index
    first (ONNX TopK's rule)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(scores, order, axis=-1), order


def beam_step_numpy(logits, beam_scores, bias=None, candidates: int = 2):
    """(scores [B, k] float32, tokens [B, k] int32, beams [B, k] int32), k = candidates * K.
    Accumulates in float64."""
    logits = np.asarray(logits, dtype=np.float32)
    beam_scores = np.asarray(beam_scores, dtype=np.float64)
    b, k = beam_scores.shape
    n, v = logits.shape
    if n != b * k:
        raise ValueError(f"logits have {n} rows; beam_scores {beam_scores.shape} needs {b * k}")
    lp = log_softmax(logits)
    if bias is not None:
        lp = lp + np.asarray(bias, dtype=np.float64)[None, :]
    acc = (lp + beam_scores.reshape(-1, 1)).reshape(b, k * v)
    scores, flat = top_k_stable(acc, candidates * k)
    return scores.astype(np.float32), (flat % v).astype(np.int32), (flat // v).astype(np.int32)


def run_reference(attrs: BeamStepAttrs, inputs: list[np.ndarray]) -> list[np.ndarray]:
    named = dict(zip(attrs.input_names(), inputs))
    return list(beam_step_numpy(named["logits"], named["beam_scores"], named.get("bias"), attrs.candidates))


def onnx_function(attrs: BeamStepAttrs, opset: int):
    """The FunctionProto for nodes with these attributes (overload attrs.overload())."""
    from onnx import TensorProto, helper

    nodes = []

    def const(name, values):
        arr = np.asarray(values, dtype=np.int64)
        nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.INT64, arr.shape, arr.flatten().tolist())))
        return name

    def node(op, inputs, output, **kw):
        nodes.append(helper.make_node(op, inputs, [output], **kw))
        return output

    lp = node("LogSoftmax", [node("Cast", ["logits"], "logits32", to=TensorProto.FLOAT)], "log_probs", axis=-1)
    if attrs.has_bias:
        lp = node("Add", [lp, "bias"], "log_probs_biased")
    acc = node("Add", [lp, node("Reshape", ["beam_scores", const("column", [-1, 1])], "beam_col")], "acc")
    bk = node("Shape", ["beam_scores"], "bk")
    batch = node("Slice", [bk, const("i0", [0]), const("i1", [1])], "batch")
    beams = node("Slice", [bk, const("i1b", [1]), const("i2", [2])], "num_beams")
    flat = node("Reshape", [acc, node("Concat", [batch, const("minus1", [-1])], "flat_shape", axis=0)], "flat")
    k = node("Mul", [beams, const("cands", [attrs.candidates])], "k")
    nodes.append(helper.make_node("TopK", [flat, k], ["scores", "flat_idx"], axis=-1, largest=1, sorted=1))
    vocab = node("Slice", [node("Shape", ["logits"], "nv"), const("i1c", [1]), const("i2b", [2])], "vocab")
    node("Cast", [node("Mod", ["flat_idx", vocab], "tok64")], "tokens", to=TensorProto.INT32)
    node("Cast", [node("Div", ["flat_idx", vocab], "beam64")], "beams", to=TensorProto.INT32)
    return helper.make_function(
        spec.DOMAIN, spec.NAME, attrs.input_names(), attrs.output_names(), nodes,
        opset_imports=[helper.make_opsetid("", max(opset, 14))], overload=attrs.overload(),
    )
