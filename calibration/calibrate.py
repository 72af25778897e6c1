"""INT8 calibration of a bundle: samples -> ranges -> int8.onnx (+ its ONNX
Runtime variant), a cache, TensorRT's text cache and an accuracy report."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastertrt.calibration.calibrators import METHODS

from fastertrt.errors import CalibrationCacheError, CalibrationError
from fastertrt.runtime.inputs import int_option
from fastertrt.progress import quiet
from fastertrt.tolerances import tolerance

CALIB_DIR = "calibration"
INT8_GRAPH, INT8_ORT_GRAPH, INT8_WEIGHTS = "int8.onnx", "int8.ort.onnx", "int8.weights.bin"


@dataclass
class CalibrationOptions:
    data: Path | None = None  # .txt, .jsonl or .npz; None: the default English sample set
    text_field: str = "text"
    method: str = "max"
    percentile: float = 99.999
    smooth_alpha: float | None = 0.85  # None: no SmoothQuant
    exclude: list = field(default_factory=list)  # fnmatch patterns on layer (module path), node or weight names
    max_layer_error: float | None = 0.05  # sensitivity pass: widen, then fall back layers above this
    batch_size: int = 16
    max_samples: int | None = None
    embeddings: bool = True  # store embedding tables INT8 (rows dequantized after the Gather)
    cache: Path | None = None  # a cache file to reuse (default: the bundle's own)
    threads: int | None = None

    def __post_init__(self) -> None:
        self.check()  # the Python API fails where the options are made, before any export or calibration

    def check(self) -> None:
        # bad counts from Python (the CLI's argparse types catch them there) must not mean "all" or crash later
        int_option("batch_size (--calib-batch)", self.batch_size, low=1, error=CalibrationError)
        if self.max_samples is not None:
            int_option("max_samples (--calib-samples)", self.max_samples, low=1, error=CalibrationError)
        if self.method not in METHODS:
            raise CalibrationError(f"--calib-method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 50.0 < self.percentile < 100.0:
            raise CalibrationError(f"--percentile must be in (50, 100), e.g. 99.99; got {self.percentile}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise CalibrationError(f"--smooth-alpha must be in [0, 1], got {self.smooth_alpha}")


def _model_digest(graph_file: Path) -> str:
    """sha256 over the graph and the weight files it points to."""
    import hashlib

    import onnx
    from fastertrt.runtime.manifest import sha256_file
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(graph_file), load_external_data=False)
    files = sorted({e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"})
    h = hashlib.sha256(sha256_file(graph_file).encode())
    for f in files:
        h.update(sha256_file(graph_file.parent / f).encode())
    return h.hexdigest()


def _sensitivity(plan, inits, ranges, samples, errors, threshold):
    """Layers whose INT8 error is above `threshold`: first widen their input's
    clip to its full range; those still above fall back to FP32."""
    from fastertrt.calibration.ranges import layer_error

    widened, fallback = [], []
    if threshold is None:
        return widened, fallback
    for act in plan.activations():
        layers = plan.consumers(act)
        if all(errors[layer.node] <= threshold for layer in layers):
            continue
        r = ranges[act]
        if r.amax < r.top:
            wide = dataclasses.replace(r, amax=r.top)
            errs = {layer.node: layer_error(samples[act], layer.weight_kn(inits), wide.amax, wide.smooth)
                    for layer in layers}
            if max(errs.values()) < max(errors[layer.node] for layer in layers):
                ranges[act] = wide
                errors.update(errs)
                widened.append(act)
        fallback.extend(layer.node for layer in layers if errors[layer.node] > threshold)
    return widened, fallback


def _lowering_parity(portable: Path, lowered: Path, outputs, rows, input_names, pad_id, threads) -> dict:
    from fastertrt.calibration.observe import run_batches, session_with_outputs

    a_sess = session_with_outputs(portable, [], threads, optimize=False)
    b_sess = session_with_outputs(lowered, [], threads)
    worst = {"max_abs": 0.0, "min_cosine": 1.0}
    for (mask, a), (_, b) in zip(run_batches(a_sess, rows, 16, input_names, pad_id, outputs),
                                 run_batches(b_sess, rows, 16, input_names, pad_id, outputs)):
        for o in outputs:
            keep = mask.astype(bool)
            x, y = (a[o][keep], b[o][keep]) if a[o].shape[:2] == mask.shape else (a[o], b[o])
            worst["max_abs"] = max(worst["max_abs"], float(np.abs(x - y).max()))
            cos = np.sum(x * y, -1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)
            worst["min_cosine"] = min(worst["min_cosine"], float(cos.min()))
    return worst


def calibrate_stage(stage: Path, manifest: dict, opts: CalibrationOptions, progress=None) -> dict:
    """Calibrate the bundle being written in `stage`; returns the manifest with
    its `int8` section. Writes int8.onnx, int8.ort.onnx, int8.weights.bin and
    calibration/{cache.json, cache.trt.txt, report.json}."""
    from fastertrt.calibration.cache import (
        cache_key,
        ranges_of,
        read_cache,
        stale_reason,
        write_cache,
        write_tensorrt_cache,
    )
    from fastertrt.calibration.dataset import load_samples
    from fastertrt.calibration.graph import (
        Plan,
        excluded,
        find_plan,
        initializer_arrays,
    )
    from fastertrt.calibration.qdq import write_int8_model
    from fastertrt.calibration.ranges import collect_ranges, layer_errors
    from fastertrt.calibration.report import accuracy_report, format_report
    from fastertrt.compiler.export.shared_weights import (
        load_with_weights,
        share_weights,
    )
    from fastertrt.compiler.lower_ort import lower_for_onnxruntime

    progress = progress or quiet()
    opts.check()
    if manifest["kind"] != "encoder":
        raise CalibrationError(f"INT8 calibration handles encoder bundles; this bundle is a {manifest['kind']} "
                               f"(decoder prefill/decode graphs are not calibrated yet). Compile without --int8.")
    graph = manifest["graphs"]["encoder"]
    src = stage / graph["file"]
    info = manifest["model"]
    input_names = [t["name"] for t in graph["inputs"]]
    outputs = [t["name"] for t in graph["outputs"]]
    pad_id = info.get("pad_token_id") or 0
    tok = manifest.get("tokenizer")
    samples = load_samples(stage / tok["file"] if tok else None, int(info.get("max_length", 512)), opts.data,
                           opts.text_field, info.get("vocab_size"), max_samples=opts.max_samples)
    for w in samples.warnings:
        progress.info(f"  warning: {w}")
    if len(samples.calib) < opts.batch_size:
        progress.info(f"  warning: only {len(samples.calib)} calibration sample(s), fewer than one batch of "
                      f"{opts.batch_size}: ranges from so little data are unreliable; give a few hundred samples")
    progress.info(f"  calibration data: {samples.source}: {len(samples.calib)} samples to calibrate on, "
                  f"{len(samples.held_out)} held out for the report")

    model = load_with_weights(src)
    inits = initializer_arrays(model)
    full = find_plan(model, inits)
    skipped = [(layer.name, "output head") for layer in full.layers if layer.head]
    skipped += [(layer.name, f"--exclude {excluded(layer, opts.exclude)}") for layer in full.layers
                if not layer.head and excluded(layer, opts.exclude)]
    plan = Plan([layer for layer in full.layers if not layer.head and not excluded(layer, opts.exclude)],
                full.embeddings if opts.embeddings else [], full.skipped)
    if not plan.layers:
        raise CalibrationError(f"{src.name} has no MatMul/Gemm with a constant weight left to quantize "
                               f"({len(full.layers)} found, {len(skipped)} excluded)")

    key = cache_key(_model_digest(src), samples.digest, opts.method, opts.percentile, opts.smooth_alpha,
                    opts.exclude, opts.max_layer_error)
    cache_file = stage / CALIB_DIR / "cache.json"
    body = None
    if opts.cache is not None:
        body = read_cache(opts.cache)
        if body.get("model_sha256") != key["model_sha256"]:
            raise CalibrationCacheError(
                f"calibration cache {opts.cache} was made for another model (model sha256 "
                f"{str(body.get('model_sha256'))[:12]}, this bundle's graph is {key['model_sha256'][:12]}); "
                f"drop --calib-cache to calibrate this model")
    elif cache_file.is_file():
        body = read_cache(cache_file)
    if body is not None:
        reason = stale_reason(body, key)
        if reason:
            progress.info(f"  calibration cache is stale ({reason}): recalibrating")
            body = None
    if body is not None:
        progress.info("  calibration cache matches the model, data and settings: reusing its ranges")
        ranges = ranges_of(body)
        widened, fallback, errors = body["widened"], body["fallback"], body["layer_errors"]
    else:
        with progress.step(f"calibrate {len(plan.layers)} layers ({len(plan.activations())} activation tensors), "
                           f"method {opts.method}" + (f" {opts.percentile}" if opts.method == "percentile" else "")):
            ranges, rows = collect_ranges(src, plan, inits, samples.calib, input_names, pad_id, opts.method,
                                          opts.percentile, opts.smooth_alpha, opts.batch_size, opts.threads, progress)
            errors = layer_errors(plan, inits, ranges, rows)
            widened, fallback = _sensitivity(plan, inits, ranges, rows, errors, opts.max_layer_error)
    by_node = {layer.node: layer for layer in plan.layers}
    quantized = {layer.node for layer in plan.layers} - set(fallback)
    smoothed = sum(ranges[a].smooth is not None for a in plan.activations())
    progress.info(f"  {len(quantized)} of {len(full.layers)} MatMul/Gemm layers INT8 ({smoothed} inputs smoothed), "
                  f"{len(plan.embeddings)} embedding table(s) INT8")
    for act in widened:
        progress.info(f"    clip widened to the full range (layer error above {opts.max_layer_error}): {act}")
    for node in fallback:
        progress.info(f"    kept FP32 (error {errors[node]:.3f} > {opts.max_layer_error}): {by_node[node].name}")
    for name, why in skipped:
        progress.info(f"    kept FP32 ({why}): {name}")

    with progress.step("write int8.onnx (Q/DQ) and its ONNX Runtime variant"):
        int8 = write_int8_model(model, plan, inits, ranges, quantized)
        lowered, lowered_counts = lower_for_onnxruntime(int8)
        paths = [stage / INT8_GRAPH, stage / INT8_ORT_GRAPH]
        for m, p in zip((int8, lowered), paths):
            _save(m, p)
        share_weights(paths, INT8_WEIGHTS)
    progress.info(f"    ONNX Runtime variant: {', '.join(f'{k} {v}' for k, v in lowered_counts.items())}")
    parity = _lowering_parity(paths[0], paths[1], outputs, samples.held_out[:32], input_names, pad_id, opts.threads)
    tol = tolerance("lowering", "int8")
    progress.info(f"    variant vs int8.onnx on ONNX Runtime: max abs {parity['max_abs']:.3g}, "
                  f"min cosine {parity['min_cosine']:.6f}")
    if parity["min_cosine"] < tol.min_cosine:
        raise CalibrationError(f"the ONNX Runtime variant of int8.onnx disagrees with it (min cosine "
                               f"{parity['min_cosine']:.6f} < {tol.min_cosine}): a lowering bug; report it")
    with progress.step(f"accuracy report on {len(samples.held_out)} held-out samples"):
        report = accuracy_report(src, paths[1], outputs, [by_node[n] for n in sorted(quantized)],
                                 samples.held_out, input_names, pad_id, opts.batch_size, opts.threads)
    progress.info(format_report(report))

    decisions = {"widened": widened, "fallback": fallback, "layer_errors": errors}
    write_cache(cache_file, key, ranges, decisions)
    write_tensorrt_cache(stage / CALIB_DIR / "cache.trt.txt", ranges)
    sizes = {p.name: p.stat().st_size for p in (*paths, stage / INT8_WEIGHTS)}
    summary = {
        "method": opts.method, "percentile": key["percentile"], "smooth_alpha": opts.smooth_alpha,
        "data": samples.to_json(), "model_sha256": key["model_sha256"],
        "layers": {"int8": len(quantized), "total": len(full.layers), "smoothed_inputs": smoothed,
                   "fallback_fp32": [by_node[n].name for n in fallback], "widened": widened,
                   "kept_fp32": [{"layer": n, "why": w} for n, w in skipped]},
        "embeddings_int8": [e.table for e in plan.embeddings],
        "ort_variant": lowered_counts, "ort_variant_parity": parity,
        "bytes": {"int8.onnx + weights": sizes[INT8_GRAPH] + sizes[INT8_WEIGHTS],
                  "int8.ort.onnx + weights": sizes[INT8_ORT_GRAPH] + sizes[INT8_WEIGHTS]},
    }
    report_body = {"calibration": summary, **report}
    tmp = stage / CALIB_DIR / "report.json.tmp"
    tmp.write_text(json.dumps(report_body, indent=1) + "\n")
    os.replace(tmp, stage / CALIB_DIR / "report.json")
    int8_graphs = {"encoder": {"file": INT8_GRAPH, "ort_file": INT8_ORT_GRAPH, "files": [INT8_WEIGHTS]}}
    engines = []
    for e in manifest.get("engines", []):
        if e.get("precision") == "int8":  # built from the previous calibration
            (stage / e["file"]).unlink(missing_ok=True)
            progress.info(f"  removed {e['file']} (built from the previous calibration); rebuild it with: "
                          f"fastertrt build BUNDLE --precision int8 --backend {e['backend']}")
        else:
            engines.append(e)
    if "engines" in manifest:
        manifest = {**manifest, "engines": engines}
    return {**manifest, "default_precision": "int8",
            "int8": {"graphs": int8_graphs, "calibration": summary,
                     "report": {"file": f"{CALIB_DIR}/report.json", "outputs": report["outputs"]},
                     "cache": {"file": f"{CALIB_DIR}/cache.json", "tensorrt_file": f"{CALIB_DIR}/cache.trt.txt"}}}


def _save(model, path: Path) -> None:
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def calibrate_bundle(bundle, opts: CalibrationOptions, progress=None, wait: bool = False) -> Path:
    """`fastertrt calibrate`: (re)calibrate an existing bundle in place, atomically,
    holding the bundle's writer lock (wait: queue behind another writer)."""
    from fastertrt.compiler.bundle import updating, write_manifest

    with updating(bundle, wait=wait) as (stage, manifest):
        write_manifest(stage, calibrate_stage(stage, manifest, opts, progress))
    return Path(bundle).resolve()
