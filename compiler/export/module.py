"""Export of a plain torch nn.Module with example inputs (Python API only).

Every input dimension but the last of a float input is treated as dynamic
unless `dynamic_axes` says otherwise: transformer blocks take [batch, seq, ...].
"""

from __future__ import annotations

from pathlib import Path

from fastertrt.compiler.export.onnx_file import export_graph
from fastertrt.compiler.export.parity import ParityReport, masked_max_abs, ort_session
from fastertrt.compiler.export.result import ExportedGraph, ExportResult
from fastertrt.errors import ExportError
from fastertrt.progress import quiet


def default_axes(example_inputs: dict) -> dict:
    names = ("batch", "seq")
    return {k: {i: names[i] for i in range(min(2, v.dim()))} for k, v in example_inputs.items()}


def export_module(module, example_inputs: dict, out_dir: Path, output_names=None, dynamic_axes=None,
                  parity: bool = True, progress=None) -> ExportResult:
    import torch

    progress = progress or quiet()
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise ExportError("example_inputs must be a non-empty dict of input name -> torch.Tensor, in forward() order")
    names = list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    axes = default_axes(example_inputs) if dynamic_axes is None else dynamic_axes
    dims = {}
    dynamic = tuple({ax: dims.setdefault(dn, torch.export.Dim(dn)) for ax, dn in axes.get(n, {}).items()} for n in names)
    with torch.no_grad():
        ref = module(*args)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    out_names = list(output_names or [f"output_{i}" for i in range(len(ref))])
    path = Path(out_dir) / "model.onnx"
    with progress.step(f"export {type(module).__name__} (torch.onnx dynamo)"):
        export_graph(module, args, path, names, out_names, dynamic)
    report = None
    if parity:
        report = ParityReport()
        got = ort_session(path).run(None, {n: t.numpy() for n, t in zip(names, args)})
        for name, g, r in zip(out_names, got, ref):
            report.add("example", name, masked_max_abs(g, r.detach().numpy(), None, 1))
    return ExportResult("module", [ExportedGraph.read("module", path)], report, {"input_names": names})
