"""A plain nn.Module with example inputs (Python API), with dynamic batch/seq."""

from __future__ import annotations

import numpy as np

from fastertrt.compiler import compile_module
from fastertrt.runtime import ModuleRunner, load


def test_plain_module_exports_with_dynamic_dims(tmp_path):
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True,
                                             dropout=0.0).eval()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    out = compile_module(Block(), {"x": torch.randn(2, 5, 16)}, tmp_path / "block.bundle", output_names=["y"])
    runner = load(out)
    assert isinstance(runner, ModuleRunner)
    x = np.random.default_rng(1).standard_normal((3, 9, 16)).astype(np.float32)  # unseen batch and seq
    got = runner.run(x=x)["y"]
    with torch.no_grad():
        ref = Block()(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 9, 16)
    assert np.abs(got - ref).max() < 1e-4
