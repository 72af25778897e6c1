"""The attention plugin's contract: one node type for every attention block.

    out = softmax(scale * Q @ K^T + mask [+ causal]) @ V        per head

Inputs, in this order (which ones are present is fixed by the attributes):
    qkv_packed=0:  query [B, Hq, S, D], key [B, Hkv, N, D], value [B, Hkv, N, D]
    qkv_packed=1:  qkv [B, S, (Hq + 2*Hkv) * D]   (query heads, key heads, value heads)
    has_past=1:    past_key [B, Hkv, P, D], past_value [B, Hkv, P, D]
    has_mask=1:    mask, additive (FP32 or the I/O type), broadcastable to [B, Hq, S, T]
Outputs:
    out [B, Hq, S, D]
    has_past=1:    present_key, present_value [B, Hkv, T, D] with T = P + N
                   (past then new along the sequence axis: the decoder's KV cache)

Query head h reads key/value head h // (Hq / Hkv) (grouped-query; Hq == Hkv is
multi-head). causal=1 lets query i attend to keys j <= T - S + i (aligned to the
end, as with a KV cache). A row whose every key is masked to -inf gives zeros,
not NaN. FP32, FP16 and BF16 I/O; the kernels accumulate in FP32.

This module is the one place where shapes and dtypes are inferred: the rewrite
(annotating the node it makes), the ONNX function and the TensorRT plugin
(get_output_shapes / get_output_data_types) all call it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from fastertrt.errors import FastertrtError

NAME = "FastertrtAttention"
VERSION = "1"
NAMESPACE = "fastertrt"
DOMAIN = "fastertrt"
IO_DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class AttentionSpecError(FastertrtError, ValueError):
    """Attributes or input shapes that the attention plugin does not accept."""


@dataclass(frozen=True)
class AttentionAttrs:
    num_heads: int
    kv_num_heads: int
    head_size: int
    scale: float
    causal: int = 0
    has_mask: int = 0
    has_past: int = 0
    qkv_packed: int = 0

    def __post_init__(self):
        for name in ("num_heads", "kv_num_heads", "head_size"):
            if int(getattr(self, name)) < 1:
                raise AttentionSpecError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.kv_num_heads:
            raise AttentionSpecError(
                f"num_heads ({self.num_heads}) must be a multiple of kv_num_heads ({self.kv_num_heads})")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise AttentionSpecError(f"scale must be a positive finite number, got {self.scale}")
        for name in ("causal", "has_mask", "has_past", "qkv_packed"):
            if getattr(self, name) not in (0, 1):
                raise AttentionSpecError(f"{name} must be 0 or 1, got {getattr(self, name)}")

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_num_heads

    def input_names(self) -> list[str]:
        names = ["qkv"] if self.qkv_packed else ["query", "key", "value"]
        if self.has_past:
            names += ["past_key", "past_value"]
        if self.has_mask:
            names.append("mask")
        return names

    def output_names(self) -> list[str]:
        return ["out", "present_key", "present_value"] if self.has_past else ["out"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, attrs: dict) -> AttentionAttrs:
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(attrs) - set(known) - {"plugin_version", "plugin_namespace"}
        if unknown:
            raise AttentionSpecError(f"unknown attention attribute(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = [n for n in ("num_heads", "kv_num_heads", "head_size", "scale") if n not in attrs]
        if missing:
            raise AttentionSpecError(f"attention node lacks attribute(s) {missing}")
        return cls(**{k: (float(v) if k == "scale" else int(v)) for k, v in attrs.items() if k in known})

    def overload(self) -> str:
        """A name for this attribute set, used as the ONNX function overload (one
        function body per distinct configuration in a model)."""
        scale = f"{self.scale:.9g}".replace(".", "p").replace("-", "m").replace("+", "")
        return (f"h{self.num_heads}_kv{self.kv_num_heads}_d{self.head_size}_s{scale}_c{self.causal}"
                f"_m{self.has_mask}_p{self.has_past}_q{self.qkv_packed}")


def output_dtypes(attrs: AttentionAttrs, input_dtypes: list[str]) -> list[str]:
    """Every output has the type of the query (or packed qkv) input."""
    check_dtypes(attrs, input_dtypes)
    return [input_dtypes[0]] * len(attrs.output_names())


def check_dtypes(attrs: AttentionAttrs, input_dtypes: list[str]) -> None:
    names = attrs.input_names()
    if len(input_dtypes) != len(names):
        raise AttentionSpecError(f"attention expects {len(names)} inputs {names}, got {len(input_dtypes)}")
    io = input_dtypes[0]
    if io not in IO_DTYPES:
        raise AttentionSpecError(f"attention I/O type must be one of {IO_DTYPES}, got {io}")
    for name, dt in zip(names, input_dtypes):
        allowed = (io, "float32") if name == "mask" else (io,)
        if dt not in allowed:
            raise AttentionSpecError(f"attention input {name!r} has type {dt}; expected {' or '.join(allowed)}")


def _sum(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a is None or b is None:
        return None
    return f"{a}+{b}"


class StaticDims:
    """Dim algebra over ints, symbolic names and None (ONNX-side shapes). The
    TensorRT plugin passes its own, over TensorRT's dimension expressions."""

    @staticmethod
    def add(a, b):
        return _sum(a, b)

    @staticmethod
    def const(n: int):
        return n

    @staticmethod
    def value(d) -> int | None:
        return d if isinstance(d, int) else None


