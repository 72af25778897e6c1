"""The onnxscript rewrite rule that replaces the beam-search tail of a decode
step with the plugin node.

Matched structure (transformers-style beam search as the dynamo and TorchScript
exporters write it; Add operands in either order):

      logits [N, V]
         |
      LogSoftmax(axis=-1)
         |
      [Add bias [V]]                      logits processors' bias (optional)
         |            beam_scores [B, K]
         |                 |
         |            Reshape([-1, 1])
          \\               /
               Add                        running score of each beam
                |
          Reshape([B, K*V] or [B, -1])
                |
          TopK(k = c*K, axis=-1, largest, sorted)
            |          |
         scores      flat
                    /     \\
             Mod(V)        Div(V)   |   Cast(float) -> Div(V.) -> Floor -> Cast(int64)   (dynamo)
               |             |      |   Where(sign correction, Div(V) - 1, Div(V))       (TorchScript)
            tokens         beams

V may be a constant or read from the logits' shape (TorchScript).

The plugin outputs INT32 ids; Casts to INT64 keep the graph's output types.
k and the flattening shape are checked by evaluating the exporter's shape
arithmetic for several beam counts, so any spelling of `c * K` matches and
nothing else does.
"""

from __future__ import annotations

import numpy as np

from fastertrt.plugins.beam_search import spec
from fastertrt.plugins.rewriting import dims as _dims
from fastertrt.plugins.rewriting import fail as _fail
from fastertrt.plugins.rewriting import pattern as _pattern

DOMAIN = spec.DOMAIN
_RULES = None


def _attr(node, name, default):
    a = node.attributes.get(name)
    return a.value if a is not None else default


class _NotEvaluable(Exception):
    pass


_EVAL_OPS = {
    "Mul": lambda a, b: a * b, "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b,
    "Div": lambda a, b: a // b if np.issubdtype(a.dtype, np.integer) else a / b,
}


def evaluate(value, shapes: list, depth: int = 0) -> np.ndarray:
    """The value of a small shape computation whose leaves are constants and
    Shape(v) for the (value, shape) pairs in `shapes`; _NotEvaluable otherwise."""
    if value is None or depth > 16:
        raise _NotEvaluable("too deep")
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None:
        raise _NotEvaluable(f"{value.name} is a graph input")
    op = node.op_type

    def arg(i):
        return evaluate(node.inputs[i], shapes, depth + 1)

    if op == "Shape":
        known = [shape for v, shape in shapes if v is node.inputs[0]]
        if not known:
            raise _NotEvaluable(f"Shape of {node.inputs[0].name}")
        full = np.asarray(known[0], dtype=np.int64)
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return full[start:end]
    if op == "Constant":
        return np.asarray(node.attributes["value"].value.numpy())
    if op in ("Identity", "Cast"):
        x = arg(0)
        return x.astype(np.int64) if op == "Cast" and np.issubdtype(x.dtype, np.integer) else x
    if op in _EVAL_OPS:
        return _EVAL_OPS[op](arg(0), arg(1))
    if op == "Squeeze":
        x = arg(0)
        axes = tuple(int(a) for a in arg(1).reshape(-1)) if len(node.inputs) > 1 and node.inputs[1] else None
        return np.squeeze(x, axis=axes)
    if op == "Unsqueeze":
        x = arg(0)
        for a in sorted(int(a) for a in arg(1).reshape(-1)):
            x = np.expand_dims(x, a)
        return x
    if op == "Reshape":
        x, shape = arg(0), [int(d) for d in arg(1).reshape(-1)]
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
    if op == "Gather":
        return np.take(arg(0), arg(1), axis=_attr(node, "axis", 0))
    if op == "Slice":
        x, starts, ends = arg(0), arg(1), arg(2)
        return x[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0])]
    if op == "Concat":
        return np.concatenate([evaluate(v, shapes, depth + 1).reshape(-1) for v in node.inputs])
    raise _NotEvaluable(f"{op} in a shape computation")


def _example_shapes(beam_scores, logits, vocab: int, beams: int) -> list:
    """Shapes for 3 prompts x `beams` beams: what k and the flattening may read."""
    return [(beam_scores, [3, beams]), (logits, [3 * beams, vocab])]


def _candidates(k_value, beam_scores, logits, vocab: int) -> int | str:
    """c when k == c * beam_scores.shape[1] for every beam count; else why not."""
    try:
        ks = [int(np.asarray(evaluate(k_value, _example_shapes(beam_scores, logits, vocab, beams))).reshape(-1)[0])
              for beams in (1, 2, 5)]
    except _NotEvaluable as exc:
        return f"TopK's k is not computed from the beam count ({exc})"
    c = ks[0]
    if ks != [c, 2 * c, 5 * c] or c < 1:
        return f"TopK's k is {ks} for 1, 2, 5 beams: not a fixed number of candidates per beam"
    return c


