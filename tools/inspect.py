"""`fastertrt inspect`: a bundle's contents as text."""

from __future__ import annotations

import re
from pathlib import Path

from fastertrt.errors import BundleIntegrityError, BundleSchemaError
from fastertrt.runtime.manifest import read_manifest, verify_files


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


_LAYER = re.compile(r"^(.*)\.(\d+)\.(key|value)$")


def fold_per_layer(items, key=None) -> list[tuple[str, list[int] | None, list]]:
    """Group (name, payload) pairs in first-seen order: per-layer KV tensors
    (`prefix.{i}.key/value`) with the same prefix (and the same key(payload))
    fold into one (prefix, layer numbers, payloads) group; any other name stands
    alone as (name, None, [payload])."""
    out, groups = [], {}
    for name, payload in items:
        m = _LAYER.match(name)
        if not m:
            out.append((name, None, [payload]))
            continue
        k = (m.group(1), key(payload) if key else None)
        if k not in groups:
            groups[k] = (m.group(1), [], [])
            out.append(groups[k])
        groups[k][1].append(int(m.group(2)))
        groups[k][2].append(payload)
    return out


def _grouped(tensors: list) -> list[tuple[str, str, list]]:
    """(name, dtype, shape) rows with per-layer KV tensors folded into one row."""
    out = []
    for name, layers, group in fold_per_layer(((t["name"], t) for t in tensors),
                                              key=lambda t: (t["dtype"], tuple(t["shape"]))):
        if layers is not None:
            name = f"{name}.{{{min(layers)}..{max(layers)}}}.{{key,value}}"
        out.append((name, group[0]["dtype"], list(group[0]["shape"])))
    return out


