"""Engine entries of a bundle: choosing one, and every check that can be made
before the first CUDA call (backend, version, GPU target, plugins, shapes)."""

from __future__ import annotations

import importlib.util

from fastertrt.errors import EngineMismatchError, PluginMissingError, ShapeOutOfProfileError

TRT_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def engines_for(manifest: dict, graph: str, precision: str | None = None) -> list[dict]:
    return [e for e in manifest.get("engines", []) if e["graph"] == graph
            and (precision is None or e["precision"] == precision)]


def installed_backends() -> dict:
    """backend name -> version of the TensorRT packages importable here (imports them)."""
    out = {}
    for name, module in TRT_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            try:
                out[name] = __import__(module).__version__
            except Exception:  # noqa: BLE001 - a broken install is the same as none here
                continue
    return out


def check_compatible(entry: dict, backend_versions: dict, gpu_cc: str | None) -> None:
    """Raise EngineMismatchError naming both sides when `entry` cannot run here."""
    backend, built = entry["backend"], entry["backend_version"]
    if backend not in backend_versions:
        have = ", ".join(f"{k} {v}" for k, v in backend_versions.items()) or "no TensorRT package"
        raise EngineMismatchError(
            f"engine {entry['file']} was built by {backend} {built}, but this Python has {have}. "
            f"Install {backend}=={built}, or rebuild with: fastertrt build BUNDLE --backend "
            f"{'tensorrt' if backend == 'tensorrt-rtx' else 'tensorrt-rtx'}")
    running = backend_versions[backend]
    # Serialized engines are only valid for the exact TensorRT release that built them.
    if _release(running) != _release(built):
        raise EngineMismatchError(
            f"engine {entry['file']} was built by {backend} {built}; this is {backend} {running}. "
            f"Engines do not load across TensorRT releases: install {backend}=={built} or rebuild the "
            f"engine here with: fastertrt build BUNDLE --backend {backend}")
    targets = [t for t in entry.get("compute_capabilities", []) if t != "current"]
    if gpu_cc is not None and targets and gpu_cc not in targets:
        raise EngineMismatchError(
            f"engine {entry['file']} targets {', '.join(targets)}; this GPU is {gpu_cc}. Rebuild with "
            f"--targets {gpu_cc}" + (" (tensorrt-rtx has no sm90: use --backend tensorrt on the Hopper box)"
                                     if gpu_cc == "sm90" else ""))
    if gpu_cc is not None and not targets and entry.get("built_on_cc") not in (None, gpu_cc):
        raise EngineMismatchError(
            f"engine {entry['file']} was built on a {entry['built_on_cc']} GPU; this GPU is {gpu_cc}. "
            f"Rebuild it on this GPU with: fastertrt build BUNDLE --backend tensorrt")


def _release(version: str) -> str:
    return ".".join(version.split(".")[:3])


def check_plugins(entry: dict) -> None:
    from fastertrt.plugins import REGISTRY

    missing = [p for p in entry.get("plugins", []) if p.get("name") not in REGISTRY]
    if missing:
        names = ", ".join(f"{p.get('name')} v{p.get('version', '?')}" for p in missing)
        raise PluginMissingError(
            f"engine {entry['file']} uses the plugin(s) {names}, which this fastertrt "
            f"({', '.join(REGISTRY) or 'no plugins'}) cannot provide. Install the fastertrt version that built "
            f"the bundle ({entry.get('fastertrt_version', 'see manifest')}) or rebuild the engine.")


def find_profile(entry: dict, shapes: dict) -> int:
    """Index of the first optimization profile whose [min, max] holds every input
    shape; ShapeOutOfProfileError listing the ranges otherwise."""
    reasons = []
    for idx, prof in enumerate(entry["profiles"]):
        bad = []
        for name, shape in shapes.items():
            rng = prof["inputs"].get(name)
            if rng is None:
                continue
            if len(shape) != len(rng["min"]) or any(not lo <= s <= hi for s, lo, hi in zip(shape, rng["min"], rng["max"])):
                bad.append(f"{name} {list(shape)} not within {rng['min']}..{rng['max']}")
        if not bad:
            return idx
        reasons.append(f"profile {idx} ({_dims(prof)}): " + "; ".join(bad[:2]))
    raise ShapeOutOfProfileError(
        f"input shapes fit no optimization profile of {entry['file']}: " + " | ".join(reasons)
        + ". Rebuild with wider --shapes (fastertrt build BUNDLE --shapes ...) or split the batch.")


def _dims(prof: dict) -> str:
    return ", ".join(f"{d}={r[0]}:{r[1]}:{r[2]}" for d, r in prof.get("dims", {}).items())
