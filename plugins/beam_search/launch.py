"""Runtime side of the beam-step kernels: size classes, workspace layout, the
launch plan (grids and arguments by name) and the launch itself. The TensorRT
plugin's enqueue and tools/gpu_beam_check.py call beam_step_launch; the
interpreted run in kernels.py follows the same plan with torch CPU tensors.

Two kernels per step (kernels.py has their code):

    block  grid (N rows, ceil(V / BLOCK_V)): each program reads its BLOCK_V logits
           once; writes the block's max and sum(exp(x - max)) and the block's
           top-KPAD of (x + bias) as packed int64 keys
    merge  grid (B,): per batch row, each beam row's log-sum-exp from its blocks'
           (max, sumexp), then every block candidate turned into its step score
           (x + bias - lse_row + beam_score_row) and merged into the top-k

k = candidates * K is a run-time value (K is a run-time dimension): the kernels
come in size classes KPAD = 8, 16, 32, 64 (k padded up) and the launch picks one.

Imports only the standard library, fastertrt.errors and the shared cubin
launcher (never triton, torch or numpy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fastertrt.plugins.cuda_launch import (
    CompiledKernel,
    KernelLaunchError,
    current_compute_capability,
    launch,
    select_kernel,
)

__all__ = ["K_CLASSES", "MAX_K", "BLOCK_V", "MergeTile", "MERGE_TILES", "block_field", "merge_field", "FIELD_NAMES",
           "SHORTLIST", "k_class", "num_blocks", "WorkspaceLayout", "workspace_layout", "workspace_bytes", "LaunchPlan",
           "plan_launch", "resolve", "beam_step_launch", "KernelLaunchError"]

MAX_K = 64                       # spec.MAX_CANDIDATES: candidates * K per batch row
K_CLASSES = (8, 16, 32, 64)      # KPAD: the top-k width a cubin is compiled for
# Vocabulary block of the block kernel, per class: V = 49152 is 12 blocks of 4096,
# 50257 13; batch 8 x beams 4 gives 384-416 programs of 8 warps, one wave on an
# H100 at four programs per SM (kernels.py caps KPAD 8/16 at 64 registers, no
# spills). KPAD 64 ranks 128-key shortlists (about 190 registers a thread, one
# program per SM) and takes 8192 so that the merge has half the candidates.
BLOCK_V = {8: 4096, 16: 4096, 32: 4096, 64: 8192}
BLOCK_WARPS = {8: 8, 16: 8, 32: 8, 64: 8}
# The block kernel's shortlist: the keys at or above the KPAD-th largest of 2*KPAD
# strided group maxima (a lower bound of the block's KPAD-th key), at most
# SHORTLIST[KPAD] of them. With i.i.d. logits it holds about 1.35*KPAD keys, in
# 99.9% of blocks under 2.5*KPAD (KPAD 8) to 1.7*KPAD (KPAD 64); a longer one falls
# back to KPAD rounds of max-and-remove over the block (right, slower).
SHORTLIST = {8: 32, 16: 64, 32: 64, 64: 128}
_ALIGN = 256  # workspace sub-buffers start on 256 bytes (the cubins assume 16)


@dataclass(frozen=True)
class MergeTile:
    """The merge kernel's tiles: ROWS beam rows at a time (loops when K > ROWS),
    COLS block candidates per row and step, STAT_BLOCKS (max, sumexp) pairs per
    row and step; num_warps for the cubin."""

    rows: int
    cols: int
    stat_blocks: int
    num_warps: int


# COLS covers a row's candidates (nblocks * KPAD) at V = 50257 in one step
MERGE_TILES = {
    8: MergeTile(rows=4, cols=128, stat_blocks=64, num_warps=4),
    16: MergeTile(rows=4, cols=256, stat_blocks=64, num_warps=4),
    32: MergeTile(rows=4, cols=256, stat_blocks=64, num_warps=4),
    64: MergeTile(rows=4, cols=512, stat_blocks=64, num_warps=8),
}


def block_field(kpad: int) -> str:
    return f"kernels_block_k{kpad}"


def merge_field(kpad: int) -> str:
    return f"kernels_merge_k{kpad}"


# every plugin field a beam-step plugin may carry (the TensorRT creator declares them)
FIELD_NAMES = tuple(name for kpad in K_CLASSES for name in (block_field(kpad), merge_field(kpad)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def k_class(k: int) -> int:
    """The smallest size class that holds a top-k of width k."""
    k = int(k)
    for kpad in K_CLASSES:
        if 1 <= k <= kpad:
            return kpad
    raise KernelLaunchError(f"beam step: top-k width {k} (candidates * beams) is outside 1..{MAX_K}")


def num_blocks(vocab: int, kpad: int, block_v: int | None = None) -> int:
    return _cdiv(int(vocab), int(block_v or BLOCK_V[kpad]))


def _align(n: int) -> int:
    return _cdiv(n, _ALIGN) * _ALIGN


@dataclass(frozen=True)
class WorkspaceLayout:
    """Byte offsets in the workspace: block candidates (int64 keys [N, nblocks, KPAD]),
    the block kernel's shortlists (int64 [N, nblocks, SHORTLIST[KPAD]]), block maxima
    and block sums of exp (float32 [N, nblocks] each); total bytes."""

    keys: int
    scratch: int
    block_max: int
    block_sum: int
    total: int


def workspace_layout(rows: int, vocab: int, kpad: int, block_v: int | None = None) -> WorkspaceLayout:
    slots = int(rows) * num_blocks(vocab, kpad, block_v)
    scratch = _align(slots * kpad * 8)
    block_max = scratch + _align(slots * SHORTLIST[kpad] * 8)
    block_sum = block_max + _align(slots * 4)
    return WorkspaceLayout(0, scratch, block_max, block_sum, block_sum + _align(slots * 4))


def workspace_bytes(max_rows: int, vocab: int, max_k: int) -> int:
    """The largest workspace any launch with rows (batch * beams) <= max_rows and
    k <= max_k needs for this vocabulary (the plugin's getWorkspaceSize)."""
    top = k_class(min(max(int(max_k), 1), MAX_K))
    return max(workspace_layout(max(int(max_rows), 0), vocab, kpad).total for kpad in K_CLASSES if kpad <= top)


@dataclass(frozen=True)
class LaunchPlan:
    """Both launches of one step, arguments by cubin parameter name. Pointer
    arguments are (tensor name, byte offset) pairs: offsets into the workspace for
    Keys/Scratch/BlockMax/BlockSum, 0 into the step's tensors for the rest;
    resolve() makes them addresses."""

    kpad: int
    block_v: int
    nblocks: int
    block_grid: tuple[int, int, int]
    merge_grid: tuple[int, int, int]
    block_args: dict
    merge_args: dict
    layout: WorkspaceLayout


@functools.lru_cache(maxsize=256)
def plan_launch(batch: int, num_beams: int, vocab: int, k: int, has_bias: bool,
                block_v: int | None = None) -> LaunchPlan:
    """Grids and scalar arguments of a step (validated); pointers are left symbolic.
    Cached: the plugin's enqueue plans every decode step with the same few shapes
    (the plan's dicts are shared, never modify them)."""
    batch, num_beams, vocab, k = int(batch), int(num_beams), int(vocab), int(k)
    if num_beams < 1 or vocab < 1 or batch < 0:
        raise KernelLaunchError(f"beam step: batch {batch}, beams {num_beams}, vocab {vocab}: beams and vocab "
                                f"must be at least 1")
    kpad = k_class(k)
    if k > num_beams * vocab:
        raise KernelLaunchError(f"beam step: cannot take the top {k} of {num_beams} x {vocab} scores")
    if num_beams * vocab >= 2**31:
        raise KernelLaunchError(f"beam step: beams x vocab = {num_beams * vocab} does not fit the int32 flat index")
    block_v = int(block_v or BLOCK_V[kpad])
    if block_v < 2 * kpad or block_v & (block_v - 1):
        raise KernelLaunchError(f"beam step: vocab block {block_v} must be a power of two >= {2 * kpad}")
    rows = batch * num_beams
    nblocks = num_blocks(vocab, kpad, block_v)
    if nblocks > 65535:
        raise KernelLaunchError(f"beam step: vocabulary {vocab} needs {nblocks} blocks of {block_v}; the grid "
                                f"allows 65535")
    layout = workspace_layout(rows, vocab, kpad, block_v)
    ws = {"Keys": ("workspace", layout.keys), "BlockMax": ("workspace", layout.block_max),
          "BlockSum": ("workspace", layout.block_sum)}
    block_args = {"Logits": ("logits", 0), **ws, "Scratch": ("workspace", layout.scratch), "V": vocab,
                  "NBLOCKS": nblocks}
    if has_bias:
        block_args["Bias"] = ("bias", 0)
    merge_args = {**ws, "BeamScores": ("beam_scores", 0), "Scores": ("scores", 0), "Tokens": ("tokens", 0),
                  "Beams": ("beams", 0), "V": vocab, "K": num_beams, "NBLOCKS": nblocks, "TOPK": k}
    return LaunchPlan(kpad, block_v, nblocks, (rows, nblocks, 1), (batch, 1, 1), block_args, merge_args, layout)


def resolve(args: dict, tensors: dict) -> dict:
    """Arguments with each (tensor name, byte offset) pointer replaced by tensors[name] + offset."""
    return {name: (tensors[v[0]] + v[1] if isinstance(v, tuple) else v) for name, v in args.items()}


def _kernel(kernels: dict, field: str, cc: int, what: str) -> CompiledKernel:
    by_cc = kernels.get(field)
    if not by_cc:
        have = ", ".join(sorted(kernels)) or "none"
        raise KernelLaunchError(f"beam step: the plugin carries no {field!r} kernels (it has: {have}); rebuild the "
                                f"engine with this fastertrt")
    return select_kernel(by_cc, cc, what)


def beam_step_launch(kernels: dict[str, dict[int, CompiledKernel]], cc: int | None = None, *, logits: int,
                     logits_dtype: str, beam_scores: int, bias: int, scores: int, tokens: int, beams: int,
                     workspace: int, batch: int, num_beams: int, vocab: int, k: int, stream: int) -> None:
    """One beam-search step on device pointers (ints): logits [B*K, V] (logits_dtype),
    beam_scores [B, K] fp32, bias [V] fp32 or 0 when the plugin has none; outputs
    scores [B, k] fp32, tokens and beams [B, k] int32; workspace of at least
    workspace_bytes(B*K, V, k) bytes, 16-byte aligned (256 is what TensorRT gives).
    kernels: {plugin field name: {cc: CompiledKernel}}; cc None: the current device's.
    Two launches on `stream` (an int CUstream handle)."""
    plan = plan_launch(int(batch), int(num_beams), int(vocab), int(k), bool(bias))
    cc = int(cc) if cc is not None else current_compute_capability()
    block = _kernel(kernels, block_field(plan.kpad), cc, f"beam-step block (k{plan.kpad})")
    merge = _kernel(kernels, merge_field(plan.kpad), cc, f"beam-step merge (k{plan.kpad})")
    tags = block.tags
    if tags.get("dtype") != logits_dtype:
        raise KernelLaunchError(f"beam step: logits are {logits_dtype} but the plugin's block kernel was compiled "
                                f"for {tags.get('dtype')}")
    if bool(tags.get("has_bias")) != bool(bias):
        raise KernelLaunchError("beam step: " + ("the kernel adds a bias but no bias pointer was given"
                                                 if tags.get("has_bias") else
                                                 "a bias pointer was given to a kernel compiled without bias"))
    layout_ok = (int(tags.get("block_v", -1)) == plan.block_v
                 and int(tags.get("shortlist", -1)) == SHORTLIST[plan.kpad])
    for kernel in (block, merge):
        if int(kernel.tags.get("kpad", -1)) != plan.kpad or not layout_ok:
            raise KernelLaunchError(f"beam step: kernel {kernel.tags.get('variant')} does not match this "
                                    f"fastertrt's size class k{plan.kpad} (vocab block {plan.block_v}, shortlist "
                                    f"{SHORTLIST[plan.kpad]}: the workspace layout depends on them); rebuild the "
                                    f"engine with this fastertrt")
    if plan.block_grid[0] == 0:
        return  # batch 0: nothing to compute (a zero-sized grid is a CUDA error)
    if not workspace:
        raise KernelLaunchError("beam step: no workspace (the plugin must ask for workspace_bytes)")
    tensors = {"logits": logits, "bias": bias, "beam_scores": beam_scores, "scores": scores, "tokens": tokens,
               "beams": beams, "workspace": workspace}
    launch(block, plan.block_grid, resolve(plan.block_args, tensors), stream)
    launch(merge, plan.merge_grid, resolve(plan.merge_args, tensors), stream)
