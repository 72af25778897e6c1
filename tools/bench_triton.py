"""`fastertrt bench --triton`: an encoder bundle served by a local tritonserver
(the export-triton repository, dynamic batching) against the same runtime in
process, at several client concurrencies, one run, side by side. Each request
is one sentence; requests/s and per-request latency (p50, p99) per row."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fastertrt.errors import InputError

WORDS = ("fast engines serve every request of the day while the model reads each token of the text and "
         "returns one embedding").split()


def _texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + i % 12)) for i in range(n)]


def _percentiles(lat_ms: list[float]) -> dict:
    arr = np.asarray(lat_ms)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def _drive(call, texts: list[str], concurrency: int) -> dict:
    """Run call(text) for every text from `concurrency` threads; requests/s and latencies."""
    lat = []
    lock = threading.Lock()

    def one(text):
        start = time.perf_counter()
        call(text)
        with lock:
            lat.append((time.perf_counter() - start) * 1e3)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, texts))
    wall = time.perf_counter() - start
    return {"requests": len(texts), "requests_per_s": len(texts) / wall, **_percentiles(lat)}


def run_triton_bench(bundle: Path, env: Path, concurrencies=(1, 8, 32), requests: int = 256,
                     instances: int = 1, threads: int | None = None, output: Path | None = None) -> dict:
    import tritonclient.http as http

    import fastertrt
    from fastertrt.runtime.manifest import read_manifest
    from fastertrt.serve.repository import TritonOptions, export_repository
    from fastertrt.serve.server import TritonServer

    if read_manifest(bundle)["kind"] != "encoder":
        raise InputError("bench --triton times encoder bundles (one sentence per request)")
    texts = _texts(requests)
    rows = []
    local = fastertrt.load(bundle, backend="onnxruntime", threads=threads)
    local.encode(texts[:4])
    for c in concurrencies:
        rows.append({"backend": "in-process runtime", "concurrency": c,
                     **_drive(lambda t: local.encode([t]), texts, c)})
    with tempfile.TemporaryDirectory(prefix="fastertrt-bench-") as tmp:
        opts = TritonOptions(name="model", env=env, instances=instances, threads=threads)
        info = export_repository(bundle, Path(tmp) / "models", opts)
        # the repository is temporary, the server's log is kept next to the bundle
        log = bundle.resolve().parent / f"{bundle.resolve().name}.bench-triton.log"
        with TritonServer(Path(tmp) / "models", python=info["python"], log=log) as server:
            clients = threading.local()

            def call(text):
                if not hasattr(clients, "c"):
                    clients.c = http.InferenceServerClient(server.http, concurrency=1)
                arr = np.array([[text.encode()]], dtype=object)
                inp = http.InferInput("TEXT", [1, 1], "BYTES")
                inp.set_data_from_numpy(arr)
                clients.c.infer("model", [inp], timeout=300)

            for t in texts[:8]:
                call(t)
            for c in concurrencies:
                before = server.model_stats("model")
                row = {"backend": "tritonserver (python backend)", "concurrency": c, **_drive(call, texts, c)}
                after = server.model_stats("model")
                row["executions"] = after[1] - before[1]
                row["mean_batch"] = (after[0] - before[0]) / max(1, after[1] - before[1])
                rows.append(row)
    result = {"bundle": str(bundle), "requests_per_row": requests, "instances": instances, "threads": threads,
              "rows": rows, "server_log": str(log)}
    print(f"{'backend':<32} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}")
    for r in rows:
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        print(f"{r['backend']:<32} {r['concurrency']:>4} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {batch:>10}")
    print(f"tritonserver log: {log}")
    if output:
        Path(output).write_text(json.dumps(result, indent=1))
        print(f"wrote {output}")
    return result

