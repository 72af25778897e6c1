"""One writer per bundle: `fastertrt build`, `calibrate`, `compile --force` and
`export-triton --force` take an exclusive lock on OUTPUT's lock file
(`.NAME.lock` beside it: the bundle folder itself is swapped whole).

The lock is an flock, so the kernel frees it when its holder dies; the file also
holds the holder's pid and command, so a second writer is told who holds it, and
a lock file left by a dead pid is reported as taken over."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import sys
import time
from pathlib import Path

from fastertrt.errors import BundleLockedError


def lock_path(target) -> Path:
    target = Path(target).resolve()
    return target.with_name(f".{target.name}.lock")


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class BundleLock:
    """`with BundleLock(path, wait=False):` holds the exclusive writer lock of `path`."""

    def __init__(self, target, wait: bool = False, timeout: float | None = None, what: str = "fastertrt",
                 poll: float = 0.2):
        self.target, self.path = Path(target).resolve(), lock_path(target)
        self.wait, self.timeout, self.what, self.poll = wait, timeout, what, poll
        self.fd: int | None = None

    def acquire(self) -> BundleLock:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        said = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:  # ELOOP: a symlink planted at the lock's name must not be written through
                raise BundleLockedError(f"cannot use the lock file {self.path} ({exc.strerror}): it must be a plain "
                                        f"file fastertrt creates; remove it if no fastertrt run is writing "
                                        f"{self.target}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise BundleLockedError(f"{self.path} is not a plain file; remove it if no fastertrt run is writing "
                                        f"{self.target}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _holder(fd)
                os.close(fd)
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    raise BundleLockedError(
                        f"{self.target} is being written by pid {info.get('pid', '?')} ({info.get('command', '?')}, "
                        f"since {info.get('since', '?')}); wait for it to finish, or pass --wait "
                        f"(Python: wait=True) to queue behind it") from None
                if not said:
                    print(f"fastertrt: waiting for pid {info.get('pid', '?')} ({info.get('command', '?')}) to "
                          f"finish writing {self.target}", file=sys.stderr, flush=True)
                    said = True
                time.sleep(self.poll)
                continue
            # the holder before us may have removed the file while we waited for it: lock the file
            # that is at the path now, or two writers would hold two different inodes
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = _holder(fd)
            if stale.get("pid") and not pid_alive(stale["pid"]):
                print(f"fastertrt: took over the lock of {self.target} left by pid {stale['pid']} "
                      f"({stale.get('command', '?')}), which is no longer running", file=sys.stderr, flush=True)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": self.what,
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:  # only the file we locked
                os.unlink(self.path)  # while still holding it: a waiter then re-checks the inode (above)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> BundleLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
