"""One bench measurement in its own process, so its peak RSS is its own.

python -m fastertrt.tools.bench_worker SPEC.json  -> one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np


def _timed(fn, warmup: int, repeats: int) -> tuple[list[float], object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _torch_case(spec, inputs):
    import torch

    from fastertrt.compiler.models import resolve

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = resolve(spec["source"]["ref"]).load_torch(spec["attn_implementation"])
    ids = torch.from_numpy(inputs["input_ids"])
    mask = torch.from_numpy(inputs["attention_mask"])
    if spec["kind"] == "encoder":
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in spec["input_names"]:
            feeds["token_type_ids"] = torch.zeros_like(ids)

        def fn():
            with torch.inference_mode():
                return model(**feeds).last_hidden_state
        return fn, lambda r: None
    n = spec["new_tokens"]

    def fn():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=spec["pad_token_id"])
    return fn, lambda r: r[:, ids.shape[1]:].tolist()


def _runtime_case(spec, inputs):
    from fastertrt.runtime import load

    backend = "tensorrt" if spec["backend"] == "tensorrt" else "onnxruntime"
    model = load(spec["bundle"], threads=spec["threads"], backend=backend)
    ids = inputs["input_ids"]
    if spec["kind"] == "encoder":
        return (lambda: model.encode(ids)), lambda r: None
    n = spec["new_tokens"]
    return (lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n)), \
        lambda r: r.sequences[:, ids.shape[1]:].tolist()


def main(argv=None) -> int:
    spec = json.loads(open((argv or sys.argv[1:])[0]).read())
    inputs = dict(np.load(spec["inputs"]))
    t0 = time.perf_counter()
    make = _torch_case if spec["backend"] == "torch" else _runtime_case
    fn, tokens_of = make(spec, inputs)
    load_s = time.perf_counter() - t0
    times, result = _timed(fn, spec["warmup"], spec["repeats"])
    ms = np.array(times) * 1e3
    out = {
        "backend": spec["backend"], "case": spec["case"], "load_s": round(load_s, 3),
        "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()), "repeats": len(times), "warmup": spec["warmup"], "threads": spec["threads"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "tokens": tokens_of(result),
    }
    if spec["kind"] == "decoder":
        out["tokens_per_s"] = spec["new_tokens"] * inputs["input_ids"].shape[0] / (out["median_ms"] / 1e3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
