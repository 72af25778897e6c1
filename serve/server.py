"""A local tritonserver: the binary and Python backend that the nvidia-pytriton
wheel ships (`pip install --no-deps nvidia-pytriton==0.7.0`), started on
loopback ports, waited on until ready, stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fastertrt.errors import FastertrtError, MissingDependencyError


class ServerError(FastertrtError):
    """tritonserver did not start, or stopped."""


def triton_home() -> Path:
    """The folder with bin/tritonserver, backends/ and python_backend_stubs/."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    home = Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None
    if home is None or not (home / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(
            "fastertrt serve runs the tritonserver binary that the nvidia-pytriton wheel ships; install it "
            "without its dependencies: pip install --no-deps nvidia-pytriton==0.7.0")
    return home


def _libs(home: Path) -> list[str]:
    """Folders the binary and the stub load shared libraries from."""
    site = home.parent.parent
    folders = [str(p) for p in site.glob("nvidia_pytriton.libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        folders.append(libdir)  # libpython for the backend stub
    return folders


def backend_directory(home: Path, python: str, workdir: Path) -> Path:
    """backends/python with the stub for `python` ("3.11") named as the backend
    expects; the wheel keeps one stub per Python version."""
    stub = home / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (home / "python_backend_stubs").iterdir())
        raise ServerError(f"the Triton python backend has stubs for Python {', '.join(have)}, not {python}")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in (home / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return workdir / "backends"


def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class TritonServer:
    """`with TritonServer(repo) as server:` serves `repo` on loopback until the block ends."""

    repository: Path
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    ports: list[int] = field(default_factory=list)  # http, grpc, metrics
    log: Path | None = None
    process: subprocess.Popen | None = None
    _workdir: Path | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    @property
    def metrics(self) -> str:
        return f"127.0.0.1:{self.ports[2]}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 120.0) -> TritonServer:
        home = triton_home()
        self._workdir = Path(tempfile.mkdtemp(prefix="fastertrt-triton-"))
        backends = backend_directory(home, self.python, self._workdir)
        self.ports = self.ports or free_ports(3)
        self.log = self.log or self._workdir / "tritonserver.log"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(_libs(home) + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
        cmd = [str(home / "bin" / "tritonserver"), f"--model-repository={Path(self.repository).resolve()}",
               f"--backend-directory={backends}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
               "--metrics-address=127.0.0.1", f"--http-port={self.ports[0]}", f"--grpc-port={self.ports[1]}",
               f"--metrics-port={self.ports[2]}", "--allow-metrics=true", "--exit-on-error=true",
               "--strict-readiness=true", "--log-verbose=0"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting; "
                                  f"its log ({self.log}) ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; its log ends:\n{self.log_tail()}")

    def model_stats(self, model: str) -> tuple[int, int]:
        """(inferences, executions) the server counted for `model`: fewer executions
        than inferences means the dynamic batcher put requests together."""
        import json

        with urllib.request.urlopen(f"http://{self.http}/v2/models/{model}/stats") as r:
            stats = json.loads(r.read())["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None:
            return "(no log)"
        try:
            return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; the temporary backend folder goes too."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
