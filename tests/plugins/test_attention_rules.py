"""Attention rewrite: every family x attention implementation fuses fully with
rewrite parity, hand-built graphs that must NOT match are left alone with the
right reason, and the plugin's ONNX function agrees with the numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import DECODERS, ENCODERS, tiny_config

from fastertrt.plugins.attention import reference, spec
from fastertrt.plugins.attention.spec import AttentionAttrs
from fastertrt.tolerances import tolerance

IMPLS = ("sdpa", "eager")
REWRITE_ATOL = tolerance("rewrite").atol


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _layers(family: str) -> int:
    cfg = tiny_config(family)
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None) or cfg.n_layer)


def _check_fused(m: dict, layers: int, graphs: tuple, kv_graphs: tuple = (), relative: bool = False):

    for name in graphs:
        entry = m["graphs"][name]
        rw = entry["rewrite"][spec.NAME]
        assert rw["blocks"] == layers and rw["fused"] == layers and not rw["unfused"], (name, rw)
        assert rw["by_rule"]["kv-cache"] == (layers if name in kv_graphs else 0)
        assert entry["file"].endswith("fused.onnx") and entry["exported"] != entry["file"]
    par = m["rewrite"]["parity"]
    if relative:
        # 30 layers of FP32 reassociation (the exported sdpa graph scales Q and K by
        # sqrt(scale) each, the plugin scales Q K^T once) reach logits of magnitude ~20
        assert par["max_rel_diff"] <= REWRITE_ATOL and par["max_abs_diff"] <= 1e-3, par
    else:
        assert par["max_abs_diff"] <= REWRITE_ATOL, par


def _fused_graph_ops(bundle, name):
    import onnx

    m = _manifest(bundle)
    model = onnx.load(str(bundle / m["graphs"][name]["file"]), load_external_data=False)
    return [n.op_type for n in model.graph.node], model


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ENCODERS)
def test_tiny_encoders_fuse_every_layer(bundles, family, impl):
    bundle = bundles.tiny(family, impl)
    _check_fused(_manifest(bundle), _layers(family), ("encoder",))
    ops, model = _fused_graph_ops(bundle, "encoder")
    assert "Softmax" not in ops and ops.count(spec.NAME) == _layers(family)
    assert [(f.domain, f.name) for f in model.functions] == [(spec.DOMAIN, spec.NAME)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", DECODERS)
def test_tiny_decoders_fuse_every_layer_with_kv_cache(bundles, family, impl):
    bundle = bundles.tiny(family, impl)
    _check_fused(_manifest(bundle), _layers(family), ("prefill", "decode"), kv_graphs=("decode",))
    ops, model = _fused_graph_ops(bundle, "decode")
    # the KV-cache Concats went into the plugin: present outputs come from it
    assert "Softmax" not in ops
    producers = {o: n for n in model.graph.node for o in n.output}
    presents = [o for o in model.graph.output if o.name.startswith("present.")]
    assert len(presents) == 2 * _layers(family)
    for out in presents:
        assert producers[out.name].op_type == spec.NAME, out.name
    node = next(n for n in model.graph.node if n.op_type == spec.NAME)
    attrs = {a.name: onnx_attr(a) for a in node.attribute}
    cfg = tiny_config(family)
    assert attrs["num_heads"] == cfg.num_attention_heads
    assert attrs["kv_num_heads"] == getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert attrs["has_past"] == 1 and attrs["has_mask"] == 1
    assert attrs["plugin_namespace"] == spec.NAMESPACE


def onnx_attr(a):
    import onnx

    v = onnx.helper.get_attribute_value(a)
    return v.decode() if isinstance(v, bytes) else v


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_minilm_fuses_every_layer(bundles, impl):
    bundle = bundles.shipped("minilm", impl)
    _check_fused(_manifest(bundle), 6, ("encoder",))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_smollm2_fuses_every_layer(bundles, impl):
    bundle = bundles.shipped("smollm2", impl)  # the same bundles the generation tests use
    _check_fused(_manifest(bundle), 30, ("prefill", "decode"), kv_graphs=("decode",), relative=True)


# ---- hand-built graphs: what must and must not match -------------------------------------

B, H, S, D = "batch", 4, "seq", 16


def _attention_graph(tmp_path, variant: str = "good"):
    """Q, K, V [B, H, S, D] and an additive mask [B, 1, 1, S] -> attention, built
    like an eager export, with one planted difference per variant."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [B, H, S, D]) for n in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("mask", f, [B, 1, 1, S]))
    scale = np.array(1 / np.sqrt(D), dtype=np.float32)
    if variant == "per_head_scale":  # a scale tensor, not a scalar
        scale = np.linspace(0.1, 0.4, H, dtype=np.float32).reshape(1, H, 1, 1)
    inits = [onnx.numpy_helper.from_array(scale, "scale")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]),
             helper.make_node("Mul", ["qk", "scale"], ["scores"])]
    axis = 2 if variant == "wrong_axis" else -1
    if variant == "mask_after_softmax":
        nodes += [helper.make_node("Softmax", ["scores"], ["p0"], axis=axis),
                  helper.make_node("Add", ["p0", "mask"], ["probs"])]
    else:
        nodes += [helper.make_node("Add", ["scores", "mask"], ["masked"]),
                  helper.make_node("Softmax", ["masked"], ["probs"], axis=axis)]
    nodes.append(helper.make_node("MatMul", ["probs", "v"], ["out"]))
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", f, [B, H, S, D])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    path = tmp_path / f"{variant}.onnx"
    onnx.save(model, str(path))
    return path


