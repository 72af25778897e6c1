"""Progress lines for long steps (export, parity, build, bench) on stderr."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    """`with progress.step("export"):` prints the step, then its time or failure."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, msg: str):
        start = time.perf_counter()
        if self.enabled:
            print(f"  {msg} ...", file=self.stream, flush=True)
        try:
            yield self
        except BaseException:
            if self.enabled:
                print(f"  {msg}: failed after {time.perf_counter() - start:.1f} s", file=self.stream, flush=True)
            raise
        if self.enabled:
            print(f"  {msg}: done in {time.perf_counter() - start:.1f} s", file=self.stream, flush=True)


def quiet() -> Progress:
    return Progress(enabled=False)
