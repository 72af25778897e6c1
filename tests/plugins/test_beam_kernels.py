"""The beam-step plugin's Triton kernels: numbers (Triton's CPU interpreter, against
the numpy reference), ahead-of-time cubins for every field, and the launcher's
checks that need no GPU.

The interpreted cases all run in one subprocess (this file run as a script; see
kernel_harness.py) and the tests here compare its outputs.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from fastertrt.plugins.beam_search.reference import beam_step_numpy
from fastertrt.tests.plugins import kernel_harness
from fastertrt.tolerances import tolerance

ATOL = tolerance("kernel", "fp32").atol  # scores are FP32 math on inputs already rounded to the logits type


# -----------------------------------------------------------------------------
# Cases
# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    beams: int = 2
    vocab: int = 1000
    candidates: int = 2
    dtype: str = "float32"
    bias: str = "none"      # none | random | ninf (random, some entries -inf) | force3 (-inf but 3 tokens)
    special: str = "none"   # none | few_finite | ties | shortlist_overflow | flat | dead_beam | quantized
    block_v: int | None = 256  # small blocks: several per row of a small vocabulary; None: the compiled one

    @property
    def k(self) -> int:
        return self.candidates * self.beams


CASES = {c.name: c for c in [
    Case("greedy_fp32", b=3, beams=1, candidates=1),
    Case("k1_c2_fp16", b=2, beams=1, candidates=2, dtype="float16", vocab=700),
    Case("k2_c2_fp16_bias", beams=2, candidates=2, dtype="float16", bias="random"),
    Case("k4_c2_bf16_ninf", b=3, beams=4, candidates=2, dtype="bfloat16", bias="ninf", vocab=900),
    Case("k4_c4_fp32_bias", beams=4, candidates=4, bias="random", vocab=800),            # k 16
    Case("k8_c2_fp16", b=2, beams=8, candidates=2, dtype="float16", vocab=500),          # k 16, two row groups
    Case("k8_c4_bf16", b=2, beams=8, candidates=4, dtype="bfloat16", vocab=600, block_v=128),  # k 32
    Case("k8_c8_fp32", b=1, beams=8, candidates=8, vocab=300, block_v=128),             # k 64
    Case("vocab_under_one_block", beams=2, candidates=2, vocab=50, block_v=None),
    Case("vocab_8", b=2, beams=2, candidates=4, vocab=8, block_v=None),                 # fewer than KPAD per row
    Case("few_finite_k1", b=2, beams=1, candidates=4, special="few_finite"),
    Case("few_finite_beams", b=2, beams=2, candidates=4, special="few_finite", dtype="float16"),
    Case("force3_bias", b=2, beams=2, candidates=2, bias="force3", dtype="float16"),
    Case("ties_fp16", b=2, beams=2, candidates=2, special="ties", dtype="float16"),
    Case("ties_k4_c4", b=1, beams=4, candidates=4, special="ties", vocab=600),
    Case("flat_rows", b=1, beams=2, candidates=4, special="flat"),
    Case("dead_beam_bf16", b=2, beams=2, candidates=2, special="dead_beam", dtype="bfloat16"),
    Case("shortlist_overflow", b=1, beams=1, candidates=4, vocab=2000, special="shortlist_overflow",
         block_v=1024),
    Case("vocab_50257_fp16_bias", b=1, beams=2, candidates=2, dtype="float16", bias="ninf", vocab=50257,
         block_v=None),
    Case("vocab_49152_bf16_b2", b=2, beams=4, candidates=2, dtype="bfloat16", vocab=49152, block_v=None),
    Case("quantized_fp16", b=2, beams=4, candidates=2, dtype="float16", vocab=900, special="quantized"),
    Case("quantized_k32_bias", b=1, beams=8, candidates=4, vocab=400, special="quantized", bias="random",
         block_v=128),
]}


def _fuzz_cases(n: int = 8) -> list[Case]:
    """A fixed draw of shapes, types and blocks around the hand-made cases."""
    rng = np.random.default_rng(1234)
    out = []
    for i in range(n):
        beams = int(rng.choice([1, 2, 3, 4, 5, 8]))
        candidates = int(rng.choice([c for c in (1, 2, 3, 4) if c * beams <= 64]))
        kpad = next(c for c in (8, 16, 32, 64) if c >= candidates * beams)
        block_v = int(rng.choice([b for b in (64, 128, 256, 512) if b >= 2 * kpad]))
        out.append(Case(f"fuzz{i}", b=int(rng.integers(1, 4)), beams=beams, candidates=candidates,
                        vocab=int(rng.integers(max(3, candidates), 1500)),
                        dtype=str(rng.choice(["float32", "float16", "bfloat16"])),
                        bias=str(rng.choice(["none", "random", "ninf"])),
                        special=str(rng.choice(["none", "quantized"])), block_v=block_v))
    return out


CASES.update({c.name: c for c in _fuzz_cases()})


def case_inputs(case: Case) -> dict:
    """Deterministic inputs, the logits already rounded to the case's type."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))  # stable across processes, unlike hash()
    n, v = case.b * case.beams, case.vocab
    logits = rng.standard_normal((n, v)).astype(np.float32) * 2.0
    beam_scores = -rng.random((case.b, case.beams)).astype(np.float32) * 3.0
    if case.special == "few_finite":
        # batch row 0: every beam keeps only 3 tokens (k > the finite count: -inf scores
        # fill the rest, lower flat index first)
        for j in range(case.beams):
            keep = rng.choice(v, 3, replace=False)
            row = np.full(v, -np.inf, np.float32)
            row[keep] = logits[j, keep]
            logits[j] = row
    elif case.special == "ties":
        # equal logits inside a row (across vocab blocks) and identical beams with equal
        # beam scores: equal step scores, which must come lower flat index first
        top = float(logits.max()) + 1.0
        for row in range(n):
            logits[row, [3, 300, 301, v - 1]] = top
            logits[row, [10, 550]] = top - 0.5
        for b in range(case.b):
            logits[b * case.beams + 1] = logits[b * case.beams]
            beam_scores[b, :] = beam_scores[b, 0]
    elif case.special == "quantized":
        logits = np.round(logits * 2.0) / 4.0  # a coarse grid: many exact ties inside every row
    elif case.special == "dead_beam":
        logits[1] = -np.inf  # batch row 0, beam 1: no finite logit (its log_softmax is NaN in the reference)
    elif case.special == "flat":
        logits[:] = 0.25  # every token ties: the top-k are the lowest flat indices
        beam_scores[:] = -1.0
    elif case.special == "shortlist_overflow":
        # every 16th token far above the rest: the strided groups' bound is loose, the
        # shortlist overflows and the block kernel takes its max-and-remove fallback
        logits[:, ::16] += 8.0
    logits = kernel_harness.round_to(logits, case.dtype)
    bias = None
    if case.bias != "none":
        bias = rng.standard_normal(v).astype(np.float32)
        if case.bias == "ninf":
            bias[rng.random(v) < 0.3] = -np.inf
        elif case.bias == "force3":
            bias[:] = -np.inf
            bias[[5, 17, v - 2]] = 0.0
    return {"logits": logits, "beam_scores": beam_scores, "bias": bias}


