"""Bundles are code and outputs belong to the user: what --force may replace, the
final swap, one writer per bundle, cleanup after SIGTERM, paths confined to the
bundle, signatures, and one schema check for every damaged manifest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastertrt import errors
from fastertrt.compiler import compile_model
from fastertrt.compiler.bundle import staging
from fastertrt.runtime import load
from fastertrt.runtime.manifest import manifest_digest, sha256_file
from fastertrt.tools.cli import main

CLI = [sys.executable, "-m", "fastertrt.tools.cli"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(bundle: Path, change) -> None:
    """Change the manifest as an attacker would: content edited, digest recomputed."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m = change(m) or m
    if isinstance(m, dict):
        m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_folder(bundles):
    bundles.tiny("bert")
    return bundles.root / "tiny-bert"


# --- what --force may replace -----------------------------------------------------------
@pytest.mark.parametrize("where", ["source", "inside-source", "empty", "dot", "cwd-parent", "home", "user-folder",
                                   "user-file"])
def test_force_refuses_what_is_not_a_fastertrt_output(where, tiny_folder, tmp_path, monkeypatch):
    model = _copy(tiny_folder, tmp_path / "model")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("my notes")
    (tmp_path / "data.txt").write_text("precious")
    monkeypatch.chdir(tmp_path / "work")
    out = {"source": model, "inside-source": model / "out.bundle", "empty": "", "dot": ".",
           "cwd-parent": tmp_path, "home": Path.home(), "user-folder": tmp_path / "work",
           "user-file": tmp_path / "data.txt"}[where]
    before = _tree(tmp_path)
    with pytest.raises(errors.OutputRefusedError, match="never replaces|source model folder|not a fastertrt bundle|"
                                                        "empty"):
        compile_model(os.fspath(model), out, overwrite=True, parity=False)
    assert _tree(tmp_path) == before


def test_force_replaces_an_earlier_bundle_and_cli_says_what_is_there(bundles, tiny_folder, tmp_path, capsys):
    out = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    (out / "stale.txt").write_text("not listed")
    assert main(["compile", str(tiny_folder), "-o", str(out), "--force", "--no-parity", "-q"]) == 0
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    assert main(["compile", str(tiny_folder), "-o", str(tmp_path / "mine"), "--force", "-q"]) == 2
    err = capsys.readouterr().err
    assert "OutputRefusedError" in err and "a folder with 1 entry (a.txt)" in err and len(err.splitlines()) == 1
    assert (tmp_path / "mine" / "a.txt").read_text() == "x"


def test_output_under_a_file_fails_before_the_model_loads(tiny_folder, tmp_path):
    (tmp_path / "afile").write_text("x")
    start = time.monotonic()
    with pytest.raises(errors.OutputRefusedError, match="afile is a file, not a folder"):
        compile_model(os.fspath(tiny_folder), tmp_path / "afile" / "x.bundle")
    assert time.monotonic() - start < 2.0  # no torch model was loaded


def test_export_triton_force_replaces_only_a_repository(bundles, tmp_path):
    from fastertrt.serve.repository import export_repository

    repo = tmp_path / "models"
    export_repository(bundles.tiny("bert"), repo)
    export_repository(bundles.tiny("bert"), repo, overwrite=True)  # its own repository: replaced
    (repo / "my_own_model").mkdir()  # a user's model next to fastertrt's: --force would delete it
    with pytest.raises(errors.OutputRefusedError, match="my_own_model, which fastertrt did not write"):
        export_repository(bundles.tiny("bert"), repo, overwrite=True)
    assert (repo / "my_own_model").is_dir()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<p>")
    with pytest.raises(errors.OutputRefusedError, match="not a fastertrt repository"):
        export_repository(bundles.tiny("bert"), tmp_path / "site", overwrite=True)
    assert (tmp_path / "site" / "index.html").read_text() == "<p>"


# --- the final swap -----------------------------------------------------------------------
def test_a_file_made_at_the_output_during_the_run_is_kept(tmp_path):
    out = tmp_path / "x.bundle"
    with (pytest.raises(errors.OutputExistsError, match="appeared while this run was working.*kept at"),
          staging(out) as stage):
        (stage / "result.txt").write_text("new")
        out.write_text("someone else's file")
    assert out.read_text() == "someone else's file"
    kept = list(tmp_path.glob("x.bundle.new-*"))
    assert len(kept) == 1 and (kept[0] / "result.txt").read_text() == "new"
    assert not list(tmp_path.glob(".x.bundle.*"))