def describe(bundle, layers: bool = False, engine_layers: bool = False) -> tuple[str, dict, list[str]]:
    """(text, manifest, problems). The bundle is described even when a check
    fails: the failures are listed at the end and in `problems`."""
    from fastertrt.tools.inspect_graphs import engine_layer_lines, graph_lines

    bundle = Path(bundle)
    try:
        m = read_manifest(bundle)
    except (BundleSchemaError, BundleIntegrityError) as exc:
        return _describe_unreadable(bundle, exc)
    problems = []
    try:
        verify_files(bundle, m)
    except BundleIntegrityError as exc:
        problems.append(str(exc))
    info = m["model"]
    lines = [f"bundle   {bundle.resolve()}",
             f"schema   {m['schema_version']} (fastertrt {m.get('fastertrt_version')}, created {m.get('created_utc', '?')})",
             f"model    {info.get('family')} {m['kind']} from {info.get('source', {}).get('kind')} "
             f"{info.get('source', {}).get('ref')}"]
    facts = {k: info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_length",
                                  "eos_token_id", "pad_token_id", "pooling") if info.get(k) is not None}
    if facts:
        lines.append("         " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    if info.get("config_sha256"):
        lines.append(f"config   sha256 {info['config_sha256'][:16]}...")
    exp = m.get("export") or {}
    if exp:
        vers = ", ".join(f"{k} {v}" for k, v in (exp.get("versions") or {}).items())
        lines.append(f"export   {exp.get('exporter')}, attention={exp.get('attn_implementation', '-')}; {vers}")
        par = exp.get("parity")
        lines.append(f"parity   ONNX Runtime vs torch: max abs diff {par['max_abs_diff']:.3g}, relative to output "
                     f"scale {par.get('max_rel_diff', float('nan')):.3g}" if par else
                     "parity   not checked (--no-parity)")
    rw = (m.get("rewrite") or {}).get("parity")
    if rw:
        lines.append(f"rewrite  fused vs exported graph on ONNX Runtime: max abs diff {rw['max_abs_diff']:.3g}")
    for name, g in m["graphs"].items():
        lines.append(f"graph    {name}: {g['file']} (opset {g['opset']})"
                     + (f", exported as {g['exported']}" if g.get("exported") else ""))
        for plugin, r in (g.get("rewrite") or {}).items():
            rules = ", ".join(f"{k} {v}" for k, v in r["by_rule"].items() if v)
            lines.append(f"           {plugin}: fused {r['fused']} of {r['blocks']} blocks ({rules or 'no rule applied'})")
        if g.get("ort_file"):
            lowered = ", ".join(f"{k} {v}" for k, v in (g.get("ort_lowered") or {}).items())
            lines.append(f"           ONNX Runtime runs {g['ort_file']}" + (f" ({lowered})" if lowered else ""))
        for direction in ("inputs", "outputs"):
            for name, dtype, shape in _grouped(g[direction]):
                lines.append(f"           {'in' if direction == 'inputs' else 'out':<3} {name:<40} {dtype:<8} {_dims(shape)}")
    int8 = m.get("int8")
    if int8:
        c = int8["calibration"]
        lay = c["layers"]
        lines.append(f"int8     {', '.join(g['file'] for g in int8['graphs'].values())} (+ ONNX Runtime variant); "
                     f"{lay['int8']} of {lay['total']} MatMul/Gemm INT8, {lay['smoothed_inputs']} inputs smoothed, "
                     f"{len(c['embeddings_int8'])} embedding table(s) INT8")
        pct = f" {c['percentile']}" if c.get("percentile") else ""
        lines.append(f"           method {c['method']}{pct} on {c['data']['calibration_samples']} samples from "
                     f"{c['data']['source']}; FP32 kept: {len(lay['fallback_fp32'])} by sensitivity, "
                     f"{len(lay['kept_fp32'])} head/excluded")
        for name, r in int8["report"]["outputs"].items():
            lines.append(f"           held-out {name}: mean cosine {r['mean_cosine']:.5f}, min {r['min_cosine']:.5f}, "
                         f"max abs {r['max_abs_error']:.3g}")
    stage_lines, graph_problems = graph_lines(bundle, m, layers)
    lines += stage_lines
    problems += graph_problems
    for e in m.get("engines", []):
        lines.append(f"engine   {e['graph']}: {e['file']} ({e['bytes'] / 1e6:.1f} MB, sha256 {e['sha256'][:12]})")
        lines.append(f"           {e['backend']} {e['backend_version']}, {e['precision']}, targets "
                     f"{','.join(e['compute_capabilities'])}, opt level {e.get('builder_optimization_level')}, "
                     f"built in {e['build_seconds']:.1f} s from {e['source_onnx']}")
        lines.append(f"           {e['layers']} layers; output precisions "
                     + ", ".join(f"{k} {v}" for k, v in e["output_precisions"].items()))
        lines.append("           layer types " + ", ".join(f"{k} {v}" for k, v in list(e["layer_types"].items())[:8])
                     + (" ..." if len(e["layer_types"]) > 8 else ""))
        plugins = ", ".join(f"{p['name']} v{p.get('version', '?')} x{p.get('count', '?')}"
                            for p in e.get("plugins", [])) or "none"
        lines.append(f"           plugins {plugins}")
        for i, prof in enumerate(e["profiles"]):
            dims = ", ".join(f"{d}={r[0]}:{r[1]}:{r[2]}" for d, r in prof["dims"].items())
            lines.append(f"           profile {i}: {dims}")
        if engine_layers:
            lines += engine_layer_lines(bundle, e)
    if not m.get("engines"):
        lines.append("engine   none (build with: fastertrt build BUNDLE)")
    tok = m.get("tokenizer")
    lines.append(f"tokenizer {tok['file']}" if tok else "tokenizer none (ids only)")
    total = sum(e["bytes"] for e in m["files"].values())
    verified = "all sha256 verified" if not any("damaged" in p for p in problems) else "NOT all verified"
    lines.append(f"files    {len(m['files'])} files, {total / 1e6:.1f} MB, {verified}")
    for rel, e in m["files"].items():
        lines.append(f"           {rel:<40} {e['bytes'] / 1e6:>9.2f} MB  {e['sha256'][:12]}")
    lines.append("checks   " + ("manifest schema, file hashes, plugin nodes against their ONNX functions: all pass"
                              if not problems else f"{len(problems)} problem(s):"))
    lines += [f"  PROBLEM {p}" for p in problems]
    return "\n".join(lines), m, problems


def _describe_unreadable(bundle: Path, exc: Exception) -> tuple[str, dict, list[str]]:
    """What can be said of a bundle whose manifest fails its schema or confinement
    checks: its top-level facts as far as they are readable, the files on disk, and
    the problem. Nothing in it is opened beyond manifest.json."""
    import json

    try:
        raw = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError):
        raw = None
    lines = [f"bundle   {bundle.resolve()}"]
    if isinstance(raw, dict):
        for key in ("schema_version", "fastertrt_version", "kind", "created_utc", "default_precision"):
            if isinstance(raw.get(key), (str, int)):
                lines.append(f"{key:<8} {raw[key]}" if len(key) <= 8 else f"{key} {raw[key]}")
        for key in ("graphs", "files", "engines"):
            value = raw.get(key)
            if isinstance(value, (dict, list)):
                names = ", ".join(str(k) for k in (value if isinstance(value, dict) else range(len(value))))
                lines.append(f"{key:<8} {len(value)} listed" + (f": {names[:200]}" if names else ""))
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() or p.is_symlink())
    lines.append(f"on disk  {len(on_disk)} file(s): {', '.join(on_disk[:12])}" + (" ..." if len(on_disk) > 12 else ""))
    problem = f"{type(exc).__name__}: {exc}"
    lines += ["checks   1 problem(s):", f"  PROBLEM {problem}"]
    return "\n".join(lines), raw if isinstance(raw, dict) else {}, [problem]
