"""The attention plugin's Triton kernel: numbers (Triton's CPU interpreter, against
the numpy reference) and ahead-of-time cubins for every variant and target.

The interpreted cases all run in one subprocess (this file run as a script; see
kernel_harness.py) and the tests here compare its outputs.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest

from fastertrt.plugins.attention.reference import attention_numpy
from fastertrt.tests.plugins import kernel_harness
from fastertrt.tolerances import tolerance

TOLERANCE = {dtype: tolerance("kernel", p).atol
             for dtype, p in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16"))}


# -----------------------------------------------------------------------------
# Cases
# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    hq: int = 2
    hkv: int = 2
    s: int = 7
    past: int = 0
    d: int = 32
    dtype: str = "float32"
    mask: str = "none"  # none | pad_inf | pad_min | full4d | dead_row | dead_batch | dead_row_min
    mask_dtype: str = "float32"
    causal: bool = False
    packed: bool = False
    scale: float | None = None
    splits: int = 0  # > 0: the split-over-keys kernel with about this many chunks, then the combine kernel

    @property
    def t(self) -> int:
        return self.past + self.s


def _cases() -> list[Case]:
    base = Case("mha")
    cases = [
        base,
        replace(base, name="mha_fp16", dtype="float16"),
        replace(base, name="mha_bf16", dtype="bfloat16"),
        Case("gqa", hq=4, hkv=2, s=9, d=64, scale=0.3),
        Case("gqa_fp16", hq=4, hkv=2, s=9, d=64, dtype="float16"),
        Case("d8", d=8, s=5),
        Case("d24_fp16_mask", d=24, dtype="float16", mask="pad_inf", b=3),
        Case("d64_bf16", d=64, dtype="bfloat16", mask="pad_min", b=3),
        Case("pad_inf", b=3, mask="pad_inf"),
        Case("pad_min", b=3, mask="pad_min"),
        Case("pad_inf_fp16_mask16", b=3, dtype="float16", mask="pad_inf", mask_dtype="float16"),
        Case("pad_min_fp16_mask16", b=3, dtype="float16", mask="pad_min", mask_dtype="float16"),
        Case("pad_min_bf16_mask16", b=3, dtype="bfloat16", mask="pad_min", mask_dtype="bfloat16"),
        Case("mask4d", hq=4, hkv=2, mask="full4d"),
        Case("mask4d_fp16", hq=4, hkv=2, mask="full4d", dtype="float16"),
        Case("multi_tile", s=40, d=16, causal=True, mask="pad_inf", b=2),
        Case("dead_row", mask="dead_row", hq=4, hkv=2),
        Case("dead_batch_fp16", b=3, mask="dead_batch", dtype="float16"),
        Case("dead_row_min", mask="dead_row_min"),
        Case("decode_s1", s=1, past=17, hq=4, hkv=2, causal=True, mask="pad_inf", b=3),
        Case("decode_s1_p0", s=1, past=0, hq=4, hkv=2, causal=True),
        Case("decode_s1_bf16", s=1, past=17, hq=4, hkv=1, causal=True, dtype="bfloat16"),
        Case("packed", packed=True),
        Case("packed_gqa_fp16_causal_mask", packed=True, hq=4, hkv=2, causal=True, mask="pad_inf",
             dtype="float16", b=3),
        Case("packed_bf16_d24", packed=True, d=24, dtype="bfloat16", mask="pad_min", b=3),
    ]
    # split over keys (decode steps with a long cache): chunks of whole key tiles, a
    # chunk that sees only masked keys, causal offsets, GQA, FP16 and BF16
    cases += [
        Case("split_decode_gqa_pad", s=1, past=70, hq=4, hkv=2, causal=True, mask="pad_inf", b=3, splits=3),
        Case("split_decode_fp16_dead_chunk", s=1, past=60, hq=2, hkv=1, mask="pad_min", b=3, dtype="float16",
             splits=5),
        Case("split_prefill_rows_causal_bf16", s=4, past=45, hq=4, hkv=1, causal=True, d=24, dtype="bfloat16",
             splits=4),
        Case("split_one_chunk", s=2, past=9, causal=True, splits=8),
    ]
    for past in (0, 3, 17):
        cases.append(Case(f"causal_p{past}", s=5, past=past, hq=4, hkv=2, causal=True))
        cases.append(Case(f"causal_p{past}_fp16_pad", s=5, past=past, hq=4, hkv=2, causal=True,
                          mask="pad_inf", dtype="float16", b=3))
    return cases


CASES = {c.name: c for c in _cases()}


def _lengths(b: int, t: int) -> list[int]:
    """Ragged valid lengths per batch row, the first row full."""
    return [t] + [max(1, t - 3 * i - 1) for i in range(1, b)]


def _mask(case: Case, rng) -> np.ndarray | None:
    b, hq, s, t = case.b, case.hq, case.s, case.t
    if case.mask == "none":
        return None
    low = {"float32": np.finfo(np.float32).min, "float16": np.finfo(np.float16).min,
           "bfloat16": float(kernel_harness.round_to(np.float32(np.finfo(np.float32).min), "bfloat16"))}[case.mask_dtype]
    if case.mask in ("pad_inf", "pad_min", "dead_batch"):
        fill = low if case.mask == "pad_min" else -np.inf
        m = np.zeros((b, 1, 1, t), np.float32)
        for i, n in enumerate(_lengths(b, t)):
            m[i, ..., n:] = fill
        if case.mask == "dead_batch":
            m[-1] = -np.inf  # a whole batch row of padding
        return m
    if case.mask == "full4d":
        m = rng.standard_normal((b, hq, s, t)).astype(np.float32)
        m[rng.random(m.shape) < 0.2] = -np.inf
        m[..., 0] = 0.0  # keep every row alive
        return m
    if case.mask in ("dead_row", "dead_row_min"):
        m = np.zeros((b, hq, s, t), np.float32)
        m[0, 1, 2, :] = -np.inf if case.mask == "dead_row" else low
        m[1, 0, 0, :] = -np.inf if case.mask == "dead_row" else low
        return m
    raise ValueError(case.mask)


def case_inputs(case: Case) -> dict:
    """Deterministic inputs, already rounded to the I/O (and mask) dtype."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))  # stable across processes, unlike hash()
    q = kernel_harness.round_to(rng.standard_normal((case.b, case.hq, case.s, case.d)), case.dtype)
    k = kernel_harness.round_to(rng.standard_normal((case.b, case.hkv, case.t, case.d)), case.dtype)
    v = kernel_harness.round_to(rng.standard_normal((case.b, case.hkv, case.t, case.d)), case.dtype)
    mask = _mask(case, rng)
    if mask is not None:
        mask = kernel_harness.round_to(mask, case.mask_dtype)
    return {"q": q, "k": k, "v": v, "mask": mask}


