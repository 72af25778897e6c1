"""polygraphy runners for every stage `compare` runs: polygraphy's own ONNX
Runtime runner (over a session that can mark intermediate tensors as outputs)
and TensorRT runner, plus fastertrt runners with polygraphy's runner interface
for the torch model and for fastertrt's runtime."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastertrt.errors import MissingDependencyError


def require_polygraphy() -> None:
    import importlib.util

    if importlib.util.find_spec("polygraphy") is None:
        raise MissingDependencyError("fastertrt compare runs its stages with polygraphy, which this Python lacks: "
                                     "pip install 'fastertrt[compile]' (or: pip install polygraphy)")


def ort_session(path: Path, outputs: list[str] | None = None, threads: int | None = None):
    """An ONNX Runtime session over the graph as written (no ORT fusions, which could
    make two different graphs compute alike). outputs: extra tensors to return
    (marked as graph outputs in memory; the bundle's file is not touched)."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not outputs:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in model.graph.output}
    for name in outputs:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    # weights stay in the bundle's weight files, found through this folder
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent.resolve()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, name: str, outputs: list[str] | None = None):
    """polygraphy's OnnxrtRunner over `path`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: ort_session(path, outputs), name=name)


def _metadata(spec: list[dict]):
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for t in spec:
        meta.add(t["name"], dtype=np.dtype(t["dtype"]), shape=[d if isinstance(d, int) else None for d in t["shape"]])
    return meta


def _base():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


def torch_runner(manifest: dict, graph: str, model_ref: str | None = None, name: str = "torch"):
    """The torch model the bundle was exported from (or `model_ref`: a shipped name
    or Hugging Face folder), wrapped exactly as the exporter wrapped it."""

    class TorchRunner(_base()):
        def __init__(self):
            super().__init__(name=name, prefix="torch-runner")

        def activate_impl(self):
            from fastertrt.compiler.export.wrappers import DecoderGraph, EncoderGraph
            from fastertrt.compiler.models import resolve

            info = manifest["model"]
            ref = model_ref or info["source"]["ref"]
            impl = manifest.get("export", {}).get("attn_implementation") or "sdpa"
            model = resolve(str(ref)).load_torch(impl)
            if manifest["kind"] == "encoder":
                self.module = EncoderGraph(model, info["input_names"], info.get("pooling")).eval()
                self.inputs = list(info["input_names"])
            else:
                self.module = DecoderGraph(model, int(info["num_layers"]), graph == "decode",
                                           int(info.get("beam_candidates", 4))).eval()
                self.inputs = self.module.input_names()
            self.outputs = self.module.output_names()

        def get_input_metadata_impl(self):
            return _metadata(manifest["graphs"][graph]["inputs"])

        def infer_impl(self, feed_dict):
            import torch

            start = time.time()
            with torch.no_grad():
                got = self.module(*(torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in self.inputs))
            self.inference_time = time.time() - start
            return OrderedDict((n, t.numpy()) for n, t in zip(self.outputs, got))

        def deactivate_impl(self):
            del self.module

    return TorchRunner()


def runtime_runner(bundle: Path, graph: str, backend: str = "onnxruntime", name: str = "runtime"):
    """fastertrt's runtime as a production process loads the bundle (`fastertrt.runtime.load`)."""

    class RuntimeRunner(_base()):
        def __init__(self):
            super().__init__(name=name, prefix="fastertrt-runtime")

        def activate_impl(self):
            from fastertrt.runtime import load

            self.model = load(bundle, backend=backend, verify=False)
            self.graph = self.model.graphs[graph]

        def get_input_metadata_impl(self):
            return _metadata(self.graph.spec["inputs"] if hasattr(self.graph, "spec")
                             else self.model.manifest["graphs"][graph]["inputs"])

        def infer_impl(self, feed_dict):
            start = time.time()
            out = self.graph.run(dict(feed_dict))
            self.inference_time = time.time() - start
            return OrderedDict(out)

        def deactivate_impl(self):
            del self.graph, self.model

    return RuntimeRunner()


def engine_runner(bundle: Path, entry: dict, name: str):
    """polygraphy's TensorRT runner over the bundle's engine, fastertrt's plugins registered."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from fastertrt.plugins import register_all
    from fastertrt.runtime.engines import TRT_MODULES

    module = __import__(TRT_MODULES[entry["backend"]])
    register_all(module)
    return TrtRunner(EngineFromBytes((Path(bundle) / entry["file"]).read_bytes()), name=name)
