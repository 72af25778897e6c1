"""The attention plugin for TensorRT (IPluginV3, Python), written once for
`tensorrt` and `tensorrt_rtx`: the module is passed in, never imported here.

Build time (no GPU needed): shapes and types come from spec.py; the Triton
kernel is compiled ahead of time for the build's GPU targets and the cubins go
into the plugin's serialized fields, so an engine carries its own kernels.
Run time: the fields are read back and enqueue launches the cubin for this GPU
with cuda-python on TensorRT's stream; the runtime needs neither Triton nor a
compiler. The KV cache concat (has_past) is two strided device copies into the
present outputs, then attention reads the whole cache from there.
"""

from __future__ import annotations

import numpy as np

from fastertrt.plugins import trt_common
from fastertrt.plugins.attention import spec
from fastertrt.plugins.attention.launch import (
    MAX_SPLITS,
    SPLIT_MAX_ROWS,
    attention_launch,
    bhsd_strides,
    block_d,
    mask_strides,
    max_split_workspace_bytes,
    packed_qkv_strides,
    split_workspace_bytes,
)
from fastertrt.plugins.attention.spec import ITEMSIZE, AttentionAttrs, AttentionSpecError
from fastertrt.plugins.cuda_launch import _driver as cuda_driver
from fastertrt.plugins.cuda_launch import driver_call

KERNELS_FIELD = "kernels"
# decode steps (has_past) also carry the split-over-keys kernel and its combine kernel
SPLIT_FIELDS = ("kernels_split", "kernels_combine")
BLOB_FIELDS = (KERNELS_FIELD, *SPLIT_FIELDS)
INT_FIELDS = ("num_heads", "kv_num_heads", "head_size", "causal", "has_mask", "has_past", "qkv_packed")


def build_targets() -> list[int]:
    from fastertrt.plugins.attention.kernels import DEFAULT_TARGETS

    return trt_common.build_targets(DEFAULT_TARGETS)


def _dtype_names(trt) -> dict:
    return {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}


def attrs_from_fields(fields) -> tuple[AttentionAttrs, dict]:
    """AttentionAttrs and the serialized kernels present ({field: bytes}) from a
    PluginFieldCollection."""
    values, kernels = {}, {}
    for f in fields:
        if f.name in BLOB_FIELDS:
            kernels[f.name] = np.asarray(f.data).astype(np.int8).tobytes()
        elif f.name in INT_FIELDS:
            values[f.name] = int(np.asarray(f.data).reshape(-1)[0])
        elif f.name == "scale":
            values["scale"] = float(np.asarray(f.data).reshape(-1)[0])
    return AttentionAttrs.from_dict(values), kernels


