"""The public PyTorch entry points: validation once per call, then :mod:`.dispatch`.

* ``blocksparse_attention(q, k, v, heads, layout)``: ``blocksparse_attention_impl`` for torch
  ``[batch, time, heads * head_dim]`` tensors (shapes already checked by the framework-neutral
  front end, :mod:`sparse_attention.frontend`); heads are split as strided views, no copy.
* :func:`blocksparse_attention_bhtd`: natural-order ``[batch, heads, time, head_dim]``.
* :func:`merged_local_strided_bhtd`: a ``local | strided`` head (the paper's eq. 7).
"""

from __future__ import annotations

import torch

from ..frontend import Documents
from ..layouts import Layout, builtin_pattern
from .dispatch import attention, attention_bhtd, document_attention, document_attention_bhtd
from .merged import check_merged_pair, merged_attention, merged_document_attention
from .reference import check_dtypes

__all__ = ["blocksparse_attention", "blocksparse_attention_bhtd", "merged_local_strided_bhtd"]


def blocksparse_attention(q, k, v, heads: int, layout: Layout | Documents) -> torch.Tensor:
    """``blocksparse_attention_impl`` for torch tensors ``[batch, time, dim]`` (shapes validated);
    ``layout`` may be packed documents (:class:`~sparse_attention.frontend.Documents`)."""
    check_dtypes(q, k, v)
    if isinstance(layout, Documents):
        return document_attention(q, k, v, heads, layout)
    return attention(q, k, v, heads, layout)


def check_bhtd(q, k, v, layout: Layout, *, grouped: bool = True, documents: bool = False) -> None:
    """Tensors, dtypes and devices, ``[batch, heads, time, head_dim]`` shapes and the layout;
    ``k`` and ``v`` may have fewer heads (``[batch, kv_heads, time, head_dim]`` with ``heads %
    kv_heads == 0``: grouped-query attention) where ``grouped``. With packed ``documents`` a
    ``strided`` layout may be at ``time`` rounded up to its stride (which need not divide the
    packed length: the pattern runs on each document)."""
    check_dtypes(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, heads, time, head_dim], got {tuple(x.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    if not grouped and k.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D) or H % k.shape[1]:
        raise ValueError(
            f"k and v must have shape [batch, kv_heads, time, head_dim] = [{B}, kv_heads, {T}, {D}] with "
            f"heads ({H}) % kv_heads == 0 (grouped-query attention), got {tuple(k.shape)}"
        )
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a sparse_attention.Layout, got {type(layout).__name__}")
    _, H, T, _ = q.shape
    want = T
    form = builtin_pattern(layout) if documents else None
    if form is not None and form[0] == "strided":
        want = -(-T // form[1]["local_attn_ctx"]) * form[1]["local_attn_ctx"]
    if layout.heads != H or layout.time != want:
        hint = f" (packed documents under strided: time {want}, a multiple of the stride)" if want != T else ""
        raise ValueError(f"layout is for heads={layout.heads}, time={layout.time}; q has heads={H}, time={T}{hint}")


def blocksparse_attention_bhtd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, cu_seqlens=None
) -> torch.Tensor:
    """Block-sparse attention on natural-order ``[batch, heads, time, head_dim]`` tensors.

    Computes, for each head ``h`` and query ``i``, ``softmax_j(q[i] . k[j] / sqrt(head_dim))`` over the
    keys ``j`` that ``layout`` allows (SEMANTICS.md), then the weighted sum of ``v[j]``; float32
    softmax and accumulation for fp16/bf16; a row with no allowed key outputs 0. Differentiable
    in ``q``, ``k``, ``v``; works under ``torch.compile(fullgraph=True)``.

    Dispatch: CUDA tensors run the fused Triton kernels (fp16 and bf16 with any head_dim up to 256,
    fp32 up to 128; padded to a power of two inside the kernel); ``all`` runs PyTorch's causal SDPA where that is
    faster (fp16/bf16 on CUDA: cuDNN / flash; every dtype on the CPU, 8-10x faster there than the
    block gather); everything else runs the block-gather path in plain PyTorch.

    Args:
        q, k, v: ``[batch, heads, time, head_dim]``, one dtype and device; any strides with a
            contiguous last dimension (e.g. ``x.view(B, T, H, D).transpose(1, 2)``) avoid a copy.
            ``k`` and ``v`` may have ``kv_heads`` heads with ``heads % kv_heads == 0``
            (grouped-query attention: query head ``h`` reads key/value head ``h // (heads //
            kv_heads)``; the fused kernels read each key/value head once per group, no copy).
        layout: a :class:`~sparse_attention.layouts.Layout` with ``layout.time == time`` and
            ``layout.heads == heads``.
        cu_seqlens: keyword only; packed documents in one sequence (``batch`` 1): ints ``[n_docs
            + 1]`` (a list, numpy array or tensor), ``0 = cu[0] < ... < cu[n_docs] = time``.
            ``layout`` must then be a built-in mode's (``make_layout``, causal or not), which
            runs on each document's own positions; for ``strided`` at ``time`` rounded up to a
            multiple of its stride. Under ``torch.compile`` pass a tensor (a CPU
            one avoids a device sync): it is an argument of the ops, so a new batch of documents
            recompiles nothing (its values are then not checked).

    Returns:
        ``[batch, heads, time, head_dim]`` in the dtype of ``q``.

    Example::

        >>> from sparse_attention.layouts import make_layout
        >>> lay = make_layout(1024, 4, "local", local_attn_ctx=128, blocksize=32)
        >>> q = k = v = torch.randn(2, 4, 1024, 64)
        >>> blocksparse_attention_bhtd(q, k, v, lay).shape
        torch.Size([2, 4, 1024, 64])

    The pattern of ``local`` (``L = 3`` tokens, ``x`` = allowed)::

        x . . . .
        x x . . .
        x x x . .
        . x x x .
        . . x x x
    """
    check_bhtd(q, k, v, layout, documents=cu_seqlens is not None)
    if cu_seqlens is not None:
        return document_attention_bhtd(q, k, v, layout, cu_seqlens)
    return attention_bhtd(q, k, v, layout)


def merged_local_strided_bhtd(q, k, v, local: Layout, strided: Layout, *, cu_seqlens=None) -> torch.Tensor:
    """Attention of ``[batch, heads, time, head_dim]`` tensors over the union of a ``local``
    layout (``L``) and a ``strided`` layout (``l >= L``): the paper's merged head (eq. 7), as two
    fast block-sparse passes merged exactly (module docstring). Differentiable; works under
    ``torch.compile(fullgraph=True)`` (custom ops ``sparse_attention::merged_fwd/bwd``).
    ``cu_seqlens``: packed documents (``batch`` 1), each under the union on its own positions,
    as in :func:`blocksparse_attention_bhtd`.

    Example::

        >>> from sparse_attention.layouts import make_layout
        >>> loc = make_layout(1024, 4, "local", local_attn_ctx=128)
        >>> st = make_layout(1024, 4, "strided", local_attn_ctx=128)
        >>> q = k = v = torch.randn(1, 4, 1024, 64)
        >>> merged_local_strided_bhtd(q, k, v, loc, st).shape
        torch.Size([1, 4, 1024, 64])
    """
    check_merged_pair(local, strided)
    check_bhtd(q, k, v, local, grouped=False)
    if cu_seqlens is not None:
        return merged_document_attention(q, k, v, local, strided, cu_seqlens)
    return merged_attention(q, k, v, local, strided)
