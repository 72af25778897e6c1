"""The first bad layer of a failing pair of ONNX stages.

Both graphs run on the same inputs with their intermediate tensors marked as
outputs (polygraphy's ONNX Runtime runner over a session with the extra
outputs). Tensors are matched by name: the exporter's names survive the rewrite
(a plugin node's outputs keep the names of the subgraph outputs it replaced,
whose inner tensors simply have no partner) and calibration (Q/DQ nodes are
inserted in front of a layer, its output keeps its name). Each Q/DQ pair is
also checked on its own: the dequantized activation against the FP32 tensor
that went into the QuantizeLinear, a dequantized weight against the FP32
weight of the reference (smoothing folded back). Walking the later graph in
topological order, the first tensor that breaks tolerance names the layer;
its node, the plugin or Q/DQ scale involved, the statistics of its inputs and
a suggestion make the diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastertrt.plugins.functions import attribute_values
from fastertrt.tolerances import tolerance
from fastertrt.tools.compare.metrics import describe, layer_ok, stats, stats_line, tensor_metrics, valid_positions


@dataclass
class Graph:
    """An ONNX graph's structure and lazily read initializers."""

    path: Path
    model: object
    nodes: list = field(default_factory=list)
    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)
    by_name: dict = field(default_factory=dict)
    inits: dict = field(default_factory=dict)  # name -> TensorProto
    _arrays: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Graph:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        g = cls(Path(path), model, list(model.graph.node))
        for node in g.nodes:
            g.by_name.setdefault(node.name, node)
            for o in node.output:
                if o:
                    g.producer[o] = node
            for i in node.input:
                if i:
                    g.consumers.setdefault(i, []).append(node)
        g.inits = {t.name: t for t in model.graph.initializer}
        return g

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = read_initializer(self.inits[name], self.path.parent)
        return self._arrays[name]

    def outputs(self) -> list[str]:
        return [o for n in self.nodes for o in n.output if o]


def read_initializer(tensor, folder: Path) -> np.ndarray:
    """An initializer's values, reading external data directly (onnx's own reader
    refuses weight files with several hard links, which bundles updated in place
    and their linked copies have)."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    folder = Path(folder).resolve()
    path = (folder / info["location"]).resolve()
    if folder not in path.parents:
        raise ValueError(f"initializer {tensor.name} points outside {folder}: {info['location']}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = f.read(int(info.get("length", 0)) or count * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(tensor.dims)).copy()


def _module(node, graph: Graph | None = None) -> str:
    """The module path the exporter recorded; Q/DQ nodes (inserted by calibration,
    with no path) take their layer's."""
    from fastertrt.calibration.graph import layer_name

    seen = 0
    while graph is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear", "Mul") and seen < 4:
        users = graph.consumers.get(node.output[0], [])
        if not users or layer_name(node) != node.name:
            break
        node, seen = users[0], seen + 1
    return layer_name(node)


def _valid(mask: np.ndarray | None, shape: tuple) -> np.ndarray | None:
    """Unpadded positions of an intermediate [B, ..., S, ...] tensor: batch first,
    sequence on the first later axis of length S (padded tokens are computed but
    never read, so their values may legitimately differ between stages)."""
    if mask is None or len(shape) < 2 or shape[0] != mask.shape[0]:
        return None
    axis = next((i for i in range(1, len(shape)) if shape[i] == mask.shape[1]), None)
    return valid_positions(mask, shape, axis)


def _scalar(arr) -> float | None:
    return None if arr is None or np.asarray(arr).size != 1 else float(np.asarray(arr).reshape(()))


@dataclass
class QdqPair:
    dq: str                   # the DequantizeLinear output
    kind: str                 # activation | weight
    source: str               # activation: the QuantizeLinear's FP32 input; weight: the int8 initializer
    scale: str
    reference: np.ndarray | None = None  # weight: the FP32 weight of the reference graph, smoothing folded in
    reference_name: str = ""


