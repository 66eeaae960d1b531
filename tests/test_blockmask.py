"""FlexAttention's ``BlockMask`` and our ``Layout``, both ways: equal outputs of FlexAttention
(unfused, CPU) and of our call under the converted pattern, and a round trip to the same pairs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torch.nn.attention.flex_attention")

from sparse_attention.layouts import custom_layout, deepspeed_layout, from_dense, make_layout  # noqa: E402
from sparse_attention.torch import blocksparse_attention_bhtd  # noqa: E402
from sparse_attention.torch.blockmask import from_block_mask, to_block_mask  # noqa: E402

T, H = 128, 2


def _custom():
    lay = np.tril(np.ones((H, T // 16, T // 16), int))
    lay[1, 5] = 0  # a block row with no key

    def cb(shape, h, q, k, e):
        return np.random.RandomState(e + 10 * h).rand(*shape) > 0.4

    return custom_layout(lay, 16, callback=cb)


LAYOUTS = {
    "all": lambda: make_layout(T, H, "all", blocksize=16),
    "local": lambda: make_layout(T, H, "local", local_attn_ctx=48, blocksize=16),
    "strided": lambda: make_layout(T, H, "strided", local_attn_ctx=16, blocksize=16),
    "fixed": lambda: make_layout(T, H, "fixed", local_attn_ctx=32, blocksize=16, num_verts=2, vertsize=1),
    "custom": _custom,
    "bigbird-bidirectional": lambda: deepspeed_layout("bigbird", T, H, 16, seed=3),
}


def _flex(q, k, v, bm):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=bm)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, T, 16, generator=g) for _ in range(3)]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_to_block_mask_gives_flex_our_pattern(name):
    lay = LAYOUTS[name]()
    bm = to_block_mask(lay)
    q, k, v = _inputs()
    torch.testing.assert_close(_flex(q, k, v, bm), blocksparse_attention_bhtd(q, k, v, lay), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(from_block_mask(bm).to_dense(), lay.to_dense())


def test_from_block_mask_of_a_flex_pattern():
    """A sliding window with a document boundary, written as a FlexAttention ``mask_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        same_doc = (q >= 50) == (kv >= 50)
        return (kv <= q) & (q - kv < 24 + 8 * h) & same_doc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = create_block_mask(mask_mod, 1, H, T, T, device="cpu", BLOCK_SIZE=16)
    lay = from_block_mask(bm)
    q, k, v = _inputs(1)
    torch.testing.assert_close(blocksparse_attention_bhtd(q, k, v, lay), _flex(q, k, v, bm), rtol=1e-4, atol=1e-4)
    i, j, h = np.arange(T)[None, :, None], np.arange(T)[None, None, :], np.arange(H)[:, None, None]
    want = (j <= i) & (i - j < 24 + 8 * h) & ((i >= 50) == (j >= 50))
    np.testing.assert_array_equal(lay.to_dense(), want)


def test_from_block_mask_refuses_what_a_layout_cannot_hold():
    from torch.nn.attention.flex_attention import BlockMask

    n = torch.ones(2, 1, 2, dtype=torch.int32)
    idx = torch.zeros(2, 1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="batch 1"):
        from_block_mask(BlockMask.from_kv_blocks(n, idx, BLOCK_SIZE=16, seq_lengths=(32, 32)))
    with pytest.raises(ValueError, match="square blocks"):
        from_block_mask(BlockMask.from_kv_blocks(n[:1], idx[:1], BLOCK_SIZE=(16, 32), seq_lengths=(32, 64)))
    assert from_dense(np.tril(np.ones((32, 32), bool)), 16).heads == 1
