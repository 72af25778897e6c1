"""Runtime side of the attention kernel: arguments from tensor addresses and
strides, kernel choice by compute capability, launch. The TensorRT plugin's
enqueue and tools/gpu_attention_check.py both call attention_launch.

Imports only the standard library, fastertrt.errors and the shared cubin
launcher (never triton or torch).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastertrt.plugins.attention.spec import AttentionSpecError
from fastertrt.plugins.cuda_launch import (
    CompiledKernel,
    KernelLaunchError,
    current_compute_capability,
    launch,
    multiprocessor_count,
    select_kernel,
)

__all__ = ["attention_launch", "attention_grid", "packed_qkv_strides", "bhsd_strides", "KernelLaunchError",
           "split_plan", "choose_splits", "split_workspace_bytes", "max_split_workspace_bytes", "block_d",
           "mask_strides"]

# Splitting over keys pays when few programs would each walk a long cache (decode
# steps): rows per (batch, head) up to this, and at most this many chunks.
SPLIT_MAX_ROWS = 16
MAX_SPLITS = 16
COMBINE_BLOCK_M = 16  # the combine kernel's rows per program (kernels.py compiles it with this)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_d(head_size: int) -> int:
    """The kernels' padded head size: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (int(head_size) - 1).bit_length())


def mask_strides(mask_dims, b: int, hq: int, s: int, t: int) -> tuple[int, int, int, int]:
    """Element strides of a contiguous additive mask broadcast to [B, Hq, S, T]
    (0 on broadcast axes)."""
    full = (1,) * (4 - len(mask_dims)) + tuple(mask_dims)
    want = (b, hq, s, t)
    for axis, (have, need) in enumerate(zip(full, want)):
        if have not in (1, need):
            raise AttentionSpecError(f"attention mask dims {tuple(mask_dims)} do not broadcast to {want} "
                                     f"(axis {axis})")
    strides, step = [0, 0, 0, 0], 1
    for axis in (3, 2, 1, 0):
        strides[axis] = 0 if full[axis] == 1 and want[axis] != 1 else step
        step *= full[axis]
    return tuple(strides)


def split_plan(t: int, block_n: int, splits: int) -> tuple[int, int]:
    """(chunks, keys per chunk) for about `splits` chunks of whole key tiles."""
    splits = max(1, min(int(splits), _cdiv(t, block_n)))
    chunk = _cdiv(_cdiv(t, splits), block_n) * block_n
    return _cdiv(t, chunk), chunk


def choose_splits(b: int, hq: int, s: int, t: int, block_m: int, block_n: int, sm_count: int) -> int:
    """How many key chunks to launch (0: not the split path). Few query rows and a
    cache of several key tiles take it (its kernel has a 16-row tile), with enough
    chunks to fill the GPU about twice."""
    if s > SPLIT_MAX_ROWS or t < 4 * block_n:
        return 0
    programs = _cdiv(s, block_m) * b * hq
    return max(1, min(MAX_SPLITS, _cdiv(2 * sm_count, programs), _cdiv(t, block_n)))


def split_workspace_bytes(b: int, hq: int, s: int, chunks: int, block_d: int) -> int:
    """FP32 partial outputs [B*Hq, chunks, S, BLOCK_D], then log-sum-exps [B*Hq, chunks, S]."""
    rows = b * hq * chunks * s
    return rows * block_d * 4 + rows * 4


def max_split_workspace_bytes(b_max: int, hq: int, s_max: int, block_d: int) -> int:
    """What a split launch can need for shapes up to these (the plugin's workspace)."""
    return split_workspace_bytes(b_max, hq, min(s_max, SPLIT_MAX_ROWS), MAX_SPLITS, block_d)


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
    cc: int | None = None, split: tuple | None = None,
) -> CompiledKernel:
    """out[b, h, i] = softmax(scale * q k^T + mask [+ causal]) v for device pointers.

    Pointers are device addresses (ints); strides in elements, (batch, head, seq, dim),
    with the dim stride 1. K/V hold the full T keys (past then new); query head h reads
    KV head h // group. mask_strides: (b, h, s, t) of the additive mask broadcast to
    [B, Hq, S, T] (0 on broadcast axes, t stride 1), or None/ignored for kernels built
    without a mask. The kernel is picked by the current device's compute capability
    (or `cc`); returns the kernel launched. stream: int CUstream handle.

    split: (split kernels by cc, combine kernels by cc, workspace pointer, workspace
    bytes) lets a launch with few query rows and a long cache run over key chunks in
    parallel and merge them (flash-decoding); it is taken only where it pays and the
    workspace is large enough."""
    cc = cc if cc is not None else current_compute_capability()
    kernel = select_kernel(kernel_by_cc, cc, "attention")
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
    if split is not None and _launch_split(split, cc, values, out_strides, B, Hq, S, T, stream):
        return kernel
    launch(kernel, attention_grid(kernel, B, Hq, S), values, stream)
    return kernel


def _launch_split(split: tuple, cc: int, values: dict, out_strides, B: int, Hq: int, S: int, T: int,
                  stream: int) -> bool:
    split_by_cc, combine_by_cc, workspace, workspace_bytes = split
    if not (split_by_cc and combine_by_cc and workspace):
        return False
    kernel = select_kernel(split_by_cc, cc, "attention (split)")
    chunks = choose_splits(B, Hq, S, T, kernel.block_m, kernel.block_n, multiprocessor_count())
    if not chunks:
        return False
    chunks, chunk = split_plan(T, kernel.block_n, chunks)
    block_d = int(kernel.tags["block_d"])
    if split_workspace_bytes(B, Hq, S, chunks, block_d) > workspace_bytes:
        return False
    lse = workspace + B * Hq * chunks * S * block_d * 4
    launch(kernel, (_cdiv(S, kernel.block_m), B * Hq, chunks), {**values, "Part": workspace, "Lse": lse,
                                                                "CHUNK": chunk}, stream)
    combine = select_kernel(combine_by_cc, cc, "attention (combine)")
    ob, oh, os_, _ = out_strides
    launch(combine, (_cdiv(S, COMBINE_BLOCK_M), B * Hq, 1),
           {"Part": workspace, "Lse": lse, "Out": values["Out"], "stride_ob": ob, "stride_oh": oh, "stride_os": os_,
            "S": S, "H": Hq, "NSPLIT": chunks}, stream)
    return True
