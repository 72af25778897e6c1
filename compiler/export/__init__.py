"""Export stage: torch model -> ONNX graph(s) with dynamic batch/sequence/past,
checked against torch on ONNX Runtime."""

from fastertrt.compiler.export.decoder import export_decoder  # noqa: F401
from fastertrt.compiler.export.encoder import export_encoder  # noqa: F401
from fastertrt.compiler.export.module import export_module  # noqa: F401
