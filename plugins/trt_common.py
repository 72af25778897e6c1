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


def plugin_base(trt):
    """The IPluginV3 base every fastertrt plugin shares for `trt` (tensorrt or
    tensorrt_rtx): the four interfaces initialised one by one (super().__init__()
    alone crashes the bindings) and the runtime hooks that have nothing to do."""

    class PluginBase(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, name: str, version: str, namespace: str, num_outputs: int):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = name, version, namespace
            self.num_outputs = num_outputs

        def get_capability_interface(self, type):
            return self

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def serialize(self, fields: list):
            """fields: (name, numpy array, PluginFieldType). A PluginField points into
            its array without owning it, so the arrays stay alive on the plugin."""
            self._field_arrays = fields
            return trt.PluginFieldCollection([trt.PluginField(*f) for f in fields])

    return PluginBase


def kernel_field(trt, name: str, blob: bytes):
    """A serialized-kernels plugin field (bytes as INT8)."""
    import numpy as np

    return (name, np.frombuffer(blob, dtype=np.int8).copy(), trt.PluginFieldType.INT8)


def creator_base(trt):
    """The IPluginCreatorV3One base: name, version, namespace and the declared
    fields. The parser drops ONNX attributes a creator does not declare, silently."""

    class CreatorBase(trt.IPluginCreatorV3One):
        def __init__(self, name: str, version: str, namespace: str, int_fields=(), float_fields=(), blob_fields=()):
            import numpy as np

            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = name, version, namespace
            self._field_arrays = [(n, np.array([0], dtype=np.int32), trt.PluginFieldType.INT32) for n in int_fields]
            self._field_arrays += [(n, np.array([1.0], dtype=np.float32), trt.PluginFieldType.FLOAT32)
                                   for n in float_fields]
            self._field_arrays += [(n, np.array([0], dtype=np.int8), trt.PluginFieldType.INT8) for n in blob_fields]
            self.field_names = trt.PluginFieldCollection([trt.PluginField(*f) for f in self._field_arrays])

    return CreatorBase
