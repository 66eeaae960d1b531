"""The block-gather engine: block-sparse attention in plain PyTorch (any device, any float dtype).

For each chunk of query-block rows it gathers their enabled key/value blocks (padded to the
chunk's longest row), runs the softmax in float32 (float64 for float64 inputs) and keeps only the
output and the log-sum-exp. The backward pass recomputes the scores chunk by chunk (flash-attention
style) and scatter-adds the key/value gradients, so memory is the inputs plus one chunk of scores,
whatever ``time`` is. Chunks come from the planner both gather engines share
(:func:`sparse_attention.tables.row_chunks`).

Tensors are natural-order ``[batch, heads, time, head_dim]``, already validated by the caller
(:mod:`sparse_attention.torch.interface`); the log-sum-exp is natural (base e).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import tables
from ..layouts import Layout
from .cache import derived
from .reference import compute_dtype, expand_kv

# Scores per chunk (batch * heads * rows * blocksize * keys). On a GPU about 64 MiB of float32,
# so the transient tensors of one chunk stay a few hundred MiB. On a CPU 8 MiB: a chunk's scores
# and gathered keys and values then stay near the last-level cache, and each of them below
# glibc's largest mmap threshold (32 MiB), so their memory is reused rather than mapped and
# faulted in again for every chunk; forward+backward on 2 cores (scripts/bench_cpu.py) takes
# 0.5x (local, 16,384 tokens) to 0.65x (fixed, 1,024) the time of 64 MiB chunks.
CHUNK_ELEMENTS = 1 << 24
CPU_CHUNK_ELEMENTS = 1 << 21


def gather_forward(q, k, v, layout: Layout):
    """Forward pass: ``(out [B, H, T, d] in q's dtype, lse [B, H, T])``, natural order; ``lse``
    is float64 for float64 inputs, else float32.

    ``lse`` is the log-sum-exp of each row's scaled scores (``+inf`` for a row with no allowed
    key); :func:`gather_backward` takes it back. ``k``, ``v`` may have fewer heads (grouped-query
    attention); the scores are per query head anyway, so they are expanded here.
    """
    T = q.shape[2]
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    q, k, v = (_pad_time(x, layout) for x in (q, k, v))
    perm = _perm(layout, q.device)
    if perm is not None:
        q, k, v = (x.index_select(2, perm) for x in (q, k, v))
    outs, lses = [], []
    for p, x in _per_pattern(layout, q.device, q, k, v):
        o, lse = _pattern_forward(*x, layout, p)
        outs.append(o)
        lses.append(lse)
    o, lse = _merge_heads(layout, q.device, outs), _merge_heads(layout, q.device, lses)
    if perm is not None:
        inv = _inv_perm(layout, q.device)
        o, lse = o.index_select(2, inv), lse.index_select(2, inv)
    return o[:, :, :T].to(q.dtype), lse[:, :, :T]


def gather_backward(do, q, k, v, o, lse, layout: Layout):
    """Backward pass: ``(dq, dk, dv)`` from the output gradient and :func:`gather_forward`'s
    results; with grouped-query ``k``, ``v`` each key/value head's gradient is the sum over its
    query heads (in the compute dtype, rounded once)."""
    B, H, T, D = q.shape
    hk = k.shape[1]
    dq, dk, dv = _backward(do, q, expand_kv(k, H), expand_kv(v, H), o, lse, layout)
    if hk != H:
        dk, dv = (x.view(B, hk, H // hk, T, D).sum(2) for x in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward(do, q, k, v, o, lse, layout: Layout):
    """:func:`gather_backward` for ungrouped heads, gradients in the compute dtype."""
    T = q.shape[2]
    do, q, k, v, o = (_pad_time(x, layout) for x in (do, q, k, v, o))
    lse = _pad_time(lse, layout, math.inf)  # rows past time: p = exp(s - lse) = 0
    perm = _perm(layout, q.device)
    if perm is not None:
        do, q, k, v, o, lse = (x.index_select(2, perm) for x in (do, q, k, v, o, lse))
    grads = [[], [], []]
    for p, x in _per_pattern(layout, q.device, do, q, k, v, o, lse):
        for acc, g in zip(grads, _pattern_backward(*x, layout, p)):
            acc.append(g)
    dq, dk, dv = (_merge_heads(layout, q.device, g) for g in grads)
    if perm is not None:
        inv = _inv_perm(layout, q.device)
        dq, dk, dv = (x.index_select(2, inv) for x in (dq, dk, dv))
    return dq[:, :, :T], dk[:, :, :T], dv[:, :, :T]


def _pad_time(x, layout: Layout, value: float = 0.0):
    """``x [B, H, T, ...]`` padded along time to whole blocks (``layout.nb * blocksize``): the
    positions past time, which no allowed pair touches."""
    pad = layout.nb * layout.blocksize - x.shape[2]
    if not pad:
        return x
    widths = [0, 0] * (x.dim() - 3) + [0, pad]
    return torch.nn.functional.pad(x, widths, value=value)


def _perm(layout: Layout, device):
    """The token of each block-order position, over whole blocks (identity past time)."""
    if layout.perm is None:
        return None
    return _device_cache(layout, "perm", device, lambda: torch.from_numpy(_padded_perm(layout)))


def _inv_perm(layout: Layout, device):
    return _device_cache(layout, "inv_perm", device, lambda: torch.from_numpy(np.argsort(_padded_perm(layout))))


def _padded_perm(layout: Layout) -> np.ndarray:
    return tables.token_index_padded(layout.time, layout.nb * layout.blocksize, layout.perm)


def _per_pattern(layout: Layout, device, *xs):
    """``(pattern, xs restricted to its heads)`` for each distinct head pattern."""
    for p in range(layout.n_patterns):
        hs = layout.heads_of(p)
        if len(hs) == layout.heads:
            yield p, xs
        else:
            idx = _device_cache(layout, f"heads{p}", device, lambda hs=hs: torch.from_numpy(hs))
            yield p, tuple(x.index_select(1, idx) for x in xs)


def _merge_heads(layout: Layout, device, parts):
    """Inverse of :func:`_per_pattern`: put each pattern's heads back in head order."""
    if len(parts) == 1:
        return parts[0]
    order = _device_cache(
        layout,
        "head_order",
        device,
        lambda: torch.from_numpy(np.argsort(np.concatenate([layout.heads_of(p) for p in range(layout.n_patterns)]))),
    )
    return torch.cat(parts, dim=1).index_select(1, order)


