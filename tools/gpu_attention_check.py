"""Check the attention plugin's cubins on a real GPU against torch SDPA.

Two steps on two machines:

    python tools/gpu_attention_check.py prepare OUTDIR      # here: triton compiles the cubins
    python tools/gpu_attention_check.py run OUTDIR --json results.json   # on the GPU machine

`prepare` needs triton (no GPU) and writes one serialized kernel bundle per variant
plus manifest.json. `run` needs only numpy, torch (CUDA), cuda.bindings and this
repository's fastertrt/errors.py and plugins/ (found by path when fastertrt is
not installed): it launches the cubins through the same launcher that the
TensorRT plugin's enqueue uses, compares them with torch's
scaled_dot_product_attention and an FP32 reference, times both (CUDA events,
median per call; also CUDA-graph replay, which leaves out Python launch cost)
and writes JSON and a table. Exit status 1 when a result is out of tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and it holds
# fastertrt's tools/inspect.py, which would shadow the standard library's inspect
# (torch imports it). Drop it before anything else is imported.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

# tools/ is off sys.path (above) and no package without a fastertrt install: by path
_spec = importlib.util.spec_from_file_location("gpu_check_common", Path(__file__).with_name("gpu_check_common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
Bench = common.Bench  # gpu_attention_tune.py times with this script's names

# (tag, dtype, head_dim, has_mask, causal, mask_dtype): what `run` needs
VARIANTS = [
    ("bert_fp16_d64_mask", "float16", 64, 1, 0, "float32"),
    ("dec_fp16_d64_causal", "float16", 64, 0, 1, "float32"),
    ("dec_fp16_d128_causal", "float16", 128, 0, 1, "float32"),
    ("dec_bf16_d64_causal_mask", "bfloat16", 64, 1, 1, "float32"),
    ("enc_fp32_d64_mask", "float32", 64, 1, 0, "float32"),
]
DEVICE = "cuda"  # the helpers below take it from here (a CPU dry run of them can set "cpu")
TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 1e-4}  # vs an FP32 reference computed on the GPU


# -----------------------------------------------------------------------------
# prepare (compile machine)
# -----------------------------------------------------------------------------
def prepare(outdir: Path, targets: tuple[int, ...]) -> None:
    from fastertrt.plugins.attention.kernels import CombineVariant, KernelVariant, compile_variant
    from fastertrt.plugins.cuda_launch import pack_kernels

    outdir.mkdir(parents=True, exist_ok=True)
    manifest = {"targets": list(targets), "variants": {}}
    start = time.perf_counter()
    for tag, dtype, d, has_mask, causal, mask_dtype in VARIANTS:
        variant = KernelVariant(dtype, d, has_mask, causal, mask_dtype)
        kernels = {cc: compile_variant(variant, cc) for cc in targets}
        path = outdir / f"{tag}.ftk"
        path.write_bytes(pack_kernels(kernels))
        extra = {}
        if tag.startswith(("dec_", "bert_")):  # decode steps split over keys; bert_ also serves enqueue checks
            split = KernelVariant(dtype, d, has_mask, causal, mask_dtype, split=1)
            (outdir / f"{tag}.split.ftk").write_bytes(pack_kernels({cc: compile_variant(split, cc)
                                                                    for cc in targets}))
            (outdir / f"{tag}.combine.ftk").write_bytes(pack_kernels({cc: compile_variant(CombineVariant(dtype, d), cc)
                                                                      for cc in targets}))
            extra = {"split_file": f"{tag}.split.ftk", "combine_file": f"{tag}.combine.ftk"}
        manifest["variants"][tag] = {
            **extra,
            "file": path.name, "dtype": dtype, "head_dim": d, "has_mask": has_mask, "causal": causal,
            "mask_dtype": variant.mask_dtype,
            "kernels": {str(cc): {"cubin_bytes": len(k.cubin), "shared": k.shared, "num_warps": k.num_warps,
                                  "block_m": k.block_m, "block_n": k.block_n,
                                  "triton": k.tags.get("triton")} for cc, k in kernels.items()},
        }
        print(f"{tag:28s} " + "  ".join(f"sm_{cc}: {len(k.cubin) // 1024} KB cubin, {k.shared // 1024} KB smem"
                                        for cc, k in kernels.items()))
    common.write_manifest(outdir, manifest, f"{len(VARIANTS)} bundles", start)


# -----------------------------------------------------------------------------
# run (GPU machine)
# -----------------------------------------------------------------------------
def _import_launchers():
    """fastertrt's cuda_launch and attention.launch, installed or from this checkout."""
    return common.import_plugins("cuda_launch", "attention.launch")


