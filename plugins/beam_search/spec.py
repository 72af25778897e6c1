"""The beam-search step plugin's contract: the tail of every decode step.

    log_probs[n, v]  = log_softmax(logits[n, :])[v] (+ bias[v])
    acc[b, j*V + v]  = log_probs[b*K + j, v] + beam_scores[b, j]
    scores, flat     = top-k of acc[b, :] with k = candidates * K   (descending;
                       equal scores: the lower flat index first, as ONNX TopK)
    tokens           = flat % V,   beams = flat // V

Inputs, in this order:
    logits       [N, V]  FP32, FP16 or BF16, N = B * K rows (beam j of batch row
                 b is row b*K + j); computed in FP32, as transformers does
    beam_scores  [B, K]  FP32: each beam's running sum of log-probabilities
    bias         [V]     FP32, when has_bias=1: added to the log-probabilities
                 (a logits processor's work, e.g. -inf on eos before min_new_tokens)
Outputs:
    scores [B, k] FP32, tokens [B, k] INT32, beams [B, k] INT32 (beam within the
    batch row, 0..K-1), with k = candidates * K.

Greedy search is the same step with K = 1: the first candidate is the argmax.
transformers keeps max(2, 1 + number of eos tokens) * K candidates; the graph
exports a fixed `candidates` and the generation loop reads the prefix it needs
(top-k output is sorted, so the prefix is the smaller top-k).

This module is the one place where shapes and dtypes are inferred: the rewrite,
the ONNX function and the TensorRT plugin all call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fastertrt.errors import FastertrtError

NAME = "FastertrtBeamStep"
VERSION = "1"
NAMESPACE = "fastertrt"
DOMAIN = "fastertrt"
LOGIT_DTYPES = ("float32", "float16", "bfloat16")
MAX_CANDIDATES = 64  # candidates * K per batch row: the kernels keep them in registers


class BeamStepSpecError(FastertrtError, ValueError):
    """Attributes or input shapes that the beam-step plugin does not accept."""


@dataclass(frozen=True)
class BeamStepAttrs:
    candidates: int = 2
    has_bias: int = 0

    def __post_init__(self):
        if not 1 <= int(self.candidates) <= MAX_CANDIDATES:
            raise BeamStepSpecError(f"candidates must be in 1..{MAX_CANDIDATES}, got {self.candidates}")
        if self.has_bias not in (0, 1):
            raise BeamStepSpecError(f"has_bias must be 0 or 1, got {self.has_bias}")

    def input_names(self) -> list[str]:
        return ["logits", "beam_scores"] + (["bias"] if self.has_bias else [])

    @staticmethod
    def output_names() -> list[str]:
        return ["scores", "tokens", "beams"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, attrs: dict) -> BeamStepAttrs:
        known = {f.name for f in fields(cls)}
        unknown = set(attrs) - known - {"plugin_version", "plugin_namespace"}
        if unknown:
            raise BeamStepSpecError(f"unknown beam-step attribute(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: int(v) for k, v in attrs.items() if k in known})

    def overload(self) -> str:
        return f"c{self.candidates}_b{self.has_bias}"


def output_dtypes(attrs: BeamStepAttrs, input_dtypes: list[str]) -> list[str]:
    names = attrs.input_names()
    if len(input_dtypes) != len(names):
        raise BeamStepSpecError(f"beam step expects {len(names)} inputs {names}, got {len(input_dtypes)}")
    if input_dtypes[0] not in LOGIT_DTYPES:
        raise BeamStepSpecError(f"beam-step logits must be one of {LOGIT_DTYPES}, got {input_dtypes[0]}")
    for name, dt in zip(names[1:], input_dtypes[1:]):
        if dt != "float32":
            raise BeamStepSpecError(f"beam-step input {name!r} has type {dt}; expected float32")
    return ["float32", "int32", "int32"]


class StaticDims:
    """Dim algebra over ints, symbolic names and None; the TensorRT plugin passes
    its own over TensorRT's dimension expressions."""

    @staticmethod
    def mul(a, c: int):
        if isinstance(a, int):
            return a * c
        return None if a is None else (a if c == 1 else f"{c}*{a}")

    @staticmethod
    def value(d) -> int | None:
        return d if isinstance(d, int) else None


def output_shapes(attrs: BeamStepAttrs, input_shapes: list, dims=StaticDims) -> list[list]:
    names = attrs.input_names()
    if len(input_shapes) != len(names):
        raise BeamStepSpecError(f"beam step expects {len(names)} inputs {names}, got {len(input_shapes)}")
    shapes = dict(zip(names, input_shapes))
    if len(shapes["logits"]) != 2:
        raise BeamStepSpecError(f"beam-step logits must be [N, V], got rank {len(shapes['logits'])}")
    if len(shapes["beam_scores"]) != 2:
        raise BeamStepSpecError(f"beam_scores must be [B, K], got rank {len(shapes['beam_scores'])}")
    n, v = (dims.value(d) for d in shapes["logits"])
    b, k = (dims.value(d) for d in shapes["beam_scores"])
    if None not in (n, b, k) and n != b * k:
        raise BeamStepSpecError(f"beam step: logits have {n} rows but beam_scores is [{b}, {k}] ({b * k} beams)")
    if k is not None and k * attrs.candidates > MAX_CANDIDATES:
        raise BeamStepSpecError(f"{k} beams x {attrs.candidates} candidates exceeds {MAX_CANDIDATES}")
    if k is not None and v is not None and k * attrs.candidates > k * v:
        raise BeamStepSpecError(f"cannot take {k * attrs.candidates} candidates from {k} x {v} scores")
    if attrs.has_bias:
        if len(shapes["bias"]) != 1:
            raise BeamStepSpecError(f"beam-step bias must be [V], got rank {len(shapes['bias'])}")
        bv = dims.value(shapes["bias"][0])
        if None not in (bv, v) and bv != v:
            raise BeamStepSpecError(f"beam-step bias has {bv} entries for a vocabulary of {v}")
    out = [shapes["beam_scores"][0], dims.mul(shapes["beam_scores"][1], attrs.candidates)]
    return [list(out), list(out), list(out)]


# the attribute class of this plugin's nodes (plugins.functions.check_functions reads it)
ATTRS = BeamStepAttrs
