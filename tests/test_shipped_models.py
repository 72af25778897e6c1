"""The two shipped real models, end to end: compile, then the runtime (no torch
in its code path) against torch/transformers on real text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastertrt.runtime import load
from fastertrt.tolerances import tolerance

pytestmark = pytest.mark.slow

SENTENCES = [
    "TensorRT turns trained networks into fast inference engines.",
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text of any length to a fixed vector, which makes semantic search cheap.",
    "ok",
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_minilm_matches_sentence_transformers_math(bundles, impl):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fastertrt.compiler.models import resolve

    bundle = bundles.shipped("minilm", impl)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["model"]["pooling"] == {"mode": "mean", "normalize": True, "max_seq_length": 256}
    assert m["export"]["parity"]["max_abs_diff"] <= tolerance("export").atol

    out = load(bundle).encode(SENTENCES)
    folder = resolve("minilm").folder
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), attn_implementation=impl).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    np.testing.assert_array_equal(out["attention_mask"], batch["attention_mask"].numpy())
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    emb = out["sentence_embedding"]
    assert np.abs(emb - ref).max() <= tolerance("runtime").atol
    cos = (emb * ref).sum(-1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= tolerance("runtime").min_cosine
    # semantic sanity that a broken graph would fail: a sentence is closest to itself
    sims = emb @ emb.T
    assert (sims.argmax(axis=1) == np.arange(len(SENTENCES))).all()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_smollm2_greedy_matches_transformers_generate(bundles, impl):
    import torch

    from fastertrt.compiler.models import resolve

    bundle = bundles.shipped("smollm2", impl)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["model"]["num_kv_heads"] == 3 and m["model"]["num_layers"] == 30
    # 30 FP32 layers: ~5e-4 absolute on logits of magnitude ~30, so the bound is relative to scale
    assert m["export"]["parity"]["max_rel_diff"] <= tolerance("export").atol

    dec = load(bundle)
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    gen = dec.generate(prompts, max_new_tokens=8)

    src = resolve("smollm2")
    tok = src.load_tokenizer()
    tok.padding_side = "left"
    model = src.load_torch(impl)
    batch = tok(prompts, padding=True, return_tensors="pt")
    np.testing.assert_array_equal(dec.tokenizer.encode(prompts[:1])[0], tok(prompts[0])["input_ids"])
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(gen.sequences, ref.numpy())
    assert gen.texts[0] == tok.decode(ref[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


SMOL_BEAM_CASES = [
    dict(num_beams=2),
    dict(num_beams=4, early_stopping=True),
    dict(num_beams=4, length_penalty=0.7, num_return_sequences=2),
    dict(num_beams=4, early_stopping=False, length_penalty=0.0, eos="hot"),
    # chat prompts: the model's own eos (<|im_end|>) ends answers early
    dict(num_beams=1, eos="model"),
    dict(num_beams=4, early_stopping=True, length_penalty=0.0, eos="model"),
]
CHAT = ["<|im_start|>user\nReply with one word: is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"]


def test_smollm2_beam_search_matches_transformers_generate(bundles):
    """Beam search over the 30-layer GQA model, prompts of different lengths, token
    for token and sequence scores within 1e-4; one case ends hypotheses early on eos."""
    import torch

    from fastertrt.compiler.models import resolve

    dec = load(bundles.shipped("smollm2", "sdpa"))
    src = resolve("smollm2")
    tok = src.load_tokenizer()
    tok.padding_side = "left"
    model = src.load_torch("sdpa")
    plain = ["The capital of France is", "Write a haiku about the sea:\n"]
    greedy = dec.generate(plain, max_new_tokens=4).sequences
    hot = [int(greedy[0, -2])]  # a token greedy search emits early: as eos it ends hypotheses
    for case in SMOL_BEAM_CASES:
        kw = {k: v for k, v in case.items() if k != "eos"}
        prompts, new = (CHAT, 12) if case.get("eos") == "model" else (plain, 8)
        if case.get("eos") == "hot":
            kw["eos_token_id"] = hot
        got = dec.generate(prompts, max_new_tokens=new, **kw)
        with torch.no_grad():
            ref = model.generate(**tok(prompts, padding=True, return_tensors="pt"), max_new_tokens=new,
                                 do_sample=False, return_dict_in_generate=True, output_scores=True,
                                 pad_token_id=dec.pad_token_id, **kw)
        np.testing.assert_array_equal(got.sequences, ref.sequences.numpy(), err_msg=str(case))
        if kw["num_beams"] > 1:
            np.testing.assert_allclose(got.scores, ref.sequences_scores.numpy(), atol=1e-4, rtol=0,
                                       err_msg=str(case))
        if case.get("eos"):
            eos = hot if case["eos"] == "hot" else dec.eos_token_id
            assert any(t[-1] in eos and len(t) < new for t in got.new_tokens), case
