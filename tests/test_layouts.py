"""Layouts against independent closed forms (numpy only)."""

import time

import numpy as np
import pytest

from sparse_attention import custom_layout, dense_mask, from_dense, make_layout
from sparse_attention.layouts import packed_layout, validate_pattern


def brute_force(T, H, mode, L=None, b=None, nv=None, vs=None):
    """SEMANTICS.md's table, element by element with Python integers (independent of layouts.py)."""
    m = np.zeros((H, T, T), bool)
    for h in range(H):
        for i in range(T):
            for j in range(i + 1):
                if mode == "all":
                    ok = True
                elif mode == "local":
                    ok = i - j < L
                elif mode == "strided":
                    ok = (i - j) % L == 0
                else:
                    s = L // b
                    verts = {s - 1 - (h % nv) * vs - t for t in range(vs)}
                    ok = i // L == j // L or (j // b) % s in verts
                m[h, i, j] = ok
    return m


@pytest.mark.parametrize(
    "T,H,mode,L,b,nv,vs",
    [
        (128, 1, "all", None, 16, None, None),
        (128, 2, "local", 32, 16, None, None),
        (96, 1, "local", 16, 16, None, None),
        (128, 1, "strided", 8, 16, None, None),
        (144, 1, "strided", 12, 16, None, None),
        (128, 4, "fixed", 64, 16, 4, 1),
        (128, 4, "fixed", 64, 16, 2, 2),
        (192, 2, "fixed", 32, 16, 1, 1),
    ],
)
def test_closed_form_matches_brute_force(T, H, mode, L, b, nv, vs):
    assert np.array_equal(dense_mask(T, H, mode, L, b, nv, vs), brute_force(T, H, mode, L, b, nv, vs))


