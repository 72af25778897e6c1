"""The attention plugin inside TensorRT: it is used (never silently inlined), its
serialized fields carry the kernels, and on a GPU its enqueue computes attention."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastertrt.errors import BuildError
from fastertrt.plugins.attention import reference, spec
from fastertrt.plugins.attention.launch import mask_strides
from fastertrt.plugins.attention.spec import AttentionAttrs
from fastertrt.plugins.attention.trt import attrs_from_fields


def _rtx():
    from fastertrt.compiler.build.backends import load_backend

    return load_backend("tensorrt-rtx")


def _edit_plugin_nodes(src, dst, edit):
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    for node in model.graph.node:
        if node.domain == spec.DOMAIN:
            edit(node)
    onnx.save(model, str(dst))


def _fused(bundles, tmp_path, family="bert"):
    bundle = tmp_path / "b"
    shutil.copytree(bundles.tiny(family), bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    return bundle / next(iter(m["graphs"].values()))["file"]


@pytest.mark.parametrize("how", ["unknown_namespace", "no_namespace"])
def test_unregistered_plugin_fails_loudly(bundles, tmp_path, how):
    from fastertrt.compiler.build.engine import build_engine
    from fastertrt.compiler.build.shapes import resolve_profiles

    src = _fused(bundles, tmp_path)
    bad = src.with_name("bad.onnx")

    def edit(node):
        for a in list(node.attribute):
            if a.name == "plugin_namespace":
                node.attribute.remove(a)
                if how == "unknown_namespace":
                    import onnx

                    node.attribute.append(onnx.helper.make_attribute("plugin_namespace", "not_fastertrt"))

    _edit_plugin_nodes(src, bad, edit)
    m = json.loads((src.parent / "manifest.json").read_text())
    profiles = resolve_profiles("encoder", m["graphs"]["encoder"]["inputs"], "batch=1:2:4,seq=1:8:16", 64)
    match = "inlined the plugins' ONNX functions" if how == "unknown_namespace" else "lacks plugin_namespace"
    with pytest.raises(BuildError, match=match):
        build_engine(_rtx(), bad, profiles)


def test_serialized_fields_carry_the_kernels():
    """What the builder stores for a plugin (get_fields_to_serialize) recreates it
    at run time (create_plugin), with one cubin per build target."""
    from fastertrt.plugins import register_all, set_build_targets
    from fastertrt.plugins.cuda_launch import unpack_kernels

    backend = _rtx()
    trt = backend.trt
    register_all(trt)
    creator = trt.get_plugin_registry().get_creator(spec.NAME, spec.VERSION, spec.NAMESPACE)
    assert creator is not None
    attrs = AttentionAttrs(num_heads=6, kv_num_heads=2, head_size=64, scale=0.125, has_mask=1, has_past=1)
    arrays = [(k, np.array([v], dtype=np.float32 if k == "scale" else np.int32),
               trt.PluginFieldType.FLOAT32 if k == "scale" else trt.PluginFieldType.INT32)
              for k, v in attrs.to_dict().items()]  # a PluginField does not own its array
    fields = trt.PluginFieldCollection([trt.PluginField(*a) for a in arrays])
    plugin = creator.create_plugin(spec.NAME, fields, trt.TensorRTPhase.BUILD)
    assert plugin.num_outputs == 3 and plugin.plugin_namespace == spec.NAMESPACE
    plugin.io_dtype, plugin.mask_dtype = "float16", "float32"
    set_build_targets([80, 89])
    try:
        stored = plugin.get_fields_to_serialize()
    finally:
        set_build_targets([])
    again = creator.create_plugin(spec.NAME, stored, trt.TensorRTPhase.RUNTIME)
    restored, blobs = attrs_from_fields(stored)
    assert again.attrs == attrs == restored
    # a decode step (has_past) also carries the split-over-keys kernel and its combine kernel
    assert sorted(again.kernel_blobs) == sorted(blobs) == ["kernels", "kernels_combine", "kernels_split"]
    for field, kernel_name in (("kernels", "fastertrt_attention_fwd"), ("kernels_split", "fastertrt_attention_fwd"),
                               ("kernels_combine", "fastertrt_attention_combine")):
        kernels = unpack_kernels(again.kernel_blobs[field])
        assert sorted(kernels) == [80, 89]
        for cc, k in kernels.items():
            assert k.cubin[:4] == b"\x7fELF" and k.cc == cc and k.tags["kernel"] == kernel_name
            assert (k.tags["dtype"], k.tags["head_dim"]) == ("float16", 64)
            assert k.tags["split"] == (field == "kernels_split")


def test_mask_strides_broadcast():
    assert mask_strides((2, 1, 5, 9), 2, 4, 5, 9) == (45, 0, 9, 1)
    assert mask_strides((2, 1, 1, 9), 2, 4, 5, 9) == (9, 0, 0, 1)
    assert mask_strides((5, 9), 2, 4, 5, 9) == (0, 0, 9, 1)
    with pytest.raises(spec.AttentionSpecError, match="do not broadcast"):
        mask_strides((3, 1, 5, 9), 2, 4, 5, 9)


# ---- on a GPU: the plugin's enqueue body on device memory, vs the numpy reference ---------

class _Device:
    """Device buffers with cuda.bindings (no torch), freed at the end."""

    def __init__(self):
        from cuda.bindings import driver

        from fastertrt.plugins.cuda_launch import ensure_context

        self.driver = driver
        ensure_context()
        self.ptrs = []

    def put(self, array: np.ndarray) -> int:
        from fastertrt.plugins.cuda_launch import driver_call

        ptr = int(driver_call("cuMemAlloc", max(array.nbytes, 1)))
        self.ptrs.append(ptr)
        if array.nbytes:
            driver_call("cuMemcpyHtoD", ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)
        return ptr

    def get(self, ptr: int, shape, dtype) -> np.ndarray:
        from fastertrt.plugins.cuda_launch import driver_call

        out = np.empty(shape, dtype=dtype)
        driver_call("cuCtxSynchronize")
        driver_call("cuMemcpyDtoH", out.ctypes.data, ptr, out.nbytes)
        return out

    def free(self):
        from fastertrt.plugins.cuda_launch import driver_call

        for p in self.ptrs:
            driver_call("cuMemFree", p)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["encoder_mask", "decoder_gqa_past", "packed_causal_past", "decoder_split_long_past"])
def test_enqueue_matches_reference_on_gpu(case):
    from fastertrt.plugins.attention.kernels import CombineVariant, KernelVariant, compile_for_targets, compile_variant
    from fastertrt.plugins.attention.launch import max_split_workspace_bytes
    from fastertrt.plugins.attention.trt import enqueue_attention
    from fastertrt.runtime.gpu import gpu_compute_capability

    attrs = {
        "encoder_mask": AttentionAttrs(num_heads=4, kv_num_heads=4, head_size=64, scale=0.125, has_mask=1),
        "decoder_gqa_past": AttentionAttrs(num_heads=6, kv_num_heads=2, head_size=64, scale=0.125, has_mask=1,
                                           has_past=1),
        "packed_causal_past": AttentionAttrs(num_heads=4, kv_num_heads=2, head_size=32, scale=0.2, causal=1,
                                             has_past=1, qkv_packed=1),
        "decoder_split_long_past": AttentionAttrs(num_heads=6, kv_num_heads=2, head_size=64, scale=0.125,
                                                  has_mask=1, has_past=1),
    }[case]
    rng = np.random.default_rng(0)
    b, s, past = 3, 5 if "decoder" not in case else 1, 600 if "split" in case else 7
    t = s + (past if attrs.has_past else 0)
    hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size
    shapes = {"qkv": (b, s, (hq + 2 * hkv) * d), "query": (b, hq, s, d), "key": (b, hkv, s, d),
              "value": (b, hkv, s, d), "past_key": (b, hkv, past, d), "past_value": (b, hkv, past, d),
              "mask": (b, 1, s, t)}
    inputs = []
    for name in attrs.input_names():
        x = rng.normal(0, 1, shapes[name]).astype(np.float16)
        if name == "mask":
            x = np.zeros(shapes[name], dtype=np.float32)
            x[1, ..., :3] = np.finfo(np.float32).min  # left padding in row 1
        inputs.append(x)
    want = reference.run_reference(attrs, [x.astype(np.float32) for x in inputs])
    cc = int(gpu_compute_capability()[2:])
    kernels = compile_for_targets(KernelVariant("float16", d, attrs.has_mask, attrs.causal, "float32"), [cc])
    dev = _Device()
    try:
        in_ptrs = [dev.put(x) for x in inputs]
        out_ptrs = [dev.put(np.zeros(w.shape, np.float16)) for w in want]
        split = None
        if "split" in case:  # a long cache and one query row: the split-over-keys kernels
            split_variant = KernelVariant("float16", d, attrs.has_mask, attrs.causal, "float32", split=1)
            workspace = dev.put(np.zeros(max_split_workspace_bytes(b, hq, s, 64), np.uint8))
            split = ({cc: compile_variant(split_variant, cc)}, {cc: compile_variant(CombineVariant("float16", d), cc)},
                     workspace)
        enqueue_attention(attrs, kernels, [x.shape for x in inputs], in_ptrs, out_ptrs, 2, 0, split)
        got = [dev.get(p, w.shape, np.float16) for p, w in zip(out_ptrs, want)]
    finally:
        dev.free()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.astype(np.float32), w, atol=2e-2)
