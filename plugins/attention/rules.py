"""onnxscript rewrite rules that replace attention subgraphs with the plugin node.

Rules match structure and check values (scale constants, Softmax axis, shapes),
never node names or input positions. One core rule covers every exporter variant
seen so far through alternatives; the KV-cache and ONNX-Attention rules build on
the node it makes.

core (dynamo exports of BERT/RoBERTa/DistilBERT/GPT-2/Llama, eager and sdpa):

      query      key (or past||new)                         value
        |          |                                          |
        |   [Unsqueeze->Expand->Reshape]  grouped-query heads  [same]
        |          |                                          |
        |   Transpose(0,1,3,2) | Transpose(0,2,3,1) of [B,T,H,D] |
        |   | Reshape->Transpose(0,2,1)->Reshape (sdpa)          |
     [Mul c1]   [Mul c2]          scale split over Q and K^T   |
         \\       /                                             |
          MatMul                                               |
        [Mul c | Div c]                                        |
        [Add mask]                                             |
         Softmax(axis=-1)                                      |
        [Where(IsNaN(p), 0, p)]      sdpa's guard for empty rows|
              \\_____________________ MatMul __________________/
                                        |
                                   out [B,H,S,D]

kv-cache: Concat(past_key, key, axis=2) and Concat(past_value, value, axis=2)
feeding a plugin node -> one plugin node with past inputs and present outputs.

onnx-attention: the opset-23 ONNX Attention op with 4-D inputs.
"""

from __future__ import annotations

import numpy as np

from fastertrt.plugins.attention import spec
from fastertrt.plugins.rewriting import dims as _dims
from fastertrt.plugins.rewriting import fail as _fail
from fastertrt.plugins.rewriting import pattern as _pattern

_RULES = None


def _ir():
    import onnx_ir as ir

    return ir


def _scalar(value) -> float | None:
    """The number a value holds if it is a constant with one element."""
    if value is None:
        return None
    const = value.const_value
    if const is None:
        return None
    arr = np.asarray(const.numpy(), dtype=np.float64)
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _same(a, b) -> bool:
    """Two dims are known to be equal (same int or same symbol)."""
    return a is not None and a == b


def _perm(value) -> list[int] | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose":
        return None
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _layer(value) -> str:
    """A readable place for messages: the exporter's module scope when it kept one."""
    node = value.producer() if value is not None else None
    if node is None:
        return "?"
    scope = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scope:
        try:
            import ast

            names = [n for n in ast.literal_eval(scope) if n]
            if names:
                return names[-1]
        except (ValueError, SyntaxError):
            pass
    return node.name or node.op_type


def _grouped_heads(op, x, name: str):
    """x, or x with each head repeated for grouped-query attention
    (Unsqueeze -> Expand -> Reshape, transformers' repeat_kv): binds
    `{name}_grouped` and the tag `{name}_group`."""
    pattern = _pattern()
    ANY = pattern.ANY_VALUE
    return pattern.OrValue(
        [op.Reshape(op.Expand(op.Unsqueeze(x, ANY), ANY), ANY, _outputs=[f"{name}_grouped"]), x],
        tag_var=f"{name}_group", tag_values=[True, False])


