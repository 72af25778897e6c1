"""The thin runtime: load a bundle and run it. Imports numpy, onnxruntime and
tokenizers only (never torch or transformers)."""

from __future__ import annotations

import sys
from pathlib import Path

from fastertrt.runtime.manifest import read_manifest, verify_files
from fastertrt.runtime.models import Decoder, Encoder, Generation, ModuleRunner

BACKENDS = ("auto", "onnxruntime", "tensorrt")
_CLASSES = {"encoder": Encoder, "decoder": Decoder, "module": ModuleRunner}

__all__ = ["load", "Encoder", "Decoder", "ModuleRunner", "Generation", "BACKENDS"]


def load(bundle, backend: str = "auto", threads: int | None = None, verify: bool = True,
         precision: str | None = None, cuda_graphs: bool = False):
    """Load a bundle folder: check its manifest (schema, file hashes), open each
    graph on the backend, return an Encoder, Decoder or ModuleRunner.

    backend: "auto" runs the bundle's TensorRT engines when a matching TensorRT
    and GPU are here, else ONNX Runtime (saying why, once); "tensorrt" or
    "onnxruntime" force one. precision picks among engines (default: the last built) and, on
    ONNX Runtime, between the FP32 graphs and the calibrated INT8 ones ("int8"; the
    default when the bundle was calibrated)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if verify:
        verify_files(bundle, manifest)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    graphs = None
    if backend in ("auto", "tensorrt"):
        graphs = _tensorrt_graphs(bundle, manifest, precision, cuda_graphs, strict=backend == "tensorrt")
    if graphs is None:
        from fastertrt.runtime.onnxruntime_backend import OrtGraph

        files = _ort_files(bundle, manifest, precision)
        graphs = {name: OrtGraph(bundle / files[name], g, threads) for name, g in manifest["graphs"].items()}
    return _CLASSES[manifest["kind"]](bundle, manifest, graphs)


def _ort_files(bundle: Path, manifest: dict, precision) -> dict:
    """graph name -> the file ONNX Runtime runs for `precision`."""
    from fastertrt.errors import BundleError

    precision = precision or manifest.get("default_precision", "fp32")
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
