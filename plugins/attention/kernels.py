"""The attention plugin's Triton kernel, compiled ahead of time to cubins.

One fused forward kernel (FlashAttention-2: online softmax over key tiles,
FP32 accumulation) serves every attention node: Q, K, V, mask and output come
as base pointers with explicit strides, so the same code reads [B, H, S, D]
tensors and views of one packed qkv buffer [B, S, (Hq + 2*Hkv) * D].

Triton is needed only to compile (`compile_variant`) or to interpret
(`attention_interpreted`): importing this module does not import it, so the
plugin's build side can name variants without triton installed. The runtime
never imports this module; it loads the cubins through launch.py.

Interpretation (`attention_interpreted*`) runs the same kernel source on the
CPU with Triton's interpreter. The process must have TRITON_INTERPRET=1 in its
environment before triton is first imported: triton.language's own helpers
(tl.zeros, tl.max, ...) are decorated at that import. triton.compile fails in
such a process, so compiling and interpreting need two processes (the tests run
the interpreted cases in a subprocess).
"""

from __future__ import annotations  # keeps `tl.constexpr` annotations as strings until triton is loaded

import functools
import math
from dataclasses import dataclass

from fastertrt.plugins import triton_aot
from fastertrt.plugins.attention.launch import COMBINE_BLOCK_M, block_d, mask_strides, split_plan
from fastertrt.plugins.attention.spec import ITEMSIZE
from fastertrt.plugins.cuda_launch import CompiledKernel
from fastertrt.plugins.triton_aot import SHARED_LIMIT_KB  # noqa: F401 - part of this module's interface

IO_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TARGETS = (80, 86, 89, 90)
OPTIONAL_TARGETS = (75, 120)
KERNEL_NAME = "fastertrt_attention_fwd"

_TRITON_TYPE = triton_aot.TRITON_TYPE

# Bound to triton.language by _triton() on first use; the kernel below looks it
# up as a module global when Triton compiles or interprets it.
tl = None


