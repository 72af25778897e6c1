"""Runtime side of the attention kernel: arguments from tensor addresses and
strides, kernel choice by compute capability, launch. The TensorRT plugin's
enqueue and tools/gpu_attention_check.py both call attention_launch.

Imports only the standard library, fastertrt.errors and the shared cubin
launcher (never triton or torch).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastertrt.plugins.cuda_launch import (
    CompiledKernel,
    KernelLaunchError,
    current_compute_capability,
    launch,
    select_kernel,
)

__all__ = ["attention_launch", "attention_grid", "packed_qkv_strides", "bhsd_strides", "KernelLaunchError"]


def bhsd_strides(b: int, h: int, s: int, d: int) -> tuple[int, int, int, int]:
    """Element strides of a contiguous [B, H, S, D] tensor."""
    return (h * s * d, s * d, d, 1)


def packed_qkv_strides(num_heads: int, kv_num_heads: int, s: int, d: int):
    """(element offsets of q, k, v in the buffer, their common strides) for packed
    qkv [B, S, (Hq + 2*Hkv) * D]: each head is a D-wide slice of a row."""
    width = (num_heads + 2 * kv_num_heads) * d
    offsets = (0, num_heads * d, (num_heads + kv_num_heads) * d)
    return offsets, (s * width, d, width, 1)


def attention_grid(kernel: CompiledKernel, b: int, hq: int, s: int) -> tuple[int, int, int]:
    return (-(-s // kernel.block_m), b * hq, 1)


def _four(name: str, strides: Sequence[int]) -> Sequence[int]:
    if len(strides) != 4:
        raise KernelLaunchError(f"attention: {name} strides must be 4 (batch, head, seq, dim), got {strides}")
    return strides


def attention_launch(
    kernel_by_cc: dict[int, CompiledKernel],
    q_ptr: int, k_ptr: int, v_ptr: int, mask_ptr: int, out_ptr: int,
    q_strides: Sequence[int], k_strides: Sequence[int], v_strides: Sequence[int], out_strides: Sequence[int],
    mask_strides: Sequence[int] | None,
    B: int, Hq: int, S: int, T: int, group: int, scale: float, stream: int,
    cc: int | None = None,
) -> CompiledKernel:
    """out[b, h, i] = softmax(scale * q k^T + mask [+ causal]) v for device pointers.

    Pointers are device addresses (ints); strides in elements, (batch, head, seq, dim),
    with the dim stride 1. K/V hold the full T keys (past then new); query head h reads
    KV head h // group. mask_strides: (b, h, s, t) of the additive mask broadcast to
    [B, Hq, S, T] (0 on broadcast axes, t stride 1), or None/ignored for kernels built
    without a mask. The kernel is picked by the current device's compute capability
    (or `cc`); returns the kernel launched. stream: int CUstream handle."""
    kernel = select_kernel(kernel_by_cc, cc if cc is not None else current_compute_capability(), "attention")
    if S <= 0 or B <= 0 or Hq <= 0:
        return kernel  # nothing to compute; a zero-sized grid is a CUDA error
    if Hq % group or group < 1:
        raise KernelLaunchError(f"attention: Hq={Hq} is not a multiple of the group size {group}")
    values = {"Q": q_ptr, "K": k_ptr, "V": v_ptr, "Out": out_ptr, "S": S, "T": T, "H": Hq, "GROUP": group,
              "scale": float(scale)}
    for prefix, strides in (("q", q_strides), ("k", k_strides), ("v", v_strides), ("o", out_strides)):
        sb, sh, ss, sd = _four(prefix, strides)
        if sd != 1:
            raise KernelLaunchError(f"attention: {prefix} must be contiguous along the head dim (stride 1), "
                                    f"got {sd}")
        values.update({f"stride_{prefix}b": sb, f"stride_{prefix}h": sh, f"stride_{prefix}s": ss})
    if kernel.tags.get("has_mask"):
        if not mask_ptr or mask_strides is None:
            raise KernelLaunchError("attention: this kernel was built for a mask; pass mask_ptr and mask_strides")
        mb, mh, ms, mt = _four("mask", mask_strides)
        if mt != 1 and T > 1:
            raise KernelLaunchError(f"attention: the mask must be contiguous along keys (t stride 1), got {mt}; "
                                    f"expand a mask broadcast along keys before the plugin")
        values.update({"M": mask_ptr, "stride_mb": mb, "stride_mh": mh, "stride_ms": ms})
    launch(kernel, attention_grid(kernel, B, Hq, S), values, stream)
    return kernel
