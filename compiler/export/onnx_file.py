"""torch.onnx (dynamo) export of one graph, and reading its I/O back from the file."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

from fastertrt.errors import ExportError

# Above this size the weights go to an external-data file next to the graph
# (protobuf cannot hold 2 GiB in one message).
EXTERNAL_DATA_BYTES = 1_500_000_000
ATTN_HINT = " Exporter paths differ per attention implementation: try --attn-implementation eager (or sdpa)."


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints step banners and many warnings; fastertrt shows its own
    progress instead. Errors still propagate."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_graph(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, hint: str = "") -> None:
    """Export `module(*args)` to `path` with the dynamo exporter."""
    import torch

    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=list(input_names),
                output_names=list(output_names),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            f"torch.onnx.export (dynamo) failed for {type(module).__name__}: {_summary(exc)}.{hint}"
        ) from exc
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)


def _summary(exc: Exception) -> str:
    """The exporter's own one-line cause, without its boilerplate and colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def dtype_name(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def io_specs(path: Path) -> tuple[list[dict], list[dict], int]:
    """(inputs, outputs, opset) of an ONNX file, each tensor as
    {'name', 'dtype', 'shape'} with dim names for dynamic dims."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(vi):
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in vi.type.tensor_type.shape.dim]
        return {"name": vi.name, "dtype": dtype_name(vi.type.tensor_type.elem_type), "shape": dims}

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output], opset


def graph_files(path: Path) -> list[Path]:
    """The graph file and any external-data files it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    extra = set()
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    extra.add(path.parent / entry.value)
    return [path, *sorted(extra)]
