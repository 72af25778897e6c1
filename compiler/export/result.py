"""What the export stage hands to the bundle stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastertrt.compiler.export.onnx_file import graph_files, io_specs
from fastertrt.compiler.export.parity import ParityReport


@dataclass
class ExportedGraph:
    name: str  # "encoder", "prefill", "decode", "module"
    path: Path
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    opset: int = 0
    files: list = field(default_factory=list)

    @classmethod
    def read(cls, name: str, path: Path) -> "ExportedGraph":
        inputs, outputs, opset = io_specs(path)
        return cls(name, path, inputs, outputs, opset, graph_files(path))


@dataclass
class ExportResult:
    kind: str  # "encoder", "decoder" or "module"
    graphs: list
    parity: ParityReport | None
    info: dict = field(default_factory=dict)  # layer counts, pooling, ...
    attn_implementation: str = ""