def _configs():
    """(label, variant tag, B, Hq, Hkv, S, past, D)."""
    out = []
    for b in (1, 8, 32):
        for s in (128, 384):
            out.append((f"bert b{b} s{s}", "bert_fp16_d64_mask", b, 12, 12, s, 0, 64))
    for hq, hkv, d, tag in ((9, 3, 64, "dec_fp16_d64_causal"), (32, 8, 128, "dec_fp16_d128_causal")):
        for b in (1, 8):
            for past in (0, 128, 512, 1024):
                out.append((f"decode h{hq}/{hkv} d{d} b{b} p{past}", tag, b, hq, hkv, 1, past, d))
            out.append((f"prefill h{hq}/{hkv} d{d} b{b} s128", tag, b, hq, hkv, 128, 0, d))
            out.append((f"prefill h{hq}/{hkv} d{d} b{b} s512", tag, b, hq, hkv, 512, 0, d))
    out.append(("bf16 causal+pad h9/3 b4 s64 p37", "dec_bf16_d64_causal_mask", 4, 9, 3, 64, 37, 64))
    out.append(("fp32 enc pad h12 b2 s100", "enc_fp32_d64_mask", 2, 12, 12, 100, 0, 64))
    return out


def _inputs(torch, dtype, b, hq, hkv, s, past, d, has_mask, gen):
    t = past + s
    q = torch.randn(b, hq, s, d, generator=gen, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=gen, device=DEVICE).to(dtype)
    mask = None
    if has_mask:
        # ragged key padding per batch row, transformers' finfo.min fill; first row full
        lengths = [t] + [max(1, t - int(x)) for x in torch.randint(0, max(1, t // 2), (b - 1,), generator=gen,
                                                                      device=DEVICE).tolist()]
        mask = torch.zeros(b, 1, 1, t, device=DEVICE, dtype=torch.float32)
        for i, n in enumerate(lengths):
            mask[i, ..., n:] = torch.finfo(torch.float32).min
    return q, k, v, mask


def _reference(torch, q, k, v, mask, scale, causal):
    """FP32 math on the GPU, causal aligned to the end (key j <= T - S + i)."""
    g = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    s, t = q.shape[2], k.shape[2]
    if causal:
        allowed = torch.arange(t, device=DEVICE)[None, :] <= torch.arange(s, device=DEVICE)[:, None] + (t - s)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ vf


def _sdpa_fn(torch, q, k, v, mask, scale, causal):
    """torch SDPA for the same problem. is_causal is top-left aligned in torch, which
    matches ours only when S == T (prefill) or S == 1 (decode: everything visible)."""
    import torch.nn.functional as F

    s, t = q.shape[2], k.shape[2]
    if causal and s not in (1, t):
        allowed = torch.arange(t, device=DEVICE)[None, :] <= torch.arange(s, device=DEVICE)[:, None] + (t - s)
        extra = torch.zeros(s, t, device=DEVICE, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
        mask = extra if mask is None else mask.to(q.dtype) + extra
        causal = False
    attn_mask = mask.to(q.dtype) if mask is not None else None
    is_causal = bool(causal and s == t and s > 1)
    g = q.shape[1] // k.shape[1]
    try:
        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                       enable_gqa=g > 1)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                      scale=scale, enable_gqa=g > 1)
    except TypeError:  # torch without enable_gqa: expand K/V once, outside the timing
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask, is_causal=is_causal,
                                                      scale=scale)


