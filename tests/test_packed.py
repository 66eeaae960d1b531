"""Packed documents (``cu_seqlens``): one sequence of ``batch`` 1 holding documents of any
lengths; each attends only within itself, its pattern restarted at its own first token. The
layouts against the closed form on document positions, every engine against the library's calls
on each document alone (an independent reference) and against float64 dense attention, forward
and the three gradients."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference, fwd_bwd
from _kernel_env import device as _device
from _kernel_env import launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)

import sparse_attention as sa
from sparse_attention.layouts import packed_layout
from sparse_attention.modes import document_mask, validate_pattern
from sparse_attention.torch.dispatch import EagerAttention
from sparse_attention.torch.reference import masked_attention, merge_heads, split_heads

MODES = {
    "all": {},
    "local": dict(local_attn_ctx=32),
    "strided": dict(local_attn_ctx=8),
    "fixed": dict(local_attn_ctx=32, num_verts=2, vertsize=1),
}
DOCS = {
    "one": [0, 100],
    "two-unaligned": [0, 37, 100],
    "tiny-and-long": [0, 5, 6, 50, 130, 131],
    "aligned": [0, 16, 48, 96],
    # documents of one length: a batch of them (a view); 20 tokens: strided's 8 does not divide it
    "equal": [0, 48, 96, 144],
    "equal-unaligned": [0, 20, 40, 60],
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("mode", list(MODES) + ["fixed-vs2", "strided-l40"])
def test_layout_is_the_closed_form_per_document(mode, docs, causal):
    kw = {"fixed-vs2": dict(local_attn_ctx=64, num_verts=2, vertsize=2), "strided-l40": dict(local_attn_ctx=40)}.get(
        mode, MODES.get(mode)
    )
    mode = mode.split("-")[0]
    cu = DOCS[docs]
    lay = packed_layout(cu, 4, mode, blocksize=16, causal=causal, **kw)
    p = validate_pattern(cu[-1], 4, mode, blocksize=16, causal=causal, documents=True, **kw)
    want = document_mask({**p, "cu_seqlens": cu}, 4)
    assert (np.broadcast_to(lay.to_dense(), want.shape) == want).all()
    # no enabled block without an allowed pair (work is skipped for such blocks), in the
    # layout's block order (strided: each document's residue classes, one segment each)
    blocks = lay.block_layout()
    nb = lay.nb
    if lay.perm is not None:
        want = np.broadcast_to(want, (4, *want.shape[-2:]))[:, lay.perm][:, :, lay.perm]
    padded = np.zeros((4, nb * 16, nb * 16), bool)
    padded[:, : cu[-1], : cu[-1]] = want
    pairs = padded.reshape(4, nb, 16, nb, 16).any(axis=(2, 4))
    assert (blocks == pairs).all()


def _per_document(fn, H, mode, kw, cu, causal):
    """``fn`` (a public call) run on each document alone, outputs concatenated."""

    def call(q, k, v):
        outs = []
        for a, b in zip(cu[:-1], cu[1:]):
            part = [x[:, a:b] for x in (q, k, v)]
            n = b - a
            if mode == "strided" and n % kw["local_attn_ctx"] and not causal:
                # bidirectional: padding would add keys; the document's own mask from the closed form
                p = validate_pattern(n, H, mode, blocksize=16, causal=False, documents=True, **kw)
                mask = torch.from_numpy(document_mask({**p, "cu_seqlens": [0, n]}, H)).to(q.device)
                heads = [split_heads(x, H) for x in part]
                outs.append(merge_heads(masked_attention(*heads, mask, dtype=q.dtype)))
            elif mode == "strided" and n % kw["local_attn_ctx"]:
                # strided's stride must divide the length of a sequence of its own: the document
                # padded at its end (causal patterns read no later key, so it changes nothing)
                pad = -n % kw["local_attn_ctx"]
                part = [torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in part]
                outs.append(fn(*part, H, mode, blocksize=16, causal=causal, **kw)[:, :n])
            else:
                outs.append(fn(*part, H, mode, blocksize=16, causal=causal, **kw))
        return torch.cat(outs, dim=1)

    return call


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fn", [sa.attention_impl, sa.blocksparse_attention_impl], ids=["dense", "blocksparse"])
def test_public_calls_equal_each_document_alone(fn, mode, docs, kv_heads):
    """Causal: the packed call equals the call on each document alone (forward and gradients);
    on the CPU the blocksparse call runs the block gather."""
    H, D, cu = 4, 16, DOCS[docs]
    T = cu[-1]
    g = torch.Generator().manual_seed(len(cu))
    q, do = (torch.randn(1, T, H * D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, T, kv_heads * D, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _per_document(sa.attention_impl, H, mode, MODES[mode], cu, True)

    def packed(a, b, c):
        return fn(a, b, c, H, mode, blocksize=16, cu_seqlens=cu, **MODES[mode])

    check_against_reference(packed, q, k, v, do, ref=ref)


@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("mode", list(MODES))
def test_bidirectional_documents(mode, docs):
    """``causal=False`` with documents: against dense attention under the document mask."""
    H, D, cu = 4, 16, DOCS[docs]
    T = cu[-1]
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    p = validate_pattern(T, H, mode, blocksize=16, causal=False, documents=True, **MODES[mode])
    mask = torch.from_numpy(document_mask({**p, "cu_seqlens": cu}, H))

    def call(a, b, c):
        cols = [merge_heads(x) for x in (a, b, c)]
        y = sa.blocksparse_attention_impl(*cols, H, mode, blocksize=16, causal=False, cu_seqlens=cu, **MODES[mode])
        return split_heads(y, H)

    check_against_reference(call, q, k, v, do, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_kernels_on_documents(launch, mode, causal, dtype):
    """The kernels' custom path on a packed layout (NaN-poisoned outputs), grouped heads."""
    cu = DOCS["tiny-and-long"]
    lay = packed_layout(cu, 4, mode, blocksize=16, causal=causal, **MODES[mode])
    g = torch.Generator().manual_seed(4)
    T = cu[-1]
    q, do = (torch.randn(1, 4, T, 32, generator=g).to(_device(), dtype) for _ in range(2))
    k, v = (torch.randn(1, 2, T, 32, generator=g).to(_device(), dtype) for _ in range(2))
    mask = torch.from_numpy(lay.to_dense()).to(q.device)

    def ref(a, b, c):
        return masked_attention(a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1), mask, dtype=a.dtype)

    fn = lambda a, b, c: EagerAttention.apply(a, b, c, launch.forward, launch.backward, lay)  # noqa: E731
    check_against_reference(fn, q, k, v, do, ref=ref, floor=1e-4)


