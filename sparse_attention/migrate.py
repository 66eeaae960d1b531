"""Block layouts of the libraries users migrate from (numpy only; no framework).

:func:`deepspeed_block_layout` builds the ``[num_heads, nb, nb]`` 0/1 block layout of DeepSpeed's
sparse-attention configs (``DenseSparsityConfig``, ``FixedSparsityConfig``,
``VariableSparsityConfig``, ``BigBirdSparsityConfig``, ``BSLongformerSparsityConfig``,
``LocalSlidingWindowSparsityConfig``; DeepSpeed <= 0.19.6, removed in 0.19.7) from the same
arguments, by the same placement rules, so that a model trained with one of them keeps its
pattern. Random blocks (``variable``, ``bigbird``) are drawn like DeepSpeed's (``sample`` of the
block indices per row, rows in order, heads in order) from ``random.Random(seed)``: with the
seed DeepSpeed's global ``random`` had, the same blocks. :func:`sparse_attention.layouts.deepspeed_layout`
turns the block layout into a :class:`~sparse_attention.layouts.Layout`.
"""

from __future__ import annotations

import random

import numpy as np

__all__ = ["DEEPSPEED_KINDS", "deepspeed_block_layout"]

# kind -> its config's parameters (besides num_heads, block) and their defaults in DeepSpeed
DEEPSPEED_KINDS = {
    "dense": dict(different_layout_per_head=False),
    "fixed": dict(
        different_layout_per_head=False,
        num_local_blocks=4,
        num_global_blocks=1,
        attention="bidirectional",
        horizontal_global_attention=False,
        num_different_global_patterns=1,
    ),
    "variable": dict(
        different_layout_per_head=False,
        num_random_blocks=0,
        local_window_blocks=(4,),
        global_block_indices=(0,),
        global_block_end_indices=None,
        attention="bidirectional",
        horizontal_global_attention=False,
    ),
    "bigbird": dict(
        different_layout_per_head=False,
        num_random_blocks=1,
        num_sliding_window_blocks=3,
        num_global_blocks=1,
        attention="bidirectional",
    ),
    "bslongformer": dict(
        different_layout_per_head=False,
        num_sliding_window_blocks=3,
        global_block_indices=(0,),
        global_block_end_indices=None,
        attention="bidirectional",
    ),
    "local_sliding_window": dict(num_sliding_window_blocks=3, attention="unidirectional"),
}


def deepspeed_params(kind: str, params: dict) -> dict:
    """``params`` completed with the defaults of ``kind``'s config; unknown kinds or names refused."""
    if kind not in DEEPSPEED_KINDS:
        raise ValueError(f"kind must be one of {sorted(DEEPSPEED_KINDS)}, got {kind!r}")
    defaults = DEEPSPEED_KINDS[kind]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"{kind} layouts take {sorted(defaults)}; unknown: {unknown}")
    p = {**defaults, **params}
    if p.get("attention", "bidirectional") not in ("unidirectional", "bidirectional"):
        raise ValueError(f"attention must be 'unidirectional' or 'bidirectional', got {p['attention']!r}")
    return p


def deepspeed_block_layout(kind: str, seq_len: int, num_heads: int, block: int = 16, seed=None, **params):
    """``(layout int64 [num_heads, nb, nb], params)``: DeepSpeed's block layout for ``kind``
    (module docstring) and its completed parameters."""
    p = deepspeed_params(kind, params)
    if seq_len % block:
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of block ({block})")
    nb = seq_len // block
    lay = np.zeros((num_heads, nb, nb), np.int64)
    uni = p.get("attention") == "unidirectional"
    rng = random.Random(seed)
    per_head = p.get("different_layout_per_head", False)
    layout_heads = num_heads if per_head else 1
    if kind == "dense":
        lay[:] = 1
        return lay, p
    if kind == "fixed":
        _check_fixed(p, uni, per_head)
    for h in range(layout_heads):
        a = lay[h]
        if kind == "fixed":
            _fixed_local(a, p["num_local_blocks"], uni)
            _fixed_global(a, p, h, uni)
        elif kind == "variable":
            _random_rows(a, p["num_random_blocks"], rng, causal=False)
            _variable_local(a, list(p["local_window_blocks"]), uni)
            _globals(a, p, uni, horizontal=p["horizontal_global_attention"])
        elif kind == "bigbird":
            _random_rows(a, p["num_random_blocks"], rng, causal=uni)
            _sliding(a, p["num_sliding_window_blocks"], causal=False)
            g = p["num_global_blocks"]
            if nb < g:
                raise ValueError(f"num_global_blocks ({g}) must be at most the number of blocks ({nb})")
            a[:g, :] = 1
            a[:, :g] = 1
        elif kind == "bslongformer":
            _sliding(a, p["num_sliding_window_blocks"], causal=False)
            _globals(a, p, uni, horizontal=True, vertical_from_top=True)
        else:  # local_sliding_window
            _sliding(a, p["num_sliding_window_blocks"], causal=uni)
        if kind in ("bigbird", "bslongformer") and uni:
            lay[:] = np.tril(lay)  # DeepSpeed drops every future block of these two
    if not per_head:
        lay[1:] = lay[0]
    return lay, p