def _device_cache(layout: Layout, key: str, device, make):
    """Tensors derived from a layout, cached on the layout per device."""
    return derived(layout, ("gather", key, str(device)), lambda: make().to(device))


class _Chunk:
    """Query-block rows ``r0:r1`` of one pattern with their padded key blocks, on one device.

    Only the *partial* enabled blocks (diagonals, band edges, callback masks) get an in-block
    mask; full blocks and padding slots cost one broadcast ``masked_fill`` per chunk.
    """

    def __init__(self, layout: Layout, pattern: int, r0: int, r1: int, device):
        cols, valid, entries = layout.padded_rows(pattern, r0, r1)
        self.r0, self.r1 = r0, r1
        rows = np.broadcast_to(np.arange(r0, r1)[:, None], cols.shape)
        partial = valid & tables.partial_entries(
            layout, rows, cols, None if entries is None else np.maximum(entries, 0)
        )
        # Key blocks that every row of the chunk uses in full (fixed's summary blocks, the
        # columns left of the diagonal for all) are gathered once and multiplied as one dense
        # tile; each row keeps only the rest, padded to the longest.
        shared = np.zeros(0, np.int64)
        if r1 - r0 > 1:
            u, count = np.unique(cols[valid & ~partial], return_counts=True)
            shared = u[count == r1 - r0]
        if shared.size:
            rest = valid & ~np.isin(cols, shared)
            width = max(int(rest.sum(axis=1).max()), 1)
            order = np.argsort(~rest, axis=1, kind="stable")[:, :width]
            cols, partial = np.take_along_axis(cols, order, 1), np.take_along_axis(partial, order, 1)
            entries = None if entries is None else np.take_along_axis(entries, order, 1)
            valid = np.take_along_axis(rest, order, 1)
            cols = np.where(valid, cols, 0)
        self.shared = torch.from_numpy(shared).to(device) if shared.size else None  # int64 [nsh]
        self.cols = torch.from_numpy(cols).to(device)  # int64 [n, maxc]
        self.invalid = None if valid.all() else torch.from_numpy(~valid).to(device)  # bool [n, maxc]
        pr, ps = np.nonzero(partial)
        self.part_row = torch.from_numpy(pr).to(device)  # [npart] row within the chunk
        self.part_slot = torch.from_numpy(ps).to(device)  # [npart] slot within the row
        self.part_masks = torch.from_numpy(self._masks(layout, pattern, pr, ps, cols, entries)).to(device)
        self._flat: dict = {}

    def flat_index(self, shared: bool, heads: int, nb: int) -> torch.Tensor:
        """Rows of the rest's (or the shared) key blocks in ``[heads * nb, b * d]`` (the blocks of
        every batch row and head, :func:`_flat_blocks`), per head in chunk order: block ``c``
        of head ``i`` is row ``i * nb + c``. A gather or scatter along that first dimension
        moves whole contiguous rows, 2-7x faster on a CPU than one along the second."""
        key = (shared, heads, nb)
        idx = self._flat.get(key)
        if idx is None:
            cols = self.shared if shared else self.cols
            idx = (torch.arange(heads, device=cols.device)[:, None] * nb + cols.reshape(1, -1)).reshape(-1)
            if len(self._flat) >= 8:  # a few batch sizes in turn
                self._flat.clear()
            self._flat[key] = idx
        return idx

    @property
    def n_keys(self) -> int:
        """Key blocks per row as computed (shared + padded rest)."""
        return self.cols.shape[1] + (0 if self.shared is None else len(self.shared))

    def scores(self, qc, kf, scale):
        """Masked scores in two parts, ``(shared [B, h, n, b, nsh * b] or None, rest [B, h, n, b,
        maxc * b])`` (kept apart: a concatenation would copy them), and the gathered keys."""
        keys = _gather_chunk(self, kf, qc.shape[0], qc.shape[1], qc.shape[-1])
        sh, rest = _times_t(qc, keys)
        if sh is not None:
            sh.mul_(scale)
        self.apply_mask(rest.mul_(scale))
        return (sh, rest), keys

    def times(self, p, parts):
        """``p`` (scores' two parts) ``@`` the gathered blocks ``parts`` -> ``[B, h, n, b, d]``."""
        (p_sh, p_rest), (shared, rest) = p, parts
        out = torch.matmul(p_rest, rest)
        if shared is None:
            return out
        B, h, n, b, nsh = p_sh.shape
        return out.add_(torch.matmul(p_sh.reshape(B, h, n * b, nsh), shared).view_as(out))

    def scatter_add(self, acc, g, x):
        """Add ``g^T @ x`` (``g``: scores' two parts, ``x [B, h, n, b, d]``) into the key blocks
        ``acc [B * h, nb, b * d]``. Padding slots carry g = 0 and add nothing."""
        g_sh, g_rest = g
        B, h, n, b, d = x.shape
        maxc = self.cols.shape[1]
        nb = acc.shape[1]
        flat = acc.view(B * h * nb, b * d)
        rest = torch.matmul(g_rest.transpose(-1, -2), x).reshape(B * h * n * maxc, b * d)
        flat.index_add_(0, self.flat_index(False, B * h, nb), rest)
        if g_sh is not None:
            nsh = g_sh.shape[-1]
            sh = torch.matmul(g_sh.reshape(B, h, n * b, nsh).transpose(-1, -2), x.reshape(B, h, n * b, d))
            flat.index_add_(0, self.flat_index(True, B * h, nb), sh.reshape(B * h * (nsh // b), b * d))

    def _masks(self, layout, pattern, pr, ps, cols, entries):
        """In-block masks of the partial entries, ``bool [npart, b, b]`` (numpy)."""
        e = None if entries is None else entries[pr, ps]
        return layout.entry_masks(pattern, self.r0 + pr, cols[pr, ps], e)

    def apply_mask(self, s: torch.Tensor) -> torch.Tensor:
        """Set disallowed scores of ``s [B, h, n, b, maxc * b]`` to ``-inf`` (in place)."""
        B, h, n, b, _ = s.shape
        maxc = self.cols.shape[1]
        s6 = s.view(B, h, n, b, maxc, b)  # a view even of a slice of the last dim: masks land in s
        if self.invalid is not None:
            s6.masked_fill_(self.invalid[:, None, :, None], float("-inf"))
        if len(self.part_row):
            blocks = s6[:, :, self.part_row, :, self.part_slot, :]  # [npart, B, h, b, b]
            s6[:, :, self.part_row, :, self.part_slot, :] = blocks.masked_fill(
                ~self.part_masks[:, None, None], float("-inf")
            )
        return s


def _plan(layout: Layout, pattern: int, cost_per_block: int, device) -> list[_Chunk]:
    """The chunks of a pattern's rows (:func:`sparse_attention.tables.row_chunks`), cached per
    (pattern, cost, budget, device)."""

    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS

    def make():
        spans = tables.row_chunks(layout.row_counts()[pattern], cost_per_block, budget)
        return [_Chunk(layout, pattern, a, b, device) for a, b in spans]

    return derived(layout, ("plan", pattern, cost_per_block, budget, str(device)), make)


def _pattern_forward(q, k, v, layout: Layout, pattern: int):
    """One head pattern, ``[B, h, T, d]`` in block order -> (out in the compute dtype, lse)."""
    B, h, T, d = q.shape
    b, nb = layout.blocksize, layout.nb
    cd = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    chunks = _plan(layout, pattern, B * h * b * b, q.device)
    qb = q.to(cd).reshape(B, h, nb, b, d)
    kf, vf = _flat_blocks(k, cd, b), _flat_blocks(v, cd, b)
    out = torch.empty(B, h, nb, b, d, dtype=cd, device=q.device)
    lse = torch.empty(B, h, nb, b, dtype=cd, device=q.device)
    for c in chunks:
        s, _ = c.scores(qb[:, :, c.r0 : c.r1], kf, scale)  # two parts of [B, h, n, b, n_keys * b]
        m = _parts(torch.amax, s, dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = tuple(None if x is None else torch.exp_(x.sub_(m)) for x in s)
        den = _parts(torch.sum, p, dim=-1, keepdim=True)
        pv = c.times(p, _gather_chunk(c, vf, B, h, d))
        out[:, :, c.r0 : c.r1] = pv / torch.where(den > 0, den, torch.ones_like(den))
        # An empty row keeps lse = +inf, so that exp(s - lse) = 0 in the backward pass.
        lse[:, :, c.r0 : c.r1] = torch.where(den > 0, m + torch.log(den), torch.full_like(den, math.inf))[..., 0]
    return out.reshape(B, h, T, d), lse.reshape(B, h, T)


def _pattern_backward(do, q, k, v, out, lse, layout: Layout, pattern: int):
    """One head pattern, block order: ``(dq, dk, dv)`` in the compute dtype."""
    B, h, T, d = q.shape
    b, nb = layout.blocksize, layout.nb
    cd = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    chunks = _plan(layout, pattern, B * h * b * b, q.device)
    do, out, lse = do.to(cd), out.to(cd), lse.to(cd).reshape(B, h, nb, b)
    delta = (do * out).sum(dim=-1).reshape(B, h, nb, b, 1)
    qb = q.to(cd).reshape(B, h, nb, b, d)
    kf, vf = _flat_blocks(k, cd, b), _flat_blocks(v, cd, b)
    dob = do.reshape(B, h, nb, b, d)
    dq = torch.zeros(B, h, nb, b, d, dtype=cd, device=q.device)
    dk = torch.zeros(B * h, nb, b * d, dtype=cd, device=q.device)
    dv = torch.zeros(B * h, nb, b * d, dtype=cd, device=q.device)
    for c in chunks:
        qc = qb[:, :, c.r0 : c.r1]  # [B, h, n, b, d]
        s, keys = c.scores(qc, kf, scale)
        rows = lse[:, :, c.r0 : c.r1, :, None]
        p = tuple(None if x is None else torch.exp_(x.sub_(rows)) for x in s)  # two parts
        doc = dob[:, :, c.r0 : c.r1]  # [B, h, n, b, d]
        vals = _gather_chunk(c, vf, B, h, d)
        dp = _times_t(doc, vals)
        ds = tuple(None if x is None else x.sub_(delta[:, :, c.r0 : c.r1]).mul_(y).mul_(scale) for x, y in zip(dp, p))
        dq[:, :, c.r0 : c.r1] = c.times(ds, keys)
        c.scatter_add(dk, ds, qc)
        c.scatter_add(dv, p, doc)
    shape = (B, h, T, d)
    return dq.reshape(shape), dk.reshape(shape), dv.reshape(shape)


def _flat_blocks(x, cd, b):
    """``[B, h, T, d]`` -> ``[B * h, nb, b * d]`` in ``cd``, contiguous (one copy), ready to gather."""
    B, h, T, d = x.shape
    return x.to(cd).reshape(B * h, T // b, b * d).contiguous()


def _gather_chunk(c: _Chunk, xf, B, h, d):
    """The chunk's key or value blocks of ``xf [B * h, nb, b * d]`` in the order of its scores:
    ``(shared [B, h, nsh * b, d] or None, rest [B, h, n, maxc * b, d])``."""
    nb = xf.shape[1]
    flat = xf.view(B * h * nb, xf.shape[2])
    rest = torch.index_select(flat, 0, c.flat_index(False, B * h, nb)).view(B, h, c.r1 - c.r0, -1, d)
    if c.shared is None:
        return None, rest
    return torch.index_select(flat, 0, c.flat_index(True, B * h, nb)).view(B, h, -1, d), rest


def _times_t(x, parts):
    """``x [B, h, n, b, d] @`` the gathered blocks transposed: ``(shared [B, h, n, b, nsh * b] or
    None, rest [B, h, n, b, maxc * b])``, the two parts of ``[B, h, n, b, n_keys * b]``."""
    shared, rest = parts
    out = torch.matmul(x, rest.transpose(-1, -2))
    if shared is None:
        return None, out
    B, h, n, b, d = x.shape
    return torch.matmul(x.reshape(B, h, n * b, d), shared.transpose(-1, -2)).view(B, h, n, b, -1), out


def _parts(reduce, parts, **kw):
    """``reduce`` (``torch.amax`` or ``torch.sum``) over the last dim of scores in two parts."""
    sh, rest = parts
    r = reduce(rest, **kw)
    if sh is None:
        return r
    other = reduce(sh, **kw)
    return torch.maximum(r, other) if reduce is torch.amax else r.add_(other)
