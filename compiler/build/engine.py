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

    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for k in range(layer.num_outputs):
            producer[layer.get_output(k).name] = layer

    def dequantized(t) -> bool:
        """Produced by a DEQUANTIZE layer, possibly through the parser's broadcast reshapes."""
        while t is not None and t.name in producer:
            layer = producer[t.name]
            kind = str(layer.type).rsplit(".", 1)[-1]
            if kind == "DEQUANTIZE":
                return True
            if kind != "SHUFFLE":
                return False
            t = layer.get_input(0)
        return False

    quantized, matmuls = 0, 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if str(layer.type).rsplit(".", 1)[-1] == "MATRIX_MULTIPLY":
            matmuls += 1
            quantized += all(dequantized(layer.get_input(k)) for k in range(layer.num_inputs))

    return {
        "layers": network.num_layers,
        "layer_types": dict(types.most_common()),
        "output_precisions": dict(precisions.most_common()),
        "plugin_layers": plugins,
        "matmul_layers": matmuls,
        "qdq_matmul_layers": quantized,  # both inputs from DEQUANTIZE layers: TensorRT runs them INT8
        "inputs": [io(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [io(network.get_output(i)) for i in range(network.num_outputs)],
    }


def qdq_matmul_nodes(onnx_path: Path) -> int:
    """MatMul/Gemm nodes of a graph whose two inputs are DequantizeLinear outputs."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.op_type in ("MatMul", "Gemm") and n.input[0] in dq and n.input[1] in dq for n in graph.node)


def check_qdq_layers(onnx_path: Path, summary: dict, backend) -> int:
    """Every quantized MatMul of the graph has its Q/DQ layers in the parsed network."""
    want = qdq_matmul_nodes(onnx_path)
    have = summary["qdq_matmul_layers"]
    if have != want:
        raise BuildError(f"{onnx_path.name} has {want} MatMul/Gemm nodes behind DequantizeLinear, but {backend.name} "
                         f"parsed {have} matrix-multiply layers fed by DEQUANTIZE layers: the parser dropped or "
                         f"folded Q/DQ nodes, so those layers would not run INT8")
    return want


def plugin_nodes(onnx_path: Path) -> dict:
    """fastertrt plugin nodes of a graph: op type -> (count, plugin_version)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: dict = {}
    for node in model.graph.node:
        if node.domain == "fastertrt":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if "plugin_namespace" not in attrs:
                raise BuildError(f"plugin node {node.name} ({node.op_type}) lacks plugin_namespace: TensorRT's "
                                 f"parser would inline its ONNX function instead. Re-run `fastertrt compile`.")
            count, version = found.get(node.op_type, (0, attrs.get("plugin_version", b"")))
            found[node.op_type] = (count + 1, version.decode() if isinstance(version, bytes) else str(version))
    return found


def check_plugin_layers(onnx_path: Path, summary: dict, backend) -> list[dict]:
    """One plugin layer per plugin node, or a loud error: when a creator is not
    registered, the parser quietly inlines the node's ONNX function instead."""
    nodes = plugin_nodes(onnx_path)
    want = sum(n for n, _ in nodes.values())
    have = len(summary["plugin_layers"])
    if have != want:
        softmax = summary["layer_types"].get("SOFTMAX", 0)
        raise BuildError(
            f"{onnx_path.name} has {want} fastertrt plugin node(s) ({', '.join(nodes)}) but {backend.name} parsed "
            f"{have} plugin layer(s) and {softmax} SOFTMAX layer(s): TensorRT inlined the plugins' ONNX functions "
            f"instead of using the plugins. Their creators were not found in the plugin registry (namespace "
            f"'fastertrt'); this fastertrt registers them itself, so check that fastertrt.plugins imports cleanly.")
    return [{"name": name, "version": version, "count": count} for name, (count, version) in sorted(nodes.items())]


def _kernel_targets(built_for: list[str]) -> list[int]:
    """Plugin kernels are compiled for the engine's targets; standard TensorRT
    builds for the GPU it runs on."""
    if built_for == ["current"]:
        from fastertrt.runtime.gpu import gpu_compute_capability

        cc = gpu_compute_capability()
        if cc is None:
            raise BuildError("standard TensorRT builds on a GPU, and none is usable here")
        return [int(cc[2:])]
    return [int(t[2:]) for t in built_for]


def build_engine(backend, onnx_path: Path, profiles: list[dict], targets: list[str] | None = None,
                 opt_level: int = 3, timing_cache: Path | None = None) -> tuple[bytes, dict]:
    """Returns (serialized engine, summary)."""
    from fastertrt.plugins import register_all, set_build_targets

    trt = backend.trt
    register_all(trt)  # before parsing: an unregistered plugin node is silently inlined
    logger = _logger(backend)
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{backend.name} {backend.version} cannot parse {onnx_path.name}: {errs or logger.errors}")
    summary = network_summary(network)
    summary["plugins"] = check_plugin_layers(onnx_path, summary, backend)
    check_qdq_layers(onnx_path, summary, backend)

    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if not backend.is_rtx:  # standard TensorRT builds on a GPU: let its inspector see layer details
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    built_for = backend.set_targets(config, list(targets or []))
    set_build_targets(_kernel_targets(built_for))
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
