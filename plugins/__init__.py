"""fastertrt's TensorRT plugins, one folder each (spec, rules, reference,
kernels, trt). REGISTRY maps plugin name -> module path; adding a plugin is a
folder plus one line here."""

REGISTRY: dict[str, str] = {}
