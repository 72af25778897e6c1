"""Step sessions on ONNX Runtime: the prefill and decode-step graphs of a
decoder bundle, with the KV cache kept between calls (see generation.py).

Each step's presents stay ONNX Runtime values (IOBinding): they are bound as
the next step's past without a round trip through numpy, and the decode graph
reorders them by beam_idx itself. Only the candidates come back as arrays."""

from __future__ import annotations

import numpy as np

CANDIDATE_OUTPUTS = ("candidate_scores", "candidate_tokens", "candidate_beams")


class StepFeeds:
    """prefill/decode as the generation loops call them, turned into graph feeds;
    a backend's session implements _run(graph name, feeds) -> candidates."""

    def prefill(self, ids, mask, pos, beam_scores, bias):
        return self._run("prefill", {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                     "beam_scores": beam_scores, "token_bias": bias})

    def decode(self, ids, mask, pos, beam_scores, bias, beam_idx):
        return self._run("decode", {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                    "beam_scores": beam_scores, "token_bias": bias,
                                    "beam_idx": np.asarray(beam_idx, dtype=np.int64)})


class OrtSteps(StepFeeds):
    def __init__(self, prefill, decode, candidates: int):
        self.graphs = {"prefill": prefill, "decode": decode}
        self.candidates = candidates
        self.past_names = [n for n in decode.input_names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.past = None  # OrtValues of the last step's presents

    def reserve(self, rows: int, total: int) -> None:
        """ONNX Runtime allocates per run; nothing to reserve."""

    def _run(self, graph: str, feeds: dict):
        g = self.graphs[graph]
        binding = g.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if graph == "decode":
            for name, value in zip(self.past_names, self.past):
                binding.bind_ortvalue_input(name, value)
        for name in g.output_names:
            binding.bind_output(name, "cpu")
        g.session.run_with_iobinding(binding)
        out = dict(zip(g.output_names, binding.get_outputs()))
        self.past = [out[n] for n in self.present_names]
        return tuple(out[n].numpy() for n in CANDIDATE_OUTPUTS)
