"""Generation parity: the runtime's greedy and beam search against transformers'
generate(do_sample=False) on seeded tiny GPT-2 and Llama (grouped-query)
decoders, token for token, with sequence scores within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import DECODERS, left_pad, tiny_model

from fastertrt.errors import InputError
from fastertrt.runtime import load

PROMPTS = [[5, 9, 17, 33, 41, 8, 12], [7, 21, 3], [60, 61, 62, 63, 64]]
SCORE_ATOL = 1e-4

CASES = [
    dict(num_beams=1),
    dict(num_beams=2),
    dict(num_beams=4),
    dict(num_beams=4, early_stopping=True),
    dict(num_beams=3, length_penalty=0.6, num_return_sequences=2),
    dict(num_beams=4, early_stopping="never", length_penalty=1.3),
    dict(num_beams=4, min_new_tokens=7),
    dict(num_beams=8, num_return_sequences=3),
]
# with eos set to tokens the model likes, hypotheses finish early
EOS_CASES = [
    dict(num_beams=1),
    dict(num_beams=4, length_penalty=0.0),
    dict(num_beams=4, early_stopping=True, length_penalty=-0.5, num_return_sequences=4),
    dict(num_beams=2, early_stopping="never", length_penalty=0.0),
    dict(num_beams=4, early_stopping=False, length_penalty=1.0),
    dict(num_beams=4, min_new_tokens=6, length_penalty=0.0),
]


def hf_generate(model, prompts, pad, **kw):
    import torch

    ids, mask = left_pad(prompts, pad)
    with torch.no_grad():
        return model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              do_sample=False, pad_token_id=pad, return_dict_in_generate=True, output_scores=True,
                              **kw)


def assert_same(got, ref, beams: int) -> None:
    np.testing.assert_array_equal(got.sequences, ref.sequences.numpy())
    if beams > 1:
        np.testing.assert_allclose(got.scores, ref.sequences_scores.numpy(), atol=SCORE_ATOL, rtol=0)


@pytest.fixture(scope="module", params=DECODERS)
def tiny(request, bundles):
    return request.param, load(bundles.tiny(request.param)), tiny_model(request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_transformers(tiny, case):
    _, dec, model = tiny
    got = dec.generate(PROMPTS, max_new_tokens=10, pad_token_id=0, **case)
    assert_same(got, hf_generate(model, PROMPTS, 0, max_new_tokens=10, **case), case["num_beams"])
    assert got.sequences.shape[0] == len(PROMPTS) * case.get("num_return_sequences", 1)


def hot_eos(dec) -> list[int]:
    """Two tokens greedy search emits early for the first two prompts."""
    seq = dec.generate(PROMPTS, max_new_tokens=4, pad_token_id=0).sequences
    return sorted({int(seq[0, -3]), int(seq[1, -2])})


@pytest.mark.parametrize("case", EOS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_early_eos_matches_transformers(tiny, case):
    _, dec, model = tiny
    eos = hot_eos(dec)
    got = dec.generate(PROMPTS, max_new_tokens=12, pad_token_id=0, eos_token_id=eos, **case)
    assert_same(got, hf_generate(model, PROMPTS, 0, max_new_tokens=12, eos_token_id=eos, **case), case["num_beams"])
    ended = [t for t in got.new_tokens if t and t[-1] in eos]
    if case.get("min_new_tokens"):
        assert all(len(t) >= case["min_new_tokens"] for t in got.new_tokens)
    elif case["num_beams"] == 1 or case["length_penalty"] <= 0:  # these favour short hypotheses
        assert any(len(t) < 12 for t in ended), "no sequence ended early on eos: the case tests nothing"


def test_greedy_streams_the_tokens_it_returns(tiny):
    _, dec, _ = tiny
    seen = []
    gen = dec.generate(PROMPTS, max_new_tokens=5, pad_token_id=0, on_token=lambda step, t: seen.append(t))
    np.testing.assert_array_equal(np.stack(seen, axis=1), gen.sequences[:, -5:])
    assert gen.scores.shape == (3,) and (gen.scores < 0).all()


def test_bad_generation_options_are_named(tiny):
    _, dec, _ = tiny
    bad = [
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
        (dict(num_beams=2, on_token=print), "on_token"),
        (dict(num_beams=2, eos_token_id=[2, 3, 4, 5]), "candidates"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=0), "num_beams"),
        (dict(eos_token_id=[500]), "vocabulary"),
    ]
    for kw, word in bad:
        with pytest.raises(InputError, match=word):
            dec.generate(PROMPTS, **{"max_new_tokens": 3, **kw})
