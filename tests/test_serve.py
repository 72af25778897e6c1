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
    # low caps, and a long enough queue delay that concurrent requests meet in one batch
    export_repository(bundles.tiny("llama"), repo.with_name("dec"), TritonOptions(
        name="tinyllama", env=env, max_batch=4, instances=1, max_new_tokens=8, max_beams=2, max_rows=4,
        max_queue_delay_us=100000))
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


def test_requests_beyond_the_caps_fail_alone_in_their_batch(server, bundles):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    import fastertrt

    cfg = (Path(server.repository) / "tinyllama" / "config.pbtxt").read_text()
    for key, value in (("FASTERTRT_MAX_NEW_TOKENS", 8), ("FASTERTRT_MAX_BEAMS", 2), ("FASTERTRT_MAX_ROWS", 4)):
        assert f'key: "{key}"\n  value: {{ string_value: "{value}" }}' in cfg
    prompt = [5, 9, 17, 33]
    want = fastertrt.load(bundles.tiny("llama")).generate([prompt], max_new_tokens=3)
    asks = [{"max_new_tokens": 3}, {"max_new_tokens": 3, "num_beams": 3}, {"max_new_tokens": 9},
            {"max_new_tokens": 3}]
    client = http.InferenceServerClient(server.http, concurrency=len(asks))
    inp = http.InferInput("input_ids", [1, len(prompt)], "INT64")
    inp.set_data_from_numpy(np.array([prompt], np.int64))
    before = server.model_stats("tinyllama")
    pending = [client.async_infer("tinyllama", [inp], parameters=p) for p in asks]  # one batch of 4 rows
    results = []
    for p in pending:
        try:
            results.append(p.get_result(timeout=60))
        except InferenceServerException as exc:
            results.append(exc)
    after = server.model_stats("tinyllama")
    assert after[1] - before[1] == 1, (before, after)  # all four in one execution
    for i in (0, 3):
        assert [int(t) for t in results[i].as_numpy("token_ids")[0]] == [int(t) for t in want.new_tokens[0]]
    assert isinstance(results[1], InferenceServerException) and isinstance(results[2], InferenceServerException)
    assert "num_beams 3 is above this model's cap of 2 (FASTERTRT_MAX_BEAMS" in str(results[1])
    assert "--max-beams" in str(results[1])
    assert "max_new_tokens 9 is above this model's cap of 8 (FASTERTRT_MAX_NEW_TOKENS" in str(results[2])
    # prompts x beams: 3 x 2 rows is over the cap of 4
    three = http.InferInput("input_ids", [3, len(prompt)], "INT64")
    three.set_data_from_numpy(np.array([prompt] * 3, np.int64))
    rows = r"3 prompt\(s\) x 2 beam\(s\) = 6 is above .*FASTERTRT_MAX_ROWS"
    with pytest.raises(InferenceServerException, match=rows):
        client.infer("tinyllama", [three], parameters={"num_beams": 2, "max_new_tokens": 2})


def _engine(graph: str, **dims) -> dict:
    return {"graph": graph, "file": f"engines/{graph}.engine", "backend": "tensorrt-rtx", "precision": "fp16",
            "profiles": [{"dims": {k: list(v) for k, v in dims.items()}, "inputs": {}}]}


DECODER = {"kind": "decoder", "model": {"max_length": 512}, "graphs": {"prefill": {}, "decode": {}},
           "engines": [_engine("prefill", batch=(1, 1, 4), beams=(1, 1, 4), rows=(1, 1, 16), seq=(1, 64, 128)),
                       _engine("decode", batch=(1, 1, 4), beams=(1, 1, 4), rows=(1, 1, 16), seq=(1, 1, 1),
                               past=(1, 128, 383), total=(2, 129, 384))]}


def test_caps_come_from_the_engines_profiles_and_max_batch_is_checked():
    from fastertrt.errors import InputError
    from fastertrt.serve.repository import TritonOptions, _check, caps

    gpu = TritonOptions(kind="gpu", max_batch=4)
    assert caps(DECODER, gpu) == {"FASTERTRT_MAX_INPUT_TOKENS": 128, "FASTERTRT_MAX_NEW_TOKENS": 383,
                                  "FASTERTRT_MAX_BEAMS": 4, "FASTERTRT_MAX_ROWS": 16}
    _check(gpu, DECODER)
    unasked = TritonOptions(kind="gpu")
    _check(unasked, DECODER)
    assert unasked.max_batch == 4  # not asked for: what the engines take, not the CPU default of 32
    with pytest.raises(InputError, match=r"--max-batch 8 is above the largest batch the bundle's engines take \(4"):
        _check(TritonOptions(kind="gpu", max_batch=8), DECODER)
    with pytest.raises(InputError, match="--max-beams 8 is above the 4 that the engines' optimization profiles take"):
        _check(TritonOptions(kind="gpu", max_batch=4, max_beams=8), DECODER)
    # ONNX Runtime has no profiles: documented defaults, bounded by the model's positions
    assert caps(DECODER, TritonOptions(max_batch=8)) == {
        "FASTERTRT_MAX_INPUT_TOKENS": 512, "FASTERTRT_MAX_NEW_TOKENS": 511, "FASTERTRT_MAX_BEAMS": 8,
        "FASTERTRT_MAX_ROWS": 32}
    assert caps(DECODER, TritonOptions(max_batch=40))["FASTERTRT_MAX_ROWS"] == 40  # a full greedy request fits
    assert caps(DECODER, TritonOptions(max_beams=32, max_new_tokens=100))["FASTERTRT_MAX_BEAMS"] == 32
    # an encoder whose full batch only fits the short profile takes rows of that length
    encoder = {"kind": "encoder", "model": {"max_length": 512}, "graphs": {"encoder": {}}, "engines": [
        _engine("encoder", batch=(1, 2, 4), seq=(1, 16, 256))]}
    encoder["engines"][0]["profiles"].append({"dims": {"batch": [8, 8, 16], "seq": [1, 8, 32]}, "inputs": {}})
    assert caps(encoder, TritonOptions(kind="gpu", max_batch=16)) == {"FASTERTRT_MAX_INPUT_TOKENS": 32}
    assert caps(encoder, TritonOptions(kind="gpu", max_batch=4)) == {"FASTERTRT_MAX_INPUT_TOKENS": 256}


def test_ports_given_are_kept_and_the_rest_are_free():
    import socket

    from fastertrt.serve.server import ServerError, free_ports, pick_ports

    port = free_ports(1)[0]
    ports = pick_ports([port, 0, 0])
    assert ports[0] == port and len(set(ports)) == 3
    assert pick_ports([0, 0, port])[2] == port
    with pytest.raises(ServerError, match="the ports must differ"):
        pick_ports([port, port, 0])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ServerError, match=f"--grpc-port {busy.getsockname()[1]}: the port is in use"):
            pick_ports([0, busy.getsockname()[1], 0])


@pytest.mark.parametrize("what", ["file", "folder"])
def test_serve_env_refuses_a_file_or_a_foreign_folder(tmp_path, capsys, what):
    target = tmp_path / "target"
    if what == "file":
        target.write_text("keep me")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    assert main(["serve-env", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastertrt serve-env: error: InputError: ") and err.count("\n") == 1, err
    assert ("is a file" if what == "file" else "not a Python venv") in err
    assert (target if what == "file" else target / "notes.txt").read_text() == "keep me"
    assert what == "file" or [p.name for p in target.iterdir()] == ["notes.txt"]
