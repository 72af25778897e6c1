"""`fastertrt compare`: run the same inputs through every stage of a bundle
with polygraphy runners, compare each stage with its upstream neighbour with
polygraphy's Comparator under the shared tolerance table, and find the first
bad layer of each failing pair of ONNX stages."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastertrt.errors import InputError
from fastertrt.progress import quiet
from fastertrt.tolerances import clear_of_ties, tolerance
from fastertrt.tools.compare import feeds as feeds_mod
from fastertrt.tools.compare.metrics import output_ok, tensor_metrics, valid_positions, worst_of
from fastertrt.tools.compare.stages import Stage, plan

LAYER_MODES = ("auto", "all", "none")


@dataclass
class CompareOptions:
    graphs: list[str] | None = None      # default: every graph of the bundle
    stages: list[str] | None = None      # default: every stage this machine can run
    texts: list[str] | None = None
    load_inputs: Path | None = None
    save_inputs: Path | None = None
    save_outputs: Path | None = None
    model: str | None = None             # torch model to compare with (shipped name or HF folder)
    layers: str = "auto"                 # first-bad-layer search: failing pairs, all ONNX pairs, none
    iterations: int = 2
    max_tokens: int = 64


def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER

    # fastertrt prints its own table; polygraphy would repeat each verdict as an [E] line
    G_LOGGER.module_severity = G_LOGGER.CRITICAL


def _runner(stage: Stage, bundle: Path, manifest: dict, graph: str, model_ref):
    from fastertrt.tools.compare import runners

    if stage.kind == "torch":
        return runners.torch_runner(manifest, graph, model_ref, name=stage.label)
    if stage.kind == "onnx":
        return runners.onnx_runner(stage.path, stage.label)
    if stage.kind == "runtime":
        return runners.runtime_runner(bundle, graph, "onnxruntime", name=stage.label)
    if stage.entry["backend"] == "tensorrt":
        return runners.engine_runner(bundle, stage.entry, stage.label)
    # polygraphy's TensorRT runner imports standard tensorrt; TensorRT-RTX engines run through the runtime
    return runners.runtime_runner(bundle, graph, "tensorrt", name=stage.label)


def _pair_tolerance(stages: list[Stage], ref: Stage, stage: Stage):
    """The loosest tolerance of the stages between ref (exclusive) and stage, when
    some were left out of the run; else the stage's own."""
    names = [s.name for s in stages]
    span = stages[names.index(ref.name) + 1: names.index(stage.name) + 1]
    keys = [s.tolerance for s in span if s.kind != "engine"] + [stage.tolerance]
    return min(keys, key=lambda k: (tolerance(*k).min_cosine, -tolerance(*k).atol))


def _seq_axis(spec: dict, name: str, mask_dim) -> int | None:
    for t in spec["outputs"]:
        if t["name"] == name:
            return next((i for i, d in enumerate(t["shape"]) if i > 0 and d == mask_dim), None)
    return None


def _output_metrics(spec: dict, feeds: dict, ref_out: dict, got_out: dict) -> dict:
    """{output: metrics} on valid positions; candidate ids where clear of ties."""
    mask = feeds.get("attention_mask")
    mask_dim = next((t["shape"][1] for t in spec["inputs"] if t["name"] == "attention_mask"), None)
    clear = clear_of_ties(ref_out["candidate_scores"]) if "candidate_scores" in ref_out else None
    out = {}
    for name, r in ref_out.items():
        if name not in got_out:
            continue
        g = got_out[name]
        if clear is not None and name.startswith("candidate_") and name != "candidate_scores" \
                and np.shape(r) == clear.shape:
            out[name] = tensor_metrics(np.asarray(r)[clear], np.asarray(g)[clear])
            continue
        axis = _seq_axis(spec, name, mask_dim) if mask is not None else None
        out[name] = tensor_metrics(r, g, valid_positions(mask, np.shape(r), axis))
    return out


