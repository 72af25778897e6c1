"""The beam-step plugin for TensorRT (IPluginV3, Python), for `tensorrt` and
`tensorrt_rtx` alike (the module is passed in, never imported here).

Build time (no GPU): shapes and types from spec.py; the Triton kernels are
compiled ahead of time for the build's targets and travel in the plugin's
serialized fields. Run time: enqueue launches the cubins for this GPU on
TensorRT's stream through launch.py, with TensorRT's workspace as the kernels'
scratch (per-block candidates and partial log-sum-exps).
"""

from __future__ import annotations

import numpy as np

from fastertrt.plugins import trt_common
from fastertrt.plugins.beam_search import spec
from fastertrt.plugins.beam_search.spec import BeamStepAttrs, BeamStepSpecError

INT_FIELDS = ("candidates", "has_bias")


def _kernel_fields() -> tuple[str, ...]:
    from fastertrt.plugins.beam_search.kernels import FIELD_NAMES

    return FIELD_NAMES


def build_targets() -> list[int]:
    from fastertrt.plugins.beam_search.kernels import DEFAULT_TARGETS

    return trt_common.build_targets(DEFAULT_TARGETS)


def attrs_from_fields(fields) -> tuple[BeamStepAttrs, dict]:
    values, kernels = {}, {}
    for f in fields:
        if f.name in INT_FIELDS:
            values[f.name] = int(np.asarray(f.data).reshape(-1)[0])
        elif f.name.startswith("kernels"):
            blob = np.asarray(f.data).astype(np.int8).tobytes()
            if len(blob) > 1:  # the creator's placeholder is one byte
                kernels[f.name] = blob
    return BeamStepAttrs.from_dict(values), kernels


def _make_classes(trt):
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
             trt.DataType.INT32: "int32"}

    class ExprDims:
        def __init__(self, builder):
            self.builder = builder

        def mul(self, a, c):
            return a if c == 1 else self.builder.operation(trt.DimensionOperation.PROD, a, self.builder.constant(c))

        @staticmethod
        def value(d):
            return d.get_constant_value() if d.is_constant() else None

    class BeamStepPlugin(trt_common.plugin_base(trt)):
        def __init__(self, attrs: BeamStepAttrs, kernels: dict | None = None):
            super().__init__(spec.NAME, spec.VERSION, spec.NAMESPACE, 3)
            self.attrs = attrs
            self.kernel_blobs = dict(kernels or {})
            self._kernels = None
            self.logits_dtype = None

        def clone(self):
            twin = BeamStepPlugin(self.attrs, self.kernel_blobs)
            twin.logits_dtype, twin._kernels = self.logits_dtype, self._kernels
            return twin

        # -- build ---------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            spec.output_dtypes(self.attrs, [names.get(t, str(t)) for t in input_types])
            return [trt.DataType.FLOAT, trt.DataType.INT32, trt.DataType.INT32]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shapes = [[d[i] for i in range(len(d))] for d in inputs]
            return [trt.DimsExprs(o) for o in spec.output_shapes(self.attrs, shapes, ExprDims(expr_builder))]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return names.get(desc.type) in spec.LOGIT_DTYPES
            if pos < num_inputs or pos == num_inputs:  # beam scores, bias, output scores
                return desc.type == trt.DataType.FLOAT
            return desc.type == trt.DataType.INT32

        def configure_plugin(self, inp, out):
            self.logits_dtype = names[inp[0].desc.type]

        def get_workspace_size(self, inp, out):
            from fastertrt.plugins.beam_search.launch import workspace_bytes

            rows, vocab = int(inp[0].max[0]), int(inp[0].max[1])
            k_max = min(spec.MAX_CANDIDATES, int(inp[1].max[1]) * self.attrs.candidates)
            return workspace_bytes(rows, vocab, k_max)

        def get_fields_to_serialize(self):
            fields = [(n, np.array([getattr(self.attrs, n)], dtype=np.int32), trt.PluginFieldType.INT32)
                      for n in INT_FIELDS]
            if not self.kernel_blobs:
                self.kernel_blobs = compile_kernels(self.logits_dtype or "float32", bool(self.attrs.has_bias))
            fields += [trt_common.kernel_field(trt, name, blob) for name, blob in self.kernel_blobs.items()]
            return self.serialize(fields)

        # -- runtime -------------------------------------------------------------------
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from fastertrt.plugins.beam_search.launch import beam_step_launch
            from fastertrt.plugins.cuda_launch import current_compute_capability, unpack_kernels

            if self._kernels is None:
                if not self.kernel_blobs:
                    raise BeamStepSpecError("beam-step plugin has no kernels: the engine was built without them")
                self._kernels = {name: unpack_kernels(blob) for name, blob in self.kernel_blobs.items()}
            rows, vocab = (int(x) for x in input_desc[0].dims)
            batch, beams = (int(x) for x in input_desc[1].dims)
            bias = int(inputs[2]) if self.attrs.has_bias else 0
            beam_step_launch(self._kernels, current_compute_capability(), logits=int(inputs[0]),
                             logits_dtype=names[input_desc[0].type], beam_scores=int(inputs[1]), bias=bias,
                             scores=int(outputs[0]), tokens=int(outputs[1]), beams=int(outputs[2]),
                             workspace=int(workspace), batch=batch, num_beams=beams, vocab=vocab,
                             k=beams * self.attrs.candidates, stream=int(stream))

    class BeamStepCreator(trt_common.creator_base(trt)):
        def __init__(self):
            super().__init__(spec.NAME, spec.VERSION, spec.NAMESPACE, INT_FIELDS, (), _kernel_fields())

        def create_plugin(self, name, field_collection, phase):
            attrs, kernels = attrs_from_fields(field_collection)
            return BeamStepPlugin(attrs, kernels)

    return BeamStepPlugin, BeamStepCreator


def compile_kernels(logits_dtype: str, has_bias: bool) -> dict:
    """Cubins for the build targets, packed per plugin field."""
    try:
        from fastertrt.plugins.beam_search.kernels import compile_kernels as compile_all
    except ImportError as exc:
        from fastertrt.errors import MissingDependencyError

        raise MissingDependencyError("building engines with fastertrt's beam-step plugin compiles its Triton "
                                     "kernels: pip install 'fastertrt[kernels]'") from exc
    return compile_all(logits_dtype, has_bias, build_targets())


def register(trt_module) -> None:
    trt_common.register(trt_module, spec.NAME, spec.NAMESPACE, _make_classes)