def run(outdir: Path, json_path: Path | None, iters: int, warmup: int, only: str | None,
        profile: bool = False) -> int:
    import torch

    cuda_launch, launch = _import_launchers()
    manifest = json.loads((outdir / "manifest.json").read_text())
    bundles = {tag: cuda_launch.unpack_kernels((outdir / info["file"]).read_bytes())
               for tag, info in manifest["variants"].items()}
    splits = {tag: (cuda_launch.unpack_kernels((outdir / info["split_file"]).read_bytes()),
                    cuda_launch.unpack_kernels((outdir / info["combine_file"]).read_bytes()))
              for tag, info in manifest["variants"].items() if "split_file" in info}
    cc, dev = common.cuda_device(torch, cuda_launch)
    print(f"device: {dev} (sm_{cc}), torch {torch.__version__}, cubins from triton "
          f"{next(iter(next(iter(bundles.values())).values())).tags.get('triton')}")
    bench = Bench(torch, iters, warmup)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def check(row, label, tag, b, hq, hkv, s, past, d):
        info = manifest["variants"][tag]
        row.update({"variant": tag, "B": b, "Hq": hq, "Hkv": hkv, "S": s, "past": past, "D": d,
                    "dtype": info["dtype"]})
        dtype = getattr(torch, info["dtype"])
        scale = d ** -0.5
        causal = bool(info["causal"])
        q, k, v, mask = _inputs(torch, dtype, b, hq, hkv, s, past, d, info["has_mask"], gen)
        out = torch.empty_like(q)
        t = past + s
        mask_strides = (mask.stride(0), 0, 0, 1) if mask is not None else None

        def ours():
            launch.attention_launch(
                bundles[tag], q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else 0,
                out.data_ptr(), q.stride(), k.stride(), v.stride(), out.stride(), mask_strides,
                B=b, Hq=hq, S=s, T=t, group=hq // hkv, scale=scale,
                stream=torch.cuda.current_stream().cuda_stream)

        sdpa = _sdpa_fn(torch, q, k, v, mask, scale, causal)
        ours()
        torch.cuda.synchronize()
        ref = _reference(torch, q, k, v, mask, scale, causal)
        got, theirs = out.float(), sdpa().float()
        row["err_ours"] = (got - ref).abs().max().item()
        row["err_sdpa"] = (theirs - ref).abs().max().item()
        row["ours_vs_sdpa"] = (got - theirs).abs().max().item()
        row["finite"] = bool(torch.isfinite(got).all().item())
        row["ok"] = row["finite"] and row["err_ours"] <= TOLERANCE[info["dtype"]]
        bench.against(row, ours, sdpa, "sdpa")
        row["ratio"] = row["ours_ms"] / row["sdpa_ms"]
        if row["ours_graph_us"] and row["sdpa_graph_us"]:
            row["graph_ratio"] = row["ours_graph_us"] / row["sdpa_graph_us"]
        if tag in splits and s <= launch.SPLIT_MAX_ROWS and tag.startswith("dec_"):
            ws = torch.empty(launch.max_split_workspace_bytes(b, hq, s, info["head_dim"] if info["head_dim"] >= 16
                                                              else 16) * 2, dtype=torch.uint8, device=DEVICE)
            split_arg = (*splits[tag], ws.data_ptr(), ws.numel())

            def ours_split():
                launch.attention_launch(
                    bundles[tag], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                    mask.data_ptr() if mask is not None else 0, out.data_ptr(), q.stride(), k.stride(),
                    v.stride(), out.stride(), mask_strides, B=b, Hq=hq, S=s, T=t, group=hq // hkv, scale=scale,
                    stream=torch.cuda.current_stream().cuda_stream, split=split_arg)

            out.zero_()
            ours_split()
            torch.cuda.synchronize()
            row["err_split"] = (out.float() - ref).abs().max().item()
            row["ok"] = row["ok"] and row["err_split"] <= TOLERANCE[info["dtype"]]
            row["split_graph_us"] = bench.graph_us(ours_split)
            if row["split_graph_us"] and row["sdpa_graph_us"]:
                row["split_ratio"] = row["split_graph_us"] / row["sdpa_graph_us"]
        row["host_us_per_launch"] = bench.host_us(ours)

    rows = common.run_configs(_configs(), only, check, _print_row)
    failures = sum(not r["ok"] for r in rows)
    if profile:
        profile_host(torch, bundles, launch)
    enqueue_rows = check_enqueue(torch, bundles, splits)
    failures += sum(not r["ok"] for r in enqueue_rows)
    result = {"device": dev, "cc": cc, "torch": torch.__version__, "iters": iters, "tolerance": TOLERANCE,
              "rows": rows, "enqueue": enqueue_rows, "failures": failures}
    common.write_json(json_path, result)
    total = len(rows) + len(enqueue_rows)
    print(f"{total - failures}/{total} within tolerance")
    return 1 if failures else 0


