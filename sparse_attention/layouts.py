"""Block layouts of the Sparse Transformer attention patterns (numpy only).

A :class:`Layout` says which ``(query, key)`` token pairs may attend, in two levels:

* a block layout: the sequence (possibly reordered by ``perm``) is cut into ``nb = time /
  blocksize`` blocks, and only enabled ``(query block, key block)`` pairs are ever computed;
* an in-block rule for the *partial* enabled blocks (diagonals, band edges, callback masks);
  *full* blocks need no mask at all.

Enabled blocks are stored as compressed rows (CSR) per distinct head pattern, so memory is
proportional to the enabled blocks: nothing of size ``time x time`` or ``nb x nb`` is built
for the built-in modes (a ``local`` layout at ``time = 1,048,576`` builds in milliseconds).

Tables (``P`` = number of distinct head patterns, ``head_pattern[h]`` maps a head to its one)::

    row_ptr  int64 [P, nb + 1]   entries of (pattern p, query block r) are row_ptr[p, r]:row_ptr[p, r+1]
    cols     int32 [nnz]         key block of each entry, ascending within a row
    partial  bool  [nnz]         whether the entry needs an in-block mask
    mask_idx int32 [nnz]         custom layouts only: index into block_masks (-1 = full block)

``col_table()`` gives the transposed table (per key-block column, its query blocks) for the
backward pass.  Token order: block position ``p`` holds token ``perm[p]`` (``perm`` is None
for natural order; ``strided`` uses a residue-major order in which it is block sparse).

The patterns themselves are defined once, in :mod:`sparse_attention.modes`; the tables are
derived in :mod:`sparse_attention.tables`, the pictures drawn by :mod:`sparse_attention.plot`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from . import tables
from .migrate import deepspeed_block_layout
from .modes import (
    MODES,
    allowed,
    block_rows,
    check_positive_int,
    dense_mask,
    fixed_vert_range,
    pattern_allowed,
    validate_pattern,
)

__all__ = [
    "MODES",
    "Layout",
    "allowed",
    "csr_layout",
    "custom_layout",
    "bigbird_layout",
    "broadcast_layout",
    "builtin_pattern",
    "stack_heads",
    "deepspeed_layout",
    "longformer_layout",
    "packed_layout",
    "retile",
    "dense_mask",
    "fixed_vert_range",
    "from_dense",
    "make_layout",
    "validate_pattern",
]


@dataclass(frozen=True, eq=False)
class Layout:
    """A block-sparse attention pattern; see the module docstring for the tables. Immutable:
    derived tables are computed on first use and kept (``functools.cached_property``); back ends
    keep their own device state in caches of their own, keyed by the layout.

    Build one with :func:`make_layout` (built-in modes), :func:`custom_layout` (a user block
    layout with an optional per-block callback) or :func:`from_dense` (a dense mask).

    Built-in modes are stored in a compact *structured* form, every row being a prefix of a
    shared sorted column list followed by a contiguous range of columns::

        row r of pattern p = prefix_cols[p, :prefix_len[p, r]]  ++  range(row_lo[p, r], row_hi[p, r] + 1)

    (``all``, ``local``, ``strided``: no prefix; ``fixed``: the summary blocks of the earlier
    groups, then the query's own group). The CSR tables are derived from it on first use.
    Custom layouts are given in CSR directly and have no structured form (``row_lo is None``).
    """

    time: int
    heads: int
    blocksize: int
    mode: str  # one of MODES or "custom"
    params: dict
    head_pattern: np.ndarray  # int64 [heads]
    perm: np.ndarray | None = None  # int64 [time]: token at each block-order position
    # structured form (built-in modes)
    row_lo: np.ndarray | None = None  # int32 [P, nb]
    row_hi: np.ndarray | None = None  # int32 [P, nb]
    prefix_cols: np.ndarray | None = None  # int32 [P, n_prefix]
    prefix_len: np.ndarray | None = None  # int32 [P, nb]
    # CSR form (custom layouts; derived for built-in modes)
    csr: tuple | None = None  # (row_ptr int64 [P, nb + 1], cols int32 [nnz])
    mask_idx: np.ndarray | None = None  # int32 [nnz], custom only
    block_masks: np.ndarray | None = None  # bool [n_masks, blocksize, blocksize], custom only

    @property
    def structured(self) -> bool:
        return self.row_lo is not None

    @functools.cached_property
    def row_ptr(self) -> np.ndarray:
        """``int64 [P, nb + 1]``: the entries of (pattern p, row r) are ``row_ptr[p, r]:row_ptr[p, r+1]``."""
        return self.csr[0] if self.csr is not None else tables.csr_row_ptr(self)

    @functools.cached_property
    def cols(self) -> np.ndarray:
        """``int32 [nnz]``: key block of every entry, ascending within a row."""
        return self.csr[1] if self.csr is not None else tables.csr_cols(self)

    @functools.cached_property
    def partial(self) -> np.ndarray:
        """``bool [nnz]``: whether each entry needs an in-block mask."""
        entries = np.arange(self.nnz) if self.mode == "custom" else None
        return tables.partial_entries(self, self.entry_rows().astype(np.int64), self.cols.astype(np.int64), entries)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def nb(self) -> int:
        """Blocks per row: ``ceil(time / blocksize)``; positions ``>= time`` of the last block
        hold no token (no pair with one is allowed)."""
        return -(-self.time // self.blocksize)

    @property
    def n_patterns(self) -> int:
        return (self.row_lo if self.structured else self.csr[0]).shape[0]

    @property
    def nnz(self) -> int:
        """Enabled blocks over all distinct patterns."""
        return int(self.row_counts().sum())

    def row_counts(self) -> np.ndarray:
        """Enabled blocks per (pattern, query-block row), ``int64 [P, nb]``."""
        return tables.row_counts(self)

    def blocks_per_head(self) -> np.ndarray:
        """Enabled blocks of each head, ``int64 [heads]``."""
        return self.row_counts().sum(axis=1)[self.head_pattern]

    def density(self) -> float:
        """Fraction of the ``heads * nb * nb`` blocks that are enabled."""
        return float(self.blocks_per_head().sum()) / (self.heads * self.nb * self.nb)

    def heads_of(self, pattern: int) -> np.ndarray:
        return np.nonzero(self.head_pattern == pattern)[0]

    # -- derived tables (cached) -----------------------------------------------------------
    def entry_rows(self) -> np.ndarray:
        """Query block of every entry, ``int32 [nnz]``."""
        return self._derived("entry_rows", tables.entry_rows)

    def col_table(self):
        """Transposed tables ``(col_ptr, rows, entry)`` for the backward pass (:func:`tables.col_table`)."""
        return self._derived("col_table", tables.col_table)

    def _derived(self, name, make):
        cache = self.__dict__.setdefault("_derived_tables", {})
        if name not in cache:
            cache[name] = make(self)
        return cache[name]

    def entry_masks(self, pattern: int, rows, cols, entries=None) -> np.ndarray:
        """In-block masks ``bool [n, blocksize, blocksize]`` of enabled blocks (:func:`tables.entry_masks`)."""
        return tables.entry_masks(self, pattern, rows, cols, entries)

    def padded_rows(self, pattern: int, r0: int, r1: int):
        """Enabled key blocks of rows ``r0:r1``, padded (:func:`tables.padded_rows`)."""
        return tables.padded_rows(self, pattern, r0, r1)

    # -- dense views (small sizes: tests, plots) ---------------------------------------------
    def block_layout(self) -> np.ndarray:
        """The block layout ``bool [heads, nb, nb]`` in block order."""
        return tables.block_layout(self)

    def to_dense(self) -> np.ndarray:
        """The allowed pairs ``bool [heads, time, time]`` in natural token order."""
        return tables.to_dense(self)

    def plot(self, path=None, heads=None, ax=None, tokens: bool | None = None):
        """Draw the layout (needs matplotlib, the ``viz`` extra); see :func:`sparse_attention.plot.plot_layout`."""
        from .plot import plot_layout

        return plot_layout(self, path, heads, ax, tokens)

    def __repr__(self):
        return (
            f"Layout(mode={self.mode!r}, time={self.time}, heads={self.heads}, blocksize={self.blocksize}, "
            f"patterns={self.n_patterns}, nnz={self.nnz}, density={self.density():.4f})"
        )


# -- built-in modes ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def make_layout(
    time, heads, attn_mode, local_attn_ctx=None, blocksize=32, num_verts=None, vertsize=None, causal: bool = True
) -> Layout:
    """The layout of a built-in mode (cached by its parameters); see SEMANTICS.md.

    Builds only the structured form (``O(nb)`` memory, milliseconds even at ``time = 2**20``);
    the CSR tables follow on first use.

    ``causal=False``: the mode's bidirectional version (:func:`~sparse_attention.modes.allowed`),
    built as a custom layout (CSR tables, memory proportional to the enabled blocks; ``strided``
    in its residue-major token order, where each residue class is one dense segment); its
    ``params`` name the mode, with ``causal: False``.

    >>> make_layout(1024, 4, "fixed", local_attn_ctx=128, blocksize=32, num_verts=4, vertsize=1)
    Layout(mode='fixed', time=1024, heads=4, blocksize=32, patterns=4, nnz=304, density=0.2969)
    """
    p = validate_pattern(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal)
    if not causal:
        return _bidirectional_layout(p)
    params = {k: v for k, v in p.items() if k in ("local_attn_ctx", "num_verts", "vertsize")}
    return Layout(time, heads, p["blocksize"], attn_mode, params, **block_rows(p))


def _bidirectional_layout(p: dict) -> Layout:
    """The custom layout of a bidirectional built-in mode (``p`` from :func:`validate_pattern`):
    each row's key blocks from the pattern's block-level closed form, the in-block masks of the
    partial ones from :func:`allowed` (deduplicated)."""
    time, heads, mode, b = p["time"], p["heads"], p["attn_mode"], p["blocksize"]
    nb = -(-time // b)
    r = np.arange(nb, dtype=np.int64)
    perm = None
    head_pattern = np.zeros(heads, np.int64)
    if mode == "all":
        rows = [[np.arange(nb)] * nb]
    elif mode == "local":
        s = p["local_attn_ctx"] // b
        rows = [[np.arange(max(x - s, 0), min(x + s, nb - 1) + 1) for x in r]]
    elif mode == "strided":
        # residue-major order (as the causal mode): position q holds token (q % n) * l + q // n,
        # and the pattern is every pair inside one segment of n = time / l positions
        n = time // p["local_attn_ctx"]
        pos = np.arange(time, dtype=np.int64)
        perm = (pos % n) * p["local_attn_ctx"] + pos // n
        first = (r * b // n) * n // b  # the first block of the row's first segment
        last = np.minimum((((r * b + b - 1) // n + 1) * n - 1) // b, nb - 1)  # the last of its last segment
        rows = [[np.arange(a, z + 1) for a, z in zip(first, last)]]
    else:  # fixed: the own group, and the summary blocks of the head in every group
        s, nv, vs = p["local_attn_ctx"] // b, p["num_verts"], p["vertsize"]
        groups = np.arange(-(-nb // s))
        rows = []
        for hp in range(nv):
            summary = (groups[:, None] * s + fixed_vert_range(hp, s, nv, vs)[0] + np.arange(vs)).reshape(-1)
            summary = summary[summary < nb]
            per_group = [np.union1d(summary, np.arange(g * s, min(g * s + s, nb))) for g in groups]
            rows.append([per_group[x // s] for x in r])
        head_pattern = np.arange(heads, dtype=np.int64) % nv
    ent_row, cols, ent_head = _entries(rows, nb, head_pattern)
    # the entries that may be partial, by the block-level closed form (local's band edges,
    # strided's blocks across segment ends; all's and fixed's blocks are full)
    if mode == "local":
        cand = np.nonzero(np.abs(ent_row - cols) == p["local_attn_ctx"] // b)[0]
    elif mode == "strided":
        n = time // p["local_attn_ctx"]
        seg_a, seg_b = ent_row * b // n, (ent_row * b + b - 1) // n
        col_a, col_b = cols * b // n, (cols * b + b - 1) // n
        cand = np.nonzero(~((seg_a == seg_b) & (col_a == col_b) & (seg_a == col_a)))[0]
    else:
        cand = np.zeros(0, np.int64)
    tok = tables.token_index_padded(time, nb * b, perm)

    def rule(i, j, h):
        return pattern_allowed(p, tok[i], tok[j], h)

    lay = _rule_csr(time, b, head_pattern, ent_row, cols, ent_head, rule, cand)
    # the pattern's own blocksize too (fixed's summary blocks): kept by retile, whose blocks differ
    keep = ("attn_mode", "local_attn_ctx", "num_verts", "vertsize", "causal", "blocksize")
    return dataclasses.replace(lay, perm=perm, params={k: v for k, v in p.items() if k in keep})


def builtin_pattern(layout: Layout) -> tuple[str, dict, bool] | None:
    """``(mode, params, causal)`` of the built-in mode a layout is (``params`` with the pattern's
    ``blocksize``): a causal built-in layout, or a bidirectional one (``make_layout(...,
    causal=False)``, a custom layout naming its mode and blocksize, also after :func:`retile`);
    None for other custom layouts (packed documents' included)."""
    if layout.mode != "custom":
        return layout.mode, {**layout.params, "blocksize": layout.blocksize}, True
    p = layout.params
    if p.get("causal") is False and p.get("attn_mode") in MODES and "blocksize" in p and "cu_seqlens" not in p:
        return p["attn_mode"], p, False
    return None


def split_documents(cu: np.ndarray, length: int) -> np.ndarray:
    """Boundaries ``cu`` with every document cut into pieces of ``length`` tokens counted from its
    own first token (its last piece shorter): the documents on which a pattern that attends
    within groups of ``length`` (``patterns.Group``) is ``all``."""
    cu = np.asarray(cu, np.int64)
    n = np.diff(cu)
    pieces = -(-n // length)
    first = np.repeat(cu[:-1], pieces)
    index = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.append(first + index * length, cu[-1])


def check_cu_seqlens(cu_seqlens) -> np.ndarray:
    """``cu_seqlens`` (a list, numpy array or tensor of ints) as ``int64 [n_docs + 1]``, checked:
    ``0 = cu[0] < cu[1] < ... < cu[n_docs]`` (the documents' boundaries in the packed sequence)."""
    if hasattr(cu_seqlens, "detach"):  # a torch tensor (a CUDA one is read once, to build the layout)
        cu_seqlens = cu_seqlens.detach().cpu().numpy()
    elif hasattr(cu_seqlens, "numpy") and not isinstance(cu_seqlens, np.ndarray):  # a tf eager tensor
        cu_seqlens = cu_seqlens.numpy()
    cu = np.asarray(cu_seqlens)
    if cu.dtype.kind not in "iu" and not (cu.dtype.kind == "O" and all(isinstance(x, (int, np.integer)) for x in cu)):
        raise TypeError(f"cu_seqlens must hold integers, got dtype {cu.dtype}")
    cu = cu.astype(np.int64)
    if cu.ndim != 1 or cu.size < 2:
        raise ValueError(f"cu_seqlens must be 1-D with n_docs + 1 >= 2 entries, got shape {list(cu.shape)}")
    if cu[0] != 0 or np.any(np.diff(cu) <= 0):
        raise ValueError(
            f"cu_seqlens must start at 0 and increase strictly (every document non-empty), got {cu.tolist()[:12]}"
        )
    return cu


def packed_layout(
    cu_seqlens,
    heads,
    attn_mode,
    local_attn_ctx=None,
    blocksize=32,
    num_verts=None,
    vertsize=None,
    causal: bool = True,
) -> Layout:
    """The layout of packed documents: document ``d`` holds tokens ``cu[d]:cu[d+1]`` of one
    sequence of ``time = cu[-1]`` tokens; each attends only within itself, under the mode's
    pattern restarted at its own first token (positions ``i - cu[d]``), documents of any length.

    A custom layout (CSR tables; memory proportional to the enabled blocks): the candidate blocks
    per row from the pattern's block-level form inside each document, the in-block masks from
    :func:`allowed` on document positions (one mask per block offset inside a document for the
    modes that depend on ``i - j`` only), blocks that hold no allowed pair dropped.
    ``strided`` is laid out in a per-document residue-major order (``perm``: each document's
    residue classes one after the other, each a dense segment), where it is block sparse. Its
    ``params`` name the mode, with ``cu_seqlens`` as a tuple.
    """
    cu = check_cu_seqlens(cu_seqlens)
    return _packed_layout(
        tuple(int(x) for x in cu), heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal
    )


@functools.lru_cache(maxsize=16)
def _packed_layout(cu, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal) -> Layout:
    cu = np.asarray(cu, np.int64)
    time = int(cu[-1])
    p = validate_pattern(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal, documents=True)
    b, mode = p["blocksize"], attn_mode
    if mode == "strided":
        lay = _packed_strided(cu, heads, p)
        params = {k: v for k, v in p.items() if k in ("attn_mode", "local_attn_ctx", "causal")}
        return dataclasses.replace(lay, params={**params, "cu_seqlens": tuple(int(x) for x in cu)})
    nb = -(-time // b)
    pos = np.arange(nb * b, dtype=np.int64)
    doc = np.searchsorted(cu, pos, side="right") - 1
    doc[pos >= time] = -1
    start = np.where(doc >= 0, cu[np.maximum(doc, 0)], 0)
    L = p.get("local_attn_ctx")
    n_pat = p["num_verts"] if mode == "fixed" else 1
    head_pattern = np.arange(heads, dtype=np.int64) % n_pat
    if mode == "strided":  # block offsets R - C whose blocks can hold i - j = 0 mod l (any document start)
        P = L // np.gcd(L, b)
        offs = np.arange(P)
        x = (-offs * b) % L  # i - j = offs * b + (a - a') = 0 mod l needs a - a' = x or x - l
        hit = offs[(x < b) | (L - x < b)]
    rows = []
    for hp in range(n_pat):
        if mode == "fixed":
            s, nv, vs = L // b, p["num_verts"], p["vertsize"]
            lo, hi = fixed_vert_range(hp, s, nv, vs)
        pat_rows = []
        for R in range(nb):
            t0, t1 = R * b, min(R * b + b, time) - 1  # the row's first and last token
            cols = []
            for d in range(doc[t0], doc[t1] + 1):
                c0, c1 = int(cu[d]), int(cu[d + 1]) - 1  # the document's tokens
                i0, i1 = max(t0, c0), min(t1, c1)  # the row's tokens in it
                last = i1 if causal else c1  # the latest key any of them may read
                if mode == "all":
                    lo_t = c0
                elif mode == "local":
                    lo_t = max(i0 - L + 1, c0)
                    last = i1 if causal else min(i1 + L - 1, c1)
                elif mode == "strided":
                    lo_t = c0
                else:  # fixed: the own groups of the row's tokens, then every summary block
                    lo_t = c0 + (i0 - c0) // L * L
                    if not causal:
                        last = min(c0 + ((i1 - c0) // L + 1) * L - 1, c1)
                blocks = np.arange(lo_t // b, last // b + 1)
                if mode == "strided":
                    blocks = np.arange(c0 // b, last // b + 1)
                    blocks = blocks[np.isin((R - blocks) % P, hit)]
                cols.append(blocks)
                if mode == "fixed":  # summary keys: up to the row's last token, or anywhere (bidirectional)
                    key_end = last if causal else c1
                    g = np.arange((key_end - c0) // L + 1)
                    tok_lo = c0 + g * L + lo * b
                    tok_hi = np.minimum(c0 + g * L + (hi + 1) * b - 1, key_end)
                    ok = tok_lo <= tok_hi
                    cols.append(_ranges(tok_lo[ok] // b, tok_hi[ok] // b))
            pat_rows.append(np.unique(np.concatenate(cols)) if cols else np.zeros(0, np.int64))
        rows.append(pat_rows)
    ent_row, ent_col, ent_head = _entries(rows, nb, head_pattern)

    def rule(i, j, h):
        same = (doc[i] == doc[j]) & (doc[i] >= 0)
        return same & pattern_allowed(p, i - start[i], j - start[j], h)

    # blocks inside one document share their mask with every block of the same key
    first_r, last_r = doc[ent_row * b], doc[np.minimum(ent_row * b + b - 1, time - 1)]
    first_c, last_c = doc[ent_col * b], doc[np.minimum(ent_col * b + b - 1, time - 1)]
    inside = (first_r == last_r) & (first_c == last_c) & (first_r == first_c) & (ent_row * b + b <= time)
    inside &= ent_col * b + b <= time
    if mode != "fixed":  # i - j patterns: the block offset
        key = np.where(inside, ent_row - ent_col + nb, -1)
    else:
        # fixed: the rows' and columns' first positions in their groups (a, e) and the groups'
        # difference dg (a pair's groups differ by dg - 1 .. dg + 1, as b <= l; beyond +-2 only its
        # sign matters), per pattern (its summary blocks)
        c0 = start[ent_row * b]
        ri, cj = ent_row * b - c0, ent_col * b - c0
        a, e = ri % L, cj % L
        dg = np.clip(ri // L - cj // L, -2, 2) + 2
        key = np.where(inside, ((head_pattern[ent_head] * L + a) * L + e) * 5 + dg, -1)
    lay = _rule_csr(time, b, head_pattern, ent_row, ent_col, ent_head, rule, np.arange(ent_col.size), key)
    params = {k: v for k, v in p.items() if k in ("attn_mode", "local_attn_ctx", "num_verts", "vertsize", "causal")}
    return dataclasses.replace(lay, params={**params, "cu_seqlens": tuple(int(x) for x in cu)})


def _packed_strided(cu: np.ndarray, heads: int, p: dict) -> Layout:
    """Packed ``strided`` in each document's residue-major order: block-order position ``q``
    holds token ``perm[q]``, the documents one after the other, each document's tokens of local
    residue ``r`` (mod ``l``) together in one segment, ascending. The allowed pairs are those of
    one segment (causal: the earlier positions of it), so each row's keys are one contiguous run
    of positions."""
    time, b, l, causal = int(cu[-1]), p["blocksize"], p["local_attn_ctx"], p.get("causal", True)
    nb = -(-time // b)
    tok = np.arange(time, dtype=np.int64)
    doc = np.searchsorted(cu, tok, side="right") - 1
    res = (tok - cu[doc]) % l
    perm = np.lexsort((tok, res, doc))  # by document, then residue, then position
    seg = np.full(nb * b, -1, np.int64)  # each position's segment (padding past time: none)
    seg[:time] = (doc * l + res)[perm]
    first = np.searchsorted(seg[:time], seg[:time], side="left")  # the segment's first position
    last = np.searchsorted(seg[:time], seg[:time], side="right") - 1  # and its last
    r = np.arange(nb, dtype=np.int64)
    q0, q1 = r * b, np.minimum(r * b + b, time) - 1  # each row's first and last position
    lo = first[q0] // b
    hi = r if causal else last[q1] // b
    ent_row = np.repeat(r, hi - lo + 1)
    cols = _ranges(lo, hi)
    # partial: blocks not inside one segment (rows and columns), and causal diagonals
    whole = lambda x: (seg[x * b] == seg[np.minimum(x * b + b, time) - 1]) & (x * b + b <= time)  # noqa: E731
    full = whole(ent_row) & whole(cols) & (seg[ent_row * b] == seg[cols * b])
    if causal:
        full &= cols < ent_row
    pos = np.arange(nb * b, dtype=np.int64)

    def rule(i, j, h):
        same = (seg[i] == seg[j]) & (seg[i] >= 0)
        return same & (pos[i] >= pos[j]) if causal else same

    head_pattern = np.zeros(heads, np.int64)
    lay = _rule_csr(time, b, head_pattern, ent_row, cols, np.zeros_like(cols), rule, np.nonzero(~full)[0])
    return dataclasses.replace(lay, perm=perm)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, z + 1) for a, z in zip(lo, hi)])`` (``lo <= hi``), vectorised."""
    n = hi - lo + 1
    if n.size == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(n) - n  # where each range starts in the output
    return np.repeat(lo - first, n) + np.arange(int(n.sum()))


def _entries(rows, nb: int, head_pattern):
    """Flatten per-pattern rows (lists of ascending column arrays) into entries: ``(row, col,
    a head of the pattern)``, in CSR order."""
    counts = np.array([[len(c) for c in pat] for pat in rows], np.int64).reshape(-1)
    ent_row = np.repeat(np.tile(np.arange(nb, dtype=np.int64), len(rows)), counts)
    cols = np.concatenate([np.asarray(c, np.int64) for pat in rows for c in pat] or [np.zeros(0, np.int64)])
    first_head = [int(np.nonzero(head_pattern == i)[0][0]) for i in range(len(rows))]
    ent_head = np.repeat(np.repeat(first_head, nb), counts)
    return ent_row, cols, ent_head


def _rule_csr(time, b, head_pattern, ent_row, cols, ent_head, rule, cand, key=None) -> Layout:
    """A custom layout from candidate entries (CSR order) and a token rule ``rule(i, j, h)``
    (block-order positions, broadcast arrays): the entries ``cand`` get the rule's in-block mask
    (entries with one ``key >= 0`` share the mask of the first of them), the others are full;
    no pair with a position past ``time`` is allowed; entries whose mask is empty are dropped;
    masks are deduplicated."""
    nb = -(-time // b)
    if time % b:  # the last block's positions past time: its row and column are partial
        cand = np.union1d(cand, np.nonzero((ent_row == nb - 1) | (cols == nb - 1))[0])
    if key is not None:  # evaluate one entry per key, the first of it among the candidates
        k = key[cand]
        shared = k >= 0
        _, first, inverse = np.unique(k[shared], return_index=True, return_inverse=True)
        evaluate = np.union1d(cand[~shared], cand[shared][first])
    else:
        evaluate = cand
    mask_idx = np.full(cols.size, -1, np.int64)
    empty = np.zeros(cols.size, bool)
    masks = tables.MaskTable(b)
    step = max(1, (1 << 22) // (b * b))
    for start in range(0, evaluate.size, step):  # in chunks: a mask per entry is b * b bools
        e = evaluate[start : start + step]
        i = (ent_row[e, None] * b + np.arange(b))[:, :, None]
        j = (cols[e, None] * b + np.arange(b))[:, None, :]
        m = np.broadcast_to(rule(i, j, ent_head[e, None, None]) & (i < time) & (j < time), (e.size, b, b))
        empty[e] = ~m.reshape(e.size, -1).any(axis=1)
        mask_idx[e] = masks.add(m)  # full blocks: -1
    if key is not None and shared.any():
        rep = cand[shared][first][inverse]  # each shared candidate's evaluated entry
        mask_idx[cand[shared]], empty[cand[shared]] = mask_idx[rep], empty[rep]
    block_masks = masks.stack()
    keep = ~empty
    P = int(np.max(head_pattern)) + 1
    pat = np.zeros(cols.size, np.int64)
    first_head = [int(np.nonzero(head_pattern == i)[0][0]) for i in range(P)]
    for i, h in enumerate(first_head):  # entries are in pattern order: recover the pattern
        pat[ent_head == h] = i
    counts = np.bincount(pat[keep] * nb + ent_row[keep], minlength=P * nb).reshape(P, nb)
    row_ptr = np.zeros((P, nb + 1), np.int64)
    row_ptr[:, 1:] = np.cumsum(counts, axis=1)
    row_ptr += np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])[:, None]
    lay = csr_layout(row_ptr, cols[keep], b, head_pattern, mask_idx[keep], block_masks)
    return dataclasses.replace(lay, time=time)


def retile(layout: Layout, blocksize: int) -> Layout:
    """The same custom layout (every allowed pair, token order, heads) cut into blocks of
    ``blocksize``, a power-of-two multiple or divisor of ``layout.blocksize``: coarser blocks are
    the unions of the blocks they cover (their in-block masks put together), finer ones the parts
    of the blocks they cut (parts with no allowed pair dropped, those of full blocks full). The
    fused kernels run custom layouts at their tuned tile this way, whatever the layout's own
    block size."""
    if layout.mode != "custom":
        raise ValueError(
            f"retile takes a custom layout; {layout.mode!r} is a built-in mode (make_layout takes blocksize)"
        )
    b0, b = layout.blocksize, check_positive_int("blocksize", blocksize)
    if b == b0:
        return layout
    big, small = max(b, b0), min(b, b0)
    if big % small or (big // small) & (big // small - 1):
        raise ValueError(f"blocksize ({b}) must be a power-of-two multiple or divisor of the layout's ({b0})")
    T, nb0, nb = layout.time, layout.nb, -(-layout.time // b)
    P = layout.n_patterns
    row_ptr = layout.row_ptr
    pat0 = np.repeat(np.arange(P), row_ptr[:, -1] - row_ptr[:, 0])
    row0, col0 = layout.entry_rows().astype(np.int64), layout.cols.astype(np.int64)
    mid0 = layout.mask_idx.astype(np.int64)
    keys0 = (pat0 * nb0 + row0) * nb0 + col0  # ascending: CSR order
    masks0 = layout.block_masks
    first_head = np.array([int(np.nonzero(layout.head_pattern == i)[0][0]) for i in range(P)])

    def rule(i, j, h):  # the old layout's pairs, looked up by block
        r, c = i // b0, j // b0
        k = (layout.head_pattern[h] * nb0 + r) * nb0 + c
        e = np.minimum(np.searchsorted(keys0, k), keys0.size - 1)
        found = (keys0[e] == k) & (r < nb0) & (c < nb0)
        m = mid0[e]
        inside = masks0[np.maximum(m, 0), i % b0, j % b0] if masks0.size else True
        return found & ((m < 0) | inside)

    if b > b0:  # coarser: the blocks covering the old ones
        f = b // b0
        new = (pat0 * nb + row0 // f) * nb + col0 // f
        uniq, inv = np.unique(new, return_inverse=True)
        # each new block's old blocks by position (-2: none there, -1: full, else the mask)
        sub = np.full((uniq.size, f * f), -2, np.int64)
        sub[inv, (row0 % f) * f + col0 % f] = mid0
        partial = (sub != -1).any(axis=1)
        base = len(masks0) + 2  # the sub-block ids as the digits of one number (a few fit an int64)
        if base ** (f * f) < 2**62:
            key = ((sub + 2) * base ** np.arange(f * f)).sum(axis=1)
        else:
            _, key = np.unique(sub, axis=0, return_inverse=True)
    else:  # finer: the parts of the old blocks (none past the last new block)
        f = b0 // b
        a = np.arange(f * f)
        row = (row0[:, None] * f + a // f).reshape(-1)
        col = (col0[:, None] * f + a % f).reshape(-1)
        parent = np.repeat(mid0, f * f)
        key = np.where(parent >= 0, parent * f * f + np.tile(a, mid0.size), -1)
        ok = (row < nb) & (col < nb)
        uniq = (np.repeat(pat0, f * f)[ok] * nb + row[ok]) * nb + col[ok]
        order = np.argsort(uniq, kind="stable")
        uniq, key = uniq[order], key[ok][order]
        partial = key >= 0
    pat, row, col = uniq // (nb * nb), uniq // nb % nb, uniq % nb
    key = np.where((row == nb - 1) | (col == nb - 1), -1, np.asarray(key).reshape(-1))  # tail blocks: their own
    cand = np.nonzero(partial)[0]
    lay = _rule_csr(T, b, layout.head_pattern, row, col, first_head[pat], rule, cand, key)
    return dataclasses.replace(lay, perm=layout.perm, params=layout.params)


# -- custom layouts ----------------------------------------------------------------------------


def custom_layout(layout, blocksize: int, callback=None, heads: int | None = None) -> Layout:
    """A user layout, as ``blocksparse.BlocksparseTransformer`` took it.

    Args:
        layout: 0/1 array ``[nb, nb]`` (every head) or ``[heads, nb, nb]``.
        blocksize: tokens per block (``time = nb * blocksize``).
        callback: optional ``cb(blk_shape, head_idx, qry_idx, key_idx, blk_idx) -> bool[blk, blk]``,
            called once per enabled block (``blk_idx`` counts the enabled blocks of that head in
            row-major order) to mask elements inside it.
        heads: number of heads for a 2-D layout (default 1; the layout is shared by all heads).
    """
    blocksize = check_positive_int("blocksize", blocksize)
    lay = np.asarray(layout)
    if lay.ndim not in (2, 3) or lay.shape[-1] != lay.shape[-2]:
        raise ValueError(f"layout must have shape [nb, nb] or [heads, nb, nb], got {lay.shape}")
    if not (np.issubdtype(lay.dtype, np.integer) or lay.dtype == bool):
        raise TypeError(f"layout must hold 0/1 integers or bools, got dtype {lay.dtype}")
    if np.any((lay != 0) & (lay != 1)):
        raise ValueError("layout must hold only 0 and 1")
    if lay.ndim == 3:
        if heads is not None and heads != lay.shape[0]:
            raise ValueError(f"heads ({heads}) does not match layout.shape[0] ({lay.shape[0]})")
        heads = lay.shape[0]
    else:
        heads = 1 if heads is None else check_positive_int("heads", heads)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    lay = lay.astype(bool)
    nb = lay.shape[-1]
    shared = lay.ndim == 2 and callback is None
    pats = lay[None] if lay.ndim == 2 else lay
    if not shared and lay.ndim == 2:
        pats = np.broadcast_to(lay, (heads, nb, nb))
    head_pattern = np.zeros(heads, np.int64) if shared else np.arange(heads, dtype=np.int64)
    P = pats.shape[0]
    pp, rr, cc = np.nonzero(pats)  # row-major per pattern
    counts = np.bincount(pp * nb + rr, minlength=P * nb).reshape(P, nb)
    row_ptr = np.zeros((P, nb + 1), np.int64)
    row_ptr[:, 1:] = np.cumsum(counts, axis=1)
    row_ptr += np.concatenate([[0], np.cumsum(row_ptr[:-1, -1])])[:, None]
    nnz = len(cc)
    mask_idx = np.full(nnz, -1, np.int32)
    masks = []
    if callback is not None:
        shape = (blocksize, blocksize)
        for e in range(nnz):
            h, q, k = int(pp[e]), int(rr[e]), int(cc[e])
            m = np.asarray(callback(shape, h, q, k, e - int(row_ptr[h, 0])))
            if m.shape != shape:
                raise ValueError(f"callback returned shape {m.shape} for block ({h}, {q}, {k}); expected {shape}")
            m = m.astype(bool)
            if not m.all():
                mask_idx[e] = len(masks)
                masks.append(m)
    block_masks = np.stack(masks) if masks else np.zeros((0, blocksize, blocksize), bool)
    return csr_layout(row_ptr, cc, blocksize, head_pattern, mask_idx, block_masks)


def csr_layout(row_ptr, cols, blocksize: int, head_pattern, mask_idx=None, block_masks=None) -> Layout:
    """A custom layout from compressed rows, for code that builds large layouts without an
    ``[nb, nb]`` array (unions of patterns, layouts computed diagonal by diagonal).

    Args:
        row_ptr: ``int [P, nb + 1]``, one row of pointers per distinct pattern, into ``cols``
            (pattern ``p``'s entries follow pattern ``p - 1``'s).
        cols: ``int [nnz]``, the enabled key blocks of each (pattern, query block), ascending.
        blocksize: tokens per block.
        head_pattern: ``int [heads]``, the pattern of each head.
        mask_idx: ``int [nnz]``, the in-block mask of each entry in ``block_masks`` (-1: full).
        block_masks: ``bool [n, blocksize, blocksize]``.
    """
    blocksize = check_positive_int("blocksize", blocksize)
    row_ptr = np.asarray(row_ptr, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    head_pattern = np.asarray(head_pattern, dtype=np.int64)
    if row_ptr.ndim != 2 or row_ptr.shape[1] < 2:
        raise ValueError(f"row_ptr must have shape [patterns, nb + 1], got {row_ptr.shape}")
    P, nb = row_ptr.shape[0], row_ptr.shape[1] - 1
    flat = np.concatenate([row_ptr[:, :-1].reshape(-1), row_ptr[-1:, -1]])
    if flat[0] != 0 or np.any(np.diff(flat) < 0) or np.any(row_ptr[1:, 0] != row_ptr[:-1, -1]):
        raise ValueError("row_ptr must start at 0, never decrease, and each pattern must start where the last ended")
    if cols.shape != (flat[-1],):
        raise ValueError(f"cols must have shape [{flat[-1]}] (row_ptr's last pointer), got {cols.shape}")
    if cols.size and (cols.min() < 0 or cols.max() >= nb):
        raise ValueError(f"cols must lie in [0, {nb}), got values in [{cols.min()}, {cols.max()}]")
    counts = np.diff(flat)
    same_row = np.repeat(np.arange(counts.size), counts)
    if np.any(np.diff(cols)[np.diff(same_row) == 0] <= 0):
        raise ValueError("cols must be strictly ascending within each row")
    if head_pattern.ndim != 1 or head_pattern.size == 0 or head_pattern.min() < 0 or head_pattern.max() >= P:
        raise ValueError(f"head_pattern must be a non-empty list of pattern indices in [0, {P})")
    if block_masks is None:
        block_masks = np.zeros((0, blocksize, blocksize), bool)
    block_masks = np.ascontiguousarray(block_masks, dtype=bool)
    if block_masks.ndim != 3 or block_masks.shape[1:] != (blocksize, blocksize):
        raise ValueError(f"block_masks must have shape [n, {blocksize}, {blocksize}], got {block_masks.shape}")
    mask_idx = np.full(cols.size, -1, np.int32) if mask_idx is None else np.asarray(mask_idx, dtype=np.int32)
    if mask_idx.shape != cols.shape or (mask_idx.size and (mask_idx.min() < -1 or mask_idx.max() >= len(block_masks))):
        raise ValueError(f"mask_idx must have cols' shape and values in [-1, {len(block_masks)})")
    return Layout(
        nb * blocksize,
        head_pattern.size,
        blocksize,
        "custom",
        {},
        head_pattern,
        None,
        csr=(row_ptr, cols.astype(np.int32)),
        mask_idx=mask_idx,
        block_masks=block_masks,
    )


def from_dense(mask, blocksize: int) -> Layout:
    """The smallest layout covering a dense bool mask ``[heads, time, time]`` (max-pool), with
    the in-block masks of the blocks it does not fill. ``layout.to_dense()`` gives it back."""
    m = np.asarray(mask).astype(bool)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"mask must have shape [time, time] or [heads, time, time], got {np.shape(mask)}")
    H, T, _ = m.shape
    if T % blocksize:
        raise ValueError(f"mask time ({T}) must be a multiple of blocksize ({blocksize})")
    nb = T // blocksize
    blocks = m.reshape(H, nb, blocksize, nb, blocksize).transpose(0, 1, 3, 2, 4)
    lay = blocks.any(axis=(3, 4))
    return custom_layout(lay, blocksize, callback=lambda shape, h, q, k, e: blocks[h, q, k])


def deepspeed_layout(kind: str, seq_len: int, num_heads: int, block: int = 16, *, seed=None, **params) -> Layout:
    """The layout of a DeepSpeed sparse-attention config, for users migrating from it.

    Args:
        kind: ``"dense"``, ``"fixed"``, ``"variable"``, ``"bigbird"``, ``"bslongformer"`` or
            ``"local_sliding_window"`` (DeepSpeed's ``DenseSparsityConfig`` ... ``LocalSlidingWindowSparsityConfig``).
        seq_len, num_heads, block: as DeepSpeed's (``seq_len`` a multiple of ``block``).
        seed: seed of the random blocks (``variable``, ``bigbird``); DeepSpeed drew them from
            Python's global ``random``, so ``random.seed(s)`` there equals ``seed=s`` here.
        params: the config's own arguments, named as DeepSpeed names them
            (``num_local_blocks``, ``attention="unidirectional"``, ``different_layout_per_head``, ...).

    The block layout equals DeepSpeed's ``make_layout(seq_len)`` (:mod:`sparse_attention.migrate`).
    With ``attention="unidirectional"`` every block is also causal token by token (DeepSpeed left
    that to a separate mask): a query attends no later key, even in the diagonal blocks or in a
    future block that DeepSpeed's unidirectional ``fixed`` keeps (``num_global_blocks > 1``).
    """
    lay, p = deepspeed_block_layout(kind, seq_len, num_heads, block, seed=seed, **params)
    if p.get("attention") != "unidirectional":
        return custom_layout(lay, block)
    tri = np.tril(np.ones((block, block), bool))
    full, none = np.ones((block, block), bool), np.zeros((block, block), bool)
    return custom_layout(lay, block, callback=lambda shape, h, q, k, e: full if k < q else tri if k == q else none)


def _window_global_rule(window: int, global_tokens, causal: bool):
    """``rule(i, j)``: the Longformer pattern on token indices (numpy broadcasting)."""
    g = np.zeros(0, np.int64) if global_tokens is None else np.unique(np.asarray(global_tokens, np.int64))

    def rule(i, j):
        band = (i - j < window) & (j <= i) if causal else np.abs(i - j) <= window // 2
        glob = np.isin(i, g) | np.isin(j, g)
        return (band | glob) & (j <= i) if causal else band | glob

    return rule, g


def _rule_layout(blocks: np.ndarray, blocksize: int, rule) -> Layout:
    """A custom layout of the enabled ``blocks`` ``bool [heads or 1, nb, nb]`` whose pairs are
    those of ``rule(i, j)`` (evaluated inside the enabled blocks only)."""
    offs = np.arange(blocksize)

    def callback(shape, h, q, k, e):
        return rule((q * blocksize + offs)[:, None], (k * blocksize + offs)[None, :])

    return custom_layout(blocks, blocksize, callback=callback, heads=blocks.shape[0] if blocks.ndim == 3 else None)


def _window_global_blocks(nb: int, blocksize: int, window: int, g: np.ndarray, causal: bool) -> np.ndarray:
    r = np.arange(nb)
    lo_tok, hi_tok = r * blocksize, r * blocksize + blocksize - 1
    if causal:  # keys in (i - window, i]: blocks from (first query - window + 1) to the diagonal
        first = np.maximum(lo_tok - window + 1, 0) // blocksize
        blocks = (r[None, :] >= first[:, None]) & (r[None, :] <= r[:, None])
    else:
        half = window // 2
        first, last = (
            np.maximum(lo_tok - half, 0) // blocksize,
            np.minimum(hi_tok + half, nb * blocksize - 1) // blocksize,
        )
        blocks = (r[None, :] >= first[:, None]) & (r[None, :] <= last[:, None])
    gb = np.unique(g // blocksize)
    blocks[gb, :] = True
    blocks[:, gb] = True
    return np.tril(blocks) if causal else blocks


def longformer_layout(time: int, heads: int, window: int, global_tokens=(), blocksize: int = 64, causal: bool = True):
    """Longformer's pattern (a sliding window plus global tokens) as a :class:`Layout`.

    Query ``i`` attends key ``j`` when ``i - window < j <= i`` (``causal``; else ``|i - j| <=
    window // 2``), or when ``i`` or ``j`` is one of ``global_tokens`` (global tokens attend
    everything and everything attends them; still ``j <= i`` when ``causal``). Exact token by
    token; every head the same.
    """
    time, heads = check_positive_int("time", time), check_positive_int("heads", heads)
    window, blocksize = check_positive_int("window", window), check_positive_int("blocksize", blocksize)
    if time % blocksize:
        raise ValueError(f"time ({time}) must be a multiple of blocksize ({blocksize})")
    rule, g = _window_global_rule(window, global_tokens, causal)
    if g.size and (g.min() < 0 or g.max() >= time):
        raise ValueError(f"global_tokens must lie in [0, {time}), got {g.min()}..{g.max()}")
    lay = _rule_layout(_window_global_blocks(time // blocksize, blocksize, window, g, causal), blocksize, rule)
    return broadcast_layout(lay, heads)


def bigbird_layout(
    time: int,
    heads: int,
    window: int,
    global_tokens=(),
    num_random_blocks: int = 1,
    blocksize: int = 64,
    causal: bool = True,
    seed=None,
):
    """BigBird's pattern: :func:`longformer_layout`'s window and global tokens plus
    ``num_random_blocks`` random key blocks per query block row and head (earlier blocks only when
    ``causal``; drawn from ``numpy.random.default_rng(seed)``; a random diagonal block stays
    causal inside)."""
    base = longformer_layout(time, 1, window, global_tokens, blocksize, causal)
    k = check_positive_int("num_random_blocks", num_random_blocks) if num_random_blocks else 0
    nb = time // blocksize
    rng = np.random.default_rng(seed)
    rule, _ = _window_global_rule(window, global_tokens, causal)
    blocks = np.repeat(base.block_layout(), heads, axis=0)
    rand = np.zeros_like(blocks)
    for h in range(heads):
        for r in range(nb):
            choices = np.arange(r + 1 if causal else nb)
            rand[h, r, rng.choice(choices, size=min(k, choices.size), replace=False)] = True
    offs = np.arange(blocksize)

    def callback(shape, h, q, kb, e):
        i, j = (q * blocksize + offs)[:, None], (kb * blocksize + offs)[None, :]
        ok = rule(i, j)
        if rand[h, q, kb]:
            ok = ok | ((j <= i) if causal else np.ones(shape, bool))
        return ok

    return custom_layout(blocks | rand, blocksize, callback=callback)


def broadcast_layout(layout: Layout, heads: int) -> Layout:
    """``layout`` (one head) for ``heads`` heads sharing its tables."""
    if layout.heads == heads:
        return layout
    if layout.heads != 1:
        raise ValueError(f"only a one-head layout can be broadcast, this one has {layout.heads}")
    return dataclasses.replace(layout, heads=heads, head_pattern=np.repeat(layout.head_pattern[:1], heads))


def stack_heads(parts) -> Layout:
    """One layout of several layouts that cover consecutive heads: ``parts`` is ``[(first_head,
    n_heads, Layout)]``, head ranges from 0 without gaps, one ``time`` and ``blocksize``, natural
    token order. Their patterns sit side by side (a custom layout; the built-in modes' in-block
    masks are written out for their partial blocks)."""
    parts = sorted(parts, key=lambda x: x[0])
    if not parts:
        raise ValueError("stack_heads needs at least one (first_head, n_heads, layout)")
    first = parts[0][2]
    row_ptrs, cols, midx, heads = [], [], [], []
    masks = tables.MaskTable(first.blocksize)
    entries = patterns = expect = 0
    for h0, hn, lay in parts:
        if not isinstance(lay, Layout) or h0 != expect or lay.heads != hn:
            raise ValueError(
                f"stack_heads: parts must be (first_head, n_heads, Layout) over consecutive heads, got {h0}"
            )
        if (lay.time, lay.blocksize) != (first.time, first.blocksize) or lay.perm is not None:
            raise ValueError(
                "stack_heads: every part needs the same time and blocksize, in natural token order "
                f"(got {lay.mode} at time {lay.time}, blocksize {lay.blocksize}, perm {lay.perm is not None})"
            )
        expect += hn
        row_ptrs.append(lay.row_ptr + entries)
        cols.append(lay.cols)
        own = np.full(lay.nnz, -1, np.int32)
        rows = lay.entry_rows().astype(np.int64)
        pattern = np.repeat(np.arange(lay.n_patterns), lay.row_counts().sum(axis=1))
        for p in range(lay.n_patterns):
            sel = np.nonzero((pattern == p) & lay.partial)[0]
            if not sel.size:
                continue
            block = lay.entry_masks(p, rows[sel], lay.cols[sel].astype(np.int64), sel if lay.mode == "custom" else None)
            own[sel] = masks.add(block)
        midx.append(own)
        heads.append(lay.head_pattern + patterns)
        entries += lay.nnz
        patterns += lay.n_patterns
    return csr_layout(
        np.concatenate(row_ptrs),
        np.concatenate(cols),
        first.blocksize,
        np.concatenate(heads),
        np.concatenate(midx),
        masks.stack(),
    )
