"""Bundle stage: a folder with the graphs, tokenizer and manifest.json, made in a
temporary sibling folder and renamed into place, so a failed compile leaves no
half bundle behind."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from fastertrt.bundle.lock import BundleLock, pid_alive
from fastertrt.bundle.paths import bundle_file
from fastertrt.bundle.signing import SIGNATURE_NAME
from fastertrt.errors import OutputExistsError, OutputRefusedError
from fastertrt.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, file_entries, manifest_digest
from fastertrt.signals import terminate_raises

# Config keys that change with the tool that saved the file, not the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def config_digest(config: dict) -> str:
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


REPOSITORY_MARKER = ".fastertrt-repository.json"  # written by export-triton into each repository


def output_kind(path: Path) -> str | None:
    """'bundle' or 'repository' when `path` is something fastertrt wrote, else None."""
    if path.is_symlink() or not path.is_dir():
        return None
    manifest = path / MANIFEST_NAME
    if manifest.is_file() and not manifest.is_symlink():
        try:
            data = json.loads(manifest.read_text())
        except (ValueError, OSError):
            data = None  # a damaged bundle of ours is still ours: fall through to its keys
        if isinstance(data, dict) and isinstance(data.get("schema_version"), int) and "files" in data:
            return "bundle"
    if (path / REPOSITORY_MARKER).is_file():
        return "repository"
    return None


def _what_is_there(path: Path) -> str:
    if path.is_symlink():
        return f"a symlink to {os.readlink(path)}"
    if not path.is_dir():
        return "a file"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"a folder with {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _replaceable(path: Path, kinds: tuple) -> bool:
    """What --force may replace: an output fastertrt wrote of one of `kinds`, or an empty folder."""
    if output_kind(path) in kinds:
        return True
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(out, overwrite: bool, source: Path | None = None, kinds: tuple = ("bundle",)) -> None:
    """Refuse an output that would destroy something the user did not ask to replace.
    Called before slow work too, so a bad -o fails in a second, not after an export."""
    if os.fspath(out) == "":
        raise OutputRefusedError("the output path is empty (an unset variable?); give -o a folder name such as "
                                 "model.bundle")
    out = Path(out).expanduser()
    target = out.resolve()
    for what, place in (("the working directory", Path.cwd().resolve()), ("your home folder", Path.home().resolve())):
        if _within(place, target):
            raise OutputRefusedError(f"-o {out} is {what} or a folder above it ({target}); fastertrt never replaces "
                                     f"it. Write the bundle into a new folder, e.g. -o {target / 'model.bundle'}")
    if source is not None:
        src = Path(source).resolve()
        if _within(target, src) or _within(src, target):
            raise OutputRefusedError(f"-o {out} ({target}) is the source model folder {src}, inside it or above "
                                     f"it; writing there could destroy the model. Pick a folder outside it")
    parent = target.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputRefusedError(f"cannot create {target}: {parent} is {_what_is_there(parent)}, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputRefusedError(f"cannot create {target}: the folder {parent} is not writable by this user")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"{target} already exists; pass --force (overwrite=True) to replace it, or pick "
                                f"another -o")
    if not _replaceable(out, kinds):
        wanted = " or ".join(f"a fastertrt {k}" for k in kinds)
        raise OutputRefusedError(f"{target} is {_what_is_there(out)}, not {wanted}; --force replaces only "
                                 f"those. Nothing was changed: move it away yourself, or pick another -o")


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst` (which plain
    rename does when dst is an empty folder)."""
    libc = _libc()
    if libc is not None:
        if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # no renameat2 on this kernel or filesystem
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


@functools.cache
def _libc():
    """The C library when it has renameat2, else None."""
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return lib if hasattr(lib, "renameat2") else None


def _leftovers(out: Path, suffix: str, random_part: bool) -> list[tuple[Path, int]]:
    """(path, pid) of `out`'s own leftovers: .NAME.PID.xxxx.partial or .NAME.PID.old.
    The whole name must match: `.model.60.123.old` belongs to the output `model.60`."""
    middle = r"\.[A-Za-z0-9_]+" if random_part else ""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+){middle}\.{suffix}")
    return [(p, int(m.group(1))) for p in sorted(out.parent.iterdir()) if (m := pattern.fullmatch(p.name))]