def check_enqueue(torch, bundles: dict, splits: dict) -> list[dict]:
    """The TensorRT plugin's enqueue body (trt.enqueue_attention: KV-cache copies
    into the present outputs, packed qkv views, mask strides, then the launch) on
    torch CUDA tensors, against an FP32 reference. Exact presents, close outputs."""
    from fastertrt.plugins.attention.spec import AttentionAttrs
    from fastertrt.plugins.attention.trt import enqueue_attention

    cases = [  # label, attrs, variant tag, B, S, past
        ("enqueue decode gqa+mask b4 p37", AttentionAttrs(9, 3, 64, 0.125, has_mask=1, has_past=1),
         "bert_fp16_d64_mask", 4, 1, 37),
        ("enqueue prefill gqa+mask b3 s20 p0", AttentionAttrs(9, 3, 64, 0.125, has_mask=1, has_past=1),
         "bert_fp16_d64_mask", 3, 20, 0),
        ("enqueue packed causal b2 s5 p7", AttentionAttrs(4, 2, 64, 0.125, causal=1, has_past=1, qkv_packed=1),
         "dec_fp16_d64_causal", 2, 5, 7),
        ("enqueue decode split b2 p700", AttentionAttrs(9, 3, 64, 0.125, has_mask=1, has_past=1),
         "bert_fp16_d64_mask", 2, 1, 700),
    ]
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for label, attrs, tag, b, s, past in cases:
        hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size
        t = past + s
        shapes = {"qkv": (b, s, (hq + 2 * hkv) * d), "query": (b, hq, s, d), "key": (b, hkv, s, d),
                  "value": (b, hkv, s, d), "past_key": (b, hkv, past, d), "past_value": (b, hkv, past, d)}
        inputs = {n: torch.randn(*shapes[n], generator=gen, device=DEVICE).half() for n in attrs.input_names()
                  if n != "mask"}
        if attrs.has_mask:
            mask = torch.zeros(b, 1, s, t, device=DEVICE)
            mask[1:, ..., : t // 3] = torch.finfo(torch.float32).min  # left padding in rows 1..
            inputs["mask"] = mask
        ins = [inputs[n] for n in attrs.input_names()]
        outs = [torch.empty(b, hq, s, d, device=DEVICE, dtype=torch.half)]
        if attrs.has_past:
            outs += [torch.empty(b, hkv, t, d, device=DEVICE, dtype=torch.half) for _ in range(2)]
        row = {"label": label}
        try:
            split = None
            if "split" in label:
                from fastertrt.plugins.attention.launch import max_split_workspace_bytes

                ws = torch.empty(max_split_workspace_bytes(b, hq, s, 64), dtype=torch.uint8, device=DEVICE)
                split = (*splits[tag], ws.data_ptr())
            enqueue_attention(attrs, bundles[tag], [tuple(x.shape) for x in ins], [x.data_ptr() for x in ins],
                              [o.data_ptr() for o in outs], 2, torch.cuda.current_stream().cuda_stream, split)
            torch.cuda.synchronize()
            if attrs.qkv_packed:
                heads = inputs["qkv"].view(b, s, hq + 2 * hkv, d).transpose(1, 2)
                q, k, v = heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]
            else:
                q, k, v = inputs["query"], inputs["key"], inputs["value"]
            k = torch.cat([inputs["past_key"], k], 2)
            v = torch.cat([inputs["past_value"], v], 2)
            ref = _reference(torch, q, k, v, inputs.get("mask"), attrs.scale, bool(attrs.causal))
            row["err_out"] = (outs[0].float() - ref).abs().max().item()
            row["present_exact"] = bool(torch.equal(outs[1], k) and torch.equal(outs[2], v))
            row["ok"] = row["present_exact"] and row["err_out"] <= TOLERANCE["float16"]
        except Exception as exc:  # noqa: BLE001
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
        print(f"{label:34s} {'ok ' if row['ok'] else 'BAD'} {row}")
        rows.append(row)
    return rows


def profile_host(torch, bundles: dict, launch, n: int = 500) -> None:
    """Where the host time of one launch goes (cProfile over n launches of a BERT
    b8 s128 problem): the plugin's enqueue runs this Python on every call."""
    import cProfile
    import pstats

    q = torch.randn(8, 12, 128, 64, device=DEVICE).half()
    k, v, out = torch.randn_like(q), torch.randn_like(q), torch.empty_like(q)
    mask = torch.zeros(8, 1, 1, 128, device=DEVICE)
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        launch.attention_launch(bundles["bert_fp16_d64_mask"], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                mask.data_ptr(), out.data_ptr(), q.stride(), k.stride(), v.stride(), out.stride(),
                                (128, 0, 0, 1), B=8, Hq=12, S=128, T=128, group=1, scale=0.125, stream=stream)

    for _ in range(20):
        ours()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        ours()
    per_call = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        ours()
    prof.disable()
    torch.cuda.synchronize()
    print(f"host time per attention_launch: {per_call:.1f} us (no profiler)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def _print_row(row: dict) -> None:
    common.print_row(row, 34, lambda f: (
        f"err {f('err_ours', '.1e')} (sdpa {f('err_sdpa', '.1e')})  "
        + common.timing_columns(f, "sdpa", "ratio", "graph_ratio", "host_us_per_launch")
        + (f"  split {f('split_graph_us', '7.1f')} us x{f('split_ratio', '.2f')} err {f('err_split', '.1e')}"
           if "split_graph_us" in row else "")))


def main(argv=None) -> int:
    parser, _, r = common.parser(__doc__, "launch, compare with torch SDPA and time (GPU; no triton)",
                                 iters=50, warmup=10)
    r.add_argument("--profile-host", action="store_true", help="also profile the launcher's host time")
    args = parser.parse_args(argv)
    if args.mode == "prepare":
        prepare(args.outdir, common.targets(args.targets))
        return 0
    return run(args.outdir, args.json, args.iters, args.warmup, args.only, args.profile_host)


if __name__ == "__main__":
    sys.exit(main())