# -----------------------------------------------------------------------------
# The interpreted run (subprocess)
# -----------------------------------------------------------------------------
def _interpret(case: Case) -> dict[str, np.ndarray]:
    """One case through the kernels in Triton's interpreter (TRITON_INTERPRET=1 set)."""
    from fastertrt.plugins.beam_search import kernels

    x = case_inputs(case)
    logits = x["logits"].astype(np.float16) if case.dtype == "float16" else x["logits"]
    if case.dtype == "bfloat16":
        import torch

        logits = torch.from_numpy(x["logits"]).to(torch.bfloat16)  # exact: the values are bf16 already
    start = time.perf_counter()
    scores, tokens, beams = kernels.beam_step_interpreted(logits, x["beam_scores"], x["bias"], case.candidates,
                                                          block_v=case.block_v)
    return {f"{case.name}.scores": scores, f"{case.name}.tokens": tokens, f"{case.name}.beams": beams,
            f"{case.name}.seconds": np.float64(time.perf_counter() - start)}


interpreted = kernel_harness.interpreted_fixture(__file__, CASES, "beam_interp")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_matches_reference(interpreted, name):
    case = CASES[name]
    x = case_inputs(case)
    scores, tokens, beams = (interpreted[f"{name}.{part}"] for part in ("scores", "tokens", "beams"))
    with np.errstate(invalid="ignore"):  # the dead beam's log_softmax is NaN in the reference
        want_scores, want_tokens, want_beams = beam_step_numpy(x["logits"], x["beam_scores"], x["bias"],
                                                               case.candidates)
    assert scores.shape == tokens.shape == beams.shape == (case.b, case.k)
    assert scores.dtype == np.float32 and tokens.dtype == np.int32 and beams.dtype == np.int32
    np.testing.assert_array_equal(beams, want_beams)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=ATOL)  # -inf where the reference has -inf
    assert not np.isnan(scores).any()


