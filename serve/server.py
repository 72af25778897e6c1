"""A local tritonserver: the binary and Python backend that the nvidia-pytriton
wheel ships (`pip install --no-deps nvidia-pytriton==0.7.0`), started on
loopback ports, waited on until ready, stopped by its PID.

tritonserver runs in its own session (so stopping its process group also stops
the Python backend's stubs), which means no terminal signal reaches it: every
way out of the process that started it must stop it. start() stops it when
waiting is interrupted; while one runs, SIGTERM and SIGHUP raise `fastertrt.signals.Terminated`
in the main thread so `with` blocks and `finally` clauses run; an atexit hook
catches the rest, and on Linux the server gets SIGTERM when its parent dies
even by SIGKILL. Each running server is recorded (pid, ports, source, log) in
a per-user state folder, so a later `fastertrt serve` of the same source can
name the one still running."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fastertrt.bundle.lock import pid_alive
from fastertrt.errors import FastertrtError, MissingDependencyError
from fastertrt.signals import hold_signals, release_signals


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


# --- ports ----------------------------------------------------------------------
PORT_NAMES = ("--http-port", "--grpc-port", "--metrics-port")


def free_ports(count: int, exclude=()) -> list[int]:
    """`count` distinct loopback ports free now, none of them in `exclude`."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)  # held open until all are picked, so none repeats
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is still usable
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pick_ports(given) -> list[int]:
    """http, grpc, metrics: each port given (non-zero) as is, a free one for the rest."""
    given = [int(p or 0) for p in given] + [0] * (3 - len(given))
    chosen = [p for p in given if p]
    if len(set(chosen)) < len(chosen):
        raise ServerError(f"{', '.join(f'{n} {p}' for n, p in zip(PORT_NAMES, given) if p)}: the ports must "
                          f"differ; give different ones or leave some out to get free ones")
    for name, port in zip(PORT_NAMES, given):
        if port and _in_use(port):
            raise ServerError(f"{name} {port}: the port is in use on 127.0.0.1; pick another, or leave "
                              f"{name} out for a free one")
    free = iter(free_ports(given.count(0), exclude=set(chosen)))
    return [p or next(free) for p in given]


