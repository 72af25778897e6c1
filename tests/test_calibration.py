"""INT8 calibration: calibrators, sample data, Q/DQ placement, the ONNX Runtime
variant, cache, report, TensorRT-RTX INT8 engines, and MiniLM's accuracy."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastertrt.calibration.calibrators import amax_from_histogram, fake_quant

from fastertrt.errors import (
    CalibrationCacheError,
    CalibrationDataError,
    CalibrationError,
)

WORDS = ["the", "a", "model", "engine", "fast", "tensor", "cache", "layer", "token", "text", "is", "runs", "on", "gpu"]


def _copy(bundle: Path, dst: Path) -> Path:
    """Calibration changes a bundle in place: work on a linked copy of the shared one."""
    shutil.copytree(bundle, dst, copy_function=os.link)
    return dst


def _texts(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)) + "\n")
    return path


# --- calibrators -----------------------------------------------------------------
def _hist(x, bins=2048):
    top = float(np.abs(x).max())
    return np.histogram(np.abs(x), bins=bins, range=(0, top))[0], top


def test_calibrators_on_a_long_tailed_distribution():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.laplace(0, 1, 200_000), [60.0, -80.0]])  # bulk within ~15, two outliers
    hist, top = _hist(x)
    assert amax_from_histogram(hist, top, "max") == pytest.approx(80.0)
    p = amax_from_histogram(hist, top, "percentile", 99.99)
    assert np.quantile(np.abs(x), 0.9999) <= p <= np.quantile(np.abs(x), 0.9999) + 2 * top / 2048
    for method in ("entropy", "mse"):
        amax = amax_from_histogram(hist, top, method)
        assert 3.0 < amax < 60.0, (method, amax)  # clips the outliers, keeps the bulk
    # MSE's clip beats max on the data's own quantization error
    amax = amax_from_histogram(hist, top, "mse")
    assert np.mean((fake_quant(x, amax) - x) ** 2) < 0.9 * np.mean((fake_quant(x, 80.0) - x) ** 2)


def test_fake_quant_is_symmetric_int8():
    x = np.array([-2.0, -1.0, 0.0, 0.003, 1.0, 3.0], dtype=np.float32)
    q = fake_quant(x, 1.0)
    assert q[2] == 0 and q[0] == pytest.approx(-128 / 127) and q[-1] == pytest.approx(1.0)  # saturates
    assert q[4] == pytest.approx(1.0) and q[3] == 0.0
    with pytest.raises(ValueError, match="must be one of"):
        amax_from_histogram(np.ones(8), 1.0, "minmax")


# --- sample data -----------------------------------------------------------------
def test_sample_formats_split_and_bad_data(tmp_path, bundles):
    from fastertrt.calibration.dataset import batches, load_samples

    tok = bundles.tiny("bert") / "tokenizer" / "tokenizer.json"
    txt = _texts(tmp_path / "s.txt", 40)
    a = load_samples(tok, 64, txt)
    lines = txt.read_text().splitlines()
    txt2 = tmp_path / "shuffled.txt"
    txt2.write_text("\n".join(reversed(lines)) + "\n\n")
    b = load_samples(tok, 64, txt2)
    assert sorted(map(tuple, a.held_out)) == sorted(map(tuple, b.held_out))  # split by content, not order
    assert len(a.calib) + len(a.held_out) == 40 and a.held_out and a.calib

    jl = tmp_path / "s.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in lines[:10]) + "\n")
    assert len(load_samples(tok, 64, jl, text_field="body").calib) + len(load_samples(tok, 64, jl, "body").held_out) == 10
    with pytest.raises(CalibrationDataError, match="no field 'text'.*--calib-field"):
        load_samples(tok, 64, jl)

    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [4, 4, 4, 4]])
    npz = tmp_path / "ids.npz"
    np.savez(npz, input_ids=ids, attention_mask=(ids != 0).astype(np.int64))
    s = load_samples(None, 64, npz, vocab_size=99)
    assert sorted(map(len, s.calib + s.held_out)) == [2, 3, 4]

    long = tmp_path / "long.txt"
    long.write_text(("the " * 100 + "\n") * 3 + "model runs\n")
    s = load_samples(tok, 64, long)
    assert s.truncated == 3 and any("3 sample(s) are longer than the model's 64 positions" in w for w in s.warnings)
    assert max(len(r) for r in s.calib + s.held_out) == 64

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CalibrationDataError, match="holds no samples"):
        load_samples(tok, 64, empty)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_samples(tok, 64, tmp_path / "missing.txt")
    one = tmp_path / "one.txt"
    one.write_text("the model\n")
    with pytest.raises(CalibrationDataError, match="at least 2"):
        load_samples(tok, 64, one)

    got = list(batches([[1, 2, 3], [4], [5, 6]], 2, pad_id=0))
    assert [g[0].tolist() for g in got] == [[[4, 0], [5, 6]], [[1, 2, 3]]]
    assert got[0][1].tolist() == [[1, 0], [1, 1]]


def test_text_that_tokenizes_to_nothing(tmp_path, bundles):
    from fastertrt.calibration.dataset import load_samples

    tok = bundles.shipped("minilm") / "tokenizer" / "tokenizer.json"
    blank = tmp_path / "blank.txt"
    blank.write_text("\u200b\n\u200b\u200b\n")  # only [CLS] [SEP] after tokenization
    with pytest.raises(CalibrationDataError, match="tokenizes to nothing"):
        load_samples(tok, 128, blank)


# --- the whole stage on a tiny BERT ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_int8(bundles, tmp_path_factory):
    from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    work = tmp_path_factory.mktemp("calib")
    bundle = _copy(bundles.tiny("bert"), work / "tiny-bert.bundle")
    data = _texts(work / "samples.txt", 60)
    calibrate_bundle(bundle, CalibrationOptions(data=data, method="entropy", batch_size=8))
    return bundle, data


def test_int8_graph_has_qdq_for_every_layer(tiny_int8):
    import onnx
    from fastertrt.compiler.build.engine import qdq_matmul_nodes

    bundle, _ = tiny_int8
    manifest = json.loads((bundle / "manifest.json").read_text())
    calib = manifest["int8"]["calibration"]
    assert calib["layers"]["int8"] + len(calib["layers"]["fallback_fp32"]) == calib["layers"]["total"] == 12
    model = onnx.load(str(bundle / "int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert qdq_matmul_nodes(bundle / "int8.onnx") == calib["layers"]["int8"]
    assert ops.count("QuantizeLinear") == 8  # Q/K/V share one input: 4 activation tensors a layer, 2 layers
    zps = [t for t in model.graph.initializer if t.name == "fastertrt_int8_zero"]
    assert zps and onnx.numpy_helper.to_array(zps[0]).dtype == np.int8 and int(onnx.numpy_helper.to_array(zps[0])) == 0
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == calib["layers"]["int8"]
    assert sum(n.domain == "fastertrt" for n in model.graph.node) == 2  # attention plugin nodes stay
    ort_model = onnx.load(str(bundle / "int8.ort.onnx"), load_external_data=False)
    ort_ops = [n.op_type for n in ort_model.graph.node]
    assert ort_ops.count("MatMulIntegerToFloat") == calib["layers"]["int8"] and "DequantizeLinear" not in ort_ops
    assert ort_ops.count("MultiHeadAttention") == 2
    assert calib["ort_variant_parity"]["min_cosine"] > 0.99


def test_report_cache_and_runtime(tiny_int8, tmp_path):
    from fastertrt.calibration.cache import read_tensorrt_cache
    from fastertrt.runtime import load

    bundle, _ = tiny_int8
    report = json.loads((bundle / "calibration" / "report.json").read_text())
    out = report["outputs"]["last_hidden_state"]
    assert 0.9 < out["mean_cosine"] <= 1.0 and out["min_cosine"] <= out["mean_cosine"]
    assert 1 <= len(report["worst_layers"]) <= 10
    errs = [r["relative_error"] for r in report["worst_layers"]]
    assert errs == sorted(errs, reverse=True) and errs[0] > 0

    cache = json.loads((bundle / "calibration" / "cache.json").read_text())
    assert cache["method"] == "entropy" and len(cache["tensors"]) == 8 and cache["model_sha256"]
    trt_cache = read_tensorrt_cache(bundle / "calibration" / "cache.trt.txt")
    for name, t in cache["tensors"].items():
        assert trt_cache[name] == pytest.approx(t["raw_amax"] / 127.0, rel=1e-6)

    ids = [[5, 6, 7, 8, 9], [10, 11]]
    fp32 = load(bundle, backend="onnxruntime", precision="fp32").encode(ids)["last_hidden_state"]
    int8 = load(bundle, backend="onnxruntime").encode(ids)["last_hidden_state"]  # int8 is the default now
    assert not np.array_equal(fp32, int8)
    a, b = fp32[0, :5].ravel(), int8[0, :5].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.95


def test_cache_reuse_stale_and_foreign(tiny_int8, tmp_path, bundles, capsys):
    from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    from fastertrt.progress import Progress

    bundle, data = tiny_int8
    copy = _copy(bundle, tmp_path / "again.bundle")
    before = (copy / "int8.onnx").read_bytes()
    calibrate_bundle(copy, CalibrationOptions(data=data, method="entropy", batch_size=8), Progress())
    err = capsys.readouterr().err
    assert "reusing its ranges" in err and "pass 1/2" not in err
    assert (copy / "int8.onnx").read_bytes() == before

    calibrate_bundle(copy, CalibrationOptions(data=_texts(tmp_path / "other.txt", 30, seed=1), method="entropy",
                                              batch_size=8), Progress())
    err = capsys.readouterr().err
    assert "calibration cache is stale (the sample data changed" in err and "pass 1/2" in err

    other = _copy(bundles.tiny("roberta"), tmp_path / "roberta.bundle")
    with pytest.raises(CalibrationCacheError, match="made for another model"):
        calibrate_bundle(other, CalibrationOptions(data=data, cache=bundle / "calibration" / "cache.json"))
    assert not (other / "int8.onnx").exists()  # nothing half-written


def test_exclude_fallback_and_few_samples(bundles, tmp_path, capsys):
    from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    from fastertrt.progress import Progress

    bundle = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    calibrate_bundle(bundle, CalibrationOptions(data=_texts(tmp_path / "few.txt", 6), exclude=["*layer.1.*"],
                                                batch_size=16), Progress())
    err = capsys.readouterr().err
    assert "fewer than one batch of 16" in err
    calib = json.loads((bundle / "manifest.json").read_text())["int8"]["calibration"]
    kept = [k["layer"] for k in calib["layers"]["kept_fp32"]]
    assert len(kept) == 6 and all(".layer.1." in k for k in kept) and calib["layers"]["int8"] <= 6


def test_decoder_bundles_are_refused_clearly(bundles, tmp_path):
    from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    bundle = _copy(bundles.tiny("gpt2"), tmp_path / "g.bundle")
    with pytest.raises(CalibrationError, match="encoder bundles; this bundle is a decoder"):
        calibrate_bundle(bundle, CalibrationOptions())


def test_head_detection():
    from fastertrt.calibration.graph import find_plan
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
    w2 = numpy_helper.from_array(np.ones((8, 5), np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(5, np.float32), "b2")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="body"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["l"], name="head"),
             helper.make_node("Add", ["l", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5])], [w, w2, b2])
    plan = find_plan(helper.make_model(graph))
    assert {layer.node: layer.head for layer in plan.layers} == {"body": False, "head": True}
    assert plan.layers[1].bias == "b2" and plan.layers[1].output == "logits"


# --- engines -------------------------------------------------------------------------
def test_tensorrt_rtx_int8_engine_has_qdq_layers(tiny_int8, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="needs the tensorrt-rtx package (pip install 'fastertrt[rtx]')")
    from fastertrt.compiler.build import BuildOptions, build_bundle

    bundle = _copy(tiny_int8[0], tmp_path / "e.bundle")
    build_bundle(bundle, BuildOptions(precision="int8", shapes="batch=1:2:4,seq=1:16:64"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (entry,) = [e for e in manifest["engines"] if e["precision"] == "int8"]
    calib = manifest["int8"]["calibration"]
    assert entry["source_onnx"] == "int8.onnx"
    assert entry["qdq_matmul_layers"] == calib["layers"]["int8"] > 0
    assert entry["layer_types"]["QUANTIZE"] >= 8 and entry["output_precisions"]["int8"] >= 8
    assert entry["plugins"] == [{"name": "FastertrtAttention", "version": "1", "count": 2}]


# --- the shipped MiniLM: the accuracy and size targets ------------------------
def test_minilm_int8_accuracy_and_size(bundles):
    bundle = bundles.calibrated("minilm")  # default English sample set, max calibrator
    manifest = json.loads((bundle / "manifest.json").read_text())
    emb = manifest["int8"]["report"]["outputs"]["sentence_embedding"]
    assert emb["samples"] >= 100
    assert emb["mean_cosine"] >= 0.995 and emb["min_cosine"] >= 0.99, emb
    calib = manifest["int8"]["calibration"]
    assert calib["layers"]["int8"] == 36 and len(calib["embeddings_int8"]) == 2
    fp32 = (bundle / "weights.bin").stat().st_size
    assert calib["bytes"]["int8.ort.onnx + weights"] < 0.26 * fp32 < 23.5e6


@pytest.mark.parametrize("content, match", [
    (os.urandom(256), "is not a readable .npz file"),
    (b"PK\x03\x04" + os.urandom(256), "is not a readable .npz file"),  # a zip header, then garbage
    (None, "has no 'input_ids' array"),
    ("npy", "holds a single array"),
    ("objects", "its arrays cannot be read"),
])
def test_corrupt_npz_calibration_data(tmp_path, content, match):
    from fastertrt.calibration.dataset import load_samples

    path = tmp_path / "ids.npz"
    if content is None:
        np.savez(path, tokens=np.ones((3, 4), dtype=np.int64))
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones((3, 4), dtype=np.int64))
    elif content == "objects":
        np.savez(path, input_ids=np.array([[1, 2], [3]], dtype=object))
    else:
        path.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=match):
        load_samples(None, 64, path, vocab_size=99)


@pytest.mark.parametrize("kw, match", [
    (dict(max_samples=-5), r"max_samples \(--calib-samples\) must be an int >= 1, got -5"),
    (dict(max_samples=0), r"max_samples \(--calib-samples\) must be an int >= 1, got 0"),
    (dict(max_samples=2.5), r"max_samples \(--calib-samples\) must be an int >= 1, got 2.5"),
    (dict(batch_size=0), r"batch_size \(--calib-batch\) must be an int >= 1, got 0"),
])
def test_bad_calibration_counts_from_python(kw, match):
    from fastertrt.calibration.calibrate import CalibrationOptions

    with pytest.raises(CalibrationError, match=match):
        CalibrationOptions(**kw)
    assert CalibrationOptions(max_samples=np.int64(5)).max_samples == 5