def _feeds(rng, b=2, s=7):
    # large-magnitude inputs: peaked softmax, so attention mistakes show in the output
    q, k, v = (rng.normal(0, 3, (b, H, s, D)).astype(np.float32) for _ in range(3))
    mask = np.zeros((b, 1, 1, s), dtype=np.float32)
    mask[1, ..., s - 3:] = np.finfo(np.float32).min
    return {"q": q, "k": k, "v": v, "mask": mask}


def _run(path, feeds):
    from fastertrt.compiler.export.parity import ort_session

    return ort_session(path, optimize=False).run(None, feeds)[0]


def test_hand_built_attention_fuses_and_matches(tmp_path):
    from fastertrt.compiler.rewrite import rewrite_file

    src = _attention_graph(tmp_path, "good")
    dst = tmp_path / "good.fused.onnx"
    (report,) = rewrite_file(src, dst)
    assert (report.blocks, report.fused) == (1, 1)
    feeds = _feeds(np.random.default_rng(0))
    ref, got = _run(src, feeds), _run(dst, feeds)
    assert np.abs(ref - got).max() <= REWRITE_ATOL
    # the test can fail: attention with this data is far from uniform
    assert np.abs(ref - feeds["v"].mean(axis=2, keepdims=True)).max() > 0.5


@pytest.mark.parametrize("variant, reason", [
    ("mask_after_softmax", "mask added after the softmax"),
    ("per_head_scale", "constant scalar"),
    ("wrong_axis", "axis 2"),
])
def test_graphs_that_must_not_match(tmp_path, variant, reason):
    from fastertrt.compiler.rewrite import RewriteError, rewrite_file

    src = _attention_graph(tmp_path, variant)
    dst = tmp_path / f"{variant}.fused.onnx"
    with pytest.raises(RewriteError) as err:
        rewrite_file(src, dst)
    assert "fused 0 of 1" in str(err.value) and "--allow-partial" in str(err.value)
    assert not dst.exists()
    (report,) = rewrite_file(src, dst, allow_partial=True)
    assert report.fused == 0 and len(report.unfused) == 1
    why = report.unfused[0]["reasons"]["core"]
    assert reason in why, why
    feeds = _feeds(np.random.default_rng(1))
    np.testing.assert_array_equal(_run(src, feeds), _run(dst, feeds))


# ---- the ONNX function and the numpy reference -------------------------------------------

def _function_model(attrs: AttentionAttrs, shapes: dict, dtype):
    import onnx
    from onnx import helper

    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT if n == "mask" else elem, shapes[n])
              for n in attrs.input_names()]
    outputs = [helper.make_tensor_value_info(n, elem, None) for n in attrs.output_names()]
    node = helper.make_node(spec.NAME, attrs.input_names(), attrs.output_names(), domain=spec.DOMAIN,
                            plugin_version=spec.VERSION, plugin_namespace=spec.NAMESPACE, **attrs.to_dict())
    node.overload = attrs.overload()
    graph = helper.make_graph([node], "one_node", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(spec.DOMAIN, 1)],
                             functions=[reference.onnx_function(attrs, 20)], ir_version=10)


