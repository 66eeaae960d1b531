"""TensorFlow back end: dense reference and block-gather attention on ``[batch, time, dim]`` tf tensors.

Both work in TF1-style graphs (``tf.compat.v1`` placeholders with a static ``time``), eagerly,
under ``tf.function`` and ``tf.function(jit_compile=True)``; gradients come from TensorFlow's
autodiff (``tf.GradientTape`` or ``tf.gradients``).

The block-sparse path never builds a ``time x time`` tensor: for each distinct head pattern and
each chunk of query-block rows it gathers the enabled key/value blocks of every query block
(``tf.gather`` with the layout's padded rows), computes the scores of those blocks only
(``tf.einsum``), masks padding and in-block masks, and takes the softmax over the gathered keys.
The in-block masks are numpy constants, deduplicated into a small table per layout (a ``local``
layout has three distinct masks whatever its length) and cached.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf

from ..frontend import Documents
from ..layouts import Layout
from ..modes import document_mask, pattern_allowed
from ..tables import MaskTable, row_chunks, token_index_padded

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

# Score elements per batch row of one chunk of query-block rows (all heads of a pattern); bounds
# the transient memory of the forward pass for long sequences. 4M float32 elements = 16 MiB.
_CHUNK_ELEMS = 1 << 22


def check_inputs(q, k, v, heads):
    """Dtype and static-shape checks of the tf path; returns ``(time, dim, head_dim)``."""
    for name, x in zip("qkv", (q, k, v)):
        dt = tf.as_dtype(x.dtype).base_dtype
        if dt not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating point tensor (float16, bfloat16, float32 or float64), "
                f"got dtype {dt.name}; cast it first, e.g. tf.cast({name}, tf.float32)"
            )
    dts = [tf.as_dtype(x.dtype).base_dtype for x in (q, k, v)]
    if not dts[0] == dts[1] == dts[2]:
        raise TypeError(
            f"q, k and v must have the same dtype, got q: {dts[0].name}, k: {dts[1].name}, v: {dts[2].name}; "
            "cast them to one dtype with tf.cast"
        )
    shape = q.shape.as_list() if isinstance(q.shape, tf.TensorShape) else list(q.shape)
    time, dim = shape[1], shape[2]
    if time is None:
        raise ValueError(
            "time (q.shape[1]) must be known statically; give the placeholder a fixed time, "
            "e.g. tf.compat.v1.placeholder(tf.float32, [None, 1024, dim])"
        )
    if dim is None:
        raise ValueError("dim (q.shape[2]) must be known statically; give the placeholder a fixed last dimension")
    return int(time), int(dim), int(dim) // heads


def reshape_rows(x, rows: int):
    """``[batch, time, dim]`` as ``rows`` rows of ``batch * time / rows``: packed documents of one
    length as a batch, and back."""
    dim = x.shape[-1]
    return tf.reshape(x, [rows, -1, tf.shape(x)[-1] if dim is None else dim])


def expand_kv(x, time: int, heads: int, hd: int):
    """Grouped-query key/value columns ``[B, T, kv_heads * hd]`` repeated for ``heads`` query
    heads (query head ``h`` reads key/value head ``h // (heads // kv_heads)``); ``x`` itself
    without grouping. The gradient of each key/value head sums over its group."""
    kv_dim = x.shape[-1]
    kv_dim = getattr(kv_dim, "value", kv_dim)
    if kv_dim == heads * hd:
        return x
    hk = kv_dim // hd
    x = tf.repeat(tf.reshape(x, [-1, time, hk, hd]), heads // hk, axis=2)
    return tf.reshape(x, [-1, time, heads * hd])


def _compute_dtype(dtype):
    """Scores, softmax and accumulation dtype: float32 for half inputs, else the input dtype."""
    return tf.float64 if tf.as_dtype(dtype).base_dtype == tf.float64 else tf.float32


def _masked_exp(s, mask, axis):
    """``exp(s - rowmax)`` over the allowed entries and its row sums; empty rows give 0 and 0.

    The row max is a constant of the softmax (stop_gradient): the result does not depend on it.
    Masked entries are ``-inf`` before ``exp``, so they contribute 0 to values and gradients.
    """
    if mask is not None:
        s = tf.where(mask, s, tf.constant(-np.inf, s.dtype))
    m = tf.reduce_max(s, axis=axis, keepdims=True)
    m = tf.stop_gradient(tf.where(tf.math.is_finite(m), m, tf.zeros_like(m)))
    p = tf.exp(s - m)
    return p, tf.reduce_sum(p, axis=axis, keepdims=True)


def _normalise(out, denom):
    """``out / denom``: a non-empty row has ``denom >= 1`` (its max contributes ``exp(0)``), an
    empty row has ``out = 0`` and ``denom = 0``; ``max(denom, 1)`` keeps it at 0 with 0 gradient."""
    return out / tf.maximum(denom, tf.constant(1, denom.dtype))


def _dense_mask(spec, time, heads):
    """Allowed pairs, a bool tensor broadcastable to ``[heads, time, time]``: the closed form
    :func:`~sparse_attention.modes.allowed` on tf index tensors (it never uses ``==``, which
    compares identity on TF1 graph tensors)."""
    if isinstance(spec, Layout):
        return tf.constant(spec.to_dense())
    if "cu_seqlens" in spec:  # packed documents
        return tf.constant(document_mask(spec, heads))
    i = tf.range(time)
    return pattern_allowed(spec, i[None, :, None], i[None, None, :], tf.range(heads)[:, None, None])


def dense_attention(q, k, v, heads, spec):
    """Masked attention over the full ``time x time`` scores (the reference; small sizes)."""
    time, dim, hd = check_inputs(q, k, v, heads)
    k, v = expand_kv(k, time, heads, hd), expand_kv(v, time, heads, hd)
    out_dtype = q.dtype
    cdt = _compute_dtype(out_dtype)
    q, k, v = (tf.reshape(tf.cast(x, cdt), [-1, time, heads, hd]) for x in (q, k, v))
    q = q * tf.constant(1.0 / math.sqrt(hd), cdt)
    s = tf.einsum("bihd,bjhd->bhij", q, k)  # [batch, heads, time, time]
    p, denom = _masked_exp(s, _dense_mask(spec, time, heads), axis=-1)
    out = tf.einsum("bhij,bjhd->bihd", p, v)  # [batch, time, heads, hd]
    out = _normalise(out, tf.transpose(denom, [0, 2, 1, 3]))
    return tf.cast(tf.reshape(out, [-1, time, dim]), out_dtype)


# -- block-sparse path ---------------------------------------------------------------------------


class _Chunk:
    """Query-block rows ``r0:r1`` of one pattern: padded key-block columns and in-block masks."""

    __slots__ = ("r0", "r1", "cols", "mask_rows")

    def __init__(self, r0, r1, cols, mask_idx, b):
        self.r0, self.r1 = r0, r1
        self.cols = cols  # int32 [n, c]
        # Rows of the flattened mask table [n_masks * b, b] giving the chunk's mask [n, b, c, b]
        # (the layout of its scores) in one gather; None when every block is full.
        self.mask_rows = None
        if not np.all(mask_idx == 1):
            i = np.arange(b, dtype=np.int32)[None, :, None]
            self.mask_rows = mask_idx[:, None, :] * b + i  # int32 [n, b, c]


class _Plan:
    """Everything the tf graph needs from a layout, as numpy constants."""

    def __init__(self, heads_of, chunks, masks, perm):
        self.heads_of = heads_of  # per pattern: int32 [heads of the pattern]
        self.chunks = chunks  # per pattern: list of _Chunk
        self.masks = masks  # bool [n_masks, blocksize, blocksize]; 0 = padding, 1 = full block
        self.perm = perm  # int32 [time] block order -> token, or None
        self.inv_perm = None if perm is None else np.argsort(perm).astype(np.int32)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_layout(layout: Layout) -> _Plan:
    """The numpy constants of a layout's gather (chunks, deduplicated in-block masks), cached."""
    plan = _PLANS.get(layout)
    if plan is not None:
        return plan
    b = layout.blocksize
    masks = MaskTable(b, seed=[np.zeros((b, b), bool), np.ones((b, b), bool)])  # 0: no pair, 1: every pair
    counts = layout.row_counts()
    heads_of, chunks = [], []
    for p in range(layout.n_patterns):
        hs = layout.heads_of(p).astype(np.int32)
        if hs.size == 0:
            continue
        heads_of.append(hs)
        pchunks = []
        for r0, r1 in row_chunks(counts[p], b * b * hs.size, _CHUNK_ELEMS):
            cols, valid, entries = layout.padded_rows(p, r0, r1)
            rows = np.broadcast_to(np.arange(r0, r1)[:, None], cols.shape)[valid]
            em = layout.entry_masks(p, rows, cols[valid], None if entries is None else entries[valid])
            idx = np.zeros(cols.shape, np.int32)
            if em.shape[0]:
                idx[valid] = masks.add(em, full=None)
            pchunks.append(_Chunk(r0, r1, cols.astype(np.int32), idx, b))
        chunks.append(pchunks)
    # block-order positions over whole blocks: past time (no token) the identity
    perm = None if layout.perm is None else token_index_padded(layout.time, layout.nb * b, layout.perm).astype(np.int32)
    plan = _Plan(heads_of, chunks, masks.stack(), perm)
    _PLANS[layout] = plan
    return plan


def _attend_chunk(q, k, v, chunk: _Chunk, masks):
    """One chunk of query-block rows; q, k, v ``[B, Hp, nb, b, hd]``. Returns ``[B, Hp, n, b, hd]``.

    Every operand is laid out as ``[batch dims, rows, cols]`` for batched matmuls, so the einsums
    need no transposes of the gathered or score tensors.
    """
    qc = q[:, :, chunk.r0 : chunk.r1]  # [B, Hp, n, b, hd]
    kc = tf.gather(k, chunk.cols, axis=2)  # [B, Hp, n, c, b, hd]
    vc = tf.gather(v, chunk.cols, axis=2)
    s = tf.einsum("bhnid,bhncjd->bhnicj", qc, kc)  # [B, Hp, n, b, c, b]
    mask = None
    if chunk.mask_rows is not None:
        mask = tf.gather(masks, chunk.mask_rows)[None, None]  # [1, 1, n, b, c, b]
    p, denom = _masked_exp(s, mask, axis=[-2, -1])
    out = tf.einsum("bhnicj,bhncjd->bhnid", p, vc)
    return _normalise(out, denom[..., 0])  # denom [B, Hp, n, b, 1, 1] -> [B, Hp, n, b, 1]


def blocksparse_attention(q, k, v, heads, layout: Layout):
    """Attention over the enabled blocks of ``layout`` only (see the module docstring); packed
    documents (:class:`~sparse_attention.frontend.Documents`) run their packed layout."""
    if isinstance(layout, Documents):
        layout = layout.layout()
    time, dim, hd = check_inputs(q, k, v, heads)
    k, v = expand_kv(k, time, heads, hd), expand_kv(v, time, heads, hd)
    out_dtype = q.dtype
    cdt = _compute_dtype(out_dtype)
    plan = plan_layout(layout)
    b, nb = layout.blocksize, layout.nb
    q, k, v = (tf.cast(x, cdt) for x in (q, k, v))
    padded = nb * b
    if padded != time:  # the last block runs past time: its positions there are no tokens
        q, k, v = (tf.pad(x, [[0, 0], [0, padded - time], [0, 0]]) for x in (q, k, v))
    if plan.perm is not None:
        # strided: block order is residue-major, where the pattern is block sparse
        q, k, v = (tf.gather(x, plan.perm, axis=1) for x in (q, k, v))
    q = q * tf.constant(1.0 / math.sqrt(hd), cdt)
    # [B, T, H*hd] -> [B, H, nb, b, hd]
    q, k, v = (tf.transpose(tf.reshape(x, [-1, nb, b, heads, hd]), [0, 3, 1, 2, 4]) for x in (q, k, v))
    masks = tf.constant(plan.masks.reshape(-1, b))  # [n_masks * b, b]: row i of mask m is m * b + i
    outs = []
    single = len(plan.heads_of) == 1
    for hs, chunks in zip(plan.heads_of, plan.chunks):
        if single:
            qp, kp, vp = q, k, v
        else:
            qp, kp, vp = (tf.gather(x, hs, axis=1) for x in (q, k, v))
        pieces = [_attend_chunk(qp, kp, vp, c, masks) for c in chunks]
        outs.append(pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=2))
    if single:
        out = outs[0]
    else:
        order = np.argsort(np.concatenate(plan.heads_of)).astype(np.int32)
        out = tf.gather(tf.concat(outs, axis=1), order, axis=1)
    out = tf.reshape(tf.transpose(out, [0, 2, 3, 1, 4]), [-1, padded, dim])  # [B, nb, b, H, hd] -> [B, T, D]
    if plan.inv_perm is not None:
        out = tf.gather(out, plan.inv_perm, axis=1)
    if padded != time:
        out = out[:, :time]
    return tf.cast(out, out_dtype)
