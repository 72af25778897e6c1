"""The thin runtime: load a bundle and run it. Imports numpy, onnxruntime and
tokenizers only (never torch or transformers)."""

from __future__ import annotations

from pathlib import Path

from fastertrt.runtime.manifest import read_manifest, verify_files
from fastertrt.runtime.models import Decoder, Encoder, Generation, ModuleRunner

BACKENDS = ("auto", "onnxruntime")
_CLASSES = {"encoder": Encoder, "decoder": Decoder, "module": ModuleRunner}

__all__ = ["load", "Encoder", "Decoder", "ModuleRunner", "Generation", "BACKENDS"]


def load(bundle, backend: str = "auto", threads: int | None = None, verify: bool = True):
    """Load a bundle folder: check its manifest (schema, file hashes), open each
    graph on the backend, return an Encoder, Decoder or ModuleRunner."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if verify:
        verify_files(bundle, manifest)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from fastertrt.runtime.onnxruntime_backend import OrtGraph

    graphs = {name: OrtGraph(bundle / g["file"], g, threads) for name, g in manifest["graphs"].items()}
    return _CLASSES[manifest["kind"]](bundle, manifest, graphs)
