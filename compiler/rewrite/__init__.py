"""Rewrite stage: exported graph -> fused graph with fastertrt plugin nodes.

Each plugin with rewrite rules (fastertrt.plugins.REWRITES) gets its rules applied
in order; every plugin node then carries a model-local ONNX function from the
plugin's reference, so ONNX Runtime runs the fused graph and the build stage can
prove TensorRT used the plugin instead of inlining the function.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastertrt.errors import RewriteError

__all__ = ["RewriteError", "PluginRewrite", "fuse_export", "fused_name", "rewrite_file", "rewrite_model"]


@dataclass
class PluginRewrite:
    """What one plugin's rules did to one graph."""

    plugin: str
    blocks: int  # candidate subgraphs found before rewriting (e.g. attention blocks)
    fused: int  # plugin nodes in the result
    by_rule: dict = field(default_factory=dict)
    unfused: list = field(default_factory=list)  # [{"layer", "node", "reasons": {rule: why}}]

    def to_json(self) -> dict:
        return {"blocks": self.blocks, "fused": self.fused, "by_rule": self.by_rule, "unfused": self.unfused}

    def summary(self) -> str:
        rules = ", ".join(f"{k} {v}" for k, v in self.by_rule.items() if v)
        return f"fused {self.fused} of {self.blocks} {self.plugin} blocks" + (f" ({rules})" if rules else "")


def fused_name(path: Path) -> Path:
    """model.onnx -> fused.onnx; prefill.onnx -> prefill.fused.onnx."""
    return path.with_name("fused.onnx" if path.name == "model.onnx" else f"{path.stem}.fused.onnx")


def _plugin_modules():
    from fastertrt.plugins import REWRITES

    return {name: importlib.import_module(mod) for name, mod in REWRITES.items()}


def rewrite_model(model, plugins=None) -> list[PluginRewrite]:
    """Fuse an onnx_ir Model in place; returns one report per plugin that found
    something to replace."""
    reports = []
    for name, mod in (plugins or _plugin_modules()).items():
        mod.prepare(model)
        blocks = mod.find_blocks(model.graph)
        by_rule = {rule_name: rules.apply_to_model(model) for rule_name, rules in mod.rule_set()}
        fused = sum(1 for n in model.graph if n.domain == mod.DOMAIN and n.op_type == name)
        unfused = [mod.explain(model, node) for node in mod.find_blocks(model.graph)]
        if blocks or fused:  # a plugin with nothing to replace in this graph is not reported
            reports.append(PluginRewrite(name, len(blocks), fused, by_rule, unfused))
        mod.attach_functions(model)
    return reports


def check_complete(reports: list[PluginRewrite], graph: str, allow_partial: bool) -> None:
    for r in reports:
        if r.unfused and not allow_partial:
            lines = []
            for u in r.unfused[:8]:
                why = "; ".join(f"{rule}: {reason}" for rule, reason in u["reasons"].items())
                lines.append(f"  - {u['layer']} (node {u['node']}): {why}")
            more = f"\n  ... and {len(r.unfused) - 8} more" if len(r.unfused) > 8 else ""
            raise RewriteError(
                f"{graph}: {r.summary()}; these were not fused:\n" + "\n".join(lines) + more +
                "\nPass --allow-partial to keep the unfused blocks as plain ONNX (they then run as "
                "ordinary layers), or report the pattern so a rule can cover it.")


def infer_shapes(proto):
    """Shapes for every value, symbolic where dynamic: the rules check head counts
    and head sizes, and exporters compute reshape targets with Shape arithmetic
    that plain ONNX inference loses. ONNX Runtime's symbolic inference follows
    that arithmetic; ONNX's own (with data propagation) is the fallback."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # noqa: BLE001 - it rejects some ops (e.g. opset-23 Attention); fall back
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)


def rewrite_file(src: Path, dst: Path, allow_partial: bool = False) -> list[PluginRewrite]:
    """Read an exported graph, fuse it, write `dst` (atomically). External weights
    stay where they are: the fused graph points at the same data file."""
    import onnx
    import onnx_ir as ir

    proto = infer_shapes(onnx.load(str(src), load_external_data=False))
    model = ir.from_proto(proto)
    reports = rewrite_model(model)
    check_complete(reports, src.name, allow_partial)
    out = ir.to_proto(model)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(out, str(tmp))
    os.replace(tmp, dst)
    return reports


def fuse_export(stage: Path, result, allow_partial: bool = False, parity: bool = True, progress=None):
    """Rewrite every graph of an export in the bundle staging folder.

    Returns (graph entries' extra fields by graph name, fused ExportedGraphs,
    parity report or None). Fused and exported graphs share one weights file."""
    from fastertrt.compiler.export.parity import ParityReport
    from fastertrt.compiler.export.result import ExportedGraph
    from fastertrt.compiler.export.shared_weights import share_weights
    from fastertrt.compiler.rewrite import parity as rewrite_parity
    from fastertrt.progress import quiet

    progress = progress or quiet()
    extras, fused_graphs, pairs = {}, [], {}
    for g in result.graphs:
        dst = fused_name(g.path)
        with progress.step(f"fuse plugins into {g.name} graph ({g.path.name} -> {dst.name})"):
            reports = rewrite_file(g.path, dst, allow_partial)
        for r in reports:
            progress.info(f"    {g.name}: {r.summary()}")
        pairs[g.name] = (g.path, dst)
        extras[g.name] = {"exported": g.path.relative_to(stage).as_posix(),
                          "rewrite": {r.plugin: r.to_json() for r in reports}}
    with progress.step("store the weights of exported and fused graphs once (weights.bin)"):
        share_weights([p for pair in pairs.values() for p in pair])
    for g in result.graphs:
        fused = ExportedGraph.read(g.name, pairs[g.name][1])
        fused.files = sorted({*fused.files, *ExportedGraph.read(g.name, g.path).files})
        fused_graphs.append(fused)
    report = None
    if parity:
        with progress.step("rewrite parity: fused vs exported graph on ONNX Runtime"):
            report = ParityReport()
            vocab = int(result.info["vocab_size"])
            if result.kind == "encoder":
                rewrite_parity.check_encoder(*pairs["encoder"], result.info["input_names"], vocab, report)
            else:
                rewrite_parity.check_decoder(pairs, vocab, report)
        progress.info(f"  rewrite parity (fused vs exported, ONNX Runtime): max abs diff {report.worst:.3g}, "
                      f"relative to output scale {report.worst_rel:.3g}")
        report.check("rewrite", stage="rewrite")
    return extras, fused_graphs, report
