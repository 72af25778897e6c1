"""Seeded tiny transformers of every supported family, saved as Hugging Face
folders, plus a tiny word-level tokenizer so the text path is exercised too."""

from __future__ import annotations

from pathlib import Path

VOCAB = 99
FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama")
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("gpt2", "llama")
WORDS = ["the", "a", "model", "engine", "fast", "tensor", "cache", "layer", "token", "text", "is", "runs", "on", "gpu"]


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             max_position_embeddings=64, type_vocab_size=2, **common)
    if family == "roberta":
        return tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=66, type_vocab_size=1, vocab_size=VOCAB, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        # grouped-query attention: 4 query heads share 2 KV heads; RoPE positions
        return tf.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cls = tf.AutoModelForCausalLM if family in DECODERS else tf.AutoModel
    return cls.from_config(cfg).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS, as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny(family: str, folder: Path, with_tokenizer: bool = True) -> Path:
    model = tiny_model(family)
    model.save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def left_pad(rows, pad: int):
    """(ids, mask) int64 arrays for prompts of different lengths, padded on the left
    as transformers' generate expects."""
    import numpy as np

    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask
