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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

MODES = ("all", "local", "strided", "fixed")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_pos_int(name: str, value, *, mode: str | None = None) -> int:
    where = f" for attn_mode={mode!r}" if mode else ""
    if value is None:
        raise ValueError(f"{name} is required{where}; pass a positive integer")
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{where}, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer{where}, got {value}")
    return int(value)


def validate_pattern(
    time: int,
    heads: int,
    attn_mode: str,
    local_attn_ctx=None,
    blocksize: int | None = 32,
    num_verts=None,
    vertsize=None,
) -> dict:
    """Check the pattern parameters against SEMANTICS.md; return them normalised.

    ``blocksize=None`` checks only what the dense reference needs (``fixed`` still needs a
    blocksize, its summary columns are defined in blocks). Raises ``ValueError``/``TypeError``
    naming the argument, the value and what would be accepted.
    """
    if not isinstance(attn_mode, str):
        raise TypeError(f"attn_mode must be one of {MODES} or a Layout, got {type(attn_mode).__name__}")
    if attn_mode not in MODES:
        raise ValueError(f"unknown attn_mode {attn_mode!r}; expected one of {MODES} or a Layout")
    time = _check_pos_int("time", time)
    heads = _check_pos_int("heads", heads)
    if blocksize is not None:
        blocksize = _check_pos_int("blocksize", blocksize)
        if blocksize < 16 or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two >= 16 (16, 32, 64, 128, ...), got {blocksize}")
        if time % blocksize:
            raise ValueError(
                f"time ({time}) must be a multiple of blocksize ({blocksize}); "
                f"pad the sequence to {math.ceil(time / blocksize) * blocksize} or pick another blocksize"
            )
    p = {"time": time, "heads": heads, "attn_mode": attn_mode, "blocksize": blocksize}
    if attn_mode == "local":
        L = _check_pos_int("local_attn_ctx", local_attn_ctx, mode=attn_mode)
        if blocksize is not None and L % blocksize:
            raise ValueError(
                f"local_attn_ctx ({L}) must be a multiple of blocksize ({blocksize}) for attn_mode='local'"
            )
        p["local_attn_ctx"] = L
    elif attn_mode == "strided":
        l = _check_pos_int("local_attn_ctx", local_attn_ctx, mode=attn_mode)  # noqa: E741
        if time % l:
            raise ValueError(
                f"local_attn_ctx ({l}) must divide time ({time}) for attn_mode='strided' "
                "(it is the stride of the pattern)"
            )
        p["local_attn_ctx"] = l
    elif attn_mode == "fixed":
        if blocksize is None:
            raise ValueError("blocksize is required for attn_mode='fixed' (summary columns are blocks)")
        l = _check_pos_int("local_attn_ctx", local_attn_ctx, mode=attn_mode)  # noqa: E741
        nv = _check_pos_int("num_verts", num_verts, mode=attn_mode)
        vs = _check_pos_int("vertsize", vertsize, mode=attn_mode)
        if l % blocksize:
            raise ValueError(
                f"local_attn_ctx ({l}) must be a multiple of blocksize ({blocksize}) for attn_mode='fixed'"
            )
        s = l // blocksize
        if heads % nv:
            raise ValueError(f"heads ({heads}) must be a multiple of num_verts ({nv}) for attn_mode='fixed'")
        if vs > s or s % vs:
            raise ValueError(f"vertsize ({vs}) must divide local_attn_ctx / blocksize ({s}) for attn_mode='fixed'")
        if nv * vs > s:
            raise ValueError(
                f"num_verts * vertsize ({nv} * {vs}) must be <= local_attn_ctx / blocksize ({s}) for attn_mode='fixed'"
            )
        p.update(local_attn_ctx=l, num_verts=nv, vertsize=vs)
    return p


