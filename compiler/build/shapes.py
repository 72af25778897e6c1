"""Optimization profiles from a shape spec over the graph's named dims.

Spec: `batch=1:8:32,seq=16:128:512` (min:opt:max, or one number for a fixed
dim); several profiles separated by `;`. A dim may be scoped to one graph
(`decode.seq=1:1:4`). The decode graph's mask length `total` is `past + seq`
unless given. Decoder graphs run one row per beam: `rows` is `batch * beams`
(min, opt and max each) unless given.
"""

from __future__ import annotations

import re

from fastertrt.errors import ShapeSpecError

KNOWN_DIMS = ("batch", "beams", "rows", "seq", "past", "total")
_ITEM = re.compile(r"^(?:(?P<graph>[a-z_]+)\.)?(?P<dim>[a-z_]+)=(?P<range>\d+(?::\d+:\d+)?)$")


def default_dims(graph: str, max_length: int) -> dict:
    seq_max = max(1, min(max_length, 512 if graph == "encoder" else 2048))
    if graph == "decode":
        past_max = max(1, min(max_length, 2048) - 1)
        return {"batch": (1, 1, 8), "beams": (1, 1, 8), "seq": (1, 1, 1), "past": (1, min(128, past_max), past_max)}
    if graph == "prefill":
        return {"batch": (1, 1, 8), "beams": (1, 1, 8), "seq": (1, min(128, seq_max), seq_max)}
    return {"batch": (1, 8, 32), "seq": (1, min(128, seq_max), seq_max)}


def parse_spec(spec: str | None) -> list[dict]:
    """`a=1:2:3,b=4;a=5` -> [{(None,'a'): (1,2,3), (None,'b'): (4,4,4)}, {(None,'a'): (5,5,5)}]."""
    if not spec:
        return [{}]
    profiles = []
    for part in spec.split(";"):
        prof = {}
        for item in filter(None, (x.strip() for x in part.split(","))):
            m = _ITEM.match(item)
            if not m:
                raise ShapeSpecError(f"cannot read {item!r} in --shapes {spec!r}; write dims as "
                                     f"name=min:opt:max or name=N, e.g. batch=1:8:32,seq=16:128:512")
            nums = tuple(int(x) for x in m["range"].split(":"))
            lo, opt, hi = nums if len(nums) == 3 else nums * 3
            if not lo <= opt <= hi:
                raise ShapeSpecError(f"{item!r}: need min <= opt <= max")
            prof[(m["graph"], m["dim"])] = (lo, opt, hi)
        profiles.append(prof)
    return profiles


def graph_dims(inputs: list[dict]) -> list[str]:
    names = []
    for t in inputs:
        for d in t["shape"]:
            if isinstance(d, str) and d not in names:
                names.append(d)
    return names


def resolve_profiles(graph: str, inputs: list[dict], spec: str | None, max_length: int) -> list[dict]:
    """One dict per profile: {'dims': {name: [min, opt, max]}, 'inputs': {input: {'min','opt','max'}}}."""
    needed = graph_dims(inputs)
    out = []
    for prof in parse_spec(spec):
        unknown = sorted({d for (_, d) in prof} - set(KNOWN_DIMS) - set(needed))
        if unknown:
            raise ShapeSpecError(f"--shapes names dims {unknown} that no graph has; dims are {', '.join(KNOWN_DIMS)}")
        dims = dict(default_dims(graph, max_length))
        # An unscoped seq sizes prompts (prefill); the decode step's seq is the
        # number of new tokens per step, set only as decode.seq.
        given = {d: rng for (g, d), rng in prof.items()
                 if g == graph or (g is None and not (graph == "decode" and d == "seq"))}
        dims.update(given)
        if graph == "decode" and "past" not in given:
            hi = max(1, min(max_length, 2048) - dims["seq"][2])
            dims["past"] = (1, min(dims["past"][1], hi), hi)
        if "rows" in needed and "rows" not in given:
            b, k = dims["batch"], dims["beams"]
            dims["rows"] = (b[0] * k[0], b[1] * k[1], b[2] * k[2])
        if "total" in needed and "total" not in given:
            p, s = dims["past"], dims["seq"]
            dims["total"] = (p[0] + s[0], p[1] + s[1], p[2] + s[2])
        for d in needed:
            if d not in dims:
                raise ShapeSpecError(f"graph {graph} has a dynamic dim {d!r} that --shapes does not give")
            lo = dims[d][0]
            if d in ("batch", "beams", "rows") and lo < 1:
                raise ShapeSpecError(f"{d} must be at least 1")
            if d in ("seq", "total") and dims[d][2] > max_length:
                raise ShapeSpecError(f"{d} max {dims[d][2]} exceeds the model's {max_length} positions")
        shapes = {}
        for t in inputs:
            shapes[t["name"]] = {k: [dims[d][i] if isinstance(d, str) else int(d) for d in t["shape"]]
                                 for i, k in enumerate(("min", "opt", "max"))}
        out.append({"dims": {d: list(dims[d]) for d in needed}, "inputs": shapes})
    return out

