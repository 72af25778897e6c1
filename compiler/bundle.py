"""Bundle stage: a folder with the graphs, tokenizer and manifest.json, made in a
temporary sibling folder and renamed into place, so a failed compile leaves no
half bundle behind."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fastertrt.errors import OutputExistsError
from fastertrt.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, file_entries, manifest_digest

# Config keys that change with the tool that saved the file, not the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def config_digest(config: dict) -> str:
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def check_output(out: Path, overwrite: bool) -> None:
    """Called before slow work too, so a taken -o fails in a second, not after an export."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --force (overwrite=True) to replace it, or pick another -o")


@contextlib.contextmanager
def staging(out: Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success it becomes `out`."""
    out = Path(out).resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src, dst) -> None:
    """A hard link where the filesystem allows (no copy of large weights), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def updating(bundle):
    """Yield (stage, manifest) for changing an existing bundle atomically: its
    files are hard-linked (copied across filesystems) into a staging folder that
    replaces the bundle when the block succeeds."""
    from fastertrt.runtime.manifest import read_manifest, verify_files

    bundle = Path(bundle).resolve()
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    with staging(bundle, overwrite=True) as stage:
        for rel in manifest["files"]:
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(bundle / rel, dst)
        yield stage, manifest


def save_tokenizer(tokenizer, stage: Path) -> dict | None:
    """Save a transformers tokenizer; the runtime needs its tokenizer.json."""
    if tokenizer is None:
        return None
    folder = stage / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return {
        "file": "tokenizer/tokenizer.json",
        "pad_token_id": tokenizer.pad_token_id,
        "model_max_length": int(min(getattr(tokenizer, "model_max_length", 1 << 30), 1 << 30)),
    }


# Keys write_manifest derives itself; a manifest read back and rewritten (fastertrt
# build) gets them anew.
_DERIVED_KEYS = ("schema_version", "created_utc", "files", "manifest_sha256")


def write_manifest(stage: Path, manifest: dict) -> dict:
    manifest = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in manifest.items() if k not in _DERIVED_KEYS}}
    manifest["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest["files"] = file_entries(stage)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    tmp = stage / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, stage / MANIFEST_NAME)
    return manifest


def graph_entry(graph, root: Path) -> dict:
    return {
        "file": graph.path.relative_to(root).as_posix(),
        "files": [p.relative_to(root).as_posix() for p in graph.files],
        "opset": graph.opset,
        "inputs": graph.inputs,
        "outputs": graph.outputs,
    }
