"""Layouts of DeepSpeed's sparse-attention configs (``layouts.deepspeed_layout``): the block
layouts by DeepSpeed's placement rules (small cases written out by hand from its definitions),
the random blocks drawn as DeepSpeed draws them, token-causal ``unidirectional``, clear errors,
and attention through such layouts (bidirectional ones included) against the dense reference."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference
from _kernel_env import INTERPRET, launch_fixture  # noqa: F401  (the `launch` fixture)
from _kernel_env import device as _device

import sparse_attention as sa
from sparse_attention.layouts import deepspeed_layout


def _blocks(kind, nb, **kw):
    return deepspeed_layout(kind, nb * 16, 1, 16, **kw).block_layout()[0].astype(int)


def _rows(text):
    return np.array([[int(c) for c in row] for row in text.split()])


CASES = {
    # fixed, 4-block windows, the last block of each window global (read from the top), a short
    # last window of 2 whose global block is clamped to the last block
    "fixed-bi": (
        dict(kind="fixed", nb=10),
        "1111000101 1111000101 1111000101 1111000101 0001111101 0001111101 0001111101 0001111101 0001000111 0001000111",
    ),
    # unidirectional: causal windows; a global block is read from its own row down
    "fixed-uni": (
        dict(kind="fixed", nb=6, num_local_blocks=3, attention="unidirectional"),
        "100000 110000 111000 001100 001110 001111",
    ),
    # horizontal global attention: the global rows read everything
    "fixed-horizontal": (
        dict(kind="fixed", nb=4, num_local_blocks=2, horizontal_global_attention=True),
        "1101 1111 0111 1111",
    ),
    "local_sliding_window-uni": (dict(kind="local_sliding_window", nb=5), "10000 11000 01100 00110 00011"),
    "local_sliding_window-bi": (
        dict(kind="local_sliding_window", nb=5, attention="bidirectional"),
        "11000 11100 01110 00111 00011",
    ),
    "bslongformer-bi": (dict(kind="bslongformer", nb=5), "11111 11100 11110 10111 10011"),
    "bslongformer-uni-range": (
        dict(
            kind="bslongformer",
            nb=5,
            global_block_indices=[3],
            global_block_end_indices=[5],
            attention="unidirectional",
        ),
        "10000 11000 01100 11110 11111",
    ),
    # variable: windows of 2 then 3 (repeated), global block 0 read by every row
    "variable-uni": (
        dict(kind="variable", nb=8, local_window_blocks=[2, 3], attention="unidirectional"),
        "10000000 11000000 10100000 10110000 10111000 10000100 10000110 10000111",
    ),
    "dense": (dict(kind="dense", nb=3), "111 111 111"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_block_layouts_follow_deepspeeds_rules(name):
    kw, want = CASES[name]
    np.testing.assert_array_equal(_blocks(**kw), _rows(want))


def test_heads_share_one_layout_or_rotate_their_global_blocks():
    lay = deepspeed_layout("fixed", 128, 3, 16, num_local_blocks=4, different_layout_per_head=True,
                           num_different_global_patterns=2).block_layout()  # fmt: skip
    # row 4 (second window) reads the first window's global block only
    assert lay[0, 4, 3] and not lay[0, 4, 2]  # head 0: the window's last block
    assert lay[1, 4, 2] and not lay[1, 4, 3]  # head 1: the one before it
    np.testing.assert_array_equal(lay[2], lay[0])  # head 2 = pattern 0 again
    same = deepspeed_layout("fixed", 128, 3, 16).block_layout()
    assert (same == same[0]).all()


@pytest.mark.parametrize("kind", ["variable", "bigbird"])
def test_random_blocks_drawn_as_deepspeed_draws_them(kind):
    """Each row samples ``num_random_blocks`` key blocks, rows in order, from ``random.Random(seed)``:
    DeepSpeed's draws after ``random.seed(seed)``. With the other parts switched off or known, the
    random part is those draws exactly; another seed gives other blocks."""
    nb, k = 12, 2
    rng = random.Random(7)
    want = np.zeros((nb, nb), int)
    for row in range(nb):
        want[row, rng.sample(range(nb), k)] = 1
    if kind == "variable":
        got = _blocks("variable", nb, num_random_blocks=k, local_window_blocks=[1], global_block_indices=[], seed=7)
        np.fill_diagonal(want, 1)  # windows of one block
    else:
        got = _blocks("bigbird", nb, num_random_blocks=k, num_sliding_window_blocks=1, num_global_blocks=1, seed=7)
        np.fill_diagonal(want, 1)
        want[0, :] = want[:, 0] = 1
    np.testing.assert_array_equal(got, want)
    other = _blocks("bigbird", nb, num_random_blocks=k, num_sliding_window_blocks=1, seed=8)
    assert not np.array_equal(other, _blocks("bigbird", nb, num_random_blocks=k, num_sliding_window_blocks=1, seed=7))


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("fixed", dict(num_global_blocks=2)),
        ("variable", dict(num_random_blocks=2)),
        ("bigbird", dict(num_random_blocks=1)),
        ("bslongformer", {}),
        ("local_sliding_window", {}),
    ],
)
def test_unidirectional_is_causal_token_by_token(kind, kw):
    lay = deepspeed_layout(kind, 128, 2, 16, attention="unidirectional", seed=0, **kw)
    dense = lay.to_dense()
    blocks = np.repeat(np.repeat(lay.block_layout(), 16, axis=1), 16, axis=2)
    np.testing.assert_array_equal(dense, blocks & np.tril(np.ones((128, 128), bool)))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        deepspeed_layout("longformer", 64, 1)
    with pytest.raises(TypeError, match="unknown: \\['num_local_block'\\]"):
        deepspeed_layout("fixed", 64, 1, num_local_block=4)
    with pytest.raises(ValueError, match="multiple of block"):
        deepspeed_layout("dense", 60, 1)
    with pytest.raises(ValueError, match="attention must be"):
        deepspeed_layout("fixed", 64, 1, attention="causal")
    with pytest.raises(ValueError, match="num_local_blocks \\(4\\) must be a multiple of num_global_blocks \\(3\\)"):
        deepspeed_layout("fixed", 64, 1, num_global_blocks=3)
    with pytest.raises(ValueError, match="different_layout_per_head"):
        deepspeed_layout("fixed", 64, 2, num_different_global_patterns=2)
    with pytest.raises(ValueError, match="horizontal_global_attention"):
        deepspeed_layout("fixed", 64, 1, attention="unidirectional", horizontal_global_attention=True)
    with pytest.raises(ValueError, match="num_random_blocks"):
        deepspeed_layout("bigbird", 32, 1, num_random_blocks=3)
    with pytest.raises(ValueError, match="first block row has one block"):
        deepspeed_layout("bigbird", 64, 1, num_random_blocks=2, attention="unidirectional")


@pytest.mark.parametrize("kind", ["fixed", "bigbird", "bslongformer", "variable"])
@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_attention_through_deepspeed_layouts(kind, attention):
    """The public call (CPU: the block gather) on these layouts, bidirectional ones (blocks above
    the diagonal) included, against the dense reference, forward and gradients."""
    lay = deepspeed_layout(kind, 128, 2, 16, attention=attention, seed=1)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 128, 8, generator=g, dtype=torch.float64) for _ in range(4))

    def public(a, b, c):
        merged = [x.transpose(1, 2).reshape(2, 128, 16) for x in (a, b, c)]
        return sa.blocksparse_attention_impl(*merged, 2, lay).view(2, 128, 2, 8).transpose(1, 2)

    check_against_reference(public, q, k, v, do, mask=torch.from_numpy(lay.to_dense()))


@pytest.mark.parametrize("kind", ["bigbird", "bslongformer"])
def test_fused_kernels_on_bidirectional_layouts(launch, kind):
    """The fused kernels (interpreter here) on layouts with blocks above the diagonal."""
    from sparse_attention.torch.dispatch import EagerAttention

    lay = deepspeed_layout(kind, 128, 2, 16, seed=2)
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 2, 128, 16, generator=g).to(_device()) for _ in range(4))
    fn = lambda a, b, c: EagerAttention.apply(a, b, c, launch.forward, launch.backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, mask=torch.from_numpy(lay.to_dense()).to(_device()))


def _longformer_pairs(T, window, g, causal):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    band = ((i - j < window) & (j <= i)) if causal else (np.abs(i - j) <= window // 2)
    glob = np.isin(i, g) | np.isin(j, g)
    return ((band | glob) & (j <= i)) if causal else (band | glob)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window, g, b", [(24, [0, 70], 16), (64, [], 32), (5, [127], 16)])
def test_longformer_layout_is_its_closed_form(causal, window, g, b):
    from sparse_attention.layouts import longformer_layout

    lay = longformer_layout(128, 3, window, g, blocksize=b, causal=causal)
    assert lay.heads == 3
    want = _longformer_pairs(128, window, np.array(g, int), causal)
    np.testing.assert_array_equal(lay.to_dense(), np.broadcast_to(want, (3, 128, 128)))
    # no enabled block without an allowed pair
    assert (lay.to_dense().reshape(3, 128 // b, b, 128 // b, b).any(axis=(2, 4)) == lay.block_layout()).all()


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_layout_adds_random_blocks_per_head(causal):
    from sparse_attention.layouts import bigbird_layout

    lay = bigbird_layout(256, 2, 32, [0], num_random_blocks=2, blocksize=16, causal=causal, seed=4)
    dense = lay.to_dense()
    base = _longformer_pairs(256, 32, np.array([0]), causal)
    assert (dense >= base).all()  # the window and global part, plus random blocks
    extra = dense & ~base
    assert extra.any() and not np.array_equal(extra[0], extra[1])  # heads draw their own blocks
    if causal:
        assert not np.triu(dense, 1).any()
    again = bigbird_layout(256, 2, 32, [0], num_random_blocks=2, blocksize=16, causal=causal, seed=4)
    np.testing.assert_array_equal(again.to_dense(), dense)


def test_friendly_layouts_refuse_bad_arguments():
    from sparse_attention.layouts import longformer_layout

    with pytest.raises(ValueError, match="global_tokens"):
        longformer_layout(64, 1, 8, [64], blocksize=16)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        longformer_layout(60, 1, 8, blocksize=16)
    with pytest.raises(ValueError, match="window"):
        longformer_layout(64, 1, 0, blocksize=16)
