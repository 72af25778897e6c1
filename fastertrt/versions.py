"""Installed versions of the packages a bundle or a benchmark depends on."""

from __future__ import annotations


def package_versions(*names: str) -> dict:
    """name -> installed version, for those of `names` that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
