"""The fused kernels' tile ranges against the one closed-form pattern (``sparse_attention.allowed``).

Small ``@triton.jit`` probes call the kernels' own helpers (``_row_bounds``, ``_summary_bounds``,
``_col_bounds``, ``_tok``, ``_summary_start``, ``_allowed``) for every tile at once and store what
they return; numpy then checks, on the dense pattern in block order, that

* rows (forward, dQ): each query tile's keys lie in ``[lo, hi)``, every key tile of ``[flo, fhi)``
  is allowed for every row (no mask needed), both as tight as the pattern allows and BN-aligned;
  ``fixed``'s virtual summary keys: ``[0, sf)`` all allowed, every allowed one below ``se``;
* columns (dK/dV): the same for each key tile's queries (BM-aligned), summary keys included;
* ``_allowed`` on positions equals ``allowed`` on the tokens ``_tok`` maps them to, and for
  ``fixed`` the local and the summary parts cover every allowed pair exactly once.

Causal patterns (the bidirectional ones are checked by their numerics, ``test_bidirectional.py``).
Runs in Triton's interpreter on a CPU-only machine (``_kernel_env`` sets it before Triton kernels
are defined), compiled on a GPU otherwise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from _kernel_env import INTERPRET
from _kernel_env import device as _device

triton = pytest.importorskip("triton")
tl = triton.language

from sparse_attention import allowed  # noqa: E402
from sparse_attention.torch.kernels import attention as K  # noqa: E402
from sparse_attention.torch.kernels import launch  # noqa: E402

MODE = {"all": K.MODE_ALL, "local": K.MODE_LOCAL, "strided": K.MODE_STRIDED, "fixed": K.MODE_FIXED}


@triton.jit
def _rows_probe(
    Out,
    T,
    NT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    P1,
    VSB: tl.constexpr,
):
    """Out [6, NT]: lo, flo, fhi, hi, sf, se of every query tile (padded to NT, a power of 2)."""
    m0 = tl.arange(0, NT) * BM
    keep = m0 < T
    lo, flo, fhi, hi = K._row_bounds(m0, T, BM, BN, MODE, P1, True, 0)
    sf, se, sa, sz = K._summary_bounds(m0, T, 0, BM, BN, P1, VSB, True)
    tl.store(Out + tl.arange(0, NT), lo, mask=keep)
    tl.store(Out + NT + tl.arange(0, NT), flo, mask=keep)
    tl.store(Out + 2 * NT + tl.arange(0, NT), fhi, mask=keep)
    tl.store(Out + 3 * NT + tl.arange(0, NT), hi, mask=keep)
    tl.store(Out + 4 * NT + tl.arange(0, NT), sf, mask=keep)
    tl.store(Out + 5 * NT + tl.arange(0, NT), se, mask=keep)


@triton.jit
def _cols_probe(
    Out,
    T,
    NKEYS,
    NT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    VSB: tl.constexpr,
):
    """Out [4, NT]: lo, flo, fhi, hi of every key tile (of ``NKEYS`` keys; virtual ones if SUMMARY)."""
    n0 = tl.arange(0, NT) * BN
    keep = n0 < NKEYS
    lo, flo, fhi, hi = K._col_bounds(n0, T, BM, BN, MODE, SUMMARY, P1, VSB, True)
    tl.store(Out + tl.arange(0, NT), lo, mask=keep)
    tl.store(Out + NT + tl.arange(0, NT), flo, mask=keep)
    tl.store(Out + 2 * NT + tl.arange(0, NT), fhi, mask=keep)
    tl.store(Out + 3 * NT + tl.arange(0, NT), hi, mask=keep)


@triton.jit(do_not_specialize=["P1", "P1M", "P1S"])  # as the kernels (K._div)
def _pairs_probe(
    QTok,
    KTok,
    Ok,
    h,
    VLO_A,
    VLO_C,
    VLO_NV,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
):
    """Tokens of the query positions [NQ] and key positions [NK] (virtual summary keys if SUMMARY),
    and ``_allowed`` of every (query, key) position pair [NQ, NK] as it is called in the row loops."""
    qp = tl.arange(0, NQ)
    kp = tl.arange(0, NK)
    vlo = 0
    if SUMMARY:
        vlo = K._summary_start(h, VLO_A, VLO_C, VLO_NV)
    tl.store(QTok + qp, K._tok(qp, MODE, False, P1, P1M, P1S, P1C, P2, VSB, 0))
    tl.store(KTok + kp, K._tok(kp, MODE, SUMMARY, P1, P1M, P1S, P1C, P2, VSB, vlo))
    ok = K._allowed(qp[:, None], kp[None, :], MODE, SUMMARY, P1, P1M, P1S, P1C, VSB, True)  # [NQ, NK]
    tl.store(Ok + qp[:, None] * NK + kp[None, :], ok.to(tl.int8))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _ceil(x, m):
    return -(-x // m) * m


class Case:
    """One pattern and tile shape, with the kernels' constants (as ``launch`` derives them)."""

    def __init__(self, mode, T, BM, BN, l=None, b=16, nv=1, vs=1, heads=1):
        self.mode, self.T, self.BM, self.BN, self.l, self.b, self.nv, self.vs = mode, T, BM, BN, l, b, nv, vs
        self.heads = heads
        self.P1, self.P2, self.VSB, self.NSUM = 1, 1, 1, 0
        self.VLO_A, self.VLO_C, self.VLO_NV = 0, 0, 1
        if mode == "local":
            self.P1 = l
        elif mode == "strided":
            self.P1, self.P2 = T // l, l
        elif mode == "fixed":
            s = l // b
            self.P1, self.VSB = l, vs * b
            self.NSUM = math.ceil(T / l) * vs * b
            # SEMANTICS.md: head h's summary blocks end at block s - 1 - (h % nv) * vs of each group
            self.VLO_A, self.VLO_C, self.VLO_NV = (s - vs) * b, vs * b, nv

    def __repr__(self):
        p = {"local": f"-L{self.l}", "strided": f"-l{self.l}", "all": ""}.get(self.mode)
        if p is None:
            p = f"-l{self.l}-b{self.b}-nv{self.nv}-vs{self.vs}-H{self.heads}"
        return f"{self.mode}-T{self.T}{p}-BM{self.BM}-BN{self.BN}"

    def tok(self, p):
        """Block-order position -> natural token (``strided`` is residue-major)."""
        if self.mode == "strided":
            n = self.T // self.l
            return (p % n) * self.l + p // n
        return p

    def vtok(self, v, h):
        """fixed: virtual summary key -> token (may be >= T in a last, partial group)."""
        vlo = self.VLO_A - (h % self.VLO_NV) * self.VLO_C
        return (v // self.VSB) * self.l + vlo + v % self.VSB

    def allowed(self, i, j, h):
        return allowed(i, j, h, self.mode, self.l, self.b, self.nv, self.vs)


CASES = [
    Case("all", 256, 64, 32),
    Case("all", 256, 32, 64),
    Case("all", 256, 16, 16),
    Case("local", 256, 64, 32, l=48),
    Case("local", 256, 32, 64, l=48),
    Case("local", 512, 64, 64, l=128),
    Case("local", 256, 16, 32, l=16),
    Case("strided", 512, 64, 32, l=8),
    Case("strided", 256, 32, 64, l=16),
    Case("strided", 512, 16, 16, l=4),
    Case("strided", 384, 32, 16, l=8),  # segments of 48: tiles start mid-segment and span two
    Case("strided", 384, 64, 32, l=4),
    Case("fixed", 256, 64, 32, l=64, b=16, nv=2, vs=1, heads=4),
    Case("fixed", 256, 32, 64, l=32, b=16, nv=2, vs=1, heads=2),
    Case("fixed", 512, 64, 64, l=64, b=16, nv=2, vs=2, heads=2),
    Case("fixed", 256, 64, 32, l=16, b=16, nv=1, vs=1, heads=1),
    Case("fixed", 512, 32, 16, l=128, b=32, nv=4, vs=1, heads=4),
    Case("fixed", 384, 64, 32, l=256, b=64, nv=2, vs=1, heads=2),  # a last, partial group
    Case("fixed", 384, 32, 16, l=48, b=16, nv=3, vs=1, heads=3),  # tiles span two groups
]
PARAMS = [pytest.param(c, id=repr(c)) for c in CASES]


@pytest.fixture(autouse=True)
def _kernel_target():
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (a CPU-only torch sets it)")


@functools.cache
def _probe(case: Case):
    """Everything the helpers return for ``case`` (numpy), computed once per case."""
    dev, c = _device(), case
    T, mode = c.T, MODE[c.mode]
    nt = _pow2(T // c.BM)
    rows = torch.full((6, nt), -1, dtype=torch.int32, device=dev)
    _rows_probe[(1,)](rows, T, nt, c.BM, c.BN, mode, c.P1, c.VSB)
    out = {"rows": rows.cpu().numpy()[:, : T // c.BM]}
    for summary, nkeys in ((False, T), (True, c.NSUM)):
        if nkeys == 0:
            continue
        ntiles = math.ceil(nkeys / c.BN)
        cols = torch.full((4, _pow2(ntiles)), -1, dtype=torch.int32, device=dev)
        _cols_probe[(1,)](cols, T, nkeys, _pow2(ntiles), c.BM, c.BN, mode, summary, c.P1, c.VSB)
        out["cols", summary] = cols.cpu().numpy()[:, :ntiles]
    for h in range(c.heads) if c.NSUM else [None]:
        for summary in (False, True) if h is not None else (False,):
            nq, nk = _pow2(T), _pow2(c.NSUM if summary else T)
            qtok = torch.full((nq,), -1, dtype=torch.int64, device=dev)
            ktok = torch.full((nk,), -1, dtype=torch.int64, device=dev)
            ok = torch.zeros((nq, nk), dtype=torch.int8, device=dev)
            args = (
                h or 0,
                c.VLO_A,
                c.VLO_C,
                c.VLO_NV,
                nq,
                nk,
                mode,
                summary,
                c.P1,
                *launch.magic_divisor(c.P1),
                c.P1 if c.mode in ("local", "fixed") else 0,  # P1C, as launch passes it
                c.P2,
                c.VSB,
            )
            _pairs_probe[(1,)](qtok, ktok, ok, *args)
            nkeys = c.NSUM if summary else T
            qtok, ktok, ok = qtok.cpu().numpy()[:T], ktok.cpu().numpy()[:nkeys], ok.cpu().numpy()[:T, :nkeys]
            out["pairs", h, summary] = (qtok, ktok, ok.astype(bool))
    return out


def _pattern(c: Case, h):
    """Dense allowed pairs in block order, split as the kernels split them: ``local [T, T]`` (the
    non-summary pass: everything but fixed's summary part) and, for fixed, ``summ [T, NSUM]`` over
    virtual summary keys (all False where the key's token is past the end)."""
    p = np.arange(c.T)
    tq = c.tok(p)
    full = c.allowed(tq[:, None], tq[None, :], h or 0)
    if c.mode != "fixed":
        return full, None, full
    local = full & (p[:, None] // c.l == p[None, :] // c.l)
    v = np.arange(c.NSUM)
    tv = c.vtok(v, h)
    summ = (tv[None, :] < c.T) & c.allowed(p[:, None], tv[None, :], h) & (tv[None, :] // c.l < p[:, None] // c.l)
    return local, summ, full


def _span(mask, align):
    """The aligned range ``[floor(first), ceil(last + 1))`` of the True entries of ``mask``."""
    idx = np.flatnonzero(mask)
    return (idx[0] // align * align, _ceil(idx[-1] + 1, align)) if idx.size else None


def _full_run(tile_is_full, lo, hi, align):
    """The longest run ``[a, b)`` of aligned tiles of ``[lo, hi)`` that need no mask (``None`` if
    there is none)."""
    best, start = None, None
    for t0 in [*range(lo, hi, align), hi]:
        full = t0 < hi and tile_is_full(t0)
        if full and start is None:
            start = t0
        elif not full and start is not None:
            if best is None or t0 - start > best[1] - best[0]:
                best = (start, t0)
            start = None
    return best


def _same_split(flo, fhi, run):
    """The kernels' full range ``[flo, fhi)`` is that run (anywhere, empty, if there is none)."""
    return fhi == flo if run is None else (flo, fhi) == run


@pytest.mark.parametrize("c", PARAMS)
def test_tok_and_allowed_match_the_closed_form(c):
    """``_tok`` maps positions to the tokens of the block order; ``_allowed`` on positions is the
    closed form on tokens; fixed's local and summary parts cover each allowed pair exactly once."""
    out = _probe(c)
    p = np.arange(c.T)
    for h in range(c.heads) if c.mode == "fixed" else [None]:
        local, summ, full = _pattern(c, h)
        qtok, ktok, ok = out["pairs", h, False]
        assert (qtok == c.tok(p)).all() and (ktok == c.tok(p)).all()
        assert sorted(qtok) == list(p), "block order must be a permutation of the tokens"
        np.testing.assert_array_equal(ok, local, err_msg=f"_allowed (head {h}) != allowed on tokens")
        if c.mode != "fixed":
            continue
        _, vtok, oks = out["pairs", h, True]
        v = np.arange(c.NSUM)
        assert (vtok == c.vtok(v, h)).all(), f"_tok of summary keys, head {h}"
        np.testing.assert_array_equal(oks, summ, err_msg=f"summary _allowed, head {h}")
        # each allowed pair exactly once: local part + the summary key that maps to its token
        count = local.astype(int)
        inside = vtok < c.T
        np.add.at(count.T, vtok[inside], oks[:, inside].T.astype(int))
        np.testing.assert_array_equal(count, full.astype(int), err_msg=f"fixed head {h}: pairs not covered once")
        assert summ.any(), "case too small to exercise the summary part"


@pytest.mark.parametrize("c", PARAMS)
def test_row_bounds_cover_each_query_tile(c):
    """Forward / dQ: query tile [m0, m0 + BM) walks masked [lo, flo), full [flo, fhi), masked
    [fhi, hi); fixed first walks full [0, sf) and masked [sf, se) of its virtual summary keys."""
    lo, flo, fhi, hi, sf, se = _probe(c)["rows"]
    heads = range(c.heads) if c.mode == "fixed" else [None]
    pats = [_pattern(c, h) for h in heads]
    for t, m0 in enumerate(range(0, c.T, c.BM)):
        at = f"query tile {m0}: lo, flo, fhi, hi = {lo[t], flo[t], fhi[t], hi[t]}"
        assert all(x % c.BN == 0 for x in (lo[t], flo[t], fhi[t], hi[t])), at
        assert 0 <= lo[t] <= flo[t] <= fhi[t] <= hi[t] <= c.T, at
        for local, summ, _ in pats:
            rows = local[m0 : m0 + c.BM]  # [BM, T]
            assert (lo[t], hi[t]) == _span(rows.any(0), c.BN), f"{at}: not the tight range of its keys"
            assert rows[:, flo[t] : fhi[t]].all(), f"{at}: a key of the full range is masked"
            tile_full = lambda n0, rows=rows: rows[:, n0 : n0 + c.BN].all()  # noqa: E731
            run = _full_run(tile_full, lo[t], hi[t], c.BN)
            assert _same_split(flo[t], fhi[t], run), f"{at}: full range not the full tiles {run}"
            if summ is None:
                continue
            srows = summ[m0 : m0 + c.BM]  # [BM, NSUM]
            sat = f"query tile {m0}: summary sf, se = {sf[t], se[t]}"
            assert sf[t] % c.BN == 0 and se[t] % c.BN == 0 and 0 <= sf[t] <= se[t], sat
            assert srows[:, : sf[t]].all(), f"{sat}: a key of the unmasked summary range is not allowed"
            assert sf[t] == (np.argmin(np.append(srows.all(0), False))) // c.BN * c.BN, f"{sat}: sf not maximal"
            span = _span(srows.any(0), c.BN)
            assert se[t] == (span[1] if span else 0), f"{sat}: se is not the end of the allowed summary keys"


@pytest.mark.parametrize("c", PARAMS)
def test_col_bounds_cover_each_key_tile(c):
    """dK/dV: key tile [n0, n0 + BN) walks query tiles [lo, hi) (one masked loop); [flo, fhi) are
    the query tiles allowed for every key of it. For fixed also over the virtual summary keys."""
    out = _probe(c)
    heads = range(c.heads) if c.mode == "fixed" else [None]
    pats = [_pattern(c, h) for h in heads]
    for summary in (False, True) if c.mode == "fixed" else (False,):
        lo, flo, fhi, hi = out["cols", summary]
        nkeys = c.NSUM if summary else c.T
        for t, n0 in enumerate(range(0, nkeys, c.BN)):
            at = f"{'summary ' if summary else ''}key tile {n0}: lo, flo, fhi, hi = {lo[t], flo[t], fhi[t], hi[t]}"
            assert all(x % c.BM == 0 for x in (lo[t], flo[t], fhi[t], hi[t])), at
            assert 0 <= lo[t] <= flo[t] <= fhi[t] <= hi[t] <= c.T, at
            for h, (local, summ, _) in zip(heads, pats):
                cols = (summ if summary else local)[:, n0 : n0 + c.BN]  # [T, <= BN]
                if summary:
                    # the kernel drops keys past the end (kvalid): the full range is full on the rest
                    cols = cols[:, c.vtok(np.arange(n0, n0 + cols.shape[1]), h) < c.T]
                span = _span(cols.any(1), c.BM)
                if span is None:
                    assert lo[t] == hi[t], f"{at}: no query sees these keys, the range must be empty"
                    continue
                assert (lo[t], hi[t]) == span, f"{at}: not the tight range of its queries"
                assert cols[flo[t] : fhi[t]].all(), f"{at}: a query of the full range is masked"
                tile_full = lambda m0, cols=cols: cols[m0 : m0 + c.BM].all()  # noqa: E731
                run = _full_run(tile_full, lo[t], hi[t], c.BM)
                assert _same_split(flo[t], fhi[t], run), f"{at}: full range not the full tiles {run}"