def _make_core_rule():
    pattern = _pattern()
    ANY = pattern.ANY_VALUE

    class CoreAttention(pattern.RewriteRuleClassBase):
        """Softmax(Q K^T * scale + mask) V from a transformers export."""

        def __init__(self):
            super().__init__("attention-core", remove_nodes=False)

        def pattern(self, op, query, key, value, mask, q_scale, k_scale, s_scale, zero):
            key_heads, value_heads = _grouped_heads(op, key, "key"), _grouped_heads(op, value, "value")
            key_t = pattern.OrValue(
                [op.Transpose(key_heads, _outputs=["key_t"]),
                 op.Reshape(op.Transpose(op.Reshape(key_heads, ANY), _outputs=["key_t_flat"]), ANY,
                            _outputs=["key_t_unflat"])],
                tag_var="key_t_form", tag_values=["transpose", "flat"])
            q_in = pattern.OrValue([op.Mul(query, q_scale), query], tag_var="q_scaled", tag_values=[True, False])
            k_in = pattern.OrValue([op.Mul(key_t, k_scale), key_t], tag_var="k_scaled", tag_values=[True, False])
            scores = op.MatMul(q_in, k_in, _outputs=["scores"])
            scaled = pattern.OrValue([op.Mul(scores, s_scale), op.Div(scores, s_scale), scores],
                                     tag_var="score_scale", tag_values=["mul", "div", "none"])
            masked = pattern.OrValue([op.Add(scaled, mask), scaled], tag_var="masked", tag_values=[True, False])
            probs = op.Softmax(masked, _outputs=["probs"])
            guarded = pattern.OrValue([op.Where(op.IsNaN(probs), zero, probs), op.Cast(probs, _outputs=["probs_cast"]),
                                       probs], tag_var="nan_guard", tag_values=[True, "cast", False])
            return op.MatMul(guarded, value_heads, _outputs=["attn_out"])

        def check(self, context, **b):
            plan = plan_core(b)
            if isinstance(plan, str):
                return _fail(plan, b.get("attn_out"))
            return True

        def rewrite(self, op, **b):
            plan = plan_core(b)
            key = b["key"]
            if plan["key_from_bthd"]:
                key = op.Transpose(key, perm=[0, 2, 1, 3])
            inputs = [b["query"], key, b["value"]]
            if plan["attrs"].has_mask:
                inputs.append(b["mask"])
            return plugin_node(op, plan["attrs"], inputs, b["attn_out"])

    return CoreAttention.rule()