def _flattens_beams(shape_value, beam_scores, logits, vocab: int) -> str | None:
    """None when the Reshape makes [B, K*V] of [B*K, V] for any B, K."""
    try:
        for beams in (1, 2, 5):
            shapes = _example_shapes(beam_scores, logits, vocab, beams)
            got = [int(x) for x in np.asarray(evaluate(shape_value, shapes)).reshape(-1)]
            if got not in ([3, beams * vocab], [3, -1], [-1, beams * vocab]):
                return f"the scores are reshaped to {got}, not [B, K*V] = [3, {beams * vocab}]"
    except _NotEvaluable as exc:
        return f"the flattening shape is not computed from the beam scores' shape ({exc})"
    return None


def _const(value) -> np.ndarray | None:
    return None if value is None or value.const_value is None else np.asarray(value.const_value.numpy())


def _make_rule(div_form: str):
    """div_form "int": Div(flat, V); "float": Cast(Floor(Div(Cast(flat), V))) (what
    the dynamo exporter writes for `//` on int64); "corrected": Div with
    TorchScript's sign correction, Where(Xor(flat < 0, V < 0) & (flat % V != 0),
    Div - 1, Div), which is Div for the non-negative indices of a top-k."""
    pattern = _pattern()

    class BeamStep(pattern.RewriteRuleClassBase):
        """log_softmax + bias + beam scores -> top-k over beams x vocabulary."""

        def __init__(self):
            super().__init__(f"beam-step-{div_form}-div", remove_nodes=True)

        def pattern(self, op, logits, bias, beam_scores, col_shape, flat_shape, k, vocab_mod, vocab_div):
            log_probs = op.LogSoftmax(logits, _outputs=["log_probs"])
            biased = pattern.OrValue([op.Add(log_probs, bias), log_probs], tag_var="biased", tag_values=[1, 0])
            acc = op.Add(biased, op.Reshape(beam_scores, col_shape), _outputs=["acc"])
            scores, flat = op.TopK(op.Reshape(acc, flat_shape), k, _outputs=["scores", "flat"])
            tokens = op.Mod(flat, vocab_mod, _outputs=["tokens"])
            if div_form == "int":
                beams = op.Div(flat, vocab_div, _outputs=["beams"])
            elif div_form == "float":
                beams = op.Cast(op.Floor(op.Div(op.Cast(flat), vocab_div)), _outputs=["beams"])
            else:  # TorchScript's floor division of integers: truncation corrected for negative operands
                zero, one = (pattern.Var(f"zero_{i}") for i in range(3)), pattern.Var("one")
                quotient = op.Div(flat, vocab_div)
                signs_differ = op.Xor(op.Less(flat, next(zero)), op.Less(vocab_div, next(zero)))
                inexact = op.Not(op.Equal(op.Mod(flat, vocab_div), next(zero)))
                beams = op.Where(op.And(signs_differ, inexact), op.Sub(quotient, one), quotient, _outputs=["beams"])
            return scores, tokens, beams

        def check(self, context, **b):
            plan = plan_beam_step(b, div_form)
            return _fail(plan, b.get("scores")) if isinstance(plan, str) else True

        def rewrite(self, op, **b):
            attrs = plan_beam_step(b, div_form)
            inputs = [b["logits"], b["beam_scores"]] + ([b["bias"]] if attrs.has_bias else [])
            scores, tokens, beams = plugin_node(op, attrs, inputs)
            return scores, op.Cast(tokens, to=7), op.Cast(beams, to=7)  # 7 = INT64

    return BeamStep.rule()