CASES = {
    "mha_mask": dict(num_heads=4, kv_num_heads=4, head_size=8, has_mask=1),
    "gqa_past_mask": dict(num_heads=6, kv_num_heads=2, head_size=8, has_mask=1, has_past=1),
    "causal_past": dict(num_heads=4, kv_num_heads=2, head_size=16, causal=1, has_past=1),
    "packed_causal": dict(num_heads=4, kv_num_heads=2, head_size=8, causal=1, qkv_packed=1),
    "packed_past_mask": dict(num_heads=2, kv_num_heads=2, head_size=8, qkv_packed=1, has_past=1, has_mask=1),
}


def _case_inputs(attrs: AttentionAttrs, rng, b=2, s=5, past=3, dtype=np.float32):
    hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size
    t = s + (past if attrs.has_past else 0)
    data = {}
    if attrs.qkv_packed:
        data["qkv"] = rng.normal(0, 2, (b, s, (hq + 2 * hkv) * d))
    else:
        data["query"] = rng.normal(0, 2, (b, hq, s, d))
        data["key"] = rng.normal(0, 2, (b, hkv, s, d))
        data["value"] = rng.normal(0, 2, (b, hkv, s, d))
    if attrs.has_past:
        data["past_key"] = rng.normal(0, 2, (b, hkv, past, d))
        data["past_value"] = rng.normal(0, 2, (b, hkv, past, d))
    data = {k: v.astype(dtype) for k, v in data.items()}
    if attrs.has_mask:
        mask = np.zeros((b, 1, s, t), dtype=np.float32)
        mask[0, ..., :2] = -np.inf  # ragged left padding in row 0
        mask[1, ..., 1, :] = -np.inf  # a query row with no visible key: zeros, not NaN
        data["mask"] = mask
    return [data[n] for n in attrs.input_names()]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_function_matches_numpy_reference(case, dtype):
    import onnxruntime as ort

    attrs = AttentionAttrs(scale=0.3, **CASES[case])
    inputs = _case_inputs(attrs, np.random.default_rng(5), dtype=dtype)
    shapes = {n: list(x.shape) for n, x in zip(attrs.input_names(), inputs)}
    model = _function_model(attrs, shapes, dtype)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(attrs.input_names(), inputs)))
    want = reference.run_reference(attrs, inputs)
    assert [g.shape for g in got] == [tuple(w.shape) for w in want]
    assert [list(g.shape) for g in got] == [[x if isinstance(x, int) else None for x in s]
                                            for s in spec.output_shapes(attrs, list(shapes.values()))]
    atol = REWRITE_ATOL if dtype == np.float32 else 2e-3
    for g, w in zip(got, want):
        assert g.dtype == dtype and np.all(np.isfinite(g))
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=atol * max(1, np.abs(w).max()))
    if attrs.has_mask:
        assert not got[0][1, :, 1, :].any()  # the fully masked row


def test_spec_shapes_and_errors():
    attrs = AttentionAttrs(num_heads=8, kv_num_heads=2, head_size=64, scale=0.125, has_past=1, has_mask=1)
    shapes = [["b", 8, "s", 64], ["b", 2, "s", 64], ["b", 2, "s", 64], ["b", 2, "p", 64], ["b", 2, "p", 64],
              ["b", 1, "s", "t"]]
    assert spec.output_shapes(attrs, shapes) == [["b", 8, "s", 64], ["b", 2, "p+s", 64], ["b", 2, "p+s", 64]]
    assert spec.output_dtypes(attrs, ["float16"] * 5 + ["float32"]) == ["float16"] * 3
    with pytest.raises(spec.AttentionSpecError, match="multiple of kv_num_heads"):
        AttentionAttrs(num_heads=6, kv_num_heads=4, head_size=8, scale=1.0)
    with pytest.raises(spec.AttentionSpecError, match="axis 3; expected 64"):
        spec.output_shapes(attrs, [["b", 8, "s", 32]] + shapes[1:])
    with pytest.raises(spec.AttentionSpecError, match="type float16; expected float32"):
        spec.check_dtypes(attrs, ["float32", "float16"] + ["float32"] * 4)
    with pytest.raises(spec.AttentionSpecError, match="unknown attention attribute"):
        AttentionAttrs.from_dict({**attrs.to_dict(), "window": 3})
    assert AttentionAttrs.from_dict({**attrs.to_dict(), "plugin_version": "1"}) == attrs