def plan_core(b: dict):
    """Check a core match; returns {'attrs', 'key_from_bthd'} or the reason it does not fit."""
    query, key, value, out = b["query"], b["key"], b["value"], b["attn_out"]
    probs = b["probs"]
    softmax = probs.producer()
    q_shape, out_shape = _dims(query), _dims(out)
    if _dtype_name(query) not in spec.IO_DTYPES:
        return f"query type {_dtype_name(query)} is not one the plugin runs ({', '.join(spec.IO_DTYPES)})"
    if q_shape is None or len(q_shape) != 4:
        return f"query shape {q_shape} is not a known rank-4 [B, H, S, D] shape"
    hq, d = q_shape[1], q_shape[3]
    if not isinstance(hq, int) or not isinstance(d, int):
        return f"query heads/head size must be static, got shape {q_shape}"
    axis = softmax.attributes.get("axis")
    axis = axis.as_int() if axis is not None else -1
    if axis not in (-1, 3):
        return f"Softmax normalizes axis {axis}, not the key axis (-1): this is not attention over keys"

    # where K^T comes from decides the key layout the plugin reads
    key_from_bthd = False
    key_dims = _dims(key)
    if key_dims is None or len(key_dims) != 4:
        return f"key shape {key_dims} is not a known rank-4 shape"
    if b.get("key_t_form") == "transpose":
        perm = _perm(b["key_t"])
        if perm == [0, 2, 3, 1] and not b.get("key_group"):
            key_from_bthd = True  # K is [B, T, H, D]: the plugin gets it transposed to [B, H, T, D]
            key_dims = [key_dims[0], key_dims[2], key_dims[1], key_dims[3]]
        elif perm != [0, 1, 3, 2]:
            return f"K^T is Transpose(perm={perm}), which does not swap the key and head-size axes"
    else:
        inner = _perm(b["key_t_flat"])
        if inner != [0, 2, 1]:
            return f"K^T reshaping transposes with perm={inner}, not (0, 2, 1)"
        kt_dims = _dims(b["key_t_unflat"])
        kh_dims = _dims(b["key_grouped"]) if b.get("key_group") else key_dims
        # shape inference may lose the head count through the Shape/Slice arithmetic,
        # but the head size and key length must land on the last two axes
        if kt_dims is None or kh_dims is None or len(kt_dims) != 4 or not (
                _same(kt_dims[2], kh_dims[3]) and _same(kt_dims[3], kh_dims[2])
                and kt_dims[1] in (None, kh_dims[1])):
            return f"K^T reshaping gives {kt_dims} from keys {kh_dims}: not [B, H, D, T]"
    hkv = key_dims[1]
    if not isinstance(hkv, int) or key_dims[3] != d:
        return f"keys {key_dims} do not have static heads and the query's head size {d}"
    value_dims = _dims(value)
    if value_dims is None or len(value_dims) != 4 or value_dims[1] != hkv or value_dims[3] != d:
        return f"values {value_dims} do not match keys [B, {hkv}, T, {d}]"
    if hq % hkv:
        return f"{hq} query heads cannot share {hkv} key/value heads"
    if hkv != hq:
        if not (b.get("key_group") and b.get("value_group")):
            return f"{hq} query heads but {hkv} key/value heads, without a head-repeat to match"
        for name in ("key_grouped", "value_grouped"):
            if not _grouped_ok(b[name], hkv, hq):
                return f"{name} is not a repeat of each key/value head {hq // hkv} times"
    elif b.get("key_group") or b.get("value_group"):
        for name in ("key_grouped", "value_grouped"):
            if b.get(name) is not None and not _grouped_ok(b[name], hkv, hq):
                return f"{name} changes the heads of keys/values"
    if out_shape is not None and len(out_shape) == 4 and out_shape[3] not in (d, None):
        return f"attention output {out_shape} has head size other than {d}"

    scale = 1.0
    for flag, name in (("q_scaled", "q_scale"), ("k_scaled", "k_scale")):
        if b.get(flag):
            c = _scalar(b[name])
            if c is None:
                return f"{name} is not a constant scalar: per-head or computed scales are not attention's"
            scale *= c
    if b.get("score_scale") in ("mul", "div"):
        c = _scalar(b["s_scale"])
        if c is None or c == 0:
            return "the score scale is not a non-zero constant scalar"
        scale = scale * c if b["score_scale"] == "mul" else scale / c
    if not (scale > 0 and np.isfinite(scale)):
        return f"the combined scale {scale} is not a positive number"
    if b.get("nan_guard") == "cast" and b["probs_cast"].dtype != probs.dtype:
        return f"the probabilities are cast from {probs.dtype} to {b['probs_cast'].dtype} before the MatMul"
    if b.get("nan_guard") is True and _scalar(b["zero"]) != 0.0:
        return "the Softmax NaN guard replaces NaN with a value other than 0"
    has_mask = int(bool(b.get("masked")))
    if has_mask and (problem := _mask_problem(_dims(b["mask"]), hq)):
        return problem
    attrs = spec.AttentionAttrs(num_heads=hq, kv_num_heads=hkv, head_size=d, scale=float(np.float32(scale)),
                                has_mask=has_mask)
    return {"attrs": attrs, "key_from_bthd": key_from_bthd}


def _mask_problem(mask_dims, hq: int) -> str | None:
    """Why the plugin cannot take this mask, or None. The kernel reads the mask
    along keys with unit stride, so a mask broadcast along keys does not fit."""
    if mask_dims is None or not 1 <= len(mask_dims) <= 4:
        return f"mask shape {mask_dims} is not broadcastable to [B, H, S, T]"
    if len(mask_dims) == 4 and isinstance(mask_dims[1], int) and mask_dims[1] not in (1, hq):
        return f"mask has {mask_dims[1]} heads; expected 1 or {hq}"
    if mask_dims[-1] == 1:
        return "the mask is broadcast along the keys (last dim 1), which the plugin's kernel does not read"
    return None


def _grouped_ok(grouped, hkv: int, hq: int) -> bool:
    """Reshape(Expand(Unsqueeze(x, 2), [.., G, ..]), [B, Hq, T, D]) repeats each head G times."""
    reshape = grouped.producer()
    expand = reshape.inputs[0].producer()
    unsqueeze = expand.inputs[0].producer()
    axes = _ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if axes is None:
        attr = unsqueeze.attributes.get("axes")
        axes = list(attr.as_ints()) if attr is not None else None
    if axes not in ([2], [-3]):
        return False
    dims = _dims(grouped)
    return dims is not None and len(dims) == 4 and dims[1] == hq


