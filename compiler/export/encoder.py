"""Encoder export: one graph, ids + mask (+ token types) -> hidden states
(+ the pooled sentence embedding for sentence-transformers models)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from fastertrt.compiler.export.onnx_file import ATTN_HINT, export_graph
from fastertrt.compiler.export.parity import ParityReport, masked_max_abs, ort_session
from fastertrt.compiler.export.result import ExportedGraph, ExportResult
from fastertrt.compiler.export.wrappers import EncoderGraph
from fastertrt.progress import quiet


def encoder_input_names(model) -> list[str]:
    names = ["input_ids", "attention_mask"]
    params = inspect.signature(model.forward).parameters
    # RoBERTa accepts token_type_ids but has one type: feeding it adds nothing.
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 1) > 1:
        names.append("token_type_ids")
    return names


def example_inputs(names: list[str], vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    """Seeded ids with ragged padding: row r has seq - 5*r real tokens (at least 2)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low=min(5, vocab - 1), high=vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for r in range(batch):
        mask[r, max(2, seq - 5 * r):] = 0
    ids = np.where(mask > 0, ids, 0)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        tt = np.zeros_like(ids)
        tt[:, seq // 2:] = 1
        feeds["token_type_ids"] = tt * mask
    return {n: feeds[n] for n in names}


def export_encoder(model, out_dir: Path, pooling: dict | None = None, parity: bool = True,
                   attn_implementation: str = "", progress=None) -> ExportResult:
    import torch

    names = encoder_input_names(model)
    graph = EncoderGraph(model, names, pooling).eval()
    vocab = int(model.config.vocab_size)
    feeds = example_inputs(names, vocab)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic = tuple({0: batch, 1: seq} for _ in names)
    path = Path(out_dir) / "model.onnx"

    progress = progress or quiet()
    step = progress.step
    with step("export encoder graph (torch.onnx dynamo)"):
        export_graph(graph, args, path, names, graph.output_names(), dynamic, hint=ATTN_HINT)
    exported = ExportedGraph.read("encoder", path)

    report = None
    if parity:
        with step("parity check: ONNX Runtime vs torch"):
            report = ParityReport()
            session = ort_session(path)
            # A second shape (batch 3, longer seq) proves the dims really are dynamic.
            for run, (b, s) in {"b2s16": (2, 16), "b3s24": (3, 24)}.items():
                run_feeds = example_inputs(names, vocab, b, min(s, _max_len(model)), seed=b)
                check_encoder(graph, session, run_feeds, report, run)
    info = {"input_names": names, "pooling": pooling, "vocab_size": vocab}
    return ExportResult("encoder", [exported], report, info, attn_implementation)


def check_encoder(graph, session, feeds: dict, report: ParityReport, run: str) -> None:
    import torch

    with torch.no_grad():
        ref = graph(*(torch.from_numpy(v) for v in feeds.values()))
    got = session.run(None, feeds)
    valid = feeds["attention_mask"] > 0
    for name, g, r in zip(graph.output_names(), got, ref):
        row_valid = valid if g.ndim == 3 else None
        report.add(run, name, masked_max_abs(g, r.numpy(), row_valid, seq_axis=1))


def _max_len(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 512)) - 2
