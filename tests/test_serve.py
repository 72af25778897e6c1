"""export-triton and a real tritonserver (the nvidia-pytriton wheel's binary) on
loopback, queried with tritonclient over HTTP and gRPC: outputs equal the
runtime's own, 200+ concurrent requests are answered and batched, bad requests
get clear errors while the server keeps serving. The server is stopped by its
PID when the module's tests end."""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fastertrt.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _serve_env() -> Path:
    """The numpy<2 environment README command 2 makes (fastertrt serve-env .serve-env)."""
    path = Path(os.environ.get("FASTERTRT_SERVE_ENV", ROOT / ".serve-env"))
    if not (path / "bin" / "python3").exists():
        pytest.fail(f"no serving environment at {path}: make it with `fastertrt serve-env {path}` "
                    f"(README command 2 does), or point FASTERTRT_SERVE_ENV at one")
    return path


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    from fastertrt.serve.repository import TritonOptions, export_repository
    from fastertrt.serve.server import TritonServer

    env = _serve_env()
    repo = tmp_path_factory.mktemp("triton") / "models"
    opts = TritonOptions(name="minilm", env=env, max_batch=16, instances=1, threads=1, max_queue_delay_us=20000)
    info = export_repository(bundles.shipped("minilm"), repo, opts)
    # a second model in the same repository: the tiny decoder
    export_repository(bundles.tiny("llama"), repo.with_name("dec"), TritonOptions(name="tinyllama", env=env,
                                                                                   max_batch=4, instances=1))
    for model in ("tinyllama", "tinyllama_stream"):
        (repo / model).symlink_to(repo.with_name("dec") / model, target_is_directory=True)
    srv = TritonServer(repo, python=info["python"])
    srv.start()
    yield srv
    pid = srv.pid
    srv.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture(scope="module")
def local(bundles):
    import fastertrt

    return fastertrt.load(bundles.shipped("minilm"), backend="onnxruntime", threads=1)


