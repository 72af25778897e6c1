"""What every plugin's trt.py shares: the GPU targets that the next engine
builds compile kernels for, and registering a creator once per TensorRT module.
Imports neither TensorRT nor Triton."""

from __future__ import annotations

import threading

_BUILD_TARGETS: list[int] = []
_REGISTERED: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def set_build_targets(ccs) -> None:
    """Compute capabilities (ints, e.g. [80, 86, 89]) to compile kernels for in
    the next engine builds; the build stage sets them from its targets."""
    _BUILD_TARGETS[:] = sorted({int(c) for c in ccs})


def build_targets(default) -> list[int]:
    return list(_BUILD_TARGETS) if _BUILD_TARGETS else list(default)


def register(trt_module, plugin_name: str, namespace: str, make_classes) -> None:
    """Register the creator that make_classes(trt_module) returns (second item)
    with trt_module's plugin registry, once per module."""
    with _LOCK:
        key = (trt_module.__name__, plugin_name)
        if key in _REGISTERED:
            return
        _, creator_cls = make_classes(trt_module)
        creator = creator_cls()
        trt_module.get_plugin_registry().register_creator(creator, namespace)
        _REGISTERED[key] = creator  # the registry holds a pointer: keep the Python object alive
