"""Context parallelism, the plan (numpy only): a sequence sharded over ``world`` ranks, and the
key/value blocks each rank must receive for the pattern.

A :class:`ShardPlan` cuts a :class:`~sparse_attention.layouts.Layout`'s blocks (in its block
order, so ``strided`` is sharded in its residue-major order) into ``world`` equal shards:

* ``"contiguous"``: rank ``r`` holds blocks ``[r * n, (r + 1) * n)``;
* ``"zigzag"``: the blocks are cut into ``2 * world`` chunks and rank ``r`` holds chunks ``r``
  and ``2 * world - 1 - r``, which balances causal patterns whose rows grow with the position
  (``all``, ``fixed``); the default for those two.

Each rank then computes its queries in two rounds, both ordinary block-sparse attention over a
square layout derived from the global one (:meth:`ShardPlan.rank`):

1. ``own``: its queries against its own keys (a :class:`Layout` over the shard; the built-in
   layout of the shard's length where that is the same pattern, so the fast structured kernels
   run, else a custom layout with the global layout's in-block masks);
2. ``remote``: those of its queries that see a remote key (``rows``) against the key blocks
   received from the other ranks (``recv[src]``, ascending global blocks per source).

The two partial results are merged by their log-sum-exps. Every rank sends exactly the blocks
another rank's queries may read (``send[dst]``): a halo of the window for ``local``, the summary
blocks and the group's halo for ``fixed``; :meth:`ShardPlan.exchanged_blocks` counts them.
Nothing here depends on a framework; :mod:`sparse_attention.torch.distributed` runs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import tables
from .layouts import Layout, csr_layout, make_layout

__all__ = ["BALANCES", "RankPlan", "ShardPlan", "shard_owner", "shard_plan", "shard_positions"]

BALANCES = ("contiguous", "zigzag")

# Rows of one padded_rows call while collecting a shard's entries (bounds the temporaries).
_ROWS_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class RankPlan:
    """One rank's part of a :class:`ShardPlan`; block indices are global block-order positions
    unless named ``local``."""

    rank: int
    blocks: np.ndarray  # int64 [n]: the global blocks this rank holds, ascending
    own: Layout  # square over the shard's n blocks: its queries x its own keys
    rows: np.ndarray  # int64 [m]: local indices of the shard's blocks whose queries see remote keys
    recv: dict  # src rank -> int64 [k]: global key blocks received from it, ascending
    remote: Layout | None  # square over max(m, sum k) blocks: rows x received keys (None: nothing remote)
    send: dict  # dst rank -> int64 [k]: local indices of the blocks sent to it, ascending
    work: int  # enabled blocks of the shard's rows, over heads (compute cost)
    own_causal: bool = False  # the own round is plain causal attention (any dense causal kernel runs it)
    remote_full: bool = False  # the remote round is a full rectangle, rows x received keys (any dense kernel)
    recv_heads: dict | None = None  # src rank -> bool [k, heads]: the heads that read each received block
    send_heads: dict | None = None  # dst rank -> bool [k, heads]: the heads sent of each block sent

    @property
    def recv_blocks(self) -> int:
        return int(sum(len(b) for b in self.recv.values()))

    @property
    def recv_block_heads(self) -> int:
        """Received (block, head) pairs: only the heads whose pattern reads a block travel."""
        return int(sum(m.sum() for m in self.recv_heads.values()))


@dataclass(frozen=True, eq=False)
class ShardPlan:
    layout: Layout
    world: int
    balance: str
    owner: np.ndarray  # int64 [nb]: rank holding each global block
    local_index: np.ndarray  # int64 [nb]: its index within that rank's shard

    @property
    def shard_blocks(self) -> int:
        return self.layout.nb // self.world

    @property
    def shard_time(self) -> int:
        return self.shard_blocks * self.layout.blocksize

    def blocks(self, rank: int) -> np.ndarray:
        """Global blocks held by ``rank``, ascending."""
        return np.nonzero(self.owner == rank)[0]

    def positions(self, rank: int) -> np.ndarray:
        """Token indices (natural order) of ``rank``'s shard, in the order the shard holds them:
        what a data loader feeds that rank (positional embeddings use these)."""
        b = self.layout.blocksize
        pos = (self.blocks(rank)[:, None] * b + np.arange(b)).reshape(-1)
        return tables.token_index(self.layout, pos)

    def rank(self, rank: int) -> RankPlan:
        """The two rounds and the exchange of ``rank`` (cached)."""
        return _rank_plan(self, rank)

    def exchanged_blocks(self) -> int:
        """Key/value blocks sent over all ranks in one forward pass, in (block, head) pairs over
        ``heads`` (the backward sends back as many gradient blocks)."""
        return sum(self.rank(r).recv_block_heads for r in range(self.world)) / self.layout.heads

    def exchanged_bytes(self, batch: int, dim: int, itemsize: int, kv_heads: int | None = None) -> int:
        """Bytes of keys and values sent over all ranks in one forward pass (``dim = heads * head_dim``):
        each block with the heads that read it (``kv_heads``: grouped-query attention, with the
        key/value heads whose group reads it, :func:`kv_head_mask`)."""
        kv = self.layout.heads if kv_heads is None else kv_heads
        pairs = sum(int(kv_head_mask(m, kv).sum()) for r in range(self.world) for m in self.rank(r).recv_heads.values())
        return 2 * pairs * self.layout.blocksize * batch * (dim // self.layout.heads) * itemsize

    def ring_bytes(self, batch: int, dim: int, itemsize: int) -> int:
        """What ring attention sends for the same shards: every key/value shard to every other rank."""
        return 2 * self.world * (self.world - 1) * self.shard_time * batch * dim * itemsize

    def work(self) -> np.ndarray:
        """Enabled blocks (over heads) of each rank's queries: the compute balance."""
        return np.array([self.rank(r).work for r in range(self.world)])