def _make_classes(trt):
    dtype_names = _dtype_names(trt)

    class ExprDims:
        """spec.output_shapes' dim algebra over TensorRT dimension expressions."""

        def __init__(self, builder):
            self.builder = builder

        def add(self, a, b):
            return self.builder.operation(trt.DimensionOperation.SUM, a, b)

        def const(self, n):
            return self.builder.constant(int(n))

        @staticmethod
        def value(d):
            return d.get_constant_value() if d.is_constant() else None

    class AttentionPlugin(trt_common.plugin_base(trt)):
        def __init__(self, attrs: AttentionAttrs, kernels: dict | None = None):
            super().__init__(spec.NAME, spec.VERSION, spec.NAMESPACE, len(attrs.output_names()))
            self.attrs = attrs
            self.kernel_blobs = dict(kernels or {})
            self._kernels = None
            self.io_dtype = None
            self.mask_dtype = None

        def clone(self):
            twin = AttentionPlugin(self.attrs, self.kernel_blobs)
            twin.io_dtype, twin.mask_dtype, twin._kernels = self.io_dtype, self.mask_dtype, self._kernels
            return twin

        # -- build ---------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            names = [dtype_names.get(t, str(t)) for t in input_types]
            spec.output_dtypes(self.attrs, names)  # raises with the reason on a bad type
            return [input_types[0]] * self.num_outputs

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shapes = [[d[i] for i in range(len(d))] for d in inputs]
            out = spec.output_shapes(self.attrs, shapes, ExprDims(expr_builder))
            return [trt.DimsExprs(o) for o in out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos]
            if desc.desc.format != trt.TensorFormat.LINEAR:
                return False
            io = in_out[0].desc.type
            if pos == 0:
                return io in dtype_names
            is_mask = pos < num_inputs and self.attrs.input_names()[pos] == "mask"
            return desc.desc.type == io or (is_mask and desc.desc.type == trt.DataType.FLOAT)

        def configure_plugin(self, inp, out):
            self.io_dtype = dtype_names[inp[0].desc.type]
            if self.attrs.has_mask:
                self.mask_dtype = dtype_names[inp[len(inp) - 1].desc.type]

        def get_workspace_size(self, inp, out):
            if not self.attrs.has_past:
                return 0
            dims = inp[0].max
            b_max, s_max = int(dims[0]), int(dims[1] if self.attrs.qkv_packed else dims[2])
            return max_split_workspace_bytes(b_max, self.attrs.num_heads, s_max, block_d(self.attrs.head_size))

        def get_fields_to_serialize(self):
            fields = [(name, np.array([getattr(self.attrs, name)], dtype=np.int32), trt.PluginFieldType.INT32)
                      for name in INT_FIELDS]
            fields.append(("scale", np.array([self.attrs.scale], dtype=np.float32), trt.PluginFieldType.FLOAT32))
            if KERNELS_FIELD not in self.kernel_blobs:
                self.kernel_blobs = compile_kernels(self.attrs, self.io_dtype or "float32", self.mask_dtype)
            fields += [trt_common.kernel_field(trt, name, blob) for name, blob in self.kernel_blobs.items()]
            return self.serialize(fields)

        # -- runtime -------------------------------------------------------------------
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            if self._kernels is None:
                from fastertrt.plugins.cuda_launch import unpack_kernels

                if KERNELS_FIELD not in self.kernel_blobs:
                    raise AttentionSpecError("attention plugin has no kernels: the engine was built without them")
                self._kernels = {name: unpack_kernels(blob) for name, blob in self.kernel_blobs.items()}
            dims = [tuple(int(x) for x in d.dims) for d in input_desc]
            io = dtype_names[input_desc[0].type]
            split = None
            if all(f in self._kernels for f in SPLIT_FIELDS) and workspace:
                split = (self._kernels["kernels_split"], self._kernels["kernels_combine"], int(workspace))
            enqueue_attention(self.attrs, self._kernels[KERNELS_FIELD], dims, list(inputs), list(outputs),
                              ITEMSIZE[io], int(stream), split)

    class AttentionCreator(trt_common.creator_base(trt)):
        def __init__(self):
            super().__init__(spec.NAME, spec.VERSION, spec.NAMESPACE, INT_FIELDS, ("scale",), BLOB_FIELDS)

        def create_plugin(self, name, field_collection, phase):
            attrs, kernels = attrs_from_fields(field_collection)
            return AttentionPlugin(attrs, kernels)

    return AttentionPlugin, AttentionCreator


def compile_kernels(attrs: AttentionAttrs, io_dtype: str, mask_dtype: str | None) -> dict:
    """Cubins of this node's kernel variants for the build targets, packed per plugin field."""
    try:
        from fastertrt.plugins.attention.kernels import (
            CombineVariant,
            KernelVariant,
            compile_combine,
            compile_for_targets,
        )
        from fastertrt.plugins.cuda_launch import pack_kernels
    except ImportError as exc:
        from fastertrt.errors import MissingDependencyError

        raise MissingDependencyError("building engines with fastertrt's attention plugin compiles its Triton "
                                     "kernels: pip install 'fastertrt[kernels]'") from exc
    variant = KernelVariant(io_dtype, attrs.head_size, attrs.has_mask, attrs.causal, mask_dtype or "float32")
    targets = build_targets()
    blobs = {KERNELS_FIELD: pack_kernels(compile_for_targets(variant, targets))}
    if attrs.has_past:
        split = KernelVariant(io_dtype, attrs.head_size, attrs.has_mask, attrs.causal, mask_dtype or "float32", 1)
        blobs["kernels_split"] = pack_kernels(compile_for_targets(split, targets))
        combine = CombineVariant(io_dtype, attrs.head_size)
        blobs["kernels_combine"] = pack_kernels({cc: compile_combine(combine, cc) for cc in targets})
    return blobs