def _run_stage(stage: Stage, bundle: Path, manifest: dict, graph: str, model_ref, feed_list: list):
    """polygraphy's Comparator.run over one stage's runner; a stage that cannot
    run is named in the error (ONNX Runtime's own message says why)."""
    from polygraphy.comparator import Comparator

    from fastertrt.errors import FastertrtError, StageRunError

    try:
        return Comparator.run([_runner(stage, bundle, manifest, graph, model_ref)], data_loader=feed_list)
    except FastertrtError:
        raise
    except Exception as exc:  # polygraphy and the backends raise their own types
        where = f" ({stage.path})" if stage.path else ""
        detail = str(exc).strip().splitlines()[-1][:600] if str(exc).strip() else type(exc).__name__
        raise StageRunError(f"graph {graph}: stage {stage.label}{where} could not run: {detail}. Check the file "
                            f"with `fastertrt inspect {bundle}` or `polygraphy inspect model {stage.path or ''}`; "
                            f"--stages leaves a stage out") from exc


def _function_checks(stages: list[Stage]) -> list[dict]:
    """Plugin nodes whose attributes disagree with the ONNX function they carry."""
    import onnx

    from fastertrt.plugins.functions import check_functions

    out = []
    for s in stages:
        if s.kind == "onnx":
            for problem in check_functions(onnx.load(str(s.path), load_external_data=False)):
                out.append({"stage": s.name, "file": s.path.name, "problem": problem})
    return out


def compare_graph(bundle: Path, manifest: dict, graph: str, opts: CompareOptions, progress) -> dict:
    from polygraphy.comparator import Comparator, RunResults

    spec = manifest["graphs"][graph]
    stages, skipped = plan(bundle, manifest, graph, opts.stages, opts.model)
    if opts.load_inputs:
        feed_list = feeds_mod.load_feeds(_per_graph(opts.load_inputs, graph, manifest), spec["inputs"])
    else:
        feed_list = feeds_mod.make_feeds(bundle, manifest, graph, opts.texts, opts.iterations, opts.max_tokens)
    if opts.save_inputs:
        feeds_mod.save_feeds(feed_list, _per_graph(opts.save_inputs, graph, manifest))

    results = RunResults()
    for stage in stages:
        with progress.step(f"{graph}: run {len(feed_list)} input batch(es) through {stage.label}"):
            results.extend(_run_stage(stage, bundle, manifest, graph, opts.model, feed_list))
    if opts.save_outputs:
        path = _per_graph(opts.save_outputs, graph, manifest)
        feeds_mod.atomic_write(path, lambda tmp: results.save(str(tmp)))

    by_label = {name: iters for name, iters in results}
    index = {s.name: s for s in stages}
    pairs = []
    for stage in stages:
        if stage.ref is None:
            continue
        ref = index[stage.ref]
        key = _pair_tolerance(stages, ref, stage)
        tol = tolerance(*key)
        verdicts: dict = OrderedDict()
        failing: list[int] = []  # iterations out of tolerance: the layer search takes the first

        def compare_func(ref_iter, got_iter, _tol=tol, _verdicts=verdicts, _ref=ref, _failing=failing):
            i = next(k for k, it in enumerate(by_label[_ref.label]) if it is ref_iter)
            metrics = _output_metrics(spec, feed_list[i], dict(ref_iter), dict(got_iter))
            for name, m in metrics.items():
                _verdicts[name] = worst_of(_verdicts.get(name), m)
            ok = OrderedDict((name, output_ok(m, _tol)) for name, m in metrics.items())
            if not all(ok.values()):
                _failing.append(i)
            return ok

        ref_index = [s.label for s in stages].index(ref.label)
        got_index = [s.label for s in stages].index(stage.label)
        accuracy = Comparator.compare_accuracy(results, comparisons=[(ref_index, got_index)],
                                               compare_func=compare_func)
        outputs = {name: {**m, "passed": output_ok(m, tol)} for name, m in verdicts.items()}
        pairs.append({"ref": ref.name, "stage": stage.name, "ref_label": ref.label, "label": stage.label,
                      "tolerance": {"key": list(key), **vars(tol)}, "passed": bool(accuracy) and all(
                          o["passed"] for o in outputs.values()), "outputs": outputs,
                      "failing_iterations": sorted(set(failing))})

    layer_runs = _layer_search(bundle, manifest, stages, pairs, feed_list, opts.layers, progress, graph)
    problems = _function_checks(stages)
    return {"graph": graph, "stages": [{"name": s.name, "label": s.label, "kind": s.kind, "ref": s.ref}
                                       for s in stages],
            "skipped": [{"stage": n, "reason": w} for n, w in skipped], "iterations": len(feed_list),
            "input_shapes": [{k: list(v.shape) for k, v in f.items()} for f in feed_list],
            "pairs": pairs, "layers": layer_runs, "problems": problems,
            "passed": all(p["passed"] for p in pairs) and not problems}