def _packed(q, k, v) -> np.ndarray:
    """[B, S, (Hq + 2 Hkv) D] from the three [B, H, S, D] tensors."""
    heads = np.concatenate([q, k, v], axis=1)  # [B, Hq+2Hkv, S, D]
    b, h, s, d = heads.shape
    return np.ascontiguousarray(heads.transpose(0, 2, 1, 3).reshape(b, s, h * d))


# -----------------------------------------------------------------------------
# The interpreted run (subprocess)
# -----------------------------------------------------------------------------
def _interpret(case: Case) -> dict[str, np.ndarray]:
    """One case through the kernel in Triton's interpreter (TRITON_INTERPRET=1 set)."""
    from fastertrt.plugins.attention import kernels

    x = case_inputs(case)
    common = dict(scale=case.scale, causal=case.causal, dtype=case.dtype, mask_dtype=case.mask_dtype)
    if case.splits:
        common["splits"] = case.splits
    if case.packed:
        out = kernels.attention_interpreted_packed(_packed(x["q"], x["k"], x["v"]), case.hq, case.hkv,
                                                   x["mask"], **common)
    else:
        out = kernels.attention_interpreted(x["q"], x["k"], x["v"], x["mask"], **common)
    return {case.name: out}


interpreted = kernel_harness.interpreted_fixture(__file__, CASES, "attn_interp")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_matches_reference(interpreted, name):
    case = CASES[name]
    x = case_inputs(case)
    got = interpreted[name]
    want = attention_numpy(x["q"], x["k"], x["v"], x["mask"], scale=case.scale, causal=case.causal)
    assert got.shape == (case.b, case.hq, case.s, case.d)
    assert np.isfinite(got).all(), "NaN or inf in the kernel's output"
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[case.dtype])


