"""Decoder export: a prefill graph (prompt -> logits + KV cache) and a
decode-step graph (new tokens + KV cache of `past` positions -> logits + KV
cache of `past + seq`). Dynamic batch, seq and past; left padding through the
attention mask, positions passed explicitly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastertrt.compiler.export.onnx_file import ATTN_HINT, export_graph
from fastertrt.compiler.export.parity import ParityReport, masked_max_abs, ort_session
from fastertrt.compiler.export.result import ExportedGraph, ExportResult
from fastertrt.compiler.export.shared_weights import share_weights
from fastertrt.compiler.export.wrappers import BEAM_CANDIDATES, STEP_OUTPUTS, DecoderGraph, position_ids_from_mask
from fastertrt.progress import quiet
from fastertrt.tolerances import clear_of_ties


def example_prompt(vocab: int, batch: int, seq: int, seed: int = 0):
    """Seeded prompt ids, left-padded: row r has r*3 pads (at least 1 real token)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for r in range(batch):
        mask[r, : min(seq - 1, 3 * r)] = 0
    return ids * mask, mask


def _num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def beam_inputs(batch: int, beams: int, vocab: int, seed: int = 0, first_step: bool = False):
    """Running beam scores [B, K] with some noise so no two candidates tie (at the
    first step, as transformers starts them: beam 0 near 0, the others near -1e9)
    and a token bias [V] with one banned token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    scores = -torch.rand(batch, beams, generator=g) * 3
    if first_step:
        scores[:, 1:] -= 1e9
    bias = torch.zeros(vocab)
    bias[vocab - 1] = -float("inf")
    return scores, bias


def export_decoder(model, out_dir: Path, parity: bool = True, attn_implementation: str = "", progress=None) -> ExportResult:
    import torch

    progress = progress or quiet()
    layers = _num_layers(model.config)
    vocab = int(model.config.vocab_size)
    prefill, step = DecoderGraph(model, layers, False).eval(), DecoderGraph(model, layers, True).eval()

    # seq >= 2 and beams >= 2 in every example: the exporter specialises dims of size 1.
    batch, beams = 2, 3
    ids, mask = example_prompt(vocab, batch, 8)
    ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    pos = position_ids_from_mask(mask)
    scores, bias = beam_inputs(batch, beams, vocab, first_step=True)
    with torch.no_grad():
        presents = prefill(ids, mask, pos, scores, bias)[len(STEP_OUTPUTS):]
    kv_heads, head_dim = int(presents[0].shape[1]), int(presents[0].shape[3])

    n, b, k, s, p, t = (torch.export.Dim(x) for x in ("rows", "batch", "beams", "seq", "past", "total"))
    rows_seq = {0: n, 1: s}
    tail_dyn = ({0: b, 1: k}, None)
    out_dir = Path(out_dir)
    with progress.step(f"export prefill graph ({layers} layers, beam-search tail, torch.onnx dynamo)"):
        export_graph(prefill, (ids, mask, pos, scores, bias), out_dir / "prefill.onnx", prefill.input_names(),
                     prefill.output_names(), (rows_seq, {0: n, 1: s}, rows_seq, *tail_dyn), hint=ATTN_HINT)

    new_ids, step_mask, step_pos = _next_inputs(ids, mask, pos, 2, vocab)
    beam_idx = _parents(batch, beams)
    scores, bias = beam_inputs(batch, beams, vocab, seed=1)
    step_args = (new_ids, step_mask, step_pos, scores, bias, beam_idx, *presents)
    # *past is one varargs entry for torch.export, so its shapes nest in one tuple
    step_dyn = (rows_seq, {0: n, 1: t}, rows_seq, *tail_dyn, {0: n}, tuple({0: n, 2: p} for _ in presents))
    with progress.step("export decode-step graph (KV cache in/out, reordered by parent beam)"):
        export_graph(step, step_args, out_dir / "decode.onnx", step.input_names(),
                     step.output_names(), step_dyn, hint=ATTN_HINT)

    with progress.step("store the weights of both graphs once (weights.bin)"):
        share_weights([out_dir / "prefill.onnx", out_dir / "decode.onnx"])
    graphs = [ExportedGraph.read("prefill", out_dir / "prefill.onnx"), ExportedGraph.read("decode", out_dir / "decode.onnx")]
    report = None
    if parity:
        with progress.step("parity check: ONNX Runtime vs torch, prefill + 2 decode steps"):
            report = check_decoder(prefill, step, out_dir, vocab)
    info = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
            "beam_candidates": BEAM_CANDIDATES}
    return ExportResult("decoder", graphs, report, info, attn_implementation)


def _parents(batch: int, beams: int):
    """A beam reorder like one beam search makes: beams of a row continue from
    beams of the same row, some twice, some not at all."""
    import torch

    within = torch.tensor([(j * 2) % beams for j in range(beams)])
    return (torch.arange(batch)[:, None] * beams + within[None, :]).reshape(-1)


def _next_inputs(ids, mask, pos, n: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(int(ids.sum()) % 1000)
    new_ids = torch.randint(0, vocab, (ids.shape[0], n), generator=g)
    new_mask = torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], dim=1)
    new_pos = pos[:, -1:] + torch.arange(1, n + 1).unsqueeze(0)
    return new_ids, new_mask, new_pos


def check_decoder(prefill, step, out_dir: Path, vocab: int) -> ParityReport:
    """Prefill (3 prompts x 2 beams, ragged left padding), then decode steps of 1
    and 2 new tokens with a beam reorder, fed with torch's own cache, so each graph
    is checked on its own."""
    import torch

    report = ParityReport()
    sess_prefill, sess_step = ort_session(out_dir / "prefill.onnx"), ort_session(out_dir / "decode.onnx")
    batch, beams = 3, 2
    ids, mask = example_prompt(vocab, batch, 7, seed=1)
    ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    pos = position_ids_from_mask(mask)
    scores, bias = beam_inputs(batch, beams, vocab, first_step=True)
    args = (ids, mask, pos, scores, bias)
    with torch.no_grad():
        ref = prefill(*args)
    got = sess_prefill.run(None, dict(zip(prefill.input_names(), (a.numpy() for a in args))))
    compare_step(report, "prefill", prefill.output_names(), got, [r.numpy() for r in ref], mask.numpy() > 0)

    past, cur_mask, cur_pos = ref[len(STEP_OUTPUTS):], mask, pos
    parents = _parents(batch, beams)
    for n in (1, 2):
        new_ids, cur_mask, new_pos = _next_inputs(ids, cur_mask, cur_pos, n, vocab)
        scores, bias = beam_inputs(batch, beams, vocab, seed=n)
        cur_mask = cur_mask[parents]
        args = (new_ids, cur_mask, new_pos, scores, bias, parents, *past)
        with torch.no_grad():
            ref = step(*args)
        got = sess_step.run(None, dict(zip(step.input_names(), (a.numpy() for a in args))))
        compare_step(report, f"decode_seq{n}", step.output_names(), got, [r.numpy() for r in ref],
                     cur_mask.numpy() > 0)
        past, cur_pos = ref[len(STEP_OUTPUTS):], new_pos
    return report


def compare_step(report, run, names, got, ref, valid_total: np.ndarray) -> None:
    """Logits cover the last position; presents cover the whole mask. Candidate
    ids are compared where their score stands clear of its neighbours (a near
    tie may order differently in two runtimes without either being wrong)."""
    out = dict(zip(names, got))
    ref = dict(zip(names, ref))
    clear = clear_of_ties(ref["candidate_scores"])
    for name in names:
        g, r = out[name], ref[name]
        if name == "logits":
            report.add(run, name, masked_max_abs(g, r, valid_total[:, -1:], seq_axis=1))
        elif name == "candidate_scores":
            report.add(run, name, masked_max_abs(g, r, None, seq_axis=1))
        elif name.startswith("candidate_"):
            report.add(run, name, masked_max_abs(g[clear].astype(np.float64), r[clear].astype(np.float64), None, 0))
        else:
            report.add(run, name, masked_max_abs(g, r, valid_total, seq_axis=2))