DOCUMENT_MODES = {
    "all": {},
    "local": dict(local_attn_ctx=32),
    # strided: documents' residue classes of unequal lengths (l = 8), and of at most 2 (l = 40)
    "strided": dict(local_attn_ctx=8),
    "strided-l40": dict(local_attn_ctx=40),
    "fixed": dict(local_attn_ctx=32, num_verts=2, vertsize=1),
    "fixed-vs2": dict(local_attn_ctx=64, num_verts=2, vertsize=2),
}


def _pattern(T, H, mode, causal, kw):
    """The layout naming the pattern of packed documents (strided's at T rounded up to its stride)."""
    from sparse_attention.frontend import document_pattern

    a = (kw.get(x) for x in ("local_attn_ctx", "num_verts", "vertsize"))
    ctx, nv, vs = a
    return document_pattern(T, H, mode, ctx, 16, nv, vs, causal)


def _check_kernels_on_documents(launch, mode, kw, cu, H, kv_heads, D, causal, seed, dtype=torch.float32):
    """The built-in kernels on packed documents ``cu`` (``launch.DocumentTable``) against float64
    attention under the packed layout's mask, forward and gradients (outputs NaN-poisoned: a
    program that skips its tile fails); grouped heads. Returns the documents' table."""
    T, G = cu[-1], H // kv_heads
    pattern = _pattern(T, H, mode, causal, kw)
    assert launch.closed_form(pattern) is not None
    lay = packed_layout(cu, H, mode, blocksize=16, causal=causal, **kw)
    mask = torch.from_numpy(lay.to_dense()).to(_device())
    table = launch.documents(np.asarray(cu, np.int64), _device())
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, H, T, D, generator=g).to(_device(), dtype) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, T, D, generator=g).to(_device(), dtype) for _ in range(2))

    def ref(a, b, c):
        return masked_attention(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1), mask, dtype=a.dtype)

    def fn(a, b, c):
        return EagerAttention.apply(a, b, c, launch.forward, launch.backward, pattern, table)

    check_against_reference(fn, q, k, v, do, ref=ref, floor=1e-4)
    return table


