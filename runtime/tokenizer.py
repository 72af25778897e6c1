"""The bundle's tokenizer, on the `tokenizers` library (no transformers)."""

from __future__ import annotations

from pathlib import Path

from fastertrt.errors import BundleError, InputError


class TextTokenizer:
    """Safe to call from many threads: truncation is a setting of a `tokenizers`
    Tokenizer, so one is kept per mode, each set once here and never changed
    (flipping one shared setting per call let a call tokenize under another
    call's mode). Encoding and decoding only read them."""

    def __init__(self, path: Path, max_length: int):
        self.max_length = max_length
        self.tok = _load(path)  # no truncation; also decodes
        self.truncating = _load(path)
        self.truncating.enable_truncation(max_length)

    def encode(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        tok = self.truncating if truncate else self.tok
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _load(path: Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for bad JSON
        raise BundleError(f"the bundle's tokenizer {Path(path).name} cannot be read ({exc}); the file is damaged "
                          f"or not a `tokenizers` tokenizer.json. Recompile the bundle") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def no_tokenizer_error() -> InputError:
    return InputError("this bundle has no tokenizer (the model folder had no tokenizer.json); "
                      "pass token ids instead of text")
