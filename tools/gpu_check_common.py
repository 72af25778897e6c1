"""What the GPU check scripts (tools/gpu_attention_check.py, tools/gpu_beam_check.py)
share: their command line (`prepare` on the compile machine, `run` on the GPU
machine), importing fastertrt's plugin modules on a GPU machine without a
fastertrt install, CUDA-event and CUDA-graph timing, and the per-config loop with
its table rows and JSON output.

The scripts load this file by path: tools/ must not be on sys.path (its
inspect.py would shadow the standard library's) and is no package where
fastertrt is not installed. So it imports only the standard library at import
time; torch comes in as an argument.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------
def parser(doc: str, run_help: str, iters: int, warmup: int):
    """(parser, prepare subparser, run subparser) with the options both scripts take;
    each script adds its own."""
    top = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("prepare", help="compile the cubins (no GPU; needs triton)")
    p.add_argument("outdir", type=Path)
    p.add_argument("--targets", default="80,86,89,90", help="compute capabilities, comma separated")
    r = sub.add_parser("run", help=run_help)
    r.add_argument("outdir", type=Path)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--iters", type=int, default=iters)
    r.add_argument("--warmup", type=int, default=warmup)
    r.add_argument("--only", default=None, help="run only configs whose label contains this")
    return top, p, r


def targets(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def write_manifest(outdir: Path, manifest: dict, summary: str, start: float) -> None:
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {summary} to {outdir} in {time.perf_counter() - start:.1f} s")


# -----------------------------------------------------------------------------
# fastertrt on the GPU machine
# -----------------------------------------------------------------------------
def import_plugins(*names: str) -> tuple:
    """fastertrt.plugins.<name> modules, installed or straight from this checkout (the
    GPU machine has no fastertrt install: fastertrt/ and plugins/ are taken by path)."""
    try:
        return tuple(importlib.import_module(f"fastertrt.plugins.{name}") for name in names)
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))  # fastertrt/ (errors.py, tolerances.py) is importable from the checkout root
    import fastertrt

    spec = importlib.util.spec_from_file_location(
        "fastertrt.plugins", ROOT / "plugins" / "__init__.py", submodule_search_locations=[str(ROOT / "plugins")])
    plugins = importlib.util.module_from_spec(spec)
    sys.modules["fastertrt.plugins"] = plugins
    spec.loader.exec_module(plugins)
    fastertrt.plugins = plugins
    return tuple(importlib.import_module(f"fastertrt.plugins.{name}") for name in names)


def cuda_device(torch, cuda_launch) -> tuple[int, str]:
    """(compute capability, device name) of the current GPU."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # makes torch's primary context current for the driver calls
    return cuda_launch.current_compute_capability(), torch.cuda.get_device_name()


# -----------------------------------------------------------------------------
# Timing
# -----------------------------------------------------------------------------
class Bench:
    """Timing of one call. device "cpu" (a dry run of a script's own code) times with
    the host clock and has no graph timing."""

    def __init__(self, torch, iters: int, warmup: int, device: str = "cuda"):
        self.torch, self.iters, self.warmup, self.device = torch, iters, warmup, device

    def events_ms(self, fn) -> float:
        """Median over calls of start/end events around one call (includes the host's
        launch cost when the GPU waits for it)."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cpu":
            for _ in range(self.iters):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        for _ in range(self.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def graph_us(self, fn, reps: int = 20):
        """GPU time per call from a CUDA graph of `reps` calls (no Python in the loop);
        None where capture fails."""
        torch = self.torch
        if self.device == "cpu":
            return None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # loads modules and lets torch's allocator settle outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
            graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(max(10, self.iters // 5)):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1000.0 / reps)
            return statistics.median(times)
        except Exception as exc:  # noqa: BLE001 - timing extra; report why it is missing
            print(f"  (graph timing unavailable: {type(exc).__name__}: {str(exc)[:160]})")
            return None

    def against(self, row: dict, ours, theirs, name: str) -> None:
        """Time `ours` and `theirs` both ways into row: ours_ms, <name>_ms, ours_graph_us,
        <name>_graph_us (None where graph capture failed)."""
        row["ours_ms"] = self.events_ms(ours)
        row[f"{name}_ms"] = self.events_ms(theirs)
        row["ours_graph_us"] = self.graph_us(ours)
        row[f"{name}_graph_us"] = self.graph_us(theirs)

    def host_us(self, fn, n: int = 100) -> float:
        """Host time per call over n calls back to back: what the Python launch path
        costs a TensorRT enqueue."""
        start = time.perf_counter()
        for _ in range(n):
            fn()
        per_call = (time.perf_counter() - start) / n * 1e6
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return per_call


# -----------------------------------------------------------------------------
# Configs, rows, output
# -----------------------------------------------------------------------------
def run_configs(configs, only: str | None, check, print_row) -> list[dict]:
    """check(row, *config) for each config whose label (config[0]) contains `only`;
    row starts as {"label": label} and check fills it, "ok" included. An exception
    marks that row failed and the loop goes on: one bad config must not hide the others."""
    rows = []
    for config in configs:
        if only and only not in config[0]:
            continue
        row = {"label": config[0]}
        try:
            check(row, *config)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict, width: int, describe) -> None:
    """`label  ok|BAD  describe(f)`, where f(key, spec) formats row[key] ("-" where it
    is missing), or `label  ERROR message`."""
    if "error" in row:
        print(f"{row['label']:{width}s} ERROR {row['error'][:300]}")
        return

    def f(key, spec):
        v = row.get(key)
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    print(f"{row['label']:{width}s} {'ok ' if row['ok'] else 'BAD'} {describe(f)}")


def timing_columns(f, name: str, ratio: str, graph_ratio: str, host: str) -> str:
    """The table's timing columns for a row that Bench.against and host_us filled."""
    return (f"ours {f('ours_ms', '7.4f')} ms  {name} {f(f'{name}_ms', '7.4f')} ms  x{f(ratio, '.2f')}"
            f"  graph {f('ours_graph_us', '7.1f')} / {f(f'{name}_graph_us', '7.1f')} us  x{f(graph_ratio, '.2f')}"
            f"  host {f(host, '.0f')} us")


def write_json(path: Path | None, result: dict) -> None:
    if path:
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
