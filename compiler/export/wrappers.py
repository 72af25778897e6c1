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


class DecoderGraph(torch.nn.Module):
    """One decoder forward with an explicit KV cache.

    with_past=False is the prefill graph (no cache in); with_past=True is the
    decode-step graph (cache of `past` positions in, `past + seq` out).
    """

    def __init__(self, model, num_layers: int, with_past: bool):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.with_past = with_past

    def input_names(self) -> list[str]:
        base = ["input_ids", "attention_mask", "position_ids"]
        return base + (kv_names(self.num_layers, "past_key_values") if self.with_past else [])

    def output_names(self) -> list[str]:
        return ["logits"] + kv_names(self.num_layers, "present")

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        if self.with_past:
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        else:
            cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (pads get 0); the runtime does the same in numpy."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