def _cases():
    out = []
    for b in (16, 32, 64, 128):
        for nb in (4, 8, 32):
            T = b * nb
            if T > 4096:
                continue
            out.append((T, 2, "all", None, b, None, None))
            for w in (1, 2, 3):
                out.append((T, 2, "local", w * b, b, None, None))
            for stride in sorted({1, 2, 3, 8, nb, T // 4, T}):
                if T % stride == 0:
                    out.append((T, 1, "strided", stride, b, None, None))
            for s in (1, 2, 4, 8):
                for nv in (1, 2, 4):
                    for vs in (1, 2, 4):
                        if s % vs == 0 and nv * vs <= s and s * b <= T:
                            out.append((T, 4, "fixed", s * b, b, nv, vs))
    out.append((4096, 8, "fixed", 128, 32, 4, 1))
    out.append((4096, 2, "strided", 64, 16, None, None))
    return out


@pytest.mark.parametrize("T,H,mode,L,b,nv,vs", _cases(), ids=lambda x: str(x))
def test_layout_tables_match_closed_form(T, H, mode, L, b, nv, vs):
    lay = make_layout(T, H, mode, L, b, nv, vs)
    ref = dense_mask(T, H, mode, L, b, nv, vs)
    assert np.array_equal(lay.to_dense(), ref)
    # partial flags are exact: a full entry's mask is all True, a partial one is not; none is empty
    rows = lay.entry_rows()
    for p in range(lay.n_patterns):
        e = np.arange(lay.row_ptr[p, 0], lay.row_ptr[p, -1])
        m = lay.entry_masks(p, rows[e], lay.cols[e])
        assert np.array_equal(m.all(axis=(1, 2)), ~lay.partial[e])
        assert m.any(axis=(1, 2)).all()
    # columns ascend within each row
    same_row = np.diff(rows) == 0
    assert np.all(np.diff(lay.cols.astype(np.int64))[same_row] > 0)
    if mode != "strided":  # natural order: the block layout is the max-pool of the dense mask
        bl = ref.reshape(H, T // b, b, T // b, b).any(axis=(2, 4))
        assert np.array_equal(lay.block_layout(), bl)


@pytest.mark.parametrize("T,H,mode,L,b,nv,vs", _cases()[::7], ids=lambda x: str(x))
def test_transposed_tables(T, H, mode, L, b, nv, vs):
    lay = make_layout(T, H, mode, L, b, nv, vs)
    bl = lay.block_layout()
    col_ptr, rows, entry = lay.col_table()
    for h in range(H):
        p = lay.head_pattern[h]
        for c in range(lay.nb):
            sl = slice(col_ptr[p, c], col_ptr[p, c + 1])
            assert np.array_equal(rows[sl], np.nonzero(bl[h][:, c])[0])
            assert np.all(lay.cols[entry[sl]] == c)


def test_fixed_example_from_semantics():
    # time=1024, blocksize=32, l=128, num_verts=4, vertsize=1: head 0 sees block 3 of each
    # earlier group of 4, head 1 block 2, head 2 block 1, head 3 block 0.
    lay = make_layout(1024, 4, "fixed", 128, 32, 4, 1)
    bl = lay.block_layout()
    for h, v in enumerate([3, 2, 1, 0]):
        row = bl[h, 31]  # last query block, group 7
        earlier = np.nonzero(row[:28])[0]
        assert np.array_equal(earlier, np.arange(7) * 4 + v)
        assert row[28:32].all()


def test_per_head_patterns_are_shared():
    lay = make_layout(1024, 8, "fixed", 128, 32, 4, 1)
    assert lay.n_patterns == 4
    assert np.array_equal(lay.head_pattern, [0, 1, 2, 3, 0, 1, 2, 3])


def test_custom_layout_with_callback_and_empty_row():
    nb, b, H = 6, 16, 2
    lay = np.tril(np.ones((H, nb, nb), int))
    lay[1, 2] = 0  # head 1, query block 2: no key block at all
    calls = []

    def cb(shape, h, qi, ki, bi):
        calls.append((h, qi, ki, bi))
        m = np.ones(shape, bool)
        if qi == ki:
            m = np.tril(m)
        if h == 0 and qi == 4:
            m[3] = False  # one query row of head 0 with no key in this block
        return m

    L = custom_layout(lay, b, cb)
    assert len(calls) == lay.sum()
    # blk_idx counts the enabled blocks of each head in row-major order
    for h in range(H):
        assert [c[3] for c in calls if c[0] == h] == list(range(lay[h].sum()))
    dense = L.to_dense()
    assert dense.shape == (H, nb * b, nb * b)
    assert not dense[1, 2 * b : 3 * b].any()
    assert np.array_equal(from_dense(dense, b).to_dense(), dense)
    # a full-block callback leaves no mask behind
    assert custom_layout(lay, b).block_masks.shape[0] == 0


def test_from_dense_roundtrip_random():
    rng = np.random.default_rng(1)
    m = rng.random((3, 128, 128)) < 0.03
    lay = from_dense(m, 32)
    assert np.array_equal(lay.to_dense(), m)
    assert np.array_equal(lay.block_layout(), m.reshape(3, 4, 32, 4, 32).any(axis=(2, 4)))


def test_two_dimensional_layout_shared_by_heads():
    L = custom_layout(np.tril(np.ones((4, 4), int)), 16, heads=3)
    assert L.heads == 3 and L.n_patterns == 1


def test_million_token_layouts_build_fast():
    T = 1 << 20
    for mode, kw in [
        ("local", dict(local_attn_ctx=128)),
        ("strided", dict(local_attn_ctx=1024)),
        ("fixed", dict(local_attn_ctx=128, num_verts=4, vertsize=1)),
        ("all", {}),
    ]:
        make_layout.cache_clear()
        t0 = time.perf_counter()
        lay = make_layout(T, 8, mode, blocksize=32, **kw)
        assert lay.nnz > 0
        assert time.perf_counter() - t0 < 5.0, mode
        # nothing of size nb * nb or time * time was built
        sizes = [a.nbytes for a in (lay.row_lo, lay.row_hi, lay.prefix_cols, lay.prefix_len)]
        assert max(sizes) < 8 * T
        cols, valid, _ = lay.padded_rows(0, lay.nb - 4, lay.nb)
        assert valid.sum() == lay.row_counts()[0, -4:].sum()


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(attn_mode="nope"), ValueError, "unknown attn_mode"),
        (dict(attn_mode=3), TypeError, "attn_mode"),
        (dict(attn_mode="local"), ValueError, "local_attn_ctx is required"),
        (dict(attn_mode="local", local_attn_ctx=40), ValueError, "multiple of blocksize"),
        (dict(attn_mode="local", local_attn_ctx=0), ValueError, "positive"),
        (dict(attn_mode="local", local_attn_ctx=32.0), TypeError, "must be an int"),
        (dict(attn_mode="strided", local_attn_ctx=100), ValueError, "must divide time"),
        (dict(attn_mode="fixed", local_attn_ctx=128, num_verts=3, vertsize=1), ValueError, "multiple of num_verts"),
        (dict(attn_mode="fixed", local_attn_ctx=128, num_verts=1, vertsize=3), ValueError, "vertsize"),
        (dict(attn_mode="fixed", local_attn_ctx=128, num_verts=4, vertsize=2), ValueError, "num_verts \\* vertsize"),
        (dict(attn_mode="fixed", local_attn_ctx=100, num_verts=1, vertsize=1), ValueError, "multiple of blocksize"),
        (dict(attn_mode="fixed", local_attn_ctx=128, vertsize=1), ValueError, "num_verts is required"),
        (dict(attn_mode="all", blocksize=24), ValueError, "power of two"),
        (dict(attn_mode="all", blocksize=8), ValueError, ">= 16"),
        (dict(attn_mode="strided", local_attn_ctx=7, time=1000), ValueError, "must divide time"),
    ],
)
def test_pattern_errors(kw, exc, match):
    args = dict(time=1024, heads=4, blocksize=32)
    args.update(kw)
    with pytest.raises(exc, match=match):
        validate_pattern(**args)


