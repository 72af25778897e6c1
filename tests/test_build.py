"""Real TensorRT-RTX engine builds on this CPU-only machine, the manifest's
record of them, and every engine check that runs before the first CUDA call."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastertrt import errors
from fastertrt.compiler.build import BuildOptions, build_bundle
from fastertrt.compiler.build.shapes import resolve_profiles
from fastertrt.runtime import load
from fastertrt.runtime.engines import check_compatible, check_plugins, find_profile
from fastertrt.runtime.manifest import manifest_digest, sha256_file

pytest.importorskip("tensorrt_rtx", reason="the rtx extra (tensorrt-rtx) is part of the test install")


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _copy(src, tmp_path, name="b.bundle"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _check_engine_entry(bundle, entry, attention_layers: int = 2, beam_steps: int = 0):
    path = bundle / entry["file"]
    assert path.stat().st_size == entry["bytes"] > 100_000
    assert sha256_file(path) == entry["sha256"]  # the file on disk is the whole engine that was built
    assert entry["backend"] == "tensorrt-rtx" and entry["backend_version"].startswith("1.")
    assert entry["compute_capabilities"] == ["sm80", "sm86", "sm89"]
    assert entry["layers"] > 10 and entry["layer_types"]["MATRIX_MULTIPLY"] >= 4
    # attention is fastertrt's plugin, one layer per block, and nothing was inlined
    want = [{"name": "FastertrtAttention", "version": "1", "count": attention_layers}]
    want += [{"name": "FastertrtBeamStep", "version": "1", "count": beam_steps}] if beam_steps else []
    assert entry["plugins"] == want
    assert len(entry["plugin_layers"]) == attention_layers + beam_steps and "SOFTMAX" not in entry["layer_types"]


@pytest.fixture(scope="module")
def tiny_bert_engines(bundles, tmp_path_factory):
    bundle = _copy(bundles.tiny("bert"), tmp_path_factory.mktemp("eng"))
    shapes = "batch=1:2:4,seq=1:16:32;batch=8:8:16,seq=1:8:8"  # two profiles
    build_bundle(bundle, BuildOptions(precision="fp32", shapes=shapes))
    build_bundle(bundle, BuildOptions(precision="fp16", shapes=shapes))
    return bundle


def test_tiny_bert_fp32_and_fp16_engines(tiny_bert_engines):
    m = _manifest(tiny_bert_engines)
    by_precision = {e["precision"]: e for e in m["engines"]}
    assert set(by_precision) == {"fp32", "fp16"} and len(m["engines"]) == 2
    fp32, fp16 = by_precision["fp32"], by_precision["fp16"]
    for e in (fp32, fp16):
        _check_engine_entry(tiny_bert_engines, e)
        assert [p["dims"] for p in e["profiles"]] == [{"batch": [1, 2, 4], "seq": [1, 16, 32]},
                                                      {"batch": [8, 8, 16], "seq": [1, 8, 8]}]
        assert e["profiles"][0]["inputs"]["token_type_ids"] == {"min": [1, 1], "opt": [2, 16], "max": [4, 32]}
        assert [t["name"] for t in e["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        assert e["outputs"][0]["name"] == "last_hidden_state" and e["outputs"][0]["dtype"] == "float"
    assert "half" not in fp32["output_precisions"]
    assert fp16["output_precisions"]["half"] > 0 and fp16["source_onnx"] == "fused.fp16.onnx"
    # the fp16 graph the engine came from runs on ONNX Runtime and stays close to fp32
    import onnxruntime as ort

    ids = np.arange(4, 20, dtype=np.int64).reshape(2, 8)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    a = ort.InferenceSession(str(tiny_bert_engines / "fused.onnx")).run(None, feeds)[0]
    b = ort.InferenceSession(str(tiny_bert_engines / "fused.fp16.onnx")).run(None, feeds)[0]
    assert 0 < np.abs(a - b).max() < 2e-2


def test_minilm_fp16_engine(bundles, tmp_path):
    bundle = _copy(bundles.shipped("minilm"), tmp_path)
    build_bundle(bundle, BuildOptions(precision="fp16", shapes="batch=1:8:32,seq=1:128:256"))
    (e,) = _manifest(bundle)["engines"]
    _check_engine_entry(bundle, e, attention_layers=6)
    # 6 layers x (Q, K, V, output, 2 feed-forward): attention's own MatMuls are in the plugin
    assert e["layer_types"]["MATRIX_MULTIPLY"] == 36 and e["output_precisions"]["half"] >= 72
    assert [t["name"] for t in e["outputs"]] == ["last_hidden_state", "sentence_embedding"]


def test_tiny_gpt2_prefill_and_decode_step_engines(bundles, tmp_path):
    bundle = _copy(bundles.tiny("gpt2"), tmp_path)
    build_bundle(bundle, BuildOptions(shapes="batch=1:2:4,beams=1:2:2,seq=1:8:16,past=1:16:32"))
    engines = {e["graph"]: e for e in _manifest(bundle)["engines"]}
    assert set(engines) == {"prefill", "decode"}
    for e in engines.values():
        _check_engine_entry(bundle, e, beam_steps=1)
    step = engines["decode"]["profiles"][0]
    assert step["dims"] == {"rows": [1, 4, 8], "seq": [1, 1, 1], "total": [2, 17, 33], "batch": [1, 2, 4],
                            "beams": [1, 2, 2], "past": [1, 16, 32]}
    assert step["inputs"]["past_key_values.1.value"]["max"] == [8, 4, 32, 8]
    names = [t["name"] for t in engines["decode"]["inputs"]]
    assert names[:6] == ["input_ids", "attention_mask", "position_ids", "beam_scores", "token_bias", "beam_idx"]
    assert len(names) == 6 + 2 * 2



def test_compile_with_build_and_cli_build_inspect(tmp_path, capsys):
    from tiny_models import save_tiny

    from fastertrt.tools.cli import main

    folder = save_tiny("distilbert", tmp_path / "d")
    out = tmp_path / "d.bundle"
    assert main(["compile", str(folder), "-o", str(out), "--backend", "tensorrt-rtx", "--precision", "bf16",
                 "--shapes", "batch=1:1:2,seq=4:8:16", "--targets", "sm86"]) == 0
    err = capsys.readouterr().err
    assert "build tensorrt-rtx bf16 engine for encoder" in err and "targets sm86" in err
    (e,) = _manifest(out)["engines"]
    assert e["precision"] == "bf16" and e["compute_capabilities"] == ["sm86"] and e["output_precisions"]["bf16"] > 0
    assert main(["build", str(out), "--precision", "fp32", "--shapes", "batch=1:1:2,seq=4:8:16"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "engines/encoder.bf16.tensorrt-rtx.engine" in text and "engines/encoder.fp32.tensorrt-rtx.engine" in text
    assert "profile 0: batch=1:1:2, seq=4:8:16" in text and "all sha256 verified" in text
    # no GPU here: auto falls back to ONNX Runtime and still answers
    assert load(out).encode([[5, 6, 7]])["last_hidden_state"].shape == (1, 3, 32)


def test_rtx_parser_library_link_is_made_by_fastertrt():
    import importlib.util
    from pathlib import Path

    from fastertrt.compiler.build.backends import load_backend

    load_backend("tensorrt-rtx")
    libs = Path(list(importlib.util.find_spec("tensorrt_rtx_libs").submodule_search_locations)[0])
    link = libs / "libtensorrt_rtx.so"
    assert link.is_symlink() or link.is_file()
    assert link.resolve() == (libs / "libtensorrt_rtx.so.1").resolve()


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("spec, match", [
    ("batch=1:8", "name=min:opt:max"),
    ("batch=8:4:2", "min <= opt <= max"),
    ("beam=1:2:3", "dims .*beam"),
    ("seq=1:8:4096", "exceeds the model's 64 positions"),
    ("batch=0:1:2", "batch must be at least 1"),
])
def test_bad_shape_specs(spec, match):
    inputs = [{"name": "input_ids", "shape": ["batch", "seq"]}]
    with pytest.raises(errors.ShapeSpecError, match=match):
        resolve_profiles("encoder", inputs, spec, 64)


def test_rtx_has_no_hopper_target(bundles, tmp_path):
    bundle = _copy(bundles.tiny("bert"), tmp_path)
    with pytest.raises(errors.BuildError, match="cannot target sm90.*--backend tensorrt"):
        build_bundle(bundle, BuildOptions(targets=["sm90"]))
    assert "engines" not in _manifest(bundle)  # the failed build left the bundle as it was


def test_missing_tensorrt_package_is_named(bundles, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("standard tensorrt is installed here")
    with pytest.raises(errors.MissingDependencyError, match="fastertrt\\[tensorrt\\]"):
        build_bundle(_copy(bundles.tiny("bert"), tmp_path), BuildOptions(backend="tensorrt"))


def _entry(tiny_bert_engines):
    return next(e for e in _manifest(tiny_bert_engines)["engines"] if e["precision"] == "fp32")


def test_engine_from_another_backend_or_version(tiny_bert_engines):
    e = _entry(tiny_bert_engines)
    with pytest.raises(errors.EngineMismatchError, match="built by tensorrt-rtx .* this Python has tensorrt 10.13"):
        check_compatible(e, {"tensorrt": "10.13.0.35"}, None)
    with pytest.raises(errors.EngineMismatchError, match="this is tensorrt-rtx 1.8.0.1.*install tensorrt-rtx=="):
        check_compatible(e, {"tensorrt-rtx": "1.8.0.1"}, None)
    check_compatible(e, {"tensorrt-rtx": e["backend_version"]}, "sm86")  # a matching box passes


def test_engine_for_another_compute_capability(tiny_bert_engines):
    e = _entry(tiny_bert_engines)
    with pytest.raises(errors.EngineMismatchError, match="targets sm80, sm86, sm89; this GPU is sm90.*Hopper"):
        check_compatible(e, {"tensorrt-rtx": e["backend_version"]}, "sm90")


def test_truncated_engine(tiny_bert_engines, tmp_path):
    bundle = _copy(tiny_bert_engines, tmp_path)
    path = bundle / _entry(bundle)["file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(errors.BundleIntegrityError, match="encoder.fp32.tensorrt-rtx.engine was changed"):
        load(bundle)


def test_corrupted_engine(tiny_bert_engines, tmp_path):
    bundle = _copy(tiny_bert_engines, tmp_path)
    path = bundle / _entry(bundle)["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(errors.BundleIntegrityError, match="sha256 differs"):
        load(bundle)


def test_hand_edited_manifest(tiny_bert_engines, tmp_path):
    bundle = _copy(tiny_bert_engines, tmp_path)
    m = _manifest(bundle)
    m["engines"][0]["compute_capabilities"] = ["sm90"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(errors.BundleIntegrityError, match="manifest.json was edited"):
        load(bundle)


def test_shapes_outside_every_profile(tiny_bert_engines):
    e = _entry(tiny_bert_engines)
    assert find_profile(e, {"input_ids": (2, 20)}) == 0
    assert find_profile(e, {"input_ids": (12, 8)}) == 1
    with pytest.raises(errors.ShapeOutOfProfileError, match=r"profile 0 \(batch=1:2:4.*\[5, 20\] not within"):
        find_profile(e, {"input_ids": (5, 20), "attention_mask": (5, 20)})


def test_missing_plugin(tiny_bert_engines, tmp_path):
    bundle = _copy(tiny_bert_engines, tmp_path)
    m = _manifest(bundle)
    for e in m["engines"]:
        e["plugins"] = [{"name": "fastertrt_attention_v9", "version": "9"}]
    m["manifest_sha256"] = manifest_digest(m)  # as if a newer fastertrt had written it
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(errors.PluginMissingError, match="fastertrt_attention_v9 v9"):
        check_plugins(m["engines"][0])
    with pytest.raises(errors.PluginMissingError):
        load(bundle, backend="tensorrt")  # raised before any CUDA call


def test_forced_tensorrt_without_gpu_is_clear(tiny_bert_engines):
    from fastertrt.runtime.gpu import gpu_compute_capability

    if gpu_compute_capability() is not None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(errors.EngineMismatchError, match="needs an NVIDIA GPU.*backend='onnxruntime'"):
        load(tiny_bert_engines, backend="tensorrt")


# --- GPU only -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_runs_like_onnxruntime(tiny_bert_engines, precision):
    from fastertrt.tolerances import tolerance

    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    trt_out = load(tiny_bert_engines, backend="tensorrt", precision=precision).encode(rows)
    ort_out = load(tiny_bert_engines, backend="onnxruntime").encode(rows)
    valid = ort_out["attention_mask"] > 0
    diff = np.abs(trt_out["last_hidden_state"] - ort_out["last_hidden_state"])[valid].max()
    assert diff <= tolerance("engine", precision).atol


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_cuda_graph_replay_equals_plain_run(tiny_bert_engines):
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    plain = load(tiny_bert_engines, backend="tensorrt", precision="fp32").encode(rows)
    graphed = load(tiny_bert_engines, backend="tensorrt", precision="fp32", cuda_graphs=True)
    for _ in range(3):  # first run sets shapes, second captures, third replays
        out = graphed.encode(rows)
    np.testing.assert_array_equal(out["last_hidden_state"], plain["last_hidden_state"])


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("beams", [1, 4])
def test_decoder_engines_generate_like_onnxruntime(bundles, tmp_path, beams):
    """Device-resident decoding (KV ping-pong buffers, beam reorder in the engine)
    gives the tokens and scores of the ONNX Runtime path."""
    bundle = _copy(bundles.tiny("llama"), tmp_path)
    build_bundle(bundle, BuildOptions(backend="tensorrt", shapes="batch=1:2:4,beams=1:4:4,seq=1:8:16,past=1:16:32"))
    prompts = [[5, 9, 17, 33, 41, 8, 12], [7, 21, 3], [60, 61, 62, 63, 64]]
    kw = dict(max_new_tokens=8, num_beams=beams, pad_token_id=0)
    on_gpu = load(bundle, backend="tensorrt").generate(prompts, **kw)
    on_cpu = load(bundle, backend="onnxruntime").generate(prompts, **kw)
    np.testing.assert_array_equal(on_gpu.sequences, on_cpu.sequences)
    np.testing.assert_allclose(on_gpu.scores, on_cpu.scores, atol=1e-4, rtol=0)