def clean_stale(out: Path) -> None:
    """Remove what runs killed before their cleanup left next to `out`: staging
    folders (.NAME.PID.xxxx.partial) of dead pids, and an old copy (.NAME.PID.old)
    from a swap cut in the middle, put back when `out` itself is gone. Called with
    the lock held, so no live writer of `out` is mid-swap."""
    for p, pid in _leftovers(out, "partial", random_part=True):
        if not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            print(f"fastertrt: removed {p.name}, an unfinished output left by pid {pid} (no longer running)",
                  file=sys.stderr)
    for p, pid in _leftovers(out, "old", random_part=False):
        if pid_alive(pid):
            continue
        if not os.path.lexists(out):
            os.rename(p, out)
            print(f"fastertrt: restored {out.name} from {p.name}, left by pid {pid} while it replaced it",
                  file=sys.stderr)
        else:
            shutil.rmtree(p, ignore_errors=True)
            print(f"fastertrt: removed {p.name}, an old copy left by pid {pid} (no longer running)", file=sys.stderr)


def _swap(stage: Path, out: Path, overwrite: bool, kinds: tuple) -> None:
    """Put `stage` at `out`. Whatever is at `out` now is re-checked: only a replaceable
    output is replaced (and put back if the swap fails); anything that appeared
    while the run worked is left alone and the result is kept beside it."""
    if os.path.lexists(out) and overwrite and _replaceable(out, kinds):
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
        try:
            _rename_noreplace(stage, out)
        except BaseException:
            if not os.path.lexists(out):
                os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        _rename_noreplace(stage, out)
    except FileExistsError:
        kept = out.with_name(f"{out.name}.new-{os.getpid()}")
        os.rename(stage, kept)
        raise OutputExistsError(f"{out} appeared while this run was working ({_what_is_there(out)}) and was left "
                                f"untouched; the new output was kept at {kept}. Move one of them and rename the "
                                f"other") from None


@contextlib.contextmanager
def staging(out: Path, overwrite: bool = False, source: Path | None = None, kinds: tuple = ("bundle",),
            wait: bool = False, lock: bool = True):
    """Yield a temporary folder next to `out`; on success it becomes `out`. Holds the
    writer lock of `out` throughout (lock=False: the caller holds it). On an error,
    Ctrl-C, SIGTERM or SIGHUP the temporary folder is removed and `out` is untouched."""
    out = Path(out).expanduser()
    check_output(out, overwrite, source, kinds)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if lock:
            held.enter_context(BundleLock(out, wait=wait, what=_command()))
        held.enter_context(terminate_raises())
        clean_stale(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
        try:
            yield stage
            _swap(stage, out, overwrite, kinds)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def _command() -> str:
    args = [Path(sys.argv[0]).name] + sys.argv[1:] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(args)[:200]


def link_or_copy(src, dst) -> None:
    """A hard link where the filesystem allows (no copy of large weights), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_listed(bundle: Path, manifest: dict, dest: Path) -> None:
    """The files the manifest lists (and the manifest), each path-checked, linked or
    copied into `dest`; nothing else of the bundle folder."""
    for rel in manifest["files"]:
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(bundle_file(bundle, manifest, rel), dst)


@contextlib.contextmanager
def updating(bundle, wait: bool = False):
    """Yield (stage, manifest) for changing an existing bundle atomically: its
    files are hard-linked (copied across filesystems) into a staging folder that
    replaces the bundle when the block succeeds. One writer at a time: the bundle's
    lock is taken before its manifest is read, so a queued writer sees the first
    one's result."""
    from fastertrt.runtime.manifest import read_manifest, verify_files

    bundle = Path(bundle).resolve()
    read_manifest(bundle)  # a missing or foreign folder fails before any lock file is made next to it
    if _within(Path.cwd().resolve(), bundle):
        raise OutputRefusedError(f"the working directory is inside {bundle}, which this command replaces whole; "
                                 f"run it from outside the bundle folder (cd {bundle.parent})")
    with BundleLock(bundle, wait=wait, what=_command()):
        manifest = read_manifest(bundle)
        verify_files(bundle, manifest)
        if (bundle / SIGNATURE_NAME).exists():
            print(f"fastertrt: {bundle.name} was signed; the change makes a new manifest, so its signature is "
                  f"dropped: sign it again with fastertrt sign {bundle} --key KEY", file=sys.stderr)
        with staging(bundle, overwrite=True, lock=False) as stage:
            copy_listed(bundle, manifest, stage)
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
