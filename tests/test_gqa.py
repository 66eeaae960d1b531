"""Grouped-query and multi-query attention: ``k`` and ``v`` with ``kv_heads`` heads of q's
head_dim, ``heads % kv_heads == 0``; query head ``h`` reads key/value head ``h // (heads //
kv_heads)``. Every engine (the fused kernels in the interpreter or on the GPU, the block gather,
SDPA for ``all``, the dense reference, TensorFlow) against float64 attention over k and v
repeated per query head (written here with ``repeat_interleave``, independently of the library),
forward and the three gradients (each key/value head's gradient sums over its group)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference
from _kernel_env import INTERPRET, launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)
from _kernel_env import device as _device

import sparse_attention as sa
from sparse_attention.layouts import custom_layout, make_layout
from sparse_attention.torch.reference import masked_attention


def _custom(heads):
    """Per-head blocks with in-block masks and a query block with no key (head 1)."""
    nb = 8
    lay = np.tril(np.ones((heads, nb, nb), int))
    lay[1, 3, :] = 0
    lay[2 % heads] = np.eye(nb, dtype=int)
    lay[2 % heads, 5, 2] = 1

    def cb(shape, h, qi, ki, e):
        if qi == ki:
            return np.arange(shape[0])[:, None] >= np.arange(shape[1])[None, :]
        return np.random.RandomState(e).rand(*shape) > 0.3

    return custom_layout(lay, 16, callback=cb)


# (layout, kv_heads, head_dim): every mode; fixed with summary classes that a group holds in
# part (6 heads, 2 kv heads, 3 classes: groups of 3 heads hold all 3; 8/4/4: groups of 2 hold 2
# of 4) or in full, and multi-query (kv_heads 1)
GROUPED = {
    "all-4q2kv": (lambda: make_layout(128, 4, "all", blocksize=16), 2, 32),
    "local-4q2kv": (lambda: make_layout(128, 4, "local", local_attn_ctx=48, blocksize=16), 2, 32),
    "local-mqa": (lambda: make_layout(128, 4, "local", local_attn_ctx=32, blocksize=16), 1, 16),
    "strided-4q2kv": (lambda: make_layout(192, 4, "strided", local_attn_ctx=8, blocksize=16), 2, 16),
    "fixed-8q2kv-nv4": (
        lambda: make_layout(128, 8, "fixed", local_attn_ctx=64, blocksize=16, num_verts=4, vertsize=1),
        2,
        16,
    ),
    "fixed-8q4kv-nv4": (
        lambda: make_layout(128, 8, "fixed", local_attn_ctx=64, blocksize=16, num_verts=4, vertsize=1),
        4,
        16,
    ),
    "fixed-6q2kv-nv3": (
        lambda: make_layout(128, 6, "fixed", local_attn_ctx=64, blocksize=16, num_verts=3, vertsize=1),
        2,
        16,
    ),
    "fixed-4q2kv-nv2-vs2": (
        lambda: make_layout(128, 4, "fixed", local_attn_ctx=64, blocksize=16, num_verts=2, vertsize=2),
        2,
        32,
    ),
    "fixed-mqa": (
        lambda: make_layout(128, 4, "fixed", local_attn_ctx=32, blocksize=16, num_verts=2, vertsize=1),
        1,
        16,
    ),
    "custom-4q2kv": (lambda: _custom(4), 2, 32),
    "custom-mqa": (lambda: _custom(4), 1, 16),
}


def _inputs(B, H, HK, T, D, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, T, D, generator=g).to(dev, dtype) for _ in range(2))
    k, v = (torch.randn(B, HK, T, D, generator=g).to(dev, dtype) for _ in range(2))
    return q, k, v, do


def _grouped_reference(mask, heads):
    """Dense masked attention over k, v repeated per query head."""

    def ref(q, k, v):
        G = heads // k.shape[1]
        return masked_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask, dtype=q.dtype)

    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(GROUPED))
def test_fused_kernels_grouped(launch, case, dtype):
    """The kernels read each key/value head directly (dK/dV: one program per key/value head
    walks its group's query heads), NaN-poisoned outputs."""
    from sparse_attention.torch.dispatch import EagerAttention

    make, HK, D = GROUPED[case]
    lay = make()
    q, k, v, do = _inputs(2, lay.heads, HK, lay.time, D, dtype, _device())
    mask = torch.from_numpy(lay.to_dense()).to(q.device)
    fn = lambda a, b, c: EagerAttention.apply(a, b, c, launch.forward, launch.backward, lay)  # noqa: E731
    got = check_against_reference(fn, q, k, v, do, ref=_grouped_reference(mask, lay.heads), floor=1e-4)
    assert got[2].shape == k.shape and got[3].shape == v.shape


@pytest.mark.parametrize("case", list(GROUPED))
def test_gather_engine_grouped(case):
    from sparse_attention.torch import gather
    from sparse_attention.torch.dispatch import EagerAttention

    make, HK, D = GROUPED[case]
    lay = make()
    q, k, v, do = _inputs(2, lay.heads, HK, lay.time, D, torch.float64, "cpu", seed=1)
    mask = torch.from_numpy(lay.to_dense())
    fn = lambda a, b, c: EagerAttention.apply(a, b, c, gather.gather_forward, gather.gather_backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, ref=_grouped_reference(mask, lay.heads))


MODES = {
    "all": {},
    "local": dict(local_attn_ctx=32),
    "strided": dict(local_attn_ctx=8),
    "fixed": dict(local_attn_ctx=32, num_verts=2, vertsize=1),
}


def _public(fn, heads, mode, kw):
    """``fn`` (a public call) on ``[B, H, T, D]`` heads, through ``[B, T, heads * D]`` columns."""

    def call(q, k, v):
        B, H, T, D = q.shape
        cols = [x.transpose(1, 2).reshape(B, T, x.shape[1] * D) for x in (q, k, v)]
        o = fn(*cols, heads, mode, blocksize=16, **kw)
        return o.view(B, T, H, D).transpose(1, 2)

    return call


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fn", [sa.attention_impl, sa.blocksparse_attention_impl], ids=["dense", "blocksparse"])
def test_public_calls_grouped(fn, mode, dtype, kv_heads):
    """The public calls on ``k``, ``v`` of ``kv_heads * head_dim`` columns (on the CPU: the block
    gather, SDPA with ``enable_gqa`` for ``all``, the dense reference)."""
    H, T, D = 4, 128, 16
    q, k, v, do = _inputs(2, H, kv_heads, T, D, dtype, "cpu", seed=2)
    mask = torch.from_numpy(sa.dense_mask(T, H, mode, blocksize=16, **MODES[mode]))
    check_against_reference(_public(fn, H, mode, MODES[mode]), q, k, v, do, ref=_grouped_reference(mask, H))


@pytest.mark.parametrize("mode", list(MODES))
def test_public_call_grouped_through_the_kernels(launch, monkeypatch, mode):
    """``blocksparse_attention_impl`` with grouped k, v on the fused path (interpreter on the CPU):
    one autograd node, heads split as views of the columns."""
    from sparse_attention.torch import dispatch

    monkeypatch.setattr(dispatch, "fused_unsupported_reasons", lambda q, lay: [])
    H, HK, T, D = 4, 2, 128, 16
    q, k, v, do = _inputs(1, H, HK, T, D, torch.float32, _device(), seed=3)
    mask = torch.from_numpy(sa.dense_mask(T, H, mode, blocksize=16, **MODES[mode])).to(q.device)
    fn = _public(sa.blocksparse_attention_impl, H, mode, MODES[mode])
    check_against_reference(fn, q, k, v, do, ref=_grouped_reference(mask, H), floor=1e-4)


def test_bhtd_op_grouped():
    from sparse_attention.torch import blocksparse_attention_bhtd

    lay = make_layout(128, 4, "local", local_attn_ctx=32, blocksize=16)
    q, k, v, do = _inputs(1, 4, 2, 128, 16, torch.float64, "cpu", seed=4)
    mask = torch.from_numpy(lay.to_dense())
    check_against_reference(
        lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay), q, k, v, do, ref=_grouped_reference(mask, 4)
    )


