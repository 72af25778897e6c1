"""One typed schema for manifest.json, checked whole when a manifest is read.

A manifest is data a bundle's author controls, so every reader (runtime,
inspect, compare, serve, build, calibrate) gets either a manifest whose every
key it touches has the right type, or a BundleSchemaError that names the key
path ("graphs.encoder.inputs[0].shape") and what was found there. Unknown keys
are allowed: a newer fastertrt of the same schema version may add some.
"""

from __future__ import annotations

import math
import posixpath
import re

from fastertrt.errors import BundleSchemaError

KINDS = ("encoder", "decoder", "module")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool",
          "float", "half", "int4", "fp8")  # the last four: TensorRT's names in engine I/O summaries
GRAPHS_BY_KIND = {"encoder": ("encoder",), "decoder": ("prefill", "decode"), "module": ("module",)}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Problem(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path or 'the manifest'} {message}")


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# --- value checkers: each is check(value, path) and raises _Problem ----------------
def Str(value, path):
    if not isinstance(value, str):
        raise _Problem(path, f"must be a string, found {_show(value)}")


def Int(value, path, low=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(path, f"must be an integer, found {_show(value)}")
    if low is not None and value < low:
        raise _Problem(path, f"must be >= {low}, found {value}")


def Count(value, path):
    Int(value, path, low=0)


def Positive(value, path):
    Int(value, path, low=1)


def Size(value, path):
    """A positive size that numpy and the graphs can hold (int32 dims)."""
    Int(value, path, low=1)
    if value >= 1 << 31:
        raise _Problem(path, f"must be below 2**31, found {value}")


def Bool(value, path):
    if not isinstance(value, bool):
        raise _Problem(path, f"must be true or false, found {_show(value)}")


def Num(value, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Problem(path, f"must be a finite number, found {_show(value)}")


def Any(value, path):
    """Free-form reports (parity, calibration statistics): any JSON value."""


def Sha256(value, path):
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _Problem(path, f"must be a sha256 hex digest, found {_show(value)}")


def RelPath(value, path):
    """A path inside the bundle: relative, POSIX, no '..', no empty part."""
    Str(value, path)
    parts = value.split("/")
    if (not value or value.startswith("/") or "\\" in value or "\x00" in value or re.match(r"^[A-Za-z]:", value)
            or any(p in ("", ".", "..") for p in parts) or posixpath.normpath(value) != value):
        raise _Problem(path, f"must be a plain relative path inside the bundle, found {value!r}")


def Enum(*choices):
    def check(value, path):
        if value not in choices:
            raise _Problem(path, f"must be one of {list(choices)}, found {_show(value)}")
    return check


def Opt(inner):
    def check(value, path):
        if value is not None:
            inner(value, path)
    return check


def OneOf(*checks):
    def check(value, path):
        errors = []
        for c in checks:
            try:
                return c(value, path)
            except _Problem as exc:
                errors.append(str(exc))
        raise _Problem(path, "is none of the accepted forms: " + "; ".join(e.split(" ", 1)[1] for e in errors))
    return check


def List(inner, min_len=0):
    def check(value, path):
        if not isinstance(value, list):
            raise _Problem(path, f"must be a list, found {_show(value)}")
        if len(value) < min_len:
            raise _Problem(path, f"must hold at least {min_len} item(s), found {len(value)}")
        for i, item in enumerate(value):
            inner(item, f"{path}[{i}]")
    return check


def Map(inner, min_len=0, key=Str):
    def check(value, path):
        if not isinstance(value, dict):
            raise _Problem(path, f"must be an object, found {_show(value)}")
        if len(value) < min_len:
            raise _Problem(path, f"must hold at least {min_len} entr{'y' if min_len == 1 else 'ies'}, found none")
        for k, item in value.items():
            key(k, f"{path} key {k!r}")
            inner(item, f"{path}.{k}" if path else k)
    return check


def Obj(required: dict, optional: dict | None = None):
    optional = optional or {}

    def check(value, path):
        if not isinstance(value, dict):
            raise _Problem(path, f"must be an object, found {_show(value)}")
        for k, inner in required.items():
            sub = f"{path}.{k}" if path else k
            if k not in value:
                raise _Problem(sub, "is missing")
            inner(value[k], sub)
        for k, inner in optional.items():
            if k in value:
                inner(value[k], f"{path}.{k}" if path else k)
    return check


# --- the manifest -------------------------------------------------------------------
Dim = OneOf(Int, Str)  # -1 or a name: dynamic
Tensor = Obj({"name": Str, "dtype": Enum(*DTYPES), "shape": List(Dim)})
Graph = Obj({"file": RelPath, "inputs": List(Tensor, 1), "outputs": List(Tensor, 1)},
            {"files": List(RelPath), "opset": Count, "exported": RelPath, "ort_file": RelPath, "rewrite": Any,
             "ort_lowered": Any})
Range = List(Count)
Profile = Obj({"dims": Map(List(Count, 3)), "inputs": Map(Obj({"min": Range, "opt": Range, "max": Range}))})
Engine = Obj({"graph": Str, "file": RelPath, "backend": Enum(*ENGINE_BACKENDS), "backend_version": Str,
              "precision": Enum(*PRECISIONS), "profiles": List(Profile, 1)},
             {"source_onnx": RelPath, "engine_layers_file": RelPath, "bytes": Count, "sha256": Sha256,
              "plugins": List(Obj({"name": Str}, {"version": OneOf(Str, Count), "count": Count})),
              "compute_capabilities": List(Str), "built_on_cc": Opt(Str), "layers": Count,
              "layer_types": Map(Count), "output_precisions": Map(Count), "build_seconds": Num,
              "inputs": List(Tensor), "outputs": List(Tensor)})
Model = Obj({}, {"family": Str, "model_type": Opt(Str), "source": Obj({}, {"kind": Str, "ref": Opt(Str)}),
                 "config_sha256": Opt(Str), "max_length": Size, "vocab_size": Size,
                 "input_names": List(Str, 1), "num_layers": Size, "num_kv_heads": Size, "head_dim": Size,
                 "beam_candidates": Size, "eos_token_id": List(Count), "pad_token_id": Opt(Count),
                 "bos_token_id": Opt(Count), "pooling": Any})
Tokenizer = Obj({"file": RelPath}, {"pad_token_id": Opt(Count), "model_max_length": Opt(Count)})
Int8 = Obj({"graphs": Map(Obj({"file": RelPath}, {"ort_file": RelPath, "files": List(RelPath)}), 1)},
           {"calibration": Map(Any), "report": Obj({}, {"file": RelPath, "outputs": Map(Map(Any))}),
            "cache": Obj({}, {"file": RelPath, "tensorrt_file": RelPath})})
FileEntry = Obj({"sha256": Sha256, "bytes": Count})
MANIFEST = Obj(
    {"schema_version": Positive, "kind": Enum(*KINDS), "model": Model, "graphs": Map(Graph, 1),
     "files": Map(FileEntry, key=RelPath)},
    {"fastertrt_version": Str, "created_utc": Str, "manifest_sha256": Str, "tokenizer": Opt(Tokenizer),
     "export": Opt(Map(Any)), "rewrite": Opt(Map(Any)), "default_precision": Enum(*PRECISIONS),
     "int8": Opt(Int8), "engines": List(Engine)})

# what each kind's runtime class reads without a default
_KIND_MODEL_KEYS = {"encoder": ("vocab_size", "input_names"), "decoder": ("vocab_size", "num_layers"), "module": ()}


def referenced_paths(manifest: dict) -> list[tuple[str, str]]:
    """(key path, relative file) for every file the manifest points a reader at."""
    out = []
    for name, g in manifest["graphs"].items():
        for key in ("file", "exported", "ort_file"):
            if g.get(key):
                out.append((f"graphs.{name}.{key}", g[key]))
        out += [(f"graphs.{name}.files[{i}]", f) for i, f in enumerate(g.get("files", []))]
    if manifest.get("tokenizer"):
        out.append(("tokenizer.file", manifest["tokenizer"]["file"]))
    int8 = manifest.get("int8") or {}
    for name, g in int8.get("graphs", {}).items():
        for key in ("file", "ort_file"):
            if g.get(key):
                out.append((f"int8.graphs.{name}.{key}", g[key]))
        out += [(f"int8.graphs.{name}.files[{i}]", f) for i, f in enumerate(g.get("files", []))]
    for section, keys in (("report", ("file",)), ("cache", ("file", "tensorrt_file"))):
        for key in keys:
            if (int8.get(section) or {}).get(key):
                out.append((f"int8.{section}.{key}", int8[section][key]))
    for i, e in enumerate(manifest.get("engines", [])):
        for key in ("file", "source_onnx", "engine_layers_file"):
            if e.get(key):
                out.append((f"engines[{i}].{key}", e[key]))
    return out


def validate_manifest(manifest, where: str) -> None:
    """Raise BundleSchemaError naming the first bad key path of `manifest` (read from `where`)."""
    try:
        MANIFEST(manifest, "")
        _check_consistency(manifest)
    except _Problem as exc:
        raise BundleSchemaError(f"{where} is malformed: {exc}. The bundle was damaged or hand-edited; recompile it "
                                f"(fastertrt compile MODEL -o BUNDLE --force)") from None


def _check_consistency(manifest: dict) -> None:
    kind = manifest["kind"]
    for name in GRAPHS_BY_KIND[kind]:
        if name not in manifest["graphs"]:
            raise _Problem(f"graphs.{name}", f"is missing: a {kind} bundle has graphs {list(GRAPHS_BY_KIND[kind])}")
    for key in _KIND_MODEL_KEYS[kind]:
        if key not in manifest["model"]:
            raise _Problem(f"model.{key}", f"is missing (a {kind} bundle needs it)")
    if kind == "encoder":
        takes = [t["name"] for t in manifest["graphs"]["encoder"]["inputs"]]
        for i, name in enumerate(manifest["model"]["input_names"]):
            if name not in takes:
                raise _Problem(f"model.input_names[{i}]", f"names {name!r}, which graphs.encoder does not take "
                                                          f"(it takes {takes})")
    for i, e in enumerate(manifest.get("engines", [])):
        if e["graph"] not in manifest["graphs"]:
            raise _Problem(f"engines[{i}].graph", f"names {e['graph']!r}, which is not one of the bundle's graphs")
    listed = manifest["files"]
    for key, rel in referenced_paths(manifest):
        if rel not in listed:
            raise _Problem(key, f"names {rel!r}, which `files` does not list with a hash")
