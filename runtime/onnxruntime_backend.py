"""Run one bundle graph on ONNX Runtime (CPU). Later backends (TensorRT) give
the same `run(feeds) -> {name: array}` interface.

Thread safety: InferenceSession.run is safe to call from many threads at once
(ONNX Runtime's guarantee), and run() keeps no state of its own, so graphs run
concurrently here with no lock."""

from __future__ import annotations

from pathlib import Path

from fastertrt.errors import BundleError
from fastertrt.runtime.inputs import check_feeds


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
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types carry the reason
            raise BundleError(f"ONNX Runtime cannot load the bundle's graph {self.path.name}: "
                              f"{str(exc).strip()[:400]}. The file is damaged, names weights outside the bundle, "
                              f"or needs another ONNX Runtime; recompile the bundle") from None
        self.input_names = [t["name"] for t in spec["inputs"]]
        self.output_names = [t["name"] for t in spec["outputs"]]

    def check(self, feeds: dict) -> None:
        """Names, ranks, dtypes and fixed dims against the manifest's I/O spec."""
        check_feeds(self.spec["inputs"], feeds, self.path.name)

    @staticmethod
    def step_session(prefill, decode, candidates: int):
        from fastertrt.runtime.steps import OrtSteps

        return OrtSteps(prefill, decode, candidates)

    def run(self, feeds: dict) -> dict:
        self.check(feeds)
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))
