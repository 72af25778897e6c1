"""Fused vs exported graph on ONNX Runtime, same inputs, valid positions only.

The exported graph is the reference: the rewrite must not change what the model
computes beyond float reassociation (tolerance table, stage "rewrite")."""

from __future__ import annotations

import numpy as np

from fastertrt.compiler.export.parity import ParityReport, masked_max_abs, ort_session as _ort_session


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


def _left_padded(rng, vocab: int, batch: int, seq: int):
    mask = np.ones((batch, seq), dtype=np.int64)
    for r in range(batch):
        mask[r, :min(seq - 1, 2 * r)] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return _ids(rng, vocab, (batch, seq)) * mask, mask, pos


def check_decoder(graphs: dict, vocab: int, report: ParityReport) -> None:
    """graphs: {"prefill": (exported, fused), "decode": (exported, fused)}. Prefill
    a ragged left-padded batch, then decode steps of 1 and 2 tokens fed with the
    exported graph's own cache, so each fused graph is checked on its own."""
    rng = np.random.default_rng(3)
    ref_pre, got_pre = (ort_session(p) for p in graphs["prefill"])
    ids, mask, pos = _left_padded(rng, vocab, 3, 9)
    names = [o.name for o in ref_pre.get_outputs()]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    ref = ref_pre.run(None, feeds)
    _compare(report, "prefill", names, ref, got_pre.run(None, feeds), mask > 0)

    ref_dec, got_dec = (ort_session(p) for p in graphs["decode"])
    past_names = [i.name for i in ref_dec.get_inputs()][3:]
    dec_names = [o.name for o in ref_dec.get_outputs()]
    past = ref[1:]
    for n in (1, 2):
        mask = np.concatenate([mask, np.ones((mask.shape[0], n), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + np.arange(1, n + 1)[None, :]
        feeds = {"input_ids": _ids(rng, vocab, (mask.shape[0], n)), "attention_mask": mask, "position_ids": pos}
        feeds.update(zip(past_names, past))
        ref = ref_dec.run(None, feeds)
        _compare(report, f"decode_seq{n}", dec_names, ref, got_dec.run(None, feeds), mask > 0)
        past = ref[1:]


def _compare(report, run, names, ref, got, valid_total) -> None:
    for name, r, g in zip(names, ref, got):
        if name == "logits":
            report.add(run, name, masked_max_abs(g, r, valid_total[:, -g.shape[1]:], seq_axis=1))
        else:
            report.add(run, name, masked_max_abs(g, r, valid_total, seq_axis=2))
