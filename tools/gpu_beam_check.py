"""Check the beam-step plugin's cubins on a real GPU against torch and time them.

Two steps on two machines:

    python tools/gpu_beam_check.py prepare OUTDIR                 # here: triton compiles the cubins
    python tools/gpu_beam_check.py run OUTDIR --json results.json # on the GPU machine

`prepare` needs triton (no GPU) and writes each variant's plugin fields (the
blobs that the TensorRT plugin serializes) plus manifest.json. `run` needs only
numpy, torch (CUDA), cuda.bindings and this repository's fastertrt/ and plugins/
(found by path when fastertrt is not installed): it launches the cubins through
beam_step_launch, the same call the plugin's enqueue makes, and compares them
with the float64 numpy reference (beam_step_numpy: same flat indices, the tie
rule included; scores within the kernel tolerance) and with the torch composite

    acc = (log_softmax(logits.float()) + beam_scores.view(-1, 1)).view(B, K*V)
    scores, flat = acc.topk(2K);  tokens = flat % V;  beams = flat // V

then times both (CUDA events around each call, median; also CUDA-graph replay,
which leaves out Python launch cost) and prints a table and a JSON summary.
Exit status 1 when a result is wrong. `run --cpu-dry-run` exercises the
comparison and report code on the CPU with the numpy reference standing in for
the kernels (no GPU; for checking this script).
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

# (tag, logits dtype, has_bias): the plugin variants `run` needs
VARIANTS = [
    ("fp16", "float16", 0),
    ("fp32", "float32", 0),
    ("fp16_bias", "float16", 1),
    ("bf16_bias", "bfloat16", 1),
]
DEVICE = "cuda"  # the helpers below take it from here (--cpu-dry-run sets "cpu")
ATOL = 1e-5      # tolerances.tolerance("kernel", "fp32"): scores vs the float64 reference


# -----------------------------------------------------------------------------
# prepare (compile machine)
# -----------------------------------------------------------------------------
def prepare(outdir: Path, targets: tuple[int, ...], jobs: int) -> None:
    from fastertrt.plugins.beam_search.kernels import compile_kernels
    from fastertrt.plugins.cuda_launch import unpack_kernels

    outdir.mkdir(parents=True, exist_ok=True)
    manifest = {"targets": list(targets), "variants": {}}
    start = time.perf_counter()
    for tag, dtype, has_bias in VARIANTS:
        blobs = compile_kernels(dtype, bool(has_bias), targets, jobs=jobs)
        files = {}
        for field, blob in blobs.items():
            path = outdir / f"{tag}.{field}.ftk"
            path.write_bytes(blob)
            files[field] = path.name
        sizes = {field: {str(cc): {"cubin_bytes": len(k.cubin), "shared": k.shared, "num_warps": k.num_warps}
                         for cc, k in unpack_kernels(blob).items()} for field, blob in blobs.items()}
        manifest["variants"][tag] = {"dtype": dtype, "has_bias": has_bias, "files": files, "kernels": sizes,
                                     "blob_bytes": sum(map(len, blobs.values()))}
        print(f"{tag:10s} {len(blobs)} fields, {sum(map(len, blobs.values())) // 1024} KB of blobs "
              f"(sm_{', sm_'.join(map(str, targets))})")
    common.write_manifest(outdir, manifest, f"{len(VARIANTS)} variants", start)


# -----------------------------------------------------------------------------
# run (GPU machine)
# -----------------------------------------------------------------------------
def _import_fastertrt():
    """fastertrt's launcher modules and the numpy reference, installed or from this checkout."""
    return common.import_plugins("cuda_launch", "beam_search.launch", "beam_search.reference")


