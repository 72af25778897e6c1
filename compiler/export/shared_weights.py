"""Store the weights of several graphs of one model once.

The prefill and decode-step graphs of a decoder hold the same weights; saved
separately, a bundle carries them twice. Here every large initializer goes to
one external-data file, deduplicated by content, and each graph points into it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Small tensors (shapes, scalars, norms) stay inline: moving them saves nothing.
MIN_EXTERNAL_BYTES = 1024
ALIGN = 64


def share_weights(graphs: list[Path], weights_name: str = "weights.bin") -> Path:
    """Rewrite each graph in place so its large initializers live in
    `weights_name` next to it, each distinct tensor stored once."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    folder = graphs[0].parent
    data_path = folder / weights_name
    tmp_data = data_path.with_name(weights_name + ".tmp")
    stored: dict[bytes, tuple[int, int]] = {}
    # files the exporter wrote for models over its external-data threshold
    old_files = {folder / e.value for g in graphs for t in _get_all_tensors(onnx.load(str(g), load_external_data=False))
                 for e in t.external_data if e.key == "location"}
    models = [load_with_weights(g) for g in graphs]
    with open(tmp_data, "wb") as data:
        for model in models:
            for t in _get_all_tensors(model):
                raw = t.raw_data
                if t.data_location == onnx.TensorProto.EXTERNAL or len(raw) < MIN_EXTERNAL_BYTES:
                    continue
                key = hashlib.sha256(bytes([t.data_type]) + str(list(t.dims)).encode() + raw).digest()
                if key not in stored:
                    offset = data.tell()
                    pad = (-offset) % ALIGN
                    data.write(b"\0" * pad)
                    stored[key] = (offset + pad, len(raw))
                    data.write(raw)
                offset, length = stored[key]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", weights_name), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
    os.replace(tmp_data, data_path)
    for model, path in zip(models, graphs):
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    for old in old_files - {data_path}:
        old.unlink(missing_ok=True)
    return data_path


def load_with_weights(path: Path):
    """onnx.load with external data read in. onnx's own loader refuses data files
    with several hard links, and `fastertrt build` stages a bundle by linking."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    handles = {}
    try:
        for t in _get_all_tensors(model):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            location = (path.parent / info["location"]).resolve()
            if path.parent.resolve() not in location.parents:
                raise ValueError(f"{path.name}: tensor {t.name} points outside its folder ({info['location']})")
            fh = handles.get(location) or handles.setdefault(location, open(location, "rb"))
            fh.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            t.raw_data = fh.read(length)
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    finally:
        for fh in handles.values():
            fh.close()
    return model
