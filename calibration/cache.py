"""The calibration cache: what a calibration found, keyed by what it depends on.

JSON (calibration/cache.json in the bundle): per activation tensor its amax,
the unsmoothed |max| and SmoothQuant scales, plus the method, percentile,
smoothing alpha, sample-data hash, model hash and fastertrt version. A later
compile or `fastertrt calibrate` with the same model, data and settings reuses
it and skips running the model. Also written in TensorRT's text calibration
cache format (calibration/cache.trt.txt) for older TensorRT that still takes
implicit calibration: one per-tensor scale per MatMul input (unsmoothed
|max| / 127, since that network has no smoothing).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from fastertrt.calibration.ranges import ActivationRange

from fastertrt import __version__
from fastertrt.errors import CalibrationCacheError

CACHE_FORMAT = 1
KEY_FIELDS = ("model_sha256", "data_sha256", "method", "percentile", "smooth_alpha", "exclude", "max_layer_error")


def cache_key(model_sha256: str, data_sha256: str, method: str, percentile: float | None,
              smooth_alpha: float | None, exclude: list, max_layer_error: float | None) -> dict:
    return {"model_sha256": model_sha256, "data_sha256": data_sha256, "method": method,
            "percentile": percentile if method == "percentile" else None, "smooth_alpha": smooth_alpha,
            "exclude": sorted(exclude or []), "max_layer_error": max_layer_error}


def write_cache(path: Path, key: dict, ranges: dict, decisions: dict) -> None:
    """decisions: what the sensitivity pass chose (fallback layers, widened tensors, layer errors)."""
    body = {"format": CACHE_FORMAT, "fastertrt_version": __version__, **key, **decisions,
            "tensors": {name: r.to_json() for name, r in ranges.items()}}
    _atomic_write(path, json.dumps(body, indent=1) + "\n")


def read_cache(path: Path) -> dict:
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationCacheError(f"cannot read calibration cache {path}: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != CACHE_FORMAT or "tensors" not in body:
        raise CalibrationCacheError(f"{path} is not a fastertrt calibration cache (format {CACHE_FORMAT})")
    return body


def stale_reason(body: dict, key: dict) -> str | None:
    """Why a cache does not fit this model/data/settings, or None when it does."""
    names = {"model_sha256": "the model", "data_sha256": "the sample data"}
    for field in KEY_FIELDS:
        if body.get(field) != key[field]:
            what = names.get(field, field)
            return f"{what} changed ({field} {str(body.get(field))[:12]} in the cache, {str(key[field])[:12]} now)"
    if body.get("fastertrt_version") != __version__:
        return f"it was written by fastertrt {body.get('fastertrt_version')}, this is {__version__}"
    return None


def ranges_of(body: dict) -> dict:
    return {name: ActivationRange.from_json(d) for name, d in body["tensors"].items()}


def write_tensorrt_cache(path: Path, ranges: dict, backend_version: str = "8601") -> None:
    """TensorRT's text calibration cache: a header, then `tensor: <scale as big-endian float32 hex>`."""
    lines = [f"TRT-{backend_version}-EntropyCalibration2"]
    for name, r in ranges.items():
        scale = max(r.raw_amax, 1e-8) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    _atomic_write(path, "\n".join(lines) + "\n")


def read_tensorrt_cache(path: Path) -> dict:
    """{tensor: scale} of a TensorRT text calibration cache."""
    out = {}
    for line in Path(path).read_text().splitlines()[1:]:
        name, _, hexval = line.rpartition(": ")
        out[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return out


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
