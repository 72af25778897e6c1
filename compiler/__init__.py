"""The offline half of fastertrt: export, (later) rewrite, calibrate, build, bundle.

Needs the `compile` extra (torch, transformers, onnx, onnxscript).
"""

from fastertrt.compiler.pipeline import compile_model, compile_module  # noqa: F401