def test_fully_masked_rows_are_zero(interpreted):
    got = interpreted["dead_row"]
    assert not got[0, 1, 2].any() and not got[1, 0, 0].any()
    assert np.abs(got[0, 1, 1]).sum() > 0
    assert not interpreted["dead_batch_fp16"][-1].any()


def test_rows_masked_with_finfo_min_average_v(interpreted):
    """finfo.min (transformers' padding value) is finite: a row masked with it
    everywhere is uniform over the keys, as in torch, with no inf or NaN on the way."""
    x = case_inputs(CASES["dead_row_min"])
    np.testing.assert_allclose(interpreted["dead_row_min"][0, 1, 2], x["v"][0, 1].mean(axis=0), atol=1e-6)


def test_causal_decode_with_empty_past_is_v_of_the_one_key(interpreted):
    x = case_inputs(CASES["decode_s1_p0"])
    got = interpreted["decode_s1_p0"]
    np.testing.assert_allclose(got, np.repeat(x["v"], 2, axis=1), atol=1e-6)


# -----------------------------------------------------------------------------
# Ahead-of-time compile (no GPU)
# -----------------------------------------------------------------------------
def _variants(head_dim: int):
    """Every kernel a plugin node can carry: the main kernel, its split-over-keys
    form (decode steps) and the combine kernel, per I/O type, mask and causality."""
    from fastertrt.plugins.attention.kernels import IO_DTYPES, CombineVariant, KernelVariant

    out = []
    for dtype in IO_DTYPES:
        out.append(CombineVariant(dtype, head_dim))
        for causal in (0, 1):
            for split in (0, 1):
                out.append(KernelVariant(dtype, head_dim, has_mask=0, causal=causal, split=split))
                for mask_dtype in sorted({"float32", dtype}):
                    out.append(KernelVariant(dtype, head_dim, has_mask=1, causal=causal, mask_dtype=mask_dtype,
                                             split=split))
    return out


def _check_kernel(kernel, variant, cc):
    from fastertrt.plugins.attention.kernels import CombineVariant

    kernel_harness.check_cubin(kernel, cc)
    assert kernel.tags["variant"] == variant.tag()
    names = [a.name for a in kernel.args]
    assert not any(n.endswith("d") and n.startswith("stride_") for n in names)  # unit strides are baked in
    if isinstance(variant, CombineVariant):
        assert names[:3] == ["Part", "Lse", "Out"] and names[-1] == "NSPLIT"
        return
    assert names[:3] == ["Q", "K", "V"] and ("M" in names) == bool(variant.has_mask)
    # a split launch writes chunk partials to the workspace, a plain one writes Out
    assert names[-3:] == (["Part", "Lse", "CHUNK"] if variant.split else ["H", "GROUP", "scale"])
    assert ("Out" in names) != bool(variant.split)


OTHER_HEAD_DIMS = (8, 24, 80, 128, 256)


def _other_head_dim_variants(head_dim: int):
    from fastertrt.plugins.attention.kernels import KernelVariant

    dtypes = ("float16", "bfloat16") if head_dim == 128 else ("float16", "float32")  # bf16 at the LLM size
    return [KernelVariant(dtype, head_dim, has_mask=1, causal=1) for dtype in dtypes]