def _configs():
    """(label, variant tag, B, K, V, candidates, data, timed). data: how the logits
    are made (see _inputs). The timed ones are the issue's: batch 8 x 4 beams."""
    out = []
    for v in (49152, 50257):
        for tag in ("fp16", "fp32"):
            out.append((f"{tag} b8 k4 v{v}", tag, 8, 4, v, 2, "randn", True))
    out += [
        ("fp16 b1 k4 v50257", "fp16", 1, 4, 50257, 2, "randn", True),
        ("fp16 greedy b8 k1 v50257", "fp16", 8, 1, 50257, 1, "randn", True),
        ("fp16 b8 k8 v50257 (k16)", "fp16", 8, 8, 50257, 2, "randn", True),
        ("fp16 b32 k4 v32000", "fp16", 32, 4, 32000, 2, "randn", True),
        ("fp16 b8 k4 v151936", "fp16", 8, 4, 151936, 2, "randn", True),
        # correctness only: other classes, bias, bf16, hard rows
        ("fp32 b4 k8 c4 v50257 (k32)", "fp32", 4, 8, 50257, 4, "randn", False),
        ("fp32 b2 k8 c8 v50257 (k64)", "fp32", 2, 8, 50257, 8, "randn", False),
        ("fp16+bias(-inf) b8 k4 v50257", "fp16_bias", 8, 4, 50257, 2, "randn", True),
        ("bf16+bias(-inf) b8 k4 v50257", "bf16_bias", 8, 4, 50257, 2, "randn", False),
        ("fp16 few finite b4 k2 c4 v50257", "fp16", 4, 2, 50257, 4, "few_finite", False),
        ("fp16 ties b4 k4 v50257", "fp16", 4, 4, 50257, 2, "ties", False),
        ("fp32 flat rows b2 k4 v1000", "fp32", 2, 4, 1000, 2, "flat", False),
        ("fp16 shortlist overflow b2 k2 v50257", "fp16", 2, 2, 50257, 2, "strided", False),
        ("fp32 small vocab b3 k2 c4 v7", "fp32", 3, 2, 7, 4, "randn", False),
    ]
    return out


def _inputs(torch, dtype, b, k, v, has_bias, data, gen):
    """logits [B*K, V] (dtype), beam_scores [B, K] fp32, bias [V] fp32 or None."""
    logits = torch.randn(b * k, v, generator=gen, device=DEVICE) * 3.0
    beam_scores = -torch.rand(b, k, generator=gen, device=DEVICE) * 5.0
    if data == "few_finite":  # batch row 0: every beam keeps 3 tokens, the rest -inf
        keep = torch.randint(0, v, (k, 3), generator=gen, device=DEVICE)
        row = torch.full((k, v), float("-inf"), device=DEVICE)
        row.scatter_(1, keep, logits[:k].gather(1, keep))
        logits[:k] = row
    elif data == "ties":  # equal logits in a row, across blocks; identical beams with equal scores
        top = float(logits.max()) + 1.0
        logits[:, [5, 4097, 4098, v - 1]] = top
        logits = logits.view(b, k, v)
        logits[:, 1] = logits[:, 0]
        logits = logits.reshape(b * k, v)
        beam_scores[:] = beam_scores[:, :1]
    elif data == "flat":
        logits.fill_(0.5)
        beam_scores.fill_(-1.0)
    elif data == "strided":  # every 16th token far ahead: the block kernel's shortlist overflows
        logits[:, ::16] += 12.0
    bias = None
    if has_bias:
        bias = torch.randn(v, generator=gen, device=DEVICE)
        bias[torch.rand(v, generator=gen, device=DEVICE) < 0.3] = float("-inf")
    return logits.to(dtype).contiguous(), beam_scores.contiguous(), bias


