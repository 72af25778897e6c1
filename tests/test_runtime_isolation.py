"""The runtime loads and runs a bundle in a process where torch, transformers
and onnxscript cannot be imported at all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

import fastertrt


BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnxscript', 'onnx'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_runtime_runs_without_torch(bundles):
    enc, dec = bundles.tiny("bert"), bundles.tiny("llama")
    out = _run(f"""
import numpy as np, fastertrt
e = fastertrt.load({str(enc)!r}).encode([[5, 6, 7], [8, 9]])
g = fastertrt.load({str(dec)!r}).generate([[5, 6, 7]], max_new_tokens=3)
heavy = [m for m in ('torch', 'transformers', 'onnxscript', 'onnx') if m in sys.modules]
print(e['last_hidden_state'].shape, g.sequences.shape, heavy)
np.save({str(enc.parent / 'iso.npy')!r}, e['last_hidden_state'])
""")
    assert out.strip() == "(2, 3, 32) (1, 6) []"
    # same numbers as in this (torch-carrying) process
    from fastertrt.runtime import load

    here = load(enc).encode([[5, 6, 7], [8, 9]])["last_hidden_state"]
    np.testing.assert_array_equal(np.load(enc.parent / "iso.npy"), here)


def test_runtime_sources_import_nothing_heavy():
    import fastertrt.bundle
    import fastertrt.runtime as rt

    heavy = {"torch", "transformers", "onnxscript", "onnx"}
    sources = [*Path(rt.__file__).parent.glob("*.py"), *Path(fastertrt.bundle.__file__).parent.glob("*.py"),
               Path(fastertrt.bundle.__file__).parent.parent / "signals.py"]
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in heavy, f"{path.name} imports {n}"
                if n.startswith("fastertrt."):
                    # plugins: the registry of TensorRT creators (trt.py modules, no torch/onnxscript);
                    # bundle: the manifest schema, paths, lock and signatures (the ground floor)
                    allowed = ("runtime", "errors", "tolerances", "plugins", "bundle", "signals")
                    assert n.split(".")[1] in allowed, f"{path.name} imports {n}"
