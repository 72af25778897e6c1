"""The calibration passes: activation ranges for every quantized MatMul input.

Pass 1 runs the FP32 graph over the samples and keeps each watched tensor's
per-channel |max| and a small sample of its rows. From those, SmoothQuant
scales are chosen per tensor: outlier channels of the activation are divided
down and the weights' rows multiplied up (x / s) @ (s W), kept only where
that lowers the layer's quantization error. Pass 2 histograms the (smoothed)
activation over its now known range, and a calibrator picks the clip.
Memory stays bounded: HIST_BINS counts, K maxima and RESERVOIR_ROWS rows per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fastertrt.calibration.calibrators import (
    HIST_BINS,
    amax_from_histogram,
    fake_quant,
    weight_amax,
)
from fastertrt.calibration.observe import run_batches, session_with_outputs, valid_rows

RESERVOIR_ROWS = 512
SMOOTH_GAIN = 0.9  # keep smoothing only when it cuts the layer error by at least 10%


@dataclass
class ActivationRange:
    amax: float  # clip of the tensor the Q node sees (smoothed when `smooth` is set)
    smooth: np.ndarray | None  # per-channel divisor s (x / s), or None
    raw_amax: float  # |max| of the unsmoothed tensor (TensorRT's text cache records this)
    top: float  # |max| of the tensor the Q node sees: the widest clip there is

    def to_json(self) -> dict:
        return {"amax": self.amax, "raw_amax": self.raw_amax, "top": self.top,
                "smooth": None if self.smooth is None else [float(v) for v in self.smooth]}

    @classmethod
    def from_json(cls, d: dict) -> ActivationRange:
        sm = d.get("smooth")
        return cls(float(d["amax"]), None if sm is None else np.asarray(sm, dtype=np.float32), float(d["raw_amax"]),
                   float(d["top"]))


def layer_error(x: np.ndarray, w_kn: np.ndarray, amax: float, smooth: np.ndarray | None) -> float:
    """Relative Frobenius error of the INT8 layer output vs FP32 on rows x."""
    y = x @ w_kn
    if smooth is not None:
        x, w_kn = x / smooth, w_kn * smooth[:, None]
    yq = fake_quant(x, amax) @ fake_quant(w_kn, weight_amax(w_kn), axis=1)
    return float(np.linalg.norm(yq - y) / max(np.linalg.norm(y), 1e-12))


def smoothing_scales(chan_amax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_c = amax_c^alpha / max|W[c, :]|^(1 - alpha) over every consumer's weight."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.maximum(chan_amax, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha)
    return (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: only the shape matters


class _Pass:
    def __init__(self, progress, label, total):
        self.progress, self.label, self.total, self.next = progress, label, total, 0

    def tick(self, done):
        if done * 10 >= self.next * self.total or done == self.total:
            self.progress.info(f"    {self.label}: batch {done}/{self.total}")
            self.next = done * 10 // max(self.total, 1) + 1


def collect_ranges(model_path, plan, inits: dict, rows: list[list[int]], input_names: list[str], pad_id: int,
                   method: str, percentile: float, alpha: float | None, batch_size: int = 16,
                   threads: int | None = None, progress=None, seed: int = 0):
    """Returns ({activation: ActivationRange}, {activation: sample rows [n, K]})."""
    acts = plan.activations()
    session = session_with_outputs(model_path, acts, threads)
    n_batches = (len(rows) + batch_size - 1) // batch_size
    rng = np.random.default_rng(seed)
    chan = {a: None for a in acts}
    reservoir = {a: [] for a in acts}
    per_batch = max(8, RESERVOIR_ROWS // max(n_batches, 1))
    ticker = _Pass(progress, "pass 1/2 (channel ranges)", n_batches)
    for k, (mask, outs) in enumerate(run_batches(session, rows, batch_size, input_names, pad_id, acts), 1):
        for a in acts:
            x = valid_rows(outs[a], mask)
            m = np.abs(x).max(axis=0)
            chan[a] = m if chan[a] is None else np.maximum(chan[a], m)
            take = rng.choice(len(x), size=min(per_batch, len(x)), replace=False)
            reservoir[a].append(x[np.sort(take)])
        ticker.tick(k)
    samples = {a: np.concatenate(reservoir[a])[:RESERVOIR_ROWS].astype(np.float32) for a in acts}

    weights = {layer.node: layer.weight_kn(inits) for layer in plan.layers}
    smooth = {}
    for a in acts:
        smooth[a] = None
        if alpha is None:
            continue
        ws = [weights[layer.node] for layer in plan.consumers(a)]
        s = smoothing_scales(chan[a], ws, alpha)
        plain = sum(layer_error(samples[a], w, float(chan[a].max()), None) for w in ws)
        smoothed = sum(layer_error(samples[a], w, float((chan[a] / s).max()), s) for w in ws)
        if smoothed < SMOOTH_GAIN * plain:
            smooth[a] = s

    tops = {a: float((chan[a] / smooth[a]).max() if smooth[a] is not None else chan[a].max()) for a in acts}
    hists = {a: np.zeros(HIST_BINS, dtype=np.int64) for a in acts}
    if method != "max":  # max needs no second pass
        ticker = _Pass(progress, "pass 2/2 (histograms)", n_batches)
        for k, (mask, outs) in enumerate(run_batches(session, rows, batch_size, input_names, pad_id, acts), 1):
            for a in acts:
                x = np.abs(valid_rows(outs[a], mask))
                if smooth[a] is not None:
                    x = x / smooth[a]
                hists[a] += np.histogram(x, bins=HIST_BINS, range=(0.0, max(tops[a], 1e-8)))[0]
            ticker.tick(k)
    ranges = {a: ActivationRange(amax_from_histogram(hists[a], tops[a], method, percentile), smooth[a],
                                 float(chan[a].max()), tops[a]) for a in acts}
    return ranges, samples


def layer_errors(plan, inits: dict, ranges: dict, samples: dict) -> dict:
    """{layer node: relative error of its INT8 output} on the kept sample rows."""
    return {layer.node: layer_error(samples[layer.activation], layer.weight_kn(inits), ranges[layer.activation].amax,
                                    ranges[layer.activation].smooth) for layer in plan.layers}
