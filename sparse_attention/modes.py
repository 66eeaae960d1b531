"""The attention modes of SEMANTICS.md in code: the one definition of each pattern (numpy only).

* :func:`allowed` is the pattern itself, token by token, in closed form; it broadcasts over
  numpy arrays, torch tensors and tf tensors (eager and TF1 graphs), so every reference mask,
  TensorFlow's mask and FlexAttention's ``mask_mod`` are this function.
* :func:`block_rows` and :func:`partial_blocks` are its block-level form: which key blocks each
  query block needs and which of them need an in-block mask. They exist for speed (a layout of
  a million tokens in milliseconds); ``tests/test_layouts.py`` checks them against
  :func:`allowed`, and ``tests/test_kernel_bounds.py`` checks the kernels' tile bounds.
"""

from __future__ import annotations

import numpy as np

MODES = ("all", "local", "strided", "fixed")


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_positive_int(name: str, value, *, mode: str | None = None) -> int:
    where = f" for attn_mode={mode!r}" if mode else ""
    if value is None:
        raise ValueError(f"{name} is required{where}; pass a positive integer")
    if not is_int(value):
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
    causal: bool = True,
    documents: bool = False,
) -> dict:
    """Check the pattern parameters against SEMANTICS.md; return them normalised (with
    ``causal: False`` for a bidirectional pattern, see :func:`allowed`).

    ``blocksize=None`` checks only what the dense reference needs (``fixed`` still needs a
    blocksize, its summary columns are defined in blocks). Raises ``ValueError``/``TypeError``
    naming the argument, the value and what would be accepted.
    """
    if not isinstance(attn_mode, str):
        raise TypeError(f"attn_mode must be one of {MODES} or a Layout, got {type(attn_mode).__name__}")
    if attn_mode not in MODES:
        raise ValueError(f"unknown attn_mode {attn_mode!r}; expected one of {MODES} or a Layout")
    time = check_positive_int("time", time)
    heads = check_positive_int("heads", heads)
    if blocksize is not None:
        blocksize = check_positive_int("blocksize", blocksize)
        if blocksize < 16 or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two >= 16 (16, 32, 64, 128, ...), got {blocksize}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {type(causal).__name__} {causal!r}")
    p = {"time": time, "heads": heads, "attn_mode": attn_mode, "blocksize": blocksize}
    if not causal:
        p["causal"] = False
    if attn_mode == "local":
        L = check_positive_int("local_attn_ctx", local_attn_ctx, mode=attn_mode)
        if blocksize is not None and L % blocksize:
            raise ValueError(
                f"local_attn_ctx ({L}) must be a multiple of blocksize ({blocksize}) for attn_mode='local'"
            )
        p["local_attn_ctx"] = L
    elif attn_mode == "strided":
        l = check_positive_int("local_attn_ctx", local_attn_ctx, mode=attn_mode)  # noqa: E741
        if time % l and not documents:  # packed documents: each is a sequence of its own length
            raise ValueError(
                f"local_attn_ctx ({l}) must divide time ({time}) for attn_mode='strided' "
                "(it is the stride of the pattern)"
            )
        p["local_attn_ctx"] = l
    elif attn_mode == "fixed":
        if blocksize is None:
            raise ValueError("blocksize is required for attn_mode='fixed' (summary columns are blocks)")
        l = check_positive_int("local_attn_ctx", local_attn_ctx, mode=attn_mode)  # noqa: E741
        nv = check_positive_int("num_verts", num_verts, mode=attn_mode)
        vs = check_positive_int("vertsize", vertsize, mode=attn_mode)
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


