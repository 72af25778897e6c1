"""Device-resident decoding on TensorRT: the step session of generation.py for
engines.

The KV cache lives in two device buffers per present tensor, each sized for
rows x (prompt + new tokens): a step reads its past from one (as a contiguous
[rows, H, past, D] tensor) and writes its present into the other, and the two
swap. The parent-beam reorder happens inside the engine (a Gather on the past),
so the host never touches the cache. Per step, the small inputs (new tokens,
mask, positions, beam scores, token bias, parent rows) go up through pinned
buffers and only the candidates ([batch, c*K] scores, tokens, beams) come back;
logits stay on the device.

One step session serves one Decoder, whose lock holds it for a whole
generate(): reserve() frees and regrows these buffers only between
generations, never under another call's steps.
"""

from __future__ import annotations

import ctypes

import numpy as np

from fastertrt.runtime.gpu import check
from fastertrt.runtime.steps import CANDIDATE_OUTPUTS, StepFeeds


class _Pinned:
    """A device buffer and a pinned host mirror of `nbytes`."""

    def __init__(self, rt, nbytes: int):
        self.nbytes = max(1, int(nbytes))
        self.device = check(rt.cudaMalloc(self.nbytes), "cudaMalloc")
        self.host_ptr = check(rt.cudaMallocHost(self.nbytes), "cudaMallocHost")
        self.host = (ctypes.c_byte * self.nbytes).from_address(int(self.host_ptr))

    def view(self, dtype, shape) -> np.ndarray:
        count = int(np.prod(shape))
        return np.frombuffer(self.host, dtype=dtype, count=count).reshape(shape)

    def free(self, rt) -> None:
        rt.cudaFree(self.device)
        rt.cudaFreeHost(self.host_ptr)


class TrtSteps(StepFeeds):
    def __init__(self, prefill, decode, candidates: int):
        self.graphs = {"prefill": prefill, "decode": decode}
        self.candidates = candidates
        self.rt, self.stream = decode.rt, decode.stream
        self.present_names = [n for n in decode.output_names if n.startswith("present.")]
        self.past_names = [n.replace("present.", "past_key_values.") for n in self.present_names]
        self.shapes = {}  # present name -> (heads, head_dim), from the engine
        for n in self.present_names:
            dims = tuple(decode.engine.get_tensor_shape(n))
            self.shapes[n] = (int(dims[1]), int(dims[3]))
        self.vocab = int(decode.engine.get_tensor_shape("logits")[-1])
        self.capacity = (0, 0)
        self.kv, self.io = {}, {}
        self.past_len = 0
        self.parity = 0  # which of the two KV buffers holds the past

    # -- buffers ----------------------------------------------------------------------
    def reserve(self, rows: int, total: int) -> None:
        """Buffers for `rows` beams and `total` positions (prompt + new tokens)."""
        if rows <= self.capacity[0] and total <= self.capacity[1]:
            return
        self.close()
        dec = self.graphs["decode"]
        for n in self.present_names:
            h, d = self.shapes[n]
            nbytes = rows * h * total * d * np.dtype(dec.dtypes[n]).itemsize
            self.kv[n] = [check(self.rt.cudaMalloc(nbytes), "cudaMalloc") for _ in range(2)]
        sizes = {"input_ids": rows * total * 8, "attention_mask": rows * total * 8, "position_ids": rows * total * 8,
                 "beam_scores": rows * 4, "token_bias": self.vocab * 4, "beam_idx": rows * 8,
                 # [batch, beams * c] with batch * beams = rows
                 "candidate_scores": rows * self.candidates * 4,
                 "candidate_tokens": rows * self.candidates * 8,
                 "candidate_beams": rows * self.candidates * 8,
                 "logits": rows * self.vocab * np.dtype(dec.dtypes["logits"]).itemsize}
        self.io = {n: _Pinned(self.rt, b) for n, b in sizes.items()}
        self.capacity = (rows, total)

    def close(self) -> None:
        for pair in self.kv.values():
            for ptr in pair:
                self.rt.cudaFree(ptr)
        for buf in self.io.values():
            buf.free(self.rt)
        self.kv, self.io, self.capacity = {}, {}, (0, 0)

    # -- steps ------------------------------------------------------------------------
    def _upload(self, feeds: dict) -> None:
        h2d = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, arr in feeds.items():
            buf = self.io[name]
            host = buf.view(arr.dtype, arr.shape)
            host[...] = arr
            check(self.rt.cudaMemcpyAsync(buf.device, buf.host_ptr, arr.nbytes, h2d, self.stream), "H2D")

    def _run(self, graph: str, feeds: dict):
        rows, seq = feeds["input_ids"].shape
        if rows > self.capacity[0] or feeds["attention_mask"].shape[1] > self.capacity[1]:
            # growing would drop the cache mid-generation: the loops reserve before they prefill
            raise RuntimeError(f"step of {rows} rows x {feeds['attention_mask'].shape[1]} positions exceeds the "
                               f"reserved {self.capacity[0]} x {self.capacity[1]}; call reserve() before prefill")
        self._upload(feeds)
        g = self.graphs[graph]
        shapes = {n: feeds[n].shape for n in feeds}
        addresses = {n: self.io[n].device for n in list(feeds) + ["logits", *CANDIDATE_OUTPUTS]}
        past = self.past_len if graph == "decode" else 0
        src, dst = self.parity, 1 - self.parity
        for past_name, present_name in zip(self.past_names, self.present_names):
            h, d = self.shapes[present_name]
            if graph == "decode":
                shapes[past_name] = (rows, h, past, d)
                addresses[past_name] = self.kv[present_name][src]
            addresses[present_name] = self.kv[present_name][dst]
        g.enqueue_bound({n: shapes[n] for n in g.input_names}, addresses, self.stream)
        batch, beams = feeds["beam_scores"].shape
        width = beams * self.candidates
        out = []
        d2h = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, dtype in zip(CANDIDATE_OUTPUTS, (np.float32, np.int64, np.int64)):
            buf = self.io[name]
            nbytes = batch * width * np.dtype(dtype).itemsize
            check(self.rt.cudaMemcpyAsync(buf.host_ptr, buf.device, nbytes, d2h, self.stream), "D2H")
            out.append((buf, dtype))
        check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.past_len = past + seq
        self.parity = dst
        return tuple(buf.view(dtype, (batch, width)).copy() for buf, dtype in out)
