"""What `load(bundle)` returns: an Encoder, a Decoder or a ModuleRunner, each
running the bundle's graphs on a backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastertrt.errors import InputError
from fastertrt.runtime.inputs import as_id_rows, as_texts, pad_rows
from fastertrt.runtime.tokenizer import TextTokenizer, no_tokenizer_error


class _Model:
    def __init__(self, bundle: Path, manifest: dict, graphs: dict):
        self.bundle = Path(bundle)
        self.manifest = manifest
        self.graphs = graphs
        info = manifest["model"]
        self.vocab_size = int(info.get("vocab_size", 0))
        self.max_length = int(info.get("max_length", 1 << 30))
        tok = manifest.get("tokenizer")
        self.tokenizer = TextTokenizer(self.bundle / tok["file"], self.max_length) if tok else None

    def _rows(self, inputs, truncate: bool = True) -> list[list[int]]:
        texts = as_texts(inputs)
        if texts is not None:
            if self.tokenizer is None:
                raise no_tokenizer_error()
            inputs = self.tokenizer.encode(texts, truncate)
        return as_id_rows(inputs, self.vocab_size, self.max_length)

    def __repr__(self) -> str:
        info = self.manifest["model"]
        return f"{type(self).__name__}({info.get('family')} from {self.bundle}, graphs={list(self.graphs)})"


class Encoder(_Model):
    """encode(texts or ids) -> {output name: array, 'attention_mask': mask}."""

    def encode(self, inputs, truncate: bool = True) -> dict:
        rows = self._rows(inputs, truncate)
        # the model's own pad id: RoBERTa derives positions from it
        pad = self.manifest["model"].get("pad_token_id")
        ids, mask = pad_rows(rows, pad if pad is not None else 0, left=False)
        names = self.manifest["model"]["input_names"]
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        out = self.graphs["encoder"].run({n: feeds[n] for n in names})
        out["attention_mask"] = mask
        return out


@dataclass
class Generation:
    """sequences: [batch, padded prompt + new] as transformers' generate returns
    them (left padding, pad after eos); new_tokens: each row's new ids up to and
    including its eos; texts: decoded new tokens when the bundle has a tokenizer."""

    sequences: np.ndarray
    new_tokens: list = field(default_factory=list)
    texts: list | None = None


class Decoder(_Model):
    """Greedy generation over the prefill and decode-step graphs; the KV cache
    from each step is fed to the next."""

    def __init__(self, bundle, manifest, graphs):
        super().__init__(bundle, manifest, graphs)
        info = manifest["model"]
        self.num_layers = int(info["num_layers"])
        self.eos_token_id = list(info.get("eos_token_id") or [])
        self.pad_token_id = info.get("pad_token_id")
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def generate(self, inputs, max_new_tokens: int = 32, min_new_tokens: int = 0, eos_token_id=None,
                 pad_token_id=None, on_token=None) -> Generation:
        """Greedy decoding of a batch of prompts (texts or id rows of any lengths).

        on_token(step, tokens) is called with each step's new token per row (streaming)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rows = self._rows(inputs)
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > self.max_length:
            raise InputError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"{self.max_length} positions; shorten the prompt or lower max_new_tokens")
        eos = self.eos_token_id if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else 0))
        ids, mask = pad_rows(rows, pad, left=True)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        out = self.graphs["prefill"].run({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
        batch = len(rows)
        done = np.zeros(batch, dtype=bool)
        new = np.zeros((batch, 0), dtype=np.int64)
        eos_arr = np.asarray(eos, dtype=np.int64)
        for step in range(max_new_tokens):
            logits = out["logits"][:, -1, :]
            if step < min_new_tokens and eos_arr.size:
                logits = logits.copy()
                logits[:, eos_arr] = -np.inf
            token = np.argmax(logits, axis=-1).astype(np.int64)
            token = np.where(done, pad, token)
            new = np.concatenate([new, token[:, None]], axis=1)
            if on_token is not None:
                on_token(step, token)
            if eos_arr.size:
                done |= np.isin(token, eos_arr)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            feeds = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": pos}
            feeds.update({p: out[q] for p, q in zip(self._past_names, self._present_names)})
            out = self.graphs["decode"].run(feeds)
        new_tokens = []
        for r in new:
            stop = next((i + 1 for i, t in enumerate(r) if t in eos), len(r)) if eos else len(r)
            new_tokens.append([int(t) for t in r[:stop]])
        texts = [self.tokenizer.decode(t) for t in new_tokens] if self.tokenizer else None
        return Generation(np.concatenate([ids, new], axis=1), new_tokens, texts)


class ModuleRunner(_Model):
    """A plain exported nn.Module: run(**arrays) -> {output name: array}."""

    def run(self, **feeds) -> dict:
        return self.graphs["module"].run({k: np.asarray(v) for k, v in feeds.items()})
