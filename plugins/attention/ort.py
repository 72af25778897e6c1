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


def lower(node, consts: dict, causal_lm: bool = False, made: set | None = None, graph=None) -> list | None:
    """Replacement nodes for one plugin node, or None when ORT has no equal op.
    consts: a dict the caller turns into initializers (shared between nodes).
    causal_lm: the node is in a causal decoder graph (its mask is causal).
    made: names of values already computed for an earlier node of this graph.
    graph: a compiler.lower_ort.GraphView around the node (finds the rotary
    embedding that feeds query and key)."""
    from onnx import helper

    attrs = node_attrs(node)
    if causal_lm and attrs.has_mask and not attrs.qkv_packed:
        return _group_query_attention(node, attrs, consts, made if made is not None else set(), graph)
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


def _group_query_attention(node, attrs: AttentionAttrs, consts: dict, made: set, graph=None) -> list:
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
        rope = rotary_embedding(graph, name, d, consts) if graph is not None and i < 2 else None
        if rope is not None:  # one RotaryEmbedding instead of the exporter's rotate-half chain
            x, pos, cos, sin = rope
            x_bsd = _bsd_source(graph, x, heads, d)
            if x_bsd is not None:  # rotate the projection's own [B, S, H*D] output: no layout change at all
                flat.append(add("RotaryEmbedding", [x_bsd, pos, cos, sin], f"{base}_in{i}_rope_bsd",
                                domain="com.microsoft", interleaved=0, num_heads=heads))
                continue
            name = add("RotaryEmbedding", [x, pos, cos, sin], f"{base}_in{i}_rope", domain="com.microsoft",
                       interleaved=0)
        elif graph is not None and (x_bsd := _bsd_source(graph, name, heads, d)) is not None:
            flat.append(x_bsd)
            continue
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


def rotary_embedding(graph, name: str, head_size: int, consts: dict):
    """(x, position_ids, cos table, sin table) when `name` is transformers' rotary
    embedding of x [B, H, S, D] (rotate-half form) at the graph's position ids,
    used only by the attention node:

        Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2)), sin))
        cos/sin = Unsqueeze([Mul(scale)](Cos/Sin(Concat(f, f)))),  f = Mul(Cast(Unsqueeze(position_ids)), inv_freq)

    The tables hold what the graph computes for every position, made by ONNX
    Runtime from the same float32 ops, so the lowered graph's values equal the
    exported ones. None when anything differs."""
    if graph.max_positions < 1 or len(graph.uses(name)) != 1:
        return None
    add = graph.made_by(name, "Add")
    muls = [graph.made_by(i, "Mul") for i in add.input] if add is not None else [None]
    if None in muls:
        return None
    for plain, rotated in (muls, muls[::-1]):
        for x, cos in (plain.input, plain.input[::-1]):
            half = _rotate_half_of(graph, rotated, x, head_size)
            if half is None:
                continue
            found = [_angle_table(graph, v, fn) for v, fn in ((cos, "Cos"), (half, "Sin"))]
            if None in found or found[0][:2] != found[1][:2] or not np.array_equal(found[0][2], found[1][2]):
                continue
            (pos, freqs, inv_freq, scale_c), (_, _, _, scale_s) = found
            if scale_c != scale_s:
                continue
            key = f"fastertrt_rope_{abs(hash((inv_freq.tobytes(), scale_c, graph.max_positions)))}"
            if f"{key}_cos" not in consts:
                consts[f"{key}_cos"], consts[f"{key}_sin"] = _rope_tables(inv_freq, scale_c, graph.max_positions)
            return x, pos, f"{key}_cos", f"{key}_sin"
    return None


def _rotate_half_of(graph, mul, x: str, d: int):
    """The other operand of mul = Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2)), other)."""
    for cat_name, other in (mul.input, mul.input[::-1]):
        cat = graph.made_by(cat_name, "Concat")
        if cat is None or len(cat.input) != 2 or _axis(cat) not in (-1, 3):
            continue
        neg = graph.made_by(cat.input[0], "Neg")
        upper = graph.made_by(neg.input[0], "Slice") if neg is not None else None
        lower = graph.made_by(cat.input[1], "Slice")
        if upper is None or lower is None or upper.input[0] != x or lower.input[0] != x:
            continue
        if _slice(graph, upper) == (d // 2, None) and _slice(graph, lower) == (0, d // 2):
            return other
    return None


def _axis(node) -> int | None:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)