def _qdq_pairs(got: Graph, ref: Graph) -> dict:
    pairs = {}
    for node in got.nodes:
        if node.op_type != "DequantizeLinear" or not node.output[0]:
            continue
        src = got.producer.get(node.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            pairs[node.output[0]] = QdqPair(node.output[0], "activation", src.input[0], src.input[1])
        elif node.input[0] in got.inits:
            pair = QdqPair(node.output[0], "weight", node.input[0], node.input[1])
            pair.reference, pair.reference_name = _weight_reference(got, ref, node)
            pairs[node.output[0]] = pair
    return pairs


def _weight_reference(got: Graph, ref: Graph, dq) -> tuple[np.ndarray | None, str]:
    """The FP32 weight the same layer reads in the reference graph, in the int8
    graph's units: SmoothQuant divides the activation by s (a Mul by 1/s in front
    of the QuantizeLinear) and multiplies the weight's input rows by s."""
    for user in got.consumers.get(dq.output[0], []):
        twin = ref.by_name.get(user.name)
        if twin is None or twin.op_type != user.op_type:
            continue
        slot = list(user.input).index(dq.output[0])
        if slot >= len(twin.input) or twin.input[slot] not in ref.inits:
            continue
        w = ref.array(twin.input[slot]).astype(np.float64)
        if user.op_type in ("MatMul", "Gemm") and w.ndim == 2:
            inv = _smoothing(got, ref, user, 1 - slot)
            if inv is not None:
                trans = user.op_type == "Gemm" and attribute_values(user).get("transB", 0)
                w = w / (inv[None, :] if trans else inv[:, None])
        return w, twin.input[slot]
    return None, ""


def _smoothing(got: Graph, ref: Graph, user, slot: int) -> np.ndarray | None:
    """The 1/s vector of a Mul-by-constant that feeds the layer's activation
    through Q/DQ and exists only in the int8 graph."""
    dq = got.producer.get(user.input[slot]) if slot < len(user.input) else None
    q = got.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    mul = got.producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    if mul is None or mul.op_type != "Mul" or mul.output[0] in ref.producer:
        return None
    for name in mul.input:
        arr = got.array(name)
        if arr is not None and arr.ndim == 1:
            return arr.astype(np.float64)
    return None


def _run(path: Path, outputs: list[str], feed: dict, label: str) -> dict:
    """One polygraphy ONNX Runtime run with `outputs` marked."""
    from polygraphy.comparator import Comparator

    from fastertrt.tools.compare.runners import onnx_runner

    results = Comparator.run([onnx_runner(path, label, outputs)], data_loader=[feed])
    return dict(results[0][1][0])


def locate(ref_path: Path, got_path: Path, feed: dict, precision: str, ref_label: str, got_label: str) -> dict:
    """{'first_bad': diagnosis or None, 'series': per checked tensor in order, ...}"""
    ref, got = Graph.read(ref_path), Graph.read(got_path)
    ref_outputs = set(ref.outputs())
    common = [o for o in got.outputs() if o in ref_outputs]
    pairs = _qdq_pairs(got, ref)
    got_vals = _run(got_path, got.outputs(), feed, got_label)
    ref_vals = _run(ref_path, common, feed, ref_label)
    got_vals.update(feed)
    layer_tol, qdq_tol = tolerance("layer", precision), tolerance("qdq", "int8")
    mask = feed.get("attention_mask")
    mask = mask if mask is not None and mask.ndim == 2 else None

    def metrics(expected, value):
        value = np.asarray(value)
        return tensor_metrics(expected, value, _valid(mask, value.shape) if value.dtype.kind in "fc" else None)

    series, first = [], None
    for index, node in enumerate(got.nodes):
        for out in node.output:
            if out in pairs:
                pair = pairs[out]
                expected = got_vals.get(pair.source) if pair.kind == "activation" else pair.reference
                if expected is None or out not in got_vals:
                    continue
                m = metrics(expected, got_vals[out]) if pair.kind == "activation" else \
                    tensor_metrics(expected, got_vals[out])
                ok = layer_ok(m, qdq_tol)
                check = "qdq"
            elif out in ref_vals and out in got_vals:
                m = metrics(ref_vals[out], got_vals[out])
                ok = layer_ok(m, layer_tol)
                check = "layer"
            else:
                continue
            entry = {"index": len(series), "node_index": index, "tensor": out, "node": node.name,
                     "op": node.op_type, "module": _module(node, got), "check": check, "passed": bool(ok), **m}
            series.append(entry)
            if not ok and first is None:
                first = _diagnose(entry, node, got, ref, got_vals, ref_vals, pairs, ref_label, mask)
    return {"ref": ref_label, "stage": got_label, "checked": len(series), "common_tensors": len(common),
            "qdq_pairs": len(pairs), "tolerance": {"layer": vars(layer_tol), "qdq": vars(qdq_tol)},
            "first_bad": first, "series": series}


# -----------------------------------------------------------------------------
# diagnosis
# -----------------------------------------------------------------------------
def _diagnose(entry, node, got: Graph, ref: Graph, got_vals, ref_vals, pairs, ref_label, mask) -> dict:
    out = {"tensor": entry["tensor"], "node": node.name, "op": node.op_type, "domain": node.domain or "ai.onnx",
           "module": entry["module"], "check": entry["check"], "metrics": {k: v for k, v in entry.items()
                                                                          if k not in ("index", "node_index")},
           "inputs": [], "findings": []}
    for name in node.input:
        if not name:
            continue
        value = got_vals.get(name, got.array(name))
        row = {"name": name, "initializer": name in got.inits}
        if value is not None:
            row["stats"] = stats(value)
        if name in ref_vals and name in got_vals:
            row["vs_ref"] = tensor_metrics(ref_vals[name], got_vals[name])
        out["inputs"].append(row)
    findings = out["findings"]
    findings += _node_changes(node, got, ref, ref_label)
    findings += _initializer_changes(node, got, ref, ref_label, findings)
    # an input with no partner in the reference was not checked itself: when a plugin node
    # made it (its outputs were renamed by the rewrite), the fault is the plugin's
    for name in node.input:
        maker = got.producer.get(name)
        if name and name not in ref_vals and maker is not None and maker.domain == "fastertrt":
            findings.append(_plugin_finding(maker, ref_label, unchecked_output=name))
    pair = pairs.get(entry["tensor"])
    if pair is not None:
        findings.append(_qdq_finding(pair, node, got, got_vals, entry, mask))
    elif node.domain == "fastertrt":
        findings.append(_plugin_finding(node, ref_label))
    elif any(f["kind"] == "plugin" for f in findings):
        pass
    elif any(i in pairs for i in node.input):
        module = entry["module"]
        scales = {i: _scale_text(pairs[i], got) for i in node.input if i in pairs}
        findings.append({"kind": "int8-layer", "text": (
            f"INT8 layer {module}: each quantized input is within the Q/DQ tolerance on its own "
            f"({'; '.join(f'{k}: {v}' for k, v in scales.items())}), but the layer's output is not"),
            "suggestion": f"keep this layer in FP32: fastertrt calibrate BUNDLE --exclude '{module}' (or raise "
                          f"--max-layer-error so the sensitivity pass keeps it FP32)"})
    if entry["kind"] == "exact" and not any(f["kind"] == "node-changed" for f in findings):
        findings.append({"kind": "exact", "text": f"{entry['tensor']} is an integer/boolean tensor (a mask, a "
                                                  f"shape or indices) and must be equal: {describe(entry)}",
                         "suggestion": "check the attention_mask handling: padding side, an off-by-one in the "
                                       "positions or the mask's length"})
    if not findings:
        findings.append({"kind": "numeric", "text": f"{node.op_type} node {node.name} gets inputs that agree with "
                                                    f"{ref_label} but gives a different output",
                         "suggestion": f"compare the node in both files: polygraphy inspect model {got.path.name} "
                                       f"--show layers attrs weights"})
    return out


def _node_changes(node, got: Graph, ref: Graph, ref_label: str) -> list[dict]:
    """The node reads other tensors, other weights or has other attributes than
    the node of the same name in the reference graph."""
    twin = ref.by_name.get(node.name)
    if twin is None or twin.op_type != node.op_type:
        return []
    found = []
    for slot, (a, b) in enumerate(zip(twin.input, node.input)):
        if a == b:
            if a in got.inits and a in ref.inits:
                wa, wb = ref.array(a), got.array(b)
                if wa.shape != wb.shape or not np.array_equal(wa, wb):
                    m = tensor_metrics(wa, wb)
                    found.append({"kind": "weights", "text": f"initializer {a} differs from {ref_label}'s ({describe(m)})",
                                  "suggestion": "the FP32 weights changed between stages, which no fastertrt stage "
                                                "does: recompile the bundle from the model"})
            continue
        wa, wb = ref.array(a), got.array(b)
        what = "weight" if wa is not None or wb is not None else "input"
        text = f"{node.name} reads {what} {b} at input {slot} where {ref_label}'s node reads {a}"
        if wa is not None and wb is not None and wa.shape == wb.shape and not np.array_equal(wa, wb):
            text += f" ({describe(tensor_metrics(wa, wb))})"
        owners = [u for u in ref.consumers.get(b, []) if u.name != node.name]
        if owners:
            text += f"; in {ref_label} {b} belongs to " + ", ".join(f"{u.name} ({_module(u, ref)})" for u in owners[:3])
        found.append({"kind": "node-changed", "text": text,
                      "suggestion": "a swapped or rewired tensor: the graph was edited or a rewrite rule connected "
                                    "the wrong value; recompile the bundle, and report it if it comes back"})
    a, b = attribute_values(twin), attribute_values(node)
    changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    if changed:
        found.append({"kind": "node-changed", "text": f"{node.name}'s attributes differ from {ref_label}'s: "
                                                      + ", ".join(f"{k} {v[1]!r} (was {v[0]!r})" for k, v in changed.items()),
                      "suggestion": "recompile the bundle; report it if a fastertrt stage changed the attribute"})
    return found


def _initializer_changes(node, got: Graph, ref: Graph, ref_label: str, found: list[dict]) -> list[dict]:
    """Constants the node reads that the reference graph holds under the same name
    with other values (a node the stage renamed or lowered has no twin to compare)."""
    out = []
    for name in node.input:
        if name not in got.inits or name not in ref.inits or any(name in f["text"] for f in found):
            continue
        a, b = ref.array(name), got.array(name)
        if a.shape == b.shape and np.array_equal(a, b):
            continue
        both = (f"{float(b.reshape(())):.6g} here, {float(a.reshape(())):.6g} in {ref_label}" if a.size == b.size == 1
                else describe(tensor_metrics(a, b)))
        out.append({"kind": "weights", "text": f"{node.name} reads {name}, which differs from {ref_label}'s "
                                               f"constant of that name ({both})",
                    "suggestion": f"one of the two files holds a wrong constant: the stage that wrote this file "
                                  f"changed it, or {ref_label} was edited; recompile or recalibrate the bundle"})
    return out


def _plugin_finding(node, ref_label: str, unchecked_output: str = "") -> dict:
    attrs = attribute_values(node)
    shown = ", ".join(f"{k}={v}" for k, v in attrs.items() if k not in ("plugin_namespace",))
    if unchecked_output:
        text = (f"this node reads {unchecked_output} from plugin {node.op_type} node {node.name}, a tensor "
                f"{ref_label} has no counterpart of, so the plugin is the first suspect; attributes {shown}")
    else:
        text = (f"plugin {node.op_type} node {node.name}: its inputs agree with {ref_label}, its output does not; "
                f"attributes {shown}")
    if "scale" in attrs and attrs.get("head_size"):
        expected = 1.0 / np.sqrt(float(attrs["head_size"]))
        if abs(float(attrs["scale"]) - expected) > 1e-3 * expected:
            text += f". Its scale {float(attrs['scale']):.6g} is not 1/sqrt(head_size) = {expected:.6g}"
    return {"kind": "plugin", "text": text,
            "suggestion": "report a plugin bug with the inputs (fastertrt compare --save-inputs inputs.json) and "
                          "this node's attributes; compiling with --no-plugins keeps the exporter's attention"}


def _scale_text(pair: QdqPair, got: Graph) -> str:
    scale = got.array(pair.scale)
    if scale is None:
        return f"scale {pair.scale} (computed)"
    if scale.size == 1:
        return f"scale {float(scale.reshape(())):.6g}"
    return f"{scale.size} scales in [{float(scale.min()):.4g}, {float(scale.max()):.4g}]"


def _qdq_finding(pair: QdqPair, node, got: Graph, got_vals, entry, mask) -> dict:
    module = _module(node, got)
    scale = got.array(pair.scale)
    if pair.kind == "activation":
        x = np.asarray(got_vals[pair.source], dtype=np.float64)
        keep = _valid(mask, x.shape)
        x = x[keep] if keep is not None else x
        s = _scalar(scale)
        clipped = float((np.abs(x) > 127.5 * s).mean()) if s else 0.0
        levels = int(np.abs(np.round(x / s)).max()) if s else 0
        text = (f"Q/DQ on activation {pair.source} (feeding {module}): scale {s:.6g} covers |x| <= {127 * s:.4g}, "
                f"the input reaches {np.abs(x).max():.4g}: {clipped:.2%} of values clip; "
                f"dequantized vs FP32: {describe(entry)}")
        if clipped > 1e-3:
            hint = ("the scale is too small for this input: calibrate on data like yours (--calib-data), use "
                    "--calib-method max or a higher --percentile, or")
        elif levels < 32:
            hint = (f"the scale is too large: the input uses {levels} of 127 levels; recalibrate "
                    f"(--calib-method mse or entropy), or")
        else:
            hint = "recalibrate, or"
        return {"kind": "qdq-activation", "scale": s, "clipped_fraction": clipped, "text": text,
                "suggestion": f"{hint} keep the layer FP32: --exclude '{module}'"}
    ratios = None
    if pair.reference is not None:
        w = np.asarray(got_vals[pair.dq], dtype=np.float64)
        axis = 0 if w.ndim == 2 else None  # per output channel of a [K, N] weight
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.linalg.norm(w, axis=axis) / np.linalg.norm(pair.reference, axis=axis)
    text = (f"Q/DQ on weight {pair.reference_name or pair.source} of {module} ({_scale_text(pair, got)}): "
            f"dequantized vs the FP32 weight: {describe(entry)}")
    if ratios is not None and np.ndim(ratios):
        worst = np.argsort(-np.abs(np.nan_to_num(ratios, nan=0.0) - 1.0))[:3]
        text += "; worst channels " + ", ".join(f"{int(c)} (x{ratios[c]:.3g})" for c in worst)
    return {"kind": "qdq-weight", "text": text,
            "suggestion": f"the stored weight scales do not match the weight: recalibrate (fastertrt calibrate "
                          f"BUNDLE), or keep the layer FP32: --exclude '{module}'"}


def diagnosis_lines(first: dict) -> list[str]:
    """The diagnosis as terminal lines."""
    lines = [f"first bad tensor: {first['tensor']} ({first['check']} check: {describe(first['metrics'])})",
             f"  node    {first['node']} ({first['domain']}::{first['op']}), module {first['module']}"]
    for row in first["inputs"]:
        text = stats_line(row["stats"]) if "stats" in row else "?"
        if "vs_ref" in row:
            text += f"; vs reference: {describe(row['vs_ref'])}"
        lines.append(f"  input   {row['name']}{' (initializer)' if row['initializer'] else ''}: {text}")
    for f in first["findings"]:
        lines.append(f"  why     {f['text']}")
        lines.append(f"  fix     {f['suggestion']}")
    return lines
