"""fastertrt's TensorRT plugins, one folder each (spec, rules, reference,
kernels, trt). REGISTRY maps plugin name -> the module with its TensorRT creator (the
plugin's trt.py, which the runtime imports: it must not import torch or
onnxscript); adding a plugin is a folder plus one line here."""

import importlib

REGISTRY: dict[str, str] = {}


def register_all(trt_module) -> list[str]:
    """Register every plugin's creator with `trt_module` (tensorrt or tensorrt_rtx)."""
    done = []
    for name, module in REGISTRY.items():
        importlib.import_module(module).register(trt_module)
        done.append(name)
    return done