def test_a_failed_swap_restores_the_old_bundle(bundles, tmp_path, monkeypatch):
    import fastertrt.compiler.bundle as bundle_module

    out = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    before = _tree(out)

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module, "_rename_noreplace", fail)
    with pytest.raises(OSError, match="No space left"), staging(out, overwrite=True) as stage:
        (stage / "manifest.json").write_text("{}")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bundle"]


# --- one writer per bundle ---------------------------------------------------------------------
def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_concurrent_builds_lock_the_bundle(bundles, tmp_path):
    """Two writers of one bundle: without --wait the second fails naming the holder;
    with --wait both run one after the other and neither's engines are lost."""
    pytest.importorskip("tensorrt_rtx")
    from fastertrt.bundle.lock import BundleLock

    bundle = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    with BundleLock(bundle, what="the test"):
        refused = subprocess.run(CLI + ["build", str(bundle), "--precision", "fp16", "-q"], check=False,
                                 capture_output=True, text=True)
        queued = [subprocess.Popen(CLI + ["build", str(bundle), "--precision", p, "--wait", "-q"],
                                   stderr=subprocess.PIPE, text=True) for p in ("fp16", "fp32")]
        time.sleep(3)
        assert all(q.poll() is None for q in queued)  # both wait for the lock
    for q in queued:
        assert q.wait(300) == 0, q.stderr.read()
    assert refused.returncode == 2 and "BundleLockedError" in refused.stderr
    assert f"pid {os.getpid()} (the test" in refused.stderr and "--wait" in refused.stderr
    engines = json.loads((bundle / "manifest.json").read_text())["engines"]
    assert sorted(e["precision"] for e in engines) == ["fp16", "fp32"]  # neither build's work was lost
    assert not (tmp_path / ".b.bundle.lock").exists()
    load(bundle, backend="onnxruntime")  # the final bundle's hashes hold


def test_a_symlink_at_the_lock_name_is_never_written_through(tmp_path):
    from fastertrt.bundle.lock import BundleLock

    (tmp_path / "precious.txt").write_text("user data")
    (tmp_path / ".b.bundle.lock").symlink_to(tmp_path / "precious.txt")
    with pytest.raises(errors.BundleLockedError, match="must be a plain file"):
        BundleLock(tmp_path / "b.bundle").acquire()
    assert (tmp_path / "precious.txt").read_text() == "user data"
    assert (tmp_path / ".b.bundle.lock").is_symlink()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    from fastertrt.bundle.lock import BundleLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".b.bundle.lock").write_text(json.dumps({"pid": dead.pid, "command": "fastertrt build"}))
    with BundleLock(tmp_path / "b.bundle"):
        pass
    assert f"left by pid {dead.pid}" in capsys.readouterr().err
    with BundleLock(tmp_path / "b.bundle"), pytest.raises(errors.BundleLockedError, match=f"pid {os.getpid()}"):
        BundleLock(tmp_path / "b.bundle").acquire()