# --- records of running servers ---------------------------------------------------
def state_dir() -> Path:
    """Where running servers are recorded: $FASTERTRT_STATE_DIR, else
    $XDG_STATE_HOME/fastertrt (default ~/.local/state/fastertrt)."""
    if os.environ.get("FASTERTRT_STATE_DIR"):
        return Path(os.environ["FASTERTRT_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "fastertrt"


def _record_path(pid: int) -> Path:
    return state_dir() / "tritonserver" / f"{pid}.json"


def _is_tritonserver(pid: int) -> bool:
    """A live process whose program is tritonserver (a dead pid, a zombie or a
    reused pid is not)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.endswith(b"tritonserver")


def running_servers(source: Path) -> list[dict]:
    """Records of tritonservers still running for `source`; records of dead ones are removed."""
    source = Path(source).resolve()
    live = []
    for path in sorted((state_dir() / "tritonserver").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            alive = _is_tritonserver(int(rec["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            rec, alive = None, False
        if not alive:
            if rec is not None:
                _kill_orphan_stubs(rec.get("pid"))
            path.unlink(missing_ok=True)
        elif Path(rec["source"]) == source:
            live.append(rec)
    return live


def _kill_orphan_stubs(pgid) -> None:
    """Python-backend stubs left in a dead server's process group: a server stopped
    while it started its models (by a parent-death signal, say) leaves them waiting
    for it. Only processes of that group that are Triton stubs are killed."""
    if not isinstance(pgid, int) or pgid <= 1 or not Path("/proc").is_dir():
        return
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            pid = int(proc.name)
            stub = b"triton_python_backend_stub" in (proc / "cmdline").read_bytes().split(b"\0")[0]
            if stub and os.getpgid(pid) == pgid:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue


def check_not_running(source: Path) -> None:
    """ServerError naming a tritonserver that an earlier `fastertrt serve` of
    `source` left running (or that still serves it from another terminal)."""
    for rec in running_servers(source):
        owner = rec.get("owner")
        by = f"fastertrt pid {owner}, still running" if pid_alive(owner) else f"fastertrt pid {owner}, gone"
        http, grpc, metrics = rec["ports"]
        raise ServerError(f"a tritonserver (pid {rec['pid']}) from an earlier fastertrt serve ({by}) still serves "
                          f"{Path(source).resolve()} on ports http {http}, grpc {grpc}, metrics {metrics}; "
                          f"stop it with: kill {rec['pid']}")


def default_log(source: Path) -> Path:
    """The server log next to what is served, kept after the server stops."""
    source = Path(source).resolve()
    return source.parent / f"{source.name}.tritonserver.log"


# --- signals --------------------------------------------------------------------
def _child_setup(mask):
    """preexec_fn: the signal mask the parent had before holding signals for the
    fork, and on Linux SIGTERM when the thread that started the server dies, which
    also covers a SIGKILL of this process that no handler sees. The latter only
    from the main thread: a worker thread's exit would stop the server."""
    prctl = None
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def setup():
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG

    return setup


_LIVE: dict[int, "TritonServer"] = {}


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE.values()):
        server.stop()


@dataclass(eq=False)
class TritonServer:
    """`with TritonServer(repo) as server:` serves `repo` on loopback until the block ends."""

    repository: Path
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    ports: list[int] = field(default_factory=list)  # http, grpc, metrics; 0 or missing: a free one
    log: Path | None = None      # default: next to `source`, kept after stop()
    source: Path | None = None   # what is served (a bundle or the repository), for the record
    process: subprocess.Popen | None = None
    _workdir: Path | None = None
    _holding: bool = False

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
        self.source = Path(self.source or self.repository).resolve()
        check_not_running(self.source)
        self.ports = pick_ports(self.ports)
        self.log = Path(self.log) if self.log else default_log(self.source)
        hold_signals()
        self._holding = True
        _LIVE[id(self)] = self
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix="fastertrt-triton-"))
            self._spawn(home, backend_directory(home, self.python, self._workdir))
            self.wait_ready(timeout)
        except BaseException:  # Ctrl-C, SIGTERM or a failure while it starts: never leave it running
            self.stop()
            raise
        return self

    def _spawn(self, home: Path, backends: Path) -> None:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(_libs(home) + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
        cmd = [str(home / "bin" / "tritonserver"), f"--model-repository={Path(self.repository).resolve()}",
               f"--backend-directory={backends}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
               "--metrics-address=127.0.0.1", f"--http-port={self.ports[0]}", f"--grpc-port={self.ports[1]}",
               f"--metrics-port={self.ports[2]}", "--allow-metrics=true", "--exit-on-error=true",
               "--strict-readiness=true", "--log-verbose=0"]
        try:
            log = open(self.log, "wb")
        except OSError as exc:
            raise ServerError(f"cannot write the tritonserver log {self.log} ({exc.strerror}); name a writable "
                              f"file with --log FILE") from exc
        # A signal that raised between the fork and Popen returning would lose the
        # pid, so they wait until self.process is set; the child gets the old mask.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            with log:
                self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, preexec_fn=_child_setup(mask))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._write_record()

    def _write_record(self) -> None:
        path = _record_path(self.pid)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"pid": self.pid, "owner": os.getpid(), "source": str(self.source),
                                        "repository": str(Path(self.repository).resolve()), "ports": self.ports,
                                        "log": str(self.log), "started": time.time()}))
        except OSError as exc:  # serving matters more than the record
            print(f"fastertrt: could not record tritonserver pid {self.pid} in {path}: {exc}", file=sys.stderr)

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
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; its log ({self.log}) ends:\n"
                          f"{self.log_tail()}")

    def model_stats(self, model: str) -> tuple[int, int]:
        """(inferences, executions) the server counted for `model`: fewer executions
        than inferences means the dynamic batcher put requests together."""
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
        """SIGTERM, then SIGKILL after `timeout` (or at once when a second signal
        interrupts the wait); the temporary backend folder and the record go, the log stays."""
        try:
            if self.process is not None and self.process.poll() is None:
                self._kill(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill(signal.SIGKILL)
                    self.process.wait()
                except BaseException:  # a second Ctrl-C while it shuts down: no more patience
                    self._kill(signal.SIGKILL)
                    raise
            if self.process is not None:
                # a server stopped while it started its models leaves their Python-backend stubs behind
                # (they wait for it, not for signals); they are still in its process group
                self._kill(signal.SIGKILL)
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            if self.process is not None:
                _record_path(self.pid).unlink(missing_ok=True)
            _LIVE.pop(id(self), None)
            if self._holding:
                self._holding = False
                release_signals()

    def _kill(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
