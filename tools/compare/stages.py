"""Which stages of a bundle `compare` can run, in pipeline order, and which
stage each is compared with (its neighbour upstream) under which tolerance."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fastertrt.errors import InputError

STAGE_NAMES = ("torch", "model", "fused", "int8", "runtime", "engine")


@dataclass
class Stage:
    name: str                 # one of STAGE_NAMES
    label: str                # what the table shows, e.g. "fused.onnx"
    kind: str                 # torch | onnx | runtime | engine
    path: Path | None = None  # the ONNX file (onnx stages; the runtime's ONNX Runtime file)
    ref: str | None = None    # the stage this one is compared with
    tolerance: tuple = ("export", "fp32")
    entry: dict | None = None  # engine stages: the manifest's engine entry

    @property
    def precision(self) -> str:
        return self.tolerance[1]


def _torch_available(manifest: dict, model_ref: str | None) -> str | None:
    """None when torch can run the model, else why not."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'fastertrt[compile]')"
    if model_ref is None and manifest["model"]["source"]["kind"] == "module":
        return "the bundle was compiled from an in-memory nn.Module; pass --model to compare with torch"
    return None


def _engine(bundle: Path, manifest: dict, graph: str) -> tuple[dict | None, str | None]:
    from fastertrt.runtime.engines import engines_for, installed_backends
    from fastertrt.runtime.gpu import gpu_compute_capability

    found = engines_for(manifest, graph)
    if not found:
        return None, f"the bundle has no engine for {graph} (fastertrt build BUNDLE)"
    entry = found[-1]
    if entry["backend"] not in installed_backends():
        return None, f"{entry['backend']} is not installed here"
    if gpu_compute_capability() is None:
        return None, "running an engine needs an NVIDIA GPU; this machine has none"
    return entry, None


def plan(bundle: Path, manifest: dict, graph: str, wanted: list[str] | None = None,
         model_ref: str | None = None) -> tuple[list[Stage], list[tuple[str, str]]]:
    """(stages to run, [(stage, why it is skipped)]). wanted: stage names; None
    means every stage this machine can run."""
    unknown = [w for w in wanted or [] if w not in STAGE_NAMES]
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGE_NAMES)}")
    g = manifest["graphs"][graph]
    int8 = (manifest.get("int8") or {}).get("graphs", {}).get(graph)
    candidates: list[Stage] = []
    skipped: list[tuple[str, str]] = []
    why = _torch_available(manifest, model_ref)
    if why is None:
        candidates.append(Stage("torch", "torch", "torch"))
    elif wanted is None or "torch" in wanted:
        skipped.append(("torch", why))
    exported = g.get("exported") or g["file"]
    candidates.append(Stage("model", exported, "onnx", bundle / exported, tolerance=("export", "fp32")))
    if g["file"] != exported:
        candidates.append(Stage("fused", g["file"], "onnx", bundle / g["file"], tolerance=("rewrite", "fp32")))
    if int8:
        candidates.append(Stage("int8", int8["file"], "onnx", bundle / int8["file"], tolerance=("int8", "int8")))
    from fastertrt.runtime import _ort_files

    precision = manifest.get("default_precision", "fp32")
    runtime_file = _ort_files(bundle, manifest, None)[graph]
    candidates.append(Stage("runtime", f"runtime ({runtime_file})", "runtime", bundle / runtime_file,
                            tolerance=("lowering", "int8") if precision == "int8" else ("runtime", "fp32")))
    entry, why = _engine(bundle, manifest, graph)
    if entry:
        candidates.append(Stage("engine", f"engine ({entry['file']})", "engine", entry=entry,
                                tolerance=("engine", entry["precision"])))
    elif wanted is None or "engine" in wanted:
        skipped.append(("engine", why))

    stages = [s for s in candidates if wanted is None or s.name in wanted]
    onnx_before: Stage | None = None
    previous: Stage | None = None
    for s in stages:
        # the runtime and the engine run the graph they were made from: the last ONNX stage
        s.ref = (onnx_before.name if onnx_before else None) if s.kind in ("runtime", "engine") else (
            previous.name if previous else None)
        if s.kind == "engine" and s.ref is None and previous is not None:
            s.ref = previous.name
        if s.kind == "onnx":
            onnx_before = s
        if s.kind != "engine":
            previous = s
    if len(stages) < 2:
        raise InputError(f"compare needs two stages to compare; graph {graph} has {[s.name for s in stages]} "
                         f"of the ones asked for" + (f" (skipped: {'; '.join(f'{n}: {w}' for n, w in skipped)})"
                                                     if skipped else ""))
    return stages, skipped