def kv_head_mask(mask: np.ndarray, kv_heads: int) -> np.ndarray:
    """A ``[blocks, heads]`` mask of the query heads that read each block, as one over
    ``kv_heads`` key/value heads (grouped-query attention: a key/value head travels where any
    query head of its group reads the block)."""
    n, heads = mask.shape
    return mask if kv_heads == heads else mask.reshape(n, kv_heads, heads // kv_heads).any(axis=2)


@functools.lru_cache(maxsize=32)
def shard_plan(layout: Layout, world: int, balance: str | None = None, natural: bool = False) -> ShardPlan:
    """The plan of ``layout`` over ``world`` ranks (cached). ``balance``: one of
    :data:`BALANCES`; ``None`` takes ``"zigzag"`` for ``all`` and ``fixed``, else
    ``"contiguous"``. Raises ``ValueError`` unless the blocks split evenly.

    ``natural``: cut the shards in natural token order (:func:`shard_positions`, the order a model
    shards its sequence in) even where the layout reorders its tokens (``strided``); each shard
    must then be whole blocks of the layout's order (for ``strided`` with stride ``l``: ``time /
    (chunks * l)`` a multiple of ``blocksize``), else ``ValueError``."""
    if not isinstance(world, (int, np.integer)) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world (the number of ranks) must be a positive int, got {world!r}")
    if layout.time % layout.blocksize:
        raise ValueError(
            f"context parallelism shards whole blocks: time ({layout.time}) must be a multiple of blocksize "
            f"({layout.blocksize}) here"
        )
    if balance is None:
        balance = "zigzag" if layout.mode in ("all", "fixed") else "contiguous"
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES} or None, got {balance!r}")
    owner = shard_owner(layout.nb, world, balance, layout.time, layout.blocksize)
    if natural and layout.perm is not None:
        b = layout.blocksize
        tokens = np.repeat(owner, b)[layout.perm].reshape(layout.nb, b)  # owner of each block-order token
        if np.any(tokens != tokens[:, :1]):
            raise ValueError(
                f"natural-order shards of {layout.mode!r} at time {layout.time} over {world} ranks ({balance}) are "
                f"not whole blocks of {b} in its token order: make time / (shards * stride) a multiple of the "
                "blocksize (a longer time, fewer ranks, or balance='contiguous')"
            )
        owner = tokens[:, 0].copy()
    local_index = np.zeros(layout.nb, np.int64)
    for r in range(world):
        idx = np.nonzero(owner == r)[0]
        local_index[idx] = np.arange(idx.size)
    return ShardPlan(layout, int(world), balance, owner, local_index)


