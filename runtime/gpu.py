"""The few CUDA runtime calls the TensorRT backend needs, on cuda.bindings
(cuda-python), with errors turned into fastertrt errors."""

from __future__ import annotations

import functools

from fastertrt.errors import FastertrtError


class CudaError(FastertrtError):
    """A CUDA call failed, or there is no usable NVIDIA driver/GPU."""


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise CudaError("the TensorRT backend needs cuda-python: pip install 'fastertrt[rtx]' "
                        "or 'fastertrt[tensorrt]'") from exc
    return runtime


def check(result, what: str):
    """cuda.bindings calls return (err, *values)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=1)
def gpu_compute_capability(device: int = 0) -> str | None:
    """'sm86' for the GPU, or None where there is no driver or no GPU."""
    try:
        rt = cudart()
        count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count < 1:
            return None
        major = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device), "attr")
        minor = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device), "attr")
        return f"sm{major}{minor}"
    except Exception:  # noqa: BLE001 - no driver raises cuda.pathfinder's DynamicLibNotFoundError
        return None
