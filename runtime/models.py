"""What `load(bundle)` returns: an Encoder, a Decoder or a ModuleRunner, each
running the bundle's graphs on a backend.

Thread safety: one model object may be shared by many threads. encode() and
run() keep no state of their own and run concurrently (ONNX Runtime sessions
take concurrent calls; a TensorRT graph serializes the calls on its own
context and buffers). generate() runs one generation at a time per Decoder:
its step session holds that generation's KV cache, so the other threads wait
for the whole generation (load the bundle once per thread for parallel
decoding, at the cost of a copy of the weights each)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fastertrt.errors import BundleSchemaError, InputError
from fastertrt.runtime.generation import Generation, SearchOptions, beam_search, greedy, trim_new_tokens
from fastertrt.runtime.inputs import as_id_rows, as_texts, int_option, pad_rows, token_ids_option
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
        """Safe from many threads, concurrently (see the module doc)."""
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
        self._lock = threading.Lock()  # one generation at a time on _steps (see _session)
        self._owner = None  # the thread id holding _lock

    def generate(self, inputs, max_new_tokens: int = 32, min_new_tokens: int = 0, num_beams: int = 1,
                 num_return_sequences: int = 1, length_penalty: float = 1.0, early_stopping=False,
                 eos_token_id=None, pad_token_id=None, on_token=None) -> Generation:
        """Generate from a batch of prompts (texts, or id rows of any lengths: left-padded
        here), as transformers' generate(do_sample=False, ...) does.

        num_beams=1 is greedy search; on_token(step, tokens) then streams each step's
        new token per row. eos_token_id: an id or a list (default: the model's);
        early_stopping: True, False or "never"; returns num_return_sequences rows per
        prompt, best first, with their sequence scores.

        Safe from many threads: calls on one Decoder take turns, one whole
        generation each (on_token runs inside it and must not call generate()
        on the same Decoder)."""
        rows = self._rows(inputs)
        opts = self._options(max_new_tokens, min_new_tokens, num_beams, num_return_sequences, length_penalty,
                             early_stopping, eos_token_id, pad_token_id)
        longest = max(len(r) for r in rows)
        if longest + opts.max_new_tokens > self.max_length:
            raise InputError(f"prompt of {longest} tokens + {opts.max_new_tokens} new tokens exceeds the model's "
                             f"{self.max_length} positions; shorten the prompt or lower max_new_tokens")
        if on_token is not None and opts.num_beams > 1:
            raise InputError("on_token streams greedy search only: beam search knows its final tokens at the end")
        ids, mask = pad_rows(rows, opts.pad, left=True)
        with self._session() as steps:
            if opts.num_beams == 1:
                out = greedy(steps, ids, mask, opts, self.vocab_size, on_token)
            else:
                out = beam_search(steps, ids, mask, opts, self.vocab_size)
        out.new_tokens = trim_new_tokens(out.sequences, ids.shape[1], opts.eos)
        out.texts = [self.tokenizer.decode(t) for t in out.new_tokens] if self.tokenizer else None
        return out

    def _options(self, max_new_tokens, min_new_tokens, num_beams, num_return_sequences, length_penalty,
                 early_stopping, eos_token_id, pad_token_id) -> SearchOptions:
        eos = self.eos_token_id if eos_token_id is None else token_ids_option(
            "eos_token_id", eos_token_id, self.vocab_size)
        if pad_token_id is not None:
            pad = int_option("pad_token_id", pad_token_id, low=0, high=self.vocab_size)
        else:
            pad = self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else 0)
        return SearchOptions.parse(self.candidates, max_new_tokens, min_new_tokens, num_beams,
                                   num_return_sequences, length_penalty, early_stopping, eos, int(pad))

    @contextmanager
    def _session(self):
        """The step session, held by this thread for one whole generation: it keeps
        that generation's KV cache (and, on TensorRT, its device buffers)."""
        if self._owner == threading.get_ident():
            # a plain lock would deadlock here, and re-entering would overwrite the cache mid-generation
            raise InputError("generate() was called again from inside on_token of the same Decoder; "
                             "collect the tokens and call generate() after it returns")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                if self._steps is None:
                    self._steps = type(self.graphs["decode"]).step_session(
                        self.graphs["prefill"], self.graphs["decode"], self.candidates)
                yield self._steps
            finally:
                self._owner = None


class ModuleRunner(_Model):
    """A plain exported nn.Module: run(**arrays) -> {output name: array}."""

    def run(self, **feeds) -> dict:
        """Safe from many threads, concurrently (see the module doc)."""
        return self.graphs["module"].run({k: np.asarray(v) for k, v in feeds.items()})
