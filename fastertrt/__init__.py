"""fastertrt: compile PyTorch transformers into TensorRT engines and run them thinly.

Importing this package is cheap: the compiler (torch, transformers) and the
runtime backends load only when used.
"""

__version__ = "0.1.0"


def load(bundle, **kwargs):
    """Load a compiled bundle; see fastertrt.runtime.load."""
    from fastertrt.runtime import load as _load

    return _load(bundle, **kwargs)
