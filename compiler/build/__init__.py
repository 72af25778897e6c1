"""Build stage: bundle graphs -> serialized TensorRT engines in the bundle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastertrt.compiler.build.backends import load_backend
from fastertrt.compiler.build.engine import build_engine, inspect_engine
from fastertrt.compiler.build.precision import PRECISIONS, write_cast_graph
from fastertrt.compiler.build.shapes import resolve_profiles
from fastertrt.runtime.manifest import sha256_file

from fastertrt.errors import BuildError
from fastertrt.progress import quiet


@dataclass
class BuildOptions:
    backend: str = "tensorrt-rtx"
    precision: str = "fp32"
    shapes: str | None = None
    targets: list = field(default_factory=list)
    opt_level: int = 3
    timing_cache: Path | None = None


def engine_name(graph: str, opts: BuildOptions) -> str:
    return f"engines/{graph}.{opts.precision}.{opts.backend}.engine"


def _source_graphs(stage: Path, manifest: dict, precision: str, progress) -> dict:
    """graph name -> ONNX file the engine is built from (cast copies for fp16/bf16,
    kept in the bundle so ONNX Runtime can run the same graph)."""
    from fastertrt.compiler.export.shared_weights import share_weights

    graphs = manifest["graphs"]
    if precision == "int8":  # explicit Q/DQ: the calibrated graph is the engine's source
        int8 = manifest.get("int8", {}).get("graphs", {})
        missing = [name for name in graphs if name not in int8]
        if missing:
            raise BuildError(f"the bundle has no INT8 graph for {', '.join(missing)}; calibrate it first: "
                             f"fastertrt calibrate BUNDLE (or compile with --int8)")
        return {name: stage / int8[name]["file"] for name in graphs}
    if precision == "fp32":
        return {name: stage / g["file"] for name, g in graphs.items()}
    out = {}
    for name, g in graphs.items():
        src = stage / g["file"]
        dst = src.with_name(f"{src.stem}.{precision}.onnx")
        with progress.step(f"{precision} graph for {name}: MatMul/Gemm in {precision}, the rest FP32"):
            stats = write_cast_graph(src, dst, precision)
        progress.info(f"    {stats['compute_nodes']} MatMul/Gemm in {precision}, {stats['weights_converted']} weights converted")
        out[name] = dst
    if len(out) > 1:
        share_weights(list(out.values()), f"weights.{precision}.bin")
    return out


def add_engines(stage: Path, manifest: dict, opts: BuildOptions, progress=None) -> dict:
    """Build one engine per graph into `stage`; return the manifest with its
    `engines` entries (replacing earlier ones of the same backend + precision)."""
    progress = progress or quiet()
    if opts.precision not in PRECISIONS + ("int8",):
        raise BuildError(f"precision must be one of {', '.join(PRECISIONS + ('int8',))}, got {opts.precision!r}")
    backend = load_backend(opts.backend)
    max_len = int(manifest["model"].get("max_length", 512))
    profiles = {name: resolve_profiles(name, g["inputs"], opts.shapes, max_len)
                for name, g in manifest["graphs"].items()}  # bad specs fail before any work
    sources = _source_graphs(stage, manifest, opts.precision, progress)
    engines = [e for e in manifest.get("engines", [])
               if not (e["backend"] == opts.backend and e["precision"] == opts.precision)]
    (stage / "engines").mkdir(exist_ok=True)
    for name, src in sources.items():
        with progress.step(f"build {opts.backend} {opts.precision} engine for {name} "
                           f"({len(profiles[name])} profile(s))"):
            data, summary = build_engine(backend, src, profiles[name], opts.targets, opts.opt_level, opts.timing_cache)
        rel = engine_name(name, opts)
        path = stage / rel
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        entry = {
            "graph": name, "file": rel, "source_onnx": src.relative_to(stage).as_posix(),
            "backend": opts.backend, "backend_version": backend.version, "precision": opts.precision,
            "profiles": profiles[name], "bytes": len(data), "sha256": sha256_file(path),
            **summary,
        }
        if not backend.is_rtx:  # standard TensorRT builds for the GPU it ran on
            from fastertrt.runtime.gpu import gpu_compute_capability

            entry["built_on_cc"] = gpu_compute_capability()
            layers_file = path.with_suffix(".layers.json")
            tmp = layers_file.with_name(layers_file.name + ".tmp")  # the staged file is a link to the old bundle's
            tmp.write_text(json.dumps(inspect_engine(backend, data), indent=1))
            os.replace(tmp, layers_file)
            entry["engine_layers_file"] = layers_file.relative_to(stage).as_posix()
        engines.append(entry)
        progress.info(f"    {rel}: {len(data) / 1e6:.1f} MB in {summary['build_seconds']:.1f} s, "
                      f"{summary['layers']} layers, precisions {summary['output_precisions']}, "
                      f"targets {','.join(summary['compute_capabilities'])}")
    return {**manifest, "engines": engines}


def build_bundle(bundle, opts: BuildOptions, progress=None, wait: bool = False) -> Path:
    """`fastertrt build`: (re)build engines of an existing bundle, atomically:
    the bundle is linked into a staging folder, engines added, then swapped in."""
    from fastertrt.compiler.bundle import updating, write_manifest

    bundle = Path(bundle).resolve()
    with updating(bundle, wait=wait) as (stage, manifest):
        write_manifest(stage, add_engines(stage, manifest, opts, progress))
    return bundle
