"""fastertrt's TensorRT plugins, one folder each (spec, rules, reference,
kernels, trt). REGISTRY maps plugin name -> the module with its TensorRT creator (the
plugin's trt.py, which the runtime imports: it must not import torch or
onnxscript); adding a plugin is a folder plus one line here."""

import importlib
import sys

REGISTRY: dict[str, str] = {"FastertrtAttention": "fastertrt.plugins.attention.trt",
                            "FastertrtBeamStep": "fastertrt.plugins.beam_search.trt"}
# plugin name -> the module with its rewrite rules (find_blocks, rule_set, explain,
# attach_functions); compile-time only (it imports onnxscript)
REWRITES: dict[str, str] = {"FastertrtAttention": "fastertrt.plugins.attention.rules",
                            "FastertrtBeamStep": "fastertrt.plugins.beam_search.rules"}
# plugin name -> module with `lower(node, consts)`: the node as ONNX
# Runtime's own operators, for the ORT variants of graphs (compile time)
ORT_LOWERINGS: dict[str, str] = {"FastertrtAttention": "fastertrt.plugins.attention.ort"}


def register_all(trt_module) -> list[str]:
    """Register every plugin's creator with `trt_module` (tensorrt or tensorrt_rtx)."""
    done = []
    for name, module in REGISTRY.items():
        importlib.import_module(module).register(trt_module)
        done.append(name)
    return done


def set_build_targets(ccs) -> None:
    """GPU compute capabilities (ints) that plugin kernels are compiled for in the
    next engine builds."""
    from fastertrt.plugins import trt_common

    trt_common.set_build_targets(ccs)


# Importing fastertrt.plugins registers the creators with any TensorRT already
# imported (people who build or deserialize engines with TensorRT directly); the
# build stage and the runtime call register_all themselves, before parsing.
for _name in ("tensorrt", "tensorrt_rtx"):
    if _name in sys.modules:
        register_all(sys.modules[_name])
