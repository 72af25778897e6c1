"""The inputs `compare` feeds every stage: made from a graph's input spec with
real token ids (the bundle's tokenizer on sample text, or the user's text), or
read from polygraphy's JSON input format (`polygraphy run --save-inputs`), so
`polygraphy run --load-inputs` can replay exactly what fastertrt ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastertrt.errors import InputError

BEAMS = 2  # decoder rows per prompt: the beam-search tail and KV reorder see more than one beam


def sample_texts(count: int) -> list[str]:
    """Sentences from Python's own documentation (no download), shortest first
    so the default run stays small."""
    from fastertrt.calibration.dataset import default_texts

    texts = sorted(default_texts(200), key=len)
    return [texts[(i * 37) % len(texts)] for i in range(count)]


def _token_rows(bundle: Path, manifest: dict, texts: list[str] | None, count: int, seed: int,
                max_tokens: int) -> list[list[int]]:
    from fastertrt.runtime.inputs import as_id_rows
    from fastertrt.runtime.tokenizer import TextTokenizer

    info = manifest["model"]
    vocab = int(info["vocab_size"])
    limit = min(int(info.get("max_length", max_tokens)), max_tokens)
    tok = manifest.get("tokenizer")
    if texts is not None and not tok:
        raise InputError(f"bundle {bundle} has no tokenizer, so --text cannot be used; pass token ids with "
                         f"--load-inputs FILE.json (polygraphy's input format)")
    if tok:
        tokenizer = TextTokenizer(bundle / tok["file"], limit)
        rows = tokenizer.encode(texts if texts is not None else sample_texts(count), truncate=True)
        return as_id_rows(rows, vocab, limit)
    # no tokenizer: ids drawn from the vocabulary, away from the special ids at its start
    rng = np.random.default_rng(seed)
    lengths = [max(2, limit - 5 * i) for i in range(count)]
    return [rng.integers(min(5, vocab - 1), vocab, size=n).tolist() for n in lengths]


def prefill_feeds(manifest: dict, rows: list[list[int]], beams: int = BEAMS) -> dict:
    """Left-padded prompts, each repeated for its beams, at the first beam step
    (beam 0 at score 0, the others at -1e9, as transformers starts them)."""
    from fastertrt.runtime.generation import positions
    from fastertrt.runtime.inputs import pad_rows

    info = manifest["model"]
    pad = info.get("pad_token_id")
    ids, mask = pad_rows(rows, pad if pad is not None else 0, left=True)
    ids, mask = np.repeat(ids, beams, axis=0), np.repeat(mask, beams, axis=0)
    scores = np.zeros((len(rows), beams), dtype=np.float32)
    scores[:, 1:] = -1e9
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": positions(mask),
            "beam_scores": scores, "token_bias": np.zeros(int(info["vocab_size"]), dtype=np.float32)}


def decode_feeds(session, manifest: dict, prefill: dict) -> dict:
    """One decode step after `prefill`: the cache comes from running the bundle's
    prefill graph (`session`), the new token per row is its best candidate."""
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, prefill)))
    rows = prefill["input_ids"].shape[0]
    batch, beams = prefill["beam_scores"].shape
    feeds = {"input_ids": out["candidate_tokens"][:, :beams].reshape(rows, 1).astype(np.int64),
             "attention_mask": np.concatenate([prefill["attention_mask"], np.ones((rows, 1), np.int64)], axis=1),
             "position_ids": prefill["position_ids"][:, -1:] + 1,
             "beam_scores": out["candidate_scores"][:, :beams].astype(np.float32),
             "token_bias": prefill["token_bias"],
             "beam_idx": (np.arange(batch)[:, None] * beams
                          + out["candidate_beams"][:, :beams].astype(np.int64)).reshape(-1)}
    for name in names:
        if name.startswith("present."):
            feeds["past_key_values." + name[len("present."):]] = out[name]
    spec = [t["name"] for t in manifest["graphs"]["decode"]["inputs"]]
    return {n: feeds[n] for n in spec}


def make_feeds(bundle: Path, manifest: dict, graph: str, texts: list[str] | None = None,
               iterations: int = 2, max_tokens: int = 64, seed: int = 0) -> list[dict]:
    """One feed dict per iteration. Without texts: `iterations` batches of 3, 2, ...
    sample sentences (ragged, so padding is exercised); with texts: one batch of them."""
    kind = manifest["kind"]
    if kind not in ("encoder", "decoder"):
        raise InputError(f"a {kind} bundle has no token inputs to make: pass --load-inputs FILE.json")
    batches = [None] if texts is not None else [3 - i % 2 for i in range(iterations)]
    out, offset, session = [], 0, None
    for i, count in enumerate(batches):
        if texts is None:
            # distinct sentences per iteration: skip the ones used before
            rows = _token_rows(bundle, manifest, None, offset + count, seed + i, max_tokens)[offset:]
            offset += count
        else:
            rows = _token_rows(bundle, manifest, texts, len(texts), seed + i, max_tokens)
        if kind == "encoder":
            from fastertrt.runtime.models import encoder_feeds

            out.append(encoder_feeds(manifest, rows))
        elif graph == "prefill":
            out.append(prefill_feeds(manifest, rows))
        else:
            if session is None:
                from fastertrt.tools.compare.runners import ort_session

                session = ort_session(bundle / manifest["graphs"]["prefill"]["file"])
            out.append(decode_feeds(session, manifest, prefill_feeds(manifest, rows)))
    return out


def load_feeds(path: Path, spec: list[dict]) -> list[dict]:
    """polygraphy's JSON input format: a list of {input name: array}, one per iteration."""
    from polygraphy.json import load_json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist; write one with --save-inputs or "
                         f"`polygraphy run ... --save-inputs {path.name}`")
    try:
        data = load_json(str(path), description="input data")
    except Exception as exc:  # polygraphy raises its own exception types for bad JSON
        raise InputError(f"{path} is not polygraphy's JSON input format ({type(exc).__name__}: {exc})") from exc
    data = [data] if isinstance(data, dict) else list(data)
    names = [t["name"] for t in spec]
    for i, feeds in enumerate(data):
        if not isinstance(feeds, dict):
            raise InputError(f"{path}: iteration {i} is a {type(feeds).__name__}, not a mapping of input names")
        missing, extra = [n for n in names if n not in feeds], [n for n in feeds if n not in names]
        if missing or extra:
            raise InputError(f"{path}: iteration {i} has inputs {sorted(feeds)}; the graph takes {names} "
                             f"(missing {missing}, unexpected {extra})")
        for t in spec:
            arr = np.asarray(feeds[t["name"]])
            if arr.dtype != np.dtype(t["dtype"]) or arr.ndim != len(t["shape"]):
                raise InputError(f"{path}: iteration {i} input {t['name']!r} is {arr.dtype} {list(arr.shape)}; "
                                 f"the graph takes {t['dtype']} with dims {t['shape']}")
    if not data:
        raise InputError(f"{path} holds no iterations")
    return [{t["name"]: np.asarray(feeds[t["name"]]) for t in spec} for feeds in data]


def save_feeds(feeds: list[dict], path: Path) -> None:
    from polygraphy.json import save_json

    atomic_write(path, lambda tmp: save_json(feeds, str(tmp), description="input data"))


def atomic_write(path: Path, write) -> None:
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