def test_scores_are_sorted_with_lower_flat_index_first_on_ties(interpreted):
    for name in ("ties_fp16", "ties_k4_c4", "flat_rows", "few_finite_k1"):
        case = CASES[name]
        scores = interpreted[f"{name}.scores"]
        flat = interpreted[f"{name}.beams"].astype(np.int64) * case.vocab + interpreted[f"{name}.tokens"]
        assert (np.diff(scores, axis=1) <= 0).all(), name
        tied = np.diff(scores, axis=1) == 0
        assert (np.diff(flat, axis=1)[tied] > 0).all(), name
    # the hand-made ties: four equal top tokens in beam 0, then the same four in beam 1
    np.testing.assert_array_equal(interpreted["ties_fp16.tokens"][0], [3, 300, 301, 999])
    np.testing.assert_array_equal(interpreted["ties_fp16.beams"][0], [0, 0, 0, 0])
    np.testing.assert_array_equal(interpreted["flat_rows.tokens"][0], np.arange(8))


def test_infinite_scores_fill_in_index_order(interpreted):
    """Batch row 0 of few_finite_k1 has 3 finite tokens and k = 4: the fourth is the
    lowest-index -inf token."""
    x = case_inputs(CASES["few_finite_k1"])
    scores, tokens = interpreted["few_finite_k1.scores"][0], interpreted["few_finite_k1.tokens"][0]
    assert np.isfinite(scores[:3]).all() and scores[3] == -np.inf
    assert tokens[3] == int(np.flatnonzero(np.isneginf(x["logits"][0]))[0])


def test_a_dead_beam_gives_no_nan(interpreted):
    """A beam row with no finite logit scores -inf (the reference's NaN would poison
    the search): batch row 0's candidates all come from beam 0."""
    assert (interpreted["dead_beam_bf16.beams"][0] == 0).all()
    assert np.isfinite(interpreted["dead_beam_bf16.scores"]).all()


def test_shortlist_overflow_case_overflows():
    """The fallback case does what it says: the shortlist of its first block is
    longer than the kernel keeps (mirror of _block_top in numpy)."""
    from fastertrt.plugins.beam_search.launch import SHORTLIST, k_class

    case = CASES["shortlist_overflow"]
    kpad = k_class(case.k)
    y = case_inputs(case)["logits"][0, :case.block_v].astype(np.float64)
    order = np.argsort(-y, kind="stable")  # key order: higher score, then lower index
    rank = np.empty(len(y), np.int64)
    rank[order] = np.arange(len(y))  # smaller rank = larger key
    group_best = np.sort(rank.reshape(-1, 2 * kpad).min(axis=0))
    threshold = group_best[kpad - 1]
    assert (rank <= threshold).sum() > SHORTLIST[kpad]


def test_bfloat16_rounding_is_the_inputs_own():
    """The bf16 cases feed values bf16 holds exactly (so the reference sees what the kernel sees)."""
    x = case_inputs(CASES["k4_c2_bf16_ninf"])["logits"]
    np.testing.assert_array_equal(kernel_harness.round_to(x, "bfloat16"), x)


# -----------------------------------------------------------------------------
# Ahead-of-time compile (no GPU)
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_bias_blobs():
    from fastertrt.plugins.beam_search.kernels import DEFAULT_TARGETS, compile_kernels

    start = time.perf_counter()
    blobs = compile_kernels("float16", True, DEFAULT_TARGETS, jobs=os.cpu_count() or 1)
    print(f"compiled {len(blobs)} fields x {len(DEFAULT_TARGETS)} targets in {time.perf_counter() - start:.1f} s, "
          f"{sum(map(len, blobs.values())) // 1024} KB")
    return blobs