@pytest.mark.parametrize(
    "dtype,D", [(torch.float32, 32), (torch.float16, 24)], ids=["fp32-D32", "fp16-D24"]
)  # fmt: skip
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("docs", ["tiny-and-long", "two-unaligned", "one", "aligned"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", list(DOCUMENT_MODES))
def test_kernels_run_the_pattern_per_document(launch, mode, causal, docs, kv_heads, dtype, D):
    """The built-in kernels on packed documents (``launch.DocumentTable``): each document a sequence
    of its own length, positions relative to its first token, causal or bidirectional, against
    float64 attention under the packed layout's mask (outputs NaN-poisoned: a program that skips
    its tile fails); grouped heads with fixed's summary classes (2 patterns, groups of 2 and 4
    heads)."""
    kw = DOCUMENT_MODES[mode]
    cu = DOCS[docs]
    table = _check_kernels_on_documents(
        launch, mode.split("-")[0], kw, cu, 4, kv_heads, D, causal, len(cu) + kv_heads, dtype
    )
    assert (table.count, table.align) == (len(cu) - 1, int(np.gcd.reduce(np.diff(cu))))


@pytest.mark.parametrize("split", [None, True, False], ids=["split-auto", "split", "one-loop"])
@pytest.mark.parametrize("doc_rows", [True, False], ids=["per-position", "per-document"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["all", "local"])
def test_documents_per_position_and_per_document(launch, monkeypatch, mode, causal, doc_rows, split):
    """all and local on packed documents both ways (tiles of the whole row with each position's
    document bounds, or per-document work lists), with the full tiles split off or not (the
    narrowed bounds of the full tiles), against float64 under the packed layout's mask."""
    monkeypatch.setattr(launch, "DOC_ROWS", doc_rows)
    monkeypatch.setattr(launch, "SPLIT_OVERRIDE", split)
    _check_kernels_on_documents(launch, mode, DOCUMENT_MODES[mode], DOCS["tiny-and-long"], 4, 2, 32, causal, 11)


@pytest.mark.parametrize("split", [True, False], ids=["split", "one-loop"])
@pytest.mark.parametrize("causal", [True, False])
def test_strided_documents_with_padded_residue_classes(launch, monkeypatch, causal, split):
    """strided per document: each document's residue classes padded to one length, the short
    ones ending in a position without a token. Long classes (64 positions: full tiles when split
    off), one ending exactly at a tile edge with its hole (the full tiles must stop before it),
    then a document of one token; against float64 under the packed layout's mask."""
    monkeypatch.setattr(launch, "SPLIT_OVERRIDE", split)
    table = _check_kernels_on_documents(
        launch, "strided", dict(local_attn_ctx=2), [0, 127, 200, 201], 2, 1, 16, causal, 12
    )
    assert table.tail_free(2) == 1 and table.positions(2).tolist() == [128, 74, 2]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", list(DOCUMENT_MODES))
def test_public_call_runs_documents_on_the_kernels(launch, mode, causal, monkeypatch):
    """Mixed lengths through the public call take the document-aware kernels (no packed layout
    is built) and equal each document alone, forward and gradients, with q, k, v as column views
    of one packed projection; here the fused engine is chosen by hand (CPU tensors run the
    interpreter), on the GPU it is the default."""
    import sparse_attention.frontend as fe
    from sparse_attention.torch import dispatch

    kw = DOCUMENT_MODES[mode]
    mode = mode.split("-")[0]
    monkeypatch.setattr(dispatch, "choose_engine", lambda *a, **k: 0)
    monkeypatch.setattr(fe, "packed_layout", lambda *a, **k: pytest.fail("a packed layout was built"))
    H, D, cu = 4, 16, DOCS["tiny-and-long"]
    T = cu[-1]
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, T, 3 * H * D, generator=g).to(_device())
    do = torch.randn(1, T, H * D, generator=g).to(_device())
    q, k, v = (qkv[..., i * H * D : (i + 1) * H * D] for i in range(3))
    ref = _per_document(sa.attention_impl, H, mode, kw, cu, causal)

    def packed(a, b, c):
        return sa.blocksparse_attention_impl(a, b, c, H, mode, blocksize=16, causal=causal, cu_seqlens=cu, **kw)

    got = check_against_reference(packed, q, k, v, do, ref=ref, floor=1e-4)
    assert got[0].stride() == (T * H * D, H * D, 1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_bhtd_documents_equal_the_public_call(mode, causal):
    """``blocksparse_attention_bhtd(..., cu_seqlens=)``: a built-in mode's layout run on each
    document equals the public call, forward and gradients; strided's layout is at the packed
    length rounded up to its stride (which need not divide it), and at the packed length refused."""
    from sparse_attention.torch import blocksparse_attention_bhtd

    H, D, cu = 4, 16, DOCS["tiny-and-long"]
    T = cu[-1]
    kw = dict(MODES[mode])
    at = T
    if mode == "strided":
        l = kw["local_attn_ctx"]
        assert T % l, "the case: a stride that does not divide the packed length"
        at = -(-T // l) * l
    lay = sa.make_layout(at, H, mode, blocksize=16, causal=causal, **kw)
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (torch.randn(1, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))

    def public(a, b, c):
        y = sa.blocksparse_attention_impl(
            *(merge_heads(x) for x in (a, b, c)), H, mode, blocksize=16, causal=causal, cu_seqlens=cu, **kw
        )
        return split_heads(y, H)

    got = fwd_bwd(lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay, cu_seqlens=torch.tensor(cu)), q, k, v, do)
    for x, r in zip(got, fwd_bwd(public, q, k, v, do)):
        torch.testing.assert_close(x, r)
    if mode == "strided":
        with pytest.raises(ValueError, match="a multiple of the stride"):
            blocksparse_attention_bhtd(q, k, v, sa.make_layout(at + l, H, mode, blocksize=16, **kw), cu_seqlens=cu)


def test_bhtd_documents_under_torch_compile():
    """Under ``torch.compile(fullgraph=True)`` the documents' boundaries are a tensor argument of
    the ops: batches of other documents (same count) run the one compiled graph, each equal to
    the eager call, forward and gradients."""
    from torch._dynamo.utils import counters

    from sparse_attention.torch import blocksparse_attention_bhtd

    H, T = 4, 131
    lay = sa.make_layout(T, H, "fixed", blocksize=16, causal=False, **MODES["fixed"])
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, H, T, 16, generator=g, dtype=torch.float64) for _ in range(4))

    def f(a, b, c, cu):
        return torch.tanh(blocksparse_attention_bhtd(a, b, c, lay, cu_seqlens=cu))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for cu in ([0, 5, 6, 50, 130, 131], [0, 40, 41, 42, 100, 131], [0, 1, 2, 3, 100, 131]):
        cut = torch.tensor(cu)
        got = fwd_bwd(lambda a, b, c, cut=cut: compiled(a, b, c, cut), q, k, v, do)
        want = fwd_bwd(lambda a, b, c, cu=cu: f(a, b, c, cu), q, k, v, do)
        for x, r in zip(got, want):
            torch.testing.assert_close(x, r)
    assert counters["stats"]["unique_graphs"] == 1


def test_bhtd_document_errors():
    from sparse_attention.torch import blocksparse_attention_bhtd

    x = torch.randn(1, 2, 96, 16)
    lay = sa.make_layout(96, 2, "local", local_attn_ctx=32, blocksize=16)
    with pytest.raises(ValueError, match="must end at time"):
        blocksparse_attention_bhtd(x, x, x, lay, cu_seqlens=[0, 50, 90])
    with pytest.raises(ValueError, match="batch must be 1"):
        y = x.expand(2, -1, -1, -1)
        blocksparse_attention_bhtd(y, y, y, lay, cu_seqlens=[0, 50, 96])
    with pytest.raises(ValueError, match="built-in mode"):
        blocksparse_attention_bhtd(x, x, x, packed_layout([0, 50, 96], 2, "local", 32, 16), cu_seqlens=[0, 50, 96])


def test_work_lists_name_every_tile_once():
    """The documents' work lists: every (document, tile) inside a document exactly once, ordered
    by tile index (the kernels' heaviest-first order of causal tiles), and fixed's summary pass
    over each document's ceil(length / l) groups of virtual keys."""
    from sparse_attention.torch.kernels import launch

    cu = np.array([0, 5, 6, 50, 130, 131, 400])
    docs = launch.DocumentTable(cu, "cpu")
    lens = np.diff(cu)
    for tile, group, keys in ((16, 0, 0), (64, 0, 0), (32, 64, 16)):
        items, n = docs.work(tile, group, keys)
        items = items.numpy()
        per_doc = lens if not group else -(-lens // group) * keys
        want = {(d, t) for d in range(len(lens)) for t in range(-(-per_doc[d] // tile))}
        assert n == len(items) == len(want) and {tuple(x) for x in items} == want
        assert (np.diff(items[:, 1]) >= 0).all()


def test_document_bounds_per_position_and_the_kernels_choice(monkeypatch):
    """``all`` and ``local`` run packed documents on tiles of the whole row with each position's
    document bounds (``DocumentTable.bounds``: first token, end), ``fixed`` per document from
    work lists; the bounds are exact at every boundary."""
    from sparse_attention.torch.kernels import launch

    cu = np.array([0, 5, 6, 50, 130, 131, 400])
    b = launch.DocumentTable(cu, "cpu").bounds.numpy()
    pos = np.arange(400)
    d = np.searchsorted(cu, pos, side="right") - 1
    assert b.shape == (2, 400) and b.dtype == np.int32
    assert (b[0] == cu[d]).all() and (b[1] == cu[d + 1]).all() and (b[0] <= pos).all() and (pos < b[1]).all()
    q = torch.empty(1, 2, 400, 32)
    for mode, kw, rows in (
        ("all", {}, True),
        ("local", dict(local_attn_ctx=32), True),
        ("fixed", dict(local_attn_ctx=32, num_verts=1, vertsize=1), False),
    ):
        for causal in (True, False):
            lay = sa.make_layout(400, 2, mode, blocksize=16, causal=causal, **kw)
            p = launch._Plan(lay, q)
            assert p.doc_rows is rows
            for on in (True, False):
                monkeypatch.setattr(launch, "DOC_ROWS", on)
                want = dict(DOCS=2, time=400) if rows and on else dict(DOCS=1, time=1)
                assert launch._documents(p, 400, launch.DocumentTable(cu, "cpu")) == want


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("docs", ["two-unaligned", "equal"])
def test_tensorflow_documents(mode, docs):
    tf = pytest.importorskip("tensorflow")
    H, D, cu = 4, 16, DOCS[docs]
    T = cu[-1]
    x = [np.random.RandomState(i).randn(1, T, H * D) for i in range(3)]
    want = sa.attention_impl(*(torch.from_numpy(a) for a in x), H, mode, blocksize=16, cu_seqlens=cu, **MODES[mode])
    for fn in (sa.attention_impl, sa.blocksparse_attention_impl):
        got = fn(*(tf.constant(a) for a in x), H, mode, blocksize=16, cu_seqlens=np.array(cu), **MODES[mode])
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-10)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(cu_seqlens=[0, 50, 99]), ValueError, "must end at time"),
        (dict(cu_seqlens=[0, 60, 50, 100]), ValueError, "increase strictly"),
        (dict(cu_seqlens=[5, 100]), ValueError, "start at 0"),
        (dict(cu_seqlens=[0.0, 100.0]), TypeError, "integers"),
        (dict(cu_seqlens=[[0, 100]]), ValueError, "1-D"),
    ],
)
def test_document_errors(kw, exc, match):
    x = torch.randn(1, 100, 32)
    for fn in (sa.attention_impl, sa.blocksparse_attention_impl):
        with pytest.raises(exc, match=match):
            fn(x, x, x, 2, "local", local_attn_ctx=32, blocksize=16, **kw)


def test_documents_need_batch_one_and_a_mode():
    x = torch.randn(2, 100, 32)
    with pytest.raises(ValueError, match="batch must be 1"):
        sa.blocksparse_attention_impl(x, x, x, 2, "all", blocksize=16, cu_seqlens=[0, 50, 100])
    lay = sa.make_layout(100, 2, "all", blocksize=16)
    with pytest.raises(ValueError, match="packed_layout"):
        sa.blocksparse_attention_impl(x[:1], x[:1], x[:1], 2, lay, cu_seqlens=[0, 50, 100])


def test_layouts_made_per_batch_are_not_kept():
    """A training loop builds a layout per batch of documents: eager calls do not put them in the
    custom-op registry (which keeps what it holds), so they go when the caller drops them."""
    from sparse_attention.torch import dispatch

    x = torch.randn(1, 96, 32)
    before = len(dispatch._REGISTRY)
    for cut in range(20, 60):
        lay = packed_layout([0, cut, 96], 2, "local", local_attn_ctx=32, blocksize=16)
        sa.blocksparse_attention_impl(x, x, x, 2, lay)
        del lay
    sa.layouts._packed_layout.cache_clear()
    gc.collect()
    assert len(dispatch._REGISTRY) == before


def test_packed_layout_under_torch_compile():
    """Registered once, a layout of packed documents runs under ``torch.compile(fullgraph=True)``;
    unregistered, the compiled call says what to do."""
    from sparse_attention.torch import blocksparse_attention_bhtd, register_layout

    lay = packed_layout([0, 40, 96], 2, "local", local_attn_ctx=32, blocksize=16)
    g = torch.Generator().manual_seed(9)
    q, k, v, do = (torch.randn(1, 2, 96, 16, generator=g, dtype=torch.float64) for _ in range(4))
    f = torch.compile(lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="register_layout"):
        f(q, k, v)
    register_layout(lay)
    check_against_reference(f, q, k, v, do, mask=torch.from_numpy(lay.to_dense()))


@pytest.mark.parametrize("mode", list(MODES))
def test_documents_of_one_length_run_as_a_batch(mode, monkeypatch):
    """Documents of one length are a batch of them: no packed layout is built, the pattern runs at
    their length on a view, and the result is the batch call's; a length the pattern refuses
    (strided's stride must divide it) runs per document (the packed layout only on the block
    gather path, here on the CPU: not the front end's)."""
    import sparse_attention.frontend as fe

    built = []
    monkeypatch.setattr(fe, "packed_layout", lambda *a, **k: built.append(a) or packed_layout(*a, **k))
    H, D = 4, 16
    for cu, n in (([0, 48, 96, 144], 48), ([0, 20, 40, 60], 20)):
        T = cu[-1]
        q, k, v = (torch.randn(1, T, H * D, dtype=torch.float64) for _ in range(3))
        got = sa.blocksparse_attention_impl(q, k, v, H, mode, blocksize=16, cu_seqlens=cu, **MODES[mode])
        refuses = mode == "strided" and n % MODES[mode]["local_attn_ctx"]
        assert not built
        if not refuses:
            batch = [x.view(len(cu) - 1, n, -1) for x in (q, k, v)]
            want = sa.blocksparse_attention_impl(*batch, H, mode, blocksize=16, **MODES[mode])
            assert torch.equal(got, want.view(1, T, -1))
        built.clear()


@pytest.mark.parametrize("causal", [True, False])
def test_packed_strided_is_block_sparse(causal):
    """Packed ``strided`` runs in each document's residue-major order, where each residue class
    is one dense segment: a few blocks per row (natural order would enable nearly every block
    below the diagonal)."""
    cu = [0, 5000, 5001, 9000, 16384]
    lay = packed_layout(cu, 1, "strided", 128, blocksize=128, causal=causal)
    assert lay.perm is not None and sorted(lay.perm.tolist()) == list(range(16384))
    assert lay.nnz <= 3 * lay.nb


def test_remembered_documents_follow_their_values():
    """The public call remembers its resolution per value of ``cu_seqlens`` (a list or numpy
    array): another batch of documents of the same count, or the same list changed in place,
    gets its own."""
    import sparse_attention.frontend as fe

    H, D, T = 2, 16, 96
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, T, H * D, generator=g, dtype=torch.float64) for _ in range(3))
    kw = dict(local_attn_ctx=32, blocksize=16)
    cu = [0, 40, 96]
    for boundaries in (cu, [0, 70, 96], np.array([0, 40, 96])):
        got = sa.blocksparse_attention_impl(q, k, v, H, "local", cu_seqlens=boundaries, **kw)
        want = _per_document(sa.attention_impl, H, "local", dict(local_attn_ctx=32), list(boundaries), True)(q, k, v)
        torch.testing.assert_close(got, want)
    cu[1] = 10  # changed in place
    got = sa.blocksparse_attention_impl(q, k, v, H, "local", cu_seqlens=cu, **kw)
    torch.testing.assert_close(
        got, _per_document(sa.attention_impl, H, "local", dict(local_attn_ctx=32), cu, True)(q, k, v)
    )
    assert any(key[-1] is not None for key in fe._RESOLVED)
    with pytest.raises(TypeError, match="integers"):
        sa.blocksparse_attention_impl(q, k, v, H, "local", cu_seqlens=[0, 40.0, 96], **kw)


