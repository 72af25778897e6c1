"""INT8 calibration (explicit Q/DQ): sample data, calibrators, cache, report."""
