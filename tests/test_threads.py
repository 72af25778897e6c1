"""One model object shared by 8 threads, 20 calls each, with mixed inputs: every
call gives exactly what the same call gives single-threaded (README: Thread safety)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from tiny_models import WORDS

from fastertrt.runtime import load

THREADS, CALLS = 8, 20


def run_threaded(call, cases: list) -> list:
    """call(case) for every case from THREADS threads at once, each taking CALLS
    cases in turn (thread t starts at case t, so neighbours differ): results in
    case order."""
    assert len(cases) == THREADS * CALLS
    results: list = [None] * len(cases)
    start = threading.Barrier(THREADS)  # all threads in flight together, not one after another

    def worker(t: int) -> None:
        start.wait()
        for i in range(t, len(cases), THREADS):
            try:
                results[i] = call(cases[i])
            except Exception as exc:  # noqa: BLE001 - reported below as the call's result
                results[i] = exc

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that races show within a few calls
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} threaded calls failed, first: case {errors[0][0]}: {errors[0][1]!r}"
    return results


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def text(n: int, offset: int) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def test_encoder_from_threads(bundles):
    enc = load(bundles.tiny("bert"))  # max length 64
    # long texts truncated; short ones not: a call that tokenized under another
    # call's truncation setting fails (too long) or differs
    cases = [(text(70 + i % 9, i), True) if i % 2 else ([text(3 + i % 7, i), text(1 + i % 4, i + 1)], False)
             for i in range(THREADS * CALLS)]
    want = [enc.encode(t, truncate=tr) for t, tr in cases]
    got = run_threaded(lambda c: enc.encode(c[0], truncate=c[1]), cases)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_decoder_from_threads(bundles):
    dec = load(bundles.tiny("llama"))
    rng = np.random.default_rng(0)
    cases = []
    for i in range(THREADS * CALLS):
        prompts = [rng.integers(4, 99, size=int(rng.integers(2, 9))).tolist() for _ in range(1 + i % 3)]
        cases.append((prompts, {"max_new_tokens": 2 + i % 5, "num_beams": (1, 2, 3)[i % 3], "pad_token_id": 0}))
    want = [dec.generate(p, **kw) for p, kw in cases]
    got = run_threaded(lambda c: dec.generate(c[0], **c[1]), cases)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.sequences, w.sequences)
        np.testing.assert_array_equal(g.scores, w.scores)
        assert g.new_tokens == w.new_tokens and g.texts == w.texts


def test_generate_inside_on_token_is_refused(bundles):
    from fastertrt.errors import InputError

    dec = load(bundles.tiny("llama"))
    with pytest.raises(InputError, match="inside on_token"):
        dec.generate([[5, 6]], max_new_tokens=2, on_token=lambda step, t: dec.generate([[7]], max_new_tokens=1))
    assert dec.generate([[5, 6]], max_new_tokens=2).sequences.shape == (1, 4)  # the lock was let go


def test_module_runner_from_threads(tmp_path):
    import torch

    from fastertrt.compiler import compile_module

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    runner = load(compile_module(mlp, {"x": torch.randn(2, 3, 8)}, tmp_path / "mlp.bundle", output_names=["y"]))
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal((1 + i % 4, 1 + i % 7, 8)).astype(np.float32) for i in range(THREADS * CALLS)]
    want = [runner.run(x=x) for x in cases]
    got = run_threaded(lambda x: runner.run(x=x), cases)
    for g, w in zip(got, want):
        assert_same(g, w)
