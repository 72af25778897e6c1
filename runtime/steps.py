"""Step sessions on ONNX Runtime: the prefill and decode-step graphs of a
decoder bundle, with the KV cache kept between calls (see generation.py)."""

from __future__ import annotations

import numpy as np

CANDIDATE_OUTPUTS = ("candidate_scores", "candidate_tokens", "candidate_beams")


class OrtSteps:
    """Plain session.run per step; each step's presents are the next step's past
    (the decode graph reorders them by beam_idx)."""

    def __init__(self, prefill, decode, candidates: int):
        self.graphs = {"prefill": prefill, "decode": decode}
        self.candidates = candidates
        self.past_names = [n for n in decode.input_names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.past = None

    def reserve(self, rows: int, total: int) -> None:
        """ONNX Runtime allocates per run; nothing to reserve."""

    def _run(self, graph: str, feeds: dict):
        out = self.graphs[graph].run(feeds)
        self.past = [out[n] for n in self.present_names]
        return tuple(out[n] for n in CANDIDATE_OUTPUTS)

    def prefill(self, ids, mask, pos, beam_scores, bias):
        return self._run("prefill", {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                     "beam_scores": beam_scores, "token_bias": bias})

    def decode(self, ids, mask, pos, beam_scores, bias, beam_idx):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "beam_scores": beam_scores,
                 "token_bias": bias, "beam_idx": np.asarray(beam_idx, dtype=np.int64)}
        feeds.update(zip(self.past_names, self.past))
        return self._run("decode", feeds)