def _ints(value) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in np.asarray(value.const_value.numpy()).reshape(-1)]


def _dtype_name(value) -> str | None:
    return value.dtype.numpy().name if value is not None and value.dtype is not None else None


def plugin_node(op, attrs: spec.AttentionAttrs, inputs, like, n_outputs: int = 1):
    """Make the plugin node, its output types and shapes from spec.py (the replaced
    value's shape where that is better known)."""
    ir = _ir()
    outs = getattr(op, spec.NAME)(*inputs, _domain=spec.DOMAIN, _outputs=n_outputs,
                                  plugin_version=spec.VERSION, plugin_namespace=spec.NAMESPACE,
                                  **{k: v for k, v in attrs.to_dict().items()})
    outs_list = list(outs) if n_outputs > 1 else [outs]
    shapes = spec.output_shapes(attrs, [_dims(v) or [None] * 4 for v in inputs])
    io = _dtype_name(inputs[0])
    if io is not None:
        spec.output_dtypes(attrs, [_dtype_name(v) or io for v in inputs])
    for value, dims in zip(outs_list, shapes):
        value.dtype = inputs[0].dtype
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])
    if like is not None and like.shape is not None:
        outs_list[0].shape = like.shape  # same dims, and the exporter's names for them
    return outs


def _make_kv_cache_rule():
    pattern = _pattern()

    class KvCacheAttention(pattern.RewriteRuleClassBase):
        """Fold the KV-cache Concats into the plugin node: past in, present out."""

        def __init__(self):
            super().__init__("attention-kv-cache", remove_nodes=True)

        def pattern(self, op, query, key, value, past_key, past_value):
            present_key = op.Concat(past_key, key, _outputs=["present_key"])
            present_value = op.Concat(past_value, value, _outputs=["present_value"])
            out = getattr(op, spec.NAME)(query, present_key, present_value, _domain=spec.DOMAIN,
                                         _allow_other_inputs=True, _outputs=["attn_out"])
            return out, present_key, present_value

        def check(self, context, attn_out, present_key, present_value, **_):
            attrs = node_attrs(attn_out.producer())
            if attrs.has_past or attrs.qkv_packed:
                return _fail("the attention node already has past inputs or a packed input", attn_out)
            for present in (present_key, present_value):
                concat = present.producer()
                dims = _dims(present)
                rank = len(dims) if dims is not None else None
                axis = concat.attributes.get("axis")
                axis = axis.as_int() if axis is not None else None
                if rank != 4 or axis not in (2, -2):
                    return _fail(f"{present.name} concatenates axis {axis} of a rank-{rank} tensor, "
                                 "not the sequence axis of [B, H, T, D]", present)
            return True

        def rewrite(self, op, query, key, value, past_key, past_value, attn_out, present_key,
                    present_value, **_):
            node = attn_out.producer()
            attrs = node_attrs(node)
            attrs = spec.AttentionAttrs(**{**attrs.to_dict(), "has_past": 1})
            inputs = [query, key, value, past_key, past_value] + list(node.inputs[3:])
            out, pk, pv = plugin_node(op, attrs, inputs, attn_out, n_outputs=3)
            for new, old in ((pk, present_key), (pv, present_value)):
                if old.shape is not None:
                    new.shape = old.shape  # keeps the graph outputs' dim names
            return out, pk, pv

    return KvCacheAttention.rule()


def node_attrs(node) -> spec.AttentionAttrs:
    """The plugin attributes of an ir.Node."""
    return spec.AttentionAttrs.from_dict({k: a.value for k, a in node.attributes.items()})


def rule_set():
    """(name, RewriteRuleSet) in the order they apply."""
    global _RULES
    if _RULES is None:
        pattern = _pattern()
        _RULES = [("core", pattern.RewriteRuleSet([_make_core_rule()])),
                  ("onnx-attention", pattern.RewriteRuleSet([_make_onnx_attention_rule()])),
                  ("kv-cache", pattern.RewriteRuleSet([_make_kv_cache_rule()]))]
    return _RULES