@pytest.mark.parametrize(
    "kv_cols,k_shape,match",
    [
        (48, None, "kv_heads \\* 16 columns with heads % kv_heads == 0"),  # 3 kv heads of 16 for 4 heads
        (40, None, "kv_heads \\* 16 columns"),  # not a multiple of head_dim
        (128, None, "kv_heads \\* 16 columns"),  # more kv heads than heads
        (32, (2, 128, 16), "k and v must have the same shape"),
        (32, (2, 64, 32), "k and v must have the same shape"),
    ],
)
@pytest.mark.parametrize("fn", [sa.attention_impl, sa.blocksparse_attention_impl], ids=["dense", "blocksparse"])
def test_grouped_shape_errors(fn, kv_cols, k_shape, match):
    q = torch.randn(2, 128, 64)
    k = torch.randn(2, 128, kv_cols)
    v = torch.randn(*(k_shape or k.shape))
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, 4, "all", blocksize=16)


def test_grouped_time_must_match():
    with pytest.raises(ValueError, match="same batch and time"):
        sa.blocksparse_attention_impl(torch.randn(2, 128, 64), *[torch.randn(2, 64, 32)] * 2, 4, "all", blocksize=16)


def test_bhtd_grouped_errors():
    from sparse_attention.torch import blocksparse_attention_bhtd, merged_local_strided_bhtd

    lay = make_layout(128, 4, "local", local_attn_ctx=32, blocksize=16)
    q = torch.randn(1, 4, 128, 16)
    with pytest.raises(ValueError, match="heads \\(4\\) % kv_heads == 0"):
        blocksparse_attention_bhtd(q, *[torch.randn(1, 3, 128, 16)] * 2, lay)
    with pytest.raises(ValueError, match="kv_heads"):
        blocksparse_attention_bhtd(q, *[torch.randn(1, 2, 128, 32)] * 2, lay)
    st = make_layout(128, 4, "strided", local_attn_ctx=32, blocksize=16)
    with pytest.raises(ValueError, match="same shape"):
        merged_local_strided_bhtd(q, *[torch.randn(1, 2, 128, 16)] * 2, lay, st)