def test_compile_kernels_gives_every_field_for_every_target(fp16_bias_blobs):
    from fastertrt.plugins.beam_search.kernels import DEFAULT_TARGETS, FIELD_NAMES
    from fastertrt.plugins.beam_search.launch import (
        BLOCK_V,
        K_CLASSES,
        MERGE_TILES,
        SHORTLIST,
        block_field,
        merge_field,
    )
    from fastertrt.plugins.cuda_launch import unpack_kernels

    assert tuple(fp16_bias_blobs) == FIELD_NAMES
    assert all(name.startswith("kernels") for name in FIELD_NAMES)
    for kpad in K_CLASSES:
        block = unpack_kernels(fp16_bias_blobs[block_field(kpad)])
        merge = unpack_kernels(fp16_bias_blobs[merge_field(kpad)])
        assert sorted(block) == sorted(merge) == sorted(DEFAULT_TARGETS)
        for cc in DEFAULT_TARGETS:
            for kernel in (block[cc], merge[cc]):
                kernel_harness.check_cubin(kernel, cc)
                assert int(kernel.tags["kpad"]) == kpad
                # only the workspace's pointers carry an alignment hint (the launcher makes it true)
                assert {a.name for a in kernel.args if a.divisibility} <= {"Keys", "Scratch", "BlockMax", "BlockSum"}
                assert all(a.divisibility == 16 for a in kernel.args if a.name in ("Keys", "BlockMax"))
            assert [a.name for a in block[cc].args] == ["Logits", "Bias", "Keys", "BlockMax", "BlockSum", "Scratch",
                                                        "V", "NBLOCKS"]
            assert block[cc].tags["dtype"] == "float16" and block[cc].tags["has_bias"] == 1
            assert block[cc].tags["block_v"] == BLOCK_V[kpad] and block[cc].block_threads == 256
            assert block[cc].tags["shortlist"] == SHORTLIST[kpad]
            assert [a.name for a in merge[cc].args] == ["Keys", "BlockMax", "BlockSum", "BeamScores", "Scores",
                                                        "Tokens", "Beams", "V", "K", "NBLOCKS", "TOPK"]
            assert merge[cc].block_threads == MERGE_TILES[kpad].num_warps * 32


def test_blobs_round_trip_and_stay_small(fp16_bias_blobs):
    from fastertrt.plugins.cuda_launch import CompiledKernel, pack_kernels, unpack_kernels

    for blob in fp16_bias_blobs.values():
        kernels = unpack_kernels(blob)
        assert unpack_kernels(pack_kernels(kernels)) == kernels
        for kernel in kernels.values():
            back = CompiledKernel.from_bytes(kernel.to_bytes())
            assert back == kernel and back.tags == kernel.tags
    # the engine stores the fields twice; all 4 targets together stay under 600 KB
    assert sum(map(len, fp16_bias_blobs.values())) < 600 * 1024


@pytest.mark.parametrize("dtype, has_bias, cc", [("float32", False, 90), ("bfloat16", True, 80)])
def test_other_logit_types_compile(dtype, has_bias, cc):
    from fastertrt.plugins.beam_search.kernels import BlockVariant, compile_block

    kernel = compile_block(BlockVariant(dtype, has_bias, 8), cc)
    assert kernel.cubin[:4] == b"\x7fELF" and kernel.tags["dtype"] == dtype
    assert ("Bias" in [a.name for a in kernel.args]) == has_bias


def test_variant_validation():
    from fastertrt.plugins.beam_search.kernels import BlockVariant, MergeVariant

    assert BlockVariant("float16", True, 8).has_bias == 1
    with pytest.raises(ValueError, match="dtype"):
        BlockVariant("float64", 0, 8)
    with pytest.raises(ValueError, match="size class"):
        BlockVariant("float16", 0, 12)
    with pytest.raises(ValueError, match="size class"):
        MergeVariant(128)


# -----------------------------------------------------------------------------
# Launcher (what can be checked without a GPU)
# -----------------------------------------------------------------------------
def test_size_classes_and_workspace():
    from fastertrt.plugins.beam_search.launch import (
        BLOCK_V,
        K_CLASSES,
        KernelLaunchError,
        k_class,
        plan_launch,
        workspace_bytes,
        workspace_layout,
    )

    assert [k_class(k) for k in (1, 8, 9, 16, 17, 33, 64)] == [8, 8, 16, 16, 32, 64, 64]
    with pytest.raises(KernelLaunchError, match="outside 1..64"):
        k_class(65)
    assert plan_launch(8, 4, 50257, 8, has_bias=False).block_grid == (32, 13, 1)
    assert plan_launch(8, 4, 49152, 8, has_bias=True).nblocks == 12
    for rows, vocab, k in ((32, 50257, 8), (64, 49152, 16), (1, 10, 64), (512, 262144, 64)):
        need = max(workspace_layout(r, vocab, kpad).total for r in range(1, rows + 1) for kpad in K_CLASSES
                   if kpad <= k_class(k))
        assert workspace_bytes(rows, vocab, k) == need
    layout = workspace_layout(32, 50257, 8)
    assert layout.keys == 0 and all(off % 256 == 0 for off in (layout.scratch, layout.block_max, layout.block_sum))
    assert layout.block_max - layout.scratch >= 32 * 13 * 32 * 8 and layout.scratch >= 32 * 13 * 8 * 8
    assert BLOCK_V[8] >= 2 * 8


