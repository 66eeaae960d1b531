"""The context-parallel plan (:mod:`sparse_attention.sharding`): over the ranks its rounds hold
every allowed pair exactly once, the causal work is balanced, and the fused kernels run its
sub-layouts (rectangular rounds padded square, empty rows, keys after the queries) as the block
gather does, in the interpreter on CPU and compiled on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _kernel_env import device as _device
from _kernel_env import launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)

from sparse_attention.layouts import custom_layout, make_layout
from sparse_attention.sharding import shard_plan
from sparse_attention.torch import gather


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    "mode,kw",
    [
        ("local", dict(local_attn_ctx=256)),
        ("strided", dict(local_attn_ctx=32)),
        ("fixed", dict(local_attn_ctx=256, num_verts=2, vertsize=1)),
        ("all", {}),
    ],
)
def test_plan_covers_every_pair_once(world, mode, kw):
    """Over the ranks, the own and remote rounds hold each allowed pair exactly once."""
    lay = make_layout(48 * 64, 4, mode, blocksize=64, **kw)
    if lay.nb % (world * (2 if mode in ("all", "fixed") and world > 1 else 1)):
        with pytest.raises(ValueError, match="equal shards"):
            shard_plan(lay, world)
        return
    plan = shard_plan(lay, world)
    dense = lay.to_dense()  # natural order [H, T, T]
    seen = np.zeros_like(dense, dtype=np.int64)
    b = lay.blocksize
    for r in range(world):
        part = plan.rank(r)
        pos = plan.positions(r)
        own = part.own.to_dense()  # over the shard's tokens, in its order
        seen[:, pos[:, None], pos[None, :]] += own
        if part.remote is not None:
            rem = part.remote.to_dense()
            rows = (part.rows[:, None] * b + np.arange(b)).reshape(-1)
            keys = np.concatenate(
                [
                    plan.positions(s).reshape(-1, b)[plan.local_index[part.recv[s]]].reshape(-1)
                    for s in sorted(part.recv)
                ]
            )
            seen[:, pos[rows][:, None], keys[None, :]] += rem[:, : rows.size, : keys.size]
    np.testing.assert_array_equal(seen, dense.astype(np.int64))
    work = plan.work()
    assert work.sum() == lay.blocks_per_head().sum()
    if world > 1 and mode in ("all", "fixed"):
        assert work.max() / work.mean() < 1.1, f"zigzag should balance the causal work: {work}"


def _custom(T, b, heads):
    rng = np.random.default_rng(5)
    nb = T // b
    lay = np.tril(rng.random((heads, nb, nb)) < 0.2)
    masks = rng.random((heads, nb, nb, b, b)) < 0.6
    return custom_layout(lay.astype(int), b, callback=lambda shape, h, qb, kb, e: masks[h, qb, kb])


def _pad(x, idx, n):
    """Rows ``idx`` of ``x [1, H, T, D]`` then zeros, ``n`` rows (a round's padded square)."""
    y = x.new_zeros(*x.shape[:2], n, x.shape[3])
    y[:, :, : idx.numel()] = x[:, :, idx]
    return y


KERNEL_CASES = {
    "local": lambda T, b, H: make_layout(T, H, "local", local_attn_ctx=3 * b, blocksize=b),
    "strided": lambda T, b, H: make_layout(T, H, "strided", local_attn_ctx=2, blocksize=b),
    "fixed": lambda T, b, H: make_layout(T, H, "fixed", local_attn_ctx=4 * b, blocksize=b, num_verts=2, vertsize=1),
    "all": lambda T, b, H: make_layout(T, H, "all", blocksize=b),
    "custom": _custom,
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_run_the_rounds(launch, case, world):
    """Each rank's own and remote rounds through the fused kernels equal the block gather's, forward
    (output; log-sum-exp up to its base) and backward, on the tensors the rank would hold."""
    T, b, H, D = 512, 16, 2, 16
    lay = KERNEL_CASES[case](T, b, H)
    plan = shard_plan(lay, world)
    dev = _device()
    gen = torch.Generator().manual_seed(world)
    q, k, v, do = (torch.randn(1, H, T, D, generator=gen).to(dev) for _ in range(4))
    for r in range(world):
        part, pos = plan.rank(r), torch.from_numpy(plan.positions(r)).to(dev)
        rounds = [(part.own, pos, pos)]
        if part.remote is not None:
            rows = pos.view(-1, b)[torch.from_numpy(part.rows).to(dev)].reshape(-1)
            keys = torch.cat(
                [
                    torch.from_numpy(plan.positions(s)).to(dev).view(-1, b)[plan.local_index[part.recv[s]]].reshape(-1)
                    for s in sorted(part.recv)
                ]
            )
            rounds.append((part.remote, rows, keys))
        for sub, qi, ki in rounds:
            qx, dox, kx, vx = (_pad(x, idx, sub.time) for x, idx in ((q, qi), (do, qi), (k, ki), (v, ki)))
            o, lse = launch.forward(qx, kx, vx, sub)
            go, glse = gather.gather_forward(qx.double(), kx.double(), vx.double(), sub)
            m = qi.numel()
            torch.testing.assert_close(o[:, :, :m].double(), go[:, :, :m], atol=2e-5, rtol=1e-4)
            finite = torch.isfinite(glse[:, :, :m])
            torch.testing.assert_close(
                (lse[:, :, :m].double() * np.log(2))[finite], glse[:, :, :m][finite], atol=1e-4, rtol=1e-5
            )
            grads = launch.backward(dox, qx, kx, vx, o, lse, sub)
            want = gather.gather_backward(dox.double(), qx.double(), kx.double(), vx.double(), go, glse, sub)
            for name, g, w, cut in zip(("dq", "dk", "dv"), grads, want, (m, ki.numel(), ki.numel())):
                torch.testing.assert_close(g[:, :, :cut].double(), w[:, :, :cut], atol=5e-5, rtol=1e-4, msg=name)


def test_natural_order_shards_of_strided():
    """Shards cut in natural order (a model's) are whole blocks of strided's residue order where
    ``time / (chunks * l)`` is a multiple of the blocksize, and a clear error elsewhere."""
    lay = make_layout(1024, 2, "strided", local_attn_ctx=4, blocksize=32)
    plan = shard_plan(lay, 4, "zigzag", True)
    for r in range(4):  # rank r holds natural chunks r and 7 - r, in the layout's order
        want = np.concatenate([np.arange(r * 128, (r + 1) * 128), np.arange((7 - r) * 128, (8 - r) * 128)])
        np.testing.assert_array_equal(np.sort(plan.positions(r)), want)
    with pytest.raises(ValueError, match="whole blocks"):
        shard_plan(make_layout(1024, 2, "strided", local_attn_ctx=8, blocksize=32), 4, "zigzag", True)


def test_a_time_past_whole_blocks_is_refused():
    from sparse_attention.layouts import make_layout
    from sparse_attention.sharding import shard_plan

    with pytest.raises(ValueError, match="multiple of blocksize"):
        shard_plan(make_layout(100, 2, "local", local_attn_ctx=32, blocksize=16), 2)
