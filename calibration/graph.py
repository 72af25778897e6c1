"""What in a graph gets INT8: MatMul/Gemm layers with a constant weight (one
per-tensor activation scale per input tensor, per-output-channel weight
scales) and large embedding tables (stored INT8 with per-row scales; the
Gather and everything after it stay FP32).

Kept in higher precision by default: the output head (a weight layer whose
result reaches a graph output only through reshapes, slices and a bias add),
attention inside the plugin (its I/O is FP32/FP16), norms, softmax, residuals.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass, field

import numpy as np

# Ops a head's result may pass through on its way to a graph output.
_PASS_THROUGH = {"Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Identity",
                 "Flatten", "Add"}
EMBEDDING_MIN_ELEMENTS = 16384


@dataclass
class Layer:
    """One weight MatMul/Gemm: out = x @ W (+ bias), W seen as [K, N]."""

    node: str
    name: str  # the model's module path when the exporter recorded it, else the node name
    op: str
    activation: str
    weight: str
    transposed: bool  # Gemm transB: the initializer is [N, K]
    bias: str | None
    output: str
    head: bool = False

    def weight_kn(self, inits: dict) -> np.ndarray:
        w = inits[self.weight].astype(np.float32)
        return w.T if self.transposed else w


@dataclass
class Embedding:
    node: str
    table: str
    rows: int
    dim: int


@dataclass
class Plan:
    layers: list[Layer]
    embeddings: list[Embedding]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def activations(self) -> list[str]:
        seen = []
        for layer in self.layers:
            if layer.activation not in seen:
                seen.append(layer.activation)
        return seen

    def consumers(self, activation: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.activation == activation]


def layer_name(node) -> str:
    """The deepest module path the exporter recorded for the node."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if isinstance(s, str)]
            except (ValueError, SyntaxError):
                break
            paths = [s for s in scopes if s]
            if paths:
                return max(paths, key=lambda s: (s.count("."), len(s)))
    return node.name


def initializer_arrays(model) -> dict:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_plan(model, inits: dict | None = None) -> Plan:
    inits = inits if inits is not None else initializer_arrays(model)
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    layers, embeddings, skipped = [], [], []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            layer, why = _layer(node, inits, consumers)
            if layer is None:
                if why:
                    skipped.append((node.name, why))
                continue
            layer.head = _is_head(layer.output, consumers, outputs, inits)
            layers.append(layer)
        elif node.op_type == "Gather" and node.input[0] in inits:
            table = inits[node.input[0]]
            if table.ndim == 2 and table.dtype == np.float32 and table.size >= EMBEDDING_MIN_ELEMENTS \
                    and _attr(node, "axis", 0) == 0:
                embeddings.append(Embedding(node.name, node.input[0], table.shape[0], table.shape[1]))
    shared = {e.table for e in embeddings} & {layer.weight for layer in layers}
    for layer in layers:
        if layer.weight in shared:  # tied embedding / head weights: the Gather needs FP32 rows
            layer.head = True
    return Plan(layers, embeddings, skipped)


def _layer(node, inits, consumers):
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None, "Gemm with transA, alpha or beta other than the defaults"
    act, weight = node.input[0], node.input[1]
    if weight not in inits:
        return None, None  # activation x activation (attention scores outside a plugin): stays FP
    w = inits[weight]
    if w.ndim != 2 or w.dtype != np.float32:
        return None, f"weight {weight} is {w.dtype} {w.shape}, not a 2-D FP32 matrix"
    if act in inits:
        return None, "both inputs are constants"
    transposed = bool(_attr(node, "transB", 0)) if node.op_type == "Gemm" else False
    n_out = w.shape[0] if transposed else w.shape[1]
    out, bias = node.output[0], None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
    else:
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != out]
            if len(other) == 1 and other[0] in inits and inits[other[0]].shape == (n_out,) \
                    and inits[other[0]].dtype == np.float32:
                bias, out = other[0], users[0].output[0]
    return Layer(node.name, layer_name(node), node.op_type, act, weight, transposed, bias, out), None


def _is_head(tensor: str, consumers: dict, outputs: set, inits: dict) -> bool:
    """True when `tensor` reaches a graph output only through pass-through ops
    (an Add must be a bias add: its other input a constant)."""
    frontier, seen = [tensor], set()
    reached = False
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in outputs:
            reached = True
        for node in consumers.get(t, []):
            if node.op_type not in _PASS_THROUGH:
                return False
            if node.op_type == "Add" and not all(i == t or i in inits for i in node.input):
                return False
            frontier.extend(node.output)
    return reached


def excluded(layer: Layer, patterns: list[str]) -> str | None:
    """The pattern that excludes this layer, matched on its module path, node and weight name."""
    for pat in patterns or []:
        if any(fnmatch.fnmatchcase(s, pat) for s in (layer.name, layer.node, layer.weight, layer.output)):
            return pat
    return None
