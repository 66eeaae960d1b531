"""``local`` and ``strided`` merged in one head (the paper's eq. 7) as two block-sparse passes.

In natural token order the union ``local | strided`` is not block-sparse (the strided half is one
diagonal in every block), but each half alone is fast: ``local`` is a band and ``strided`` is a
band in its residue-major order. So this runs the two built-in layouts separately and merges
them exactly:

- **Forward.** Each pass returns its output ``o_p`` and its log-sum-exp ``lse_p``. With
  ``L <= l`` the two key sets share only the diagonal key ``j = i``, so the union's softmax is
  ``o = (o_1 e^lse_1 + o_2 e^lse_2 - v_i e^s_ii) / (e^lse_1 + e^lse_2 - e^s_ii)``.
- **Backward.** Each pass's backward runs with the *merged* ``o`` and ``lse``. It then
  normalises its scores by the union's sum and uses the union's
  ``delta = rowsum(dO * o)``, so it returns exactly the union's gradient restricted to its own
  keys. The two results are added, and one share of the diagonal key, counted by both passes,
  is taken off.

Both passes use the same path, the fused kernels or the block gather, whose log-sum-exp is base
2 or natural respectively, and the merge works in that base. On the fused path the merge itself
is one row-wise Triton kernel each way (``kernels/merge.py``); on the gather path, torch ops.

Packed documents (``cu_seqlens``): each pass runs on each document's own positions
(:func:`~sparse_attention.torch.dispatch.document_pair`); inside a document the two key sets
still share only the diagonal, so the same merge is exact.
"""

from __future__ import annotations

import functools
import math

import torch

from ..layouts import Layout
from .dispatch import AttentionOp, check_documents, choose_engine, document_pair, engine_pair

__all__ = ["check_merged_pair", "merged_attention", "merged_backward", "merged_document_attention", "merged_forward"]

LOG2E = 1.0 / math.log(2.0)


def check_merged_pair(local: Layout, strided: Layout) -> None:
    """The pair must be a ``local`` and a ``strided`` layout of one shape with ``L <= l`` (so
    that the two key sets share only the diagonal)."""
    for name, lay, mode in (("local", local, "local"), ("strided", strided, "strided")):
        if not isinstance(lay, Layout) or lay.mode != mode:
            raise ValueError(f"{name} must be a Layout of mode {mode!r}, got {getattr(lay, 'mode', lay)!r}")
    if (local.time, local.heads, local.blocksize) != (strided.time, strided.heads, strided.blocksize):
        raise ValueError(
            "local and strided layouts must share time, heads and blocksize, got "
            f"{(local.time, local.heads, local.blocksize)} and {(strided.time, strided.heads, strided.blocksize)}"
        )
    L, l = local.params["local_attn_ctx"], strided.params["local_attn_ctx"]
    if L > l:
        raise ValueError(
            f"local_attn_ctx of the local part ({L}) must be <= the stride ({l}): beyond it the parts "
            "share more keys than the diagonal; use Merged(...).layout(...) (one custom layout) instead"
        )


def _diag_scores(q, k, cd, base2: bool):
    s = (q.to(cd) * k.to(cd)).sum(-1) / math.sqrt(q.shape[-1])
    return s * LOG2E if base2 else s


def _passes(index: int, docs: tuple):
    """``(forward, backward, base2)`` of one pass through engine ``index``; with ``docs`` (packed
    documents' boundaries) the documents' pair, which takes them after the layout."""
    fwd, bwd, base2 = engine_pair(index)
    if docs:
        fwd, bwd = document_pair(index)
    return fwd, bwd, base2


def merged_forward(q, k, v, local: Layout, strided: Layout, *docs, engine_index: int | None = None):
    """``(o, lse)`` of the union (``lse`` in the base of the path, as its backward wants it);
    ``docs``: optionally the packed documents' boundaries."""
    index = choose_engine(q, local) if engine_index is None else engine_index
    fwd, _, base2 = _passes(index, docs)
    o1, l1 = fwd(q, k, v, local, *docs)
    o2, l2 = fwd(q, k, v, strided, *docs)
    if base2:  # fused path: one row-wise kernel
        from .kernels.merge import merge_forward

        return merge_forward(q, k, v, o1, l1, o2, l2)
    cd = l1.dtype
    exp = torch.exp2 if base2 else torch.exp
    log = torch.log2 if base2 else torch.log
    m = torch.maximum(l1, l2)  # both contain the diagonal: finite, >= its score
    w1, w2, wd = exp(l1 - m), exp(l2 - m), exp(_diag_scores(q, k, cd, base2) - m)
    z = w1 + w2 - wd  # >= max(w1, w2) > 0
    o = (o1.to(cd) * w1[..., None] + o2.to(cd) * w2[..., None] - v.to(cd) * wd[..., None]) / z[..., None]
    return o.to(q.dtype), (m + log(z)).contiguous()


def merged_backward(do, q, k, v, o, lse, local: Layout, strided: Layout, *docs, engine_index: int | None = None):
    """``(dq, dk, dv)`` of the union, from the merged ``o`` and ``lse``."""
    index = choose_engine(q, local) if engine_index is None else engine_index
    _, bwd, base2 = _passes(index, docs)
    g1 = bwd(do, q, k, v, o, lse, local, *docs)
    g2 = bwd(do, q, k, v, o, lse, strided, *docs)
    if base2:
        from .kernels.merge import merge_backward

        return merge_backward(do, q, k, v, o, lse, g1, g2)
    cd = lse.dtype
    exp = torch.exp2 if base2 else torch.exp
    scale = 1.0 / math.sqrt(q.shape[-1])
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), do.to(cd)
    p = exp(_diag_scores(q, k, cd, base2) - lse)  # the diagonal's probability, counted twice
    ds = p * ((doc * vc).sum(-1) - (doc * o.to(cd)).sum(-1))
    dq = g1[0].to(cd) + g2[0].to(cd) - (ds * scale)[..., None] * kc
    dk = g1[1].to(cd) + g2[1].to(cd) - (ds * scale)[..., None] * qc
    dv = g1[2].to(cd) + g2[2].to(cd) - p[..., None] * doc
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _merged_pair(index: int):
    """Both passes, forward and backward, through engine ``index`` (chosen once per call)."""
    fwd = functools.partial(merged_forward, engine_index=index)
    bwd = functools.partial(merged_backward, engine_index=index)
    return fwd, bwd


_merged_op = AttentionOp("merged", _merged_pair, n_layouts=2)
# packed documents: their boundaries a tensor argument of the ops (a new batch recompiles nothing)
_merged_docs_op = AttentionOp("merged_docs", _merged_pair, n_layouts=2, n_tensors=1)


def merged_attention(q, k, v, local: Layout, strided: Layout) -> torch.Tensor:
    """The union's attention on validated ``[batch, heads, time, head_dim]`` tensors: eagerly one
    autograd Function, under ``torch.compile`` the custom ops ``sparse_attention::merged_fwd/bwd``."""
    return _merged_op(q, k, v, local, strided)


def merged_document_attention(q, k, v, local: Layout, strided: Layout, cu_seqlens) -> torch.Tensor:
    """:func:`merged_attention` on each of the packed documents ``cu_seqlens`` of validated
    ``[1, heads, time, head_dim]`` tensors (custom ops ``sparse_attention::merged_docs_fwd/bwd``
    under ``torch.compile``)."""
    return _merged_docs_op(q, k, v, local, strided, check_documents(q, cu_seqlens))
