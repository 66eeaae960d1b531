"""Tables derived from a :class:`~sparse_attention.layouts.Layout` (numpy only).

The compressed rows (CSR) of a built-in layout's structured form, the transposed tables of the
backward pass, the padded rows and in-block masks that the gather engines (torch and
TensorFlow) use, dense views for tests and plots, and the one chunk planner of both gather
engines. Functions take a layout and return numpy arrays; :class:`Layout` caches what it asks
for (its properties ``row_ptr``, ``cols``, ``partial`` and methods call these).
"""

from __future__ import annotations

import numpy as np

from .modes import allowed, partial_blocks


def row_counts(lay) -> np.ndarray:
    """Enabled blocks per (pattern, query-block row), ``int64 [P, nb]``."""
    if not lay.structured:
        return np.diff(lay.row_ptr, axis=1)
    return lay.prefix_len.astype(np.int64) + np.maximum(lay.row_hi.astype(np.int64) - lay.row_lo + 1, 0)


def csr_row_ptr(lay) -> np.ndarray:
    """``int64 [P, nb + 1]`` row pointers of a structured layout (pattern ``p`` follows ``p - 1``)."""
    counts = row_counts(lay)
    flat = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts.reshape(-1), out=flat[1:])
    nb = lay.nb
    return np.concatenate([flat[:-1].reshape(-1, nb), flat[nb::nb][:, None]], axis=1)


def csr_cols(lay) -> np.ndarray:
    """``int32 [nnz]`` key block of every entry of a structured layout, ascending within a row."""
    counts = row_counts(lay).reshape(-1)
    row_ptr = lay.row_ptr.reshape(-1)
    starts = np.delete(row_ptr, np.arange(1, lay.n_patterns) * (lay.nb + 1))[:-1]
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    plen = np.repeat(lay.prefix_len.reshape(-1).astype(np.int64), counts)
    in_prefix = k < plen
    rng = np.repeat(lay.row_lo.reshape(-1).astype(np.int64), counts) + (k - plen)
    if lay.prefix_cols.shape[1]:
        pat = np.repeat(np.repeat(np.arange(lay.n_patterns), lay.nb), counts)
        pre = lay.prefix_cols[pat, np.minimum(k, lay.prefix_cols.shape[1] - 1)]
        cols = np.where(in_prefix, pre, rng)
    else:
        cols = rng
    return cols.astype(np.int32)


def entry_rows(lay) -> np.ndarray:
    """Query block of every entry, ``int32 [nnz]``."""
    rows = np.tile(np.arange(lay.nb, dtype=np.int32), lay.n_patterns)
    return np.repeat(rows, row_counts(lay).reshape(-1))


def partial_entries(lay, rows, cols, entries=None) -> np.ndarray:
    """Which enabled blocks ``(rows, cols)`` need an in-block mask (``entries``: their CSR
    indices, custom layouts only)."""
    if lay.mode == "custom":
        return lay.mask_idx[np.asarray(entries, dtype=np.int64)] >= 0
    return partial_blocks(lay.mode, lay.params, lay.time, lay.blocksize, rows, cols)


def col_table(lay):
    """Transposed tables: ``(col_ptr int64 [P, nb+1], rows int32 [nnz], entry int64 [nnz])``.

    Entries of (pattern p, key block c) are ``col_ptr[p, c]:col_ptr[p, c+1]``; ``rows`` gives
    their query blocks (ascending), ``entry`` their index in the row table (for ``partial`` and
    ``mask_idx``).
    """
    P, nb = lay.n_patterns, lay.nb
    pat = np.repeat(np.arange(P, dtype=np.int64), row_counts(lay).sum(axis=1))
    key = pat * nb + lay.cols
    # Entries are sorted by (pattern, row); a stable sort on (pattern, col) keeps rows ascending.
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=P * nb)
    col_ptr = np.zeros(P * nb + 1, np.int64)
    np.cumsum(counts, out=col_ptr[1:])
    col_ptr = np.concatenate([col_ptr[:-1].reshape(P, nb), col_ptr[nb::nb][:, None]], axis=1)
    return col_ptr, lay.entry_rows()[order], order


