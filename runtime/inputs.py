"""Validation of what users hand to encode()/generate(): each problem is an
InputError that says what to change."""

from __future__ import annotations

import math

import numpy as np

from fastertrt.errors import InputError


def as_texts(inputs) -> list[str] | None:
    """A list of strings if `inputs` is text, else None."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, str) for x in inputs):
        return list(inputs)
    return None


def as_id_rows(inputs, vocab_size: int, max_length: int, what: str = "token ids") -> list[list[int]]:
    """A batch of token id rows from a 2-D int array or a list of int lists (rows
    may differ in length). Rejects empty input, wrong rank, non-integer dtypes and
    ids outside [0, vocab_size)."""
    if inputs is None or (hasattr(inputs, "__len__") and len(inputs) == 0):
        raise InputError(f"empty input: give at least one text or one row of {what}")
    if isinstance(inputs, np.ndarray):
        if inputs.ndim != 2:
            raise InputError(f"{what} must be a batch of rank 2 [batch, seq], got shape {inputs.shape}; "
                             f"wrap a single sequence as ids[None, :]")
        if not np.issubdtype(inputs.dtype, np.integer):
            raise InputError(f"{what} must be integers, got dtype {inputs.dtype}; use .astype(np.int64)")
        rows = [list(map(int, r)) for r in inputs]
    elif isinstance(inputs, (list, tuple)):
        rows = []
        for i, row in enumerate(inputs):
            if isinstance(row, np.ndarray):
                if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
                    raise InputError(f"row {i} of {what} must be a 1-D integer array, got {row.dtype} shape {row.shape}")
                row = row.tolist()
            if not isinstance(row, (list, tuple)):
                raise InputError(f"{what} must be a batch (a list of rows), but item {i} is "
                                 f"{type(row).__name__}; wrap a single sequence as [ids]")
            if any(isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) for x in row):
                bad = next(x for x in row if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)))
                raise InputError(f"row {i} of {what} holds {type(bad).__name__} {bad!r}; token ids must be int")
            rows.append([int(x) for x in row])
    else:
        raise InputError(f"expected text (str or list of str) or {what} (2-D int array or list of lists), "
                         f"got {type(inputs).__name__}")
    for i, row in enumerate(rows):
        if not row:
            raise InputError(f"row {i} of {what} is empty; every row needs at least one token")
        if len(row) > max_length:
            raise InputError(f"row {i} has {len(row)} tokens, more than this bundle's max length {max_length}; "
                             f"shorten it (texts are truncated automatically)")
        lo, hi = min(row), max(row)
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise InputError(f"row {i} holds token id {bad}, outside the vocabulary [0, {vocab_size}); "
                             f"were these ids made by another model's tokenizer?")
    return rows


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int64 arrays, padded on the left (decoders) or right (encoders)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def check_feeds(spec: list[dict], feeds: dict, graph: str) -> None:
    """Names, ranks, dtypes and fixed dims of a graph's feeds against its input
    spec ([{name, dtype, shape}], dims an int when fixed, a name or -1 when
    dynamic). Every backend calls this before its first device or session call,
    so a bad feed is the same InputError on ONNX Runtime and TensorRT."""
    names = [t["name"] for t in spec]
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise InputError(f"graph {graph} takes inputs {names}; missing {missing}, unexpected {extra}")
    for t in spec:
        arr = feeds[t["name"]]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"input {t['name']!r} is a {type(arr).__name__}; pass a numpy array of {t['dtype']}")
        if arr.ndim != len(t["shape"]):
            raise InputError(f"input {t['name']!r} has rank {arr.ndim} (shape {arr.shape}); "
                             f"expected rank {len(t['shape'])} with dims {t['shape']}")
        if arr.dtype != np.dtype(t["dtype"]):
            raise InputError(f"input {t['name']!r} has dtype {arr.dtype}; expected {t['dtype']}. "
                             f"Convert with .astype(np.{t['dtype']})")
        for i, (got, want) in enumerate(zip(arr.shape, t["shape"])):
            if isinstance(want, int) and want >= 0 and got != want:
                raise InputError(f"input {t['name']!r} has size {got} on axis {i}; the graph fixes it to {want}")


# --- options -----------------------------------------------------------------------
def _is_int(value) -> bool:
    # bool is an int subclass, but True as a count or a token id is always a mistake
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def int_option(name: str, value, low: int | None = None, high: int | None = None, error=InputError) -> int:
    """`value` as a Python int: ints and numpy integers in [low, high) pass; bools,
    floats, strings and values out of range raise `error` naming the option."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value >= high):
        raise error(f"{name} must be {_int_rule(low, high)}, got {value!r} ({type(value).__name__})")
    return int(value)


def _int_rule(low, high) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high})"
    return "an int" + (f" >= {low}" if low is not None else "") + (f" < {high}" if high is not None else "")


def real_option(name: str, value, error=InputError) -> float:
    """`value` as a finite float: ints, floats and their numpy kinds; not bool, NaN or inf."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not (_is_int(value) or math.isfinite(value)):
        raise error(f"{name} must be a finite real number, got {value!r} ({type(value).__name__})")
    return float(value)


def token_ids_option(name: str, value, vocab_size: int) -> list[int]:
    """One token id or a sequence of them (e.g. eos_token_id), each in [0, vocab_size)."""
    items = [value] if _is_int(value) else value
    if isinstance(items, np.ndarray) and items.ndim == 1:
        items = items.tolist()
    if not isinstance(items, (list, tuple)) or not all(_is_int(v) and 0 <= v < vocab_size for v in items):
        raise InputError(f"{name} must be a token id or a list of token ids in the vocabulary [0, {vocab_size}), "
                         f"got {value!r}")
    return [int(v) for v in items]
