"""The beam-step plugin's Triton kernels, compiled ahead of time to cubins.

One pass over the vocabulary, in two launches (launch.py plans them):

  fastertrt_beam_block  grid (N = B*K rows, vocab blocks). Each program loads its
      BLOCK_V logits once (FP16/BF16 upcast to FP32) and writes to the workspace
      the block's max m and sum(exp(x - m)) (the pieces of the row's log-sum-exp),
      and the block's top-KPAD of y = x + bias, sorted. log_softmax is a per-row
      shift, so within a row the order of the step scores is the order of y.
      Selection: a lower bound of the KPAD-th largest (from 2*KPAD strided group
      maxima) leaves a shortlist of a few KPAD keys, compacted through the
      workspace and ranked with one compare matrix (_block_top).
  fastertrt_beam_merge  grid (B,). Per batch row, ROWS beam rows at a time: each
      row's lse from its blocks' (m, sumexp); each block candidate becomes its
      score (y - lse_row) + beam_score_row with flat index j*V + v; a running set
      of the KPAD largest takes each candidate above its minimum; the set is
      ranked and the first k are written out.

Candidates travel as int64 keys: the high 32 bits are the score's bits mapped
to a signed integer of the same order, the low 32 bits 2^32 - 1 - index. So one
integer comparison orders by score, then by the lower index on equal scores
(ONNX TopK's rule), -inf scores included; padding is INT64_MIN, below every key.
No sorting networks: they unroll into large cubins that compile for seconds.

Triton is needed only to compile (`compile_kernels`) or to interpret
(`beam_step_interpreted`): importing this module does not import it. The
runtime never imports this module; it loads the cubins through launch.py.
Interpretation needs TRITON_INTERPRET=1 in the environment before triton is
first imported, and triton.compile fails in such a process, so compiling and
interpreting need two processes (the tests run the interpreted cases in a
subprocess).
"""

from __future__ import annotations  # keeps `tl.constexpr` annotations as strings until triton is loaded

import functools
from dataclasses import dataclass

from fastertrt.plugins import triton_aot
from fastertrt.plugins.beam_search.launch import (
    BLOCK_V,
    BLOCK_WARPS,
    FIELD_NAMES,
    K_CLASSES,
    MERGE_TILES,
    SHORTLIST,
    block_field,
    merge_field,
    plan_launch,
)
from fastertrt.plugins.cuda_launch import CompiledKernel, pack_kernels
from fastertrt.plugins.triton_aot import SHARED_LIMIT_KB  # noqa: F401 - part of this module's interface

LOGIT_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TARGETS = (80, 86, 89, 90)

__all__ = ["DEFAULT_TARGETS", "FIELD_NAMES", "LOGIT_DTYPES", "compile_kernels", "compile_block", "compile_merge",
           "BlockVariant", "MergeVariant", "beam_step_interpreted"]

_TRITON_TYPE = triton_aot.TRITON_TYPE

# Bound to triton.language by _triton() on first use; the kernels below look it
# up as a module global when Triton compiles or interprets them.
tl = None