# --- SIGTERM and leftovers ------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_killed_compile_leaves_nothing_behind(sig, tiny_folder, tmp_path):
    out = tmp_path / "k.bundle"
    proc = subprocess.Popen(CLI + ["compile", str(tiny_folder), "-o", str(out), "-q"], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert _wait_for(lambda: any(tmp_path.glob(".k.bundle.*.partial")), 120)
    time.sleep(0.5)  # inside the export
    proc.send_signal(sig)
    assert proc.wait(60) == 128 + sig, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_partial_folders_of_dead_runs_are_removed(bundles, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".b.bundle.{dead.pid}.abcd1234.partial"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    live = tmp_path / f".b.bundle.{os.getpid()}.live0000.partial"  # a live pid's: not ours to remove
    live.mkdir()
    # another output's files: `b.bundle.60` is not `b.bundle`, though its names start alike
    sibling_stage = tmp_path / f".b.bundle.{dead.pid}.{os.getpid()}.abcd.partial"
    sibling_old = tmp_path / f".b.bundle.{dead.pid}.{os.getpid()}.old"
    sibling_stage.mkdir()
    sibling_old.mkdir()
    with staging(tmp_path / "b.bundle") as stage:
        (stage / "x").write_text("x")
    assert not stale.exists() and live.exists()
    assert sibling_stage.exists() and sibling_old.exists()
    assert f"left by pid {dead.pid}" in capsys.readouterr().err


# --- confinement ------------------------------------------------------------------------------
def test_manifest_paths_outside_the_bundle_are_refused(bundles, tmp_path):
    bundle = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    outside = tmp_path / "evil.onnx"
    shutil.copy(bundle / "fused.onnx", outside)
    entry = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}

    def point_outside(rel):
        def change(m):
            m["graphs"]["encoder"]["file"] = rel
            m["files"][rel] = entry
        return change

    for rel in ("../evil.onnx", str(outside)):
        _rewrite(bundle, point_outside(rel))
        with pytest.raises(errors.BundleSchemaError, match="plain relative path"):
            load(bundle)


def test_symlinks_in_a_bundle_are_refused_and_never_copied(bundles, tmp_path):
    from fastertrt.serve.repository import export_repository

    bundle = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    real = tmp_path / "elsewhere.onnx"
    os.replace(bundle / "fused.onnx", real)
    (bundle / "fused.onnx").symlink_to(real)  # same bytes, same hash: only the link gives it away
    with pytest.raises(errors.BundleIntegrityError, match="symlink"):
        load(bundle, verify=False)
    os.replace(real, bundle / "fused.onnx")
    (bundle / "etc").symlink_to("/etc", target_is_directory=True)
    (bundle / "notes.txt").write_text("not in the manifest")
    with pytest.raises(errors.BundleIntegrityError, match=r"symlinks \(etc\)"):
        export_repository(bundle, tmp_path / "repo")
    (bundle / "etc").unlink()
    export_repository(bundle, tmp_path / "repo")
    copied = tmp_path / "repo" / "b" / "1" / "bundle"
    assert not (copied / "notes.txt").exists() and (copied / "fused.onnx").is_file()


# --- signatures --------------------------------------------------------------------------------------
def test_signed_bundles_load_only_with_a_trusted_key(bundles, tmp_path, capsys):
    pytest.importorskip("cryptography")
    from fastertrt.bundle.signing import new_key

    bundle = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    _, team = new_key(tmp_path / "team.key")
    _, other = new_key(tmp_path / "other.key")
    with pytest.raises(errors.SignatureError, match="not signed"):
        load(bundle, trusted_keys=[team])
    with pytest.raises(errors.InputError, match="trusted_keys is empty"):
        load(bundle, trusted_keys=[])  # never "no keys, so no check"
    assert main(["sign", str(bundle), "--key", str(tmp_path / "team.key")]) == 0
    assert load(bundle, trusted_keys=[team]).encode([[5, 6]])["last_hidden_state"].shape == (1, 2, 32)
    with pytest.raises(errors.SignatureError, match="no valid signature by a trusted key"):
        load(bundle, trusted_keys=[other])
    assert main(["run", str(bundle), "--ids", "5,6", "--trusted-key", str(other)]) == 2
    assert "SignatureError" in capsys.readouterr().err

    # an attacker changes a file and fixes every hash: only the signature can tell
    graph = bundle / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    _rewrite(bundle, lambda m: m["files"]["model.onnx"].update(sha256=sha256_file(graph),
                                                               bytes=graph.stat().st_size))
    load(bundle)  # hashes are consistent: only the signature can tell
    with pytest.raises(errors.SignatureError, match="no valid signature"):
        load(bundle, trusted_keys=[team])


# --- one schema for every damaged manifest -------------------------------------------------------------
def _set(path, value):
    def change(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return change


_DELETE = object()
TAMPERED = [
    (_set(["files"], ["model.onnx"]), "files must be an object"),
    (_set(["tokenizer"], "tokenizer/tokenizer.json"), "tokenizer must be an object"),
    (_set(["model", "vocab_size"], "lots"), "model.vocab_size must be an integer"),
    (_set(["graphs", "encoder", "inputs"], _DELETE), "graphs.encoder.inputs is missing"),
    (_set(["graphs"], []), "graphs must be an object"),
    (_set(["graphs"], {}), "graphs must hold at least 1"),
    (_set(["kind"], "frobnicator"), "kind must be one of"),
    (_set(["kind"], _DELETE), "kind is missing"),
    (_set(["model"], ["bert"]), "model must be an object"),
    (_set(["graphs", "encoder", "file"], 42), "graphs.encoder.file must be a string"),
    (_set(["graphs", "encoder", "inputs", 0, "shape"], "batch"), r"graphs.encoder.inputs\[0\].shape must be a list"),
    (_set(["graphs", "encoder", "inputs", 0, "dtype"], "complex999"), r"inputs\[0\].dtype must be one of"),
    (_set(["graphs", "encoder", "outputs", 0], "last_hidden_state"), r"outputs\[0\] must be an object"),
    (_set(["files", "model.onnx", "sha256"], "abc"), "files.model.onnx.sha256 must be a sha256"),
    (_set(["files", "model.onnx", "bytes"], -5), "files.model.onnx.bytes must be >= 0"),
    (lambda m: m["files"].update({"../x": m["files"]["model.onnx"]}), "files key '../x' must be a plain relative"),
    (_set(["engines"], {"graph": "encoder"}), "engines must be a list"),
    (_set(["engines"], [{"graph": "encoder"}]), r"engines\[0\].file is missing"),
    (_set(["model", "input_names"], _DELETE), "model.input_names is missing"),
    (lambda m: m["files"].pop("tokenizer/tokenizer.json") and None,
     "tokenizer.file names .* which `files` does not list"),
    (lambda m: ["not", "a", "manifest"], "JSON list, not an object"),
    (_set(["model", "eos_token_id"], "2"), "model.eos_token_id must be a list"),
    (_set(["int8"], "yes"), "int8 must be an object"),
    (_set(["default_precision"], "fp64"), "default_precision must be one of"),
    (_set(["schema_version"], "1"), "no integer schema_version"),
]


@pytest.fixture(scope="module")
def pristine(bundles, tmp_path_factory):
    return _copy(bundles.tiny("bert"), tmp_path_factory.mktemp("pristine") / "b.bundle")


@pytest.mark.parametrize("change, match", TAMPERED, ids=[m.split(" ")[0] for _, m in TAMPERED])
def test_a_damaged_manifest_names_its_key_path(change, match, pristine, tmp_path, capsys):
    bundle = tmp_path / "b.bundle"
    shutil.copytree(pristine, bundle, copy_function=os.link)
    (bundle / "manifest.json").unlink()
    shutil.copy(pristine / "manifest.json", bundle / "manifest.json")  # edited below: never the shared one
    _rewrite(bundle, change)
    with pytest.raises(errors.BundleSchemaError, match=match):
        load(bundle)
    assert main(["inspect", str(bundle)]) == 1  # described as far as possible, never a traceback
    out = capsys.readouterr().out
    assert "PROBLEM BundleSchemaError" in out and "on disk" in out


def test_consistent_but_broken_bundles_get_named_errors(bundles, tmp_path):
    """Files whose hashes an attacker fixed up, and values only the graphs contradict."""
    cases = {
        "input_names": (lambda b: _rewrite(b, _set(["model", "input_names"], ["input_ids", "foo"])),
                        errors.BundleSchemaError, r"model.input_names\[1\] names 'foo'"),
        "max_length": (lambda b: _rewrite(b, _set(["model", "max_length"], 10 ** 30)),
                       errors.BundleSchemaError, "model.max_length must be below 2\\*\\*31"),
        "tokenizer": (lambda b: _replace_file(b, "tokenizer/tokenizer.json", b'{"x": 1}'),
                      errors.BundleError, "tokenizer tokenizer.json cannot be read"),
        "graph": (lambda b: _replace_file(b, "fused.onnx", b"not onnx"),
                  errors.BundleError, "ONNX Runtime cannot load the bundle's graph fused.onnx"),
    }
    for name, (damage, error, match) in cases.items():
        bundle = _copy(bundles.tiny("bert"), tmp_path / f"{name}.bundle")
        damage(bundle)
        with pytest.raises(error, match=match):
            load(bundle)


def _replace_file(bundle: Path, rel: str, data: bytes) -> None:
    (bundle / rel).write_bytes(data)
    _rewrite(bundle, lambda m: m["files"][rel].update(sha256=sha256_file(bundle / rel), bytes=len(data)))


def test_build_and_calibrate_refuse_to_run_from_inside_the_bundle(bundles, tmp_path, monkeypatch):
    from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    bundle = _copy(bundles.tiny("bert"), tmp_path / "b.bundle")
    monkeypatch.chdir(bundle)
    with pytest.raises(errors.OutputRefusedError, match="run it from outside the bundle folder"):
        calibrate_bundle(".", CalibrationOptions())


def test_load_says_which_precision_runs_and_refuses_unknown_ones(bundles):
    model = load(bundles.tiny("bert"))
    assert (model.backend, model.precision) == ("onnxruntime", "fp32")
    with pytest.raises(errors.InputError, match="precision fp16 runs on the bundle's TensorRT engines only"):
        load(bundles.tiny("bert"), precision="fp16")
    with pytest.raises(errors.InputError, match="precision must be one of"):
        load(bundles.tiny("bert"), precision="bogus")
