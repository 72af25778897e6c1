"""The bundle manifest: schema, reading, and integrity checks.

Shared by the compiler (which writes it) and the runtime (which checks it), so
it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fastertrt.bundle.paths import check_confined, symlinks_in
from fastertrt.bundle.schema import KINDS, validate_manifest
from fastertrt.bundle.signing import SIGNATURE_NAME, check_signature
from fastertrt.errors import BundleIntegrityError, BundleNotFoundError, BundleSchemaError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
__all__ = [
    "KINDS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "file_entries",
    "manifest_digest",
    "read_manifest",
    "sha256_file",
    "verify_files",
]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path) -> dict:
    """Every file under root except the manifest: relative path -> sha256 + size."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST_NAME, SIGNATURE_NAME):
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's own content, so a hand edit is caught like a file edit."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(bundle: Path, trusted_keys=None) -> dict:
    """Read and check manifest.json: JSON, schema version, then (with trusted_keys)
    a valid signature before anything else, then the whole schema and that every
    path it names stays inside the bundle. Files are not hashed here (verify_files)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not bundle.exists() else "has no manifest.json"
        raise BundleNotFoundError(
            f"{str(bundle)!r} {what}, so it is not a fastertrt bundle. "
            f"Create one with: fastertrt compile MODEL -o {bundle}"
        )
    if path.is_symlink():
        raise BundleIntegrityError(f"{path} is a symlink; a bundle's manifest must be a file of its own")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleSchemaError(f"{path} is not valid JSON ({exc}); recompile the bundle") from exc
    if not isinstance(manifest, dict):
        raise BundleSchemaError(f"{path} holds a JSON {type(manifest).__name__}, not an object; recompile the bundle")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleSchemaError(f"{path} has no integer schema_version; it was not written by fastertrt")
    if version > SCHEMA_VERSION:
        raise BundleSchemaError(
            f"bundle schema {version} is newer than this fastertrt understands (schema {SCHEMA_VERSION}, "
            f"fastertrt {_version()}); the bundle was written by fastertrt "
            f"{manifest.get('fastertrt_version', '?')}. Upgrade fastertrt (pip install -U fastertrt) "
            f"or recompile the model with this version."
        )
    if trusted_keys is not None:
        check_signature(bundle, manifest, manifest_digest(manifest), list(trusted_keys))
    validate_manifest(manifest, str(path))
    check_confined(bundle, manifest)
    return manifest


def verify_files(bundle: Path, manifest: dict) -> None:
    """Every listed file exists with its recorded sha256."""
    bundle = Path(bundle)
    problems = []
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        problems.append("manifest.json was edited after it was written (its manifest_sha256 no longer matches)")
    links = symlinks_in(bundle)
    if links:
        problems.append(f"it holds symlinks ({', '.join(links[:5])}), which could make it read files outside "
                        f"itself")
    for rel, entry in manifest["files"].items():
        p = bundle / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel} was changed (sha256 differs from the manifest)")
    if problems:
        raise BundleIntegrityError(
            f"bundle {str(bundle)!r} is damaged: " + "; ".join(problems)
            + ". Recompile it (fastertrt compile ... -o BUNDLE --force) or copy it again from its source."
        )


def _version() -> str:
    from fastertrt import __version__

    return __version__
