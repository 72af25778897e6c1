"""`fastertrt export-triton`: a Triton Inference Server model repository for a
bundle. The model runs fastertrt's runtime in Triton's Python backend:

    REPO/NAME/config.pbtxt      inputs/outputs from the manifest, dynamic batching,
                                instance groups, EXECUTION_ENV_PATH
    REPO/NAME/1/model.py        serve/triton_model.py
    REPO/NAME/1/bundle/         the bundle (hard-linked where the filesystem allows)
    REPO/NAME/1/lib/fastertrt/  the runtime's own sources (no torch, no compiler)

Where the bundle holds a standard-TensorRT engine without fastertrt plugins,
REPO/NAME_plan/ serves that engine on Triton's own `tensorrt_plan` platform too. A
decoder also gets REPO/NAME_stream/: greedy streaming in Triton's decoupled mode.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastertrt.errors import InputError, OutputRefusedError

KINDS = ("cpu", "gpu")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
_PACKAGE = Path(__file__).resolve().parent.parent  # the checkout or the installed fastertrt


@dataclass
class TritonOptions:
    name: str | None = None
    max_batch: int | None = None     # None: 32, or the engines' largest batch where smaller (--kind gpu)
    instances: int = 2
    kind: str = "cpu"
    env: Path | None = None          # EXECUTION_ENV_PATH: a venv with numpy<2, onnxruntime, tokenizers
    threads: int | None = None       # ONNX Runtime intra-op threads per instance
    max_queue_delay_us: int = 2000
    python: str | None = None        # the environment's Python version (the backend stub must match it)
    # per-request caps (config.pbtxt FASTERTRT_MAX_*); None: the engines' limits (--kind gpu) or ORT_CAPS
    max_input_tokens: int | None = None
    max_new_tokens: int | None = None
    max_beams: int | None = None
    max_rows: int | None = None      # prompts x beams in one request


# Per-request caps on ONNX Runtime, which has no profiles to take them from. A
# decoder request's KV cache grows with rows (prompts x beams) x positions
# (prompt + new tokens): SmolLM2-135M in FP32 keeps 46 KB per position, so 32
# rows of 1,024 positions take ~1.5 GB. Input tokens default to the model's
# max_length; rows to at least --max-batch, so a full greedy request fits.
DEFAULT_MAX_BATCH = 32
ORT_CAPS = {"max_new_tokens": 512, "max_beams": 8, "max_rows": 32}
CAPS = {"max_input_tokens": "FASTERTRT_MAX_INPUT_TOKENS", "max_new_tokens": "FASTERTRT_MAX_NEW_TOKENS",
        "max_beams": "FASTERTRT_MAX_BEAMS", "max_rows": "FASTERTRT_MAX_ROWS"}


def _runtime_sources(lib: Path) -> None:
    """fastertrt/{__init__,errors}.py, runtime/ and plugins/ (engines need the plugins'
    TensorRT creators) as the package `fastertrt` under lib/."""
    import fastertrt
    import fastertrt.plugins
    import fastertrt.runtime

    pkg = lib / "fastertrt"
    pkg.mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "signals.py"):
        shutil.copy2(Path(fastertrt.__file__).with_name(name), pkg / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(fastertrt.__file__).with_name("bundle"), pkg / "bundle", ignore=ignore)
    shutil.copytree(Path(fastertrt.runtime.__file__).parent, pkg / "runtime", ignore=ignore)
    shutil.copytree(Path(fastertrt.plugins.__file__).parent, pkg / "plugins", ignore=ignore)


def _dims(shape: list) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _io(kind: str, name: str, dtype: str, dims: str, optional: bool = False) -> str:
    opt = "\n    optional: true" if optional else ""
    return f"  {{\n    name: \"{name}\"\n    data_type: {dtype}\n    dims: {dims}{opt}\n  }}"


def _preferred(manifest: dict, max_batch: int) -> list[int]:
    """Batch sizes the dynamic batcher aims for: the engines' profile optima and
    maxima where there are engines, else powers of two up to max_batch."""
    sizes = set()
    for e in manifest.get("engines", []):
        for prof in e.get("profiles", []):
            for dim in ("batch", "rows"):
                if dim in prof["dims"]:
                    sizes.update(int(v) for v in prof["dims"][dim][1:])
    if not sizes:
        sizes = {b for b in (4, 8, 16, 32, 64) if b <= max_batch} | {max_batch}
    return sorted(s for s in sizes if 1 < s <= max_batch) or [max_batch]


def config_text(manifest: dict, opts: TritonOptions, name: str, stream: bool = False) -> str:
    """stream: the decoder's greedy streaming model (Triton's decoupled mode: one
    response per new token, then a final flag), one prompt per request."""
    kind = manifest["kind"]
    if stream:
        inputs = [_io("in", "TEXT", "TYPE_STRING", "[ 1 ]", True), _io("in", "input_ids", "TYPE_INT64", "[ -1 ]", True)]
        outputs = [_io("out", "TEXT_OUT", "TYPE_STRING", "[ 1 ]"), _io("out", "token_ids", "TYPE_INT64", "[ 1 ]")]
    elif kind == "encoder":
        inputs = [_io("in", "TEXT", "TYPE_STRING", "[ 1 ]", True), _io("in", "input_ids", "TYPE_INT64", "[ -1 ]", True),
                  _io("in", "attention_mask", "TYPE_INT64", "[ -1 ]", True)]
        outputs = [_io("out", o["name"], _TRITON_TYPES[o["dtype"]], _dims(o["shape"][1:]))
                   for o in manifest["graphs"]["encoder"]["outputs"]]
    elif kind == "decoder":
        inputs = [_io("in", "TEXT", "TYPE_STRING", "[ 1 ]", True), _io("in", "input_ids", "TYPE_INT64", "[ -1 ]", True),
                  _io("in", "attention_mask", "TYPE_INT64", "[ -1 ]", True)]
        outputs = [_io("out", "TEXT_OUT", "TYPE_STRING", "[ 1 ]"), _io("out", "token_ids", "TYPE_INT64", "[ -1 ]"),
                   _io("out", "scores", "TYPE_FP32", "[ 1 ]")]
    else:
        raise InputError(f"export-triton serves encoder and decoder bundles; this one is a {kind!r} bundle")
    params = {"FASTERTRT_BACKEND": "tensorrt" if opts.kind == "gpu" else "onnxruntime"}
    if opts.env:
        params["EXECUTION_ENV_PATH"] = str(Path(opts.env).resolve())
    if opts.threads:
        params["FASTERTRT_THREADS"] = str(int(opts.threads))
    params.update({k: str(v) for k, v in caps(manifest, opts).items()})
    parameters = "\n".join(f"parameters: {{\n  key: \"{k}\"\n  value: {{ string_value: \"{v}\" }}\n}}"
                           for k, v in params.items())
    preferred = ", ".join(str(b) for b in _preferred(manifest, opts.max_batch))
    batching = ("model_transaction_policy {\n  decoupled: true\n}\n" if stream else
                f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
                f"  max_queue_delay_microseconds: {opts.max_queue_delay_us}\n}}\n")
    return (f"name: \"{name}\"\nbackend: \"python\"\nmax_batch_size: {0 if stream else opts.max_batch}\n"
            f"input [\n{(',' + chr(10)).join(inputs)}\n]\noutput [\n{(',' + chr(10)).join(outputs)}\n]\n"
            f"{batching}"
            f"instance_group [\n  {{\n    count: {opts.instances}\n    kind: KIND_{opts.kind.upper()}\n  }}\n]\n"
            f"{parameters}\n")


def _check(opts: TritonOptions, manifest: dict) -> None:
    if opts.kind not in KINDS:
        raise InputError(f"--kind must be one of {KINDS}, got {opts.kind!r}")
    if opts.max_batch is None:
        top = engine_limits(manifest, 1).get("max_batch")
        opts.max_batch = min(DEFAULT_MAX_BATCH, top) if opts.kind == "gpu" and top else DEFAULT_MAX_BATCH
    if opts.max_batch < 1 or opts.instances < 1:
        raise InputError(f"--max-batch and --instances must be at least 1 (got {opts.max_batch}, {opts.instances})")
    if opts.kind == "gpu" and not manifest.get("engines"):
        raise InputError("--kind gpu serves the bundle's TensorRT engines, and this bundle has none; build them "
                         "with: fastertrt build BUNDLE, or export with --kind cpu (ONNX Runtime)")
    top = engine_limits(manifest, opts.max_batch).get("max_batch")
    if opts.kind == "gpu" and top is not None and opts.max_batch > top:
        raise InputError(f"--max-batch {opts.max_batch} is above the largest batch the bundle's engines take "
                         f"({top}, their optimization profiles' max); lower it to --max-batch {top}, or rebuild "
                         f"the engines wider: fastertrt build BUNDLE --shapes batch=1:8:{opts.max_batch},...")
    caps(manifest, opts)
    if opts.env is not None:
        from fastertrt.serve.environment import check_env

        opts.python = check_env(Path(opts.env))["python"]
    if opts.name is not None and (not opts.name or "/" in opts.name or opts.name.startswith(".")):
        raise InputError(f"--name {opts.name!r} cannot name a model folder")


def engine_limits(manifest: dict, max_batch: int) -> dict:
    """The most the engines the runtime runs (the last built per graph) take, from
    their optimization profiles: max_batch, max_beams, max_rows, max_input_tokens,
    max_new_tokens (those the profiles name; the smallest over graphs)."""
    from fastertrt.runtime.engines import engines_for

    limits: dict = {}

    def lower(key, value):
        limits[key] = min(limits.get(key, value), value)

    for graph in manifest["graphs"]:
        found = engines_for(manifest, graph)
        if not found:
            continue
        profiles = [p["dims"] for p in found[-1]["profiles"]]
        for dim, key in (("batch", "max_batch"), ("beams", "max_beams"), ("rows", "max_rows")):
            if any(dim in p for p in profiles):
                lower(key, max(int(p[dim][2]) for p in profiles if dim in p))
        if graph in ("encoder", "prefill"):
            # every row of a full batch this long must fit one profile, or the whole batch fails
            full = [int(p["seq"][2]) for p in profiles
                    if "seq" in p and int(p.get("batch", [0, 0, max_batch])[2]) >= max_batch]
            if full:
                lower("max_input_tokens", max(full))
        if any("total" in p for p in profiles):  # prompt + new tokens; the shortest prompt is one token
            lower("max_new_tokens", max(int(p["total"][2]) for p in profiles if "total" in p) - 1)
    return limits


def caps(manifest: dict, opts: TritonOptions) -> dict:
    """config.pbtxt's per-request caps {FASTERTRT_MAX_*: value}: each one asked for,
    else what the engines take (--kind gpu) or ORT_CAPS; asking for more than the
    model's positions or the engines' profiles take is an InputError."""
    max_length = int(manifest["model"].get("max_length", 2048))
    limits = {"max_input_tokens": max_length, "max_new_tokens": max(1, max_length - 1)}
    source = dict.fromkeys(limits, f"the model's {max_length} positions")
    max_batch = opts.max_batch or DEFAULT_MAX_BATCH
    defaults = {**ORT_CAPS, "max_rows": max(ORT_CAPS["max_rows"], max_batch)}
    if opts.kind == "gpu":
        for key, value in engine_limits(manifest, max_batch).items():
            if key in CAPS and value <= limits.get(key, value):
                limits[key], source[key] = value, "the engines' optimization profiles"
        defaults.update(limits)  # the engines were built for this much: let requests use it
    keys = ("max_input_tokens",) if manifest["kind"] == "encoder" else tuple(CAPS)
    out = {}
    for key in keys:
        asked, limit = getattr(opts, key), limits.get(key)
        flag = "--" + key.replace("_", "-")
        if asked is not None and limit is not None and asked > limit:
            rebuild = " or rebuild the engines with wider --shapes" if "engines" in source[key] else ""
            raise InputError(f"{flag} {asked} is above the {limit} that {source[key]} take; ask for at most "
                             f"{limit}{rebuild}")
        out[CAPS[key]] = asked or min(defaults.get(key, limit), limit or defaults[key])
    return out


def plan_engine(manifest: dict) -> dict | None:
    """A standard-TensorRT engine with no fastertrt plugins (Triton's tensorrt_plan can serve it)."""
    for e in manifest.get("engines", []):
        if e["backend"] == "tensorrt" and not e.get("plugins") and manifest["kind"] == "encoder":
            return e
    return None


def export_repository(bundle, output, opts: TritonOptions | None = None, overwrite: bool = False) -> dict:
    """Write the repository; returns {'name', 'models': [...], 'notes': [...]}."""
    from fastertrt.bundle.signing import SIGNATURE_NAME
    from fastertrt.compiler.bundle import REPOSITORY_MARKER, check_output, copy_listed, link_or_copy, staging
    from fastertrt.runtime.manifest import read_manifest, verify_files

    opts = opts or TritonOptions()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    _check(opts, manifest)
    name = opts.name or bundle.resolve().name.removesuffix(".bundle").replace(".", "_")
    notes, models = [], [name]
    if opts.env is None:
        notes.append("no --env: the model runs in the python3 first on tritonserver's PATH, which needs numpy<2, "
                     "onnxruntime and tokenizers (under numpy 2 the backend stub misreads inputs silently); "
                     "fastertrt serve-env ENV makes such an environment")
    top = engine_limits(manifest, opts.max_batch).get("max_batch")
    if opts.kind == "cpu" and top is not None and opts.max_batch > top:
        notes.append(f"--max-batch {opts.max_batch} is above the {top} that the bundle's engines take: fine on "
                     f"ONNX Runtime (--kind cpu), but --kind gpu would need --max-batch {top} or wider engines")
    if manifest["kind"] == "decoder":
        models.append(f"{name}_stream")
    check_output(output, overwrite, kinds=("repository",))
    foreign = _entries_not_written_by_us(Path(output)) if overwrite else []
    if foreign:
        raise OutputRefusedError(f"{Path(output).resolve()} is a repository fastertrt wrote, but it now also holds "
                                 f"{', '.join(foreign[:5])}, which fastertrt did not write; --force would delete "
                                 f"them. Move them out first, or export into another folder")
    with staging(Path(output), overwrite, kinds=("repository",)) as stage:
        for model in models:
            version = stage / model / "1"
            version.mkdir(parents=True)
            (stage / model / "config.pbtxt").write_text(
                config_text(manifest, opts, model, stream=model.endswith("_stream") and model != name))
            shutil.copy2(Path(__file__).with_name("triton_model.py"), version / "model.py")
            copy_listed(bundle, manifest, version / "bundle")
            for extra in ("manifest.json", SIGNATURE_NAME):  # the signature too, so the copy stays verifiable
                if (bundle / extra).is_file() and not (bundle / extra).is_symlink():
                    link_or_copy(bundle / extra, version / "bundle" / extra)
            _runtime_sources(version / "lib")
        engine = plan_engine(manifest)
        if engine is not None:
            models.append(_plan_model(stage, name, engine, bundle, opts))
        elif manifest.get("engines"):
            notes.append("the bundle's engines hold fastertrt's Python plugins (or were built by TensorRT-RTX), "
                         "which Triton's tensorrt_plan platform cannot load: serve them with the python-backend "
                         f"model {name} (--kind gpu)")
        (stage / REPOSITORY_MARKER).write_text(json.dumps({"written_by": "fastertrt export-triton", "models": models,
                                                           "bundle": str(bundle.resolve())}) + "\n")
    return {"name": name, "models": models, "notes": notes, "python": opts.python}


def _entries_not_written_by_us(repo: Path) -> list[str]:
    """Top-level entries of an existing repository that its marker does not list (a user's own models)."""
    from fastertrt.compiler.bundle import REPOSITORY_MARKER

    if not (repo / REPOSITORY_MARKER).is_file():
        return []
    try:
        ours = set(json.loads((repo / REPOSITORY_MARKER).read_text()).get("models", []))
    except (ValueError, OSError, AttributeError):
        ours = set()
    return sorted(p.name for p in repo.iterdir() if p.name != REPOSITORY_MARKER and p.name not in ours)


def _plan_model(stage: Path, name: str, engine: dict, bundle: Path, opts: TritonOptions) -> str:
    plan = f"{name}_plan"
    (stage / plan / "1").mkdir(parents=True)
    shutil.copy2(bundle / engine["file"], stage / plan / "1" / "model.plan")
    (stage / plan / "config.pbtxt").write_text(
        f"name: \"{plan}\"\nplatform: \"tensorrt_plan\"\nmax_batch_size: 0\n"
        f"instance_group [\n  {{\n    count: {opts.instances}\n    kind: KIND_GPU\n  }}\n]\n")
    return plan
