"""Decoding plans: which cached keys a new token reads, and where a static cache keeps them (numpy).

A query at position ``i`` of a built-in pattern reads a union of at most two *runs* of keys, each
an arithmetic progression whose length is a closed form of ``i``:

* the **run** ``[start(i), i]``: ``all`` from 0, ``local`` its window ``i - L + 1``, ``fixed``
  and ``Group`` the start of the own group of ``l`` tokens;
* the **second** run: ``strided``'s ``j = i - m * l`` (``i mod l + m * l``, minus those inside the
  run's window when it is merged with ``local``), or ``fixed``'s summary keys of the earlier groups
  ``v -> (v // c) * l + vlo(h) + v % c`` (``c = vertsize * blocksize``, ``v < (i // l) * c``).

Any other pattern with a block layout (custom layouts, other unions) reads the **blocks** of its
query's layout row (``SECOND_BLOCKS``): key ``v`` is offset ``v % b`` of the ``v // b``-th enabled
block, kept where the block's in-block mask allows it.

Key ``v`` of the union is the ``v``-th key of the second run, then of the run; the decode kernel
(:mod:`sparse_attention.torch.kernels.decode`) walks ``v`` in tiles and computes each key's cache
slot, so it reads exactly the allowed keys and nothing else. :func:`keys` enumerates the same set
here, and the tests hold it equal to :func:`sparse_attention.modes.allowed` at every position.

A static cache keeps ``slots`` keys per head: the position itself (``ring == 0``), or, where the
pattern bounds what later tokens read (``bounded=True``), the run in a ring of ``ring`` slots
(``local``: its window; ``fixed``/``Group``: the own group) and ``fixed``'s summary keys compactly
at ``sum_base + v``. One extra slot (``slots``) takes the writes that nothing will read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

RUN_NONE, RUN_ALL, RUN_WINDOW, RUN_GROUP = 0, 1, 2, 3
SECOND_NONE, SECOND_STRIDED, SECOND_SUMMARY, SECOND_BLOCKS = 0, 1, 2, 3


@dataclass(frozen=True)
class DecodePlan:
    """The keys of a query at ``i`` (see the module docstring) and their slots in a static cache.

    ``run``/``W``: the run's kind and its window or group length; ``second``/``P``: the second
    run's kind and its period (stride ``l`` or group ``l``); ``excl``: strided keys with ``i - j <
    excl`` belong to the run; ``c``, ``vlo_a``, ``vlo_c``, ``nv``: ``fixed``'s summary tokens per
    group and the first summary token of head ``h``, ``vlo_a - (h % nv) * vlo_c``; ``ring``: run
    keys at slot ``position % ring`` (0: at their position); ``sum_base``: summary key ``v`` at
    slot ``sum_base + v`` (-1: at its position); ``slots``: slots per head, plus one spare."""

    run: int = RUN_NONE
    W: int = 0
    second: int = SECOND_NONE
    P: int = 1
    excl: int = 0
    c: int = 1
    vlo_a: int = 0
    vlo_c: int = 0
    nv: int = 1
    ring: int = 0
    sum_base: int = -1
    slots: int = 0
    layout: object = field(default=None, compare=False, repr=False)

    def count(self, i: int, h: int = 0) -> tuple[int, int]:
        """``(second-run keys, run keys)`` of a query at ``i``."""
        n2 = 0
        if self.second == SECOND_STRIDED:
            n2 = max(i - self.excl - i % self.P + self.P, 0) // self.P
        elif self.second == SECOND_SUMMARY:
            n2 = (i // self.P) * self.c
        elif self.second == SECOND_BLOCKS:
            lay = self.layout
            rp = lay.row_ptr[lay.head_pattern[h], i // self.c :][:2]
            n2 = int(rp[1] - rp[0]) * self.c
        return n2, (0 if self.run == RUN_NONE else i - self.start(i) + 1)

    def start(self, i: int) -> int:
        if self.run == RUN_WINDOW:
            return max(i - self.W + 1, 0)
        if self.run == RUN_GROUP:
            return i // self.W * self.W
        return 0

    def vlo(self, h: int) -> int:
        return self.vlo_a - (h % self.nv) * self.vlo_c

    def max_keys(self, n_ctx: int) -> int:
        """Keys read by the query with the most, below ``n_ctx``."""
        if self.second == SECOND_BLOCKS:
            return int(self.layout.row_counts().max()) * self.c
        last = [n_ctx - 1] + ([n_ctx // self.W * self.W - 1] if self.run == RUN_GROUP and n_ctx > self.W else [])
        return max(sum(self.count(i)) for i in last)

    def bounded(self, n_ctx: int, max_query: int = 1) -> DecodePlan:
        """The plan of a cache that keeps only what a query at or before ``n_ctx`` may still read,
        for steps of up to ``max_query`` new tokens (the ring holds one window plus the step's
        other tokens); the plan itself where nothing can be dropped (``all``, ``strided``)."""
        if self.run in (RUN_WINDOW, RUN_GROUP) and self.second in (SECOND_NONE, SECOND_SUMMARY):
            ring = min(self.W + max_query - 1, n_ctx)
            if self.second == SECOND_NONE:
                return replace(self, ring=ring, slots=ring)
            n_sum = (n_ctx // self.P + 1) * self.c
            return replace(self, ring=ring, sum_base=ring, slots=ring + n_sum)
        return replace(self, slots=n_ctx)

    def slot(self, j, h: int = 0):
        """Slots of key positions ``j`` (numpy) in a cache of this plan: ``(run slot, summary slot
        or -1)``; -1 where the key is not kept there."""
        j = np.asarray(j)
        run_slot = j % self.ring if self.ring else j
        sum_slot = np.full_like(j, -1)
        if self.sum_base >= 0:
            o = j % self.P - self.vlo(h)
            sum_slot = np.where((0 <= o) & (o < self.c), self.sum_base + (j // self.P) * self.c + o, -1)
        return run_slot, sum_slot


def keys(plan: DecodePlan, i: int, h: int = 0) -> np.ndarray:
    """The key positions a query at ``i`` of head ``h`` reads, in the kernel's order ``v``."""
    n2, n1 = plan.count(i, h)
    v = np.arange(n2)
    if plan.second == SECOND_STRIDED:
        second = i % plan.P + v * plan.P
    elif plan.second == SECOND_SUMMARY:
        second = (v // plan.c) * plan.P + plan.vlo(h) + v % plan.c
    elif plan.second == SECOND_BLOCKS:
        # the enabled blocks of the query's row, minus what their in-block masks exclude
        lay, b = plan.layout, plan.c
        e = lay.row_ptr[lay.head_pattern[h], i // b] + v // b
        second = lay.cols[e].astype(np.int64) * b + v % b
        mi = lay.mask_idx[e] if lay.mask_idx is not None else np.full(len(e), -1)
        inb = np.where(mi >= 0, lay.block_masks[np.maximum(mi, 0), i % b, v % b], True)
        second = second[inb]
    else:
        second = v
    return np.concatenate([second, plan.start(i) + np.arange(n1)]).astype(np.int64)


def plan_of(mode: str, kwargs: dict, blocksize: int) -> DecodePlan | None:
    """The plan of a built-in mode with its arguments (``local_attn_ctx``, ``num_verts``,
    ``vertsize``), of ``"group"`` (``local_attn_ctx`` = ``l``) or of ``"local|strided"``
    (``local_attn_ctx`` = ``(L, l)``); None for anything else."""
    ctx = kwargs.get("local_attn_ctx")
    if mode == "all":
        return DecodePlan(run=RUN_ALL)
    if mode == "local":
        return DecodePlan(run=RUN_WINDOW, W=ctx)
    if mode == "group":
        return DecodePlan(run=RUN_GROUP, W=ctx)
    if mode == "strided":
        return DecodePlan(second=SECOND_STRIDED, P=ctx)
    if mode == "local|strided":
        L, l = ctx  # noqa: E741
        return DecodePlan(run=RUN_WINDOW, W=L, second=SECOND_STRIDED, P=l, excl=L)
    if mode == "fixed":
        l, nv, vs = ctx, kwargs["num_verts"], kwargs["vertsize"]  # noqa: E741
        s = l // blocksize
        return DecodePlan(
            run=RUN_GROUP,
            W=l,
            second=SECOND_SUMMARY,
            P=l,
            c=vs * blocksize,
            vlo_a=(s - vs) * blocksize,
            vlo_c=vs * blocksize,
            nv=nv,
        )
    return None


def spec_plans(spec, heads: int, blocksize: int, n_ctx: int | None = None) -> list:
    """``[(first_head, n_heads, DecodePlan or None)]`` of a pattern spec
    (:mod:`sparse_attention.patterns`). Built-in modes, ``Group`` and the unions ``local |
    strided``, ``Group | fixed`` and those holding ``all`` read runs in closed form; with
    ``n_ctx``, any other group with a block layout covering ``n_ctx`` in natural order (custom
    layouts, other unions) reads its query's block row (``SECOND_BLOCKS``); None where neither
    applies."""
    out = []
    for h0, hn, _, sub in spec.groups(heads):
        plan = _spec_plan(sub, blocksize)
        if plan is None and n_ctx is not None:
            plan = _layout_plan(sub, hn, blocksize, n_ctx)
        out.append((h0, hn, plan))
    return out


def _layout_plan(spec, heads: int, blocksize: int, n_ctx: int) -> DecodePlan | None:
    from .layouts import Layout, broadcast_layout
    from .patterns import Custom

    if isinstance(spec, Custom):
        lay = spec.layout
    elif hasattr(spec, "layout"):
        m = spec.multiple(blocksize)
        T = math.ceil(n_ctx / m) * m
        try:
            spec.check(T, heads, blocksize)
        except ValueError:
            return None
        lay = spec.layout(T, heads, blocksize)
    else:
        return None
    if not isinstance(lay, Layout) or lay.mode != "custom" or lay.perm is not None or lay.time < n_ctx:
        return None
    if lay.heads != heads:
        lay = broadcast_layout(lay, heads)
    return DecodePlan(second=SECOND_BLOCKS, c=lay.blocksize, layout=lay)


def _spec_plan(spec, blocksize: int) -> DecodePlan | None:
    from .patterns import Group, Merged, Mode

    if isinstance(spec, Mode):
        return plan_of(spec.mode, spec.kwargs(blocksize), blocksize)
    if isinstance(spec, Group):
        return plan_of("group", {"local_attn_ctx": spec.l}, blocksize)
    if isinstance(spec, Merged):
        if any(isinstance(p, Mode) and p.mode == "all" for p in spec.parts):
            return plan_of("all", {}, blocksize)
        if spec.local_strided() is not None:
            return plan_of("local|strided", {"local_attn_ctx": spec.local_strided()}, blocksize)
        fixed = [p for p in spec.parts if isinstance(p, Mode) and p.mode == "fixed"]
        groups = {p.l for p in spec.parts if isinstance(p, Group)}
        if len(fixed) == 1 and len(fixed) + len(groups) == len(spec.parts) and groups <= {fixed[0].local_attn_ctx}:
            return _spec_plan(fixed[0], blocksize)  # fixed's own group already holds Group(l)
    return None
