"""The thin runtime: load a bundle and run it. Imports numpy, onnxruntime and
tokenizers only (never torch or transformers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastertrt.bundle.schema import PRECISIONS
from fastertrt.errors import InputError
from fastertrt.runtime.inputs import int_option
from fastertrt.runtime.manifest import read_manifest, verify_files
from fastertrt.runtime.models import Decoder, Encoder, Generation, ModuleRunner

BACKENDS = ("auto", "onnxruntime", "tensorrt")
_CLASSES = {"encoder": Encoder, "decoder": Decoder, "module": ModuleRunner}

__all__ = ["load", "Encoder", "Decoder", "ModuleRunner", "Generation", "BACKENDS"]


def load(bundle, backend: str = "auto", threads: int | None = None, verify: bool = True,
         precision: str | None = None, cuda_graphs: bool = False, trusted_keys=None):
    """Load a bundle folder: check its manifest (schema, file hashes), open each
    graph on the backend, return an Encoder, Decoder or ModuleRunner.

    backend: "auto" runs the bundle's TensorRT engines when a matching TensorRT
    and GPU are here, else ONNX Runtime (saying why, once); "tensorrt" or
    "onnxruntime" force one. precision picks among engines (default: the last built) and, on
    ONNX Runtime, between the FP32 graphs and the calibrated INT8 ones ("int8"; the
    default when the bundle was calibrated); the model's `backend` and `precision` say
    which ran. trusted_keys: Ed25519 public keys (PEM files, PEM bytes or 64 hex digits);
    when given, the bundle must carry a valid signature by one of them (fastertrt
    sign), checked before any other file is read."""
    bundle = Path(bundle)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS} (or None: the bundle's default), got {precision!r}")
    if threads is not None:
        threads = int_option("threads (None: all cores)", threads, low=1)
    if trusted_keys is not None and not verify:
        raise InputError("trusted_keys checks the signature over the file hashes; it cannot be used with verify=False")
    if isinstance(trusted_keys, (str, bytes, os.PathLike)):
        trusted_keys = [trusted_keys]
    manifest = read_manifest(bundle, trusted_keys=trusted_keys)
    if verify:
        verify_files(bundle, manifest)
    graphs, ran = None, "onnxruntime"
    if backend in ("auto", "tensorrt"):
        graphs = _tensorrt_graphs(bundle, manifest, precision, cuda_graphs, strict=backend == "tensorrt")
        ran = "tensorrt"
    if graphs is None:
        from fastertrt.runtime.onnxruntime_backend import OrtGraph

        precision = precision or manifest.get("default_precision", "fp32")
        files = _ort_files(bundle, manifest, precision)
        graphs = {name: OrtGraph(bundle / files[name], g, threads) for name, g in manifest["graphs"].items()}
        ran = "onnxruntime"
    else:
        precision = next(iter(graphs.values())).entry["precision"]
    model = _CLASSES[manifest["kind"]](bundle, manifest, graphs)
    model.backend, model.precision = ran, precision
    return model


def _ort_files(bundle: Path, manifest: dict, precision: str | None) -> dict:
    """graph name -> the file ONNX Runtime runs for `precision` (None: the bundle's default)."""
    from fastertrt.errors import BundleError

    precision = precision or manifest.get("default_precision", "fp32")
    if precision in ("fp16", "bf16"):
        raise InputError(f"precision {precision} runs on the bundle's TensorRT engines only (built with fastertrt "
                         f"build --precision {precision}); on ONNX Runtime this bundle runs fp32"
                         + (" or int8" if manifest.get("int8") else "") + ". Pass precision='fp32', or "
                         "backend='tensorrt' on a GPU with the engine's TensorRT")
    if precision != "int8":  # the ORT variant (ORT's own fused operators) where the bundle has one
        return {name: g.get("ort_file", g["file"]) for name, g in manifest["graphs"].items()}
    int8 = manifest.get("int8", {}).get("graphs", {})
    missing = [name for name in manifest["graphs"] if name not in int8]
    if missing:
        raise BundleError(f"bundle {bundle} has no INT8 graph for {', '.join(missing)}; calibrate it with: "
                          f"fastertrt calibrate {bundle}")
    return {name: int8[name].get("ort_file", int8[name]["file"]) for name in manifest["graphs"]}


_SAID: set = set()


def _tensorrt_graphs(bundle: Path, manifest: dict, precision, cuda_graphs: bool, strict: bool):
    """TrtGraph per graph, or None (auto mode) with the reason printed once."""
    from fastertrt.errors import EngineMismatchError, FastertrtError
    from fastertrt.runtime.engines import engines_for

    chosen = {}
    for name in manifest["graphs"]:
        found = engines_for(manifest, name, precision)
        if not found:
            if strict:
                raise EngineMismatchError(f"bundle {bundle} has no {precision or ''} engine for graph {name}; "
                                          f"build one with: fastertrt build {bundle}")
            return None
        chosen[name] = found[-1]
    try:
        from fastertrt.runtime.tensorrt_backend import TrtGraph

        return {name: TrtGraph(bundle / e["file"], e, cuda_graphs)
                for name, e in chosen.items()}
    except FastertrtError as exc:
        if strict:
            raise
        if str(bundle) not in _SAID:
            _SAID.add(str(bundle))
            print(f"fastertrt: running {bundle.name} on ONNX Runtime: {exc}", file=sys.stderr)
        return None
