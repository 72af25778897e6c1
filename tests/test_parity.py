"""The parity check itself: masking, scale-relative bound, and its failure message."""

import numpy as np
import pytest

from fastertrt.compiler.export.parity import ParityReport, masked_max_abs
from fastertrt.errors import ParityError


def test_padded_positions_are_ignored():
    ref = np.zeros((2, 3, 4), dtype=np.float32)
    got = ref.copy()
    got[1, 2] = 1e9  # a padded position
    valid = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
    assert masked_max_abs(got, ref, valid, seq_axis=1) == (0.0, 0.0)
    got[1, 1, 0] = 0.5
    assert masked_max_abs(got, ref, valid, seq_axis=1)[0] == 0.5


def test_non_finite_output_fails():
    assert masked_max_abs(np.array([[np.nan]]), np.array([[1.0]]), None, 1)[0] == float("inf")


def test_bound_is_absolute_or_relative_to_scale():
    report = ParityReport()
    report.add("r", "logits", (5e-4, 30.0))  # 1.7e-5 of the scale: FP32 summation-order noise
    report.add("r", "hidden", (5e-5, 0.5))  # within 1e-4 absolutely
    report.check("ok")
    report.add("r", "bad", (2e-3, 1.0))  # 2e-3 absolute and relative: a real mismatch
    with pytest.raises(ParityError, match=r"bad=0.002 \(rel 0.002\).*--no-parity"):
        report.check("export of x")
