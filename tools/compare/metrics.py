"""How far one stage's tensor is from the previous stage's: the numbers the
output table, the layer search and the plot share, and the pass rule for each."""

from __future__ import annotations

import numpy as np

from fastertrt.tolerances import Tolerance


def valid_positions(mask: np.ndarray | None, shape: tuple, seq_axis: int | None) -> np.ndarray | None:
    """A boolean array of `shape` that is true on unpadded positions, or None."""
    if mask is None or seq_axis is None or len(shape) <= seq_axis or shape[0] != mask.shape[0] \
            or shape[seq_axis] != mask.shape[1]:
        return None
    view = [1] * len(shape)
    view[0], view[seq_axis] = mask.shape
    return np.broadcast_to(mask.reshape(view) > 0, shape)


def tensor_metrics(ref, got, valid: np.ndarray | None = None) -> dict:
    """Integer and boolean tensors must be equal; float tensors get max abs
    error, that error relative to the reference's largest magnitude, cosine
    similarity and the ratio of norms. Positions where both hold the same
    value (the same -inf of a mask, say) count as equal; a non-finite value
    on one side only is a mismatch of its own."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return {"kind": "shape", "ref_shape": list(ref.shape), "got_shape": list(got.shape)}
    if valid is not None:
        ref, got = ref[valid], got[valid]
    if ref.dtype.kind not in "fc" or got.dtype.kind not in "fc":
        diff = ref != got
        out = {"kind": "exact", "mismatched": int(diff.sum()), "total": int(diff.size)}
        if out["mismatched"]:
            out["first_index"] = [int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)]
        return out
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    same = a == b
    finite = np.isfinite(a) & np.isfinite(b)
    bad = int((~same & ~finite).sum())  # inf or NaN on one side, or NaN on both
    a, b = a[finite], b[finite]
    out = {"kind": "float", "elements": int(ref.size), "nonfinite_mismatch": bad}
    if a.size == 0:
        out.update(max_abs=0.0, max_rel=0.0, cosine=1.0, norm_ratio=1.0, scale=0.0)
        return out
    diff = np.abs(a - b)
    scale = float(np.abs(a).max())
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        cosine, ratio = 1.0, 1.0
    elif na == 0.0 or nb == 0.0:
        cosine, ratio = 0.0, (float("inf") if na == 0.0 else 0.0)
    else:
        cosine, ratio = float(np.dot(a, b) / (na * nb)), nb / na
    out.update(max_abs=float(diff.max()), max_rel=float(diff.max() / scale) if scale > 0 else float(diff.max()),
               cosine=cosine, norm_ratio=ratio, scale=scale, mean_abs=float(diff.mean()))
    return out


def worst_of(worst: dict | None, m: dict) -> dict:
    """The worst of two metrics (two iterations, or two tensors folded into one row)."""
    if worst is None or m["kind"] != worst["kind"] or m["kind"] == "shape":
        return dict(m) if worst is None or m["kind"] == "shape" else worst
    if m["kind"] == "exact":
        return {**worst, "mismatched": worst["mismatched"] + m["mismatched"], "total": worst["total"] + m["total"],
                **({"first_index": worst.get("first_index", m.get("first_index"))} if m["mismatched"] else {})}
    out = dict(worst)
    for key in ("max_abs", "max_rel", "scale"):
        out[key] = max(worst[key], m[key])
    out["cosine"] = min(worst["cosine"], m["cosine"])
    out["norm_ratio"] = max(worst["norm_ratio"], m["norm_ratio"], key=lambda r: abs(r - 1.0))
    out["nonfinite_mismatch"] = worst["nonfinite_mismatch"] + m["nonfinite_mismatch"]
    out["elements"] = worst["elements"] + m["elements"]
    return out


def _decided(m: dict) -> bool | None:
    """The verdict where the kind of tensor settles it: shapes must agree, ids be
    equal, and inf/NaN appear on both sides alike. None: the numbers decide."""
    if m["kind"] == "shape":
        return False
    if m["kind"] == "exact":
        return m["mismatched"] == 0
    return False if m["nonfinite_mismatch"] else None


def output_ok(m: dict, tol: Tolerance) -> bool:
    """A graph output: max abs error within atol (absolute, or relative to the
    output's scale), cosine and norm within bounds."""
    decided = _decided(m)
    if decided is not None:
        return decided
    return (m["max_abs"] <= tol.atol or m["max_rel"] <= tol.atol) and _shape_of_error_ok(m, tol)


def layer_ok(m: dict, tol: Tolerance) -> bool:
    """An intermediate tensor: only scale-free bounds (rel, cosine, norm)."""
    decided = _decided(m)
    if decided is not None:
        return decided
    return (tol.rel is None or m["max_rel"] <= tol.rel) and _shape_of_error_ok(m, tol)


def _shape_of_error_ok(m: dict, tol: Tolerance) -> bool:
    if m["cosine"] < tol.min_cosine:
        return False
    return tol.norm is None or abs(m["norm_ratio"] - 1.0) <= tol.norm


def describe(m: dict) -> str:
    """One line for a terminal."""
    if m["kind"] == "shape":
        return f"shape {m['got_shape']} where the reference has {m['ref_shape']}"
    if m["kind"] == "exact":
        if not m["mismatched"]:
            return f"equal ({m['total']} elements)"
        return f"{m['mismatched']} of {m['total']} elements differ, first at index {m['first_index']}"
    text = (f"max abs {m['max_abs']:.3g}, rel {m['max_rel']:.3g}, cosine {m['cosine']:.6f}, "
            f"norm ratio {m['norm_ratio']:.4f}")
    if m["nonfinite_mismatch"]:
        text += f", {m['nonfinite_mismatch']} inf/NaN on one side only"
    return text


def stats(arr) -> dict:
    """Summary statistics of a tensor for the report."""
    arr = np.asarray(arr)
    out = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if arr.size == 0:
        return out
    if arr.dtype.kind in "fc":
        finite = np.isfinite(arr)
        vals = arr[finite].astype(np.float64)
        out["nonfinite"] = int((~finite).sum())
        if vals.size:
            out.update(min=float(vals.min()), max=float(vals.max()), mean=float(vals.mean()),
                       std=float(vals.std()), absmax=float(np.abs(vals).max()))
    elif arr.dtype.kind in "iub":
        out.update(min=int(arr.min()), max=int(arr.max()))
    return out


def stats_line(s: dict) -> str:
    if "std" in s:
        extra = f", {s['nonfinite']} inf/NaN" if s.get("nonfinite") else ""
        return (f"{s['dtype']} {s['shape']}: min {s['min']:.4g}, max {s['max']:.4g}, mean {s['mean']:.4g}, "
                f"std {s['std']:.4g}{extra}")
    if "min" in s:
        return f"{s['dtype']} {s['shape']}: min {s['min']}, max {s['max']}"
    return f"{s['dtype']} {s['shape']}"