def test_plan_rejects_what_the_kernels_cannot_do():
    from fastertrt.plugins.beam_search.launch import KernelLaunchError, plan_launch

    with pytest.raises(KernelLaunchError, match="top 12 of 2 x 5"):
        plan_launch(1, 2, 5, 12, has_bias=False)
    with pytest.raises(KernelLaunchError, match="at least 1"):
        plan_launch(1, 0, 100, 4, has_bias=False)
    with pytest.raises(KernelLaunchError, match="power of two"):
        plan_launch(1, 2, 100, 4, has_bias=False, block_v=100)
    plan = plan_launch(2, 3, 100, 6, has_bias=True)
    assert plan.block_args["Bias"] == ("bias", 0) and "Bias" not in plan_launch(2, 3, 100, 6, False).block_args
    assert plan.merge_args["TOPK"] == 6 and plan.merge_args["K"] == 3 and plan.merge_grid == (2, 1, 1)


def _fake(name, tags, args):
    from fastertrt.plugins.cuda_launch import KernelArg

    return kernel_harness.fake_kernel(name=name, cc=90, num_warps=8, shared=0, block_m=8, block_n=4096,
                       args=tuple(KernelArg(a, "ptr", 16) for a in args), tags=tags)


def _fake_kernels(dtype="float16", has_bias=1, block_v=4096, shortlist=32):
    return {"kernels_block_k8": {90: _fake("b", {"kpad": 8, "dtype": dtype, "has_bias": has_bias,
                                                 "block_v": block_v, "shortlist": shortlist, "variant": "block"},
                                           ["Logits"])},
            "kernels_merge_k8": {90: _fake("m", {"kpad": 8, "variant": "merge"}, ["Keys"])}}


def _launch(kernels, **over):
    from fastertrt.plugins.beam_search.launch import beam_step_launch

    args = dict(logits=4096, logits_dtype="float16", beam_scores=4096, bias=4096, scores=4096, tokens=4096,
                beams=4096, workspace=4096, batch=2, num_beams=4, vocab=50257, k=8, stream=0)
    args.update(over)
    beam_step_launch(kernels, 90, **args)


def test_launch_checks_its_kernels_before_the_gpu():
    from fastertrt.plugins.beam_search.launch import KernelLaunchError

    with pytest.raises(KernelLaunchError, match="compiled for float16"):
        _launch(_fake_kernels(), logits_dtype="float32")
    with pytest.raises(KernelLaunchError, match="no bias pointer"):
        _launch(_fake_kernels(), bias=0)
    with pytest.raises(KernelLaunchError, match="compiled without bias"):
        _launch(_fake_kernels(has_bias=0))
    with pytest.raises(KernelLaunchError, match="vocab block 4096"):
        _launch(_fake_kernels(block_v=2048))
    with pytest.raises(KernelLaunchError, match="shortlist 32"):
        _launch(_fake_kernels(shortlist=64))
    with pytest.raises(KernelLaunchError, match="no 'kernels_block_k16'"):
        _launch(_fake_kernels(), k=16)
    with pytest.raises(KernelLaunchError, match="sm_86"):
        from fastertrt.plugins.beam_search.launch import beam_step_launch

        beam_step_launch(_fake_kernels(), 86, logits=1, logits_dtype="float16", beam_scores=1, bias=1, scores=1,
                         tokens=1, beams=1, workspace=1, batch=1, num_beams=1, vocab=10, k=1, stream=0)
    _launch(_fake_kernels(), batch=0)  # nothing to launch: returns before any driver call


def test_launch_without_a_driver_is_a_clear_error():
    from fastertrt.plugins.cuda_launch import KernelLaunchError

    kernel_harness.skip_unless_no_driver()
    with pytest.raises(KernelLaunchError, match="no NVIDIA driver"):
        _launch(_fake_kernels())


def test_runtime_side_imports_no_compiler():
    """launch.py is what the TensorRT plugin's enqueue runs: no triton, torch or numpy."""
    heavy = {"triton", "torch", "numpy", "onnx", "onnxscript", "transformers"}
    kernel_harness.assert_imports_none_of(kernel_harness.ROOT / "plugins" / "beam_search" / "launch.py", heavy)


def test_kernels_module_imports_without_triton():
    out = kernel_harness.run_without_triton("from fastertrt.plugins.beam_search import kernels\n"
                             "print(kernels.FIELD_NAMES, kernels.DEFAULT_TARGETS)\n")
    assert "kernels_block_k8" in out


if __name__ == "__main__":
    kernel_harness.child_main(CASES.values(), _interpret)
