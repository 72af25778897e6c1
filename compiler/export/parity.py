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
    """Max abs diff per output name, over all checked runs."""

    max_abs: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)

    def add(self, run: str, name: str, diff: float) -> None:
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), diff)
        self.runs.append({"run": run, "output": name, "max_abs_diff": diff})

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    def to_json(self) -> dict:
        return {"max_abs_diff": self.worst, "per_output": dict(self.max_abs), "runs": self.runs}

    def check(self, what: str, precision: str = "fp32") -> None:
        tol = tolerance("export", precision)
        bad = {k: v for k, v in self.max_abs.items() if not v <= tol.atol}
        if bad:
            worst = ", ".join(f"{k}={v:.3g}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:5])
            raise ParityError(
                f"{what}: ONNX Runtime differs from torch beyond {tol.atol:g} ({worst}). "
                f"Try --attn-implementation eager, or pass --no-parity to keep the export anyway."
            )


def masked_max_abs(ort_out: np.ndarray, torch_out: np.ndarray, valid: np.ndarray | None, seq_axis: int) -> float:
    """Max |a-b| where valid[b, s] is true; `seq_axis` is where s lives in the output."""
    a = np.asarray(ort_out, dtype=np.float64)
    b = np.asarray(torch_out, dtype=np.float64)
    if a.shape != b.shape:
        raise ParityError(f"ONNX Runtime gave shape {a.shape}, torch gave {b.shape}")
    diff = np.abs(a - b)
    if valid is not None and a.ndim >= 2:
        shape = [1] * a.ndim
        shape[0], shape[seq_axis] = valid.shape
        keep = np.broadcast_to(valid.reshape(shape), a.shape)
        diff = diff[keep]
    if diff.size == 0:
        return 0.0
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max())


def ort_session(path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