def enqueue_attention(attrs: AttentionAttrs, kernels: dict, dims: list, inputs: list, outputs: list,
                      itemsize: int, stream: int, split: tuple | None = None) -> None:
    """Launch one plugin node on device pointers (the body of enqueue, also what
    the GPU tests call). dims: the input shapes in spec order. split: (split kernels,
    combine kernels, workspace pointer) for the split-over-keys path."""

    named = dict(zip(attrs.input_names(), zip(dims, inputs)))
    hq, hkv, d = attrs.num_heads, attrs.kv_num_heads, attrs.head_size
    if attrs.qkv_packed:
        (b, s, _), base = named["qkv"]
        offsets, strides = packed_qkv_strides(hq, hkv, s, d)
        q_ptr, k_ptr, v_ptr = (base + off * itemsize for off in offsets)
        q_strides = k_strides = v_strides = strides
        new = s
    else:
        (b, _, s, _), q_ptr = named["query"]
        (_, _, new, _), k_ptr = named["key"]
        v_ptr = named["value"][1]
        q_strides, k_strides, v_strides = bhsd_strides(b, hq, s, d), bhsd_strides(b, hkv, new, d), \
            bhsd_strides(b, hkv, new, d)
    t = new
    if attrs.has_past:
        past = named["past_key"][0][2]
        t = past + new
        for src_past, src_new, new_strides, dst in ((named["past_key"][1], k_ptr, k_strides, outputs[1]),
                                                     (named["past_value"][1], v_ptr, v_strides, outputs[2])):
            copy_into_cache(dst, src_past, src_new, new_strides, b, hkv, past, new, d, itemsize, stream)
        k_ptr, v_ptr = outputs[1], outputs[2]
        k_strides = v_strides = bhsd_strides(b, hkv, t, d)
    mask_ptr, m_strides = 0, None
    if attrs.has_mask:
        mask_dims, mask_ptr = named["mask"]
        m_strides = mask_strides(mask_dims, b, hq, s, t)
    if split is not None:
        # get_workspace_size asked for this much at the profile's largest B (and S)
        split = (*split, split_workspace_bytes(b, hq, min(s, SPLIT_MAX_ROWS), MAX_SPLITS, block_d(d)))
    attention_launch(kernels, q_ptr, k_ptr, v_ptr, mask_ptr, outputs[0], q_strides, k_strides, v_strides,
                     bhsd_strides(b, hq, s, d), m_strides, b, hq, s, t, attrs.group, attrs.scale, stream,
                     split=split)


def copy_into_cache(dst: int, past: int, new: int, new_strides, b: int, h: int, p: int, n: int, d: int,
                    itemsize: int, stream: int) -> None:
    """present[b, h] = concat(past[b, h], new[b, h]) along the sequence, on the stream."""
    row = d * itemsize
    t = p + n
    if p:
        _copy_2d(dst, t * row, past, p * row, p * row, b * h, stream)
    if not n:
        return
    sb, sh, ss, _ = new_strides
    if ss == d and sh == n * d and sb == h * n * d:  # contiguous [B, H, N, D]: one copy
        _copy_2d(dst + p * row, t * row, new, n * row, n * row, b * h, stream)
        return
    for bi in range(b):  # strided heads (packed qkv): one copy per (batch, head)
        for hi in range(h):
            src = new + (bi * sb + hi * sh) * itemsize
            dst_bh = dst + ((bi * h + hi) * t + p) * row
            _copy_2d(dst_bh, row, src, ss * itemsize, row, n, stream)


def _copy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: int) -> None:
    driver = cuda_driver()
    desc = driver.CUDA_MEMCPY2D()
    desc.srcMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE
    desc.srcDevice = src
    desc.srcPitch = src_pitch
    desc.dstMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE
    desc.dstDevice = dst
    desc.dstPitch = dst_pitch
    desc.WidthInBytes = width
    desc.Height = height
    driver_call("cuMemcpy2DAsync", desc, driver.CUstream(stream))


def register(trt_module) -> None:
    """Register the creator with `trt_module`'s plugin registry (once per module)."""
    trt_common.register(trt_module, spec.NAME, spec.NAMESPACE, _make_classes)