def test_custom_layout_errors():
    with pytest.raises(ValueError, match="shape"):
        custom_layout(np.ones((4, 5)), 16)
    with pytest.raises(ValueError, match="only 0 and 1"):
        custom_layout(np.full((4, 4), 2), 16)
    with pytest.raises(TypeError, match="callback"):
        custom_layout(np.ones((4, 4), int), 16, callback=3)
    with pytest.raises(ValueError, match="callback returned shape"):
        custom_layout(np.ones((4, 4), int), 16, callback=lambda *a: np.ones((3, 3), bool))


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fixed.png"
    make_layout(512, 4, "fixed", 128, 32, 4, 1).plot(path)
    assert path.stat().st_size > 1000


def test_csr_layout_roundtrip_and_errors():
    from sparse_attention import csr_layout

    rng = np.random.default_rng(2)
    ref = custom_layout(rng.random((2, 6, 6)) < 0.5, 16, callback=lambda s, h, q, k, e: rng.random(s) < 0.7)
    lay = csr_layout(ref.row_ptr, ref.cols, 16, ref.head_pattern, ref.mask_idx, ref.block_masks)
    assert np.array_equal(lay.to_dense(), ref.to_dense())
    rp = np.array([[0, 1, 3]])
    with pytest.raises(ValueError, match="row_ptr must start at 0"):
        csr_layout(np.array([[1, 1, 3]]), [0, 0, 1], 16, [0])
    with pytest.raises(ValueError, match="cols must have shape"):
        csr_layout(rp, [0, 1], 16, [0])
    with pytest.raises(ValueError, match="cols must lie in"):
        csr_layout(rp, [0, 0, 2], 16, [0])
    with pytest.raises(ValueError, match="ascending"):
        csr_layout(rp, [0, 1, 0], 16, [0])
    with pytest.raises(ValueError, match="head_pattern"):
        csr_layout(rp, [0, 0, 1], 16, [1])
    with pytest.raises(ValueError, match="mask_idx"):
        csr_layout(rp, [0, 0, 1], 16, [0], mask_idx=[0, -1, -1])


def test_stack_heads_puts_patterns_side_by_side():
    from sparse_attention.layouts import stack_heads

    rng = np.random.default_rng(0)
    blocks = np.tril(rng.random((8, 8)) < 0.5) | np.eye(8, dtype=bool)
    custom = custom_layout(blocks.astype(int), 16, callback=lambda shape, h, q, k, e: rng.random(shape) < 0.7, heads=1)
    parts = [
        (0, 2, make_layout(128, 2, "local", local_attn_ctx=48, blocksize=16)),
        (2, 1, custom),
        (3, 3, make_layout(128, 3, "fixed", local_attn_ctx=64, blocksize=16, num_verts=3, vertsize=1)),
    ]
    stacked = stack_heads(parts)
    want = np.concatenate([lay.to_dense() for _, _, lay in parts])
    np.testing.assert_array_equal(stacked.to_dense(), want)
    assert stacked.heads == 6 and stacked.n_patterns == 2 + 1 + 3 - 1  # local shares one pattern
    with pytest.raises(ValueError, match="consecutive heads"):
        stack_heads(parts[:1] + parts[2:])
    with pytest.raises(ValueError, match="natural token order"):
        stack_heads([(0, 1, make_layout(128, 1, "strided", local_attn_ctx=8, blocksize=16))])


