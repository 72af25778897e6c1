"""The attention plugin node as ONNX Runtime's own fused operator, for graphs
that only ONNX Runtime runs (the ORT variant of a bundle graph):

  query/key/value [B, H, S, D] -> Transpose + Reshape -> [B, S, H*D] -> com.microsoft op
  -> [B, S, H*D] -> Reshape + Transpose -> out [B, H, S, D]

ONNX Runtime cancels the Transpose pairs this leaves next to the exporter's
own. Encoders (no cache, not causal, multi-head) get MultiHeadAttention: the
additive mask as attention_bias, rows whose every key is -inf give zeros.
Decoder graphs (causal_lm) get GroupQueryAttention, which also concatenates
the KV cache: its causal mask is the one the exporter's mask already holds, the
exporter's mask (causal + left padding) comes in as attention_bias, clamped to
the lowest finite float (GQA turns a row of -inf into NaN, which the cache would
carry into later steps), and every row counts all `total` positions (the bias,
not seqlens_k, masks the left padding). Other nodes keep their ONNX function.
"""

from __future__ import annotations

import numpy as np
from fastertrt.plugins.attention.spec import AttentionAttrs


def why_not(attrs: AttentionAttrs) -> str | None:
    if attrs.qkv_packed:
        return "packed qkv"
    if attrs.has_past:
        return "KV cache"
    if attrs.causal:
        return "causal"
    if attrs.num_heads != attrs.kv_num_heads:
        return "grouped-query heads"
    return None


def node_attrs(node) -> AttentionAttrs:
    from onnx import helper

    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return AttentionAttrs.from_dict({k: v for k, v in values.items() if not isinstance(v, bytes)})


def lower(node, consts: dict, causal_lm: bool = False, made: set | None = None) -> list | None:
    """Replacement nodes for one plugin node, or None when ORT has no equal op.
    consts: a dict the caller turns into initializers (shared between nodes).
    causal_lm: the node is in a causal decoder graph (its mask is causal).
    made: names of values already computed for an earlier node of this graph."""
    from onnx import helper

    attrs = node_attrs(node)
    if causal_lm and attrs.has_mask and not attrs.qkv_packed:
        return _group_query_attention(node, attrs, consts, made if made is not None else set())
    if why_not(attrs):
        return None
    h, d = attrs.num_heads, attrs.head_size
    consts.setdefault("fastertrt_mha_bsd", np.array([0, 0, h * d], dtype=np.int64))
    consts.setdefault("fastertrt_mha_bshd", np.array([0, 0, h, d], dtype=np.int64))
    base = node.name or node.output[0]
    nodes, flat = [], []
    for i, name in enumerate(node.input[:3]):
        t = f"{base}_in{i}_bshd"
        nodes.append(helper.make_node("Transpose", [name], [t], name=f"{t}_node", perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [t, "fastertrt_mha_bsd"], [f"{base}_in{i}_bsd"], name=f"{base}_in{i}_bsd_node"))
        flat.append(f"{base}_in{i}_bsd")
    mask = node.input[3] if attrs.has_mask else ""
    nodes.append(helper.make_node("MultiHeadAttention", flat + ["", "", mask], [f"{base}_bsd"], name=f"{base}_mha",
                                  domain="com.microsoft", num_heads=h, scale=float(attrs.scale)))
    nodes.append(helper.make_node("Reshape", [f"{base}_bsd", "fastertrt_mha_bshd"], [f"{base}_bshd"], name=f"{base}_bshd_node"))
    nodes.append(helper.make_node("Transpose", [f"{base}_bshd"], [node.output[0]], name=f"{base}_out", perm=[0, 2, 1, 3]))
    return nodes


def _group_query_attention(node, attrs: AttentionAttrs, consts: dict, made: set) -> list:
    from onnx import TensorProto, helper

    hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size
    base = node.name or node.output[0]
    consts.setdefault("fastertrt_one", np.array([1], dtype=np.int64))
    consts.setdefault("fastertrt_finite_floor", np.array(np.finfo(np.float32).min, dtype=np.float32))
    consts.setdefault(f"fastertrt_bsd_{hq * d}", np.array([0, 0, hq * d], dtype=np.int64))
    consts.setdefault(f"fastertrt_bsd_{hkv * d}", np.array([0, 0, hkv * d], dtype=np.int64))
    consts.setdefault(f"fastertrt_bshd_{hq}_{d}", np.array([0, 0, hq, d], dtype=np.int64))
    nodes, flat = [], []

    def add(op, inputs, output, **kw):
        nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_node", **kw))
        return output

    for i, (name, heads) in enumerate(zip(node.input[:3], (hq, hkv, hkv))):
        t = add("Transpose", [name], f"{base}_in{i}_bshd", perm=[0, 2, 1, 3])
        flat.append(add("Reshape", [t, f"fastertrt_bsd_{heads * d}"], f"{base}_in{i}_bsd"))
    past = list(node.input[3:5]) if attrs.has_past else ["", ""]
    mask = node.input[len(attrs.input_names()) - 1]
    bias, total32, seqlens = f"{mask}_finite", f"{mask}_total_i32", f"{mask}_seqlens"
    if mask not in made:  # every layer shares the mask: compute these once
        made.add(mask)
        add("Max", [mask, "fastertrt_finite_floor"], bias)
        total = add("Shape", [mask], f"{mask}_total", start=-1)
        add("Cast", [add("Squeeze", [total], f"{mask}_total_scalar")], total32, to=TensorProto.INT32)
        rows = add("Shape", [mask], f"{mask}_rows", start=0, end=1)
        last = add("Cast", [add("Sub", [total, "fastertrt_one"], f"{mask}_last")], f"{mask}_last_i32",
                   to=TensorProto.INT32)
        add("Expand", [last, rows], seqlens)
    presents = list(node.output[1:3]) if attrs.has_past else [f"{base}_present_key", f"{base}_present_value"]
    nodes.append(helper.make_node(
        "GroupQueryAttention", flat + past + [seqlens, total32, "", "", "", bias],
        [f"{base}_bsd", *presents], name=f"{base}_gqa", domain="com.microsoft",
        num_heads=hq, kv_num_heads=hkv, scale=float(attrs.scale)))
    heads = add("Reshape", [f"{base}_bsd", f"fastertrt_bshd_{hq}_{d}"], f"{base}_bshd")
    nodes.append(helper.make_node("Transpose", [heads], [node.output[0]], name=f"{base}_out", perm=[0, 2, 1, 3]))
    return nodes
