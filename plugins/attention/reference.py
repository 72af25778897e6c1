"""What the attention plugin computes, twice: in numpy (the tests' reference for
the kernels) and as the body of the model-local ONNX function that every plugin
node carries (so ONNX Runtime runs fused graphs, and TensorRT's parser has
something to inline when the plugin is missing - which the build stage refuses).

Both follow spec.py: softmax(scale * Q K^T + mask [+ causal]) V with grouped
heads, FP32 accumulation, zeros for rows whose every key is masked out.
"""

from __future__ import annotations

import numpy as np

from fastertrt.plugins.attention import spec
from fastertrt.plugins.attention.spec import AttentionAttrs


def attention_numpy(q, k, v, mask=None, scale=None, causal=False) -> np.ndarray:
    """q [B, Hq, S, D]; k, v [B, Hkv, T, D] (the whole cache); mask additive,
    broadcastable to [B, Hq, S, T]. Accumulates in float64; returns q's dtype
    (float32 for bfloat16 inputs, which numpy cannot hold)."""
    out_dtype = q.dtype if q.dtype in (np.float32, np.float16, np.float64) else np.float32
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    hq, hkv, s, t = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    k = np.repeat(k, hq // hkv, axis=1)
    v = np.repeat(v, hq // hkv, axis=1)
    scale = spec.default_scale(q.shape[-1]) if scale is None else scale
    scores = np.einsum("bhsd,bhtd->bhst", q, k) * scale
    if mask is not None:
        scores = scores + np.asarray(mask, dtype=np.float64)
    if causal:
        allowed = np.arange(t)[None, :] <= (np.arange(s)[:, None] + t - s)
        scores = np.where(allowed, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    live = np.isfinite(top)
    e = np.where(live, np.exp(scores - np.where(live, top, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    probs = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return np.einsum("bhst,bhtd->bhsd", probs, v).astype(out_dtype)


def split_packed(qkv: np.ndarray, attrs: AttentionAttrs):
    """[B, S, (Hq + 2 Hkv) D] -> query [B, Hq, S, D], key and value [B, Hkv, S, D]."""
    b, s, _ = qkv.shape
    heads = qkv.reshape(b, s, attrs.num_heads + 2 * attrs.kv_num_heads, attrs.head_size).transpose(0, 2, 1, 3)
    hq, hkv = attrs.num_heads, attrs.kv_num_heads
    return heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]


def run_reference(attrs: AttentionAttrs, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The plugin node's outputs for its inputs, in numpy."""
    named = dict(zip(attrs.input_names(), inputs))
    if attrs.qkv_packed:
        q, k, v = split_packed(named["qkv"], attrs)
    else:
        q, k, v = named["query"], named["key"], named["value"]
    if attrs.has_past:
        k = np.concatenate([named["past_key"], k], axis=2)
        v = np.concatenate([named["past_value"], v], axis=2)
    out = attention_numpy(q, k, v, named.get("mask"), attrs.scale, bool(attrs.causal))
    return [out, k, v] if attrs.has_past else [out]


def onnx_function(attrs: AttentionAttrs, opset: int):
    """The FunctionProto for nodes with these attributes (overload attrs.overload()).

    Computes in FP32 whatever the I/O type, as the kernels do, and casts the
    output back to the query's type."""
    from onnx import TensorProto, helper

    nodes = []
    consts = {}

    def const(name, values, dtype=TensorProto.INT64):
        if name not in consts:
            arr = np.asarray(values, dtype=np.float32 if dtype == TensorProto.FLOAT else np.int64)
            nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
                name, dtype, arr.shape, arr.flatten().tolist())))
            consts[name] = name
        return name

    def node(op, inputs, output, **kw):
        nodes.append(helper.make_node(op, inputs, [output], **kw))
        return output

    hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size
    inputs = attrs.input_names()
    if attrs.qkv_packed:
        heads = node("Reshape", ["qkv", const("packed_shape", [0, 0, hq + 2 * hkv, d])], "qkv_heads")
        heads = node("Transpose", [heads], "qkv_bhsd", perm=[0, 2, 1, 3])
        nodes.append(helper.make_node("Split", [heads, const("split_sizes", [hq, hkv, hkv])],
                                      ["query", "key", "value"], axis=1))
    key, value = "key", "value"
    if attrs.has_past:
        key = node("Concat", ["past_key", "key"], "present_key", axis=2)
        value = node("Concat", ["past_value", "value"], "present_value", axis=2)
    q32 = node("Cast", ["query"], "q32", to=TensorProto.FLOAT)
    k32 = node("Cast", [key], "k32", to=TensorProto.FLOAT)
    v32 = node("Cast", [value], "v32", to=TensorProto.FLOAT)
    if attrs.group > 1:
        # [B, Hkv, T, D] -> [B, Hkv, G, T, D] -> [B, Hq, T, D]: query head h reads kv head h // G
        reps = const("group_expand", [1, 1, attrs.group, 1, 1])
        merged = const("grouped_shape", [0, hq, -1, d])
        axis2 = const("axis2", [2])
        k32 = node("Reshape", [node("Expand", [node("Unsqueeze", [k32, axis2], "k_u"), reps], "k_e"), merged], "k_g")
        v32 = node("Reshape", [node("Expand", [node("Unsqueeze", [v32, axis2], "v_u"), reps], "v_e"), merged], "v_g")
    kt = node("Transpose", [k32], "k_t", perm=[0, 1, 3, 2])
    scores = node("Mul", [node("MatMul", [q32, kt], "qk"), const("scale", attrs.scale, TensorProto.FLOAT)], "scores")
    if attrs.has_mask:
        scores = node("Add", [scores, node("Cast", ["mask"], "mask32", to=TensorProto.FLOAT)], "scores_masked")
    if attrs.causal:
        # key j is visible to query i when j <= i + (T - S): the new rows sit at the end
        shape_q = node("Shape", [q32], "shape_q")
        shape_k = node("Shape", [k32], "shape_k")
        s_len = node("Gather", [shape_q, const("i2", 2)], "s_len", axis=0)
        t_len = node("Gather", [shape_k, const("i2", 2)], "t_len", axis=0)
        zero, one = const("i0", 0), const("i1", 1)
        rows = node("Add", [node("Range", [zero, s_len, one], "rows0"), node("Sub", [t_len, s_len], "offset")], "rows")
        cols = node("Range", [zero, t_len, one], "cols")
        visible = node("LessOrEqual", [node("Unsqueeze", [cols, const("axis0", [0])], "cols_2d"),
                                       node("Unsqueeze", [rows, const("axis1", [1])], "rows_2d")], "visible")
        scores = node("Where", [visible, scores, const("neg_inf", -np.inf, TensorProto.FLOAT)], "scores_causal")
    probs = node("Softmax", [scores], "probs", axis=-1)
    # rows with every key masked to -inf give NaN in Softmax; the contract says zeros
    probs = node("Where", [node("IsNaN", [probs], "probs_nan"), const("zero_f", 0.0, TensorProto.FLOAT), probs],
                 "probs_safe")
    out32 = node("MatMul", [probs, v32], "out32")
    node("CastLike", [out32, "query"], "out")
    return helper.make_function(
        spec.DOMAIN, spec.NAME, inputs, attrs.output_names(), nodes,
        opset_imports=[helper.make_opsetid("", max(opset, 15))], overload=attrs.overload(),
    )
