"""What `load(bundle)` returns: an Encoder, a Decoder or a ModuleRunner, each
running the bundle's graphs on a backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastertrt.errors import BundleSchemaError, InputError
from fastertrt.runtime.generation import Generation, SearchOptions, beam_search, greedy, trim_new_tokens
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


def encoder_feeds(manifest: dict, rows: list[list[int]]) -> dict:
    """The encoder graph's feeds for id rows: right-padded with the model's own pad
    id (RoBERTa derives positions from it), one token type."""
    info = manifest["model"]
    pad = info.get("pad_token_id")
    ids, mask = pad_rows(rows, pad if pad is not None else 0, left=False)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feeds[n] for n in info["input_names"]}


class Encoder(_Model):
    """encode(texts or ids) -> {output name: array, 'attention_mask': mask}."""

    def encode(self, inputs, truncate: bool = True) -> dict:
        feeds = encoder_feeds(self.manifest, self._rows(inputs, truncate))
        out = self.graphs["encoder"].run(feeds)
        out["attention_mask"] = feeds["attention_mask"]
        return out


class Decoder(_Model):
    """Greedy and beam-search generation over the prefill and decode-step graphs
    (which end in the beam-search step), with transformers' meaning for every
    option; the KV cache stays with the backend between steps."""

    def __init__(self, bundle, manifest, graphs):
        super().__init__(bundle, manifest, graphs)
        info = manifest["model"]
        self.num_layers = int(info["num_layers"])
        self.eos_token_id = list(info.get("eos_token_id") or [])
        self.pad_token_id = info.get("pad_token_id")
        outputs = {t["name"] for t in manifest["graphs"]["decode"]["outputs"]}
        if "candidate_scores" not in outputs:
            raise BundleSchemaError(
                f"bundle {self.bundle} was compiled by fastertrt {manifest.get('fastertrt_version', '?')} without "
                f"the beam-search step in its graphs; recompile it: fastertrt compile MODEL -o {self.bundle} --force")
        self.candidates = int(info.get("beam_candidates", 2))
        self._steps = None  # the backend's step session, made on first use and kept (device buffers)

    def generate(self, inputs, max_new_tokens: int = 32, min_new_tokens: int = 0, num_beams: int = 1,
                 num_return_sequences: int = 1, length_penalty: float = 1.0, early_stopping=False,
                 eos_token_id=None, pad_token_id=None, on_token=None) -> Generation:
        """Generate from a batch of prompts (texts, or id rows of any lengths: left-padded
        here), as transformers' generate(do_sample=False, ...) does.

        num_beams=1 is greedy search; on_token(step, tokens) then streams each step's
        new token per row. eos_token_id: an id or a list (default: the model's);
        early_stopping: True, False or "never"; returns num_return_sequences rows per
        prompt, best first, with their sequence scores."""
        rows = self._rows(inputs)
        longest = max(len(r) for r in rows)
        if isinstance(max_new_tokens, int) and longest + max_new_tokens > self.max_length:
            raise InputError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"{self.max_length} positions; shorten the prompt or lower max_new_tokens")
        eos = self.eos_token_id if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))
        if any(not 0 <= int(e) < self.vocab_size for e in eos):
            raise InputError(f"eos_token_id {eos} lies outside the vocabulary [0, {self.vocab_size})")
        pad = pad_token_id if pad_token_id is not None else (
            self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else 0))
        opts = SearchOptions(max_new_tokens, min_new_tokens, num_beams, num_return_sequences,
                             float(length_penalty), early_stopping, tuple(int(e) for e in eos), int(pad))
        opts.check(self.candidates)
        if on_token is not None and num_beams > 1:
            raise InputError("on_token streams greedy search only: beam search knows its final tokens at the end")
        ids, mask = pad_rows(rows, opts.pad, left=True)
        if self._steps is None:
            self._steps = type(self.graphs["decode"]).step_session(self.graphs["prefill"], self.graphs["decode"],
                                                                    self.candidates)
        steps = self._steps
        if num_beams == 1:
            out = greedy(steps, ids, mask, opts, self.vocab_size, on_token)
        else:
            out = beam_search(steps, ids, mask, opts, self.vocab_size)
        out.new_tokens = trim_new_tokens(out.sequences, ids.shape[1], opts.eos)
        out.texts = [self.tokenizer.decode(t) for t in out.new_tokens] if self.tokenizer else None
        return out


class ModuleRunner(_Model):
    """A plain exported nn.Module: run(**arrays) -> {output name: array}."""

    def run(self, **feeds) -> dict:
        return self.graphs["module"].run({k: np.asarray(v) for k, v in feeds.items()})
