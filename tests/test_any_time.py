"""Any ``time``: sequences that are not a multiple of the block size (or of the kernels' tiles).
Layouts cover ``ceil(time / blocksize)`` blocks and allow no pair with a position past ``time``;
the fused kernels mask the tile past ``time`` and the gather engines pad inside. Every engine
against float64 dense attention under the closed form, forward and the three gradients, causal
and bidirectional, with grouped-query heads too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference
from _kernel_env import device as _device
from _kernel_env import launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)

import sparse_attention as sa
from sparse_attention.layouts import make_layout
from sparse_attention.torch.reference import masked_attention, merge_heads, split_heads

# time 100 with blocksize 16: 7 blocks, the last holding 4 tokens; strided with l = 10 (l | time)
MODES = {
    "all": {},
    "local": dict(local_attn_ctx=32),
    "strided": dict(local_attn_ctx=10),
    "fixed": dict(local_attn_ctx=32, num_verts=2, vertsize=1),
}
TIMES = [100, 90, 40]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", TIMES + [1, 17, 250])
@pytest.mark.parametrize("mode", list(MODES))
def test_layout_is_the_closed_form(mode, T, causal):
    kw = MODES[mode]
    if mode == "strided" and T % kw["local_attn_ctx"]:
        kw = dict(local_attn_ctx=T if T < 10 else 5 if T % 5 == 0 else 1)
    lay = make_layout(T, 4, mode, blocksize=16, causal=causal, **kw)
    assert lay.time == T and lay.nb == -(-T // 16)
    want = sa.dense_mask(T, 4, mode, blocksize=16, causal=causal, **kw)
    assert (np.broadcast_to(lay.to_dense(), want.shape) == want).all()


def _reference(mask, heads):
    def ref(q, k, v):
        G = heads // k.shape[1]
        return masked_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask, dtype=q.dtype)

    return ref


def _inputs(H, HK, T, D, dtype, dev, seed):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(2, H, T, D, generator=g).to(dev, dtype) for _ in range(2))
    k, v = (torch.randn(2, HK, T, D, generator=g).to(dev, dtype) for _ in range(2))
    return q, k, v, do


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", TIMES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fn", [sa.attention_impl, sa.blocksparse_attention_impl], ids=["dense", "blocksparse"])
def test_public_calls_at_any_time(fn, mode, T, causal, kv_heads):
    """On the CPU: the block gather (padding inside), SDPA for ``all``, the dense reference."""
    H, D = 4, 16
    q, k, v, do = _inputs(H, kv_heads, T, D, torch.float64, "cpu", seed=T)
    mask = torch.from_numpy(sa.dense_mask(T, H, mode, blocksize=16, causal=causal, **MODES[mode]))

    def call(a, b, c):
        cols = [x.transpose(1, 2).reshape(2, T, -1) for x in (a, b, c)]
        return split_heads(fn(*cols, H, mode, blocksize=16, causal=causal, **MODES[mode]), H)

    check_against_reference(call, q, k, v, do, ref=_reference(mask, H))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", TIMES)
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_kernels_at_any_time(launch, mode, T, causal, dtype):
    """The kernels' tail tiles (TAIL), NaN-poisoned outputs, grouped heads (4 over 2); the
    bidirectional layouts run as custom tables (``strided``'s through its permutation)."""
    from sparse_attention.torch.dispatch import EagerAttention

    lay = make_layout(T, 4, mode, blocksize=16, causal=causal, **MODES[mode])
    assert not launch.unsupported_reasons(torch.empty(1, 4, T, 32, device=_device(), dtype=dtype), lay)
    q, k, v, do = _inputs(4, 2, T, 32, dtype, _device(), seed=T + 1)
    mask = torch.from_numpy(lay.to_dense()).to(q.device)
    fn = lambda a, b, c: EagerAttention.apply(a, b, c, launch.forward, launch.backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, ref=_reference(mask, 4), floor=1e-4)


def test_tail_flag_compiles_only_where_needed(launch, monkeypatch):
    """Lengths that the tiles divide launch without the tail masks (the same compiled kernels as
    before); others with them."""
    seen = []
    orig = launch._Kernel.run

    def spy(self, grid_of, *args, time, **extra):
        seen.append((time, bool(time % self.kw["BM"] or time % self.kw["BN"])))
        return orig(self, grid_of, *args, time=time, **extra)

    monkeypatch.setattr(launch._Kernel, "run", spy)
    for T in (128, 100):
        lay = make_layout(T, 2, "local", local_attn_ctx=32, blocksize=16)
        q = torch.randn(1, 2, T, 16, device=_device())
        launch.forward(q, q, q, lay)
    assert (128, False) in seen and (100, True) in seen


@pytest.mark.parametrize("mode", list(MODES))
def test_tensorflow_at_any_time(mode):
    tf = pytest.importorskip("tensorflow")
    H, T, D = 4, 100, 16
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(2, T, H * D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.from_numpy(sa.dense_mask(T, H, mode, blocksize=16, **MODES[mode]))
    xs = [split_heads(x, H).requires_grad_() for x in (q, k, v)]
    o = merge_heads(masked_attention(*xs, mask))
    o.backward(do)
    want = [o.detach()] + [merge_heads(x.grad) for x in xs]
    tq, tk, tv = (tf.Variable(x.numpy()) for x in (q, k, v))
    with tf.GradientTape() as tape:
        out = sa.blocksparse_attention_impl(tq, tk, tv, H, mode, blocksize=16, **MODES[mode])
        loss = tf.reduce_sum(out * do.numpy())
    grads = tape.gradient(loss, [tq, tk, tv])
    for name, got, w in zip(("out", "dq", "dk", "dv"), [out, *grads], want):
        np.testing.assert_allclose(np.asarray(got), w.numpy(), atol=1e-10, err_msg=name)


def test_strided_still_needs_its_stride_to_divide_time():
    x = torch.randn(1, 100, 32)
    with pytest.raises(ValueError, match="must divide time"):
        sa.blocksparse_attention_impl(x, x, x, 2, "strided", local_attn_ctx=16, blocksize=16)
