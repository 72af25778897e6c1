"""Optional Ed25519 signatures over a bundle's manifest digest.

The manifest's sha256 covers its own content and, through `files`, every file's
sha256, so one signature over it covers the whole bundle. Signatures live in
manifest.sig.json beside the manifest (not in `files`: signing must not change
what it signs); several keys may sign one bundle. Needs the `cryptography`
package (pip install 'fastertrt[sign]'), imported only when keys are used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fastertrt.errors import InputError, MissingDependencyError, SignatureError

SIGNATURE_NAME = "manifest.sig.json"
_CONTEXT = b"fastertrt-bundle-manifest-v1:"  # what is signed: context + the manifest's sha256 hex


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError("bundle signatures need the cryptography package: "
                                     "pip install 'fastertrt[sign]'") from None
    return serialization, ed25519


def _raw_public(public) -> bytes:
    serialization, _ = _crypto()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def new_key(path) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600) to `path` and its public key to `path`.pub."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise InputError(f"{p} already exists; a key is never overwritten. Pick another path")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def load_private_key(path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read an Ed25519 private key from {path} ({exc}); make one with: "
                         f"fastertrt sign --new-key {path}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(spec):
    """A trusted key: a PEM public (or private) key file or its bytes, or 64 hex digits of a raw key."""
    serialization, ed25519 = _crypto()
    if isinstance(spec, ed25519.Ed25519PublicKey):
        return spec
    if isinstance(spec, str) and len(spec) == 64 and all(c in "0123456789abcdefABCDEF" for c in spec):
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(spec))
    try:
        data = spec if isinstance(spec, bytes) else Path(spec).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the trusted key {spec}: {exc.strerror}") from None
    for loader in (serialization.load_pem_public_key,
                   lambda d: serialization.load_pem_private_key(d, password=None).public_key()):
        try:
            key = loader(data)
        except (ValueError, TypeError):
            continue
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key
    raise InputError(f"the trusted key {spec if not isinstance(spec, bytes) else '(bytes)'} is not an Ed25519 "
                     f"public key in PEM (fastertrt sign --new-key KEY writes one as KEY.pub)")


def sign_manifest(bundle, manifest: dict, key_path) -> dict:
    """Add (or renew) the key's signature of `manifest` in BUNDLE/manifest.sig.json."""
    key = load_private_key(key_path)
    entry = {"algorithm": "ed25519", "key_id": key_id(key.public_key()),
             "public_key": _raw_public(key.public_key()).hex(), "manifest_sha256": manifest["manifest_sha256"],
             "signature": key.sign(_CONTEXT + manifest["manifest_sha256"].encode()).hex()}
    path = Path(bundle) / SIGNATURE_NAME
    kept = [s for s in _signatures(path, bundle) if s.get("key_id") != entry["key_id"]
            and s.get("manifest_sha256") == manifest["manifest_sha256"]]  # stale ones signed an older manifest
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"signatures": kept + [entry]}, indent=2) + "\n")
    os.replace(tmp, path)
    return entry


def _signatures(path: Path, bundle) -> list:
    if path.is_symlink():
        raise SignatureError(f"bundle {str(bundle)!r}: {SIGNATURE_NAME} is a symlink; refusing it")
    if not path.is_file():
        return []
    try:
        sigs = json.loads(path.read_text()).get("signatures", [])
    except (ValueError, AttributeError, OSError):
        raise SignatureError(f"bundle {str(bundle)!r}: {SIGNATURE_NAME} is not a fastertrt signature file") from None
    return [s for s in sigs if isinstance(s, dict)] if isinstance(sigs, list) else []


def check_signature(bundle, manifest: dict, digest: str, trusted_keys) -> str:
    """Return the key id of a trusted key whose signature holds; SignatureError otherwise.
    `digest` is the manifest's sha256 recomputed from its content by the caller."""
    if not trusted_keys:
        raise InputError("trusted_keys is empty: pass at least one public key, or None to load without a "
                         "signature check (an empty list would silently accept any bundle)")
    _crypto()
    from cryptography.exceptions import InvalidSignature

    trusted = {key_id(k): k for k in (load_public_key(s) for s in trusted_keys)}
    if manifest.get("manifest_sha256") != digest:
        raise SignatureError(f"bundle {str(bundle)!r}: manifest.json was edited after it was written (its "
                             f"manifest_sha256 does not match its content); no signature can vouch for it")
    sigs = _signatures(Path(bundle) / SIGNATURE_NAME, bundle)
    if not sigs:
        raise SignatureError(f"bundle {str(bundle)!r} is not signed, and trusted keys were given "
                             f"({', '.join(trusted)}). Sign it with: fastertrt sign BUNDLE --key KEY")
    for s in sigs:
        key = trusted.get(s.get("key_id"))
        if key is None or s.get("manifest_sha256") != digest:
            continue
        try:
            key.verify(bytes.fromhex(str(s.get("signature", ""))), _CONTEXT + digest.encode())
            return s["key_id"]
        except (InvalidSignature, ValueError):
            continue
    found = ", ".join(str(s.get("key_id")) for s in sigs)
    raise SignatureError(f"bundle {str(bundle)!r} has no valid signature by a trusted key: signed by {found}, "
                         f"trusted {', '.join(trusted)}; the bundle or its signature was changed, or it was signed "
                         f"by another key. Re-sign it with a trusted key (fastertrt sign BUNDLE --key KEY) "
                         f"only if you trust its content")
