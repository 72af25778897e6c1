"""`fastertrt compare` and `inspect` on real bundles: clean ones pass, and every
planted fault is found and named at the layer where it was planted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import planted_faults as faults
import pytest

from fastertrt.tools.cli import main
from fastertrt.tools.compare import CompareOptions, compare_bundle


def _pair(report: dict, ref: str, stage: str, graph: str | None = None) -> dict:
    g = next(g for g in report["graphs"] if graph is None or g["graph"] == graph)
    return next(p for p in g["pairs"] if p["ref"] == ref and p["stage"] == stage)


def _first_bad(report: dict, ref: str, stage: str) -> dict:
    run = next(r for g in report["graphs"] for r in g["layers"] if r["pair"] == [ref, stage])
    assert run["first_bad"] is not None, run
    return run["first_bad"]


def _kinds(first: dict) -> list[str]:
    return [f["kind"] for f in first["findings"]]


@pytest.fixture(scope="module")
def tiny_bert(bundles):
    return bundles.tiny("bert")


def _faulty(bundle: Path, tmp_path: Path, name: str) -> Path:
    return faults.copy_bundle(bundle, tmp_path / f"{name}.bundle")


# --- the shipped MiniLM, INT8 ---------------------------------------------------------
@pytest.mark.slow
def test_minilm_int8_clean_passes_every_stage_and_replays_in_polygraphy(bundles, tmp_path, capsys):
    bundle = bundles.calibrated("minilm")
    files = {k: tmp_path / f"{k}.json" for k in ("report", "inputs", "outputs")}
    plot = tmp_path / "layers.png"
    assert main(["compare", str(bundle), "--layers", "all", "--json", str(files["report"]), "--plot", str(plot),
                 "--save-inputs", str(files["inputs"]), "--save-outputs", str(files["outputs"]), "-q"]) == 0
    out = capsys.readouterr().out
    assert "PASSED: every stage within tolerance" in out and "torch -> model.onnx" in out
    report = json.loads(files["report"].read_text())
    graph = report["graphs"][0]
    assert [(p["ref"], p["stage"]) for p in graph["pairs"]] == [
        ("torch", "model"), ("model", "fused"), ("fused", "int8"), ("int8", "runtime")]
    for p in graph["pairs"]:
        for name, m in p["outputs"].items():
            assert m["passed"] and m["kind"] == "float", (p["stage"], name, m)
    assert _pair(report, "fused", "int8")["outputs"]["sentence_embedding"]["cosine"] >= 0.99
    assert _pair(report, "torch", "model")["outputs"]["last_hidden_state"]["max_abs"] < 1e-4
    # every ONNX pair searched layer by layer: the planted-fault tests below rely on this being quiet
    searched = {tuple(r["pair"]): r for r in graph["layers"]}
    assert set(searched) == {("model", "fused"), ("fused", "int8"), ("int8", "runtime")}
    for run in searched.values():
        assert run["first_bad"] is None and run["checked"] > 150
    assert searched[("fused", "int8")]["qdq_pairs"] == 74  # 36 layers x (activation + weight) + 2 embeddings
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20000
    assert graph["skipped"] and graph["skipped"][0]["stage"] == "engine"

    # polygraphy replays the saved inputs on the same graph and gets the same outputs (compare runs graphs
    # as written: ONNX Runtime's own fusions would turn Q/DQ into integer kernels)
    poly = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    replay = tmp_path / "replay.json"
    run = subprocess.run([poly, "run", str(bundle / "int8.onnx"), "--onnxrt", "--graph-optimization-level",
                          "ORT_DISABLE_ALL", "--load-inputs", str(files["inputs"]), "--save-outputs", str(replay)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    from polygraphy.comparator import RunResults

    ours = dict(RunResults.load(str(files["outputs"])))["int8.onnx"]
    theirs = list(dict(RunResults.load(str(replay))).values())[0]
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a["sentence_embedding"], b["sentence_embedding"], atol=1e-6)

    # and compare takes polygraphy's inputs back
    again = compare_bundle(bundle, CompareOptions(stages=["fused", "int8"], load_inputs=files["inputs"]))
    assert again["passed"] and again["graphs"][0]["iterations"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind,which,factor,module", [
    ("activation", 9, 0.05, "model.encoder.layer.1.attention.output.dense"),
    ("weight", 16, 3.0, "model.encoder.layer.2.intermediate.dense"),
])
def test_minilm_bad_qdq_scale_is_named(bundles, tmp_path, kind, which, factor, module):
    bundle = _faulty(bundles.calibrated("minilm"), tmp_path, f"qdq-{kind}")
    planted = faults.qdq_scale(bundle, which, kind, factor)
    report = compare_bundle(bundle, CompareOptions(stages=["fused", "int8", "runtime"]))
    assert not report["passed"] and not _pair(report, "fused", "int8")["passed"]
    first = _first_bad(report, "fused", "int8")
    assert first["check"] == "qdq" and first["tensor"] == planted["dq_output"] and first["module"] == module
    finding = next(f for f in first["findings"] if f["kind"] == f"qdq-{kind}")
    assert module in finding["suggestion"] and "--exclude" in finding["suggestion"]
    # the fault is in int8.onnx alone: the runtime's ONNX Runtime variant kept the right scale,
    # and the search of that pair names the constant the two files disagree on
    behind = _first_bad(report, "int8", "runtime")
    assert any(f["kind"] == "weights" and planted["scale"] in f["text"] for f in behind["findings"]), behind
    if kind == "activation":
        assert finding["clipped_fraction"] > 0.2  # a scale 20x too small clips most values
    else:
        assert "x3" in finding["text"]  # the channels are three times too large


# --- tiny BERT, FP32: plugin, weights, mask ---------------------------------------------
def test_tiny_clean_bundle_passes(tiny_bert):
    report = compare_bundle(tiny_bert)
    assert report["passed"], [(p["stage"], p["outputs"]) for p in report["graphs"][0]["pairs"]]
    assert [s["name"] for s in report["graphs"][0]["stages"]] == ["torch", "model", "fused", "runtime"]
    assert report["graphs"][0]["layers"] == []  # auto: only failing pairs are searched


def test_wrong_attention_scale_is_named_at_its_plugin_node(tiny_bert, tmp_path, capsys):
    bundle = _faulty(tiny_bert, tmp_path, "attn")
    planted = faults.attention_scale(bundle, which=1, factor=3.0)
    json_path = tmp_path / "r.json"
    assert main(["compare", str(bundle), "--stages", "model,fused", "--json", str(json_path), "--plot",
                 str(tmp_path / "r.png"), "-q"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: encoder model -> fused" in out and f"first bad tensor: {planted['output']}" in out
    first = _first_bad(json.loads(json_path.read_text()), "model", "fused")
    assert first["node"] == planted["node"] and first["op"] == "FastertrtAttention"
    assert first["module"] == "model.encoder.layer.1.attention.self"
    assert "plugin" in _kinds(first) and "is not 1/sqrt(head_size)" in first["findings"][-1]["text"]
    assert all(row["vs_ref"]["max_abs"] == 0 for row in first["inputs"])  # its inputs are still right
    assert (tmp_path / "r.png").stat().st_size > 10000


def test_attention_attribute_without_its_function_fails_the_checks(tiny_bert, tmp_path, capsys):
    """Changing a plugin attribute alone leaves ONNX Runtime (which runs the function)
    unaware; only the engine would compute it. The node/function check catches it."""
    bundle = _faulty(tiny_bert, tmp_path, "attr")
    planted = faults.attention_scale(bundle, function_too=False)
    report = compare_bundle(bundle, CompareOptions(stages=["model", "fused"]))
    assert all(p["passed"] for p in report["graphs"][0]["pairs"]) and not report["passed"]
    assert planted["node"] in report["graphs"][0]["problems"][0]["problem"]
    assert main(["inspect", str(bundle)]) == 1
    assert f"PROBLEM fused.onnx: plugin node {planted['node']}" in capsys.readouterr().out


def test_swapped_weight_is_named_at_its_layer(tiny_bert, tmp_path):
    bundle = _faulty(tiny_bert, tmp_path, "swap")
    planted = faults.swapped_weight(bundle)
    report = compare_bundle(bundle, CompareOptions(stages=["model", "fused"]))
    first = _first_bad(report, "model", "fused")
    assert first["node"] == planted["node"] and first["tensor"] == planted["output"]
    assert first["module"] == "model.encoder.layer.1.attention.self.query"
    text = next(f["text"] for f in first["findings"] if f["kind"] == "node-changed")
    wa, wb = planted["weights"]
    assert f"reads weight {wb}" in text and f"reads {wa}" in text and "attention.self.key" in text


def test_off_by_one_mask_is_named_at_the_mask(tiny_bert, tmp_path):
    bundle = _faulty(tiny_bert, tmp_path, "mask")
    planted = faults.off_by_one_mask(bundle)
    report = compare_bundle(bundle, CompareOptions(stages=["model", "fused"]))
    first = _first_bad(report, "model", "fused")
    assert first["node"] in planted["nodes"] and first["metrics"]["kind"] == "exact"
    # the ragged sample batches have padding: one position per padded row flips
    assert 0 < first["metrics"]["mismatched"] <= report["graphs"][0]["input_shapes"][0]["input_ids"][0]
    assert "attention_mask_off_by_one" in first["findings"][0]["text"]


def test_a_stage_that_cannot_run_is_named(tiny_bert, tmp_path, capsys):
    bundle = _faulty(tiny_bert, tmp_path, "broken")
    faults.swapped_weight(bundle, first=4)  # FFN weights of different shapes: the graph no longer loads
    assert main(["compare", str(bundle), "--stages", "model,fused", "-q"]) == 2
    err = capsys.readouterr().err
    assert "StageRunError" in err and "stage fused.onnx" in err and "Incompatible dimensions" in err


# --- decoders, inputs, errors -----------------------------------------------------------
def test_tiny_decoder_both_graphs_pass(bundles, tmp_path):
    inputs = tmp_path / "in.json"
    report = compare_bundle(bundles.tiny("llama"), CompareOptions(save_inputs=inputs, layers="all"))
    assert report["passed"] and [g["graph"] for g in report["graphs"]] == ["prefill", "decode"]
    for g in report["graphs"]:
        assert [p["stage"] for p in g["pairs"]] == ["model", "fused", "runtime"]
        pair = g["pairs"][1]
        assert pair["outputs"]["candidate_tokens"]["kind"] == "exact" and "present.1.value" in pair["outputs"]
        assert all(r["first_bad"] is None for r in g["layers"])
    decode_inputs = tmp_path / "in.decode.json"
    assert decode_inputs.is_file() and (tmp_path / "in.prefill.json").is_file()
    from polygraphy.json import load_json

    feeds = load_json(str(decode_inputs))
    assert feeds[0]["past_key_values.0.key"].shape[2] == feeds[0]["attention_mask"].shape[1] - 1


def test_text_inputs_and_bad_inputs(tiny_bert, tmp_path, capsys):
    report = compare_bundle(tiny_bert, CompareOptions(stages=["model", "fused"], texts=["the model runs", "a"]))
    assert report["passed"] and report["graphs"][0]["input_shapes"] == [
        {"input_ids": [2, 3], "attention_mask": [2, 3], "token_type_ids": [2, 3]}]

    bad = tmp_path / "bad.json"
    from polygraphy.json import save_json

    save_json([{"input_ids": np.ones((1, 3), np.int64)}], str(bad))
    assert main(["compare", str(tiny_bert), "--load-inputs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "InputError" in err and "missing ['attention_mask', 'token_type_ids']" in err
    bad.write_text("not json")
    assert main(["compare", str(tiny_bert), "--load-inputs", str(bad)]) == 2
    assert "not polygraphy's JSON input format" in capsys.readouterr().err
    assert main(["compare", str(tiny_bert), "--stages", "model,onnx"]) == 2
    assert "unknown stage(s) ['onnx']" in capsys.readouterr().err
    assert main(["compare", str(tiny_bert), "--graph", "decode"]) == 2
    assert "has graphs ['encoder']" in capsys.readouterr().err


def test_inspect_lists_stages_plugins_and_int8_layers(bundles, capsys):
    assert main(["inspect", str(bundles.calibrated("minilm")), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "stage    encoder fused: fused.onnx + weights.bin" in out and "plugin nodes FastertrtAttention x6" in out
    assert "Q/DQ 24 Q + 74 DQ" in out and "precision per layer: 38 INT8, 0 FP32" in out
    assert "INT8  MatMul  model.encoder.layer.5.output.dense" in out and "MatMulIntegerToFloat x36" in out
    assert "checks   manifest schema, file hashes, plugin nodes against their ONNX functions: all pass" in out


# --- GPU only ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_stage_runs_through_polygraphys_tensorrt_runner(tiny_bert, tmp_path):
    from fastertrt.compiler.build import BuildOptions, build_bundle

    bundle = faults.copy_bundle(tiny_bert, tmp_path / "engine.bundle")
    build_bundle(bundle, BuildOptions(backend="tensorrt", shapes="batch=1:2:4,seq=1:16:64"))
    report = compare_bundle(bundle, CompareOptions(stages=["fused", "runtime", "engine"]))
    pair = _pair(report, "fused", "engine")
    assert pair["passed"] and report["passed"], pair
    assert pair["tolerance"]["key"] == ["engine", "fp32"]