DOMAIN = spec.DOMAIN
BLOCK_RULES = ("core", "onnx-attention")


def find_blocks(graph) -> list:
    """Attention blocks not yet fused: Softmax nodes whose output reaches a MatMul
    (directly or through the NaN guard), and ONNX Attention nodes. A softmax
    that feeds a TopK or a graph output (a classifier head) is not attention."""
    blocks = []
    for node in graph:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            blocks.append(node)
        elif node.op_type == "Softmax" and node.domain in ("", "ai.onnx") and _feeds_matmul(node):
            blocks.append(node)
    return blocks


def _feeds_matmul(node, hops: int = 3) -> bool:
    frontier = [node]
    for _ in range(hops):
        nxt = [u for n in frontier for out in n.outputs for u, _ in out.uses()]
        if any(u.op_type == "MatMul" for u in nxt):
            return True
        frontier = nxt
    return False


def explain(model, block) -> dict:
    """Why no rule fused this block: each rule's reason at the nodes where its
    pattern would end."""
    reasons = {}
    candidates = _downstream(block, 3) if block.op_type == "Softmax" else [block]
    for name, rules in rule_set():
        if name not in BLOCK_RULES:
            continue  # rules that refine plugin nodes have nothing to say about raw blocks
        for rule in rules:
            why = None
            for node in candidates:
                tracer = _tracer()
                if rule.match(model, model.graph, node, tracer=tracer, check_nodes_are_removable=False):
                    why = "matches, but the rewrite was not applied (the block overlaps another match)"
                    break
                why = why or _traced_reason(tracer, rule)
            if name == "core" and block.op_type == "Softmax" and (why is None or why.startswith("Mismatch")):
                why = _structure_hint(block, why)
            reasons[name] = why or "no candidate node"
    return {"layer": _layer(block.outputs[0]), "node": block.name, "reasons": reasons}


def _structure_hint(softmax, matcher_reason: str | None) -> str:
    """The pattern matcher only says an alternative failed; say where the
    block's shape departs from Softmax(Q K^T * scale + mask) V."""
    after = sorted({u.op_type for o in softmax.outputs for u, _ in o.uses()})
    producer = softmax.inputs[0].producer()
    before = producer.op_type if producer is not None else "a graph input"
    if not {"MatMul", "IsNaN", "Where"} & set(after):
        hint = (f"the Softmax output feeds {'/'.join(after)} before the MatMul with the values: an op between "
                "them (e.g. a mask added after the softmax) is not attention")
    elif before not in ("Add", "Mul", "Div", "MatMul"):
        hint = f"the Softmax input comes from {before}, not from scaled (and masked) scores Q K^T"
    else:
        hint = "the scores or values do not come from query/key/value projections in a known layout"
    return f"{hint} (matcher: {matcher_reason})" if matcher_reason else hint


def _downstream(node, hops):
    out, frontier = [], [node]
    for _ in range(hops):
        frontier = [u for n in frontier for o in n.outputs for u, _ in o.uses()]
        out.extend(frontier)
    return [n for n in out if n.op_type in ("MatMul", spec.NAME)]


def _tracer():
    from onnxscript.rewriter import _basics

    return _basics.MatchingTracer()


def _traced_reason(tracer, rule) -> str | None:
    """The matcher's or the check's reason for rejecting a node (Pattern.match
    returns None when the check fails, so the tracer is where it is kept)."""
    for info in tracer.best_matches_map.get(rule) or []:
        if info.match_result.reason:
            return info.match_result.reason
    return None


def attach_functions(model) -> int:
    """Give every plugin node its reference ONNX function (one per attribute set)."""
    from fastertrt.plugins.attention.reference import onnx_function
    from fastertrt.plugins.functions import attach_functions as attach

    return attach(model, spec.DOMAIN, spec.NAME, node_attrs, onnx_function)