def allowed(
    i, j, h, attn_mode: str, local_attn_ctx=None, blocksize=None, num_verts=None, vertsize=None, causal: bool = True
):
    """Closed form of SEMANTICS.md: may query token ``i`` of head ``h`` attend to key token ``j``?

    ``causal=False`` gives the bidirectional version of each mode: ``all`` every ``j``; ``local``
    ``|i - j| < L``; ``strided`` ``(i - j) mod l == 0``; ``fixed`` the own group of ``l`` tokens or
    a summary block of the head in any group, before or after.

    Works elementwise with broadcasting on numpy arrays, torch and tf tensors: only ``<=``, ``<``,
    ``//``, ``%``, ``&`` and ``|`` are used (never ``==``, which compares identity on TF1 graph
    tensors).
    """
    if not causal:
        return _bidirectional(i, j, h, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
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


def _bidirectional(i, j, h, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize):
    both = (j <= i) | (i <= j)  # all True, broadcast to the shape of i and j
    if attn_mode == "all":
        return both
    if attn_mode == "local":
        return (i - j < local_attn_ctx) & (j - i < local_attn_ctx)
    if attn_mode == "strided":
        return both & ((i - j) % local_attn_ctx < 1)
    if attn_mode == "fixed":
        lo, hi = fixed_vert_range(h, local_attn_ctx // blocksize, num_verts, vertsize)
        col = (j // blocksize) % (local_attn_ctx // blocksize)
        gi, gj = i // local_attn_ctx, j // local_attn_ctx
        return ((gi <= gj) & (gj <= gi)) | ((lo <= col) & (col <= hi))
    raise ValueError(f"unknown attn_mode {attn_mode!r}; expected one of {MODES}")


def fixed_vert_range(h, s: int, num_verts: int, vertsize: int):
    """The summary blocks of head ``h`` in a group of ``s`` blocks: the range ``[lo, hi]``."""
    hi = s - 1 - (h % num_verts) * vertsize
    return hi - vertsize + 1, hi


def pattern_allowed(p: dict, i, j, h):
    """:func:`allowed` under a pattern of :func:`validate_pattern` (``p``), on index arrays or
    tensors of any framework; a mode that ignores ``h`` keeps a leading dimension of 1."""
    return allowed(
        i,
        j,
        h,
        p["attn_mode"],
        p.get("local_attn_ctx"),
        p.get("blocksize"),
        p.get("num_verts"),
        p.get("vertsize"),
        p.get("causal", True),
    )


def document_mask(p: dict, heads: int) -> np.ndarray:
    """The allowed pairs of packed documents, ``bool [heads, time, time]`` (numpy; small sizes):
    ``p`` from :func:`validate_pattern` with ``p["cu_seqlens"]`` the documents' boundaries; pairs
    inside one document under the pattern at document positions ``i - cu[d]``."""
    cu = np.asarray(p["cu_seqlens"], np.int64)
    i = np.arange(int(cu[-1]))
    doc = np.searchsorted(cu, i, side="right") - 1
    pos = i - cu[doc]
    same = doc[:, None] == doc[None, :]
    ok = same & pattern_allowed(p, pos[None, :, None], pos[None, None, :], np.arange(heads)[:, None, None])
    return np.broadcast_to(ok, (heads, len(i), len(i))).copy()


def dense_mask(
    time, heads, attn_mode, local_attn_ctx=None, blocksize=32, num_verts=None, vertsize=None, causal: bool = True
):
    """The allowed pairs as a dense bool array ``[heads, time, time]`` (closed form; small sizes)."""
    p = validate_pattern(
        time, heads, attn_mode, local_attn_ctx, None if attn_mode != "fixed" else blocksize, num_verts, vertsize, causal
    )
    i = np.arange(time)[None, :, None]
    m = pattern_allowed({**p, "blocksize": blocksize}, i, i.transpose(0, 2, 1), np.arange(heads)[:, None, None])
    return np.broadcast_to(m, (heads, time, time)).copy()


def partial_blocks(mode: str, params: dict, time: int, blocksize: int, rows, cols) -> np.ndarray:
    """Which enabled blocks ``(rows, cols)`` (block order) of a built-in mode need an in-block mask."""
    if mode in ("all", "fixed"):
        # every enabled off-diagonal block lies wholly below the diagonal and inside the pattern
        return rows == cols
    if mode == "local":
        d = rows - cols
        return (d == 0) | (d == params["local_attn_ctx"] // blocksize)
    # strided, in residue-major order: full only strictly below the diagonal with both blocks
    # inside one and the same segment of time / l positions
    b, n = blocksize, time // params["local_attn_ctx"]
    seg_lo_r, seg_hi_r = (rows * b) // n, (rows * b + b - 1) // n
    seg_lo_c, seg_hi_c = (cols * b) // n, (cols * b + b - 1) // n
    full = (cols < rows) & (seg_lo_r == seg_hi_r) & (seg_lo_c == seg_hi_c) & (seg_lo_c == seg_lo_r)
    return ~full


def block_rows(p: dict) -> dict:
    """The block rows of a validated pattern ``p`` (:func:`validate_pattern`), in the structured
    form of :class:`~sparse_attention.layouts.Layout`: row ``r`` of head pattern ``P`` is
    ``prefix_cols[P, :prefix_len[P, r]] ++ range(row_lo[P, r], row_hi[P, r] + 1)``.

    Returns the keyword arguments of ``Layout`` for the structured form: ``head_pattern``,
    ``perm``, ``row_lo``, ``row_hi``, ``prefix_cols``, ``prefix_len``. ``O(nb)`` memory.
    """
    time, heads, mode, b = p["time"], p["heads"], p["attn_mode"], p["blocksize"]
    nb = -(-time // b)  # the last block may end past time (its positions >= time are no tokens)
    r = np.arange(nb, dtype=np.int32)
    perm = None
    head_pattern = np.zeros(heads, np.int64)
    prefix_cols = np.zeros((1, 0), np.int32)
    prefix_len = np.zeros((1, nb), np.int32)
    if mode == "all":
        lo = np.zeros(nb, np.int32)
    elif mode == "local":
        lo = np.maximum(r - p["local_attn_ctx"] // b, 0)
    elif mode == "strided":
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
    return dict(
        head_pattern=head_pattern,
        perm=perm,
        row_lo=np.ascontiguousarray(np.broadcast_to(lo, (P, nb)), dtype=np.int32),
        row_hi=np.ascontiguousarray(np.broadcast_to(r, (P, nb)), dtype=np.int32),
        prefix_cols=prefix_cols.astype(np.int32),
        prefix_len=np.ascontiguousarray(prefix_len, dtype=np.int32),
    )
