"""Run one bundle graph on ONNX Runtime (CPU). Later backends (TensorRT) give
the same `run(feeds) -> {name: array}` interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastertrt.errors import InputError


class OrtGraph:
    def __init__(self, path: Path, spec: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.spec = spec
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [t["name"] for t in spec["inputs"]]
        self.output_names = [t["name"] for t in spec["outputs"]]

    def check(self, feeds: dict) -> None:
        """Names, ranks, dtypes and fixed dims against the manifest's I/O spec."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputError(f"graph {self.path.name} takes inputs {self.input_names}; "
                             f"missing {missing}, unexpected {extra}")
        for t in self.spec["inputs"]:
            arr = feeds[t["name"]]
            if arr.ndim != len(t["shape"]):
                raise InputError(f"input {t['name']!r} has rank {arr.ndim} (shape {arr.shape}); "
                                 f"expected rank {len(t['shape'])} with dims {t['shape']}")
            if arr.dtype != np.dtype(t["dtype"]):
                raise InputError(f"input {t['name']!r} has dtype {arr.dtype}; expected {t['dtype']}. "
                                 f"Convert with .astype(np.{t['dtype']})")
            for i, (got, want) in enumerate(zip(arr.shape, t["shape"])):
                if isinstance(want, int) and got != want:
                    raise InputError(f"input {t['name']!r} has size {got} on axis {i}; the graph fixes it to {want}")

    @staticmethod
    def step_session(prefill, decode, candidates: int):
        from fastertrt.runtime.steps import OrtSteps

        return OrtSteps(prefill, decode, candidates)

    def run(self, feeds: dict) -> dict:
        self.check(feeds)
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))
