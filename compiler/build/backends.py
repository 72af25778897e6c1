"""The two TensorRT Python packages behind one small interface.

`tensorrt-rtx` (import tensorrt_rtx) builds ahead of time on a machine with no
GPU for a list of compute capabilities; `tensorrt` (standard TensorRT 10/11)
builds for the GPU it runs on. Their network, parser, profile and builder APIs
agree; every difference lives in this file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from fastertrt.errors import BuildError, MissingDependencyError
from fastertrt.runtime.engines import TRT_MODULES

BACKENDS = TRT_MODULES  # backend name -> import name
INSTALL = {"tensorrt-rtx": "pip install 'fastertrt[rtx]'",
           "tensorrt": "pip install 'fastertrt[tensorrt]' on a machine with an NVIDIA GPU and driver"}
# TensorRT-RTX's own targets (it has no Hopper, sm_90).
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_RTX_TARGETS = ("sm80", "sm86", "sm89")


@dataclass
class Backend:
    name: str  # "tensorrt-rtx" or "tensorrt"
    trt: object  # the imported module
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def network_flags(self) -> int:
        # Precision comes from the graph (casts, Q/DQ): strongly typed everywhere.
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    def set_targets(self, config, targets: list[str]) -> list[str]:
        """Compute capabilities to build for. TensorRT-RTX compiles for each listed
        target without a GPU; standard TensorRT builds for the GPU present."""
        if not self.is_rtx:
            if targets:
                raise BuildError(f"backend tensorrt builds for the GPU it runs on; --targets "
                                 f"{','.join(targets)} is for tensorrt-rtx. Drop --targets or use --backend tensorrt-rtx")
            return ["current"]
        targets = list(targets or DEFAULT_RTX_TARGETS)
        bad = [t for t in targets if t not in RTX_TARGETS]
        if bad:
            raise BuildError(f"tensorrt-rtx {self.version} cannot target {', '.join(bad)}; it supports "
                             f"{', '.join(RTX_TARGETS)} (no sm90: Hopper needs --backend tensorrt)")
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(getattr(self.trt.ComputeCapability, t.upper()), i)
        return targets

    def load_timing_cache(self, config, path: Path | None) -> object | None:
        if path is None or self.is_rtx:  # TensorRT-RTX's timing cache calls are no-ops
            return None
        blob = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def save_timing_cache(self, config, path: Path | None) -> None:
        if path is None or self.is_rtx:
            return
        data = config.get_timing_cache().serialize()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)


def _ensure_rtx_parser_lib() -> None:
    """tensorrt_rtx's ONNX parser dlopens `libtensorrt_rtx.so` when a node is a
    plugin, but the wheel ships only `libtensorrt_rtx.so.1`: add the link."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(list(spec.submodule_search_locations)[0])
    link, target = folder / "libtensorrt_rtx.so", folder / "libtensorrt_rtx.so.1"
    if target.exists() and not link.exists():
        try:
            link.symlink_to(target.name)
        except FileExistsError:
            pass
        except OSError as exc:
            raise BuildError(f"cannot create {link} -> {target.name} ({exc}); the ONNX parser needs it for "
                             f"plugin nodes. Create it once with: ln -s {target.name} {link}") from exc


def load_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise BuildError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module = BACKENDS[name]
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"backend {name} needs the Python package {module}, which is not installed. "
                                     f"Install it with: {INSTALL[name]}")
    if name == "tensorrt-rtx":
        _ensure_rtx_parser_lib()
    trt = importlib.import_module(module)
    return Backend(name, trt, trt.__version__)
