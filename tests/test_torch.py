"""The torch front end: block-sparse vs dense vs float64, gradients, recompute, errors (CPU)."""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _attn_ref import check_against_reference as _check  # noqa: E402

from sparse_attention import (  # noqa: E402
    attention_impl,
    blocksparse_attention_impl,
    custom_layout,
    from_dense,
    make_layout,
    recomputable,
)
from sparse_attention.torch import cache, gather  # noqa: E402
from sparse_attention.torch.dispatch import EagerAttention  # noqa: E402
from sparse_attention.torch.reference import masked_attention, split_heads  # noqa: E402


def gather_attention(q, k, v, layout):
    return EagerAttention.apply(q, k, v, gather.gather_forward, gather.gather_backward, layout)


MODES = {
    "all": {},
    "local": {"local_attn_ctx": 64},
    "strided": {"local_attn_ctx": 8},
    "fixed": {"num_verts": 2, "vertsize": 1},  # local_attn_ctx = 4 * blocksize
}


def _inputs(B, T, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, T, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    return x[:3], x[3]


def _fwd_bwd(fn, qkv, dout):
    qkv = [x.detach().clone().requires_grad_(True) for x in qkv]
    out = fn(*qkv)
    grads = torch.autograd.grad(out, qkv, dout)
    return [out.detach()] + list(grads)


def check_against_reference(fn_fast, fn_dense, qkv, dout):
    """The fast path vs the dense front end in float64 (tests/_attn_ref.py's rule)."""
    _check(fn_fast, *qkv, dout, ref=fn_dense)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("head_dim,blocksize", [(32, 16), (48, 32), (64, 16), (16, 64)], ids=lambda x: str(x))
def test_blocksparse_matches_reference(mode, dtype, head_dim, blocksize):
    heads, T = 2, 256
    kw = dict(MODES[mode], heads=heads, attn_mode=mode, blocksize=blocksize)
    if mode == "fixed":
        kw["local_attn_ctx"] = 4 * blocksize
    qkv, dout = _inputs(2, T, heads * head_dim, dtype, seed=zlib.crc32(f"{mode}-{head_dim}-{blocksize}".encode()))
    check_against_reference(
        lambda q, k, v: blocksparse_attention_impl(q, k, v, **kw),
        lambda q, k, v: attention_impl(q, k, v, **kw),
        qkv,
        dout,
    )


@pytest.mark.parametrize("T,stride,blocksize", [(96, 3, 16), (160, 10, 32), (256, 256, 16), (256, 1, 32)])
def test_strided_odd_strides(T, stride, blocksize):
    # (time / stride) % blocksize != 0: the original refused these; this path does not transpose
    kw = dict(heads=3, attn_mode="strided", local_attn_ctx=stride, blocksize=blocksize)
    qkv, dout = _inputs(1, T, 3 * 16, torch.float32, seed=T + stride)
    check_against_reference(
        lambda q, k, v: blocksparse_attention_impl(q, k, v, **kw),
        lambda q, k, v: attention_impl(q, k, v, **kw),
        qkv,
        dout,
    )


@pytest.mark.parametrize("num_verts,vertsize", [(4, 1), (2, 2), (1, 4), (1, 1)])
def test_fixed_per_head_layouts(num_verts, vertsize):
    kw = dict(heads=4, attn_mode="fixed", local_attn_ctx=64, blocksize=16, num_verts=num_verts, vertsize=vertsize)
    qkv, dout = _inputs(2, 256, 4 * 32, torch.float32, seed=num_verts * 10 + vertsize)
    check_against_reference(
        lambda q, k, v: blocksparse_attention_impl(q, k, v, **kw),
        lambda q, k, v: attention_impl(q, k, v, **kw),
        qkv,
        dout,
    )


def _custom(H=3, nb=8, b=16):
    lay = np.tril(np.ones((H, nb, nb), int))
    lay[1, 3] = 0  # head 1, query block 3: no key block
    lay[2, :, 0] = 0

    def cb(shape, h, qi, ki, bi):
        m = np.ones(shape, bool)
        if qi == ki:
            m = np.tril(m)
        if h == 0 and qi == 5:
            m[2] = False  # query row 5 * 16 + 2 of head 0 sees nothing in this block
        if (bi + h) % 5 == 0:
            m[:, ::2] = False
        return m

    return custom_layout(lay, b, cb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_custom_layout_with_callback_and_empty_rows(dtype):
    layout = _custom()
    dense = layout.to_dense()
    empty = ~dense.any(axis=-1)  # [H, T]
    assert empty.any()
    qkv, dout = _inputs(2, layout.time, 3 * 32, dtype, seed=7)
    kw = dict(heads=3, attn_mode=layout)
    check_against_reference(
        lambda q, k, v: blocksparse_attention_impl(q, k, v, **kw),
        lambda q, k, v: attention_impl(q, k, v, **kw),
        qkv,
        dout,
    )
    q, k, v = (x.clone().requires_grad_(True) for x in qkv)
    out = blocksparse_attention_impl(q, k, v, **kw)
    out.backward(dout)
    o = split_heads(out.detach(), 3)
    dq = split_heads(q.grad, 3)
    for h in range(3):
        rows = torch.from_numpy(np.nonzero(empty[h])[0])
        assert torch.all(o[:, h, rows] == 0) and torch.all(dq[:, h, rows] == 0)


def test_one_head_layout_broadcasts_over_heads():
    lay = from_dense(np.tril(np.ones((128, 128), bool)), 32)
    qkv, dout = _inputs(1, 128, 4 * 16, torch.float32, seed=3)
    check_against_reference(
        lambda q, k, v: blocksparse_attention_impl(q, k, v, 4, lay),
        lambda q, k, v: attention_impl(q, k, v, 4, "all"),
        qkv,
        dout,
    )


@pytest.mark.parametrize("budget", [1, 4 * 16 * 16 * 8, 1 << 24], ids=["row-per-chunk", "few-rows", "one-chunk"])
@pytest.mark.parametrize("mode", ["all", "fixed", "custom"])
def test_gather_path_chunking(monkeypatch, budget, mode):
    # Chunks of several rows share key blocks (gathered once); one-row chunks share none. Every
    # chunking must give the reference's result.
    monkeypatch.setattr(gather, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(gather, "CPU_CHUNK_ELEMENTS", budget)
    layout = {
        "all": lambda: make_layout(512, 2, "all", blocksize=16),
        "fixed": lambda: make_layout(512, 2, "fixed", 64, 16, 2, 1),
        "custom": lambda: from_dense(np.random.default_rng(0).random((2, 512, 512)) < 0.3, 16),
    }[mode]()
    qkv, dout = _inputs(1, 512, 2 * 16, torch.float64, seed=5)
    heads = [split_heads(x, 2) for x in qkv]
    got = _fwd_bwd(lambda q, k, v: gather_attention(q, k, v, layout), heads, split_heads(dout, 2))
    mask = torch.from_numpy(layout.to_dense())
    want = _fwd_bwd(lambda q, k, v: masked_attention(q, k, v, mask), heads, split_heads(dout, 2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    plans = [cs for key, cs in cache.entries(layout).items() if key[0] == "plan" and key[1] == 0 and key[3] == budget]
    assert len(plans) == 1
    chunks = plans[0]
    assert [(c.r0, c.r1) for c in chunks] == list(zip([c.r0 for c in chunks], [c.r0 for c in chunks[1:]] + [32]))
    assert chunks[0].r0 == 0
    if budget == 1:
        assert all(c.r1 - c.r0 == 1 for c in chunks)
    shared = sum(0 if c.shared is None else len(c.shared) for c in chunks)
    if budget == 4 * 16 * 16 * 8 and mode != "custom":  # a random custom row fills the budget alone
        # rows after the first share whole key blocks (all: column 0; fixed: earlier summaries)
        assert shared > 0


def test_outputs_are_written_everywhere():
    # no NaN-poisoned or uninitialised element survives: every output element depends on v
    layout = make_layout(256, 2, "local", 32, 16)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    o1 = gather_attention(q, k, v, layout)
    o2 = gather_attention(q, k, v + 1.0, layout)
    assert torch.isfinite(o1).all()
    torch.testing.assert_close(o2 - o1, torch.ones_like(o1))


@pytest.mark.parametrize("fn", [attention_impl, blocksparse_attention_impl])
def test_recompute_gives_identical_gradients(fn):
    kw = dict(heads=2, attn_mode="fixed", local_attn_ctx=64, blocksize=16, num_verts=2, vertsize=1)
    qkv, dout = _inputs(2, 128, 64, torch.float32, seed=11)
    plain = _fwd_bwd(lambda q, k, v: fn(q, k, v, **kw), qkv, dout)
    again = _fwd_bwd(lambda q, k, v: fn(q, k, v, recompute=True, **kw), qkv, dout)
    for a, b in zip(plain, again):
        assert torch.equal(a, b)


def test_recompute_runs_the_forward_again():
    calls = []

    @recomputable("square")
    def square(x):
        calls.append(1)
        return x * x

    x = torch.randn(4, requires_grad=True)
    square(x, recompute=True).sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(x.grad, 2 * x.detach())
    calls.clear()
    square(x).sum().backward()
    assert len(calls) == 1
    with pytest.raises(TypeError, match="recompute must be True or False"):
        square(x, recompute="yes")


def _qkv(shape=(2, 128, 64), dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("fn", [attention_impl, blocksparse_attention_impl])
@pytest.mark.parametrize(
    "make,kw,exc,match",
    [
        (lambda: _qkv((128, 64)), {}, ValueError, "rank 3"),
        (lambda: _qkv()[:2] + [torch.randn(2, 128, 32)], {}, ValueError, "same shape"),
        (lambda: _qkv(), dict(heads=3), ValueError, "divisible by heads"),
        (lambda: _qkv(), dict(heads=0), ValueError, "heads must be >= 1"),
        (lambda: _qkv(), dict(heads=2.0), TypeError, "heads must be an int"),
        (lambda: _qkv(), dict(attn_mode="dilated"), ValueError, "unknown attn_mode"),
        (lambda: _qkv(), dict(attn_mode="local"), ValueError, "local_attn_ctx is required"),
        (lambda: _qkv(), dict(attn_mode="fixed", local_attn_ctx=64), ValueError, "num_verts is required"),
        (lambda: _qkv(), dict(attn_mode="strided", local_attn_ctx=100), ValueError, "must divide time"),
        (lambda: [torch.ones(2, 128, 64, dtype=torch.int32)] * 3, {}, TypeError, "float16, bfloat16, float32"),
        (lambda: _qkv()[:2] + [torch.randn(2, 128, 64, dtype=torch.float64)], {}, TypeError, "one dtype"),
        (lambda: _qkv()[:2] + [torch.randn(2, 128, 64, device="meta")], {}, ValueError, "one device"),
        (lambda: _qkv()[:2] + [np.zeros((2, 128, 64))], {}, TypeError, "v must be a torch.Tensor or a tf.Tensor"),
    ],
)
def test_bad_input_errors(fn, make, kw, exc, match):
    args = dict(heads=2, attn_mode="all", blocksize=32)
    args.update(kw)
    with pytest.raises(exc, match=match):
        fn(*make(), **args)


@pytest.mark.parametrize("fn", [attention_impl, blocksparse_attention_impl])
def test_remembered_calls_are_still_checked(fn):
    """A repeated call's checks and layout are remembered (one entry per call signature), and
    what the entry does not cover is still checked: argument types that compare equal (``heads=
    True`` against ``1``), dtypes and devices."""
    from sparse_attention import frontend

    q, k, v = _qkv((1, 64, 16))
    kw = dict(attn_mode="local", local_attn_ctx=32, blocksize=16)
    frontend._RESOLVED.clear()
    want = fn(q, k, v, 1, **kw)
    torch.testing.assert_close(fn(q, k, v, 1, **kw), want)
    assert len(frontend._RESOLVED) == 1
    with pytest.raises(TypeError, match="heads must be an int"):
        fn(q, k, v, True, **kw)
    with pytest.raises(TypeError, match="one dtype"):
        fn(q, k, v.double(), 1, **kw)
    with pytest.raises(ValueError, match="one device"):
        fn(q, k, v.to("meta"), 1, **kw)
    with pytest.raises(ValueError, match="local_attn_ctx is required"):
        fn(q, k, v, 1, **{**kw, "local_attn_ctx": None})
    for t in range(1, 100):  # bounded
        fn(*_qkv((1, t, 16)), 1, "all")
    assert len(frontend._RESOLVED) <= frontend.RESOLVED_MAX


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(attn_mode="local", local_attn_ctx=40), "multiple of blocksize"),
        (dict(attn_mode="all", blocksize=48), "power of two"),
    ],
)
def test_blocksparse_only_errors(kw, match):
    args = dict(heads=2, blocksize=32)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        blocksparse_attention_impl(*_qkv((2, 160, 64)), **args)


def test_layout_shape_errors():
    lay = make_layout(256, 2, "all", blocksize=32)
    with pytest.raises(ValueError, match="time=256"):
        blocksparse_attention_impl(*_qkv((1, 128, 64)), 2, lay)
    with pytest.raises(ValueError, match="2 heads"):
        blocksparse_attention_impl(*_qkv((1, 256, 64)), 4, lay)


@pytest.mark.parametrize(
    "shape,make",
    [((128, 2, 64), lambda x: x.transpose(0, 1)), ((2, 128, 128), lambda x: x[..., ::2])],
    ids=["time-major", "strided-dim"],
)
def test_non_contiguous_inputs(shape, make):
    g = torch.Generator().manual_seed(4)
    qkv = [make(torch.randn(*shape, generator=g)) for _ in range(3)]
    assert qkv[0].shape == (2, 128, 64) and not qkv[0].is_contiguous()
    kw = dict(heads=4, attn_mode="local", local_attn_ctx=32, blocksize=16)
    got = blocksparse_attention_impl(*qkv, **kw)
    want = attention_impl(*(x.contiguous() for x in qkv), **kw)
    torch.testing.assert_close(got, want)


def test_a_one_head_custom_layout_is_broadcast_once():
    """A one-head custom layout used with several heads (README's from_dense example) gives one
    broadcast layout per head count, reused by every call, so its derived tables and registry
    entry are made once, not per training step."""
    from sparse_attention.frontend import broadcast_heads
    from sparse_attention.torch import dispatch

    lay = from_dense(np.tril(np.ones((64, 64), bool)), 16)
    assert broadcast_heads(lay, 4) is broadcast_heads(lay, 4) and broadcast_heads(lay, 4).heads == 4
    q = torch.randn(1, 64, 4 * 8)
    blocksparse_attention_impl(q, q, q, 4, lay)
    n = len(dispatch._REGISTRY)
    for _ in range(3):
        blocksparse_attention_impl(q, q, q, 4, lay)
    assert len(dispatch._REGISTRY) == n