def _check_fixed(p, uni, per_head):
    nl, ng, nd = p["num_local_blocks"], p["num_global_blocks"], p["num_different_global_patterns"]
    if nl % ng:
        raise ValueError(f"num_local_blocks ({nl}) must be a multiple of num_global_blocks ({ng})")
    if uni and p["horizontal_global_attention"]:
        raise ValueError("horizontal_global_attention needs attention='bidirectional'")
    if nd > 1 and not per_head:
        raise ValueError("num_different_global_patterns > 1 needs different_layout_per_head=True")
    if nd > nl // ng:
        raise ValueError(f"num_different_global_patterns ({nd}) must be at most num_local_blocks / num_global_blocks")


def _window(a, lo, hi, uni):
    """Blocks ``[lo, hi)`` attend among themselves (causally under ``uni``)."""
    for row in range(lo, hi):
        a[row, lo : (row + 1 if uni else hi)] = 1


def _fixed_local(a, nl, uni):
    nb = a.shape[0]
    for lo in range(0, nb, nl):
        _window(a, lo, min(lo + nl, nb), uni)


def _fixed_global(a, p, h, uni):
    """Each window's global blocks (counted from the window's end, shifted per head pattern),
    attended by every row from the top (bidirectional) or from the block itself."""
    nb, nl, ng = a.shape[0], p["num_local_blocks"], p["num_global_blocks"]
    first = nl - (1 + h % p["num_different_global_patterns"]) * ng
    full_end = nb - nb % nl
    starts = list(range(first, full_end, nl))
    if full_end < nb:  # a short last window: its global blocks clamped inside the sequence
        starts.append(min(full_end + first, nb - ng))
    for s in starts:
        a[0 if not uni else s :, s : s + ng] = 1
        if p["horizontal_global_attention"]:
            a[s : s + ng, :] = 1


def _variable_local(a, windows, uni):
    nb = a.shape[0]
    lo = 0
    for w in windows:
        _window(a, lo, min(lo + w, nb), uni)
        lo += w
    for s in range(lo, nb, windows[-1]):  # the last window size repeats
        _window(a, s, min(s + windows[-1], nb), uni)


def _globals(a, p, uni, horizontal, vertical_from_top=False):
    """Global block ranges (``global_block_indices`` [to ``global_block_end_indices``]): their
    rows attend everything (``horizontal``), every row attends them (from the top, or from the
    range's start under ``uni`` unless ``vertical_from_top``)."""
    nb = a.shape[0]
    starts = list(p["global_block_indices"])
    ends = p["global_block_end_indices"]
    if ends is not None:
        ends = list(ends)
        if len(ends) != len(starts):
            raise ValueError("global_block_end_indices must have the length of global_block_indices")
        if any(s >= e for s, e in zip(starts, ends)):
            raise ValueError("each global block start index must be below its end index")
    else:
        ends = [s + 1 for s in starts]
    for s, e in zip(starts, ends):
        if s >= nb:
            continue
        e = min(e, nb)
        if horizontal:
            a[s:e, :] = 1
        a[(s if uni and not vertical_from_top else 0) :, s:e] = 1


def _random_rows(a, k, rng, causal):
    nb = a.shape[0]
    if nb < k:
        raise ValueError(f"num_random_blocks ({k}) must be at most the number of blocks ({nb})")
    if causal and k > 1:
        raise ValueError(
            f"num_random_blocks ({k}) must be at most 1 with attention='unidirectional' (the first block row "
            "has one block to draw from; DeepSpeed failed there too)"
        )
    for row in range(nb):
        a[row, rng.sample(range(row + 1 if causal else nb), k)] = 1


def _sliding(a, n, causal):
    nb = a.shape[0]
    if nb < n:
        raise ValueError(f"num_sliding_window_blocks ({n}) must be at most the number of blocks ({nb})")
    w = n // 2
    for row in range(nb):
        a[row, max(0, row - w) : (row + 1 if causal else min(row + w + 1, nb))] = 1