def shard_owner(nb: int, world: int, balance: str, time: int | None = None, blocksize: int | None = None):
    """``int64 [nb]``: the rank holding each block under ``balance`` (``"contiguous"`` or
    ``"zigzag"``); raises ``ValueError`` unless the blocks split evenly (``time`` and ``blocksize``
    only name the sizes in the message)."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES} or None, got {balance!r}")
    chunks = world * (2 if balance == "zigzag" and world > 1 else 1)
    if nb % chunks:
        b = blocksize or 1
        raise ValueError(
            f"time ({time if time is not None else nb * b}) must split into {chunks} equal shards of whole "
            f"blocks of {b} ({'zigzag: 2 per rank' if chunks > world else 'one per rank'}): pick a time that is "
            f"a multiple of {chunks * b}, or another balance"
        )
    c = np.arange(chunks)
    chunk_owner = np.minimum(c, chunks - 1 - c) if chunks > world else c
    return np.repeat(chunk_owner, nb // chunks).astype(np.int64)


def shard_positions(time: int, blocksize: int, world: int, rank: int, balance: str) -> np.ndarray:
    """Token indices held by ``rank`` (ascending) for a layout in natural token order: what a data
    loader feeds it; :meth:`ShardPlan.positions` for any layout."""
    if time % blocksize:
        raise ValueError(f"time ({time}) must be a multiple of blocksize ({blocksize})")
    owner = shard_owner(time // blocksize, world, balance, time, blocksize)
    blocks = np.nonzero(owner == rank)[0]
    return (blocks[:, None] * blocksize + np.arange(blocksize)).reshape(-1)


def _runs(blocks: np.ndarray):
    """Maximal runs ``[a, b)`` of consecutive ints in the ascending ``blocks``."""
    if blocks.size == 0:
        return []
    cut = np.nonzero(np.diff(blocks) != 1)[0] + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [blocks.size]])
    return [(int(blocks[s]), int(blocks[e - 1]) + 1) for s, e in zip(starts, ends)]


def _entries(lay: Layout, pattern: int, blocks: np.ndarray):
    """``(rows, cols, entries)`` of the enabled blocks of ``blocks``' rows of one pattern (global
    indices; ``entries`` the CSR indices for custom layouts, else None)."""
    rows, cols, ents = [], [], []
    for a, b in _runs(blocks):
        r0 = a
        while r0 < b:
            width = int(lay.row_counts()[pattern, r0:b].max(initial=1))
            r1 = min(b, r0 + max(1, _ROWS_ELEMENTS // max(width, 1)))
            c, valid, e = lay.padded_rows(pattern, r0, r1)
            rr = np.broadcast_to(np.arange(r0, r1)[:, None], c.shape)
            rows.append(rr[valid])
            cols.append(c[valid])
            if e is not None:
                ents.append(e[valid])
            r0 = r1
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(rows), cat(cols), (cat(ents) if lay.mode == "custom" else None)


def _sub_layout(lay: Layout, parts, n_rows: int, n_cols: int) -> Layout:
    """A square custom layout of ``max(n_rows, n_cols)`` blocks from per-pattern entries ``parts[p]
    = (rows, cols, local_rows, local_cols, entries)``: global ``(rows, cols)`` for the in-block
    masks, local ones for the positions."""
    n = max(n_rows, n_cols, 1)
    P = lay.n_patterns
    row_ptr = np.zeros((P, n + 1), np.int64)
    all_cols, all_mask = [], []
    masks = tables.MaskTable(lay.blocksize)
    base = 0
    for p, (rows, cols, lrows, lcols, ents) in enumerate(parts):
        order = np.lexsort((lcols, lrows))
        rows, cols, lrows, lcols = rows[order], cols[order], lrows[order], lcols[order]
        ents = None if ents is None else ents[order]
        row_ptr[p, 1:] = base + np.cumsum(np.bincount(lrows, minlength=n))
        row_ptr[p, 0] = base
        base += rows.size
        midx = np.full(rows.size, -1, np.int32)
        part = np.nonzero(tables.partial_entries(lay, rows, cols, ents))[0]
        if part.size:
            midx[part] = masks.add(lay.entry_masks(p, rows[part], cols[part], None if ents is None else ents[part]))
        all_cols.append(lcols)
        all_mask.append(midx)
    return csr_layout(
        row_ptr, np.concatenate(all_cols), lay.blocksize, lay.head_pattern, np.concatenate(all_mask), masks.stack()
    )


def _same_pattern(a: Layout, b: Layout) -> bool:
    """Whether two layouts of one shape allow the same pairs (tables and in-block masks)."""
    if (a.time, a.heads, a.blocksize) != (b.time, b.heads, b.blocksize) or a.perm is not None or b.perm is not None:
        return False
    if not np.array_equal(a.head_pattern, b.head_pattern) or a.n_patterns != b.n_patterns:
        return False
    if not (np.array_equal(a.row_ptr, b.row_ptr) and np.array_equal(a.cols, b.cols)):
        return False
    rows, cols = a.entry_rows().astype(np.int64), a.cols.astype(np.int64)
    ents = np.arange(a.nnz)
    if not np.array_equal(a.partial, b.partial):
        return False
    pat = np.repeat(np.arange(a.n_patterns), a.row_counts().sum(axis=1))
    for p in range(a.n_patterns):
        sel = np.nonzero((pat == p) & a.partial)[0]
        ma = a.entry_masks(p, rows[sel], cols[sel], ents[sel] if a.mode == "custom" else None)
        mb = b.entry_masks(p, rows[sel], cols[sel], ents[sel] if b.mode == "custom" else None)
        if not np.array_equal(ma, mb):
            return False
    return True


def _builtin_twin(lay: Layout, own: Layout, n: int) -> Layout:
    """The built-in layout of the shard's length if it is ``own``'s pattern (fast kernels), else ``own``."""
    if lay.mode == "custom" or lay.perm is not None:
        return own
    try:
        twin = make_layout(n * lay.blocksize, lay.heads, lay.mode, blocksize=lay.blocksize, **lay.params)
    except ValueError:
        return own
    return twin if _same_pattern(own, twin) else own


def _select(rows, cols, ents, m):
    return rows[m], cols[m], None if ents is None else ents[m]


@functools.lru_cache(maxsize=256)
def _rank_plan(plan: ShardPlan, rank: int) -> RankPlan:
    lay = plan.layout
    if not 0 <= rank < plan.world:
        raise ValueError(f"rank must lie in [0, {plan.world}), got {rank}")
    blocks = plan.blocks(rank)
    n = blocks.size
    own_parts, remote_parts = [], []
    work = 0
    for p in range(lay.n_patterns):
        rows, cols, ents = _entries(lay, p, blocks)
        work += rows.size * len(lay.heads_of(p))
        mine = plan.owner[cols] == rank
        r, c, e = _select(rows, cols, ents, mine)
        own_parts.append((r, c, plan.local_index[r], plan.local_index[c], e))
        remote_parts.append(_select(rows, cols, ents, ~mine))
    needed, heads = _needed(plan, rank)
    src = plan.owner[needed]
    recv = {int(s): needed[src == s] for s in np.unique(src)}
    recv_heads = {int(s): heads[src == s] for s in np.unique(src)}
    # received keys sit in source order, each source's blocks ascending: slot of each global block
    order = np.concatenate([recv[s] for s in sorted(recv)]) if recv else np.zeros(0, np.int64)
    slot = np.full(lay.nb, -1, np.int64)
    slot[order] = np.arange(order.size)
    rows_seen = np.unique(np.concatenate([plan.local_index[r] for r, _, _ in remote_parts]))
    row_slot = np.full(n, -1, np.int64)
    row_slot[rows_seen] = np.arange(rows_seen.size)
    own = _sub_layout(lay, own_parts, n, n)
    own = _builtin_twin(lay, own, n)
    remote = None
    if order.size:
        parts = [(r, c, row_slot[plan.local_index[r]], slot[c], e) for r, c, e in remote_parts]
        remote = _sub_layout(lay, parts, rows_seen.size, order.size)
    send, send_heads = {}, {}
    for dst in range(plan.world):
        if dst == rank:
            continue
        theirs, their_heads = _needed(plan, dst)
        mine = plan.owner[theirs] == rank
        if mine.any():
            send[dst] = plan.local_index[theirs[mine]]
            send_heads[dst] = their_heads[mine]
    m, k = rows_seen.size, order.size
    full = remote is not None and all(
        np.all(np.diff(remote.row_ptr[p, : m + 1]) == k) and remote.row_counts()[p, m:].sum() == 0
        for p in range(remote.n_patterns)
    )
    full = full and not np.any(remote.mask_idx >= 0)
    return RankPlan(
        rank,
        blocks,
        own,
        rows_seen.astype(np.int64),
        recv,
        remote,
        send,
        int(work),
        own.mode == "all",
        bool(full),
        recv_heads,
        send_heads,
    )


@functools.lru_cache(maxsize=256)
def _needed(plan: ShardPlan, rank: int):
    """``(blocks, heads)``: the global key blocks held by other ranks that ``rank``'s queries read
    (ascending), and ``bool [k, heads]``, which heads read each."""
    lay = plan.layout
    blocks = plan.blocks(rank)
    per = []
    for p in range(lay.n_patterns):
        cols = np.unique(_entries(lay, p, blocks)[1])
        per.append(cols[plan.owner[cols] != rank])
    needed = np.unique(np.concatenate(per)) if per else np.zeros(0, np.int64)
    heads = np.zeros((needed.size, lay.heads), bool)
    for p, cols in enumerate(per):
        heads[np.ix_(np.searchsorted(needed, cols), lay.heads_of(p))] = True
    return needed, heads
