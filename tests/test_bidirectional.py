"""Bidirectional built-in modes (``causal=False``): the closed form against definitions written
here, the layouts against the closed form, and every engine (the block gather, the fused kernels
in the interpreter or on the GPU, SDPA for ``all``, TensorFlow) against float64 dense attention
under the mask, forward and the three gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference
from _kernel_env import device as _device
from _kernel_env import launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)

import sparse_attention as sa
from sparse_attention.layouts import make_layout
from sparse_attention.torch.dispatch import EagerAttention
from sparse_attention.torch.reference import masked_attention, merge_heads, split_heads


def _definition(T, H, mode, L=None, b=None, nv=None, vs=None):
    """The bidirectional patterns as the issue states them, pair by pair (slow, small T)."""
    m = np.zeros((H, T, T), bool)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                if mode == "all":
                    ok = True
                elif mode == "local":
                    ok = abs(i - j) < L
                elif mode == "strided":
                    ok = (i - j) % L == 0
                else:
                    s = L // b
                    col = (j // b) % s
                    hi = s - 1 - (h % nv) * vs
                    ok = i // L == j // L or hi - vs + 1 <= col <= hi
                m[h, i, j] = ok
    return m


CASES = {
    "all": ("all", {}, 16),
    "local-L32": ("local", dict(local_attn_ctx=32), 16),
    "local-L48": ("local", dict(local_attn_ctx=48), 16),
    "strided-l8": ("strided", dict(local_attn_ctx=8), 16),
    "strided-l32": ("strided", dict(local_attn_ctx=32), 16),
    "strided-l16-b32": ("strided", dict(local_attn_ctx=16), 32),
    "fixed-nv2": ("fixed", dict(local_attn_ctx=64, num_verts=2, vertsize=1), 16),
    "fixed-nv2-vs2": ("fixed", dict(local_attn_ctx=64, num_verts=2, vertsize=2), 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_and_layout(case):
    mode, kw, b = CASES[case]
    T, H = 96 if b == 16 else 128, 4
    if mode == "strided" and T % kw["local_attn_ctx"]:
        T = 128
    want = _definition(
        T, H, mode, kw.get("local_attn_ctx"), b if mode == "fixed" else None, kw.get("num_verts"), kw.get("vertsize")
    )
    assert (sa.dense_mask(T, H, mode, blocksize=b, causal=False, **kw) == want).all()
    lay = make_layout(T, H, mode, blocksize=b, causal=False, **kw)
    assert (np.broadcast_to(lay.to_dense(), want.shape) == want).all()
    assert lay.params["causal"] is False and lay.params["attn_mode"] == mode
    # the causal mode is the lower triangle of the bidirectional one
    causal = sa.dense_mask(T, H, mode, blocksize=b, **kw)
    assert (causal == (want & np.tril(np.ones((T, T), bool)))).all()


@pytest.mark.parametrize(
    "T,l,b",
    [(4096, 128, 32), (3072, 96, 32), (1000 * 16, 1000, 16)],  # n = T / l a multiple of b, or not
)
def test_strided_layout_at_larger_sizes(T, l, b):  # noqa: E741
    """Segments that do and do not end on block edges: the layout's token pairs, counted (each
    residue class is dense), and a sample of rows against the closed form."""
    lay = make_layout(T, 2, "strided", local_attn_ctx=l, blocksize=b, causal=False)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, T, 16)
    i, j = np.arange(T)[rows, None], np.arange(T)[None, :]
    dense = lay.to_dense() if T <= 4096 else None
    if dense is not None:
        assert (dense[0][rows] == ((i - j) % l == 0)).all()
    n = T // l
    assert lay.nnz * b * b >= T * n  # every allowed pair lies in an enabled block


def test_layouts_of_long_sequences_build_fast():
    import time

    t = time.perf_counter()
    lay = make_layout(65536, 8, "fixed", local_attn_ctx=128, blocksize=32, num_verts=4, vertsize=1, causal=False)
    assert lay.nnz > 0 and len(lay.block_masks) == 0  # every block of fixed is full
    lay = make_layout(65536, 8, "local", local_attn_ctx=512, blocksize=64, causal=False)
    assert len(lay.block_masks) == 2  # the two band edges
    assert time.perf_counter() - t < 20


MODES = {
    "all": {},
    "local": dict(local_attn_ctx=32),
    "strided": dict(local_attn_ctx=8),
    "fixed": dict(local_attn_ctx=32, num_verts=2, vertsize=1),
}


def _public(fn, heads, mode, kw):
    def call(q, k, v):
        B, H, T, D = q.shape
        cols = [x.transpose(1, 2).reshape(B, T, x.shape[1] * D) for x in (q, k, v)]
        return split_heads(fn(*cols, heads, mode, blocksize=16, causal=False, **kw), heads)

    return call


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fn", [sa.attention_impl, sa.blocksparse_attention_impl], ids=["dense", "blocksparse"])
def test_public_calls_bidirectional(fn, mode, dtype, kv_heads):
    """The public calls with ``causal=False`` (on the CPU: the block gather, SDPA for ``all``), with
    ordinary and grouped-query heads."""
    H, T, D = 4, 128, 16
    g = torch.Generator().manual_seed(1)
    q, do = (torch.randn(2, H, T, D, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, kv_heads, T, D, generator=g, dtype=dtype) for _ in range(2))
    mask = torch.from_numpy(_definition(T, H, mode, *_args(mode)))
    G = H // kv_heads

    def ref(a, b, c):
        from sparse_attention.torch.reference import masked_attention

        return masked_attention(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1), mask, dtype=a.dtype)

    check_against_reference(_public(fn, H, mode, MODES[mode]), q, k, v, do, ref=ref)


def _args(mode):
    kw = MODES[mode]
    return kw.get("local_attn_ctx"), 16 if mode == "fixed" else None, kw.get("num_verts"), kw.get("vertsize")


@pytest.mark.parametrize("T", [128, 200])
@pytest.mark.parametrize("dtype,kv_heads", [(torch.float32, 4), (torch.float16, 2)], ids=["fp32", "fp16-gqa"])
@pytest.mark.parametrize("form", ["closed", "tables"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_kernels_bidirectional(launch, case, form, dtype, kv_heads, T, monkeypatch):
    """The fused kernels on the bidirectional layouts, NaN-poisoned outputs: the built-in modes'
    closed form (``closed``; keys after the query, the tile past ``time`` masked, fixed's later
    summary keys) and the layouts' tables (``tables``; ``strided``'s through its residue-major
    ``PERM`` table); 200 tokens leave a partial tile; grouped heads in half precision."""
    mode, kw, b = CASES[case]
    if mode == "strided" and T % kw["local_attn_ctx"]:
        pytest.skip("strided's stride must divide time")
    monkeypatch.setattr(launch, "CLOSED_BIDIRECTIONAL", form == "closed")
    lay = make_layout(T, 4, mode, blocksize=b, causal=False, **kw)
    assert (launch.closed_form(lay) is not None) == (form == "closed")
    assert not launch.unsupported_reasons(torch.empty(1, 4, T, 32, device=_device(), dtype=dtype), lay)
    g = torch.Generator().manual_seed(2)
    q, do = (torch.randn(1, 4, T, 32, generator=g).to(_device(), dtype) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, T, 32, generator=g).to(_device(), dtype) for _ in range(2))
    mask = torch.from_numpy(lay.to_dense()).to(q.device)
    G = 4 // kv_heads

    def ref(a, b_, c):
        return masked_attention(a, b_.repeat_interleave(G, 1), c.repeat_interleave(G, 1), mask, dtype=a.dtype)

    fn = lambda a, b_, c: EagerAttention.apply(a, b_, c, launch.forward, launch.backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, ref=ref, floor=1e-4)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("case", ["all", "local-L48", "strided-l32", "fixed-nv2-vs2"])
def test_closed_form_loops_bidirectional(launch, case, split, monkeypatch):
    """Both loop structures of the closed form (full tiles in their own unmasked loops, or one
    masked loop) at a length where a query tile's keys span several tiles on both sides."""
    mode, kw, b = CASES[case]
    monkeypatch.setattr(launch, "SPLIT_OVERRIDE", split)
    T = 256 if mode == "strided" else 232
    lay = make_layout(T, 4, mode, blocksize=b, causal=False, **kw)
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 4, T, 16, generator=g).to(_device()) for _ in range(4))
    fn = lambda a, b_, c: EagerAttention.apply(a, b_, c, launch.forward, launch.backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, mask=torch.from_numpy(lay.to_dense()).to(q.device))


