"""The CLI: --help with examples for every command, and each command run for real."""

from __future__ import annotations

import json

import pytest

from fastertrt.tools.cli import main

COMMANDS = ("compile", "build", "calibrate", "run", "inspect", "bench", "compare", "export-triton", "serve",
            "serve-env", "sign")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"fastertrt {command} " in out


def test_compile_run_inspect(tmp_path, capsys):
    from tiny_models import save_tiny

    folder = save_tiny("bert", tmp_path / "bert")
    out = tmp_path / "bert.bundle"
    assert main(["compile", str(folder), "-o", str(out), "--attn-implementation", "eager"]) == 0
    err = capsys.readouterr().err
    assert "export encoder graph" in err and "max abs diff" in err and "bundle written" in err
    assert "encoder: fused 2 of 2 FastertrtAttention blocks (core 2)" in err and "rewrite parity" in err

    assert main(["run", str(out), "--text", "the model runs fast", "--text", "a token"]) == 0
    text = capsys.readouterr().out
    assert "last_hidden_state: shape [2, 4, 32]" in text  # word-level tokenizer, no specials: 4 words

    assert main(["run", str(out), "--ids", "5,6,7", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["last_hidden_state"][0]) == 3

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("bert encoder", "input_ids", "[batch, seq]", "all sha256 verified", "parity",
                     "encoder: fused.onnx", "FastertrtAttention: fused 2 of 2 blocks (core 2)"):
        assert expected in text

    # --no-plugins keeps the exported graph as the one the runtime and engines use
    plain = tmp_path / "plain.bundle"
    assert main(["compile", str(folder), "-o", str(plain), "--no-plugins", "-q"]) == 0
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["graphs"]["encoder"]["file"] == "model.onnx" and manifest["rewrite"]["plugins"] is False

    # compiling again onto the same folder is refused without --force
    assert main(["compile", str(folder), "-o", str(out)]) == 2
    assert "OutputExistsError" in capsys.readouterr().err


def test_run_decoder_prompt(bundles, capsys):
    assert main(["run", str(bundles.tiny("gpt2")), "--prompt", "the engine is", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[0] the engine is" in out and "->" in out


def test_cli_errors_are_named_and_short(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.bundle"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "BundleNotFoundError" in err and "Traceback" not in err
    assert main(["compile", "no-such-model", "-o", str(tmp_path / "x")]) == 2
    assert "NotAModelError" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option, rule", [
    (["run", "b.bundle", "--text", "x", "--threads", "-1"], "--threads", "positive integer"),
    (["export-triton", "b.bundle", "-o", "repo", "--threads", "-3"], "--threads", "positive integer"),
    (["calibrate", "b.bundle", "--calib-samples", "-5"], "--calib-samples", "positive integer"),
    (["run", "b.bundle", "--text", "x", "--max-new-tokens", "two"], "--max-new-tokens", "not an integer"),
    (["serve", "b.bundle", "--http-port", "70000"], "--http-port", "not a TCP port"),
])
def test_bad_numbers_are_one_line_usage_errors(argv, option, rule, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and f"argument {option}" in error[0] and rule in error[0], error


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_bench_writes_json_with_torch_and_runtime_rows(bundles, tmp_path, family, capsys):
    bundle = bundles.tiny(family)
    out = tmp_path / "bench.json"
    args = ["bench", str(bundle), "-o", str(out), "--repeats", "2", "--warmup", "1", "--threads", "1"]
    args += ["--batch", "2", "--seq", "16"] if family == "bert" else ["--new-tokens", "4", "--prompt-len", "6"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    rows = [(r["case"].split()[0], r["backend"]) for r in report["results"]]
    if family == "bert":
        assert rows == [("encode", "torch"), ("encode", "onnxruntime")]
    else:  # greedy and beam-4, each on torch and the runtime
        assert rows == [("greedy", "torch"), ("greedy", "onnxruntime"), ("beam-4", "torch"), ("beam-4", "onnxruntime")]
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["peak_rss_mb"] > 0
        assert r["threads"] == 1 and r["repeats"] == 2
    if family == "gpt2":
        for rt in report["results"][1::2]:
            assert rt["tokens_per_s"] > 0 and rt["same_tokens_as_torch"] is True
            assert len(rt["tokens"][0]) == 4  # min_new_tokens forced all 4
    assert "median ms" in capsys.readouterr().out


def test_inspect_decoder_folds_per_layer_cache(bundles, capsys):
    assert main(["inspect", str(bundles.tiny("llama"))]) == 0
    out = capsys.readouterr().out
    assert "past_key_values.{0..1}.{key,value}" in out and "[rows, 2, past, 8]" in out
    assert "present.{0..1}.{key,value}" in out and "weights.bin" in out
    assert "present.0.key" not in out


def test_compile_int8_calibrate_and_bad_data(tmp_path, capsys):
    from tiny_models import WORDS, save_tiny

    folder = save_tiny("bert", tmp_path / "bert")
    data = tmp_path / "samples.txt"
    data.write_text("\n".join(" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9)) for i in range(40)))
    out = tmp_path / "bert-int8.bundle"
    assert main(["compile", str(folder), "-o", str(out), "--int8", "--calib-data", str(data), "--backend", "none"]) == 0
    err = capsys.readouterr().err
    assert "12 of 12 MatMul/Gemm layers INT8" in err and "accuracy on" in err and "sentence" not in err
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int8     int8.onnx" in text and "held-out last_hidden_state: mean cosine" in text

    assert main(["calibrate", str(out), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "CalibrationDataError" in capsys.readouterr().err and (out / "int8.onnx").exists()
    assert main(["calibrate", str(out), "--data", str(data), "--method", "mse", "-q"]) == 0
    assert json.loads((out / "manifest.json").read_text())["int8"]["calibration"]["method"] == "mse"
