"""Every file a reader opens in a bundle goes through here: a relative path the
manifest lists, inside the bundle folder after resolving links, never through a
symlink (a bundle is code: a link could make it load or copy any file)."""

from __future__ import annotations

import os
from pathlib import Path

from fastertrt.errors import BundleIntegrityError


def _refuse(bundle: Path, rel: str, why: str) -> BundleIntegrityError:
    return BundleIntegrityError(f"bundle {str(bundle)!r} names {rel!r}, which {why}; a bundle may only open files "
                                f"inside its own folder. Recompile it, or copy it again from a source you trust")


def bundle_file(bundle, manifest: dict, rel: str) -> Path:
    """The path of `rel` in `bundle`, checked: listed in the manifest's `files`, no
    symlink on the way, inside the bundle once resolved."""
    root = Path(bundle).resolve()
    if rel not in manifest["files"]:
        raise _refuse(root, rel, "the manifest's `files` does not list with a hash")
    path = root
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise _refuse(root, rel, "is not a plain relative path")
        path = path / part
        if path.is_symlink():
            raise _refuse(root, rel, f"goes through the symlink {path.relative_to(root)} -> {os.readlink(path)}")
    if root not in path.resolve().parents:
        raise _refuse(root, rel, "resolves outside the bundle")
    return path


def check_confined(bundle, manifest: dict) -> None:
    """Every listed file passes bundle_file (missing ones are verify_files' business)."""
    for rel in manifest["files"]:
        bundle_file(bundle, manifest, rel)


def symlinks_in(bundle) -> list[str]:
    """Relative paths of the symlinks anywhere in the bundle folder (links not followed)."""
    root = Path(bundle)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            if p.is_symlink():
                found.append(p.relative_to(root).as_posix())
    return sorted(found)