def _layer_search(bundle, manifest, stages, pairs, feed_list, mode, progress, graph) -> list[dict]:
    from fastertrt.tools.compare.layers import locate

    if mode == "none":
        return []
    index = {s.name: s for s in stages}
    out = []
    for pair in pairs:
        if mode == "auto" and pair["passed"]:
            continue
        ref, stage = index[pair["ref"]], index[pair["stage"]]
        if ref.path is None or stage.path is None or stage.kind == "engine":
            pair["layer_search"] = _why_no_search(ref, stage, bundle, graph)
            continue
        precision = "int8" if "int8" in (stage.precision, ref.precision) else "fp32"
        iteration = (pair["failing_iterations"] or [0])[0]
        with progress.step(f"{graph}: layer search {ref.label} -> {stage.label} on input batch {iteration}"):
            found = locate(ref.path, stage.path, feed_list[iteration], precision, ref.label, stage.label)
        found["iteration"] = iteration
        found["pair"] = [ref.name, stage.name]
        found["pair_passed"] = pair["passed"]
        out.append(found)
    return out


def _why_no_search(ref: Stage, stage: Stage, bundle: Path, graph: str) -> str:
    if "torch" in (ref.kind, stage.kind):
        return ("the layer search needs two ONNX graphs. torch vs the export differing means the exporter traced "
                "something else than eager torch runs: recompile with --attn-implementation eager, and compare "
                "again (model.onnx vs the later stages is searched layer by layer)")
    return (f"the engine's layers are searched with polygraphy itself (needs TensorRT and a GPU): "
            f"polygraphy run {ref.path} --onnxrt --trt --plugins <fastertrt plugins> --onnx-outputs mark all "
            f"--trt-outputs mark all --load-inputs inputs.json, or polygraphy debug reduce")


def _per_graph(path: Path, graph: str, manifest: dict) -> Path:
    """One file per graph where the bundle has several: inputs.json -> inputs.decode.json."""
    path = Path(path)
    if len(manifest["graphs"]) == 1:
        return path
    return path.with_name(f"{path.stem}.{graph}{path.suffix or '.json'}")


def compare_bundle(bundle, opts: CompareOptions | None = None, progress=None) -> dict:
    from fastertrt.runtime.manifest import read_manifest, verify_files
    from fastertrt.tools.compare.runners import require_polygraphy

    require_polygraphy()
    _quiet_polygraphy()
    opts = opts or CompareOptions()
    progress = progress or quiet()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    integrity = "all files match the manifest's sha256"
    try:
        verify_files(bundle, manifest)
    except Exception as exc:  # noqa: BLE001 - a damaged bundle is what one debugs: compare it as it is
        integrity = str(exc)
    if opts.layers not in LAYER_MODES:
        raise InputError(f"--layers must be one of {LAYER_MODES}, got {opts.layers!r}")
    names = opts.graphs or list(manifest["graphs"])
    unknown = [g for g in names if g not in manifest["graphs"]]
    if unknown:
        raise InputError(f"bundle {bundle} has graphs {list(manifest['graphs'])}, not {unknown}")
    graphs = [compare_graph(bundle, manifest, g, opts, progress) for g in names]
    return {"bundle": str(bundle.resolve()), "kind": manifest["kind"], "integrity": integrity,
            "default_precision": manifest.get("default_precision", "fp32"), "graphs": graphs,
            "passed": all(g["passed"] for g in graphs)}