def _torch_step(torch, logits, beam_scores, bias, k):
    """The torch composite a graph without the plugin runs."""
    b, beams = beam_scores.shape
    lp = torch.log_softmax(logits.float(), dim=-1)
    if bias is not None:
        lp = lp + bias
    acc = (lp + beam_scores.view(-1, 1)).view(b, -1)
    scores, flat = acc.topk(k, dim=-1)
    v = logits.shape[1]
    return scores, (flat % v).int(), (flat // v).int()


def _compare(np, reference, logits, beam_scores, bias, candidates, got) -> dict:
    """Our (or torch's) outputs against the float64 reference: exact flat indices,
    else only swaps of near-equal scores (|a - b| <= ATOL in float64); scores close."""
    x = logits.float().cpu().numpy()
    bs = beam_scores.cpu().numpy()
    bi = bias.cpu().numpy() if bias is not None else None
    want_scores, want_tokens, want_beams = reference.beam_step_numpy(x, bs, bi, candidates)
    scores, tokens, beams = (t.cpu().numpy() for t in got)
    v = x.shape[1]
    flat = beams.astype(np.int64) * v + tokens
    want_flat = want_beams.astype(np.int64) * v + want_tokens
    exact = bool(np.array_equal(flat, want_flat))
    swaps_ok = exact
    if not exact:
        lp = reference.log_softmax(x)
        if bi is not None:
            lp = lp + bi.astype(np.float64)[None, :]
        acc = (lp + bs.reshape(-1, 1).astype(np.float64)).reshape(bs.shape[0], -1)
        a = np.take_along_axis(acc, np.clip(flat, 0, acc.shape[1] - 1), 1)
        w = np.take_along_axis(acc, want_flat, 1)
        same = np.isclose(a, w, rtol=0, atol=ATOL) | (np.isneginf(a) & np.isneginf(w))
        swaps_ok = bool(same.all() and all(len(set(r)) == len(r) for r in flat.tolist()))
    finite = np.isfinite(want_scores)
    err = float(np.abs(scores[finite].astype(np.float64) - want_scores[finite]).max()) if finite.any() else 0.0
    inf_ok = bool(np.array_equal(np.isneginf(scores), np.isneginf(want_scores)))
    return {"indices_exact": exact, "indices_ok": swaps_ok, "score_err": err,
            "ok": swaps_ok and inf_ok and err <= ATOL and not np.isnan(scores).any()}


def _fake_launch(torch, reference, tensors):
    """--cpu-dry-run: the numpy reference writes the outputs, standing in for the cubins."""
    def launch(kernels, cc, *, logits, logits_dtype, beam_scores, bias, scores, tokens, beams, workspace, batch,
               num_beams, vocab, k, stream):
        t = tensors
        s, tok, bm = reference.beam_step_numpy(t["logits"].float().numpy(), t["beam_scores"].numpy(),
                                               t["bias"].numpy() if t["bias"] is not None else None,
                                               k // num_beams)
        t["scores"].copy_(torch.from_numpy(s))
        t["tokens"].copy_(torch.from_numpy(tok))
        t["beams"].copy_(torch.from_numpy(bm))
    return launch


def run(outdir: Path, json_path: Path | None, iters: int, warmup: int, only: str | None,
        cpu_dry_run: bool = False) -> int:
    global DEVICE
    import numpy as np
    import torch

    cuda_launch, launch, reference = _import_fastertrt()
    manifest = json.loads((outdir / "manifest.json").read_text())
    kernels = {tag: {field: cuda_launch.unpack_kernels((outdir / name).read_bytes())
                     for field, name in info["files"].items()}
               for tag, info in manifest["variants"].items()}
    triton_version = next(iter(next(iter(kernels["fp16"].values())).values())).tags.get("triton")
    if cpu_dry_run:
        DEVICE, cc, dev = "cpu", 90, "cpu (dry run: numpy reference instead of the cubins)"
    else:
        cc, dev = common.cuda_device(torch, cuda_launch)
    print(f"device: {dev} (sm_{cc}), torch {torch.__version__}, cubins from triton {triton_version}")
    bench = common.Bench(torch, iters, warmup, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def check(row, label, tag, b, k_beams, v, candidates, data, timed):
        info = manifest["variants"][tag]
        dtype = getattr(torch, info["dtype"])
        k = candidates * k_beams
        row.update({"variant": tag, "B": b, "K": k_beams, "V": v, "k": k, "dtype": info["dtype"],
                    "bias": bool(info["has_bias"]), "data": data})
        logits, beam_scores, bias = _inputs(torch, dtype, b, k_beams, v, info["has_bias"], data, gen)
        scores = torch.empty(b, k, device=DEVICE)
        tokens = torch.empty(b, k, device=DEVICE, dtype=torch.int32)
        beams = torch.empty(b, k, device=DEVICE, dtype=torch.int32)
        ws_bytes = launch.workspace_bytes(b * k_beams, v, k)
        # garbage in the workspace, as TensorRT leaves it: the kernels must not rely on zeros
        workspace = torch.randint(0, 256, (max(ws_bytes, 1),), device=DEVICE, dtype=torch.uint8)
        row["workspace_kb"] = ws_bytes / 1024
        tensors = {"logits": logits, "beam_scores": beam_scores, "bias": bias, "scores": scores,
                   "tokens": tokens, "beams": beams}
        step = _fake_launch(torch, reference, tensors) if cpu_dry_run else launch.beam_step_launch
        def ours():
            # the stream is looked up per call: under CUDA-graph capture torch makes a side stream current
            stream = 0 if cpu_dry_run else torch.cuda.current_stream().cuda_stream
            step(kernels[tag], cc, logits=logits.data_ptr(), logits_dtype=info["dtype"],
                 beam_scores=beam_scores.data_ptr(), bias=bias.data_ptr() if bias is not None else 0,
                 scores=scores.data_ptr(), tokens=tokens.data_ptr(), beams=beams.data_ptr(),
                 workspace=workspace.data_ptr(), batch=b, num_beams=k_beams, vocab=v, k=k, stream=stream)

        def theirs():
            return _torch_step(torch, logits, beam_scores, bias, k)

        ours()
        if not cpu_dry_run:
            torch.cuda.synchronize()
        first = (scores.clone(), tokens.clone(), beams.clone())
        cmp = _compare(np, reference, logits, beam_scores, bias, candidates, first)
        row.update({f"ours_{key}": val for key, val in cmp.items() if key != "ok"})
        ref_torch = _compare(np, reference, logits, beam_scores, bias, candidates, theirs())
        row["torch_indices_exact"] = ref_torch["indices_exact"]
        row["torch_score_err"] = ref_torch["score_err"]
        t_scores, t_tokens, t_beams = theirs()
        row["same_indices_as_torch"] = bool(torch.equal(t_tokens.cpu(), first[1].cpu())
                                            and torch.equal(t_beams.cpu(), first[2].cpu()))
        ours()  # again, on the workspace the first call left: same answer
        if not cpu_dry_run:
            torch.cuda.synchronize()
        row["repeatable"] = bool(torch.equal(scores, first[0]) and torch.equal(tokens, first[1])
                                 and torch.equal(beams, first[2]))
        row["ok"] = cmp["ok"] and row["repeatable"]
        if timed:
            bench.against(row, ours, theirs, "torch")
            row["speedup"] = row["torch_ms"] / row["ours_ms"]
            if row["ours_graph_us"] and row["torch_graph_us"]:
                row["graph_speedup"] = row["torch_graph_us"] / row["ours_graph_us"]
            row["host_us_per_step"] = bench.host_us(ours)

    rows = common.run_configs(_configs(), only, check, _print_row)
    failures = sum(not r["ok"] for r in rows)
    timed_rows = [r for r in rows if "speedup" in r]
    result = {"device": dev, "cc": cc, "torch": torch.__version__, "triton": triton_version, "iters": iters,
              "atol": ATOL, "rows": rows, "failures": failures,
              "min_speedup": min((r["speedup"] for r in timed_rows), default=None),
              "min_graph_speedup": min((r["graph_speedup"] for r in timed_rows if "graph_speedup" in r),
                                       default=None)}
    common.write_json(json_path, result)
    table = [{"label": r["label"], "ok": r["ok"], "score_err": r.get("ours_score_err"),
              **{key: r[key] for key in ("ours_ms", "torch_ms", "speedup", "ours_graph_us", "torch_graph_us",
                                         "graph_speedup", "host_us_per_step", "error") if key in r}}
             for r in rows]
    print("JSON " + json.dumps({"device": dev, "failures": failures, "min_speedup": result["min_speedup"],
                                "min_graph_speedup": result["min_graph_speedup"], "table": table}))
    print(f"{len(rows) - failures}/{len(rows)} right")
    return 1 if failures else 0


def _print_row(row: dict) -> None:
    common.print_row(row, 38, lambda f: (
        f"idx {'=' if row['ours_indices_exact'] else '~'}"
        f"{'' if row['ours_indices_ok'] else '!'} err {f('ours_score_err', '.1e')}"
        f" (torch idx {'=' if row['torch_indices_exact'] else '~'}, err {f('torch_score_err', '.1e')})  "
        + common.timing_columns(f, "torch", "speedup", "graph_speedup", "host_us_per_step")))


def main(argv=None) -> int:
    parser, p, r = common.parser(__doc__, "launch, compare with numpy and torch, time (GPU; no triton)",
                                 iters=200, warmup=20)
    p.add_argument("--jobs", type=int, default=0, help="compile processes (default: the CPU count)")
    r.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU: the numpy reference stands in for the kernels (checks this script)")
    args = parser.parse_args(argv)
    if args.mode == "prepare":
        import os

        prepare(args.outdir, common.targets(args.targets), args.jobs or os.cpu_count() or 1)
        return 0
    return run(args.outdir, args.json, args.iters, args.warmup, args.only, args.cpu_dry_run)


if __name__ == "__main__":
    sys.exit(main())