def _make_onnx_attention_rule():
    pattern = _pattern()

    class OnnxAttention(pattern.RewriteRuleClassBase):
        """The opset-23 ONNX Attention op with 4-D inputs (dynamo exports of sdpa)."""

        def __init__(self):
            super().__init__("onnx-attention", remove_nodes=False)

        def pattern(self, op, query, key, value, mask):
            key_heads, value_heads = _grouped_heads(op, key, "key"), _grouped_heads(op, value, "value")
            return op.Attention(query, key_heads, value_heads, pattern.Var("mask", can_match_none=True),
                                _allow_other_inputs=True, _outputs=["attn_out"])

        def check(self, context, **b):
            plan = plan_onnx_attention(b)
            return _fail(plan, b.get("attn_out")) if isinstance(plan, str) else True

        def rewrite(self, op, **b):
            attrs = plan_onnx_attention(b)
            inputs = [b["query"], b["key"], b["value"]]
            if attrs.has_mask:
                mask = b["mask"]
                if mask.dtype == _ir().DataType.BOOL:  # True = attend -> additive 0 / -inf
                    mask = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=-np.inf))
                inputs.append(mask)
            return plugin_node(op, attrs, inputs, b["attn_out"])

    return OnnxAttention.rule()


def plan_onnx_attention(b: dict):
    """AttentionAttrs for a matched ONNX Attention node, or why it does not fit."""
    out = b["attn_out"]
    node = out.producer()
    inputs = list(node.inputs)
    if len(inputs) > 4 and any(v is not None for v in inputs[4:]):
        return "ONNX Attention with past_key/past_value inputs is not handled yet (exporters put the cache in Concats)"
    if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
        return "ONNX Attention's present or qk outputs are used"

    def attr(name, default):
        a = node.attributes.get(name)
        return a.value if a is not None else default

    if attr("qk_matmul_output_mode", 0) != 0 or attr("softcap", 0.0) != 0.0:
        return "ONNX Attention with softcap or a qk_matmul_output_mode is not plain attention"
    if attr("softmax_precision", None) not in (None, 1):  # 1 = FLOAT
        return "ONNX Attention asks for a softmax precision other than FP32"
    if _dtype_name(b["query"]) not in spec.IO_DTYPES:
        return f"query type {_dtype_name(b['query'])} is not one the plugin runs ({', '.join(spec.IO_DTYPES)})"
    q_dims, k_dims, v_dims = _dims(b["query"]), _dims(b["key"]), _dims(b["value"])
    if any(x is None or len(x) != 4 for x in (q_dims, k_dims, v_dims)):
        return f"ONNX Attention inputs {q_dims}, {k_dims}, {v_dims} are not all rank 4 (3-D inputs are not handled)"
    hq, d, hkv = q_dims[1], q_dims[3], k_dims[1]
    if not all(isinstance(x, int) for x in (hq, d, hkv)) or k_dims[3] != d or v_dims[3] != d or v_dims[1] != hkv:
        return f"ONNX Attention shapes {q_dims}, {k_dims}, {v_dims} lack static heads or one head size"
    if hq % hkv:
        return f"{hq} query heads cannot share {hkv} key/value heads"
    for name in ("key_grouped", "value_grouped"):
        if b.get(name) is not None and not _grouped_ok(b[name], hkv, hq):
            return f"{name} is not a repeat of each key/value head {hq // hkv} times"
    has_mask = int(b.get("mask") is not None)
    if has_mask and (problem := _mask_problem(_dims(b["mask"]), hq)):
        return problem
    scale = attr("scale", None)
    scale = float(scale) if scale is not None else spec.default_scale(d)
    return spec.AttentionAttrs(num_heads=hq, kv_num_heads=hkv, head_size=d, scale=scale,
                               causal=int(attr("is_causal", 0)), has_mask=has_mask)


def prepare(model) -> int:
    """Drop Casts to the type their input already has: TorchScript exports put
    such Casts (softmax in FP32, `.to(query.dtype)`) between Softmax and the
    MatMul with the values. Returns how many were dropped."""
    import onnx_ir as ir

    dropped = 0
    for node in list(model.graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        src, out = node.inputs[0], node.outputs[0]
        to = node.attributes.get("to")
        if src is None or to is None or src.dtype is None or src.dtype != to.as_int() or out.is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(out, src)
        model.graph.remove(node, safe=True)
        dropped += 1
    return dropped
