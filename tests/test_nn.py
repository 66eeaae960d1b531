"""Modules and pattern specs: SparseAttention / SparseSelfAttention against independent dense masks."""

import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _attn_ref import compiled_graphs  # noqa: E402

from sparse_attention import attention_impl, dense_mask, make_layout  # noqa: E402
from sparse_attention.patterns import (  # noqa: E402
    Custom,
    Group,
    Merged,
    Mode,
    PerHead,
    paper_patterns,
    shift_invariant_union,
)
from sparse_attention.torch.nn import (  # noqa: E402
    KVCache,
    SparseAttention,
    SparseSelfAttention,
    attend,
)
from sparse_attention.torch.reference import masked_attention  # noqa: E402

B, T, H, D, BS = 2, 128, 4, 8, 16


def _qkv(seed=0, T=T, H=H, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H * D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def _reference_mask(spec, T, H):
    """Dense [H, T, T] masks built from the library's numpy closed form, independently of the specs."""

    def one(s, n):
        if isinstance(s, Mode):
            kw = {"local_attn_ctx": s.local_attn_ctx, "blocksize": BS, "num_verts": s.num_verts, "vertsize": s.vertsize}
            return dense_mask(T, n, s.mode, **{k: v for k, v in kw.items() if v is not None})
        if isinstance(s, Group):
            i = np.arange(T)
            m = (i[None, :] <= i[:, None]) & (i[:, None] // s.l == i[None, :] // s.l)
            return np.broadcast_to(m, (n, T, T))
        if isinstance(s, Merged):
            return np.logical_or.reduce([one(p, n) for p in s.parts])
        if isinstance(s, PerHead):
            return np.concatenate([one(p, n // len(s.parts)) for p in s.parts])
        raise TypeError(s)

    return torch.from_numpy(np.ascontiguousarray(one(spec, H)))


def _dense_attend(q, k, v, mask):
    qh, kh, vh = (x.view(B, x.shape[1], H, D).transpose(1, 2) for x in (q, k, v))
    return masked_attention(qh, kh, vh, mask).transpose(1, 2).reshape(q.shape)


SPECS = {
    "fixed": Mode("fixed", 64, num_verts=2, vertsize=1),
    "local": Mode("local", 32),
    "strided": Mode("strided", 32),
    "merged-local-strided": Merged(Mode("local", 32), Mode("strided", 32)),
    "heads-local-strided": PerHead(Mode("local", 32), Mode("strided", 32)),
    "group": Group(32),
    "heads-group-fixed": PerHead(Group(64), Mode("fixed", 64, num_verts=1, vertsize=1)),
    "merged-group-fixed": Merged(Group(32), Mode("fixed", 64, num_verts=2, vertsize=1)),
}


@pytest.mark.parametrize("impl", ["sparse", "dense", "sdpa"])
@pytest.mark.parametrize("name", list(SPECS))
def test_attend_matches_dense_mask(name, impl):
    spec = SPECS[name]
    q, k, v = _qkv()
    mask = _reference_mask(spec, T, H)
    want = _dense_attend(q, k, v, mask)
    got = attend(q, k, v, H, spec, BS, impl)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(want)
    g_want = torch.autograd.grad(want, (q, k, v), dout)
    g_got = torch.autograd.grad(got, (q, k, v), dout)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["fixed", "merged-local-strided", "heads-local-strided"])
def test_flex_matches_dense_mask(name):
    pytest.importorskip("torch.nn.attention.flex_attention")
    spec = SPECS[name]
    q, k, v = (x.detach().float() for x in _qkv())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not fused
        got = attend(q, k, v, H, spec, BS, "flex")
    want = _dense_attend(q, k, v, _reference_mask(spec, T, H))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_mask_is_the_reference_mask(name):
    spec = SPECS[name]
    pos = torch.arange(T)
    got = spec.mask(pos, pos, H, BS).expand(H, T, T)
    assert torch.equal(got, _reference_mask(spec, T, H))
    # a window of positions, as the KV cache asks for it
    i, j = torch.arange(50, 70), torch.arange(70)
    assert torch.equal(spec.mask(i, j, H, BS).expand(H, 20, 70), _reference_mask(spec, T, H)[:, 50:70, :70])


def test_shift_invariant_union_long_context_is_cheap_and_right():
    """Merged local+strided at the paper's audio context, built block by block in well under a second."""
    T_long, b, l = 65536, 32, 128
    spec = Merged(Mode("local", l), Mode("strided", l))
    t0 = time.perf_counter()
    lay = spec.layout(T_long, 8, b)
    assert time.perf_counter() - t0 < 5.0
    nb = T_long // b
    # row r: the local diagonals 0..4 and every diagonal that is a multiple of l / b = 4
    r = 1000
    cols = lay.cols[lay.row_ptr[0, r] : lay.row_ptr[0, r + 1]]
    want = sorted({r - d for d in range(0, r + 1) if d <= l // b or d % (l // b) == 0})
    assert cols.tolist() == want
    assert lay.nb == nb and lay.block_masks.shape[0] <= 3  # diagonals 0, 4 (edge) and 4k (stride) only
    # and the small case equals the union of the numpy closed forms exactly
    small = shift_invariant_union([Mode("local", 32).allowed, Mode("strided", 48).allowed], 192, 2, 16)
    want = dense_mask(192, 2, "local", 32) | dense_mask(192, 2, "strided", 48)
    assert np.array_equal(small.to_dense(), want)


def test_sparse_attention_module_matches_attention_impl():
    q, k, v = _qkv(1)
    mod = SparseAttention(H, "fixed", 64, blocksize=BS, num_verts=2, vertsize=1)
    want = attention_impl(q, k, v, H, "fixed", 64, blocksize=BS, num_verts=2, vertsize=1)
    torch.testing.assert_close(mod(q, k, v), want, rtol=1e-10, atol=1e-10)
    lay = make_layout(T, H, "local", 32, BS)
    torch.testing.assert_close(
        SparseAttention(H, lay, blocksize=BS)(q, k, v),
        attention_impl(q, k, v, H, "local", 32, blocksize=BS),
        rtol=1e-10,
        atol=1e-10,
    )


def test_self_attention_recompute_gives_equal_gradients():
    torch.manual_seed(0)
    x = torch.randn(B, T, H * D, dtype=torch.float64, requires_grad=True)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(1)
        layer = SparseSelfAttention(H * D, H, SPECS["merged-local-strided"], BS, recompute=recompute).double()
        y = layer(x)
        grads.append(torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["fixed", "heads-local-strided", "merged-group-fixed"])
def test_self_attention_kv_cache_equals_full_pass(name):
    torch.manual_seed(0)
    layer = SparseSelfAttention(H * D, H, SPECS[name], BS).double().eval()
    x = torch.randn(B, T, H * D, dtype=torch.float64)
    full = layer(x)
    cache = KVCache(1)
    parts = []
    for s, e in [(0, 37), (37, 38), (38, 100), (100, 128)]:
        parts.append(layer(x[:, s:e], cache=cache))
        cache.length = e
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_masked_attention_empty_rows_are_zero():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    out = masked_attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_paper_patterns_shapes():
    assert paper_patterns("dense") == [Mode("all")]
    inter = paper_patterns("strided", "interleaved", stride=128)
    assert inter == [Mode("local", 128), Mode("strided", 128)]
    assert paper_patterns("fixed", "merged", stride=128, c=64, blocksize=32) == [
        Mode("fixed", 128, num_verts=1, vertsize=2)
    ]
    assert isinstance(paper_patterns("strided", "heads")[0], PerHead)
    assert isinstance(paper_patterns("fixed", "interleaved")[0], Group)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="impl"):
        SparseAttention(H, "all", impl="cuda")
    with pytest.raises(ValueError, match="heads"):
        SparseAttention(0, "all")
    with pytest.raises(ValueError, match="Mode.mode"):
        Mode("diagonal")
    with pytest.raises(ValueError, match="local_attn_ctx"):
        SparseAttention(H, make_layout(T, H, "all", blocksize=BS), local_attn_ctx=32)
    with pytest.raises(ValueError, match="PerHead parts"):
        attend(*_qkv(), 3, PerHead(Mode("all"), Mode("local", 32)), BS)
    with pytest.raises(ValueError, match="Merged"):
        Merged(Mode("all"))
    with pytest.raises(TypeError, match="pattern"):
        SparseAttention(H, 3.5)
    with pytest.raises(ValueError, match="time=64"):
        attend(*_qkv(), H, Custom(make_layout(64, H, "all", blocksize=BS)), BS)
    with pytest.raises(ValueError, match="local_attn_ctx"):
        attend(*_qkv(), H, Mode("local", 24), BS)
    with pytest.raises(ValueError, match="factorization"):
        paper_patterns("strided", "mixed")
    with pytest.raises(ValueError, match="c \\(40\\)"):
        paper_patterns("fixed", c=40, blocksize=32)


def test_self_attention_compiles_without_graph_breaks():
    """After ``prepare``, ``torch.compile(fullgraph=True)`` traces the layer (layouts resolved and
    registered outside the trace); values and gradients equal eager mode."""
    torch.manual_seed(0)
    layer = SparseSelfAttention(32, 4, SPECS["heads-local-strided"], BS)
    layer.attn.prepare(T, "cpu")
    x = torch.randn(2, T, 32, requires_grad=True)
    eager = layer(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (g_comp,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_context_layout_is_one_layout_over_all_heads_or_a_clear_error():
    from sparse_attention.patterns import Group, Merged, Mode, PerHead
    from sparse_attention.torch.nn import context_layout

    lay = context_layout(Mode("local", 64), 256, 4, 16)
    assert lay.mode == "local" and lay.perm is None and lay.heads == 4
    assert context_layout(Mode("strided", 32), 256, 4, 16).perm is not None  # sharded in natural order
    merged = context_layout(Merged(Mode("local", 32), Mode("strided", 32)), 256, 4, 16)
    assert merged.perm is None and merged.heads == 4
    with pytest.raises(ValueError, match="token order"):
        context_layout(PerHead(Mode("local", 32), Mode("strided", 32)), 256, 4, 16)
    spec = PerHead(Group(64), Mode("fixed", 64, num_verts=1, vertsize=2))
    stacked = context_layout(spec, 256, 4, 16)
    i = np.arange(256)
    want = spec.mask(i, i, 4, 16)
    np.testing.assert_array_equal(stacked.to_dense(), np.broadcast_to(want, (4, 256, 256)))
    with pytest.raises(ValueError, match="impl='sparse'"):
        SparseAttention(4, "local", 64, impl="dense").context_parallel()


@pytest.mark.parametrize("impl", ["sparse", "dense", "sdpa"])
@pytest.mark.parametrize("spec", ["local", "merged", "fixed"])
def test_grouped_query_layer_equals_the_layer_with_repeated_heads(spec, impl):
    """``SparseSelfAttention(kv_heads=2)`` equals the ordinary layer whose key/value projection
    repeats each key/value head for its query heads (forward and the input's gradient)."""
    from sparse_attention.patterns import Merged, Mode
    from sparse_attention.torch.nn import SparseSelfAttention

    sp = {
        "local": Mode("local", 32),
        "merged": Merged(Mode("local", 32), Mode("strided", 32)),
        "fixed": Mode("fixed", 32, num_verts=2, vertsize=1),
    }[spec]
    torch.manual_seed(0)
    dim, H, HK, d = 64, 4, 2, 16
    gqa = SparseSelfAttention(dim, H, sp, blocksize=16, kv_heads=HK, impl=impl).double()
    full = SparseSelfAttention(dim, H, sp, blocksize=16, impl=impl).double()
    with torch.no_grad():
        w, b = gqa.qkv.weight, gqa.qkv.bias
        heads = torch.arange(H) // (H // HK)  # query head h reads key/value head h // 2
        rows = lambda base: (base + heads[:, None] * d + torch.arange(d)).reshape(-1)  # noqa: E731
        full.qkv.weight.copy_(torch.cat([w[:dim], w[rows(dim)], w[rows(dim + HK * d)]]))
        full.qkv.bias.copy_(torch.cat([b[:dim], b[rows(dim)], b[rows(dim + HK * d)]]))
        full.proj.load_state_dict(gqa.proj.state_dict())
    x = torch.randn(2, 128, dim, dtype=torch.float64, requires_grad=True)
    y = gqa(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().requires_grad_()
    y2 = full(x2)
    (gx2,) = torch.autograd.grad(y2.sum(), x2)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx2, rtol=1e-10, atol=1e-10)


def test_grouped_query_layer_errors_and_cache():
    from sparse_attention.torch.nn import KVCache, SparseSelfAttention

    with pytest.raises(ValueError, match="kv_heads must be a positive divisor"):
        SparseSelfAttention(64, 4, "all", kv_heads=3)
    layer = SparseSelfAttention(64, 4, "all", blocksize=16, kv_heads=2)
    cache = KVCache(1)  # generation with grouped heads: the cache holds the 2 key/value heads
    layer(torch.randn(1, 16, 64), cache=cache)
    assert cache.k[0].shape[1] == 2


DOC_SPECS = ("fixed", "local", "strided", "heads-local-strided", "merged-local-strided", "group")


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize("name", DOC_SPECS)
def test_packed_documents_equal_each_document_alone(name, impl):
    """``SparseAttention(...)(q, k, v, cu_seqlens=cu)`` equals the module on each document alone
    (an independent reference: the pattern restarts at every document), forward and gradients;
    the sparse path runs patterns of built-in modes, the merged ``local | strided`` head and a
    Group (``all`` on the documents cut into groups)."""
    spec, cu = SPECS[name], [0, 37, 38, 96, 128]
    mod = SparseAttention(H, spec, blocksize=BS, impl=impl)
    q, k, v = (x[:1] for x in _qkv(seed=3))
    got = mod(q, k, v, cu_seqlens=torch.tensor(cu))
    dense = SparseAttention(H, spec, blocksize=BS, impl="dense")

    def alone(a, b, c):
        # strided's stride must divide a sequence's own length: pad each document at its end
        # (a causal pattern reads no later key)
        outs = []
        for s, e in zip(cu[:-1], cu[1:]):
            part = [x[:, s:e] for x in (a, b, c)]
            pad = -(e - s) % 32
            part = [torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in part]
            outs.append(dense(*part)[:, : e - s])
        return torch.cat(outs, dim=1)

    want = alone(q, k, v)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w)


def test_self_attention_layer_on_packed_documents():
    """A layer on packed documents equals the layer on each document (its projections act per
    token); a cache or another impl with documents is refused."""
    layer = SparseSelfAttention(32, 4, Mode("fixed", 32, num_verts=2, vertsize=1), blocksize=16).double()
    x = torch.randn(1, 100, 32, dtype=torch.float64)
    cu = [0, 30, 31, 100]
    got = layer(x, cu_seqlens=cu)
    want = torch.cat([layer(x[:, s:e]) for s, e in zip(cu[:-1], cu[1:])], dim=1)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="not with a cache"):
        layer(x, KVCache(1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="impl 'sparse' or 'dense'"):
        SparseAttention(4, "local", 32, blocksize=16, impl="sdpa")(x, x, x, cu_seqlens=cu)


@pytest.mark.parametrize("spec", ["strided", "fixed", "merged-local-strided", "heads-local-strided"])
def test_compiled_layer_makes_no_copies(spec):
    """Under ``torch.compile`` the attention ops take the heads as strided views of the
    projections and give outputs and gradients in their memory order (the ops' fake tensors
    promise what the engines return), so the compiled forward and backward graphs hold no copy
    (clone) at all; dropout 0 is no clone either."""
    layer = SparseSelfAttention(128, 4, SPECS[spec], blocksize=BS)
    layer.attn.prepare(128, "cpu")
    x = torch.randn(1, 128, 128, requires_grad=True)
    graphs, y = compiled_graphs(layer, x)
    torch.testing.assert_close(y, layer(x))
    found = {
        name: [
            str(n.target)
            for n in gm.graph.nodes
            if n.op == "call_function" and ("clone" in str(n.target) or "copy" in str(n.target))
        ]
        for name, gm in graphs.items()
    }
    assert found == {"forward": [], "backward": []}
