"""``blocksparse_attention_bhtd``: block-sparse attention on ``[batch, heads, time, head_dim]``.

The public lower-level entry point (the ``[batch, time, dim]`` front end calls it too). It runs the
fused Triton kernels (:mod:`sparse_attention.torch.kernels`) for CUDA tensors they support and the
plain-PyTorch block-gather path (:func:`sparse_attention.torch.blocksparse.gather_attention`)
everywhere else, behind one ``torch.library`` custom op pair (``sparse_attention::attn_fwd`` and
``sparse_attention::attn_bwd``) so that ``torch.compile`` traces it without graph breaks.

Layouts are Python objects, not op arguments: the ops take ``layout_spec(layout)``, a list of
ints (a built-in mode's parameters, rebuilt by the cached ``make_layout``; or the key of a custom
layout in a module-level registry).
"""

from __future__ import annotations

import math
import os

import torch

from ..layouts import Layout

__all__ = ["blocksparse_attention_bhtd", "fused_unsupported_reasons", "layout_spec", "register_layout"]

_REGISTRY: list[Layout] = []
_MODES = ("all", "local", "strided", "fixed", "custom")
_KEY_ATTR = "sparse_attention_op_key"


def register_layout(layout: Layout, device=None) -> int:
    """Register a custom layout for the custom ops (done by the first eager call; call it yourself
    before ``torch.compile`` if the first call of a custom layout is inside a compiled region).

    With a CUDA ``device``, also put the layout's tables for the fused kernels on it now: needed
    before ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) if the first call of the layout
    is inside the compiled region. Built-in modes have no tables and need neither."""
    if device is not None and torch.device(device).type == "cuda":
        from .kernels.launch import _device_tables

        _device_tables(layout, torch.empty(0, device=device))
    k = layout._cache.get(_KEY_ATTR)
    if k is None:
        k = len(_REGISTRY)
        _REGISTRY.append(layout)
        layout._cache[_KEY_ATTR] = k
    return k


def layout_spec(layout: Layout) -> list[int]:
    """The op argument naming a layout: the parameters of a built-in mode (the op rebuilds it
    with the cached ``make_layout``), or ``[4, key]`` of a registered custom layout. Built from
    constants only, so ``torch.compile`` folds it into the graph."""
    if layout.mode == "custom":
        k = layout._cache.get(_KEY_ATTR)
        if k is None:
            raise RuntimeError(
                "a custom layout must be registered before torch.compile traces it: call "
                "sparse_attention.torch.ops.register_layout(layout) once (an eager call does it too)"
            )
        return [4, k]
    p = layout.params
    return [
        _MODES.index(layout.mode),
        layout.time,
        layout.heads,
        layout.blocksize,
        p.get("local_attn_ctx", 0),
        p.get("num_verts", 0),
        p.get("vertsize", 0),
    ]


def _layout_of(spec: list[int]) -> Layout:
    if spec[0] == 4:
        return _REGISTRY[spec[1]]
    from ..layouts import make_layout

    mode, T, H, b, ctx, nv, vs = spec
    kw = {}
    if ctx:
        kw["local_attn_ctx"] = ctx
    if nv:
        kw.update(num_verts=nv, vertsize=vs)
    return make_layout(T, H, _MODES[mode], blocksize=b, **kw)


def fused_unsupported_reasons(q: torch.Tensor, layout: Layout) -> list[str]:
    """Why the fused kernels would not run ``q`` with ``layout`` (empty: they would)."""
    if os.environ.get("SPARSE_ATTENTION_DISABLE_FUSED", "0") == "1":
        return ["SPARSE_ATTENTION_DISABLE_FUSED=1"]
    # CPU tensors take the block-gather path even under TRITON_INTERPRET=1 (the interpreter is
    # for the kernel tests, which call the launchers directly)
    if not q.is_cuda:
        return [f"tensors are on {q.device}; the fused kernels need CUDA"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["triton is not installed"]
    from .kernels.launch import unsupported_reasons

    return unsupported_reasons(q, layout)


def _use_fused(q: torch.Tensor, layout: Layout) -> bool:
    return not fused_unsupported_reasons(q, layout)


@torch.library.custom_op("sparse_attention::attn_fwd", mutates_args=())
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout_of(key)
    if _use_fused(q, layout):
        from .kernels.launch import forward

        return forward(q, k, v, layout)
    from .blocksparse import gather_forward

    o, lse = gather_forward(q, k, v, layout)
    return o.contiguous(), lse.contiguous()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # the fused kernels keep float32; the fallback keeps float64 for float64 inputs
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(q, k, v, *keys):
    # what every forward op returns: (o, lse), contiguous
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype)),
    )


