"""Session-wide fixtures: every export is done once per test session and shared."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny  # noqa: E402

PARITY_ROWS: list[tuple] = []


class BundleCache:
    def __init__(self, root: Path):
        self.root = root
        self.bundles: dict = {}

    def tiny(self, family: str, impl: str = "sdpa") -> Path:
        key = ("tiny", family, impl)
        if key not in self.bundles:
            folder = self.root / f"tiny-{family}"
            if not folder.exists():
                save_tiny(family, folder)
            self.bundles[key] = self._compile(str(folder), f"tiny-{family}-{impl}", impl)
        return self.bundles[key]

    def shipped(self, name: str, impl: str = "sdpa") -> Path:
        key = ("shipped", name, impl)
        if key not in self.bundles:
            self.bundles[key] = self._compile(name, f"{name}-{impl}", impl)
        return self.bundles[key]

    def calibrated(self, name: str) -> Path:
        """The shipped model's bundle calibrated INT8 with the defaults (default
        English sample set, max calibrator), once per session; tests must not change it."""
        key = ("int8", name)
        if key not in self.bundles:
            import shutil

            from fastertrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

            # calibration replaces the bundle folder: work on a linked copy of the shared one
            bundle = shutil.copytree(self.shipped(name), self.root / f"{name}-int8.bundle", copy_function=os.link)
            calibrate_bundle(bundle, CalibrationOptions())
            self.bundles[key] = Path(bundle)
        return self.bundles[key]

    def _compile(self, model: str, label: str, impl: str) -> Path:
        from fastertrt.compiler import compile_model

        out = compile_model(model, self.root / f"{label}.bundle", attn_implementation=impl)
        manifest = json.loads((out / "manifest.json").read_text())
        par = manifest["export"]["parity"]
        fused = manifest["rewrite"]["parity"] or {}
        counts = [(r["fused"], r["blocks"]) for g in manifest["graphs"].values()
                  for r in g.get("rewrite", {}).values()]
        fused_text = " ".join(f"{f}/{b}" for f, b in counts) or "-"
        PARITY_ROWS.append((label, par["max_abs_diff"], par["max_rel_diff"], fused.get("max_abs_diff", float("nan")),
                            fused_text))
        return out


def pytest_collection_modifyitems(config, items):
    """gpu / tensorrt marks skip with the reason where the machine lacks them."""
    import importlib.util

    from fastertrt.runtime.gpu import gpu_compute_capability

    gpu = gpu_compute_capability()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and gpu is None:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with a driver; this machine has none"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs the standard `tensorrt` package, which cannot be "
                                                    "installed here (its wheels download NVIDIA libraries)"))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> BundleCache:
    return BundleCache(tmp_path_factory.mktemp("bundles"))


def pytest_terminal_summary(terminalreporter):
    if PARITY_ROWS:
        terminalreporter.write_sep("-", "parity on valid positions: export (ONNX Runtime vs torch), "
                                        "rewrite (fused vs exported graph)")
        terminalreporter.write_line(f"{'bundle':<28} {'export abs':>11} {'export rel':>11} {'rewrite abs':>11}  "
                                    f"fused/blocks per graph")
        for label, diff, rel, fused, counts in PARITY_ROWS:
            terminalreporter.write_line(f"{label:<28} {diff:>11.3g} {rel:>11.3g} {fused:>11.3g}  {counts}")
