"""Exporter paths beyond fastertrt's own (dynamo, opset 20): the opset-23 ONNX
Attention op and the TorchScript exporter. Each graph must fuse every block and
the fused graph must compute what the exported one does."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from fastertrt.tolerances import tolerance

EXPORTERS = {  # name -> (dynamo, opset, the rule expected to fuse it)
    "dynamo-opset23": (True, 23, "onnx-attention"),
    "torchscript": (False, 17, "core"),
}


def _peaky(model):
    """Scale query/key projections so attention is far from uniform: with the
    tiny models' small random weights every softmax is nearly flat, and a wrong
    mask or scale would go unnoticed."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "query", "key", "c_attn")) and p.dim() >= 1:
                p.mul_(6.0)
    return model


def _export(graph, args, path, names, out_names, dynamo, opset, dynamic, ts_axes):
    import torch

    with torch.no_grad():
        if dynamo:
            torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                              output_names=out_names, optimize=True, opset_version=opset).save(str(path))
        else:
            torch.onnx.export(graph, args, str(path), dynamo=False, input_names=names, output_names=out_names,
                              dynamic_axes=ts_axes, opset_version=opset)


def _compare(src, dst, feeds, valid, seq_axis_by_name):
    from fastertrt.compiler.export.parity import masked_max_abs
    from fastertrt.compiler.rewrite.parity import ort_session

    ref, got = ort_session(src), ort_session(dst)
    names = [o.name for o in ref.get_outputs()]
    feeds = {i.name: feeds[i.name] for i in ref.get_inputs()}
    worst = 0.0
    for name, r, g in zip(names, ref.run(None, feeds), got.run(None, feeds)):
        axis = seq_axis_by_name(name)
        v = valid[:, -g.shape[axis]:] if axis is not None else None
        diff, _ = masked_max_abs(g, r, v, seq_axis=axis or 1)
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_exports_fuse(tmp_path, exporter, impl):
    import torch

    from fastertrt.compiler.export.encoder import example_inputs
    from fastertrt.compiler.export.wrappers import EncoderGraph
    from fastertrt.compiler.rewrite import rewrite_file

    dynamo, opset, rule = EXPORTERS[exporter]
    model = _peaky(tiny_model("bert"))
    model.config._attn_implementation = impl
    names = ["input_ids", "attention_mask", "token_type_ids"]
    graph = EncoderGraph(model, names, None).eval()
    feeds = example_inputs(names, 99, 2, 12)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    src, dst = tmp_path / "model.onnx", tmp_path / "fused.onnx"
    _export(graph, args, src, names, graph.output_names(), dynamo, opset, tuple({0: b, 1: s} for _ in names),
            {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]})
    (report,) = rewrite_file(src, dst)
    expected_rule = rule if (dynamo and impl == "sdpa") or not dynamo else "core"
    assert report.fused == report.blocks == 2 and report.by_rule[expected_rule] == 2, report
    test_feeds = example_inputs(names, 99, 3, 17, seed=4)
    diff = _compare(src, dst, test_feeds, test_feeds["attention_mask"] > 0, lambda n: 1)
    assert diff <= tolerance("rewrite").atol


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_gqa_decode_step_exports_fuse(tmp_path, exporter, impl):
    """The decode step (KV cache in, beam-search tail out) through the other
    exporters: every attention block and the beam step fuse, same outputs."""
    import torch

    from fastertrt.compiler.export.decoder import _next_inputs, _parents, beam_inputs, example_prompt
    from fastertrt.compiler.export.wrappers import STEP_OUTPUTS, DecoderGraph, position_ids_from_mask
    from fastertrt.compiler.rewrite import rewrite_file

    dynamo, opset, rule = EXPORTERS[exporter]
    model = _peaky(tiny_model("llama"))
    model.config._attn_implementation = impl
    layers = model.config.num_hidden_layers
    prefill, step = DecoderGraph(model, layers, False).eval(), DecoderGraph(model, layers, True).eval()

    def beams_of(batch, beams, seq, seed):
        ids, mask = example_prompt(99, batch, seq, seed=seed)
        ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
        pos = position_ids_from_mask(mask)
        scores, bias = beam_inputs(batch, beams, 99, seed=seed, first_step=seed == 0)
        with torch.no_grad():
            presents = prefill(ids, mask, pos, scores, bias)[len(STEP_OUTPUTS):]
        return ids, mask, pos, presents

    ids, mask, pos, presents = beams_of(2, 3, 8, 0)
    new_ids, step_mask, step_pos = _next_inputs(ids, mask, pos, 2, 99)
    scores, bias = beam_inputs(2, 3, 99, seed=1)
    args = (new_ids, step_mask, step_pos, scores, bias, _parents(2, 3), *presents)
    n, b, k, s, p, t = (torch.export.Dim(x) for x in ("rows", "batch", "beams", "seq", "past", "total"))
    dynamic = ({0: n, 1: s}, {0: n, 1: t}, {0: n, 1: s}, {0: b, 1: k}, None, {0: n},
               tuple({0: n, 2: p} for _ in presents))
    ts_axes = {"input_ids": {0: "rows", 1: "seq"}, "attention_mask": {0: "rows", 1: "total"},
               "position_ids": {0: "rows", 1: "seq"}, "beam_scores": {0: "batch", 1: "beams"},
               "beam_idx": {0: "rows"}, "logits": {0: "rows"}}
    ts_axes.update({o: {0: "batch", 1: "candidates"} for o in STEP_OUTPUTS[1:]})
    ts_axes.update({x: {0: "rows", 2: "past"} for x in step.input_names() if x.startswith("past_key_values.")})
    ts_axes.update({x: {0: "rows", 2: "total"} for x in step.output_names() if x.startswith("present.")})
    src, dst = tmp_path / "decode.onnx", tmp_path / "decode.fused.onnx"
    _export(step, args, src, step.input_names(), step.output_names(), dynamo, opset, dynamic, ts_axes)
    reports = {r.plugin: r for r in rewrite_file(src, dst)}
    attention, beam = reports["FastertrtAttention"], reports["FastertrtBeamStep"]
    expected_rule = rule if (dynamo and impl == "sdpa") or not dynamo else "core"
    assert attention.fused == attention.blocks == layers and attention.by_rule[expected_rule] == layers, attention
    assert attention.by_rule["kv-cache"] == layers
    assert beam.fused == beam.blocks == 1, beam

    ids3, mask3, pos3, past = beams_of(3, 2, 7, 1)
    n_ids, n_mask, n_pos = _next_inputs(ids3, mask3, pos3, 1, 99)
    scores, bias = beam_inputs(3, 2, 99, seed=2)
    feeds = {"input_ids": n_ids.numpy(), "attention_mask": n_mask.numpy(), "position_ids": n_pos.numpy(),
             "beam_scores": scores.numpy(), "token_bias": bias.numpy(), "beam_idx": _parents(3, 2).numpy()}
    feeds.update({x: v.numpy() for x, v in zip(step.input_names()[6:], past)})
    axes = {"logits": 1, "candidate_scores": None, "candidate_tokens": None, "candidate_beams": None}
    diff = _compare(src, dst, feeds, n_mask.numpy() > 0, lambda x: axes.get(x, 2))
    assert diff <= tolerance("rewrite").atol
