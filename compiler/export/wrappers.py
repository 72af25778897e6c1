"""nn.Modules that give each exported graph its exact I/O contract.

Names follow the usual ONNX conventions for transformers: input_ids,
attention_mask, token_type_ids, position_ids, past_key_values.{i}.key/value in,
logits, present.{i}.key/value, last_hidden_state, sentence_embedding out.
"""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence pooling as sentence-transformers defines it."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).amax(dim=1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class EncoderGraph(torch.nn.Module):
    def __init__(self, model, input_names: list[str], pooling: dict | None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.pooling = pooling

    def output_names(self) -> list[str]:
        return ["last_hidden_state"] + (["sentence_embedding"] if self.pooling else [])

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            feeds["token_type_ids"] = token_type_ids
        hidden = self.model(**feeds).last_hidden_state
        if not self.pooling:
            return (hidden,)
        emb = pool(hidden, feeds["attention_mask"], self.pooling["mode"])
        if self.pooling.get("normalize"):
            emb = torch.nn.functional.normalize(emb, p=2.0, dim=-1)
        return hidden, emb


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# Candidates the beam tail keeps per beam. transformers keeps max(2, 1 + number
# of eos tokens) per beam; 4 serves up to 3 eos tokens, and the generation loop
# reads the prefix it needs (top-k output is sorted).
BEAM_CANDIDATES = 4
STEP_INPUTS = ["input_ids", "attention_mask", "position_ids", "beam_scores", "token_bias"]
STEP_OUTPUTS = ["logits", "candidate_scores", "candidate_tokens", "candidate_beams"]


def beam_tail(logits: torch.Tensor, beam_scores: torch.Tensor, token_bias: torch.Tensor, candidates: int):
    """The beam-search step as transformers computes it: log_softmax of the last
    position's logits (FP32), the logits processors' bias, plus each beam's running
    score, then top-k over beams x vocabulary of each batch row.

    logits [B*K, V]; beam_scores [B, K]; token_bias [V] -> scores [B, c*K] and the
    token and parent beam (0..K-1) of each."""
    log_probs = torch.log_softmax(logits.float(), dim=-1) + token_bias
    acc = log_probs + beam_scores.reshape(-1, 1)
    batch, beams = beam_scores.shape
    vocab = logits.shape[-1]
    scores, flat = torch.topk(acc.reshape(batch, beams * vocab), candidates * beams, dim=-1)
    return scores, flat % vocab, torch.div(flat, vocab, rounding_mode="floor")


class DecoderGraph(torch.nn.Module):
    """One decoder forward with an explicit KV cache, ending in the beam step.

    Rows are beams: row b*K + j is beam j of prompt b. with_past=False is the
    prefill graph (no cache in); with_past=True is the decode-step graph: the
    cache of `past` positions comes in with `beam_idx`, the row each beam
    continues (the KV cache is reordered by parent beam in the graph), and
    `past + seq` positions go out. Greedy search is the same graph with K = 1.
    Only the last position's logits are computed."""

    def __init__(self, model, num_layers: int, with_past: bool, candidates: int = BEAM_CANDIDATES):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.with_past = with_past
        self.candidates = candidates

    def input_names(self) -> list[str]:
        if not self.with_past:
            return list(STEP_INPUTS)
        return STEP_INPUTS + ["beam_idx"] + kv_names(self.num_layers, "past_key_values")

    def output_names(self) -> list[str]:
        return STEP_OUTPUTS + kv_names(self.num_layers, "present")

    def forward(self, input_ids, attention_mask, position_ids, beam_scores, token_bias, beam_idx=None, *past):
        from transformers import DynamicCache

        if self.with_past:
            pairs = [(past[2 * i].index_select(0, beam_idx), past[2 * i + 1].index_select(0, beam_idx))
                     for i in range(self.num_layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        else:
            cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        scores, tokens, beams = beam_tail(out.logits[:, -1, :], beam_scores, token_bias, self.candidates)
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, scores, tokens, beams, *presents)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (pads get 0); the runtime does the same in numpy."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
