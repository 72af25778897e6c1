"""`fastertrt bench`: torch eager vs the bundle on ONNX Runtime, same inputs,
one run, each measurement in its own process (peak RSS is per backend)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastertrt.errors import FastertrtError
from fastertrt.runtime.manifest import read_manifest, verify_files
from fastertrt.versions import package_versions

PROMPT_TEXT = ("The history of computing is a story of machines that learned to do arithmetic faster, "
               "then to store programs, then to talk to each other across the world.")


def _encoder_inputs(vocab: int, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _prompt_inputs(bundle: Path, manifest: dict, length: int) -> dict:
    tok = manifest.get("tokenizer")
    ids = []
    if tok:
        from fastertrt.runtime.tokenizer import TextTokenizer

        ids = TextTokenizer(bundle / tok["file"], 1 << 20).encode([PROMPT_TEXT * 4])[0][:length]
    if len(ids) < length:
        rng = np.random.default_rng(length)
        ids = list(ids) + rng.integers(5, manifest["model"]["vocab_size"], length - len(ids)).tolist()
    arr = np.asarray([ids], dtype=np.int64)
    return {"input_ids": arr, "attention_mask": np.ones_like(arr)}


def _measure(spec: dict, workdir: Path) -> dict:
    spec_file = workdir / f"{spec['backend']}-{spec['case']}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "fastertrt.tools.bench_worker", str(spec_file)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise FastertrtError(f"bench worker for {spec['backend']} / {spec['case']} failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(args) -> dict:
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    kind = manifest["kind"]
    if kind == "module":
        raise FastertrtError("bench times encoder and decoder bundles; a module bundle has no standard inputs")
    threads = args.threads or os.cpu_count() or 1
    backends = ["onnxruntime"]
    if manifest.get("engines") and _engine_runnable():
        backends.append("tensorrt")
    has_torch = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    if not args.no_torch:
        if manifest["model"]["source"].get("kind") == "module":
            print("bench: the bundle was compiled from an in-memory model; bench cannot reload it in torch, "
                  "so only the bundle is timed", file=sys.stderr)
        elif has_torch:
            backends.insert(0, "torch")
        else:
            print("bench: torch/transformers not installed: only the bundle is timed", file=sys.stderr)
    info = manifest["model"]
    base = {"bundle": str(bundle.resolve()), "kind": kind, "threads": threads, "source": info["source"],
            "attn_implementation": manifest.get("export", {}).get("attn_implementation", "sdpa"),
            "input_names": info.get("input_names", []), "pad_token_id": info.get("pad_token_id")}
    if kind == "encoder":
        warmup, repeats = args.warmup if args.warmup is not None else 3, args.repeats or 20
        cases = {f"encode b{b} s{args.seq}": _encoder_inputs(info["vocab_size"], b, min(args.seq, info["max_length"]))
                 for b in (args.batch or [1, 8])}
    else:
        warmup, repeats = args.warmup if args.warmup is not None else 1, args.repeats or 3
        prompt = _prompt_inputs(bundle, manifest, args.prompt_len)
        cases = {f"{'greedy' if k == 1 else f'beam-{k}'} b1 prompt{args.prompt_len} +{args.new_tokens}": prompt
                 for k in (getattr(args, "num_beams", None) or [1, 4])}

    results, accuracy = [], {}
    with tempfile.TemporaryDirectory(prefix="fastertrt-bench-") as tmp:
        workdir = Path(tmp)
        rows = [(b, {"precision": "fp32"} if b == "onnxruntime" else {}) for b in backends]
        if kind == "encoder" and manifest.get("int8") and not args.no_int8:
            from fastertrt.tools.bench_int8 import int8_rows

            extra, accuracy = int8_rows(bundle, manifest, args.int8_methods, workdir, threads)
            rows += extra
        for case, inputs in cases.items():
            npz = workdir / f"{len(results)}.npz"
            np.savez(npz, **inputs)
            for backend, extra_spec in rows:
                print(f"  bench {case} on {backend} ({warmup} warm-up + {repeats} timed, {threads} threads) ...",
                      file=sys.stderr, flush=True)
                beams = int(case.split()[0].split("-")[1]) if case.startswith("beam-") else 1
                spec = dict(base, backend=backend, case=case, inputs=str(npz), warmup=warmup, repeats=repeats,
                            new_tokens=args.new_tokens, num_beams=beams, **extra_spec)
                row = _measure(spec, workdir)
                row.update(accuracy.get(backend, {}))
                results.append(row)
    _annotate(results)
    report = {
        "bundle": str(bundle.resolve()), "model": info.get("family"), "source": info["source"], "kind": kind,
        "threads": threads, "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                        "python": platform.python_version()},
        "versions": package_versions("fastertrt", "onnxruntime", "numpy", "torch", "transformers"),
        "results": results,
        "engines": [{k: e[k] for k in ("graph", "backend", "backend_version", "precision", "bytes", "build_seconds",
                                       "layers", "output_precisions", "compute_capabilities")}
                    for e in manifest.get("engines", [])],
    }
    print(format_table(report))
    if accuracy:
        print(format_accuracy(accuracy))
    for e in report["engines"]:
        print(f"engine {e['graph']:<8} {e['backend']} {e['precision']}: {e['bytes'] / 1e6:.1f} MB, "
              f"built in {e['build_seconds']:.2f} s, {e['layers']} layers")
    out = Path(args.output) if args.output else bundle.resolve().parent / f"bench-{bundle.resolve().name}.json"
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return report


def _engine_runnable() -> bool:
    from fastertrt.runtime.engines import installed_backends
    from fastertrt.runtime.gpu import gpu_compute_capability

    return bool(installed_backends()) and gpu_compute_capability() is not None


def _annotate(results: list) -> None:
    """Speed-up vs torch per case, and whether generated tokens agree."""
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["backend"]] = r
    for rows in by_case.values():
        ref = rows.get("torch")
        for r in rows.values():
            if ref:
                r["speedup_vs_torch"] = ref["median_ms"] / r["median_ms"]
                if r["tokens"] and ref["tokens"]:
                    r["same_tokens_as_torch"] = r["tokens"] == ref["tokens"]




def format_accuracy(accuracy: dict) -> str:
    lines = [f"{'INT8 variant':<28} {'held-out mean cos':>17} {'min cos':>9} {'model MB':>9}"]
    for name, a in accuracy.items():
        cos = f"{a['held_out_mean_cosine']:>17.5f} {a['held_out_min_cosine']:>9.5f}" if "held_out_mean_cosine" in a \
            else f"{'-':>17} {'-':>9}"
        lines.append(f"{name:<28} {cos} {a['model_bytes'] / 1e6:>9.2f}")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    dec = report["kind"] == "decoder"
    head = f"{'case':<28} {'backend':<12} {'median ms':>10} {'p90 ms':>9} " + \
        (f"{'tok/s':>8} " if dec else "") + f"{'vs torch':>8} {'peak RSS MB':>11}" + ("  tokens==torch" if dec else "")
    lines = [f"fastertrt bench: {report['model']} ({report['kind']}), {report['threads']} threads, "
             f"{report['machine']['cpus']} CPUs", head, "-" * len(head)]
    for r in report["results"]:
        sp = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        row = f"{r['case']:<28} {r['backend']:<12} {r['median_ms']:>10.2f} {r['p90_ms']:>9.2f} "
        if dec:
            row += f"{r['tokens_per_s']:>8.1f} "
        row += f"{sp:>8} {r['peak_rss_mb']:>11.0f}"
        if dec:
            row += f"  {r.get('same_tokens_as_torch', '-')}"
        lines.append(row)
    return "\n".join(lines)
