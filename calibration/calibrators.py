"""Per-tensor ranges (amax) from a histogram of |x|: max, percentile, entropy
(KL divergence, as TensorRT's entropy calibrator does it) and MSE.

Histograms have HIST_BINS bins over [0, amax of the data], so memory does not
grow with the sample set; symmetric INT8 maps [-amax, amax] to [-127, 127].
"""

from __future__ import annotations

import numpy as np

HIST_BINS = 2048
QUANT_LEVELS = 128  # |q| in 0..127 plus the zero bin: TensorRT's target distribution size
METHODS = ("max", "percentile", "entropy", "mse")
PERCENTILES = (99.9, 99.99, 99.999)


def amax_from_histogram(hist: np.ndarray, top: float, method: str, percentile: float = 99.99) -> float:
    """The clipping threshold for one tensor. `hist` counts |x| over [0, top]."""
    hist = np.asarray(hist, dtype=np.float64)
    if top <= 0 or hist.sum() == 0:
        return float(max(top, 1e-8))
    width = top / len(hist)
    if method == "max":
        return float(top)
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(idx + 1, len(hist)) * width)
    if method == "entropy":
        return float(_entropy_bins(hist) * width)
    if method == "mse":
        return float(_mse_bins(hist) * width)
    raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")


def _entropy_bins(hist: np.ndarray) -> int:
    """Bins kept (threshold = bins * width) minimising KL(P || Q): P the clipped
    distribution (outliers folded into the last kept bin), Q the same bins
    merged into QUANT_LEVELS levels and spread back over their non-empty bins."""
    n = len(hist)
    if n <= QUANT_LEVELS:
        return n
    best, best_kl = n, np.inf
    total = hist.sum()
    for i in range(QUANT_LEVELS, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        # merge i bins into QUANT_LEVELS groups of (nearly) equal width
        group = np.minimum((np.arange(i) * QUANT_LEVELS) // i, QUANT_LEVELS - 1)
        sums = np.bincount(group, weights=hist[:i], minlength=QUANT_LEVELS)
        counts = np.bincount(group, weights=(hist[:i] > 0).astype(np.float64), minlength=QUANT_LEVELS)
        q = np.where(hist[:i] > 0, sums[group] / np.maximum(counts[group], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        pn, qn = p[nonzero] / ps, q[nonzero] / qs
        # a bin P has and Q lacks (only the folded last bin can) gets a small Q, as TensorRT smooths it
        qn = np.where(qn > 0, qn, 1e-4 / total)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def _mse_bins(hist: np.ndarray, stride: int = 4) -> int:
    """Bins kept minimising the expected squared error of quantize-dequantize,
    bin centres standing for their values (in units of one bin)."""
    n = len(hist)
    centres = np.arange(n) + 0.5
    candidates = np.arange(QUANT_LEVELS, n + 1, stride)
    if candidates[-1] != n:
        candidates = np.append(candidates, n)
    scales = candidates / 127.0
    q = np.clip(np.round(centres[None, :] / scales[:, None]), -127, 127) * scales[:, None]
    err = ((q - centres[None, :]) ** 2) @ hist
    return int(candidates[int(np.argmin(err))])


def fake_quant(x: np.ndarray, amax, axis: int | None = None) -> np.ndarray:
    """Symmetric INT8 quantize-dequantize, as Q/DQ with zero point 0 computes it
    (round half to even, saturate to [-128, 127])."""
    scale = np.maximum(np.asarray(amax, dtype=np.float32) / 127.0, 1e-12)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return (np.clip(np.round(x / scale), -128, 127) * scale).astype(np.float32)


def weight_amax(w_kn: np.ndarray) -> np.ndarray:
    """Per-output-channel amax of a [K, N] weight."""
    return np.maximum(np.abs(w_kn).max(axis=0), 1e-8).astype(np.float32)