# -----------------------------------------------------------------------------
# The kernels (plain Python until _triton() wraps them with triton.jit)
# -----------------------------------------------------------------------------
def _key_pack(score, index):
    """int64 keys that order as (score, then lower index): high word the score's
    bits as an order-preserving signed int, low word 2^32 - 1 - index.
    key = (ordered + 1) * 2^32 - (index + 1), written without 32-bit constants."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 and +0.0 are one score: equal keys up to the index
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    return ((ordered.to(tl.int64) + 1) << 32) - index.to(tl.int64) - 1


def _key_unpack(key):
    """(score float32, index int32) of keys made by _key_pack."""
    ordered = key >> 32
    index = ((ordered + 1) << 32) - key - 1
    ordered = ordered.to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), index.to(tl.int32)


def _sorted_top(cand, KPAD: tl.constexpr):
    """The KPAD largest of the keys `cand` (1-D, unique except INT64_MIN padding),
    sorted descending, INT64_MIN where there are fewer: each key's rank is the
    number of larger keys (one compare matrix, no sorting network), and output
    lane p takes the key of rank p."""
    MIN: tl.constexpr = -9223372036854775807 - 1
    rank = tl.sum((cand[None, :] > cand[:, None]).to(tl.int32), 1)
    return tl.max(tl.where(rank[None, :] == tl.arange(0, KPAD)[:, None], cand[None, :], MIN), 1)


def _block_top(key, ok, Scratch, N: tl.constexpr, KPAD: tl.constexpr, CAP: tl.constexpr):
    """The KPAD largest of N keys (valid where ok), sorted descending.

    The KPAD-th largest maximum of 2*KPAD strided groups is a lower bound t of the
    KPAD-th largest key (they are KPAD distinct keys), so the answer lies among the
    keys >= t: a shortlist, written compacted to Scratch (CAP slots) and
    read back for _sorted_top. A longer shortlist (adversarial data) falls back to
    KPAD rounds of max-and-remove over the whole block."""
    MIN: tl.constexpr = -9223372036854775807 - 1
    key = tl.where(ok, key, MIN)
    group_max = tl.max(tl.reshape(key, [N // (2 * KPAD), 2 * KPAD]), 0)  # group of element i: i % (2*KPAD)
    t = tl.min(_sorted_top(group_max, KPAD), 0)  # MIN when fewer than KPAD groups hold a valid key
    sel = ok & (key >= t)
    count = tl.sum(sel.to(tl.int32), 0)
    if count <= CAP:
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(Scratch + pos, key, mask=sel)
        tl.debug_barrier()  # the shortlist is read back by other threads of this program
        slots = tl.arange(0, CAP)
        best = _sorted_top(tl.load(Scratch + slots, mask=slots < count, other=MIN), KPAD)
    else:
        best = tl.full([KPAD], MIN, tl.int64)
        lanes = tl.arange(0, KPAD)
        for i in range(KPAD):
            top = tl.max(key, 0)
            best = tl.where(lanes == i, top, best)
            key = tl.where(key == top, MIN, key)  # keys are unique (the index is in them); MIN stays MIN
    return best


def fastertrt_beam_block(
    Logits, Bias, Keys, BlockMax, BlockSum, Scratch,
    V, NBLOCKS,
    BLOCK_V: tl.constexpr, KPAD: tl.constexpr, HAS_BIAS: tl.constexpr, SHORTLIST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    x = tl.load(Logits + row * V + cols, mask=ok, other=float("-inf")).to(tl.float32)
    # log-sum-exp pieces; a block of only -inf has max -inf and sum 0 (not NaN)
    top = tl.max(x, 0)
    top_use = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(x - top_use), 0)
    slot = row * NBLOCKS + blk
    tl.store(BlockMax + slot, top)
    tl.store(BlockSum + slot, total)
    y = x
    if HAS_BIAS:
        y = x + tl.load(Bias + cols, mask=ok, other=0.0)
    best = _block_top(_key_pack(y, cols), ok, Scratch + slot * SHORTLIST, BLOCK_V, KPAD, SHORTLIST)
    tl.store(Keys + slot * KPAD + tl.arange(0, KPAD), best)


def fastertrt_beam_merge(
    Keys, BlockMax, BlockSum, BeamScores, Scores, Tokens, Beams,
    V, K, NBLOCKS, TOPK,
    KPAD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, STAT_BLOCKS: tl.constexpr,
):
    MIN: tl.constexpr = -9223372036854775807 - 1
    b = tl.program_id(0).to(tl.int64)
    per_row = NBLOCKS * KPAD
    lanes = tl.arange(0, KPAD)
    best = tl.full([KPAD], MIN, tl.int64)  # the KPAD largest step keys so far, in no order
    kth = tl.min(best, 0)
    for r0 in range(0, K, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < K
        grow = b * K + rows  # global row b*K + j (int64)
        # the rows' log-sum-exp from their blocks: online over chunks of blocks
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        for c0 in range(0, NBLOCKS, STAT_BLOCKS):
            blks = c0 + tl.arange(0, STAT_BLOCKS)
            ok = row_ok[:, None] & (blks < NBLOCKS)[None, :]
            off = grow[:, None] * NBLOCKS + blks[None, :]
            bm = tl.load(BlockMax + off, mask=ok, other=float("-inf"))
            bs = tl.load(BlockSum + off, mask=ok, other=0.0)
            m_new = tl.maximum(m, tl.max(bm, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp(-inf - -inf) would be NaN
            s = s * tl.exp(m - m_use) + tl.sum(bs * tl.exp(bm - m_use[:, None]), 1)
            m = m_new
        # a row that is -inf everywhere (a dead beam) scores -inf, not NaN (-inf - -inf): it ranks
        # below every live candidate, lower flat index first (the reference gives NaN there)
        lse = tl.where(m == float("-inf"), 0.0, m + tl.log(s))
        beam = tl.load(BeamScores + grow, mask=row_ok, other=0.0)
        # the rows' block candidates, COLS at a time, as step keys (score, flat index j*V + v);
        # each one above the running KPAD-th replaces it (at most KPAD per chunk)
        for c0 in range(0, per_row, COLS):
            cols = c0 + tl.arange(0, COLS)
            ok = row_ok[:, None] & (cols < per_row)[None, :]
            key = tl.load(Keys + grow[:, None] * per_row + cols[None, :], mask=ok, other=MIN)
            y, tok = _key_unpack(key)
            score = (y - lse[:, None]) + beam[:, None]
            step = tl.where(key == MIN, key, _key_pack(score, rows[:, None] * V + tok))
            top = tl.max(tl.max(step, 1), 0)
            while top > kth:
                lane = tl.min(tl.where(best == kth, lanes, KPAD), 0)  # one lane holding the minimum
                best = tl.where(lanes == lane, top, best)
                kth = tl.min(best, 0)
                step = tl.where(step == top, MIN, step)
                top = tl.max(tl.max(step, 1), 0)
    score, flat = _key_unpack(_sorted_top(best, KPAD))
    keep = lanes < TOPK
    tl.store(Scores + b * TOPK + lanes, score, mask=keep)
    tl.store(Tokens + b * TOPK + lanes, flat % V, mask=keep)
    tl.store(Beams + b * TOPK + lanes, flat // V, mask=keep)


_HELPERS = {"_key_pack": _key_pack, "_key_unpack": _key_unpack, "_sorted_top": _sorted_top, "_block_top": _block_top}
_KERNELS = {"fastertrt_beam_block": fastertrt_beam_block, "fastertrt_beam_merge": fastertrt_beam_merge}


def _triton():
    """Import triton on first use, bind the module-global `tl` the kernels read and
    wrap the helpers they call with triton.jit (the kernels find them as globals)."""
    global tl
    triton = triton_aot.import_triton("the beam-step kernels")
    tl = triton.language
    for name, fn in _HELPERS.items():
        if globals()[name] is fn:
            globals()[name] = triton.jit(fn)
    return triton


@functools.lru_cache(maxsize=None)
def _jit_kernel(name: str):
    return triton_aot.jit_for_compile(_triton(), _KERNELS[name], "the beam-step kernels")


@functools.lru_cache(maxsize=None)
def _interpreted_kernel(name: str):
    return triton_aot.jit_for_interpreter(_triton(), _KERNELS[name], "beam_step_interpreted")


# -----------------------------------------------------------------------------
# Variants
# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockVariant:
    """The block kernel: logits type, bias or not, top-k size class."""

    dtype: str
    has_bias: int
    kpad: int

    def __post_init__(self):
        object.__setattr__(self, "has_bias", int(bool(self.has_bias)))
        object.__setattr__(self, "kpad", int(self.kpad))
        if self.dtype not in LOGIT_DTYPES:
            raise ValueError(f"beam-step logits dtype must be one of {LOGIT_DTYPES}, got {self.dtype!r}")
        if self.kpad not in K_CLASSES:
            raise ValueError(f"beam-step size class must be one of {K_CLASSES}, got {self.kpad}")

    def tag(self) -> str:
        return f"block_{self.dtype}_b{self.has_bias}_k{self.kpad}"


@dataclass(frozen=True)
class MergeVariant:
    """The merge kernel: only the size class (it reads FP32 workspace and beam scores)."""

    kpad: int

    def __post_init__(self):
        if int(self.kpad) not in K_CLASSES:
            raise ValueError(f"beam-step size class must be one of {K_CLASSES}, got {self.kpad}")

    def tag(self) -> str:
        return f"merge_k{self.kpad}"


# Register cap per thread of the block kernel: 64 lets four 256-thread programs share
# an SM (ptxas -v: no spills on sm_80/sm_90, 24 bytes on sm_86 at KPAD 8). None: the
# compiler's choice (KPAD 32 takes about 100, KPAD 64 about 190).
_BLOCK_MAXNREG = {8: 64, 16: 64, 32: None, 64: None}

# Pointers into the workspace (the launcher carves it on 256-byte boundaries) are
# marked 16-byte aligned: the merge kernel's candidate loads vectorize. The step's
# tensors get no hint: their loads and stores are indexed by run-time sizes (V, k)
# and could not vectorize anyway, and a TensorRT input may be an offset view.
_ALIGNED = 16
_WORKSPACE_POINTERS = ("Keys", "Scratch", "BlockMax", "BlockSum")


def _divisibility(name: str, type_: str) -> int:
    return _ALIGNED if name in _WORKSPACE_POINTERS else 0


def _block_signature(variant: BlockVariant):
    types = {"Logits": "*" + _TRITON_TYPE[variant.dtype], "Bias": "*fp32", "Keys": "*i64", "BlockMax": "*fp32",
             "BlockSum": "*fp32", "Scratch": "*i64", "V": "i32", "NBLOCKS": "i32"}
    constexprs = {"BLOCK_V": BLOCK_V[variant.kpad], "KPAD": variant.kpad, "HAS_BIAS": bool(variant.has_bias),
                  "SHORTLIST": SHORTLIST[variant.kpad]}
    if not variant.has_bias:
        constexprs["Bias"] = None
    return triton_aot.signature_and_layout(fastertrt_beam_block, types, constexprs, _divisibility)


def _merge_signature(variant: MergeVariant):
    tile = MERGE_TILES[variant.kpad]
    types = {"Keys": "*i64", "BlockMax": "*fp32", "BlockSum": "*fp32", "BeamScores": "*fp32", "Scores": "*fp32",
             "Tokens": "*i32", "Beams": "*i32", "V": "i32", "K": "i32", "NBLOCKS": "i32", "TOPK": "i32"}
    constexprs = {"KPAD": variant.kpad, "ROWS": tile.rows, "COLS": tile.cols, "STAT_BLOCKS": tile.stat_blocks}
    return triton_aot.signature_and_layout(fastertrt_beam_merge, types, constexprs, _divisibility)


_compiled: dict[tuple, CompiledKernel] = {}  # in-process cache


def compile_block(variant: BlockVariant, cc: int) -> CompiledKernel:
    return triton_aot.cached_compile(_compiled, _compile, variant, cc)


def compile_merge(variant: MergeVariant, cc: int) -> CompiledKernel:
    return triton_aot.cached_compile(_compiled, _compile, variant, cc)


def _compile(variant, cc: int) -> CompiledKernel:
    triton = _triton()
    if isinstance(variant, BlockVariant):
        kernel = _jit_kernel("fastertrt_beam_block")
        signature, constexprs, attrs, layout = _block_signature(variant)
        num_warps, block_m, block_n = BLOCK_WARPS[variant.kpad], variant.kpad, BLOCK_V[variant.kpad]
        maxnreg = _BLOCK_MAXNREG[variant.kpad]
        extra = {"dtype": variant.dtype, "has_bias": variant.has_bias, "block_v": BLOCK_V[variant.kpad],
                 "shortlist": SHORTLIST[variant.kpad], "maxnreg": maxnreg or 0}
    else:
        tile = MERGE_TILES[variant.kpad]
        kernel = _jit_kernel("fastertrt_beam_merge")
        signature, constexprs, attrs, layout = _merge_signature(variant)
        num_warps, block_m, block_n, maxnreg = tile.num_warps, variant.kpad, tile.cols, None
        extra = {"rows": tile.rows, "cols": tile.cols, "stat_blocks": tile.stat_blocks}
    return triton_aot.compile_to_kernel(
        triton, kernel, signature, constexprs, attrs, layout, cc, num_warps=num_warps, num_stages=1,
        maxnreg=maxnreg, block_m=block_m, block_n=block_n, label=f"beam-step {variant.tag()}",
        tags={"variant": variant.tag(), "kpad": variant.kpad, **extra},
    )


def compile_kernels(logits_dtype: str, has_bias: bool, targets=None, jobs: int = 1) -> dict[str, bytes]:
    """Every cubin a beam-step plugin with these logits and bias needs, for `targets`
    (default DEFAULT_TARGETS): {plugin field name: cuda_launch.pack_kernels blob},
    one block and one merge field per size class (FIELD_NAMES), about 100 KB a
    target. 8 kernels a target, about 1 s each with a cold Triton cache; jobs > 1
    compiles in that many spawned processes (needs an importable __main__)."""
    targets = tuple(int(cc) for cc in (targets or DEFAULT_TARGETS))
    variants = {}
    for kpad in K_CLASSES:
        variants[block_field(kpad)] = BlockVariant(logits_dtype, has_bias, kpad)
        variants[merge_field(kpad)] = MergeVariant(kpad)
    triton_aot.compile_all(_compiled, _compile, [(v, cc) for v in variants.values() for cc in targets], jobs)
    return {field: pack_kernels({cc: _compiled[(v, cc)] for cc in targets}) for field, v in variants.items()}


# -----------------------------------------------------------------------------
# Interpreted run on the CPU (same kernel source, same launch plan)
# -----------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _logits_tensor(logits, logits_dtype: str | None):
    """A contiguous torch CPU tensor of the logits, in `logits_dtype` when given
    (float32 numpy -> bfloat16 by way of torch: numpy has no bfloat16)."""
    import numpy as np
    import torch

    if isinstance(logits, torch.Tensor):
        t = logits.detach().cpu()
    else:
        arr = np.asarray(logits)
        t = torch.from_numpy(np.ascontiguousarray(arr if arr.dtype in (np.float16, np.float32)
                                                  else arr.astype(np.float32)))
    if logits_dtype is not None:
        t = t.to(_torch_dtype(logits_dtype))
    name = str(t.dtype).removeprefix("torch.")
    if name not in LOGIT_DTYPES:
        raise ValueError(f"beam-step logits must be one of {LOGIT_DTYPES}, got {name}")
    return t.contiguous(), name


def beam_step_interpreted(logits, beam_scores, bias=None, candidates: int = 2, *, logits_dtype: str | None = None,
                          block_v: int | None = None):
    """Run the two kernels on the CPU with Triton's interpreter; returns numpy
    (scores [B, k] float32, tokens [B, k] int32, beams [B, k] int32), k = candidates * K.

    logits [B*K, V]: float32 or float16 numpy, or a torch tensor (bfloat16 too); with
    logits_dtype they are rounded to that type first. block_v: the block kernel's
    vocabulary block (default: the compiled one; small ones make several blocks of
    a small vocabulary). The workspace is one byte buffer carved by launch.py's plan."""
    import numpy as np
    import torch

    x, _ = _logits_tensor(logits, logits_dtype)
    scores_in = torch.from_numpy(np.ascontiguousarray(beam_scores, dtype=np.float32))
    b, k_beams = scores_in.shape
    n, v = x.shape
    if n != b * k_beams:
        raise ValueError(f"logits have {n} rows; beam_scores {tuple(scores_in.shape)} needs {b * k_beams}")
    k = int(candidates) * k_beams
    plan = plan_launch(b, k_beams, v, k, has_bias=bias is not None, block_v=block_v)
    tile = MERGE_TILES[plan.kpad]
    workspace = torch.zeros(plan.layout.total, dtype=torch.uint8)
    views = {"Keys": (plan.layout.keys, torch.int64), "Scratch": (plan.layout.scratch, torch.int64),
             "BlockMax": (plan.layout.block_max, torch.float32), "BlockSum": (plan.layout.block_sum, torch.float32)}
    slots = b * k_beams * plan.nblocks
    sizes = {"Keys": slots * plan.kpad * 8, "Scratch": slots * SHORTLIST[plan.kpad] * 8, "BlockMax": slots * 4,
             "BlockSum": slots * 4}
    scores = torch.empty((b, k), dtype=torch.float32)
    tokens = torch.empty((b, k), dtype=torch.int32)
    beams = torch.empty((b, k), dtype=torch.int32)
    tensors = {"logits": x, "beam_scores": scores_in, "scores": scores, "tokens": tokens, "beams": beams,
               "bias": torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)) if bias is not None else None}

    def args(plan_args):
        out = {}
        for name, value in plan_args.items():
            if name in views:  # the interpreter needs typed tensors: views of the one workspace buffer
                offset, tdtype = views[name]
                assert value == ("workspace", offset)
                out[name] = workspace[offset:offset + sizes[name]].view(tdtype)
            elif isinstance(value, tuple):
                out[name] = tensors[value[0]]
            else:
                out[name] = value
        return out

    if b == 0:
        return scores.numpy(), tokens.numpy(), beams.numpy()
    block_args = args(plan.block_args)
    if bias is None:
        block_args["Bias"] = None
    with np.errstate(divide="ignore"):  # log(0) of rows without a finite logit (not used), as on the GPU
        _interpreted_kernel("fastertrt_beam_block")[plan.block_grid[:2]](
            **block_args, BLOCK_V=plan.block_v, KPAD=plan.kpad, HAS_BIAS=bias is not None,
            SHORTLIST=SHORTLIST[plan.kpad])
        _interpreted_kernel("fastertrt_beam_merge")[plan.merge_grid[:1]](
            **args(plan.merge_args), KPAD=plan.kpad, ROWS=tile.rows, COLS=tile.cols, STAT_BLOCKS=tile.stat_blocks)
    return scores.numpy(), tokens.numpy(), beams.numpy()