def token_index(lay, positions):
    """Token index of block-order positions (identity unless the layout permutes); positions
    ``>= time`` (the last block's, when blocks do not divide time) map to themselves, past every
    token."""
    if lay.perm is None:
        return positions
    return token_index_padded(lay.time, lay.nb * lay.blocksize, lay.perm)[positions]


def token_index_padded(time: int, positions: int, perm=None) -> np.ndarray:
    """``int64 [positions]``: the token of each block-order position, ``perm`` (or the identity)
    extended by the identity past ``time``."""
    head = np.arange(time, dtype=np.int64) if perm is None else np.asarray(perm, np.int64)
    return np.concatenate([head, np.arange(time, positions, dtype=np.int64)])


def entry_masks(lay, pattern: int, rows, cols, entries=None) -> np.ndarray:
    """In-block masks ``bool [n, blocksize, blocksize]`` of the enabled blocks ``(rows, cols)`` of
    a pattern (``entries``: their CSR indices, custom layouts only). Built-in modes evaluate
    :func:`~sparse_attention.modes.allowed` on the blocks' tokens."""
    b = lay.blocksize
    if lay.mode == "custom":
        idx = lay.mask_idx[np.asarray(entries, dtype=np.int64)]
        out = np.ones((len(idx), b, b), bool)
        has = idx >= 0
        out[has] = lay.block_masks[idx[has]]
        return out
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    off = np.arange(b)
    i = token_index(lay, rows[:, None] * b + off)[:, :, None]
    j = token_index(lay, cols[:, None] * b + off)[:, None, :]
    h = int(lay.heads_of(pattern)[0])
    p = lay.params
    ok = allowed(i, j, h, lay.mode, p.get("local_attn_ctx"), b, p.get("num_verts"), p.get("vertsize"))
    if lay.time % b:  # no pair with a position past time
        ok = ok & (i < lay.time) & (j < lay.time)
    return ok


