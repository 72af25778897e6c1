"""`fastertrt serve` and `bench --triton` as real processes with a real
tritonserver on loopback: no way out of them leaves the server running. Each
test runs the CLI in a subprocess, signals it, and checks that the server's pid
is gone, its log is kept, its record and temporary folders are removed."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from test_serve import _serve_env

CLI = [sys.executable, "-m", "fastertrt.tools.cli"]


@pytest.fixture
def bundle(bundles, tmp_path):
    """The tiny BERT bundle, linked into this test's folder (the default log lands next to it)."""
    return Path(shutil.copytree(bundles.tiny("bert"), tmp_path / "bert.bundle", copy_function=os.link))


@pytest.fixture
def env(tmp_path):
    """The CLI's environment: its own state folder (pid records) and TMPDIR, to check what is left."""
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "FASTERTRT_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp_path / "tmp")}


class Lines:
    """A subprocess's stdout, read line by line in a thread."""

    def __init__(self, proc):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s; stdout: {''.join(self.seen)}")


def _start(args, env):
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _record(env, timeout: float = 60) -> dict:
    """The pid record that start() writes as soon as tritonserver runs."""
    folder = Path(env["FASTERTRT_STATE_DIR"]) / "tritonserver"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob("*.json"):
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # being written
        time.sleep(0.05)
    raise AssertionError(f"no tritonserver record in {folder} within {timeout} s")


def _group(pgid: int) -> list[int]:
    """Live processes of the server's process group (itself and its Python-backend stubs)."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _assert_gone(pid: int, timeout: float = 30, group: bool = True) -> None:
    """The server and (group) every stub it started are gone: they share its process group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (_group(pid) if group else [p for p in _group(pid) if p == pid]):
            return
        time.sleep(0.1)
    left = _group(pid)
    for other in left:
        os.kill(other, signal.SIGKILL)  # do not leave them to the next test
    raise AssertionError(f"tritonserver pid {pid} or its stubs ({left}) still run {timeout} s after fastertrt ended")


def _assert_cleaned(env, log: Path) -> None:
    assert log.is_file()  # kept after the server stopped
    assert not list((Path(env["FASTERTRT_STATE_DIR"]) / "tritonserver").glob("*.json"))
    assert not list(Path(env["TMPDIR"]).glob("fastertrt-*"))  # temporary repository and backend folder removed


def test_serve_honours_one_port_names_the_running_server_and_stops_on_sigterm(bundle, env):
    from fastertrt.serve.server import free_ports

    port = free_ports(1)[0]
    args = ["serve", str(bundle), "--env", str(_serve_env()), "--instances", "1"]
    proc = _start(args + ["--http-port", str(port)], env)
    try:
        line = Lines(proc).wait_for("tritonserver (pid", timeout=120)
        pid = int(line.split("pid ")[1].split(")")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
            assert r.status == 200  # --http-port alone is honoured; gRPC and metrics got free ports
        second = subprocess.run(CLI + args, check=False, capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"a tritonserver (pid {pid})" in second.stderr and f"kill {pid}" in second.stderr
        assert f"http {port}" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    _assert_gone(pid)
    log = bundle.with_name("bert.bundle.tritonserver.log")  # the default: next to the bundle
    _assert_cleaned(env, log)
    assert "Started HTTPService at 127.0.0.1:" + str(port) in log.read_text(errors="replace")


@pytest.mark.parametrize("command,sig", [("serve", signal.SIGINT), ("serve", signal.SIGHUP),
                                         ("bench", signal.SIGTERM)])
def test_a_signal_while_the_server_starts_stops_it(bundle, env, tmp_path, command, sig):
    if command == "serve":
        args = ["serve", str(bundle), "--env", str(_serve_env()), "--instances", "1", "--log", str(tmp_path / "s.log")]
        log = tmp_path / "s.log"
    else:
        args = ["bench", str(bundle), "--triton", "--env", str(_serve_env()), "--threads", "1"]
        log = bundle.with_name("bert.bundle.bench-triton.log")
    proc = _start(args, env)
    try:
        pid = _record(env)["pid"]  # tritonserver runs; fastertrt waits for it to be ready
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig, proc.stderr.read()
    finally:
        proc.kill()
    _assert_gone(pid)
    _assert_cleaned(env, log)


def test_a_killed_serve_takes_its_server_along_and_leaves_a_stale_record(bundle, env, monkeypatch):
    from fastertrt.serve.server import running_servers

    proc = _start(["serve", str(bundle), "--env", str(_serve_env()), "--instances", "1"], env)
    try:
        pid = _record(env)["pid"]
        proc.send_signal(signal.SIGKILL)  # no handler runs: the kernel's parent-death signal stops the server
        proc.wait(timeout=30)
    finally:
        proc.kill()
    _assert_gone(pid, group=False)
    monkeypatch.setenv("FASTERTRT_STATE_DIR", env["FASTERTRT_STATE_DIR"])
    # the next look at the records drops the dead server's, and kills the Python-backend stubs a server
    # stopped while it started leaves behind (nothing of fastertrt's ran to stop them)
    assert running_servers(bundle) == []
    _assert_gone(pid)
    assert not list((Path(env["FASTERTRT_STATE_DIR"]) / "tritonserver").glob("*.json"))