@pytest.fixture(scope="module")
def precompiled():
    """Every default-target compile below, spread over the CPUs at once (a fresh
    Triton cache on 2 cores: about half the time of compiling them one by one)."""
    from fastertrt.plugins.attention.kernels import DEFAULT_TARGETS, compile_many

    pairs = [(v, cc) for cc in DEFAULT_TARGETS for v in _variants(64)]
    pairs += [(v, cc) for d in OTHER_HEAD_DIMS for v in _other_head_dim_variants(d) for cc in (80, 90)]
    start = time.perf_counter()
    compile_many(pairs)
    print(f"compiled {len(pairs)} kernels in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("cc", [80, 86, 89, 90])
def test_every_variant_compiles_for_default_targets(precompiled, cc):
    from fastertrt.plugins.attention.kernels import compile_variant

    for variant in _variants(64):
        _check_kernel(compile_variant(variant, cc), variant, cc)


@pytest.mark.parametrize("head_dim", OTHER_HEAD_DIMS)
def test_other_head_dims_compile(precompiled, head_dim):
    from fastertrt.plugins.attention.kernels import compile_variant

    for variant in _other_head_dim_variants(head_dim):
        for cc in (80, 90):
            _check_kernel(compile_variant(variant, cc), variant, cc)


@pytest.mark.parametrize("cc", [75, 120])
def test_optional_targets(cc):
    from fastertrt.plugins.attention.kernels import KernelVariant, compile_variant, supported_targets

    if cc not in supported_targets():
        pytest.skip(f"this triton cannot compile for sm_{cc}")
    for variant in (KernelVariant("float16", 64, 1, 1), KernelVariant("float32", 64, 1, 0)):
        _check_kernel(compile_variant(variant, cc), variant, cc)


def test_serialized_kernels_round_trip():
    from fastertrt.plugins.attention.kernels import KernelVariant, compile_for_targets
    from fastertrt.plugins.cuda_launch import CompiledKernel, KernelLaunchError, pack_kernels, unpack_kernels

    kernels = compile_for_targets(KernelVariant("float16", 64, 1, 1), targets=(80, 90))
    for kernel in kernels.values():
        data = kernel.to_bytes()
        assert len(data) < len(kernel.cubin)  # compressed
        back = CompiledKernel.from_bytes(data)
        assert back == kernel and back.tags == kernel.tags and back.fingerprint == kernel.fingerprint
    assert unpack_kernels(pack_kernels(kernels)) == kernels
    data = kernels[90].to_bytes()
    with pytest.raises(KernelLaunchError, match="bad magic"):
        CompiledKernel.from_bytes(b"junk" + data)
    with pytest.raises(KernelLaunchError, match="format v9"):
        CompiledKernel.from_bytes(data[:5] + bytes([9]) + data[6:])
    with pytest.raises(KernelLaunchError, match="corrupt"):
        CompiledKernel.from_bytes(data[:-10])


def test_variant_validation():
    from fastertrt.plugins.attention.kernels import KernelVariant

    assert KernelVariant("float16", 64, has_mask=0, mask_dtype="float16").mask_dtype == "none"
    assert KernelVariant("float16", 80).block_d == 128 and KernelVariant("float32", 8).block_d == 16
    with pytest.raises(ValueError, match="dtype"):
        KernelVariant("float64", 64)
    with pytest.raises(ValueError, match="mask dtype"):
        KernelVariant("float16", 64, has_mask=1, mask_dtype="bfloat16")


# -----------------------------------------------------------------------------
# Launcher (what can be checked without a GPU)
# -----------------------------------------------------------------------------
def _fake_kernel(**over):
    from fastertrt.plugins.cuda_launch import KernelArg

    args = (KernelArg("Q", "ptr", 16), KernelArg("stride_qs", "i32", 16), KernelArg("S", "i32"))
    return kernel_harness.fake_kernel(**{"args": args, "tags": {"has_mask": 0}, **over})


def test_kernel_choice_names_the_available_targets():
    from fastertrt.plugins.cuda_launch import KernelLaunchError, select_kernel

    kernels = {80: _fake_kernel(cc=80), 90: _fake_kernel(cc=90)}
    assert select_kernel(kernels, 90).cc == 90
    with pytest.raises(KernelLaunchError, match=r"sm_86.*compiled for: sm_80, sm_90"):
        select_kernel(kernels, 86, "attention")


def test_arguments_are_checked_against_the_compiled_hints():
    from fastertrt.plugins.cuda_launch import KernelLaunchError, check_args

    kernel = _fake_kernel()
    check_args(kernel, {"Q": 4096, "stride_qs": 64, "S": 7})
    with pytest.raises(KernelLaunchError, match="Q=4100 is not a multiple of 16 bytes"):
        check_args(kernel, {"Q": 4100, "stride_qs": 64, "S": 7})
    with pytest.raises(KernelLaunchError, match="stride_qs=24"):
        check_args(kernel, {"Q": 4096, "stride_qs": 24, "S": 7})
    with pytest.raises(KernelLaunchError, match=r"missing argument\(s\) \['S'\]"):
        check_args(kernel, {"Q": 4096, "stride_qs": 64})
    with pytest.raises(KernelLaunchError, match="int32"):
        check_args(kernel, {"Q": 4096, "stride_qs": 64, "S": 2**31})


def test_launch_without_a_driver_is_a_clear_error():
    from fastertrt.plugins.attention.launch import attention_launch, bhsd_strides
    from fastertrt.plugins.cuda_launch import KernelLaunchError

    kernel_harness.skip_unless_no_driver()
    st = bhsd_strides(1, 2, 4, 64)
    with pytest.raises(KernelLaunchError, match="no NVIDIA driver"):
        attention_launch({86: _fake_kernel()}, 4096, 4096, 4096, 0, 4096, st, st, st, st, None,
                         B=1, Hq=2, S=4, T=4, group=1, scale=0.125, stream=0)


def test_runtime_side_imports_no_compiler():
    """launch.py and cuda_launch.py are what the TensorRT plugin's enqueue runs: they
    must not import triton, torch or numpy-heavy compiler packages."""
    heavy = {"triton", "torch", "onnx", "onnxscript", "transformers"}
    for path in (kernel_harness.ROOT / "plugins" / "cuda_launch.py", kernel_harness.ROOT / "plugins" / "attention" / "launch.py"):
        kernel_harness.assert_imports_none_of(path, heavy)


def test_kernels_module_imports_without_triton():
    out = kernel_harness.run_without_triton("from fastertrt.plugins.attention.kernels import KernelVariant, tile_config\n"
                             "print(tile_config(KernelVariant('float16', 64, 1, 1), 90))\n")
    assert "block_m=" in out


@pytest.mark.gpu
def test_launch_on_gpu_matches_reference():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from fastertrt.plugins.attention.kernels import KernelVariant, compile_variant
    from fastertrt.plugins.attention.launch import attention_launch
    from fastertrt.plugins.cuda_launch import current_compute_capability

    torch.cuda.init()
    cc = current_compute_capability()
    case = CASES["causal_p17_fp16_pad"]
    x = case_inputs(case)
    kernel = compile_variant(KernelVariant("float16", case.d, has_mask=1, causal=1), cc)
    q, k, v = (torch.from_numpy(x[n]).half().cuda().contiguous() for n in "qkv")
    mask = torch.from_numpy(x["mask"]).cuda().contiguous()
    out = torch.empty_like(q)
    attention_launch({cc: kernel}, q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
                     q.stride(), k.stride(), v.stride(), out.stride(), (mask.stride(0), 0, 0, 1),
                     B=case.b, Hq=case.hq, S=case.s, T=case.t, group=case.hq // case.hkv,
                     scale=case.d ** -0.5, stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = attention_numpy(x["q"], x["k"], x["v"], x["mask"], causal=True)
    np.testing.assert_allclose(out.float().cpu().numpy(), want, atol=TOLERANCE["float16"])


if __name__ == "__main__":
    kernel_harness.child_main(CASES.values(), _interpret)
