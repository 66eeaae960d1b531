"""PyTorch's block-mask format (FlexAttention's ``BlockMask``) to and from a :class:`Layout`.

* :func:`to_block_mask`: a layout's enabled blocks as a ``BlockMask`` of block size
  ``layout.blocksize`` (``kv_num_blocks`` / ``kv_indices`` of the partial blocks, the
  ``full_kv_*`` lists of the full ones) with a ``mask_mod`` for the partial blocks: the
  closed form of a built-in mode (:func:`sparse_attention.modes.allowed`), or a lookup in a custom
  layout's in-block masks. Made from the block tables, not by evaluating the mask on every
  pair, except for ``strided`` (block sparse only in its permuted order: its natural-order blocks
  come from the dense mask, ``O(time^2)``).
* :func:`from_block_mask`: the layout of a ``BlockMask`` (batch 1, square blocks), its
  ``mask_mod`` as the in-block rule of the partial blocks (evaluated on the ``[heads, time,
  time]`` grid: for moderate sizes).

So a pattern moves between this library, FlexAttention and the kernels that share its format.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layouts import Layout, from_dense
from ..modes import allowed

__all__ = ["from_block_mask", "to_block_mask"]


def _natural_blocks(layout: Layout):
    """``(full, partial)`` bool ``[heads, nb, nb]`` in natural token order."""
    H, nb, b = layout.heads, layout.nb, layout.blocksize
    if layout.perm is None:
        full = np.zeros((layout.n_patterns, nb, nb), bool)
        part = np.zeros_like(full)
        pat = np.repeat(np.arange(layout.n_patterns), layout.row_counts().sum(axis=1))
        rows, cols, partial = layout.entry_rows(), layout.cols, layout.partial
        part[pat[partial], rows[partial], cols[partial]] = True
        full[pat[~partial], rows[~partial], cols[~partial]] = True
        return full[layout.head_pattern], part[layout.head_pattern]
    d = layout.to_dense().reshape(H, nb, b, nb, b)
    some, every = d.any(axis=(2, 4)), d.all(axis=(2, 4))
    return every, some & ~every


def _lists(blocks: np.ndarray, device):
    """``(num_blocks int32 [1, H, nb], indices int32 [1, H, nb, nb])`` of a bool ``[H, nb, nb]``."""
    num = blocks.sum(axis=-1).astype(np.int32)
    # enabled columns first (ascending), then the rest: FlexAttention reads the first num of each row
    order = np.argsort(~blocks, axis=-1, kind="stable").astype(np.int32)
    return torch.from_numpy(num[None]).to(device), torch.from_numpy(order[None]).to(device)


def _mask_mod(layout: Layout, device):
    p = layout.params
    if layout.mode != "custom":
        mode, b = layout.mode, layout.blocksize
        ctx, nv, vs = p.get("local_attn_ctx"), p.get("num_verts"), p.get("vertsize")

        def mask_mod(batch, h, q_idx, kv_idx):
            return allowed(q_idx, kv_idx, h, mode, ctx, b, nv, vs)

        return mask_mod
    # custom: entry index of every (pattern, query block, key block), -1 where not enabled
    b, nb = layout.blocksize, layout.nb
    table = np.full((layout.n_patterns, nb, nb), -1, np.int64)
    pat = np.repeat(np.arange(layout.n_patterns), layout.row_counts().sum(axis=1))
    table[pat, layout.entry_rows(), layout.cols] = np.arange(layout.cols.size)
    mask_of = np.where(table >= 0, layout.mask_idx[np.maximum(table, 0)], -1)  # -1: full (or off)
    masks = layout.block_masks if len(layout.block_masks) else np.ones((1, b, b), bool)
    mask_of_t = torch.from_numpy(mask_of).to(device)
    masks_t = torch.from_numpy(np.ascontiguousarray(masks)).to(device)
    enabled_t = torch.from_numpy(table >= 0).to(device)
    head_pattern = torch.from_numpy(layout.head_pattern).to(device)

    def mask_mod(batch, h, q_idx, kv_idx):
        pp, qb, kb = head_pattern[h], q_idx // b, kv_idx // b
        m = mask_of_t[pp, qb, kb]
        inside = masks_t[m.clamp(min=0), q_idx % b, kv_idx % b]
        return enabled_t[pp, qb, kb] & ((m < 0) | inside)

    return mask_mod


def to_block_mask(layout: Layout, device="cpu"):
    """FlexAttention ``BlockMask`` of ``layout`` (batch 1, its heads, block size ``layout.blocksize``)."""
    from torch.nn.attention.flex_attention import BlockMask

    full, partial = _natural_blocks(layout)
    kv_num, kv_idx = _lists(partial, device)
    full_num, full_idx = _lists(full, device)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=layout.blocksize,
        mask_mod=_mask_mod(layout, device),
        seq_lengths=(layout.time, layout.time),
    )


def from_block_mask(block_mask) -> Layout:
    """The :class:`Layout` of a FlexAttention ``BlockMask`` (batch 1; square blocks; its
    ``mask_mod`` decides inside the partial blocks, everything is allowed inside the full ones)."""
    bq, bk = block_mask.BLOCK_SIZE
    if bq != bk:
        raise ValueError(f"block_mask must have square blocks, got BLOCK_SIZE {block_mask.BLOCK_SIZE}")
    if block_mask.kv_num_blocks.shape[0] != 1:
        raise ValueError(f"block_mask must have batch 1, got {block_mask.kv_num_blocks.shape[0]}")
    tq, tk = block_mask.seq_lengths
    if tq != tk or tq % bq:
        raise ValueError(f"block_mask must cover time x time with time a multiple of {bq}, got {tq} x {tk}")
    H, nb = block_mask.kv_num_blocks.shape[1], tq // bq

    def blocks(num, idx):
        out = np.zeros((H, nb, nb), bool)
        if num is None:
            return out
        num, idx = num[0].cpu().numpy(), idx[0].cpu().numpy()
        h, r, k = np.nonzero(np.arange(idx.shape[-1])[None, None, :] < num[..., None])
        out[h, r, idx[h, r, k]] = True
        return out

    full = blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    partial = blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    dense = np.repeat(np.repeat(full | partial, bq, axis=1), bq, axis=2)
    if block_mask.mask_mod is not None and partial.any():
        from torch.nn.attention.flex_attention import create_mask

        inside = create_mask(block_mask.mask_mod, 1, H, tq, tq, device="cpu")[0].numpy()
        in_partial = np.repeat(np.repeat(partial, bq, axis=1), bq, axis=2)
        dense &= ~in_partial | inside
    return from_dense(dense, bq)
