"""Pick the attention kernel's tiles on a real GPU: the same kernel compiled
with several (BLOCK_M, BLOCK_N, warps, stages), timed against torch SDPA with
CUDA-graph replay (GPU time only), for BERT shapes with the [B, 1, S, T] mask
that exported graphs really carry.

    python tools/gpu_attention_tune.py prepare OUTDIR --cc 90     # here (triton, no GPU)
    python tools/gpu_attention_tune.py run OUTDIR --json tune.json  # on the GPU machine
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # tools/inspect.py would shadow the standard library's inspect

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TILES = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (32, 32, 4, 2)]
VARIANTS = [("fp16_d64_mask", "float16", 64, 1, "float32"), ("fp16_d64_mask16", "float16", 64, 1, "float16"),
            ("fp16_d64", "float16", 64, 0, "float32")]


def _check_module():
    spec = importlib.util.spec_from_file_location("gpu_attention_check", ROOT / "tools" / "gpu_attention_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare(outdir: Path, cc: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastertrt.plugins.attention import kernels as K
    from fastertrt.plugins.cuda_launch import CompiledKernel

    outdir.mkdir(parents=True, exist_ok=True)
    index = []
    for tag, dtype, d, has_mask, mask_dtype in VARIANTS:
        variant = K.KernelVariant(dtype, d, has_mask, 0, mask_dtype)
        for bm, bn, warps, stages in TILES:
            tile = K.TileConfig(bm, bn, warps, stages)
            signature, constexprs, attrs, layout = K._signature(variant, tile)
            src = ASTSource(fn=K._jit_kernel(), signature=signature, constexprs=constexprs, attrs=attrs)
            try:
                c = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": warps, "num_stages": stages})
            except Exception as exc:  # noqa: BLE001 - some tiles do not fit; say so and go on
                print(f"{tag} {tile}: does not compile ({type(exc).__name__})")
                continue
            m = c.metadata
            kernel = CompiledKernel(c.name, bytes(c.kernel), cc, m.num_warps, m.shared, bm, bn,
                                    int(getattr(m, "global_scratch_size", 0) or 0),
                                    int(getattr(m, "global_scratch_align", 1) or 1),
                                    int(getattr(m, "profile_scratch_size", 0) or 0),
                                    int(getattr(m, "profile_scratch_align", 1) or 1), layout,
                                    {"has_mask": has_mask})
            name = f"{tag}_{bm}x{bn}_w{warps}_s{stages}.ftk"
            (outdir / name).write_bytes(kernel.to_bytes())
            index.append({"file": name, "variant": tag, "has_mask": has_mask, "mask_dtype": mask_dtype,
                          "tile": [bm, bn, warps, stages],
                          "shared": m.shared})
    (outdir / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(index)} kernels in {outdir}")


def run(outdir: Path, json_path: Path | None) -> int:
    import torch

    check = _check_module()
    cuda_launch, launch = check._import_launchers()
    index = json.loads((outdir / "index.json").read_text())
    torch.zeros(1, device="cuda")
    bench = check.Bench(torch, 30, 5)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for b, s in ((1, 128), (8, 128), (32, 128), (8, 384), (32, 384)):  # noqa: PLR1702
        hq, d = 12, 64
        q, k, v, _ = check._inputs(torch, torch.float16, b, hq, hq, s, 0, d, False, gen)
        lengths = torch.randint(s // 2, s + 1, (b,), generator=gen, device="cuda")
        row_mask = torch.zeros(b, 1, 1, s, device="cuda")
        row_mask.masked_fill_(torch.arange(s, device="cuda")[None, None, None, :] >= lengths[:, None, None, None],
                              torch.finfo(torch.float32).min)
        full = row_mask.expand(b, 1, s, s).contiguous()  # as exported graphs carry it: [B, 1, S, T]
        masks = {"mask_full": full, "mask_row": row_mask, "mask_full_fp16": full.half()}
        out = torch.empty_like(q)
        sdpa_us = bench.graph_us(check._sdpa_fn(torch, q, k, v, full, d ** -0.5, False))
        ref = check._reference(torch, q, k, v, full, d ** -0.5, False)
        for entry, mask_kind in [(e, m) for e in index for m in (masks if e["has_mask"] else [None])]:
            if entry["has_mask"] and (mask_kind == "mask_full_fp16") != (entry.get("mask_dtype") == "float16"):
                continue
            kernel = cuda_launch.CompiledKernel.from_bytes((outdir / entry["file"]).read_bytes())
            mask = masks[mask_kind] if mask_kind else None
            # mask strides broadcast over heads (and over queries for the row mask)
            m_strides = (mask.stride(0), 0, 0 if mask is not None and mask.shape[2] == 1 else s, 1) \
                if mask is not None else None

            def ours(kernel=kernel, mask=mask, m_strides=m_strides, b=b, s=s, hq=hq, d=d, q=q, k=k, v=v, out=out):
                launch.attention_launch({kernel.cc: kernel}, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                        mask.data_ptr() if mask is not None else 0, out.data_ptr(), q.stride(),
                                        k.stride(), v.stride(), out.stride(),
                                        m_strides, B=b, Hq=hq, S=s, T=s,
                                        group=1, scale=d ** -0.5, stream=torch.cuda.current_stream().cuda_stream)

            ours()
            torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item() if entry["has_mask"] else None
            us = bench.graph_us(ours)
            row = {"B": b, "S": s, **entry, "mask": mask_kind, "us": us, "sdpa_us": sdpa_us, "ratio": us / sdpa_us if us else None,
                   "err": err}
            rows.append(row)
            print(f"b{b:<3} s{s:<4} {entry['variant']:18s} {mask_kind or '-':14s} tile {entry['tile']}  {us or 0:7.1f} us"
                  f"  sdpa {sdpa_us or 0:7.1f} us  x{row['ratio'] or 0:.2f}  err {err if err is None else format(err, '.1e')}")
    if json_path:
        json_path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("outdir", type=Path)
    a.add_argument("--cc", type=int, default=90)
    r = sub.add_parser("run")
    r.add_argument("outdir", type=Path)
    r.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.mode == "prepare":
        prepare(args.outdir, args.cc)
        return 0
    return run(args.outdir, args.json)


if __name__ == "__main__":
    sys.exit(main())