def _slice(graph, node):
    """(start, end) of a Slice over the last axis with step 1; end None when open."""
    vals = [graph.const(i) if i else None for i in list(node.input[1:]) + [""] * (4 - len(node.input[1:]))]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or starts.size != 1 or (axes is not None and int(axes.reshape(-1)[0]) not in (-1, 3)):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    end = int(ends.reshape(-1)[0])
    return int(starts.reshape(-1)[0]), (None if end >= 1 << 30 else end)


def _angle_table(graph, name: str, fn: str):
    """(position input, freqs value, inv_freq, scale) for name = Unsqueeze([Mul(scale)](fn(Concat(f, f))))."""
    node = graph.made_by(name, "Unsqueeze")
    node = graph.producer.get(node.input[0]) if node is not None else None
    scale = 1.0
    if node is not None and node.op_type == "Mul":
        consts_ = [graph.const(i) for i in node.input]
        k = next((j for j, c in enumerate(consts_) if c is not None and c.size == 1), None)
        if k is None:
            return None
        scale = float(consts_[k].reshape(-1)[0])
        node = graph.producer.get(node.input[1 - k])
    if node is None or node.op_type != fn:
        return None
    cat = graph.made_by(node.input[0], "Concat")
    if cat is None or len(cat.input) != 2 or cat.input[0] != cat.input[1]:
        return None
    freqs = graph.made_by(cat.input[0], "Mul")
    if freqs is None:
        return None
    for pos_name, inv_name in (freqs.input, freqs.input[::-1]):
        inv_freq = graph.const(inv_name)
        cast = graph.made_by(pos_name, "Cast")
        unsq = graph.made_by(cast.input[0], "Unsqueeze") if cast is not None else None
        if inv_freq is None or inv_freq.ndim != 1 or unsq is None or unsq.input[0] not in graph.inputs:
            continue
        return unsq.input[0], cat.input[0], inv_freq.astype(np.float32), scale
    return None


def _rope_tables(inv_freq: np.ndarray, scale: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, D/2] computed by ONNX Runtime with the graph's own float32
    ops (Mul, Cos/Sin, Mul by scale), so each entry equals what the graph makes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Mul", ["pos", "inv"], ["f"]), helper.make_node("Cos", ["f"], ["c"]),
             helper.make_node("Sin", ["f"], ["s"]), helper.make_node("Mul", ["c", "k"], ["cos"]),
             helper.make_node("Mul", ["s", "k"], ["sin"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
              for n, shape in (("pos", [positions, 1]), ("inv", [len(inv_freq)]), ("k", []))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("cos", "sin")]
    model = helper.make_model(helper.make_graph(nodes, "rope", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pos = np.arange(positions, dtype=np.float32)[:, None]
    cos, sin = sess.run(None, {"pos": pos, "inv": inv_freq, "k": np.array(scale, dtype=np.float32)})
    return cos, sin


def _bsd_source(graph, name: str, heads: int, d: int) -> str | None:
    """X when name = Transpose(Reshape(X [B, S, heads*d]) to [B, S, heads, d], perm 0213):
    the projection output GroupQueryAttention and RotaryEmbedding take as they are."""
    from onnx import helper

    tr = graph.made_by(name, "Transpose")
    perm = next((helper.get_attribute_value(a) for a in tr.attribute if a.name == "perm"), None) if tr else None
    rs = graph.made_by(tr.input[0], "Reshape") if tr is not None and list(perm or []) == [0, 2, 1, 3] else None
    if rs is None:
        return None
    src, heads_view = graph.shapes.get(rs.input[0]), graph.shapes.get(rs.output[0])
    if src is None or heads_view is None or len(src) != 3 or src[2] != heads * d or heads_view[2:] != [heads, d]:
        return None
    return rs.input[0]
