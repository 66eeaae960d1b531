"""Sparse Transformer attention (Child et al., 2019) for PyTorch and TensorFlow.

    from sparse_attention import attention_impl, blocksparse_attention_impl

    y = blocksparse_attention_impl(q, k, v, heads=4, attn_mode="fixed", local_attn_ctx=128,
                                   num_verts=4, vertsize=1)

``q, k, v`` are ``[batch, time, heads * head_dim]`` torch or tf tensors; the framework is
picked from their type, and neither is imported before a tensor of it arrives.
"""

from __future__ import annotations

from .frontend import call, resolve_call
from .layouts import MODES, Layout, allowed, csr_layout, custom_layout, dense_mask, from_dense, make_layout
from .recompute import recomputable

__all__ = [
    "MODES",
    "Layout",
    "allowed",
    "attention_impl",
    "blocksparse_attention_impl",
    "csr_layout",
    "custom_layout",
    "dense_mask",
    "from_dense",
    "make_layout",
    "recomputable",
]
__version__ = "0.1.0"


@recomputable("attention_impl")
def attention_impl(
    q,
    k,
    v,
    heads,
    attn_mode,
    local_attn_ctx=None,
    blocksize=32,
    num_verts=None,
    vertsize=None,
    *,
    causal=True,
    cu_seqlens=None,
):
    """Dense reference attention: the full ``time x time`` scores, masked by the pattern.

    Same arguments and result as :func:`blocksparse_attention_impl` (``recompute=False`` keyword
    included); every mode, ``fixed`` and custom layouts too. Memory grows as ``time**2``: use it
    to check the block-sparse path, not for long sequences.
    """
    args = (heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
    backend, spec = resolve_call(q, k, v, *args, sparse=False, causal=causal, cu_seqlens=cu_seqlens)
    return call(backend.dense_attention, backend.reshape_rows, q, k, v, heads, spec)


@recomputable("blocksparse_attention_impl")
def blocksparse_attention_impl(
    q,
    k,
    v,
    heads,
    attn_mode,
    local_attn_ctx=None,
    blocksize=32,
    num_verts=None,
    vertsize=None,
    *,
    causal=True,
    cu_seqlens=None,
):
    """Block-sparse attention: only the enabled blocks of the layout are computed.

    Args:
        q, k, v: ``[batch, time, heads * head_dim]``, one framework, dtype and device; float16,
            bfloat16, float32 or float64 (half inputs are computed in float32 and cast back).
            ``k`` and ``v`` may have ``kv_heads * head_dim`` columns with ``heads % kv_heads ==
            0`` (grouped-query / multi-query attention: query head ``h`` reads key/value head
            ``h // (heads // kv_heads)``).
        heads: number of heads; head ``h`` owns columns ``h*head_dim:(h+1)*head_dim``.
        attn_mode: ``"all"`` (causal), ``"local"``, ``"strided"``, ``"fixed"``, or a
            :class:`Layout` (see :func:`custom_layout`, :func:`from_dense`).
        local_attn_ctx: window (``local``), stride (``strided``) or group length (``fixed``).
        blocksize: layout block size (16, 32, 64, 128); ``time`` need not be a multiple of it.
        num_verts, vertsize: ``fixed`` only, the summary blocks per head (SEMANTICS.md).
        causal: keyword only; ``False`` gives the bidirectional version of a built-in mode
            (``all`` every key; ``local`` ``|i - j| < L``; ``strided`` ``(i - j) mod l == 0``;
            ``fixed`` the own group or a summary block of any group). A Layout says it itself.
        cu_seqlens: keyword only; packed documents in one sequence (``batch`` 1): ints ``[n_docs +
            1]`` (list, numpy array or tensor), ``0 = cu[0] < ... < cu[n] = time``. Each document
            attends only within itself, its pattern restarted at its first token, any lengths.
        recompute: recompute activations in the backward pass instead of storing them.

    Returns:
        ``[batch, time, heads * head_dim]`` in the dtype of ``q``. A query with no allowed key
        (custom layouts only) gets 0.

    ``fixed`` at a toy size (``time=16``, ``blocksize=4``, ``local_attn_ctx=8``, one head,
    ``num_verts=1``, ``vertsize=1``; rows are queries, ``x`` allowed): each query sees its own
    group of 8 up to itself, plus the last block of every earlier group (its summary)::

        x . . . . . . . . . . . . . . .
        x x . . . . . . . . . . . . . .
        x x x x x x x x . . . . . . . .      (row 7)
        . . . . x x x x x . . . . . . .      (row 8)
        . . . . x x x x x x x x x x x x      (row 15)
    """
    args = (heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
    backend, layout = resolve_call(q, k, v, *args, sparse=True, causal=causal, cu_seqlens=cu_seqlens)
    return call(backend.blocksparse_attention, backend.reshape_rows, q, k, v, heads, layout)


def _load_imported_backends() -> None:
    """The backend of a framework the program has already imported, loaded now: ``torch.compile``
    cannot trace a module's first import, so a compiled first call would otherwise fail in
    :func:`~sparse_attention.frontend.backend_for`. A framework not yet imported stays so (its
    backend loads with its first tensor, as before)."""
    import sys

    from .frontend import backend_module_names

    for framework, backend in backend_module_names().items():
        if sys.modules.get(framework) is not None:
            __import__(backend)


_load_imported_backends()