@torch.library.custom_op("sparse_attention::attn_bwd", mutates_args=())
def _attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    key: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _layout_of(key)
    if _use_fused(q, layout):
        from .kernels.launch import backward

        return backward(do, q, k, v, o, lse, layout)
    from .blocksparse import gather_backward

    return tuple(x.contiguous() for x in gather_backward(do, q, k, v, o, lse, layout))


def _fake_bwd(do, q, k, v, o, lse, *keys):
    # the real paths return contiguous gradients, whatever the strides of q, k, v
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def register_attention_autograd(fwd_op, bwd_op) -> None:
    """Fake tensors and autograd for a pair of custom ops ``fwd_op(q, k, v, *keys) -> (o, lse)``
    and ``bwd_op(do, q, k, v, o, lse, *keys) -> (dq, dk, dv)`` (``keys``: layout specs)."""
    fwd_op.register_fake(_fake_fwd)
    bwd_op.register_fake(_fake_bwd)

    def setup_context(ctx, inputs, output):
        q, k, v, *keys = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.keys = keys

    def backward(ctx, do, dlse):
        return (*bwd_op(do.contiguous(), *ctx.saved_tensors, *ctx.keys), *(None,) * len(ctx.keys))

    fwd_op.register_autograd(backward, setup_context=setup_context)


register_attention_autograd(_attn_fwd, _attn_bwd)


class _FusedAttention(torch.autograd.Function):
    """Eager fast path of the fused kernels: the same launches as the custom ops, without the
    custom-op dispatch (a few hundred microseconds per forward+backward, which short sparse
    patterns notice). ``torch.compile`` goes through the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, layout):
        from .kernels.launch import forward

        o, lse = forward(q, k, v, layout)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout = layout
        return o

    @staticmethod
    def backward(ctx, do):
        from .kernels.launch import backward

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = backward(do.contiguous(), q, k, v, o, lse, ctx.layout)
        return dq, dk, dv, None


def _check(q, k, v, layout):
    from .blocksparse import _check_layout
    from .reference import check_tensors

    check_tensors(q, k, v)  # tensors, floating dtypes, one dtype, one device
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, heads, time, head_dim], got {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_layout(q, layout)


def blocksparse_attention_bhtd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Block-sparse attention on natural-order ``[batch, heads, time, head_dim]`` tensors.

    Computes, for each head ``h`` and query ``i``, ``softmax_j(q[i] . k[j] / sqrt(head_dim))`` over the
    keys ``j`` that ``layout`` allows (SEMANTICS.md), then the weighted sum of ``v[j]``; float32
    softmax and accumulation for fp16/bf16; a row with no allowed key outputs 0. Differentiable
    in ``q``, ``k``, ``v``; works under ``torch.compile(fullgraph=True)``.

    Dispatch: CUDA tensors run the fused Triton kernels (fp16, bf16, fp32; any head_dim up to 256,
    padded to a power of two inside the kernel); ``all`` runs PyTorch's causal SDPA where that is
    faster (fp16/bf16 on CUDA: cuDNN / flash; every dtype on the CPU, 8-10x faster there than the
    block gather); everything else runs the block-gather path in plain PyTorch.

    Args:
        q, k, v: ``[batch, heads, time, head_dim]``, same shape, dtype and device; any strides with
            a contiguous last dimension (e.g. ``x.view(B, T, H, D).transpose(1, 2)``) avoid a copy.
        layout: a :class:`~sparse_attention.layouts.Layout` with ``layout.time == time`` and
            ``layout.heads == heads``.

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
    _check(q, k, v, layout)
    if layout.mode == "all" and os.environ.get("SPARSE_ATTENTION_ALL_FUSED", "0") != "1":
        # Causal SDPA where it is the faster dense kernel: half inputs on CUDA (cuDNN / flash,
        # fp32 softmax inside), and every dtype on the CPU, where it runs 8-10x faster than the
        # block gather; there the inputs are upcast first, since the CPU kernels keep half
        # precision in parts of the backward pass (the contract: fp32 softmax and accumulation).
        scale = 1.0 / math.sqrt(q.shape[-1])
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if not q.is_cuda:
            cd = torch.float64 if q.dtype == torch.float64 else torch.float32
            o = torch.nn.functional.scaled_dot_product_attention(
                q.to(cd), k.to(cd), v.to(cd), is_causal=True, scale=scale
            )
            return o.to(q.dtype)
    if not torch.compiler.is_compiling():
        if layout.mode == "custom":
            register_layout(layout)
        if _use_fused(q, layout):
            return _FusedAttention.apply(q, k, v, layout)
        from .blocksparse import gather_attention

        return gather_attention(q, k, v, layout)
    o, _ = _attn_fwd(q, k, v, layout_spec(layout))
    return o
