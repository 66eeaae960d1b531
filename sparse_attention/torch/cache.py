"""The torch back end's one cache of state derived from layouts: device tensors, gather plans,
kernel tables. Keyed weakly by the layout (a :class:`~sparse_attention.layouts.Layout` is
immutable and hashed by identity), so it goes when the layout goes."""

from __future__ import annotations

import weakref

_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def derived(layout, key, make):
    """``make()``, computed once per ``(layout, key)`` (``key``: any hashable, e.g. with the device)."""
    per = _DERIVED.setdefault(layout, {})
    if key not in per:
        per[key] = make()
    return per[key]


def entries(layout) -> dict:
    """Everything cached for ``layout`` (tests look inside)."""
    return dict(_DERIVED.get(layout, {}))
