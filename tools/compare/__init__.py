"""`fastertrt compare`: stage-by-stage numeric comparison of a bundle with
polygraphy, the first bad layer of a failing stage, and its report."""

from fastertrt.tools.compare.run import CompareOptions, compare_bundle  # noqa: F401