# -----------------------------------------------------------------------------
# The kernel (plain Python until _jit_kernel() wraps it with triton.jit)
# -----------------------------------------------------------------------------
def fastertrt_attention_fwd(
    Q, K, V, M, Out,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_ms, stride_mt,
    S, T, H, GROUP, scale,
    Part, Lse, CHUNK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit base offsets: batch * batch-stride overflows int32 for big KV caches
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM  # BLOCK_D is a power of two >= 16 (tl.dot's minimum)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd
    if HAS_MASK:
        m_base = M + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_ms

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Causal rows i < (pid_m+1)*BLOCK_M see keys j <= T-S+i: later tiles are all masked.
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, T - S + (pid_m + 1) * BLOCK_M)
    lo = 0
    if SPLIT:
        # split over keys (few query rows, a long cache): this program takes one
        # CHUNK of keys; fastertrt_attention_combine merges the chunks' results
        lo = tl.program_id(2) * CHUNK
        hi = tl.minimum(hi, lo + CHUNK)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=kv_mask, other=0.0)
        if UPCAST_DOT:  # interpreter only: it multiplies bf16 operands as their raw bits
            s = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if HAS_MASK:
            # Natural units (not pre-multiplied by log2 e): finfo.min * log2 e would overflow.
            mask = tl.load(m_base + cols[None, :] * stride_mt, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = s + mask.to(tl.float32)
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= (T - S) + offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with only -inf so far has m_new = -inf; subtracting it would give NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_use[:, None]) * 1.4426950408889634)
        alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=kv_mask, other=0.0)
        p_io = p.to(v.dtype)  # tensor-core operands in the I/O type, as FlashAttention does
        if UPCAST_DOT:
            pv = tl.dot(p_io.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_io, v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # Fully masked rows have l = 0 and acc = 0: give zeros, not 0/0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        # per chunk: the normalized partial output and its log-sum-exp, FP32, in the
        # workspace laid out [B*H, chunks, S] (+ [BLOCK_D] for the outputs)
        row = (pid_bh.to(tl.int64) * tl.num_programs(2) + tl.program_id(2)) * S + offs_m
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
        tl.store(Lse + row, lse, mask=row_ok)
        tl.store(Part + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    else:
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def fastertrt_attention_combine(
    Part, Lse, Out,
    stride_ob, stride_oh, stride_os, stride_od,
    S, H, NSPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the key chunks of a split launch: out = sum_c w_c * part_c / sum_c w_c
    with w_c = exp(lse_c - max lse); chunks that saw no key (lse = -inf) weigh 0."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for c in range(0, NSPLIT):
        top = tl.maximum(top, tl.load(Lse + (pid_bh * NSPLIT + c) * S + offs_m, mask=row_ok, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for c in range(0, NSPLIT):
        row = (pid_bh * NSPLIT + c) * S + offs_m
        w = tl.exp(tl.load(Lse + row, mask=row_ok, other=float("-inf")) - top)
        part = tl.load(Part + row[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        acc += w[:, None] * part
        total += w
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


_POINTERS = ("Q", "K", "V", "M", "Out")
_DATA_STRIDES = tuple(f"stride_{t}{a}" for t in "qkvo" for a in "bhsd")
_MASK_STRIDES = ("stride_mb", "stride_mh", "stride_ms", "stride_mt")
_SCALARS = ("S", "T", "H", "GROUP")


def _triton():
    """Import triton on first use and bind the module-global `tl` the kernel reads."""
    global tl
    triton = triton_aot.import_triton("the attention kernel")
    tl = triton.language
    return triton


@functools.lru_cache(maxsize=2)
def _jit_kernel(fn=None):
    return triton_aot.jit_for_compile(_triton(), fn or fastertrt_attention_fwd, "the attention kernels")


@functools.lru_cache(maxsize=2)
def _interpreted_kernel(fn=None):
    return triton_aot.jit_for_interpreter(_triton(), fn or fastertrt_attention_fwd, "attention_interpreted")


# -----------------------------------------------------------------------------
# Variants and tiles
# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelVariant:
    """What a cubin is specialised for. mask_dtype is the additive mask's type (the
    I/O type or float32); with has_mask=0 it is normalised to "none"."""

    dtype: str
    head_dim: int
    has_mask: int = 0
    causal: int = 0
    mask_dtype: str = "float32"
    split: int = 0  # 1: the split-over-keys kernel (writes chunk partials for the combine kernel)

    def __post_init__(self):
        for name in ("head_dim", "has_mask", "causal"):  # True/np.int64 -> int: one cache entry, clean tags
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.dtype not in IO_DTYPES:
            raise ValueError(f"attention kernel dtype must be one of {IO_DTYPES}, got {self.dtype!r}")
        if not (1 <= int(self.head_dim) <= 256):
            raise ValueError(f"attention kernel head_dim must be in 1..256, got {self.head_dim}")
        if self.has_mask not in (0, 1) or self.causal not in (0, 1):
            raise ValueError(f"has_mask and causal must be 0 or 1, got {self.has_mask}, {self.causal}")
        if not self.has_mask:
            object.__setattr__(self, "mask_dtype", "none")
        elif self.mask_dtype not in (self.dtype, "float32"):
            raise ValueError(f"mask dtype must be float32 or the I/O type {self.dtype}, got {self.mask_dtype!r}")

    @property
    def block_d(self) -> int:
        return block_d(self.head_dim)

    def tag(self) -> str:
        return (f"{self.dtype}_d{self.head_dim}_m{self.has_mask}{'' if not self.has_mask else self.mask_dtype}"
                f"_c{self.causal}{'_split' if self.split else ''}")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_config(variant: KernelVariant, cc: int) -> TileConfig:
    """Tiles per variant. The limits that shape them: K and V tiles are buffered
    num_stages times in shared memory (sm_75 allows 64 KB a block, sm_86/89/120
    99 KB, sm_80 163 KB, sm_90 227 KB), and FP32 operands double every tile."""
    d = variant.block_d
    if variant.split:
        # split launches serve a few query rows (decode steps): the smallest row tile
        # tl.dot takes, so a step's one row does not pay for 64
        return TileConfig(block_m=16, block_n=64 if d <= 128 else 32, num_warps=4, num_stages=1 if cc < 80 else 2)
    if variant.dtype == "float32":
        # ieee FP32 dot: small tiles keep registers and shared memory in bounds
        return TileConfig(block_m=32, block_n=32 if d <= 64 else 16, num_warps=4, num_stages=1 if cc < 80 else 2)
    stages = 1 if cc < 80 else 2
    if d <= 64:
        if variant.has_mask:
            # the FP32 mask tile costs registers: narrower key tiles, one more stage.
            # Measured on an H200 with CUDA-graph timing (tools/gpu_attention_tune.py):
            # BERT b32 s128 15.6-16.3 us vs 21.5 us for 64x64, torch SDPA 17.0 us.
            return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=1 if cc < 80 else 3)
        return TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=stages)
    if d <= 128:
        return TileConfig(block_m=64, block_n=32 if cc < 80 else 64, num_warps=4, num_stages=stages)
    if cc < 80:
        return TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    return TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=1)


# -----------------------------------------------------------------------------
# Ahead-of-time compile
# -----------------------------------------------------------------------------
def _alignment_hints(variant: KernelVariant) -> tuple[int, int]:
    """(pointer alignment in bytes, stride divisibility in elements) the cubin may
    assume. Both hold for contiguous BHSD tensors and packed-qkv views when D is a
    multiple of 16 (16 bytes: fp32 D=4k too); otherwise claim nothing. The launcher
    checks them on every call."""
    ptr = 16 if (variant.head_dim * ITEMSIZE[variant.dtype]) % 16 == 0 else 0
    stride = 16 if variant.head_dim % 16 == 0 else 0
    return ptr, stride


def _signature(variant: KernelVariant, tile: TileConfig):
    """ASTSource signature, constexprs and attrs, and the cubin's argument layout."""
    io = "*" + _TRITON_TYPE[variant.dtype]
    ptr_align, stride_div = _alignment_hints(variant)
    constexprs = {
        "HEAD_DIM": int(variant.head_dim), "BLOCK_D": variant.block_d,
        "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
        "HAS_MASK": bool(variant.has_mask), "CAUSAL": bool(variant.causal),
        "DOT_PRECISION": "ieee" if variant.dtype == "float32" else "tf32", "UPCAST_DOT": False,
        # unit element strides: contiguous loads along D (and along keys in the mask) vectorize
        "stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1,
    }
    if variant.has_mask:
        constexprs["stride_mt"] = 1
    else:
        constexprs.update({"M": None, "stride_mb": 0, "stride_mh": 0, "stride_ms": 0, "stride_mt": 0})
    constexprs["SPLIT"] = bool(variant.split)
    if variant.split:
        constexprs["Out"] = None  # a split launch writes the workspace; the combine kernel writes Out
        constexprs.update({f"stride_o{a}": 0 for a in "bhsd"})
    else:
        constexprs.update({"Part": None, "Lse": None, "CHUNK": 0})

    types = {name: io for name in ("Q", "K", "V", "Out")}
    types["M"] = "*" + _TRITON_TYPE[variant.mask_dtype] if variant.has_mask else None
    types.update({name: "i32" for name in _DATA_STRIDES + _MASK_STRIDES + _SCALARS})
    types.update({"scale": "fp32", "Part": "*fp32", "Lse": "*fp32", "CHUNK": "i32"})

    def divisibility(name, type_):
        return ptr_align if type_.startswith("*") else (stride_div if name in _DATA_STRIDES else 0)

    return triton_aot.signature_and_layout(fastertrt_attention_fwd, types, constexprs, divisibility)


def supported_targets() -> tuple[int, ...]:
    """DEFAULT_TARGETS plus the optional ones this Triton can compile for."""
    return DEFAULT_TARGETS + tuple(cc for cc in OPTIONAL_TARGETS if _target_supported(cc))


@functools.lru_cache(maxsize=None)
def _target_supported(cc: int) -> bool:
    try:
        compile_variant(KernelVariant("float16", 64), cc)
        return True
    except Exception:  # noqa: BLE001 - any compiler failure means "not this target"
        return False


_compiled: dict[tuple[KernelVariant, int], CompiledKernel] = {}  # in-process cache (compile_many fills it too)


def compile_variant(variant: KernelVariant, cc: int) -> CompiledKernel:
    """Compile one variant for one compute capability (no GPU needed), once per process."""
    return triton_aot.cached_compile(_compiled, _compile, variant, cc)


def compile_many(pairs, jobs: int | None = None) -> dict[tuple[KernelVariant, int], CompiledKernel]:
    """Compile (variant, cc) pairs, in up to `jobs` worker processes (default: the CPU count)."""
    pairs = list(pairs)
    triton_aot.compile_all(_compiled, _compile, pairs, jobs)
    return {(v, int(cc)): compile_variant(v, cc) for v, cc in pairs}


@dataclass(frozen=True)
class CombineVariant:
    """The kernel that merges a split launch's key chunks into the output."""

    dtype: str
    head_dim: int

    @property
    def block_d(self) -> int:
        return block_d(self.head_dim)

    def tag(self) -> str:
        return f"combine_{self.dtype}_d{self.head_dim}"




def _combine_signature(variant: CombineVariant):
    constexprs = {"HEAD_DIM": int(variant.head_dim), "BLOCK_D": variant.block_d, "BLOCK_M": COMBINE_BLOCK_M,
                  "stride_od": 1}
    types = {"Part": "*fp32", "Lse": "*fp32", "Out": "*" + _TRITON_TYPE[variant.dtype]}
    types.update({name: "i32" for name in ("stride_ob", "stride_oh", "stride_os", "S", "H", "NSPLIT")})
    return triton_aot.signature_and_layout(fastertrt_attention_combine, types, constexprs)


def compile_combine(variant: CombineVariant, cc: int) -> CompiledKernel:
    return compile_variant(variant, cc)


def _compile(variant, cc: int) -> CompiledKernel:
    triton = _triton()
    if isinstance(variant, CombineVariant):
        kernel = _jit_kernel(fastertrt_attention_combine)
        tile = TileConfig(COMBINE_BLOCK_M, 0, 4, 1)
        signature, constexprs, attrs, layout = _combine_signature(variant)
    else:
        kernel = _jit_kernel()
        tile = tile_config(variant, cc)
        signature, constexprs, attrs, layout = _signature(variant, tile)
    return triton_aot.compile_to_kernel(
        triton, kernel, signature, constexprs, attrs, layout, cc,
        num_warps=tile.num_warps, num_stages=tile.num_stages, block_m=tile.block_m, block_n=tile.block_n,
        label=f"attention {variant.tag()}", hint="; tile_config must give it smaller tiles",
        tags={"variant": variant.tag(), "dtype": variant.dtype,
              "head_dim": int(variant.head_dim), "has_mask": int(getattr(variant, "has_mask", 0)),
              "causal": int(getattr(variant, "causal", 0)), "mask_dtype": getattr(variant, "mask_dtype", "none"),
              "split": int(getattr(variant, "split", 0)), "block_d": variant.block_d,
              "num_stages": tile.num_stages},
    )


def compile_for_targets(variant: KernelVariant, targets=None) -> dict[int, CompiledKernel]:
    """{cc: kernel} for `targets` (default: DEFAULT_TARGETS and the optional ones
    that compile), as attention_launch takes it."""
    return {cc: compile_variant(variant, cc) for cc in (targets or supported_targets())}


# -----------------------------------------------------------------------------
# Interpreted run on the CPU (same kernel source)
# -----------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _to_torch(array, dtype: str):
    """numpy -> torch CPU tensor of `dtype` (bfloat16 by way of float32: numpy has none)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(_torch_dtype(dtype))


def _run_interpreted(q_view, k_view, v_view, mask_t, out, *, b, hq, hkv, s, t, d, scale, causal,
                     dtype, block_m, block_n):
    import torch

    kernel = _interpreted_kernel()
    variant = KernelVariant(dtype, d, has_mask=int(mask_t is not None), causal=int(causal),
                            mask_dtype=_dtype_name(mask_t.dtype) if mask_t is not None else "float32")
    ms = mask_strides(mask_t.shape, b, hq, s, t) if mask_t is not None else (0, 0, 0, 0)
    # The interpreter needs a tensor for every pointer: a 1-element dummy stands in for "no mask".
    m_arg = mask_t if mask_t is not None else torch.zeros(1, dtype=torch.float32)
    grid = (math.ceil(s / block_m), b * hq)
    kernel[grid](
        q_view, k_view, v_view, m_arg, out,
        *q_view.stride(), *k_view.stride(), *v_view.stride(), *out.stride(), *ms,
        s, t, hq, hq // hkv, float(scale),
        HEAD_DIM=d, BLOCK_D=variant.block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_MASK=bool(variant.has_mask), CAUSAL=bool(causal),
        DOT_PRECISION="ieee" if dtype == "float32" else "tf32", UPCAST_DOT=dtype == "bfloat16",
        Part=None, Lse=None, CHUNK=0, SPLIT=False,
    )


def _run_interpreted_split(q_view, k_view, v_view, mask_t, out, *, b, hq, hkv, s, t, d, scale, causal,
                           dtype, block_m, block_n, splits):
    """The split-over-keys path: chunk partials into a workspace, then the combine kernel."""
    import torch

    kernel, combine = _interpreted_kernel(), _interpreted_kernel(fastertrt_attention_combine)
    nsplit, chunk = split_plan(t, block_n, splits)
    padded_d = block_d(d)
    part = torch.zeros((b * hq, nsplit, s, padded_d), dtype=torch.float32)
    lse = torch.zeros((b * hq, nsplit, s), dtype=torch.float32)
    ms = mask_strides(mask_t.shape, b, hq, s, t) if mask_t is not None else (0, 0, 0, 0)
    m_arg = mask_t if mask_t is not None else torch.zeros(1, dtype=torch.float32)
    kernel[(math.ceil(s / block_m), b * hq, nsplit)](
        q_view, k_view, v_view, m_arg, out,
        *q_view.stride(), *k_view.stride(), *v_view.stride(), *out.stride(), *ms,
        s, t, hq, hq // hkv, float(scale), part, lse, chunk,
        HEAD_DIM=d, BLOCK_D=padded_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_MASK=mask_t is not None, CAUSAL=bool(causal),
        DOT_PRECISION="ieee" if dtype == "float32" else "tf32", UPCAST_DOT=dtype == "bfloat16", SPLIT=True,
    )
    combine[(math.ceil(s / COMBINE_BLOCK_M), b * hq)](
        part, lse, out, *out.stride(), s, hq, nsplit, HEAD_DIM=d, BLOCK_D=padded_d, BLOCK_M=COMBINE_BLOCK_M)
    return nsplit


def _dtype_name(torch_dtype) -> str:
    return str(torch_dtype).removeprefix("torch.")


def attention_interpreted(q, k, v, mask=None, *, scale=None, causal=False, dtype="float32",
                          mask_dtype="float32", block_m=16, block_n=16, splits: int = 0):
    """Run the kernel on the CPU with Triton's interpreter; returns float32 numpy [B, Hq, S, D].

    q [B, Hq, S, D]; k, v [B, Hkv, T, D] (the full cache, past then new); mask additive,
    broadcastable to [B, Hq, S, T], or None. Inputs are rounded to `dtype` (the I/O type)
    and the mask to `mask_dtype`. Small tiles by default: the interpreter's cost grows
    with tile size, and small tiles exercise the multi-tile online softmax. splits > 0
    runs the split-over-keys kernel with about that many chunks, then the combine kernel."""
    import numpy as np
    import torch

    b, hq, s, d = q.shape
    _, hkv, t, _ = k.shape
    qt, kt, vt = (_to_torch(x, dtype) for x in (q, k, v))
    mask_t = _to_torch(mask, mask_dtype) if mask is not None else None
    out = torch.empty((b, hq, s, d), dtype=_torch_dtype(dtype))
    run = functools.partial(_run_interpreted_split, splits=splits) if splits else _run_interpreted
    run(qt, kt, vt, mask_t, out, b=b, hq=hq, hkv=hkv, s=s, t=t, d=d,
        scale=scale if scale is not None else 1.0 / math.sqrt(d), causal=causal,
        dtype=dtype, block_m=block_m, block_n=block_n)
    return out.to(torch.float32).numpy().astype(np.float32)


def attention_interpreted_packed(qkv, num_heads, kv_num_heads, mask=None, *, scale=None, causal=False,
                                 dtype="float32", mask_dtype="float32", block_m=16, block_n=16):
    """Packed-qkv entry: qkv [B, S, (Hq + 2*Hkv) * D] (no past). q, k and v are strided
    views of the one buffer, exactly as the plugin passes them to the cubin."""
    import numpy as np
    import torch

    b, s, width = qkv.shape
    if width % (num_heads + 2 * kv_num_heads):
        raise ValueError(f"packed qkv width {width} is not a multiple of Hq + 2*Hkv = "
                         f"{num_heads + 2 * kv_num_heads}")
    d = width // (num_heads + 2 * kv_num_heads)
    buf = _to_torch(qkv, dtype)
    q_view, k_view, v_view = packed_qkv_views(buf, num_heads, kv_num_heads, d)
    mask_t = _to_torch(mask, mask_dtype) if mask is not None else None
    out = torch.empty((b, num_heads, s, d), dtype=_torch_dtype(dtype))
    _run_interpreted(q_view, k_view, v_view, mask_t, out, b=b, hq=num_heads, hkv=kv_num_heads, s=s, t=s, d=d,
                     scale=scale if scale is not None else 1.0 / math.sqrt(d), causal=causal,
                     dtype=dtype, block_m=block_m, block_n=block_n)
    return out.to(torch.float32).numpy().astype(np.float32)


def packed_qkv_views(buf, num_heads: int, kv_num_heads: int, head_dim: int):
    """[B, H, S, D]-shaped strided views of a packed qkv torch tensor [B, S, (Hq+2Hkv)*D]:
    element offsets 0, Hq*D, (Hq+Hkv)*D; strides (S*W, D, W, 1) with W the row width."""
    b, s, width = buf.shape
    flat = buf.reshape(-1)

    def view(offset, heads):
        return flat.as_strided((b, heads, s, head_dim), (s * width, head_dim, width, 1), offset)

    return (view(0, num_heads), view(num_heads * head_dim, kv_num_heads),
            view((num_heads + kv_num_heads) * head_dim, kv_num_heads))
