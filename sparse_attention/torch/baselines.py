"""The peers under the library's pattern specs: PyTorch SDPA and FlexAttention.

Used by the layers' ``impl="sdpa" | "flex"`` (to train the same model on a peer) and by the
benchmarks. FlexAttention's ``mask_mod`` is the spec's closed form itself
(:meth:`sparse_attention.patterns.Spec.allowed`), so the peers compute exactly our pattern.
Tensors are ``[batch, heads, time, head_dim]``.
"""

from __future__ import annotations

import torch

from ..patterns import Mode, Spec
from .reference import expand_kv, masked_attention


def sdpa_attention(q, k, v, spec: Spec, blocksize: int) -> torch.Tensor:
    """``F.scaled_dot_product_attention``: causal for ``Mode("all")``, else under the spec's dense mask."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(spec, Mode) and spec.mode == "all":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    pos = torch.arange(q.shape[2], device=q.device)
    H = q.shape[1]
    return masked_attention(q, expand_kv(k, H), expand_kv(v, H), spec.mask(pos, pos, H, blocksize))


def flex_mask_mod(spec: Spec, heads: int, blocksize: int):
    """The spec as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""

    def mask_mod(b, h, i, j):
        return spec.allowed(i, j, h, heads, blocksize)

    return mask_mod


def flex_block_mask(spec: Spec, heads: int, time: int, blocksize: int, device, block_size: int = 128, compile=None):
    """FlexAttention ``BlockMask`` of a spec (``block_size``-blocks, its default 128).

    Uncompiled, ``create_block_mask`` materialises the ``[heads, time, time]`` mask: it is
    compiled from 16,384 tokens on unless ``compile`` says otherwise."""
    from torch.nn.attention.flex_attention import create_block_mask

    compile = time > 16384 if compile is None else compile
    return create_block_mask(
        flex_mask_mod(spec, heads, blocksize),
        None,
        heads,
        time,
        time,
        device=device,
        BLOCK_SIZE=block_size,
        _compile=compile,
    )


def flex_attention(q, k, v, spec: Spec, blocksize: int, block_mask=None) -> torch.Tensor:
    """FlexAttention under the spec (``block_mask`` from :func:`flex_block_mask` when given)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if block_mask is None:
        block_mask = flex_block_mask(spec, q.shape[1], q.shape[2], blocksize, q.device)
    return flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