def output_shapes(attrs: AttentionAttrs, input_shapes: list, dims=StaticDims) -> list[list]:
    """Output shapes from input shapes, checking the sizes that the attributes fix.
    Each shape is a list of dims understood by `dims` (see StaticDims)."""
    names = attrs.input_names()
    if len(input_shapes) != len(names):
        raise AttentionSpecError(f"attention expects {len(names)} inputs {names}, got {len(input_shapes)}")
    shapes = {n: list(sh) for n, sh in zip(names, input_shapes)}
    hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size

    def expect(name, axis, want):
        have = dims.value(shapes[name][axis])
        if have is not None and have != want:
            raise AttentionSpecError(f"attention input {name!r} has size {have} on axis {axis}; expected {want}")

    if attrs.qkv_packed:
        if len(shapes["qkv"]) != 3:
            raise AttentionSpecError(f"packed qkv must be [B, S, (Hq+2*Hkv)*D], got rank {len(shapes['qkv'])}")
        expect("qkv", 2, (hq + 2 * hkv) * d)
        b, s = shapes["qkv"][0], shapes["qkv"][1]
        new = s
    else:
        for name in ("query", "key", "value"):
            if len(shapes[name]) != 4:
                raise AttentionSpecError(f"attention input {name!r} must be rank 4 [B, H, S, D], "
                                         f"got rank {len(shapes[name])}")
            expect(name, 3, d)
        expect("query", 1, hq)
        expect("key", 1, hkv)
        expect("value", 1, hkv)
        b, s = shapes["query"][0], shapes["query"][2]
        new = shapes["key"][2]
    out = [[b, dims.const(hq), s, dims.const(d)]]
    if attrs.has_past:
        for name in ("past_key", "past_value"):
            if len(shapes[name]) != 4:
                raise AttentionSpecError(f"attention input {name!r} must be rank 4 [B, Hkv, P, D]")
            expect(name, 1, hkv)
            expect(name, 3, d)
        total = dims.add(shapes["past_key"][2], new)
        out += [[b, dims.const(hkv), total, dims.const(d)], [b, dims.const(hkv), total, dims.const(d)]]
    if attrs.has_mask and len(shapes["mask"]) > 4:
        raise AttentionSpecError(f"attention mask must have rank <= 4, got {len(shapes['mask'])}")
    return out


def default_scale(head_size: int) -> float:
    return 1.0 / math.sqrt(head_size)


# the attribute class of this plugin's nodes (plugins.functions.check_functions reads it)
ATTRS = AttentionAttrs
