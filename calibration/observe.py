"""Run the FP32 graph on ONNX Runtime over sample batches and watch chosen
tensors: the calibration passes and the accuracy report both use this."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastertrt.calibration.dataset import batches


def session_with_outputs(model_path: Path, extra: list[str], threads: int | None = None, optimize: bool = True):
    """An ORT session of the graph that also returns the `extra` tensors."""
    import onnx
    import onnxruntime as ort
    from fastertrt.compiler.export.shared_weights import load_with_weights

    model = load_with_weights(Path(model_path))
    have = {o.name for o in model.graph.output}
    for name in extra:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    # basic optimizations only: full ones could fuse away a watched tensor's producer
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def encoder_feeds(ids: np.ndarray, mask: np.ndarray, input_names: list[str]) -> dict:
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    missing = [n for n in input_names if n not in feeds]
    if missing:
        from fastertrt.errors import CalibrationError

        raise CalibrationError(f"calibration feeds encoder inputs input_ids/attention_mask/token_type_ids; "
                               f"this graph also takes {missing}")
    return {n: feeds[n] for n in input_names}


def valid_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[tokens, channels] of the unpadded positions of an activation laid out
    [B, S, K] or [B * S, K]; other layouts give all rows."""
    b, s = mask.shape
    keep = mask.astype(bool)
    if x.ndim >= 3 and x.shape[0] == b and x.shape[1] == s:
        return x[keep].reshape(-1, x.shape[-1])
    if x.ndim == 2 and x.shape[0] == b * s:
        return x[keep.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


def run_batches(session, rows: list[list[int]], batch_size: int, input_names: list[str], pad_id: int, fetch: list[str]):
    """Yield (mask, {name: array}) per batch."""
    for ids, mask in batches(rows, batch_size, pad_id):
        outs = session.run(fetch, encoder_feeds(ids, mask, input_names))
        yield mask, dict(zip(fetch, outs))
