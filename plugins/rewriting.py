"""Helpers every plugin's rewrite rules share (compile time; onnxscript is
imported on first use, so importing a plugin package stays cheap)."""

from __future__ import annotations


def pattern():
    """onnxscript's pattern module."""
    from onnxscript.rewriter import pattern as module

    return module


def fail(reason: str, *sources):
    """A failed match that carries the reason (what explain() reports) and the values it is about."""
    from onnxscript.rewriter import _basics

    return _basics.MatchResult().fail(reason, [s for s in sources if s is not None])


def dims(value):
    """A value's dims as ints / symbolic names / None, or None when unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d.value is not None else None) for d in value.shape]
