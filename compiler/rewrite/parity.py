"""Fused vs exported graph on ONNX Runtime, same inputs, valid positions only.

The exported graph is the reference: the rewrite must not change what the model
computes beyond float reassociation (tolerance table, stage "rewrite")."""

from __future__ import annotations

import numpy as np

from fastertrt.compiler.export.parity import ParityReport, masked_max_abs
from fastertrt.compiler.export.parity import ort_session as _ort_session
from fastertrt.runtime.generation import positions


def ort_session(path):
    return _ort_session(path, optimize=False)


def _ids(rng, vocab: int, shape) -> np.ndarray:
    return rng.integers(min(5, vocab - 1), vocab, size=shape, dtype=np.int64)


def check_encoder(exported, fused, input_names: list[str], vocab: int, report: ParityReport) -> None:
    from fastertrt.compiler.export.encoder import example_inputs

    ref, got = ort_session(exported), ort_session(fused)
    for run, (b, s) in {"b2s16": (2, 16), "b3s23": (3, 23)}.items():
        feeds = example_inputs(input_names, vocab, b, s, seed=b + 7)
        valid = feeds["attention_mask"] > 0
        names = [o.name for o in ref.get_outputs()]
        for name, r, g in zip(names, ref.run(None, feeds), got.run(None, feeds)):
            report.add(run, name, masked_max_abs(g, r, valid if g.ndim == 3 else None, seq_axis=1))


def _left_padded(rng, vocab: int, batch: int, seq: int, beams: int):
    """Left-padded prompts, each repeated for its beams (rows b*K + j)."""
    mask = np.ones((batch, seq), dtype=np.int64)
    for r in range(batch):
        mask[r, :min(seq - 1, 2 * r)] = 0
    ids = _ids(rng, vocab, (batch, seq)) * mask
    ids, mask = np.repeat(ids, beams, axis=0), np.repeat(mask, beams, axis=0)
    return ids, mask, positions(mask)


def _beam_feeds(rng, batch: int, beams: int, vocab: int) -> dict:
    bias = np.zeros(vocab, dtype=np.float32)
    bias[rng.integers(vocab)] = -np.inf
    return {"beam_scores": -3 * rng.random((batch, beams), dtype=np.float32), "token_bias": bias}


def check_decoder(graphs: dict, vocab: int, report: ParityReport, decode_lengths=(1, 2)) -> None:
    """graphs: {"prefill": (exported, fused), "decode": (exported, fused)}. Prefill
    a ragged left-padded batch of 3 prompts x 2 beams, then decode steps of 1 and
    2 tokens with a beam reorder, fed with the exported graph's own cache, so each
    fused graph is checked on its own."""
    from fastertrt.compiler.export.decoder import compare_step

    rng = np.random.default_rng(3)
    batch, beams = 3, 2
    ref_pre, got_pre = (ort_session(p) for p in graphs["prefill"])
    ids, mask, pos = _left_padded(rng, vocab, batch, 9, beams)
    names = [o.name for o in ref_pre.get_outputs()]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **_beam_feeds(rng, batch, beams, vocab)}
    ref = ref_pre.run(None, feeds)
    compare_step(report, "prefill", names, got_pre.run(None, feeds), ref, mask > 0)

    ref_dec, got_dec = (ort_session(p) for p in graphs["decode"])
    past_names = [i.name for i in ref_dec.get_inputs() if i.name.startswith("past_key_values.")]
    dec_names = [o.name for o in ref_dec.get_outputs()]
    past = [r for name, r in zip(names, ref) if name.startswith("present.")]
    parents = (np.arange(batch)[:, None] * beams + np.array([1, 1])[None, :]).reshape(-1)
    for n in decode_lengths:
        mask = np.concatenate([mask, np.ones((mask.shape[0], n), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + np.arange(1, n + 1)[None, :]
        feeds = {"input_ids": _ids(rng, vocab, (mask.shape[0], n)), "attention_mask": mask, "position_ids": pos,
                 "beam_idx": parents, **_beam_feeds(rng, batch, beams, vocab)}
        feeds.update(zip(past_names, past))
        ref = ref_dec.run(None, feeds)
        compare_step(report, f"decode_seq{n}", dec_names, got_dec.run(None, feeds), ref, mask > 0)
        past = [r for name, r in zip(dec_names, ref) if name.startswith("present.")]
