"""The bundle's tokenizer, on the `tokenizers` library (no transformers)."""

from __future__ import annotations

from pathlib import Path

from fastertrt.errors import InputError


class TextTokenizer:
    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = max_length

    def encode(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        if truncate:
            self.tok.enable_truncation(self.max_length)
        else:
            self.tok.no_truncation()
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def no_tokenizer_error() -> InputError:
    return InputError("this bundle has no tokenizer (the model folder had no tokenizer.json); "
                      "pass token ids instead of text")
