"""The compare report three ways: a text table for the terminal, JSON for
machines, a PNG of the error per layer for people."""

from __future__ import annotations

import json
from pathlib import Path

from fastertrt.tools.compare.feeds import atomic_write
from fastertrt.tools.compare.layers import diagnosis_lines
from fastertrt.tools.compare.metrics import worst_of


def _cells(m: dict) -> tuple[str, str, str]:
    if m["kind"] == "shape":
        return "shape", f"{m['got_shape']}", f"vs {m['ref_shape']}"
    if m["kind"] == "exact":
        return ("equal", "ids", f"{m['total']}") if not m["mismatched"] else (
            f"{m['mismatched']}/{m['total']}", "differ", "-")
    return f"{m['max_abs']:.3g}", f"{m['max_rel']:.3g}", f"{m['cosine']:.6f}"


def _folded(outputs: dict) -> list[tuple[str, dict, bool]]:
    """(name, metrics, passed) rows with the per-layer KV cache folded into one row
    (the worst of its tensors), as `inspect` folds it."""
    from fastertrt.tools.inspect import fold_per_layer

    out = []
    for name, layers, group in fold_per_layer(outputs.items()):
        worst = None
        for m in group:
            worst = worst_of(worst, m)
        if layers is not None:
            name = f"{name}.{{{min(layers)}..{max(layers)}}}.*"
        out.append((name, worst, all(m["passed"] for m in group)))
    return out


def _tol_text(t: dict) -> str:
    parts = []
    if t["atol"] != float("inf"):
        parts.append(f"atol {t['atol']:g}")
    if t["min_cosine"]:
        parts.append(f"cos>={t['min_cosine']:g}")
    if t.get("norm") is not None:
        parts.append(f"norm±{t['norm']:g}")
    return f"{'/'.join(t['key'])}: {', '.join(parts)}"


def text(report: dict) -> str:
    lines = [f"bundle {report['bundle']} ({report['kind']}, default precision {report['default_precision']})",
             f"files  {report['integrity']}"]
    for g in report["graphs"]:
        shapes = "; ".join(", ".join(f"{k} {v}" for k, v in s.items() if k in ("input_ids",))
                           for s in g["input_shapes"])
        lines.append("")
        lines.append(f"graph {g['graph']}: {g['iterations']} input batch(es) ({shapes}); stages "
                     + " -> ".join(s["label"] for s in g["stages"]))
        for s in g["skipped"]:
            lines.append(f"  skipped {s['stage']}: {s['reason']}")
        width = max([44] + [len(p["ref_label"]) + len(p["label"]) + 4 for p in g["pairs"]])
        header = f"  {'stage pair':<{width}} {'output':<22} {'max abs':>9} {'max rel':>9} {'cosine':>9}  result"
        lines.append(header)
        lines.append("  " + "-" * (len(header) - 2))
        for p in g["pairs"]:
            pair = f"{p['ref_label']} -> {p['label']}"
            for i, (name, m, ok) in enumerate(_folded(p["outputs"])):
                a, r, c = _cells(m)
                lines.append(f"  {pair if i == 0 else '':<{width}} {name[:22]:<22} {a:>9} {r:>9} {c:>9}  "
                             f"{'pass' if ok else 'FAIL'}")
            lines.append(f"  {'':<{width}} tolerance {_tol_text(p['tolerance'])}")
            if p.get("layer_search"):
                lines.append(f"  {'':<{width}} layers: {p['layer_search']}")
        for prob in g["problems"]:
            lines.append(f"  PROBLEM in {prob['file']}: {prob['problem']}")
        for run in g["layers"]:
            lines.append("")
            verdict = "passes" if run["pair_passed"] else "FAILS"
            lines.append(f"  layer search {run['ref']} -> {run['stage']} (pair {verdict}, input batch {run['iteration']}): "
                         f"{run['checked']} tensors "
                         f"checked in topological order ({run['common_tensors']} shared by name, "
                         f"{run['qdq_pairs']} Q/DQ pairs)")
            if run["first_bad"] is None:
                worst = min((s for s in run["series"] if "cosine" in s), key=lambda s: s["cosine"], default=None)
                lines.append("  every tensor within tolerance" + (
                    f"; lowest cosine {worst['cosine']:.6f} at {worst['tensor']} ({worst['module']})" if worst else ""))
                if not run["pair_passed"]:
                    lines.append("  the outputs break tolerance though no single tensor does: the error grows "
                                 "gradually through the layers (see --plot), or sits in a tensor without a partner")
            else:
                lines += ["  " + line for line in diagnosis_lines(run["first_bad"])]
    lines.append("")
    lines.append("PASSED: every stage within tolerance" if report["passed"] else
                 "FAILED: " + "; ".join([f"{g['graph']} {p['ref']} -> {p['stage']}" for g in report["graphs"]
                                         for p in g["pairs"] if not p["passed"]]
                                        + [f"{g['graph']} {p['file']}: plugin node check" for g in report["graphs"]
                                           for p in g["problems"]]))
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=_plain) + "\n"))


def _plain(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _layer_ticks(ax, series: list[dict]) -> None:
    """Faint lines where the model's numbered layer changes (module paths ...layers.N... or ...layer.N...)."""
    import re

    last = None
    for s in series:
        m = re.search(r"\.(?:layers?|h|blocks?)\.(\d+)(?:\.|$)", s["module"])
        if m and m.group(1) != last:
            last = m.group(1)
            ax.axvline(s["index"], color="grey", lw=0.5, alpha=0.5)
            ax.text(s["index"], 3.0, f"L{last}", fontsize=7, color="grey")


def plot(report: dict, path: Path) -> int:
    """Error per layer of every layer search: 1 - cosine and max relative error per
    tensor in topological order, the first bad tensor marked. Returns the panel count."""
    runs = [(g["graph"], r) for g in report["graphs"] for r in g["layers"]]
    if not runs:
        raise ValueError("no layer search ran (every pair passed); plot with --layers all")
    try:
        import matplotlib
    except ImportError as exc:
        from fastertrt.errors import MissingDependencyError

        raise MissingDependencyError("--plot needs matplotlib: pip install 'fastertrt[compile]' "
                                     "(or: pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 3.6 * len(runs)), squeeze=False)
    for ax, (graph, run) in zip(axes[:, 0], runs):
        pts = [s for s in run["series"] if s["kind"] == "float"]
        xs = [s["index"] for s in pts]
        ax.semilogy(xs, [max(1.0 - s["cosine"], 1e-12) for s in pts], ".", ms=3, label="1 - cosine")
        ax.semilogy(xs, [max(s["max_rel"], 1e-12) for s in pts], ".", ms=3, alpha=0.6, label="max abs err / max |ref|")
        exact = [s for s in run["series"] if s["kind"] != "float" and not s["passed"]]
        if exact:
            ax.semilogy([s["index"] for s in exact], [1.0] * len(exact), "x", color="black", label="int/bool mismatch")
        bad = run["first_bad"]
        title = f"{graph}: {run['ref']} -> {run['stage']}"
        if bad:
            at = next(s["index"] for s in run["series"] if s["tensor"] == bad["tensor"])
            ax.axvline(at, color="red", lw=1)
            ax.annotate(f"first bad: {bad['module']}\n{bad['op']} {bad['tensor']}", (at, 1e-3), color="red",
                        fontsize=8, xytext=(5, 0), textcoords="offset points")
            title += f" (first bad layer: {bad['module']})"
        _layer_ticks(ax, run["series"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tensor, in topological order")
        ax.set_ylim(1e-12, 10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(str(tmp), format="png", dpi=90))
    plt.close(fig)
    return len(runs)
