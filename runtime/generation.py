"""Greedy and beam search over a bundle's step graphs, in numpy, with the
meaning transformers' generate(do_sample=False) gives each option.

The graphs end in the beam-search step: each call returns, per batch row, the
top candidates over beams x vocabulary (score, token, parent beam). What is left
here is bookkeeping on [batch, candidates] arrays: which candidates finish, which
beams run on, the finished hypotheses and when to stop. The KV cache never comes
here: the step session keeps it (on the device, for TensorRT) and reorders it by
parent beam inside the next step's graph.

Every score is FP32 and computed in the same order as transformers, so the
decisions (and sequence scores) match it, not just approximately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from fastertrt.errors import InputError
from fastertrt.runtime.inputs import int_option, real_option

NEG = np.float32(-1.0e9)  # transformers' "impossible" score


class StepSession(Protocol):
    """What a backend gives the loops: one graph call per step, KV cache kept inside."""

    candidates: int  # candidates per beam that the graph returns

    def reserve(self, rows: int, total: int) -> None: ...

    def prefill(self, ids, mask, pos, beam_scores, bias) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def decode(self, ids, mask, pos, beam_scores, bias, beam_idx) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class Generation:
    """sequences: [rows, padded prompt + new] as transformers' generate returns
    them (left padding; after eos the pad id, or eos when the pad id is 0), one row
    per returned sequence (num_return_sequences per prompt, best first);
    scores: beam search's sequence scores (sum of log-probabilities / length **
    length_penalty), for greedy the sum of the new tokens' log-probabilities;
    new_tokens: each row's new ids up to and including its eos; texts: those
    decoded, when the bundle has a tokenizer."""

    sequences: np.ndarray
    scores: np.ndarray | None = None
    new_tokens: list = field(default_factory=list)
    texts: list | None = None


@dataclass(frozen=True)
class SearchOptions:
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos: tuple = ()
    pad: int = 0

    @classmethod
    def parse(cls, candidates: int, max_new_tokens, min_new_tokens, num_beams, num_return_sequences,
              length_penalty, early_stopping, eos, pad) -> SearchOptions:
        """Options as users give them (numpy integers and floats included), each
        checked and normalized to int / float / bool, or an InputError naming it;
        eos and pad are already checked token ids."""
        opts = cls(int_option("max_new_tokens", max_new_tokens, low=1),
                   int_option("min_new_tokens", min_new_tokens, low=0),
                   int_option("num_beams", num_beams, low=1),
                   int_option("num_return_sequences", num_return_sequences, low=1),
                   real_option("length_penalty", length_penalty),
                   _early_stopping(early_stopping), tuple(eos), pad)
        opts.check(candidates)
        return opts

    def check(self, candidates: int) -> None:
        """The rules between options (each one alone is checked by parse)."""
        if self.num_return_sequences > self.num_beams:
            raise InputError(f"num_return_sequences ({self.num_return_sequences}) must be between 1 and "
                             f"num_beams ({self.num_beams}): beam search returns its best num_beams sequences")
        if self.num_beams > 1 and self.candidates_needed > candidates:
            raise InputError(f"{len(self.eos)} eos tokens need {self.candidates_needed} candidates per beam; the "
                             f"bundle's step graph returns {candidates}. Pass at most {candidates - 1} eos ids, or "
                             f"recompile the bundle with more candidates.")

    @property
    def candidates_needed(self) -> int:
        """transformers keeps max(2, 1 + number of eos tokens) candidates per beam."""
        return max(2, 1 + len(self.eos))


def _early_stopping(value) -> bool | str:
    # the loops test `is True`: a numpy bool must become a Python one
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value == "never":
        return value
    raise InputError(f"early_stopping must be True, False or 'never', got {value!r}")


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids that skip left padding (pads get 0), as the export used."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


class _Bias:
    """The token bias of each step: -inf on eos until min_new_tokens are out."""

    def __init__(self, vocab: int, eos, min_new: int):
        self.free = np.zeros(vocab, dtype=np.float32)
        self.no_eos = self.free.copy()
        if len(eos):
            self.no_eos[np.asarray(eos, dtype=np.int64)] = -np.inf
        self.min_new = min_new

    def __call__(self, generated: int) -> np.ndarray:
        return self.no_eos if generated < self.min_new else self.free


def greedy(steps: StepSession, ids: np.ndarray, mask: np.ndarray, opts: SearchOptions, vocab: int,
           on_token: Callable | None = None) -> Generation:
    batch = ids.shape[0]
    bias = _Bias(vocab, opts.eos, opts.min_new_tokens)
    zeros = np.zeros((batch, 1), dtype=np.float32)
    rows = np.arange(batch, dtype=np.int64)
    eos = np.asarray(opts.eos, dtype=np.int64)
    pos = positions(mask)
    steps.reserve(batch, ids.shape[1] + opts.max_new_tokens)
    scores, tokens, _ = steps.prefill(ids, mask, pos, zeros, bias(0))
    done = np.zeros(batch, dtype=bool)
    total = np.zeros(batch, dtype=np.float32)
    new = []
    for step in range(opts.max_new_tokens):
        token = np.where(done, opts.pad, tokens[:, 0].astype(np.int64))
        total += np.where(done, np.float32(0), scores[:, 0])
        new.append(token)
        if on_token is not None:
            on_token(step, token.copy())
        if eos.size:
            done |= np.isin(token, eos)
        if done.all() or step == opts.max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        scores, tokens, _ = steps.decode(token[:, None], mask, pos, zeros, bias(step + 1), rows)
    sequences = np.concatenate([ids, np.stack(new, axis=1)], axis=1)
    return Generation(sequences, total)


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[b, idx[b, j], ...] for [B, M, ...] x and [B, J] idx (transformers' _gather_beams)."""
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest along the last axis, descending, ties to the lower index."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def beam_search(steps: StepSession, ids: np.ndarray, mask: np.ndarray, opts: SearchOptions,
                vocab: int) -> Generation:
    """transformers' vectorized beam search (generation/utils.py _beam_search),
    step for step: same candidates kept, same finished-hypothesis rules, same
    early stopping, same FP32 arithmetic."""
    batch, prompt_len = ids.shape
    k = opts.num_beams
    keep = opts.candidates_needed * k
    max_length = prompt_len + opts.max_new_tokens
    eos = np.asarray(opts.eos, dtype=np.int64)
    lp = opts.length_penalty
    fill = (opts.pad or int(eos[0])) if eos.size else -1
    bias = _Bias(vocab, opts.eos, opts.min_new_tokens)

    running = np.full((batch, k, max_length), fill, dtype=np.int64)
    running[:, :, :prompt_len] = ids[:, None, :]
    sequences = running.copy()
    running_scores = np.zeros((batch, k), dtype=np.float32)
    running_scores[:, 1:] = NEG
    beam_scores = np.full((batch, k), NEG, dtype=np.float32)
    finished = np.zeros((batch, k), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)
    running_parents = np.full((batch, k, opts.max_new_tokens), -1, dtype=np.int64)
    beam_indices = running_parents.copy()
    top_k_mask = np.arange(keep) < k
    offsets = (np.arange(batch, dtype=np.int64) * k)[:, None]

    flat_mask = np.repeat(mask, k, axis=0)
    pos = positions(flat_mask)
    steps.reserve(batch * k, max_length)
    cand = steps.prefill(np.repeat(ids, k, axis=0), flat_mask, pos, running_scores, bias(0))
    cur_len = prompt_len
    while True:
        scores, tokens, parents = (c[:, :keep] for c in cand)
        scores = scores.astype(np.float32)
        parents = parents.astype(np.int64)
        tokens = tokens.astype(np.int64)
        # c. top-k continuations: their sequences and parent-beam histories
        top_parents = _take(running_parents, parents)
        top_sequences = _take(running, parents)
        top_sequences[:, :, cur_len] = tokens
        top_parents[:, :, cur_len - prompt_len] = parents + offsets
        # d. which of them stop here (eos, or the length limit)
        hits = np.isin(tokens, eos) if eos.size else np.zeros_like(tokens, dtype=bool)
        hits |= cur_len + 1 >= max_length
        # e. the best num_beams unfinished continuations run on
        running_top = scores + hits.astype(np.float32) * NEG
        nxt = _top(running_top, k)
        running = _take(top_sequences, nxt)
        running_scores = _take(running_top, nxt)
        running_parents = _take(top_parents, nxt)
        # f. finished hypotheses: the best num_beams of the old ones and the new
        just_done = hits & top_k_mask[None, :]
        final = scores / np.float32((cur_len + 1 - prompt_len) ** lp)
        full = finished.all(axis=-1, keepdims=True) & (opts.early_stopping is True)
        final = final + full.astype(np.float32) * NEG
        final = final + (~improvable).astype(np.float32) * NEG
        final = final + (~just_done).astype(np.float32) * NEG
        merged = np.concatenate([beam_scores, final], axis=1)
        best = _top(merged, k)
        sequences = _take(np.concatenate([sequences, top_sequences], axis=1), best)
        beam_scores = _take(merged, best)
        beam_indices = _take(np.concatenate([beam_indices, top_parents], axis=1), best)
        finished = _take(np.concatenate([finished, just_done], axis=1), best)
        beam_idx = running_parents[:, :, cur_len - prompt_len].reshape(-1)
        # g. stop?
        cur_len += 1
        if opts.early_stopping == "never" and lp > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(best_len ** lp)
        worst_finished = np.where(finished, beam_scores.min(axis=1, keepdims=True), NEG)
        improvable = improvable & np.any(best_running > worst_finished, axis=-1, keepdims=True)
        open_beam = not (finished.all() and opts.early_stopping is True)
        if not (improvable.any() and open_beam and not hits.all()):
            break
        flat_mask = np.concatenate([flat_mask, np.ones((batch * k, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        step_ids = running[:, :, cur_len - 1].reshape(-1, 1)
        cand = steps.decode(step_ids, flat_mask, pos, running_scores, bias(cur_len - prompt_len), beam_idx)

    r = opts.num_return_sequences
    sequences = sequences[:, :r].reshape(batch * r, -1)
    scores = beam_scores[:, :r].reshape(-1)
    used = beam_indices[:, :r].reshape(batch * r, -1)
    length = prompt_len + int((used + 1).astype(bool).sum(axis=1).max())
    return Generation(sequences[:, :length], scores)


def trim_new_tokens(sequences: np.ndarray, prompt_len: int, eos) -> list[list[int]]:
    """Each row's new tokens up to and including its first eos (after it, fill)."""
    eos = set(int(e) for e in eos)
    out = []
    for row in sequences[:, prompt_len:]:
        toks = []
        for t in row:
            t = int(t)
            toks.append(t)
            if t in eos:
                break
        out.append(toks)
    return out