class MaskTable:
    """The distinct in-block masks (``bool [b, b]``) of a layout being built, each stored once, in
    the order first seen: :meth:`add` gives masks their indices, :meth:`stack` the ``[n, b, b]``
    array the indices point into. ``seed``: masks that take the first indices. Vectorised (masks
    compared as their packed bits, one opaque value each): layouts of many documents have
    thousands of distinct masks."""

    def __init__(self, blocksize: int, seed=()):
        self.blocksize = blocksize
        width = -(-blocksize * blocksize // 8)
        self._keys = np.zeros(0, f"V{width}")  # packed masks, by index
        self._order = np.zeros(0, np.int64)  # indices sorting _keys
        if len(seed):
            self.add(np.asarray(seed, bool), full=None)

    def _packed(self, masks: np.ndarray) -> np.ndarray:
        packed = np.ascontiguousarray(np.packbits(masks.reshape(len(masks), -1), axis=1))
        return packed.view(self._keys.dtype).reshape(-1)

    def add(self, masks, full: int | None = -1) -> np.ndarray:
        """int32 indices of ``masks`` (``bool [n, b, b]``); a full mask gets ``full`` (-1: the
        tables' "every pair"), or with ``full=None`` an index like any other."""
        masks = np.asarray(masks, bool)
        if not len(masks):
            return np.empty(0, np.int32)
        uniq, first, inverse = np.unique(self._packed(masks), return_index=True, return_inverse=True)
        ids = np.full(len(uniq), -2, np.int64)
        if full is not None:
            ids[uniq == self._packed(np.ones((1, self.blocksize, self.blocksize), bool))[0]] = full
        if len(self._keys):  # already in the table
            known = self._keys[self._order]
            pos = np.minimum(np.searchsorted(known, uniq), len(known) - 1)
            hit = (known[pos] == uniq) & (ids == -2)
            ids[hit] = self._order[pos[hit]]
        new = np.nonzero(ids == -2)[0]
        new = new[np.argsort(first[new], kind="stable")]  # first seen, first indexed
        ids[new] = len(self._keys) + np.arange(len(new))
        if len(new):
            self._keys = np.concatenate([self._keys, uniq[new]])
            self._order = np.argsort(self._keys, kind="stable")
        return ids[np.asarray(inverse).reshape(-1)].astype(np.int32)

    def stack(self) -> np.ndarray:
        b = self.blocksize
        if not len(self._keys):
            return np.zeros((0, b, b), bool)
        bits = np.unpackbits(self._keys.view(np.uint8).reshape(len(self._keys), -1), axis=1)
        return bits[:, : b * b].reshape(-1, b, b).astype(bool)


def padded_rows(lay, pattern: int, r0: int, r1: int):
    """The enabled key blocks of query-block rows ``r0:r1`` of a pattern, padded to the longest
    row: ``(cols int64 [n, maxc], valid bool [n, maxc], entries int64 [n, maxc] or None)``.

    Padding slots hold column 0 and ``valid=False``; ``entries`` (CSR indices) only for custom
    layouts. Works from the structured form without building the CSR tables.
    """
    if lay.structured:
        plen = lay.prefix_len[pattern, r0:r1].astype(np.int64)[:, None]
        lo = lay.row_lo[pattern, r0:r1].astype(np.int64)[:, None]
        hi = lay.row_hi[pattern, r0:r1].astype(np.int64)[:, None]
        counts = plen + np.maximum(hi - lo + 1, 0)
        k = np.arange(max(int(counts.max(initial=0)), 1))[None, :]
        cols = lo + k - plen
        npre = lay.prefix_cols.shape[1]
        if npre:
            pre = lay.prefix_cols[pattern, np.minimum(k, npre - 1)].astype(np.int64)
            cols = np.where(k < plen, pre, cols)
        valid = k < counts
        return np.where(valid, cols, 0), valid, None
    start = lay.row_ptr[pattern, r0:r1][:, None]
    counts = lay.row_ptr[pattern, r0 + 1 : r1 + 1][:, None] - start
    k = np.arange(max(int(counts.max(initial=0)), 1))[None, :]
    valid = k < counts
    entries = np.where(valid, start + k, 0)
    cols = np.where(valid, lay.cols[entries] if lay.nnz else 0, 0).astype(np.int64)
    return cols, valid, np.where(valid, entries, -1)


def row_chunks(counts, cost_per_block: int, budget: int) -> list[tuple[int, int]]:
    """Split query-block rows into chunks ``[r0, r1)`` for a gather engine, which pads a chunk to
    its longest row. ``counts[r]``: enabled blocks of row ``r``; a padded block costs
    ``cost_per_block`` (score elements). A chunk ends where its padded cost would pass
    ``budget``, or, once past an eighth of that, where padding would exceed a quarter of its
    real work (rows of growing length, as in ``all``)."""
    nb = len(counts)
    out, r0 = [], 0
    while r0 < nb:
        r1, widest, total = r0 + 1, max(int(counts[r0]), 1), int(counts[r0])
        while r1 < nb:
            w = max(widest, int(counts[r1]))
            padded = (r1 + 1 - r0) * w
            if padded * cost_per_block > budget or (
                padded * cost_per_block > budget // 8 and padded > 1.25 * (total + int(counts[r1]))
            ):
                break
            widest, total, r1 = w, total + int(counts[r1]), r1 + 1
        out.append((r0, r1))
        r0 = r1
    return out


def block_layout(lay) -> np.ndarray:
    """The block layout ``bool [heads, nb, nb]`` in block order."""
    nb = lay.nb
    out = np.zeros((lay.n_patterns, nb, nb), bool)
    pat = np.repeat(np.arange(lay.n_patterns), row_counts(lay).sum(axis=1))
    out[pat, lay.entry_rows(), lay.cols] = True
    return out[lay.head_pattern]


def to_dense(lay) -> np.ndarray:
    """The allowed pairs ``bool [heads, time, time]`` in natural token order."""
    T, b, nb = lay.time, lay.blocksize, lay.nb
    dense = np.zeros((lay.n_patterns, nb, b, nb, b), bool)
    for p in range(lay.n_patterns):
        cols, valid, entries = padded_rows(lay, p, 0, nb)
        rows = np.broadcast_to(np.arange(nb)[:, None], cols.shape)[valid]
        e = None if entries is None else entries[valid]
        dense[p, rows, :, cols[valid], :] = entry_masks(lay, p, rows, cols[valid], e)
    dense = dense.reshape(lay.n_patterns, nb * b, nb * b)[:, :T, :T]
    if lay.perm is not None:
        nat = np.zeros_like(dense)
        nat[:, lay.perm[:, None], lay.perm[None, :]] = dense
        dense = nat
    return dense[lay.head_pattern]
