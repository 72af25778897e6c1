"""The one tolerance table, shared by tests, export parity, `compare` and reports.

Keyed by (stage, precision). `atol` bounds the max abs difference against the
previous stage's output on valid (unpadded) positions (an output also passes when
that difference relative to its largest magnitude is within `atol`, as deep
decoders drift with summation order); `min_cosine` bounds the cosine similarity.
`rel` bounds max |a - b| / max |a| alone and `norm` bounds | |b| / |a| - 1 |: the
per-tensor checks of `fastertrt compare`'s layer search use those, since an
intermediate tensor's magnitude says nothing about an absolute bound.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    atol: float = float("inf")
    min_cosine: float = 0.0
    rel: float | None = None
    norm: float | None = None


TOLERANCES = {
    ("export", "fp32"): Tolerance(atol=1e-4, min_cosine=0.99999),
    ("rewrite", "fp32"): Tolerance(atol=1e-5, min_cosine=0.999999),
    ("runtime", "fp32"): Tolerance(atol=1e-4, min_cosine=0.99999),
    # a plugin kernel (FP32 accumulation, I/O rounded to the type) vs the float64
    # numpy reference on the same rounded inputs: FP32 differs by summation order,
    # FP16/BF16 also round the probabilities fed to the second matmul and the output
    ("kernel", "fp32"): Tolerance(atol=1e-5),
    ("kernel", "fp16"): Tolerance(atol=2e-3),
    ("kernel", "bf16"): Tolerance(atol=2e-2),
    # the ONNX Runtime variant of int8.onnx (integer kernels) vs int8.onnx run as Q/DQ + FP32 MatMul:
    # summation order moves a few activations across a rounding step, which later layers carry on
    # (measured on MiniLM: first layer within 3e-6, last hidden state per token min cosine 0.997)
    ("lowering", "int8"): Tolerance(atol=0.5, min_cosine=0.99),
    # int8.onnx (Q/DQ) vs fused.onnx, whole outputs on valid positions (MiniLM on text: cosine 0.997+)
    ("int8", "int8"): Tolerance(min_cosine=0.98, norm=0.1),
    # `compare`'s layer search: every intermediate tensor of two neighbouring stages. FP32 stages differ
    # by summation order only; INT8 error grows through the layers (MiniLM on text: no tensor below 0.99)
    ("layer", "fp32"): Tolerance(min_cosine=0.9999, rel=1e-3),
    ("layer", "int8"): Tolerance(min_cosine=0.98, norm=0.1),
    # one Q/DQ pair: DQ(Q(x)) vs x in the same run, or a dequantized weight vs the FP32 weight
    ("qdq", "int8"): Tolerance(min_cosine=0.995, norm=0.05),
    # engine vs ONNX Runtime on the same graph (TensorRT picks its own kernels)
    ("engine", "fp32"): Tolerance(atol=1e-3, min_cosine=0.9999),
    ("engine", "fp16"): Tolerance(atol=2e-2, min_cosine=0.999),
    ("engine", "bf16"): Tolerance(atol=1e-1, min_cosine=0.99),
    ("engine", "int8"): Tolerance(min_cosine=0.98, norm=0.1),
}


def tolerance(stage: str, precision: str = "fp32") -> Tolerance:
    try:
        return TOLERANCES[(stage, precision)]
    except KeyError:
        known = ", ".join(f"{s}/{p}" for s, p in sorted(TOLERANCES))
        raise KeyError(f"no tolerance for stage {stage!r} at {precision!r}; known: {known}") from None


def clear_of_ties(scores, gap: float = 1e-4):
    """Where a sorted candidate score stands more than `gap` from both neighbours:
    the positions where two runtimes must agree on the candidate's id (a near tie
    may order differently in both without either being wrong)."""
    import numpy as np

    diff = np.abs(np.diff(scores, axis=-1))
    edge = np.full(scores.shape[:-1] + (1,), np.inf)
    return (np.concatenate([edge, diff], axis=-1) > gap) & (np.concatenate([diff, edge], axis=-1) > gap)
