"""INT8 rows of `fastertrt bench` for a calibrated encoder bundle: ONNX
Runtime's dynamic INT8 quantization of the exported graph (the peer:
quantize_dynamic, per channel, what Hugging Face optimum's CPU configs run)
and fastertrt's INT8 for each calibration method asked for, with their
accuracy against the FP32 graph on the bundle's held-out samples."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from fastertrt.calibration.calibrators import METHODS


def _peer_model(bundle: Path, manifest: dict, workdir: Path) -> Path:
    from fastertrt.compiler.export.shared_weights import load_with_weights
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exported = bundle / manifest["graphs"]["encoder"].get("exported", manifest["graphs"]["encoder"]["file"])
    plain = workdir / "exported.onnx"
    import onnx

    onnx.save(load_with_weights(exported), str(plain))  # one self-contained file, as users hand it to ORT
    out = workdir / "ort-dynamic-int8.onnx"
    quantize_dynamic(str(plain), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def _methods(choice: str, own: str) -> list[str]:
    if choice == "own":
        return [own]
    if choice == "all":
        return [own] + [m for m in METHODS if m != own]
    picked = [m.strip() for m in choice.split(",") if m.strip()]
    bad = [m for m in picked if m not in METHODS]
    if bad:
        from fastertrt.errors import FastertrtError

        raise FastertrtError(f"--int8-methods takes own, all or a list of {', '.join(METHODS)}; got {bad}")
    return picked


def _bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def int8_rows(bundle: Path, manifest: dict, choice: str, workdir: Path, threads: int):
    """([(row name, spec fields)], {row name: accuracy and size})."""
    from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    from fastertrt.progress import Progress

    calib = manifest["int8"]["calibration"]
    own = calib["method"]
    rows, variants = [], {}
    print("  bench: quantizing the exported graph with onnxruntime quantize_dynamic (the peer) ...", file=sys.stderr)
    peer = _peer_model(bundle, manifest, workdir)
    rows.append(("ort-dynamic-int8", {"runner": "onnx-file", "model_path": str(peer)}))
    variants["ort-dynamic-int8"] = (peer, _bytes([peer]))
    for method in _methods(choice, own):
        name = f"int8-{method}"
        target = bundle
        if method != own:
            target = workdir / f"bundle-{method}"
            from fastertrt.compiler.bundle import link_or_copy

            shutil.copytree(bundle, target, copy_function=link_or_copy)
            data = calib["data"]["source"]
            print(f"  bench: calibrating a copy with method {method} ...", file=sys.stderr, flush=True)
            calibrate_bundle(target, CalibrationOptions(
                data=Path(data) if Path(data).is_file() else None, method=method,
                percentile=calib.get("percentile") or 99.999, smooth_alpha=calib.get("smooth_alpha")),
                Progress(enabled=False))
        int8 = manifest["int8"]["graphs"]["encoder"]
        rows.append((name, {"bundle": str(Path(target).resolve()), "precision": "int8"}))
        variants[name] = (Path(target) / int8["ort_file"], _bytes([Path(target) / int8["ort_file"],
                                                                   *(Path(target) / f for f in int8["files"])]))
    return rows, _accuracy(bundle, manifest, variants, threads)


def _accuracy(bundle: Path, manifest: dict, variants: dict, threads: int) -> dict:
    """Cosine vs the FP32 graph of the sentence output on the held-out samples."""
    from fastertrt.calibration.dataset import load_samples
    from fastertrt.calibration.observe import run_batches, session_with_outputs

    graph = manifest["graphs"]["encoder"]
    info = manifest["model"]
    outputs = [t["name"] for t in graph["outputs"]]
    out = "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]
    names = [t["name"] for t in graph["inputs"]]
    calib = manifest["int8"]["calibration"]
    data = calib["data"]["source"]
    tok = manifest.get("tokenizer")
    samples = load_samples(bundle / tok["file"] if tok else None, int(info.get("max_length", 512)),
                           Path(data) if Path(data).is_file() else None, vocab_size=info.get("vocab_size"))
    pad = info.get("pad_token_id") or 0
    ref = [o[out] for _, o in run_batches(session_with_outputs(bundle / graph["file"], [], threads),
                                          samples.held_out, 16, names, pad, [out])]
    result = {}
    for name, (path, size) in variants.items():
        sess = session_with_outputs(path, [], threads)
        got = [o[out] for _, o in run_batches(sess, samples.held_out, 16, names, pad, [out])]
        cos = []
        for a, b in zip(ref, got):
            a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
            cos.extend((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30))
        result[name] = {"held_out_mean_cosine": float(np.mean(cos)), "held_out_min_cosine": float(np.min(cos)),
                        "held_out_samples": len(cos), "model_bytes": size, "output": out}
    return result