def plan_beam_step(b: dict, div_form: str = "int"):
    """BeamStepAttrs for a match, or the reason it is not the beam step."""
    logits, beam_scores = b["logits"], b["beam_scores"]
    ldims, bdims = _dims(logits), _dims(beam_scores)
    if ldims is None or len(ldims) != 2:
        return f"LogSoftmax input has dims {ldims}; the beam step takes last-position logits [N, V]"
    vocab = ldims[1]
    if not isinstance(vocab, int):
        return "the vocabulary size (last dim of the logits) is not static"
    axis = _attr(b["log_probs"].producer(), "axis", -1)
    if axis not in (-1, 1):
        return f"LogSoftmax over axis {axis}, not the vocabulary"
    if bdims is None or len(bdims) != 2 or beam_scores.dtype is None or beam_scores.dtype.numpy() != np.float32:
        return f"the added scores {beam_scores.name} are not FP32 [B, K] (dims {bdims})"
    col = _const(b["col_shape"])
    if col is None or col.reshape(-1).tolist() not in ([-1, 1],):
        return "the beam scores are not reshaped to a column [-1, 1]"
    has_bias = int(b.get("biased", 0) and b.get("bias") is not None)
    if has_bias:
        bias = b["bias"]
        bias_dims = _dims(bias)
        if bias_dims is None or len(bias_dims) != 1 or bias_dims[0] not in (vocab, None):
            return f"the bias added to the log-probabilities has dims {bias_dims}, not [{vocab}]"
        if bias.dtype is None or bias.dtype.numpy() != np.float32:
            return "the bias added to the log-probabilities is not FP32"
    if problem := _flattens_beams(b["flat_shape"], beam_scores, logits, vocab):
        return problem
    topk = b["scores"].producer()
    if _attr(topk, "axis", -1) not in (-1, 1) or _attr(topk, "largest", 1) != 1 or _attr(topk, "sorted", 1) != 1:
        return "TopK is not the sorted largest-k over the last axis"
    c = _candidates(b["k"], beam_scores, logits, vocab)
    if isinstance(c, str):
        return c
    for name in ("vocab_mod", "vocab_div"):
        v = _const(b[name])
        if v is None:  # computed from the logits' shape (TorchScript exports)
            try:
                v = np.asarray(evaluate(b[name], _example_shapes(beam_scores, logits, vocab, 2)))
            except _NotEvaluable:
                v = None
        if v is None or v.size != 1 or float(v.reshape(-1)[0]) != vocab:
            return f"the flat index is split by {None if v is None else v.reshape(-1).tolist()}, not the vocabulary {vocab}"
    if div_form == "corrected":
        for name, want in (("zero_0", 0), ("zero_1", 0), ("zero_2", 0), ("one", 1)):
            v = _const(b.get(name))
            if v is None or v.size != 1 or int(v.reshape(-1)[0]) != want:
                return "the floor division's sign correction compares with other constants than 0 and 1"
    if _attr(b["tokens"].producer(), "fmod", 0) != 0:
        return "the token is Mod with fmod=1"
    if b["beams"].dtype is None or b["beams"].dtype.numpy() != np.int64:
        return f"the parent beam index is {b['beams'].dtype}, not INT64"
    try:
        attrs = spec.BeamStepAttrs(candidates=c, has_bias=has_bias)
        spec.output_shapes(attrs, [ldims, bdims] + ([[vocab]] if has_bias else []))
    except spec.BeamStepSpecError as exc:
        return str(exc)
    return attrs


def plugin_node(op, attrs: spec.BeamStepAttrs, inputs):
    import onnx_ir as ir

    outs = getattr(op, spec.NAME)(*inputs, _domain=spec.DOMAIN, _outputs=3, plugin_version=spec.VERSION,
                                  plugin_namespace=spec.NAMESPACE, **attrs.to_dict())
    shapes = spec.output_shapes(attrs, [_dims(v) or [None] * (1 if i == 2 else 2) for i, v in enumerate(inputs)])
    for value, dims, dtype in zip(outs, shapes, (ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT32)):
        value.dtype = dtype
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])
    return outs


def node_attrs(node) -> spec.BeamStepAttrs:
    return spec.BeamStepAttrs.from_dict({k: a.value for k, a in node.attributes.items()})


def rule_set():
    global _RULES
    if _RULES is None:
        pattern = _pattern()
        # Commuting every Add/Xor/And/Equal of the TorchScript form multiplies its
        # patterns by 32 and the matching time with them; TorchScript writes one order.
        _RULES = [("beam-step", pattern.RewriteRuleSet([_make_rule("int"), _make_rule("float")], commute=True)),
                  ("beam-step-torchscript", pattern.RewriteRuleSet([_make_rule("corrected")]))]
    return _RULES


def prepare(model) -> int:
    return 0


def find_blocks(graph) -> list:
    """Beam tails not yet fused: TopK nodes whose input comes from a LogSoftmax
    within a few hops (a top-k over log-probabilities)."""
    blocks = []
    for node in graph:
        if node.op_type != "TopK" or node.domain not in ("", "ai.onnx"):
            continue
        frontier, seen = [node.inputs[0]], 0
        while frontier and seen < 6:
            producers = [v.producer() for v in frontier if v is not None and v.producer() is not None]
            if any(p.op_type == "LogSoftmax" for p in producers):
                blocks.append(node)
                break
            frontier = [v for p in producers for v in p.inputs]
            seen += 1
    return blocks


def explain(model, block) -> dict:
    from onnxscript.rewriter import _basics

    reasons = {}
    for name, rules in rule_set():
        why = None
        for rule in rules.rules:
            tracer = _basics.MatchingTracer()
            nodes = [block] + [u for out in block.outputs for u, _ in out.uses()]
            for node in nodes:
                if rule.match(model, model.graph, node, tracer=tracer, check_nodes_are_removable=False):
                    why = "matches, but the rewrite was not applied (an intermediate value has other uses)"
                    break
            if why:
                break
            for info in tracer.best_matches_map.get(rule) or []:
                if info.match_result.reason:
                    why = info.match_result.reason
        reasons[name] = why or "no candidate node"
    return {"layer": "beam search", "node": block.name, "reasons": reasons}


def attach_functions(model) -> int:
    from fastertrt.plugins.beam_search.reference import onnx_function
    from fastertrt.plugins.functions import attach_functions as attach

    return attach(model, spec.DOMAIN, spec.NAME, node_attrs, onnx_function)