def _random_custom(T, heads, b, seed):
    rng = np.random.default_rng(seed)
    m = (rng.random((heads, T, T)) < 0.4) & np.tril(np.ones((T, T), bool))
    m[:, rng.integers(T)] = False  # a row with no key
    return from_dense(m, b)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _random_custom(192, 2, 16, 0), id="random-perhead-b16"),
        pytest.param(lambda: _random_custom(256, 3, 64, 1), id="random-perhead-b64"),
        pytest.param(
            lambda: packed_layout([0, 37, 100, 250, 333], 2, "fixed", 64, 32, num_verts=2, vertsize=1),
            id="packed-fixed-tail",
        ),
        pytest.param(lambda: packed_layout([0, 130], 1, "local", 128, blocksize=128), id="packed-b128-tail"),
        pytest.param(lambda: make_layout(256, 2, "strided", 32, blocksize=16, causal=False), id="bidirectional-perm"),
    ],
)
@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_retile_keeps_every_pair(make, b):
    """``retile`` to a coarser or finer block: the same pairs, token order and heads; no block
    without a pair; full blocks carry no mask."""
    from sparse_attention.layouts import retile

    lay = make()
    r = retile(lay, b)
    assert (r.blocksize, r.time, r.heads) == (b, lay.time, lay.heads)
    assert r.perm is lay.perm
    np.testing.assert_array_equal(r.to_dense(), lay.to_dense())
    for p in range(r.n_patterns):  # every entry holds a pair; a mask only where not full
        e = np.arange(r.row_ptr[p, 0], r.row_ptr[p, -1])
        m = r.entry_masks(p, None, None, e)
        assert m.reshape(len(e), -1).any(axis=1).all()
        has = r.mask_idx[e] >= 0
        assert not m[has].reshape(int(has.sum()), -1).all(axis=1).any()


def test_retile_errors():
    from sparse_attention.layouts import retile

    with pytest.raises(ValueError, match="built-in mode"):
        retile(make_layout(64, 1, "local", 16, blocksize=16), 32)
    with pytest.raises(ValueError, match="power-of-two multiple or divisor"):
        retile(_random_custom(96, 1, 32, 0), 48)


def test_builtin_pattern_names_causal_and_bidirectional_layouts():
    """``builtin_pattern``: the mode, parameters (with the pattern's blocksize) and direction of a
    built-in layout, causal or bidirectional (also retiled); None for other custom layouts."""
    from sparse_attention.layouts import builtin_pattern, packed_layout, retile

    kw = dict(local_attn_ctx=64, num_verts=2, vertsize=1)
    mode, p, causal = builtin_pattern(make_layout(256, 4, "fixed", blocksize=16, **kw))
    assert (mode, p["blocksize"], p["local_attn_ctx"], causal) == ("fixed", 16, 64, True)
    bidir = make_layout(256, 4, "fixed", blocksize=16, causal=False, **kw)
    assert builtin_pattern(bidir)[0::2] == ("fixed", False)
    assert builtin_pattern(retile(bidir, 32))[1]["blocksize"] == 16
    assert builtin_pattern(packed_layout([0, 100, 256], 4, "fixed", blocksize=16, **kw)) is None
    assert builtin_pattern(packed_layout([0, 100, 256], 4, "fixed", blocksize=16, causal=False, **kw)) is None


def test_mask_table_keeps_each_mask_once_in_first_seen_order():
    """``tables.MaskTable``: one copy of each distinct mask, indexed in the order first seen
    across calls; full masks get -1 (or, with ``full=None``, an index); seeds come first."""
    from sparse_attention.tables import MaskTable

    rng = np.random.default_rng(0)
    a, b_, c = (rng.random((4, 4)) < 0.5 for _ in range(3))
    full = np.ones((4, 4), bool)
    t = MaskTable(4)
    assert t.add(np.stack([b_, full, a, b_])).tolist() == [0, -1, 1, 0]
    assert t.add(np.stack([c, a])).tolist() == [2, 1]
    assert t.add(np.zeros((0, 4, 4), bool)).tolist() == []
    assert np.array_equal(t.stack(), np.stack([b_, a, c]))
    seeded = MaskTable(4, seed=[np.zeros((4, 4), bool), full])
    assert seeded.add(np.stack([a, full]), full=None).tolist() == [2, 1]
    assert MaskTable(4).stack().shape == (0, 4, 4)
