"""The attention plugin node as ONNX Runtime's own fused operator, for graphs
that only ONNX Runtime runs (the ORT variant of a bundle graph):

  query/key/value [B, H, S, D] -> Transpose + Reshape -> [B, S, H*D] -> com.microsoft.MultiHeadAttention
  -> [B, S, H*D] -> Reshape + Transpose -> out [B, H, S, D]

ONNX Runtime cancels the Transpose pairs this leaves next to the exporter's
own. MultiHeadAttention matches the plugin's contract for multi-head attention
without a KV cache or causal mask: additive mask as attention_bias, rows
whose every key is -inf give zeros. Other nodes keep their ONNX function.
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


def lower(node, consts: dict) -> list | None:
    """Replacement nodes for one plugin node, or None when ORT has no equal op.
    consts: a dict the caller turns into initializers (shared between nodes)."""
    from onnx import helper

    attrs = node_attrs(node)
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
