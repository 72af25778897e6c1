"""Decoder export: a prefill graph (prompt -> logits + KV cache) and a
decode-step graph (new tokens + KV cache of `past` positions -> logits + KV
cache of `past + seq`). Dynamic batch, seq and past; left padding through the
attention mask, positions passed explicitly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastertrt.compiler.export.onnx_file import ATTN_HINT, export_graph
from fastertrt.compiler.export.parity import ParityReport, masked_max_abs, ort_session
from fastertrt.compiler.export.shared_weights import share_weights
from fastertrt.compiler.export.result import ExportedGraph, ExportResult
from fastertrt.compiler.export.wrappers import DecoderGraph, position_ids_from_mask
from fastertrt.progress import quiet


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


def export_decoder(model, out_dir: Path, parity: bool = True, attn_implementation: str = "", progress=None) -> ExportResult:
    import torch

    progress = progress or quiet()
    layers = _num_layers(model.config)
    vocab = int(model.config.vocab_size)
    prefill, step = DecoderGraph(model, layers, False).eval(), DecoderGraph(model, layers, True).eval()

    # seq >= 2 in every example: at seq 1 the exporter specialises the graph to 1.
    ids, mask = example_prompt(vocab, 2, 8)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        presents = prefill(ids, mask, pos)[1:]
    kv_heads, head_dim = int(presents[0].shape[1]), int(presents[0].shape[3])

    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    out_dir = Path(out_dir)
    with progress.step(f"export prefill graph ({layers} layers, torch.onnx dynamo)"):
        export_graph(prefill, (ids, mask, pos), out_dir / "prefill.onnx", prefill.input_names(),
                     prefill.output_names(), ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}), hint=ATTN_HINT)

    new_ids, step_mask, step_pos = _next_inputs(ids, mask, pos, 2, vocab)
    step_args = (new_ids, step_mask, step_pos, *presents)
    # *past is one varargs entry for torch.export, so its shapes nest in one tuple
    step_dyn = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in presents))
    with progress.step("export decode-step graph (KV cache in/out)"):
        export_graph(step, step_args, out_dir / "decode.onnx", step.input_names(),
                     step.output_names(), step_dyn, hint=ATTN_HINT)

    with progress.step("store the weights of both graphs once (weights.bin)"):
        share_weights([out_dir / "prefill.onnx", out_dir / "decode.onnx"])
    graphs = [ExportedGraph.read("prefill", out_dir / "prefill.onnx"), ExportedGraph.read("decode", out_dir / "decode.onnx")]
    report = None
    if parity:
        with progress.step("parity check: ONNX Runtime vs torch, prefill + 2 decode steps"):
            report = check_decoder(prefill, step, out_dir, vocab)
    info = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab}
    return ExportResult("decoder", graphs, report, info, attn_implementation)


def _next_inputs(ids, mask, pos, n: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(int(ids.sum()) % 1000)
    new_ids = torch.randint(0, vocab, (ids.shape[0], n), generator=g)
    new_mask = torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], dim=1)
    new_pos = pos[:, -1:] + torch.arange(1, n + 1).unsqueeze(0)
    return new_ids, new_mask, new_pos


def check_decoder(prefill, step, out_dir: Path, vocab: int) -> ParityReport:
    """Prefill (batch 3, ragged left padding), then decode steps of 1 and 2 new
    tokens fed with torch's own cache, so each graph is checked on its own."""
    import torch

    report = ParityReport()
    sess_prefill, sess_step = ort_session(out_dir / "prefill.onnx"), ort_session(out_dir / "decode.onnx")
    ids, mask = example_prompt(vocab, 3, 7, seed=1)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        ref = prefill(ids, mask, pos)
    got = sess_prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()})
    _compare(report, "prefill", prefill.output_names(), got, ref, mask.numpy() > 0)

    past, cur_mask, cur_pos = ref[1:], mask, pos
    for n in (1, 2):
        new_ids, cur_mask, new_pos = _next_inputs(ids, cur_mask, cur_pos, n, vocab)
        with torch.no_grad():
            ref = step(new_ids, cur_mask, new_pos, *past)
        feeds = {"input_ids": new_ids.numpy(), "attention_mask": cur_mask.numpy(), "position_ids": new_pos.numpy()}
        feeds.update({name: t.numpy() for name, t in zip(step.input_names()[3:], past)})
        got = sess_step.run(None, feeds)
        _compare(report, f"decode_seq{n}", step.output_names(), got, ref, cur_mask.numpy() > 0)
        past, cur_pos = ref[1:], new_pos
    return report


def _compare(report, run, names, got, ref, valid_total: np.ndarray) -> None:
    """Logits cover the last `seq` positions of the mask; presents cover all of it."""
    for name, g, r in zip(names, got, ref):
        if name == "logits":
            report.add(run, name, masked_max_abs(g, r.numpy(), valid_total[:, -g.shape[1]:], seq_axis=1))
        else:
            report.add(run, name, masked_max_abs(g, r.numpy(), valid_total, seq_axis=2))
