"""Run one engine on standard TensorRT or TensorRT-RTX with cuda-python.

Same `run(feeds) -> {name: array}` interface as the ONNX Runtime backend. All
checks that need no GPU (backend, version, targets, plugins, shapes) happen
before the first CUDA call. Device buffers and pinned host buffers are made
once per shape bucket and reused; one stream per graph; optionally one CUDA
graph per bucket, replayed instead of enqueueing again.

Thread safety: an execution context, its stream and the buffers of a bucket
are one graph's shared state, so each TrtGraph holds a lock around everything
that touches them (bucket choice and eviction, uploads, enqueue, downloads,
freeing): calls on one graph run one at a time, calls on different graphs run
concurrently, and no call frees a bucket another call is using.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from fastertrt.plugins import register_all
from fastertrt.runtime.engines import TRT_MODULES, check_compatible, check_plugins, find_profile, installed_backends
from fastertrt.runtime.gpu import check, cudart, gpu_compute_capability
from fastertrt.runtime.inputs import check_feeds

_NP = {"float": np.float32, "half": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
       "int8": np.int8, "uint8": np.uint8}


def _np_dtype(trt_dtype, name: str):
    key = str(trt_dtype).rsplit(".", 1)[-1].lower()
    if key not in _NP:
        raise TypeError(f"engine tensor {name} has type {key}, which the runtime does not stage; "
                        f"keep engine I/O in fp32/fp16/int (fastertrt's cast pass does)")
    return _NP[key]


class _Bucket:
    """Buffers for one set of input shapes."""

    def __init__(self, rt, names_shapes: dict, dtypes: dict):
        self.device, self.host = {}, {}
        for name, shape in names_shapes.items():
            dt = np.dtype(dtypes[name])
            nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
            self.device[name] = check(rt.cudaMalloc(nbytes), "cudaMalloc")
            ptr = check(rt.cudaMallocHost(nbytes), "cudaMallocHost")  # pinned: async copies
            buf = (ctypes.c_byte * nbytes).from_address(int(ptr))
            self.host[name] = (ptr, np.frombuffer(buf, dtype=dt, count=int(np.prod(shape))).reshape(shape))
        self.graph_exec = None
        self.profile = 0

    def free(self, rt):
        for ptr in self.device.values():
            rt.cudaFree(ptr)
        for ptr, _ in self.host.values():
            rt.cudaFreeHost(ptr)
        if self.graph_exec is not None:
            rt.cudaGraphExecDestroy(self.graph_exec)


class TrtGraph:
    def __init__(self, path: Path, entry: dict, cuda_graphs: bool = False, max_buckets: int = 8):
        self.entry, self.path = entry, Path(path)
        versions = installed_backends()
        check_plugins(entry)
        check_compatible(entry, versions, None)  # no CUDA yet: backend and version first
        gpu = gpu_compute_capability()
        if gpu is None:
            from fastertrt.errors import EngineMismatchError

            raise EngineMismatchError(f"engine {entry['file']} needs an NVIDIA GPU and driver; none is usable "
                                      f"here. Load with backend='onnxruntime' instead.")
        check_compatible(entry, versions, gpu)
        module = __import__(TRT_MODULES[entry["backend"]])
        self.trt = module
        self.rt = cudart()
        self.logger = module.Logger(module.Logger.WARNING)
        register_all(module)
        self.runtime = module.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            from fastertrt.errors import EngineMismatchError

            raise EngineMismatchError(f"{module.__name__} could not deserialize {entry['file']}; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = module.TensorIOMode.INPUT
        self.input_names = [n for n in io if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in io if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _np_dtype(self.engine.get_tensor_dtype(n), n) for n in io}
        self.cuda_graphs = cuda_graphs
        self.max_buckets = max_buckets
        self.buckets: dict[tuple, _Bucket] = {}
        self.profile = -1
        # what the engine takes, in the manifest's spec form, for the check both backends share
        self.spec = {"inputs": [{"name": n, "dtype": np.dtype(self.dtypes[n]).name,
                                 "shape": list(self.engine.get_tensor_shape(n))} for n in self.input_names]}
        self.lock = threading.Lock()

    def _bucket(self, feeds: dict) -> tuple[_Bucket, bool]:
        key = tuple((n, feeds[n].shape) for n in self.input_names)
        if key in self.buckets:
            bucket = self.buckets[key]
            self._select(bucket.profile, feeds)
            return bucket, False
        profile = find_profile(self.entry, {n: feeds[n].shape for n in self.input_names})
        self._select(profile, feeds)
        shapes = {n: tuple(feeds[n].shape) for n in self.input_names}
        shapes.update({n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names})
        if len(self.buckets) >= self.max_buckets:  # bounded memory: drop the oldest bucket
            old_key = next(iter(self.buckets))
            self.buckets.pop(old_key).free(self.rt)
        bucket = _Bucket(self.rt, shapes, self.dtypes)
        bucket.profile = profile
        self.buckets[key] = bucket
        return bucket, True

    def _select(self, profile: int, feeds: dict) -> None:
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, int(self.stream))
            self.profile = profile
        for n in self.input_names:
            self.context.set_input_shape(n, feeds[n].shape)

    def _enqueue(self, bucket: _Bucket) -> None:
        for n, ptr in bucket.device.items():
            self.context.set_tensor_address(n, int(ptr))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"execute_async_v3 failed for {self.entry['file']}")

    @staticmethod
    def step_session(prefill, decode, candidates: int):
        from fastertrt.runtime.tensorrt_steps import TrtSteps

        return TrtSteps(prefill, decode, candidates)

    def enqueue_bound(self, shapes: dict, addresses: dict, stream) -> None:
        """Enqueue on device buffers the caller owns: input shapes, and an address
        for every I/O tensor (the step session's KV ping-pong buffers). Holds the
        graph's lock: the execution context is shared with run()."""
        with self.lock:
            self._enqueue_bound(shapes, addresses, stream)

    def _enqueue_bound(self, shapes: dict, addresses: dict, stream) -> None:
        profile = find_profile(self.entry, shapes)
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, int(stream))
            self.profile = profile
        for n in self.input_names:
            self.context.set_input_shape(n, tuple(shapes[n]))
        for n, ptr in addresses.items():
            self.context.set_tensor_address(n, int(ptr))
        if not self.context.execute_async_v3(int(stream)):
            raise RuntimeError(f"execute_async_v3 failed for {self.entry['file']}")

    def check(self, feeds: dict) -> None:
        """The same check as the ONNX Runtime backend's, against the engine's I/O."""
        check_feeds(self.spec["inputs"], feeds, self.path.name)

    def run(self, feeds: dict) -> dict:
        """Safe from many threads: one call at a time per graph (see the module doc)."""
        self.check(feeds)
        feeds = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        with self.lock:
            return self._run(feeds)

    def _run(self, feeds: dict) -> dict:
        rt, s = self.rt, self.stream
        bucket, new = self._bucket(feeds)
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n in self.input_names:
            ptr, host = bucket.host[n]
            host[...] = feeds[n]
            check(rt.cudaMemcpyAsync(bucket.device[n], ptr, host.nbytes, h2d, s), "cudaMemcpyAsync H2D")
        if self.cuda_graphs and bucket.graph_exec is None and not new:
            # capture on the second run of a bucket: the first one let TensorRT settle its shapes
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check(rt.cudaStreamBeginCapture(s, mode), "cudaStreamBeginCapture")
            self._enqueue(bucket)
            graph = check(rt.cudaStreamEndCapture(s), "cudaStreamEndCapture")
            bucket.graph_exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            rt.cudaGraphDestroy(graph)
        if bucket.graph_exec is not None:
            check(rt.cudaGraphLaunch(bucket.graph_exec, s), "cudaGraphLaunch")
        else:
            self._enqueue(bucket)
        for n in self.output_names:
            ptr, host = bucket.host[n]
            check(rt.cudaMemcpyAsync(ptr, bucket.device[n], host.nbytes, d2h, s), "cudaMemcpyAsync D2H")
        check(rt.cudaStreamSynchronize(s), "cudaStreamSynchronize")
        return {n: bucket.host[n][1].copy() for n in self.output_names}

    def close(self) -> None:
        with self.lock:  # not under a running call's feet
            for b in self.buckets.values():
                b.free(self.rt)
            self.buckets.clear()
            self.rt.cudaStreamDestroy(self.stream)
