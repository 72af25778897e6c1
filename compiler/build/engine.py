"""Parse one ONNX graph into a strongly typed TensorRT network and build a
serialized engine, with a summary of what was built (from the parsed network
and the builder config: the engine inspector would need a GPU)."""

from __future__ import annotations

import collections
import time
from pathlib import Path

from fastertrt.errors import BuildError


def _logger(backend):
    trt = backend.trt

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return Collecting()


def _dtype(dt) -> str:
    return str(dt).rsplit(".", 1)[-1].lower()


def network_summary(network) -> dict:
    """Layer count, layer types, output precisions and I/O of a parsed network."""
    types, precisions, plugins = collections.Counter(), collections.Counter(), []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).rsplit(".", 1)[-1]
        types[kind] += 1
        if kind.startswith("PLUGIN"):
            plugins.append(layer.name)
        for k in range(layer.num_outputs):
            precisions[_dtype(layer.get_output(k).dtype)] += 1

    def io(t):
        return {"name": t.name, "dtype": _dtype(t.dtype), "shape": list(t.shape)}

    return {
        "layers": network.num_layers,
        "layer_types": dict(types.most_common()),
        "output_precisions": dict(precisions.most_common()),
        "plugin_layers": plugins,
        "inputs": [io(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [io(network.get_output(i)) for i in range(network.num_outputs)],
    }


def build_engine(backend, onnx_path: Path, profiles: list[dict], targets: list[str] | None = None,
                 opt_level: int = 3, timing_cache: Path | None = None) -> tuple[bytes, dict]:
    """Returns (serialized engine, summary)."""
    trt = backend.trt
    logger = _logger(backend)
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{backend.name} {backend.version} cannot parse {onnx_path.name}: {errs or logger.errors}")
    summary = network_summary(network)

    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if not backend.is_rtx:  # standard TensorRT builds on a GPU: let its inspector see layer details
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    built_for = backend.set_targets(config, list(targets or []))
    backend.load_timing_cache(config, timing_cache)
    net_inputs = {t["name"] for t in summary["inputs"]}
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, shapes in prof["inputs"].items():
            if name in net_inputs:
                p.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(p)

    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    took = time.perf_counter() - start
    if blob is None:
        raise BuildError(f"{backend.name} {backend.version} failed to build {onnx_path.name}: "
                         + ("; ".join(logger.errors[-5:]) or "no error message"))
    backend.save_timing_cache(config, timing_cache)
    data = bytes(blob)
    if not data:
        raise BuildError(f"{backend.name} returned an empty engine for {onnx_path.name}")
    summary.update(build_seconds=round(took, 3), compute_capabilities=built_for,
                   builder_optimization_level=int(opt_level))
    return data, summary


def inspect_engine(backend, data: bytes) -> dict | None:
    """Per-layer information from TensorRT's engine inspector. It needs a
    deserialized engine, so a GPU: only standard TensorRT builds (which run on
    one) get it; TensorRT-RTX builds made without a GPU record the parsed
    network's summary instead."""
    if backend.is_rtx:
        return None
    import json

    trt = backend.trt
    runtime = trt.Runtime(_logger(backend))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BuildError(f"{backend.name} could not deserialize the engine it just built")
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