@pytest.mark.parametrize("mode", list(MODES))
def test_tensorflow_grouped(mode):
    """TensorFlow (eager): both calls with grouped k, v against the torch float64 reference,
    forward and the three gradients."""
    tf = pytest.importorskip("tensorflow")
    H, HK, T, D, B = 4, 2, 128, 16, 2
    q, k, v, do = _inputs(B, H, HK, T, D, torch.float64, "cpu", seed=5)
    mask = torch.from_numpy(sa.dense_mask(T, H, mode, blocksize=16, **MODES[mode]))
    cols = [x.transpose(1, 2).reshape(B, T, -1) for x in (q, k, v, do)]
    want = [x.detach() for x in _want(_grouped_reference(mask, H), q, k, v, do)]
    want = [want[0].transpose(1, 2).reshape(B, T, -1)] + [
        g.transpose(1, 2).reshape(B, T, -1) for g in want[1:]
    ]  # [B, T, cols] like the tf inputs
    for fn in (sa.attention_impl, sa.blocksparse_attention_impl):
        tq, tk, tv = (tf.Variable(x.numpy()) for x in cols[:3])
        with tf.GradientTape() as tape:
            o = fn(tq, tk, tv, H, mode, blocksize=16, **MODES[mode])
            loss = tf.reduce_sum(o * cols[3].numpy())
        grads = tape.gradient(loss, [tq, tk, tv])
        for name, got, w in zip(("out", "dq", "dk", "dv"), [o, *grads], want):
            np.testing.assert_allclose(np.asarray(got), w.numpy(), atol=1e-10, err_msg=f"{fn.__name__} {name}")


def _want(ref, q, k, v, do):
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = ref(qs, ks, vs)
    o.backward(do)
    return o, qs.grad, ks.grad, vs.grad
