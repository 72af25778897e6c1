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


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM is per address space; ru_maxrss
    would also carry the peak of the (large) bench process that forked this one."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    n, beams = spec["new_tokens"], spec.get("num_beams", 1)

    def fn():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, num_beams=beams, pad_token_id=spec["pad_token_id"])
    return fn, lambda r: r[:, ids.shape[1]:].tolist()


def _onnx_file_case(spec, inputs):
    """A plain ONNX file on ONNX Runtime (the peer quantizers' output), full optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec["threads"]
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(spec["model_path"], opts, providers=["CPUExecutionProvider"])
    ids = inputs["input_ids"]
    feeds = {"input_ids": ids, "attention_mask": inputs["attention_mask"], "token_type_ids": np.zeros_like(ids)}
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    return (lambda: sess.run(None, feeds)), lambda r: None


def _runtime_case(spec, inputs):
    from fastertrt.runtime import load

    backend = "tensorrt" if spec["backend"] == "tensorrt" else "onnxruntime"
    model = load(spec["bundle"], threads=spec["threads"], backend=backend, precision=spec.get("precision"))
    ids = inputs["input_ids"]
    if spec["kind"] == "encoder":
        return (lambda: model.encode(ids)), lambda r: None
    n, beams = spec["new_tokens"], spec.get("num_beams", 1)
    return (lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, num_beams=beams)), \
        lambda r: r.sequences[:, ids.shape[1]:].tolist()


def main(argv=None) -> int:
    spec = json.loads(open((argv or sys.argv[1:])[0]).read())
    inputs = dict(np.load(spec["inputs"]))
    t0 = time.perf_counter()
    make = {"torch": _torch_case, "onnx-file": _onnx_file_case}.get(spec.get("runner", spec["backend"]), _runtime_case)
    fn, tokens_of = make(spec, inputs)
    load_s = time.perf_counter() - t0
    times, result = _timed(fn, spec["warmup"], spec["repeats"])
    ms = np.array(times) * 1e3
    out = {
        "backend": spec["backend"], "case": spec["case"], "load_s": round(load_s, 3),
        "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()), "repeats": len(times), "warmup": spec["warmup"], "threads": spec["threads"],
        "peak_rss_mb": _peak_rss_mb(),
        "tokens": tokens_of(result),
    }
    if spec["kind"] == "decoder":
        out["tokens_per_s"] = spec["new_tokens"] * inputs["input_ids"].shape[0] / (out["median_ms"] / 1e3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