def allowed(i, j, h, attn_mode: str, local_attn_ctx=None, blocksize=None, num_verts=None, vertsize=None):
    """Closed form of SEMANTICS.md: may query token ``i`` of head ``h`` attend to key token ``j``?

    Works elementwise with broadcasting on numpy arrays, torch and tf tensors: only ``<=``, ``<``,
    ``//``, ``%``, ``&`` and ``|`` are used (never ``==``, which compares identity on TF1 graph
    tensors).
    """
    causal = j <= i
    if attn_mode == "all":
        return causal
    if attn_mode == "local":
        return causal & (i - j < local_attn_ctx)
    if attn_mode == "strided":
        return causal & ((i - j) % local_attn_ctx < 1)
    if attn_mode == "fixed":
        lo, hi = fixed_vert_range(h, local_attn_ctx // blocksize, num_verts, vertsize)
        col = (j // blocksize) % (local_attn_ctx // blocksize)
        # with j <= i, "same group" (i div l == j div l) is i div l <= j div l
        same_group = i // local_attn_ctx <= j // local_attn_ctx
        return causal & (same_group | ((lo <= col) & (col <= hi)))
    raise ValueError(f"unknown attn_mode {attn_mode!r}; expected one of {MODES}")


def fixed_vert_range(h, s: int, num_verts: int, vertsize: int):
    """The summary blocks of head ``h`` in a group of ``s`` blocks: the range ``[lo, hi]``."""
    hi = s - 1 - (h % num_verts) * vertsize
    return hi - vertsize + 1, hi


def dense_mask(time, heads, attn_mode, local_attn_ctx=None, blocksize=32, num_verts=None, vertsize=None):
    """The allowed pairs as a dense bool array ``[heads, time, time]`` (closed form; small sizes)."""
    p = validate_pattern(
        time, heads, attn_mode, local_attn_ctx, None if attn_mode != "fixed" else blocksize, num_verts, vertsize
    )
    i = np.arange(time)[None, :, None]
    j = np.arange(time)[None, None, :]
    h = np.arange(heads)[:, None, None]
    m = allowed(i, j, h, attn_mode, p.get("local_attn_ctx"), blocksize, p.get("num_verts"), p.get("vertsize"))
    return np.broadcast_to(m, (heads, time, time)).copy()


@dataclass(eq=False)
class Layout:
    """A block-sparse attention pattern; see the module docstring for the tables.

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
    _row_ptr: np.ndarray | None = None
    _cols: np.ndarray | None = None
    _partial: np.ndarray | None = None
    mask_idx: np.ndarray | None = None  # int32 [nnz], custom only
    block_masks: np.ndarray | None = None  # bool [n_masks, blocksize, blocksize], custom only

    def __post_init__(self):
        self._cache = {}

    @property
    def structured(self) -> bool:
        return self.row_lo is not None

    @property
    def row_ptr(self) -> np.ndarray:
        """``int64 [P, nb + 1]``: the entries of (pattern p, row r) are ``row_ptr[p, r]:row_ptr[p, r+1]``."""
        if self._row_ptr is None:
            counts = self.row_counts()
            flat = np.zeros(counts.size + 1, np.int64)
            np.cumsum(counts.reshape(-1), out=flat[1:])
            nb = self.nb
            self._row_ptr = np.concatenate([flat[:-1].reshape(-1, nb), flat[nb::nb][:, None]], axis=1)
        return self._row_ptr

    def row_counts(self) -> np.ndarray:
        """Enabled blocks per (pattern, query-block row), ``int64 [P, nb]``."""
        if self._row_ptr is not None:
            return np.diff(self._row_ptr, axis=1)
        return self.prefix_len.astype(np.int64) + np.maximum(self.row_hi.astype(np.int64) - self.row_lo + 1, 0)

    @property
    def cols(self) -> np.ndarray:
        """``int32 [nnz]``: key block of every entry, ascending within a row."""
        if self._cols is None:
            counts = self.row_counts().reshape(-1)
            row_ptr = self.row_ptr.reshape(-1)
            starts = np.delete(row_ptr, np.arange(1, self.n_patterns) * (self.nb + 1))[:-1]
            k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
            plen = np.repeat(self.prefix_len.reshape(-1).astype(np.int64), counts)
            in_prefix = k < plen
            rng = np.repeat(self.row_lo.reshape(-1).astype(np.int64), counts) + (k - plen)
            if self.prefix_cols.shape[1]:
                pat = np.repeat(np.repeat(np.arange(self.n_patterns), self.nb), counts)
                pre = self.prefix_cols[pat, np.minimum(k, self.prefix_cols.shape[1] - 1)]
                cols = np.where(in_prefix, pre, rng)
            else:
                cols = rng
            self._cols = cols.astype(np.int32)
        return self._cols

    @property
    def partial(self) -> np.ndarray:
        """``bool [nnz]``: whether each entry needs an in-block mask."""
        if self._partial is None:
            self._partial = _partial_blocks(self, self.entry_rows().astype(np.int64), self.cols.astype(np.int64))
        return self._partial

    # -- sizes ---------------------------------------------------------------------------
    @property
    def nb(self) -> int:
        return self.time // self.blocksize

    @property
    def n_patterns(self) -> int:
        return (self.row_lo if self.structured else self._row_ptr).shape[0]

    @property
    def nnz(self) -> int:
        """Enabled blocks over all distinct patterns."""
        return int(self.row_counts().sum())

    def blocks_per_head(self) -> np.ndarray:
        """Enabled blocks of each head, ``int64 [heads]``."""
        return self.row_counts().sum(axis=1)[self.head_pattern]

    def density(self) -> float:
        """Fraction of the ``heads * nb * nb`` blocks that are enabled."""
        return float(self.blocks_per_head().sum()) / (self.heads * self.nb * self.nb)

    def heads_of(self, pattern: int) -> np.ndarray:
        return np.nonzero(self.head_pattern == pattern)[0]

    def entry_rows(self) -> np.ndarray:
        """Query block of every entry, ``int32 [nnz]`` (cached)."""
        if "rows" not in self._cache:
            counts = self.row_counts().reshape(-1)
            rows = np.tile(np.arange(self.nb, dtype=np.int32), self.n_patterns)
            self._cache["rows"] = np.repeat(rows, counts)
        return self._cache["rows"]

    # -- tables for the backward pass ------------------------------------------------------
    def col_table(self):
        """Transposed tables: ``(col_ptr int64 [P, nb+1], rows int32 [nnz], entry int64 [nnz])``.

        Entries of (pattern p, key block c) are ``col_ptr[p, c]:col_ptr[p, c+1]``; ``rows`` gives
        their query blocks (ascending), ``entry`` their index in the row table (for ``partial``
        and ``mask_idx``). Built once and cached.
        """
        if "col" not in self._cache:
            P, nb = self.n_patterns, self.nb
            pat = np.repeat(np.arange(P, dtype=np.int64), self.row_counts().sum(axis=1))
            key = pat * nb + self.cols
            # Entries are sorted by (pattern, row); a stable sort on (pattern, col) keeps rows ascending.
            order = np.argsort(key, kind="stable")
            counts = np.bincount(key, minlength=P * nb)
            col_ptr = np.zeros(P * nb + 1, np.int64)
            np.cumsum(counts, out=col_ptr[1:])
            col_ptr = np.concatenate([col_ptr[:-1].reshape(P, nb), col_ptr[nb::nb][:, None]], axis=1)
            self._cache["col"] = (col_ptr, self.entry_rows()[order], order)
        return self._cache["col"]

    def col_ranges(self):
        """Transposed structured form (built-in modes): the query-block rows of key block ``c`` are
        ``range(lo1, hi1 + 1)`` (the rows whose contiguous range holds ``c``) plus
        ``range(lo2, nb)`` (the rows whose prefix holds ``c``; ``lo2 = nb`` when none).

        Returns ``(lo1, hi1, lo2)``, each ``int32 [P, nb]``. Needs non-decreasing ``row_lo``,
        ``row_hi`` and ``prefix_len`` along the rows, which every built-in mode has.
        """
        if not self.structured:
            raise ValueError("col_ranges() needs a built-in layout; use col_table() for custom layouts")
        if "col_ranges" not in self._cache:
            P, nb = self.n_patterns, self.nb
            c = np.arange(nb)
            lo1 = np.empty((P, nb), np.int32)
            hi1 = np.empty((P, nb), np.int32)
            lo2 = np.full((P, nb), nb, np.int32)
            for p in range(P):
                lo1[p] = np.searchsorted(self.row_hi[p], c, side="left")
                hi1[p] = np.searchsorted(self.row_lo[p], c, side="right") - 1
                pre = self.prefix_cols[p]
                if pre.size:
                    # prefix slot k (holding column pre[k]) is used by the rows with prefix_len > k
                    first = np.searchsorted(self.prefix_len[p], np.arange(pre.size), side="right")
                    lo2[p, pre] = np.minimum(lo2[p, pre], first)
            self._cache["col_ranges"] = (lo1, hi1, lo2)
        return self._cache["col_ranges"]

    # -- in-block masks --------------------------------------------------------------------
    def token_index(self, positions):
        """Token index of block-order positions (identity unless the layout permutes)."""
        return positions if self.perm is None else self.perm[positions]

    def entry_masks(self, pattern: int, rows, cols, entries=None) -> np.ndarray:
        """In-block masks ``bool [n, blocksize, blocksize]`` of the enabled blocks ``(rows, cols)``
        of a pattern (``entries``: their CSR indices, needed for custom layouts only)."""
        b = self.blocksize
        if self.mode == "custom":
            idx = self.mask_idx[np.asarray(entries, dtype=np.int64)]
            out = np.ones((len(idx), b, b), bool)
            has = idx >= 0
            out[has] = self.block_masks[idx[has]]
            return out
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        off = np.arange(b)
        i = self.token_index(rows[:, None] * b + off)[:, :, None]
        j = self.token_index(cols[:, None] * b + off)[:, None, :]
        h = int(self.heads_of(pattern)[0])
        return allowed(i, j, h, self.mode, **self._rule_params())

    def padded_rows(self, pattern: int, r0: int, r1: int):
        """The enabled key blocks of query-block rows ``r0:r1`` of a pattern, padded to the
        longest row: ``(cols int64 [n, maxc], valid bool [n, maxc], entries int64 [n, maxc] or None)``.

        Padding slots hold column 0 and ``valid=False``; ``entries`` (CSR indices) only for custom
        layouts. Works from the structured form without building the CSR tables.
        """
        if self.structured:
            plen = self.prefix_len[pattern, r0:r1].astype(np.int64)[:, None]
            lo = self.row_lo[pattern, r0:r1].astype(np.int64)[:, None]
            hi = self.row_hi[pattern, r0:r1].astype(np.int64)[:, None]
            counts = plen + np.maximum(hi - lo + 1, 0)
            k = np.arange(max(int(counts.max(initial=0)), 1))[None, :]
            cols = lo + k - plen
            npre = self.prefix_cols.shape[1]
            if npre:
                pre = self.prefix_cols[pattern, np.minimum(k, npre - 1)].astype(np.int64)
                cols = np.where(k < plen, pre, cols)
            valid = k < counts
            return np.where(valid, cols, 0), valid, None
        start = self.row_ptr[pattern, r0:r1][:, None]
        counts = self.row_ptr[pattern, r0 + 1 : r1 + 1][:, None] - start
        k = np.arange(max(int(counts.max(initial=0)), 1))[None, :]
        valid = k < counts
        entries = np.where(valid, start + k, 0)
        cols = np.where(valid, self.cols[entries] if self.nnz else 0, 0).astype(np.int64)
        return cols, valid, np.where(valid, entries, -1)

    def _rule_params(self) -> dict:
        p = self.params
        return {
            "local_attn_ctx": p.get("local_attn_ctx"),
            "blocksize": self.blocksize,
            "num_verts": p.get("num_verts"),
            "vertsize": p.get("vertsize"),
        }

    # -- dense views (small sizes: tests, plots) ---------------------------------------------
    def block_layout(self) -> np.ndarray:
        """The block layout ``bool [heads, nb, nb]`` in block order."""
        nb = self.nb
        out = np.zeros((self.n_patterns, nb, nb), bool)
        pat = np.repeat(np.arange(self.n_patterns), self.row_counts().sum(axis=1))
        out[pat, self.entry_rows(), self.cols] = True
        return out[self.head_pattern]

    def to_dense(self) -> np.ndarray:
        """The allowed pairs ``bool [heads, time, time]`` in natural token order."""
        T, b, nb = self.time, self.blocksize, self.nb
        dense = np.zeros((self.n_patterns, nb, b, nb, b), bool)
        for p in range(self.n_patterns):
            cols, valid, entries = self.padded_rows(p, 0, nb)
            rows = np.broadcast_to(np.arange(nb)[:, None], cols.shape)[valid]
            e = None if entries is None else entries[valid]
            dense[p, rows, :, cols[valid], :] = self.entry_masks(p, rows, cols[valid], e)
        dense = dense.reshape(self.n_patterns, T, T)
        if self.perm is not None:
            nat = np.zeros_like(dense)
            nat[:, self.perm[:, None], self.perm[None, :]] = dense
            dense = nat
        return dense[self.head_pattern]

    def plot(self, path=None, heads=None, ax=None, tokens: bool | None = None):
        """Draw the layout (needs matplotlib, the ``viz`` extra); write a PNG when ``path`` is given.

        ``tokens=True`` draws the token-level mask in natural order (small ``time``), otherwise
        the block layout in block order; the default picks tokens for ``time <= 512``.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Layout.plot needs matplotlib: pip install 'sparse-attention[viz]'") from e
        heads = list(range(min(self.heads, 4))) if heads is None else list(heads)
        tokens = self.time <= 512 if tokens is None else tokens
        img = self.to_dense() if tokens else self.block_layout()
        fig = None
        if ax is None:
            fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.4), squeeze=False)
            axes = axes[0]
        else:
            axes = [ax] * len(heads)
        for a, h in zip(axes, heads):
            a.imshow(img[h], cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
            a.set_title(f"{self.mode} head {h}", fontsize=9)
            a.set_xlabel("key" + ("" if tokens else " block"), fontsize=8)
            a.set_ylabel("query" + ("" if tokens else " block"), fontsize=8)
            a.tick_params(labelsize=7)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
                plt.close(fig)
        return fig

    def __repr__(self):
        return (
            f"Layout(mode={self.mode!r}, time={self.time}, heads={self.heads}, blocksize={self.blocksize}, "
            f"patterns={self.n_patterns}, nnz={self.nnz}, density={self.density():.4f})"
        )


# -- built-in modes ----------------------------------------------------------------------------


def _partial_blocks(lay: Layout, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Which enabled blocks ``(rows, cols)`` of a built-in layout need an in-block mask."""
    if lay.mode == "custom":
        return lay.mask_idx >= 0
    if lay.mode in ("all", "fixed"):
        # every enabled off-diagonal block lies wholly below the diagonal and inside the pattern
        return rows == cols
    if lay.mode == "local":
        d = rows - cols
        return (d == 0) | (d == lay.params["local_attn_ctx"] // lay.blocksize)
    # strided, in residue-major order: full only strictly below the diagonal with both blocks
    # inside one and the same segment of time / l positions
    b, n = lay.blocksize, lay.time // lay.params["local_attn_ctx"]
    seg_lo_r, seg_hi_r = (rows * b) // n, (rows * b + b - 1) // n
    seg_lo_c, seg_hi_c = (cols * b) // n, (cols * b + b - 1) // n
    full = (cols < rows) & (seg_lo_r == seg_hi_r) & (seg_lo_c == seg_hi_c) & (seg_lo_c == seg_lo_r)
    return ~full


@functools.lru_cache(maxsize=64)
def make_layout(time, heads, attn_mode, local_attn_ctx=None, blocksize=32, num_verts=None, vertsize=None) -> Layout:
    """The layout of a built-in mode (cached by its parameters); see SEMANTICS.md.

    Builds only the structured form (``O(nb)`` memory, milliseconds even at ``time = 2**20``);
    the CSR tables follow on first use.

    >>> make_layout(1024, 4, "fixed", local_attn_ctx=128, blocksize=32, num_verts=4, vertsize=1)
    Layout(mode='fixed', time=1024, heads=4, blocksize=32, patterns=4, nnz=304, density=0.2969)
    """
    p = validate_pattern(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
    b = p["blocksize"]
    nb = time // b
    r = np.arange(nb, dtype=np.int32)
    perm = None
    head_pattern = np.zeros(heads, np.int64)
    prefix_cols = np.zeros((1, 0), np.int32)
    prefix_len = np.zeros((1, nb), np.int32)
    if attn_mode == "all":
        lo = np.zeros(nb, np.int32)
    elif attn_mode == "local":
        lo = np.maximum(r - p["local_attn_ctx"] // b, 0)
    elif attn_mode == "strided":
        # Residue-major order: position q = (i % l) * (time / l) + i // l. The pattern becomes
        # causal attention inside segments of n = time / l positions; a block may straddle two
        # segments (it is then partial), so (time / l) % blocksize == 0 is not needed.
        l, n = p["local_attn_ctx"], time // p["local_attn_ctx"]  # noqa: E741
        pos = np.arange(time, dtype=np.int64)
        perm = (pos % n) * l + pos // n
        lo = (((r.astype(np.int64) * b) // n) * n // b).astype(np.int32)
    else:  # fixed: the summary blocks of the earlier groups, then the own group up to the diagonal
        s, nv, vs = p["local_attn_ctx"] // b, p["num_verts"], p["vertsize"]
        lo = (r // s) * s
        groups = np.arange(max(nb // s, 1), dtype=np.int32)
        prefix_cols = np.stack(
            [
                (groups[:, None] * s + fixed_vert_range(hp, s, nv, vs)[0] + np.arange(vs, dtype=np.int32)).reshape(-1)
                for hp in range(nv)
            ]
        )
        prefix_len = np.broadcast_to((r // s) * vs, (nv, nb))
        head_pattern = np.arange(heads, dtype=np.int64) % nv
    P = prefix_len.shape[0]
    params = {k: v for k, v in p.items() if k in ("local_attn_ctx", "num_verts", "vertsize")}
    return Layout(
        time,
        heads,
        b,
        attn_mode,
        params,
        head_pattern,
        perm,
        row_lo=np.ascontiguousarray(np.broadcast_to(lo, (P, nb)), dtype=np.int32),
        row_hi=np.ascontiguousarray(np.broadcast_to(r, (P, nb)), dtype=np.int32),
        prefix_cols=prefix_cols.astype(np.int32),
        prefix_len=np.ascontiguousarray(prefix_len, dtype=np.int32),
    )


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
    blocksize = _check_pos_int("blocksize", blocksize)
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
        heads = 1 if heads is None else _check_pos_int("heads", heads)
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
    blocksize = _check_pos_int("blocksize", blocksize)
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
        _row_ptr=row_ptr,
        _cols=cols.astype(np.int32),
        _partial=mask_idx >= 0,
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
