"""ONNX Runtime vs torch on the same inputs, compared on valid positions only.

Padded positions are excluded: their values are never read downstream, and
sdpa graphs fill fully masked rows differently from torch (finite -3.4e38
instead of -inf), which is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastertrt.errors import ParityError
from fastertrt.tolerances import tolerance


@dataclass
class ParityReport:
    """Per output name, over all checked runs: the max abs diff and the max abs
    diff relative to the output's largest magnitude (its scale)."""

    max_abs: dict = field(default_factory=dict)
    max_rel: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)  # run -> its worst output

    def add(self, run: str, name: str, diff_scale: tuple[float, float]) -> None:
        diff, scale = diff_scale
        rel = diff / scale if scale > 0 else diff
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), diff)
        self.max_rel[name] = max(self.max_rel.get(name, 0.0), rel)
        worst = self.runs.setdefault(run, {"max_abs_diff": 0.0, "output": name, "scale": scale})
        if diff >= worst["max_abs_diff"]:
            worst.update(max_abs_diff=diff, output=name, scale=scale)

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    @property
    def worst_rel(self) -> float:
        return max(self.max_rel.values(), default=0.0)

    def to_json(self) -> dict:
        return {"max_abs_diff": self.worst, "max_rel_diff": self.worst_rel, "per_output": dict(self.max_abs),
                "per_output_rel": dict(self.max_rel), "runs": self.runs}

    def failures(self, precision: str = "fp32", stage: str = "export") -> dict:
        """Outputs off by more than atol both absolutely and relative to their scale.

        The relative bound matters for deep decoders: FP32 MatMuls that sum in a
        different order (ONNX Runtime's MLAS vs torch's BLAS) drift ~1e-5 of the
        value range over 30 layers, so logits of magnitude ~30 differ by ~5e-4."""
        tol = tolerance(stage, precision)
        return {k: v for k, v in self.max_abs.items() if not (v <= tol.atol or self.max_rel[k] <= tol.atol)}

    def check(self, what: str, precision: str = "fp32", stage: str = "export") -> None:
        tol = tolerance(stage, precision)
        bad = self.failures(precision, stage)
        if bad:
            worst = ", ".join(f"{k}={v:.3g} (rel {self.max_rel[k]:.3g})"
                              for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:5])
            if stage == "rewrite":
                raise ParityError(
                    f"{what}: the fused graph differs from the exported one on ONNX Runtime beyond {tol.atol:g}, "
                    f"absolute and relative ({worst}). This is a fastertrt bug: please report it; "
                    f"--no-plugins keeps the exported graph.")
            raise ParityError(
                f"{what}: ONNX Runtime differs from torch beyond {tol.atol:g}, absolute and relative ({worst}). "
                f"Try --attn-implementation eager, or pass --no-parity to keep the export anyway."
            )


def masked_max_abs(ort_out: np.ndarray, torch_out: np.ndarray, valid: np.ndarray | None,
                   seq_axis: int) -> tuple[float, float]:
    """(max |a-b|, max |b|) where valid[b, s] is true; `seq_axis` is where s lives."""
    a = np.asarray(ort_out, dtype=np.float64)
    b = np.asarray(torch_out, dtype=np.float64)
    if a.shape != b.shape:
        raise ParityError(f"ONNX Runtime gave shape {a.shape}, torch gave {b.shape}")
    if valid is not None and a.ndim >= 2:
        shape = [1] * a.ndim
        shape[0], shape[seq_axis] = valid.shape
        keep = np.broadcast_to(valid.reshape(shape), a.shape)
        a, b = a[keep], b[keep]
    if a.size == 0:
        return 0.0, 0.0
    diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return float("inf"), float(np.abs(b).max())
    return float(diff.max()), float(np.abs(b).max())


def ort_session(path, threads: int | None = None, optimize: bool = True):
    """optimize=False compares graphs as written: ONNX Runtime's fusions (e.g.
    folding scales into MatMul) can make two different graphs compute identically."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
