"""What `fastertrt inspect` reads from the graph files and engines themselves
(the manifest records the rest): each stage's size and node counts, plugin
nodes by type, Q/DQ counts and per-layer precision of the INT8 graph, engine
layers where the backend can read the engine, and the checks that say a
bundle is sound."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

LAYER_OPS = ("MatMul", "Gemm")


def stage_files(manifest: dict) -> list[tuple[str, str, str]]:
    """(graph, stage, file) in pipeline order, each file once."""
    out, seen = [], set()
    int8 = (manifest.get("int8") or {}).get("graphs", {})
    for name, g in manifest["graphs"].items():
        for stage, file in (("exported", g.get("exported")), ("fused" if g.get("exported") else "graph", g["file"]),
                            ("ort variant", g.get("ort_file")), ("int8", int8.get(name, {}).get("file")),
                            ("int8 ort variant", int8.get(name, {}).get("ort_file"))):
            if file and file not in seen:
                seen.add(file)
                out.append((name, stage, file))
    return out


def _weights(model, folder: Path) -> list[str]:
    from onnx import TensorProto

    files = []
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in files:
                files.append(loc)
    return files


def _int8_layers(model) -> list[tuple[str, str, str]]:
    """(module path, op, precision) of every weight layer and embedding gather:
    INT8 where its weight arrives through a DequantizeLinear of int8 data."""
    from fastertrt.calibration.graph import layer_name

    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in LAYER_OPS:
            slot = 1
        elif node.op_type == "Gather":
            slot = 0
        else:
            continue
        src = producer.get(node.input[slot])
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            out.append((layer_name(node), node.op_type, "int8"))
        elif node.input[slot] in inits and node.op_type in LAYER_OPS:
            out.append((layer_name(node), node.op_type, "fp32"))
    return out


def graph_lines(bundle: Path, manifest: dict, layers: bool) -> tuple[list[str], list[str]]:
    """(lines, problems) for every ONNX file of the bundle."""
    if importlib.util.find_spec("onnx") is None:
        return ["stages   per-file details need onnx (pip install 'fastertrt[compile]')"], []
    import onnx

    from fastertrt.plugins.functions import check_functions

    lines, problems = [], []
    for graph, stage, file in stage_files(manifest):
        path = bundle / file
        if not path.is_file():
            continue  # the file checks below name it
        model = onnx.load(str(path), load_external_data=False)
        weights = _weights(model, path.parent)
        size = path.stat().st_size + sum((path.parent / w).stat().st_size for w in weights
                                         if (path.parent / w).is_file())
        ops = Counter(n.op_type for n in model.graph.node)
        plugins = Counter(n.op_type for n in model.graph.node if n.domain == "fastertrt")
        text = (f"stage    {graph} {stage}: {file}" + (f" + {', '.join(weights)}" if weights else "")
                + f", {size / 1e6:.1f} MB, {len(model.graph.node)} nodes")
        if plugins:
            text += "; plugin nodes " + ", ".join(f"{k} x{v}" for k, v in sorted(plugins.items()))
        ms = {k: v for k, v in ops.items() if k.startswith("com.microsoft") or k in (
            "GroupQueryAttention", "MultiHeadAttention", "MatMulIntegerToFloat", "RotaryEmbedding",
            "SimplifiedLayerNormalization")}
        if ms:
            text += "; ONNX Runtime ops " + ", ".join(f"{k} x{v}" for k, v in sorted(ms.items()))
        if ops.get("QuantizeLinear") or ops.get("DequantizeLinear"):
            text += f"; Q/DQ {ops.get('QuantizeLinear', 0)} Q + {ops.get('DequantizeLinear', 0)} DQ"
        lines.append(text)
        if stage == "int8":
            rows = _int8_layers(model)
            count = Counter(p for _, _, p in rows)
            lines.append(f"           precision per layer: {count.get('int8', 0)} INT8, {count.get('fp32', 0)} FP32 "
                         f"(weight MatMul/Gemm and embedding gathers)" + ("" if layers else "; --layers lists them"))
            if layers:
                lines += [f"             {p.upper():<5} {op:<7} {module}" for module, op, p in rows]
        problems += [f"{file}: {p}" for p in check_functions(model)]
    return lines, problems


def engine_layer_lines(bundle: Path, entry: dict) -> list[str]:
    """The engine inspector's layer list, where this machine can deserialize the engine."""
    from fastertrt.runtime.engines import TRT_MODULES, check_compatible, installed_backends
    from fastertrt.runtime.gpu import gpu_compute_capability

    try:
        gpu = gpu_compute_capability()
        check_compatible(entry, installed_backends(), gpu)
        if gpu is None:
            return [("             engine layers: deserializing an engine needs an NVIDIA GPU; the layer "
                     "types above come from the build")]
        from fastertrt.plugins import register_all

        trt = __import__(TRT_MODULES[entry["backend"]])
        register_all(trt)
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine((bundle / entry["file"]).read_bytes())
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.ONELINE)
        return ["             " + line for line in info.splitlines() if line.strip()]
    except Exception as exc:  # noqa: BLE001 - inspect reports why it cannot, and goes on
        return [f"             engine layers: not readable here ({type(exc).__name__}: {exc})"]