def _text_input(module, texts):
    arr = np.array([[t.encode()] for t in texts], dtype=object)
    inp = module.InferInput("TEXT", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


TEXTS = ["TensorRT makes transformers fast.", "hello", "A longer sentence about serving embeddings at scale."]


def test_config_from_the_manifest(server):
    cfg = (Path(server.repository) / "minilm" / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "max_batch_size: 16" in cfg and "preferred_batch_size: [ 4, 8, 16 ]" in cfg
    assert 'name: "sentence_embedding"' in cfg and "dims: [ 384 ]" in cfg and "dims: [ -1, 384 ]" in cfg
    assert "EXECUTION_ENV_PATH" in cfg and "KIND_CPU" in cfg
    assert (Path(server.repository) / "minilm" / "1" / "lib" / "fastertrt" / "runtime" / "models.py").is_file()


def test_outputs_equal_the_runtime_over_http_and_grpc(server, local):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    want = local.encode(TEXTS)
    for module, url in ((http, server.http), (grpc, server.grpc)):
        client = module.InferenceServerClient(url)
        res = client.infer("minilm", [_text_input(module, TEXTS)])
        np.testing.assert_allclose(res.as_numpy("sentence_embedding"), want["sentence_embedding"], atol=1e-5)
        hidden = res.as_numpy("last_hidden_state")
        valid = want["attention_mask"] > 0
        np.testing.assert_allclose(hidden[valid], want["last_hidden_state"][valid], atol=1e-4)
    # token ids in, too
    ids = local.tokenizer.encode(["hello"])
    inp = http.InferInput("input_ids", [1, len(ids[0])], "INT64")
    inp.set_data_from_numpy(np.array(ids, dtype=np.int64))
    res = http.InferenceServerClient(server.http).infer("minilm", [inp])
    np.testing.assert_allclose(res.as_numpy("sentence_embedding")[0], want["sentence_embedding"][1], atol=1e-5)


def test_concurrent_requests_are_answered_and_batched(server, local):
    import tritonclient.http as http

    words = "the model runs fast on every token of the text".split()
    texts = [" ".join(words[: 2 + i % 9]) + f" {i}" for i in range(240)]
    want = local.encode(texts)["sentence_embedding"]
    before = server.model_stats("minilm")
    local_clients = threading.local()  # one client per thread: tritonclient's HTTP client is not thread-safe

    def one(i):
        if not hasattr(local_clients, "client"):
            local_clients.client = http.InferenceServerClient(server.http)
        result = local_clients.client.infer("minilm", [_text_input(http, [texts[i]])], timeout=120)
        return i, result.as_numpy("sentence_embedding")[0]

    with ThreadPoolExecutor(max_workers=32) as pool:
        got = dict(pool.map(one, range(len(texts))))
    assert len(got) == 240
    worst = max(float(np.abs(got[i] - want[i]).max()) for i in range(240))
    assert worst < 1e-5, worst
    after = server.model_stats("minilm")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 240 and executions < inferences / 2, (inferences, executions)  # batched together


@pytest.mark.parametrize("case", ["wrong dtype", "wrong shape", "empty text", "too many tokens", "unknown parameter",
                                  "both inputs"])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, case):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(server.http)
    params = None
    if case == "wrong dtype":
        inputs = [http.InferInput("input_ids", [1, 3], "FP32")]
        inputs[0].set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], np.float32))
        expect = "data-type is .FP32., but model .minilm. expects .INT64."
    elif case == "wrong shape":
        inputs = [http.InferInput("TEXT", [1, 2], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
        expect = "shape"
    elif case == "empty text":
        inputs, expect = [_text_input(http, ["  "])], "empty string"
    elif case == "too many tokens":
        inputs, expect = [_text_input(http, ["word " * 400])], "at most 256"
    elif case == "unknown parameter":
        inputs, params, expect = [_text_input(http, ["hello"])], {"temperature": 0.7}, "unknown parameter"
    else:
        ids = http.InferInput("input_ids", [1, 2], "INT64")
        ids.set_data_from_numpy(np.array([[101, 102]], np.int64))
        inputs, expect = [_text_input(http, ["hello"]), ids], "exactly one of TEXT"
    with pytest.raises(InferenceServerException, match=expect):
        client.infer("minilm", inputs, parameters=params)
    assert client.infer("minilm", [_text_input(http, ["still serving"])]).as_numpy("sentence_embedding").shape == (1, 384)


@pytest.mark.parametrize("beams", [1, 2])
def test_decoder_generates_like_the_runtime(server, bundles, beams):
    import tritonclient.grpc as grpc

    import fastertrt

    prompt = [5, 9, 17, 33]
    want = fastertrt.load(bundles.tiny("llama")).generate([prompt], max_new_tokens=6, num_beams=beams)
    client = grpc.InferenceServerClient(server.grpc)
    inp = grpc.InferInput("input_ids", [1, len(prompt)], "INT64")
    inp.set_data_from_numpy(np.array([prompt], np.int64))
    res = client.infer("tinyllama", [inp], parameters={"max_new_tokens": 6, "num_beams": beams})
    got = [int(t) for t in res.as_numpy("token_ids")[0] if t >= 0]
    assert got == [int(t) for t in want.new_tokens[0]]
    np.testing.assert_allclose(res.as_numpy("scores")[0, 0], want.scores[0], atol=1e-5)
    with pytest.raises(Exception, match="num_beams"):
        client.infer("tinyllama", [inp], parameters={"num_beams": 0})


def test_decoder_streams_greedy_tokens_in_decoupled_mode(server, bundles):
    import queue

    import tritonclient.grpc as grpc

    import fastertrt

    prompt = [7, 21, 3, 44, 9]
    want = fastertrt.load(bundles.tiny("llama")).generate([prompt], max_new_tokens=5, min_new_tokens=5)
    cfg = (Path(server.repository) / "tinyllama_stream" / "config.pbtxt").read_text()
    assert "decoupled: true" in cfg and "max_batch_size: 0" in cfg
    got: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        inp = grpc.InferInput("input_ids", [len(prompt)], "INT64")
        inp.set_data_from_numpy(np.array(prompt, np.int64))
        client.async_stream_infer("tinyllama_stream", [inp], parameters={"max_new_tokens": 5, "min_new_tokens": 5},
                                  enable_empty_final_response=True)
        tokens = []
        while True:
            result, error = got.get(timeout=60)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("token_ids") is not None:
                tokens.append(int(result.as_numpy("token_ids")[0]))
            if final:
                break
        assert tokens == [int(t) for t in want.new_tokens[0]] and len(tokens) == 5
        # a bad request ends its stream with an error
        client.async_stream_infer("tinyllama_stream", [inp], parameters={"num_beams": 2})
        result, error = got.get(timeout=60)
        assert error is not None and "unknown parameter" in str(error)
    finally:
        client.stop_stream()


def test_export_errors(bundles, tmp_path, capsys):
    bundle = str(bundles.tiny("bert"))
    assert main(["export-triton", bundle, "-o", str(tmp_path / "r"), "--kind", "gpu"]) == 2
    assert "has none; build them" in capsys.readouterr().err
    numpy2 = Path(sys.prefix)  # the tests' own environment, with numpy 2
    assert main(["export-triton", bundle, "-o", str(tmp_path / "r"), "--env", str(numpy2)]) == 2
    assert "misreads inputs under numpy 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_triton_writes_side_by_side_rows(bundles, tmp_path):
    """The bench's plumbing (its numbers come from `fastertrt bench --triton`, not from this test)."""
    from fastertrt.tools.bench_triton import run_triton_bench

    out = tmp_path / "bench.json"
    result = run_triton_bench(bundles.tiny("bert"), _serve_env(), concurrencies=(1, 4), requests=24, threads=1,
                              output=out)
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"] and len(rows) == 4
    assert {r["backend"] for r in rows} == {"in-process runtime", "tritonserver (python backend)"}
    for r in rows:
        assert r["requests"] == 24 and r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    served = [r for r in rows if "executions" in r]
    assert all(1 <= r["executions"] <= 24 for r in served)
