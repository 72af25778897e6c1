"""compile: model -> export -> bundle. Later stages (rewrite, calibrate, build)
slot in between export and bundle."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fastertrt import __version__
from fastertrt.compiler.bundle import check_output, config_digest, graph_entry, save_tokenizer, staging, write_manifest
from fastertrt.compiler.models import from_loaded, resolve
from fastertrt.errors import MissingDependencyError
from fastertrt.progress import quiet
from fastertrt.versions import package_versions

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
EXPORT_PACKAGES = ("fastertrt", "torch", "transformers", "onnx", "onnxruntime")  # recorded in the manifest


def require_compile_deps() -> None:
    missing = [m for m in ("torch", "transformers", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"compiling needs {', '.join(missing)}, which this Python lacks. Install the compiler: "
            f"pip install torch==2.13.0 && pip install 'fastertrt[compile,models]'"
        )


def _token_ids(model, tokenizer) -> dict:
    gen = getattr(model, "generation_config", None)
    cfg = model.config

    def first(*vals):
        return next((v for v in vals if v is not None), None)

    eos = first(getattr(gen, "eos_token_id", None), getattr(cfg, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None))
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = first(getattr(gen, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                getattr(tokenizer, "pad_token_id", None), eos[0] if eos else None)
    bos = first(getattr(gen, "bos_token_id", None), getattr(cfg, "bos_token_id", None))
    return {"eos_token_id": eos, "pad_token_id": None if pad is None else int(pad),
            "bos_token_id": None if bos is None else int(bos)}


def _max_length(model, family, pooling) -> int:
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20) - family.position_offset
    if pooling and pooling.get("max_seq_length"):
        limit = min(limit, int(pooling["max_seq_length"]))
    return limit


def compile_model(model, output, attn_implementation: str = "sdpa", parity: bool = True,
                  overwrite: bool = False, tokenizer=None, progress=None, build=None,
                  plugins: bool = True, allow_partial: bool = False, calibration=None, wait: bool = False) -> Path:
    """Compile a shipped model name, a Hugging Face folder, or a loaded
    transformers model into a bundle folder at `output`. Returns its path.

    build: a fastertrt.compiler.build.BuildOptions to also build TensorRT engines.
    plugins: replace attention with fastertrt's plugin (fused graphs); every block
    must fuse unless allow_partial.
    calibration: a fastertrt.calibration.calibrate.CalibrationOptions to also
    calibrate INT8 (int8.onnx + cache + report; engines are then built INT8).
    overwrite replaces only an earlier fastertrt bundle at `output`; wait queues behind
    another fastertrt process writing it instead of failing."""
    progress = progress or quiet()
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    source = resolve(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else from_loaded(model)
    family = source.family  # unknown families fail here, before any heavy loading
    check_output(output, overwrite, source=source.folder)
    require_compile_deps()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with progress.step(f"load {source.ref} ({family.name} {family.kind}, attention={attn_implementation})"):
        if source.kind == "module":
            torch_model = model.eval()
            torch_model.config._attn_implementation = attn_implementation
        else:
            torch_model = source.load_torch(attn_implementation)
            tokenizer = tokenizer or source.load_tokenizer()
    pooling = source.sentence_pooling() if family.kind == "encoder" else None
    max_length = _max_length(torch_model, family, pooling)

    with staging(Path(output), overwrite, source=source.folder, wait=wait) as stage:
        if family.kind == "encoder":
            from fastertrt.compiler.export import export_encoder

            result = export_encoder(torch_model, stage, pooling, parity, attn_implementation, progress)
        else:
            from fastertrt.compiler.export import export_decoder

            result = export_decoder(torch_model, stage, parity, attn_implementation, progress)
        if result.parity is not None:
            progress.info(f"  export parity (ONNX Runtime vs torch, valid positions): max abs diff "
                          f"{result.parity.worst:.3g}, relative to output scale {result.parity.worst_rel:.3g}")
            result.parity.check(f"export of {source.ref}")
        graph_extras, rewrite_report = {}, None
        if plugins:
            from fastertrt.compiler.rewrite import fuse_export

            graph_extras, result.graphs, rewrite_report = fuse_export(stage, result, allow_partial, parity, progress)
            if result.kind == "decoder":
                from fastertrt.compiler.lower_ort import write_decoder_variants

                with progress.step("ONNX Runtime variants of the decoder graphs (GroupQueryAttention)"):
                    files, variant_report = write_decoder_variants(
                        stage, {g.name: g.path for g in result.graphs}, int(result.info["vocab_size"]),
                        max_length + family.position_offset, progress)
                progress.info(f"  ONNX Runtime variant parity (vs fused graphs): max abs diff "
                              f"{variant_report.worst:.3g}, relative to output scale {variant_report.worst_rel:.3g}")
                variant_report.check("ONNX Runtime variant of the fused graphs", stage="rewrite")
                for name, entry in files.items():
                    graph_extras[name].update(entry)
        tok = save_tokenizer(tokenizer, stage)
        model_info = {
            "family": family.name,
            "model_type": source.model_type,
            "source": source.to_json(),
            "config_sha256": config_digest(source.config),
            "max_length": max_length,
            **result.info,
            **_token_ids(torch_model, tokenizer),
        }
        manifest = {
            "fastertrt_version": __version__,
            "kind": result.kind,
            "model": model_info,
            "graphs": {g.name: {**graph_entry(g, stage), **graph_extras.get(g.name, {})} for g in result.graphs},
            "tokenizer": tok,
            "export": {
                "exporter": "torch.onnx dynamo",
                "attn_implementation": attn_implementation,
                "versions": package_versions(*EXPORT_PACKAGES),
                "parity": result.parity.to_json() if result.parity else None,
            },
            "rewrite": {"plugins": plugins, "allow_partial": allow_partial,
                        "parity": rewrite_report.to_json() if rewrite_report else None},
        }
        if calibration is not None:
            from fastertrt.calibration.calibrate import calibrate_stage

            manifest = calibrate_stage(stage, manifest, calibration, progress)
        if build is not None:
            from fastertrt.compiler.build import add_engines

            manifest = add_engines(stage, manifest, build, progress)
        manifest = write_manifest(stage, manifest)
    out = Path(output).resolve()
    size = sum(e["bytes"] for e in manifest["files"].values())
    progress.info(f"bundle written: {out} ({len(manifest['files'])} files, {size / 1e6:.1f} MB)")
    return out


def compile_module(module, example_inputs: dict, output, output_names=None, dynamic_axes=None,
                   parity: bool = True, overwrite: bool = False, progress=None) -> Path:
    """Compile a plain nn.Module given example inputs (name -> tensor, in forward
    order). The bundle loads as a `ModuleRunner` with run(**arrays)."""
    from fastertrt.compiler.export import export_module

    progress = progress or quiet()
    check_output(output, overwrite)
    require_compile_deps()
    with staging(Path(output), overwrite) as stage:
        result = export_module(module.eval(), example_inputs, stage, output_names, dynamic_axes, parity, progress)
        if result.parity is not None:
            result.parity.check(f"export of {type(module).__name__}")
        write_manifest(stage, {
            "fastertrt_version": __version__,
            "kind": "module",
            "model": {"family": "module", "source": {"kind": "module", "ref": type(module).__name__}, **result.info},
            "graphs": {g.name: graph_entry(g, stage) for g in result.graphs},
            "tokenizer": None,
            "export": {"exporter": "torch.onnx dynamo", "versions": package_versions(*EXPORT_PACKAGES),
                       "parity": result.parity.to_json() if result.parity else None},
        })
    return Path(output).resolve()