@pytest.mark.parametrize("docs", ["tiny-and-long", "two-unaligned", "aligned"])
def test_group_heads_on_documents_run_all_on_the_kernels(launch, monkeypatch, docs):
    """A ``patterns.Group(l)`` head on packed documents (the paper's fixed A1: the earlier tokens of
    the query's own group of ``l``, counted from each document's start) runs causal ``all`` on the
    documents cut into groups, on the fused kernels; against float64 attention under the closed
    form on each document's relative positions, forward and gradients, grouped heads."""
    from sparse_attention.patterns import Group
    from sparse_attention.torch import dispatch

    monkeypatch.setattr(dispatch, "choose_engine", lambda *a, **k: 0)
    H, kv_heads, D, l = 4, 2, 16, 32
    cu = np.asarray(DOCS[docs], np.int64)
    T = int(cu[-1])
    T16 = -(-T // 16) * 16
    if T16 != T:  # a Group needs time divisible by blocksize: one more document of padding
        cu = np.append(cu, T16)
        T = T16
    lay = Group(l).layout(T, H, 16)
    pos = np.arange(T)
    doc = np.searchsorted(cu, pos, side="right") - 1
    rel = pos - cu[doc]
    allowed = Group(l).allowed(rel[:, None], rel[None, :], 0, H, 16) & (doc[:, None] == doc[None, :])
    mask = torch.from_numpy(np.broadcast_to(allowed, (H, T, T)).copy()).to(_device())
    g = torch.Generator().manual_seed(int(cu.size))
    q, do = (torch.randn(1, H, T, D, generator=g).to(_device()) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, T, D, generator=g).to(_device()) for _ in range(2))

    def ref(a, b, c):
        return masked_attention(a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1), mask, dtype=a.dtype)

    def fn(a, b, c):
        return dispatch.document_attention_bhtd(a, b, c, lay, torch.from_numpy(cu))

    check_against_reference(fn, q, k, v, do, ref=ref, floor=1e-4)


def test_split_documents_cuts_each_document_from_its_start():
    from sparse_attention.layouts import split_documents

    assert split_documents(np.array([0, 37, 38, 96, 128]), 32).tolist() == [0, 32, 37, 38, 70, 96, 128]
    assert split_documents(np.array([0, 64]), 32).tolist() == [0, 32, 64]
