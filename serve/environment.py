"""The Python environment Triton's Python backend runs the model in
(EXECUTION_ENV_PATH): a plain venv with the runtime's packages and numpy < 2.
tritonserver 2.51's backend stub misreads every input under numpy 2, silently
([1, 2.5, -3, 0] arrives as [1, 1, 1, 1]), so an environment is checked
before a repository points at it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fastertrt.errors import InputError

REQUIREMENTS = ["numpy>=1.26,<2", "onnxruntime>=1.20,<2", "tokenizers>=0.20,<1"]
GPU_REQUIREMENTS = ["cuda-python>=12.0,<14"]  # plus the engine's TensorRT, which its users pin themselves

_PROBE = ("import json, sys, numpy, onnxruntime, tokenizers; print(json.dumps({'python': '%d.%d' % "
          "sys.version_info[:2], 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__}))")


def make_env(path: Path, gpu: bool = False) -> dict:
    """Create the venv at `path` (new or empty) and install the runtime's packages
    (needs the package index). Anything else at `path` is refused, never changed."""
    import venv

    path = Path(path)
    _check_target(path)
    if path.is_dir() and any(path.iterdir()):
        try:
            return {**check_env(path), "reused": True}  # already made: running the setup again is harmless
        except InputError as exc:
            raise InputError(f"{path} exists and is not a serving environment ({exc}); pick a new folder or "
                             f"remove it") from exc
    venv.EnvBuilder(with_pip=True, clear=False).create(path)
    reqs = REQUIREMENTS + (GPU_REQUIREMENTS if gpu else [])
    run = subprocess.run([str(path / "bin" / "python3"), "-m", "pip", "install", "-q", *reqs],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise InputError(f"pip could not install {' '.join(reqs)} into {path}:\n{run.stderr[-2000:]}")
    return check_env(path)


def _check_target(path: Path) -> None:
    """A path serve-env may use: missing, an empty folder, or a venv (which is checked, not changed)."""
    fix = "give a new folder, e.g. fastertrt serve-env triton-env"
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        what = "a file" if path.is_file() else "not a folder (a broken link or a special file)"
        raise InputError(f"serve-env makes a folder and {path} is {what}; {fix}")
    if path.is_dir() and any(path.iterdir()) and not (path / "pyvenv.cfg").is_file():
        raise InputError(f"{path} is a folder with other content, not a Python venv (no pyvenv.cfg); {fix}")


def check_env(path: Path) -> dict:
    """{'python', 'numpy', 'onnxruntime'} of the environment, or a named error."""
    python = Path(path) / "bin" / "python3"
    fix = f"make one with: fastertrt serve-env {path}"
    if not python.exists():
        raise InputError(f"{path} is not a Python environment (no bin/python3); {fix}")
    run = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True)
    if run.returncode != 0:
        raise InputError(f"{path} lacks the runtime's packages ({run.stderr.strip().splitlines()[-1]}); "
                         f"install them: {python} -m pip install {' '.join(repr(r) for r in REQUIREMENTS)}")
    info = json.loads(run.stdout)
    if int(info["numpy"].split(".")[0]) >= 2:
        raise InputError(f"{path} has numpy {info['numpy']}; Triton's Python backend stub misreads inputs under "
                         f"numpy 2. Install numpy<2 there: {python} -m pip install 'numpy<2'")
    return info
