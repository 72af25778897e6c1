"""The accuracy report: the INT8 graph against the FP32 graph on the held-out
samples, per output (cosine per sample over its valid positions, max abs
error, top-1 agreement for logits) and per quantized layer (relative error of
its output, which accumulates the error of every layer before it)."""

from __future__ import annotations

import numpy as np
from fastertrt.calibration.observe import run_batches, session_with_outputs, valid_rows


def _per_sample(x: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Each sample's values at its valid positions, flattened."""
    if x.ndim >= 2 and x.shape[:2] == mask.shape:
        return [x[i][mask[i].astype(bool)].reshape(-1) for i in range(len(x))]
    return [row.reshape(-1) for row in x]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def accuracy_report(fp32_path, int8_path, outputs: list[str], layers: list, rows, input_names, pad_id,
                    batch_size: int = 16, threads: int | None = None) -> dict:
    watched = [layer.output for layer in layers]
    fetch = outputs + watched
    ref_sess = session_with_outputs(fp32_path, watched, threads)
    q_sess = session_with_outputs(int8_path, watched, threads)
    cos = {o: [] for o in outputs}
    max_abs = dict.fromkeys(outputs, 0.0)
    top1 = {o: [0, 0] for o in outputs if "logits" in o}
    err_num = dict.fromkeys(watched, 0.0)
    err_den = dict.fromkeys(watched, 0.0)
    ref_iter = run_batches(ref_sess, rows, batch_size, input_names, pad_id, fetch)
    q_iter = run_batches(q_sess, rows, batch_size, input_names, pad_id, fetch)
    for (mask, ref), (_, got) in zip(ref_iter, q_iter):
        for o in outputs:
            a_rows, b_rows = _per_sample(ref[o], mask), _per_sample(got[o], mask)
            cos[o].extend(_cos(a, b) for a, b in zip(a_rows, b_rows))
            max_abs[o] = max(max_abs[o], max(float(np.abs(a - b).max(initial=0.0)) for a, b in zip(a_rows, b_rows)))
            if o in top1:
                keep = mask.astype(bool)
                agree = ref[o].argmax(-1)[keep] == got[o].argmax(-1)[keep]
                top1[o][0] += int(agree.sum())
                top1[o][1] += int(agree.size)
        for t in watched:
            a, b = valid_rows(ref[t], mask), valid_rows(got[t], mask)
            err_num[t] += float(np.sum((a - b) ** 2))
            err_den[t] += float(np.sum(a ** 2))
    per_output = {}
    for o in outputs:
        c = np.asarray(cos[o])
        per_output[o] = {"mean_cosine": float(c.mean()), "min_cosine": float(c.min()), "max_abs_error": max_abs[o],
                         "samples": int(c.size)}
        if o in top1 and top1[o][1]:
            per_output[o]["top1_agreement"] = top1[o][0] / top1[o][1]
    layer_rows = [{"layer": layer.name, "node": layer.node, "output": layer.output,
                   "relative_error": float(np.sqrt(err_num[layer.output] / max(err_den[layer.output], 1e-30)))}
                  for layer in layers]
    layer_rows.sort(key=lambda r: -r["relative_error"])
    return {"held_out_samples": len(rows), "outputs": per_output, "worst_layers": layer_rows[:10]}


def format_report(report: dict) -> str:
    lines = [f"  accuracy on {report['held_out_samples']} held-out samples, INT8 vs FP32:",
             f"    {'output':<24} {'mean cos':>9} {'min cos':>9} {'max abs':>9} {'top-1':>7}"]
    for name, r in report["outputs"].items():
        t1 = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "-"
        lines.append(f"    {name:<24} {r['mean_cosine']:>9.5f} {r['min_cosine']:>9.5f} {r['max_abs_error']:>9.4f} {t1:>7}")
    if report["worst_layers"]:
        lines.append("    largest layer errors (relative, accumulated):")
        for r in report["worst_layers"]:
            lines.append(f"      {r['relative_error']:.4f}  {r['layer']}")
    return "\n".join(lines)
