"""Calibration sample data: read, tokenize, split, batch.

Formats: a text file (one sample a line), JSONL (one object a line, text in a
field), or .npz with a 2-D `input_ids` array (and optionally `attention_mask`,
else every id counts). With no file, a default English sample set that ships
with Python (the pydoc topic texts) is used, with a warning.

The held-out split is chosen by a hash of each sample's token ids, so it does
not depend on the order of the file and is the same on every run.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastertrt.errors import CalibrationDataError

DEFAULT_SAMPLES = 600
HELD_OUT_FRACTION = 0.2


@dataclass
class SampleSet:
    """Token id rows for calibration and for the held-out accuracy report."""

    calib: list[list[int]]
    held_out: list[list[int]]
    source: str
    digest: str
    truncated: int = 0
    dropped_empty: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"source": self.source, "sha256": self.digest, "calibration_samples": len(self.calib),
                "held_out_samples": len(self.held_out), "truncated": self.truncated,
                "dropped_empty": self.dropped_empty,
                "calibration_tokens": int(sum(len(r) for r in self.calib))}


def default_texts(limit: int = DEFAULT_SAMPLES) -> list[str]:
    """English sentences from the Python documentation topics in the standard
    library: no download, the same on every machine with the same Python."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise CalibrationDataError(
            "no calibration data given and this Python lacks pydoc_data (the default sample text); pass "
            "--calib-data FILE with text from your own domain") from exc
    out = set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sent in re.split(r"(?<=[.!?])\s+", text):
            sent = sent.strip()
            if 30 <= len(sent) <= 600 and sum(c.isalpha() for c in sent) > 0.5 * len(sent):
                out.add(sent)
    ranked = sorted(out, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    return ranked[:limit]


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """Samples of a .txt or .jsonl file, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration data file {path} does not exist")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path}:{no} is not valid JSON ({exc.msg}); JSONL needs one object "
                                           f"a line") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CalibrationDataError(f"{path}:{no} has no field {text_field!r} (found {keys}); "
                                           f"pass --calib-field NAME")
            texts.append(str(obj[text_field]))
    else:
        texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise CalibrationDataError(f"calibration data file {path} holds no samples (it is empty or blank); "
                                   f"give one sample a line")
    return texts


def read_id_rows(path: Path) -> list[list[int]]:
    """Token id rows of an .npz: input_ids [N, L] (+ attention_mask [N, L])."""
    ids, mask = _npz_arrays(path)
    mask = np.ones_like(ids) if mask is None else mask
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or mask.shape != ids.shape:
        raise CalibrationDataError(f"{path}: input_ids must be a 2-D integer array [samples, tokens] with an "
                                   f"attention_mask of the same shape; got {ids.dtype} {ids.shape}")
    return [[int(t) for t in row[m.astype(bool)]] for row, m in zip(ids, mask)]


def _npz_arrays(path: Path):
    """(input_ids, attention_mask or None) of an .npz, or CalibrationDataError when
    the file is no readable .npz (random bytes, a cut-off download, a renamed .npy,
    pickled object arrays)."""
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        data = np.load(path, allow_pickle=False)
    except unreadable as exc:
        # numpy takes unknown bytes for a pickle and suggests allow_pickle: not advice to pass on
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a zip archive of .npy arrays"
        raise CalibrationDataError(f"{path} is not a readable .npz file ({reason}); save the "
                                   f"token ids with numpy.savez(path, input_ids=ids, attention_mask=mask)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CalibrationDataError(f"{path} holds a single array (.npy data), not an .npz archive; save the "
                                   f"token ids with numpy.savez(path, input_ids=ids)")
    with data:
        if "input_ids" not in data:
            raise CalibrationDataError(f"{path} has no 'input_ids' array (found {sorted(data.files)})")
        try:
            return data["input_ids"], data["attention_mask"] if "attention_mask" in data else None
        except unreadable as exc:
            raise CalibrationDataError(f"{path}: its arrays cannot be read ({type(exc).__name__}: {exc}); save "
                                       f"plain integer arrays with numpy.savez") from None


def _digest(rows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(np.asarray(row, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _held_out(row: list[int], fraction: float) -> bool:
    key = hashlib.sha1(np.asarray(row, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(key[:4], "little") / 2**32 < fraction


def load_samples(tokenizer_file: Path | None, max_length: int, data: Path | None = None, text_field: str = "text",
                 vocab_size: int | None = None, held_out_fraction: float = HELD_OUT_FRACTION,
                 max_samples: int | None = None) -> SampleSet:
    """Read and tokenize the samples, truncate to max_length, split off the held-out part."""
    warnings = []
    if data is not None and Path(data).suffix.lower() == ".npz":
        if not Path(data).is_file():
            raise CalibrationDataError(f"calibration data file {data} does not exist")
        rows, specials, source = read_id_rows(Path(data)), None, str(data)
    else:
        if data is None:
            texts, source = default_texts(), "default English sample set (pydoc topics)"
            warnings.append("no --calib-data given: calibrating on fastertrt's default English sample set; "
                            "a few hundred samples from your own domain calibrate better")
        else:
            texts, source = read_texts(Path(data), text_field), str(data)
        if tokenizer_file is None:
            raise CalibrationDataError("this bundle has no tokenizer, so text samples cannot be used; pass an "
                                       ".npz file with an input_ids array")
        rows, specials = _tokenize(tokenizer_file, texts)
    if max_samples:
        rows = rows[:max_samples]
        specials = specials[:max_samples] if specials is not None else None
    kept, empty, truncated = [], 0, 0
    for i, row in enumerate(rows):
        content = len(row) - (sum(specials[i]) if specials is not None else 0)
        if content <= 0:
            empty += 1
            continue
        if len(row) > max_length:
            truncated += 1
            row = row[:max_length]
        kept.append(row)
    if not kept:
        raise CalibrationDataError(f"every one of the {len(rows)} samples in {source} tokenizes to nothing "
                                   f"(no tokens besides special ones); give samples with text in them")
    if vocab_size:
        bad = sorted({t for r in kept for t in r if not 0 <= t < vocab_size})
        if bad:
            raise CalibrationDataError(f"{source} has token ids outside the model's vocabulary (0..{vocab_size - 1}): "
                                       f"{bad[:5]}")
    if empty:
        warnings.append(f"{empty} sample(s) tokenize to nothing and were skipped")
    if truncated:
        warnings.append(f"{truncated} sample(s) are longer than the model's {max_length} positions and were "
                        f"truncated to {max_length} tokens")
    if len(kept) < 2:
        raise CalibrationDataError(f"{source} gives {len(kept)} usable sample; calibration needs at least 2 "
                                   f"(some to calibrate on, some held out for the accuracy report)")
    held = [r for r in kept if _held_out(r, held_out_fraction)]
    calib = [r for r in kept if not _held_out(r, held_out_fraction)]
    if not held:  # tiny sets: keep the report meaningful
        held, calib = calib[-1:], calib[:-1]
    if not calib:
        calib, held = held[:-1], held[-1:]
    return SampleSet(calib, held, source, _digest(kept), truncated, empty, warnings)


def _tokenize(tokenizer_file: Path, texts: list[str]):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.no_truncation()
    enc = tok.encode_batch(list(texts), add_special_tokens=True)
    return [e.ids for e in enc], [e.special_tokens_mask for e in enc]


def batches(rows: list[list[int]], batch_size: int, pad_id: int = 0):
    """(ids, mask) arrays, rows of similar length together (length bucketing),
    right padded to the longest row of each batch, in a fixed order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        width = max(len(r) for r in chunk)
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        for k, r in enumerate(chunk):
            ids[k, :len(r)] = r
            mask[k, :len(r)] = 1
        yield ids, mask