def test_retiled_bidirectional_keeps_its_closed_form(launch):
    """A bidirectional layout retiled by the user keeps the pattern's own blocksize for the
    closed form (fixed's summary blocks are 16 wide here, the layout's blocks 32)."""
    from sparse_attention.layouts import retile

    lay = retile(make_layout(192, 4, "fixed", blocksize=16, causal=False, **CASES["fixed-nv2"][1]), 32)
    assert lay.blocksize == 32 and launch.closed_form(lay)[1]["blocksize"] == 16
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, 4, 192, 16, generator=g).to(_device()) for _ in range(4))
    fn = lambda a, b_, c: EagerAttention.apply(a, b_, c, launch.forward, launch.backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, mask=torch.from_numpy(lay.to_dense()).to(q.device))


@pytest.mark.parametrize("mode", list(MODES))
def test_tensorflow_bidirectional(mode):
    tf = pytest.importorskip("tensorflow")
    H, T, D, B = 4, 128, 16, 2
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(B, T, H * D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.from_numpy(_definition(T, H, mode, *_args(mode)))
    xs = [split_heads(x, H).requires_grad_() for x in (q, k, v)]
    from sparse_attention.torch.reference import masked_attention

    o = merge_heads(masked_attention(*xs, mask))
    o.backward(do)
    want = [o.detach()] + [merge_heads(x.grad) for x in xs]
    for fn in (sa.attention_impl, sa.blocksparse_attention_impl):
        tq, tk, tv = (tf.Variable(x.numpy()) for x in (q, k, v))
        with tf.GradientTape() as tape:
            out = fn(tq, tk, tv, H, mode, blocksize=16, causal=False, **MODES[mode])
            loss = tf.reduce_sum(out * do.numpy())
        grads = tape.gradient(loss, [tq, tk, tv])
        for name, got, w in zip(("out", "dq", "dk", "dv"), [out, *grads], want):
            np.testing.assert_allclose(np.asarray(got), w.numpy(), atol=1e-10, err_msg=f"{fn.__name__} {name}")


def test_causal_argument_errors():
    x = torch.randn(1, 64, 32)
    with pytest.raises(TypeError, match="causal must be True or False"):
        sa.blocksparse_attention_impl(x, x, x, 2, "local", local_attn_ctx=32, causal="no")
    lay = make_layout(64, 2, "local", local_attn_ctx=32)
    with pytest.raises(ValueError, match="a Layout says itself"):
        sa.blocksparse_attention_impl(x, x, x, 2, lay, causal=False)


def test_bidirectional_layouts_compile_without_registration():
    """A bidirectional built-in layout is named by its parameters in the ops (as the causal
    ones), so ``torch.compile(fullgraph=True)`` traces a call without ``register_layout``."""
    from _attn_ref import fwd_bwd

    from sparse_attention.torch import blocksparse_attention_bhtd
    from sparse_attention.torch.dispatch import _REGISTRY, layout_of, layout_spec

    lay = make_layout(112, 2, "local", local_attn_ctx=48, blocksize=16, causal=False)
    assert id(lay) not in _REGISTRY and (layout_of(layout_spec(lay)).to_dense() == lay.to_dense()).all()
    g = torch.Generator().manual_seed(8)
    q, k, v, do = (torch.randn(1, 2, 112, 16, generator=g, dtype=torch.float64) for _ in range(4))
    f = lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay)  # noqa: E731
    got = fwd_bwd(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do)
    for x, r in zip(got, fwd_bwd(f, q, k, v, do)):
        torch.testing.assert_close(x, r)
    assert id(lay) not in _REGISTRY  # nor does an eager call keep it alive there
