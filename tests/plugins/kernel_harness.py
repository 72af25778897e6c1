"""What the plugin kernel tests (test_attention_kernels.py, test_beam_kernels.py)
share: the child process that runs the interpreted cases, input rounding, the
checks every ahead-of-time cubin must pass, and the checks of what the kernel
and launcher modules import.

Triton's interpreter needs TRITON_INTERPRET=1 before triton is imported, and
triton.compile fails once it is set, so a test file runs its interpreted cases
in one child process (the test file run as a script: child_main()) and its tests
compare the arrays that child saved. Not named test_*: pytest must not collect it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


# -----------------------------------------------------------------------------
# Interpreted cases (child process)
# -----------------------------------------------------------------------------
def interpreted_fixture(test_file: str, cases, label: str):
    """A module-scoped `interpreted` fixture: runs `test_file` as a script (its
    child_main) in a child process with TRITON_INTERPRET=1 and gives the
    {key: array} that child saved for `cases`."""

    @pytest.fixture(scope="module")
    def interpreted(tmp_path_factory) -> dict[str, np.ndarray]:
        out = tmp_path_factory.mktemp(label) / "out.npz"
        env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="0")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, test_file, str(out)], env=env, capture_output=True, text=True,
                              timeout=600, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr[-4000:]
        print(f"interpreted {len(cases)} cases in {time.perf_counter() - start:.1f} s")
        with np.load(out) as data:
            return {name: data[name] for name in data.files}

    return interpreted


def child_main(cases, interpret) -> None:
    """A test file's script entry, in the child process: interpret(case) gives
    {key: array} for one case; all of them go to the path the fixture passed."""
    results = {}
    for case in cases:
        results.update(interpret(case))
    np.savez(sys.argv[1], **results)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array with the values `dtype` can hold (round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


# -----------------------------------------------------------------------------
# Ahead-of-time cubins (no GPU)
# -----------------------------------------------------------------------------
def shared_limit(cc: int) -> int:
    """Shared memory a block may use on sm_cc, in bytes: written out here rather than
    taken from the kernels modules, so a wrong table there fails the tests."""
    return {75: 64, 80: 163, 86: 99, 89: 99, 90: 227, 120: 99}[cc] * 1024


def check_cubin(kernel, cc: int) -> None:
    """What every compiled kernel must be: an ELF cubin for sm_cc holding the symbol
    the launcher looks up, launchable with its block size and shared memory."""
    assert kernel.cubin[:4] == b"\x7fELF" and len(kernel.cubin) > 1000
    assert kernel.cc == cc and kernel.num_warps * 32 == kernel.block_threads
    assert kernel.name.encode() in kernel.cubin
    assert 0 <= kernel.shared <= shared_limit(cc), (kernel.tags.get("variant"), cc, kernel.shared)


def fake_kernel(**over):
    """A CompiledKernel with a stand-in cubin, for the launcher checks that run before
    any driver call."""
    from fastertrt.plugins.cuda_launch import CompiledKernel

    fields = dict(name="k", cubin=b"\x7fELF" + bytes(60), cc=86, num_warps=4, shared=1024, block_m=64, block_n=64,
                  global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0, profile_scratch_align=1,
                  args=(), tags={})
    fields.update(over)
    return CompiledKernel(**fields)


# -----------------------------------------------------------------------------
# Imports
# -----------------------------------------------------------------------------
def assert_imports_none_of(path: Path, heavy: set[str]) -> None:
    """`path` (a module the TensorRT plugin's enqueue runs) imports no top-level
    package in `heavy`, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for n in names:
            assert n.split(".")[0] not in heavy, f"{path.name} imports {n}"


def run_without_triton(code: str) -> str:
    """stdout of `code` run in a fresh interpreter where importing triton or torch
    fails: the kernels modules must import (and name their variants) without them."""
    block = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('triton', 'torch'):\n"
             "            raise ImportError('blocked: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n")
    proc = subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def skip_unless_no_driver() -> None:
    """The no-driver error tests need cuda.bindings and a machine without a GPU."""
    from fastertrt.runtime.gpu import gpu_compute_capability

    if gpu_compute_capability() is not None:
        pytest.skip("this machine has a GPU")
    pytest.importorskip("cuda.bindings")
