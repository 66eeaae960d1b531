"""Fused block-sparse attention in Triton: forward, dQ (which also stores delta) and dK/dV kernels.

Flash-attention style: each program owns one tile of queries (forward, dQ) or keys (dK/dV), walks
only the key (query) tiles its pattern enables, keeps an online softmax in float32 and never
builds a ``time x time`` buffer. No atomics: dK/dV walk key-tile columns, dQ walks query-tile
rows, so reruns are bitwise equal.

Built-in modes need no lookup tables: each program derives its tile range from the pattern's
closed form (SEMANTICS.md, the same pattern the layout's structured rows describe) and evaluates
the exact in-block rule on positions in the kernel. Where a range is long (``SPLIT``), *full*
tiles (no mask inside) run in their own unmasked loop and only the edge tiles (diagonal, band or
segment edges) pay for the mask; short ranges (e.g. ``local`` with L=128) and all dK/dV loops run
as one masked loop, which pipelines better (and, for dK/dV, keeps ptxas from serialising the
wgmma chain, warning C7515). Positions are in block order: ``strided`` loads its rows through the
residue-major permutation ``token = (pos % n) * l + pos // n`` (``n = time / l``), so each
residue class is a causal segment of ``n`` positions and no copy of q, k, v is made. The
pattern's period ``P1`` (``n`` for ``strided``, the window or group length otherwise) is a
runtime argument, not a compile-time constant, so one compilation serves every ``time``.

``fixed`` splits its pairs in two disjoint parts: the *local* part (same group of ``l`` tokens,
causal) and the *summary* part (summary block of an earlier group). The summary keys of a head
are gathered into a dense virtual key sequence ``v -> (v // c) * l + vlo + v % c`` (``c =
vertsize * blocksize``), so a query tile reads them as full 64/128-wide tiles whatever the
blocksize; the backward pass runs dK/dV once per part (the second adds the first's float32
partial sums of the summary keys, kept in a small buffer, so each gradient is rounded once).

Not ``CAUSAL``: the bidirectional modes, the same closed form with the keys after the query
(whole segments and groups; ``fixed`` also walks the later groups' summary keys, in full tiles
and then the tile that ``time`` cuts, whose keys past it the masked loops drop).

Packed documents, two ways. ``DOCS == 1`` (every mode): the program's sequence is a document
of the one batch row; it takes its (document, tile) from the work list ``WORK`` (only tiles
inside documents), offsets its pointers by the document's first token ``cu[d]`` and runs the
closed form on the document's own positions with its length as ``time`` (:func:`_work_item`,
:func:`_sequence`); the statistics (log-sum-exp, delta) keep the batch row's layout. ``strided``
pads each document's ``l`` residue classes to one length ``n = ceil(length / l)`` (its divisor
and magic numbers per document from ``DIVS``, :func:`_periods`), so that the one-divisor token
map holds; the short classes end in a position without a token, which :func:`_valid` masks. ``DOCS ==
2`` (``all`` and ``local`` with ``launch.DOC_ROWS``: patterns of ``i - j`` alone, the same on a
document's own positions and on the row's): tiles of the whole row, as without documents, and
each position's document bounds from ``WORK`` (``[2, time]`` int32: the document's first token,
its end), which join the masks and narrow the ranges of ``all`` and of full tiles
(:func:`_doc_bounds`, :func:`_doc_row_bounds`): a tile that straddles two documents serves both,
so short documents cost no tile of their own.

Custom layouts run with tiles of one layout block and walk the CSR tables (``row_ptr, cols,
mask_idx`` per pattern for forward/dQ, the transposed ``col_table`` for dK/dV); partial blocks
apply their boolean mask from ``block_masks``.

Offsets are 64-bit (``time`` up to 2**20 and beyond); scores use ``exp2`` with the softmax scale
folded into ``qk_scale = log2(e) / sqrt(head_dim)``; the log-sum-exp is kept in base 2. A row with
no allowed key gets output 0 and ``lse = +inf``, so the backward pass gives it zero gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_ALL = 0
MODE_LOCAL = 1
MODE_STRIDED = 2
MODE_FIXED = 3
MODE_CUSTOM = 4
MODE_IDS = {"all": MODE_ALL, "local": MODE_LOCAL, "strided": MODE_STRIDED, "fixed": MODE_FIXED, "custom": MODE_CUSTOM}


@triton.jit
def _div(x, P1M, P1S, P1C: tl.constexpr):
    """``x // P1`` for int32 ``0 <= x < 2**31``. ``P1C``: the period as a compile-time constant
    where it does not depend on ``time`` (``local``'s window, ``fixed``'s group: no
    recompilation, and a constant divisor compiles to shifts or a multiply); 0 for ``strided``
    (``n = time / l``), which divides by a multiply-high with the runtime divisor's magic numbers
    (``launch.magic_divisor``), so that one compilation serves every ``time``. The kernels list
    ``P1M``, ``P1S`` in ``do_not_specialize``: Triton would make a value of 1 a constant."""
    if P1C > 0:
        q = x // P1C
    else:
        xu = x.to(tl.uint32)
        q = ((tl.umulhi(xu, P1M.to(tl.uint32)) + xu) >> P1S.to(tl.uint32)).to(tl.int32)
    return q


@triton.jit
def _tok(
    pos,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    vlo,
):
    """Natural token index (int64) of block-order positions (or of virtual summary keys)."""
    if SUMMARY:
        # fixed: virtual summary key -> its group start + the head's first summary token + offset
        t = (pos // VSB).to(tl.int64) * P1C + vlo + pos % VSB  # fixed: P1C == P1 == l
    elif MODE == 2:
        # strided, residue-major: P1 = n = time / l positions per residue class, P2 = l
        seg = _div(pos, P1M, P1S, P1C)
        t = (pos - seg * P1).to(tl.int64) * P2 + seg
    else:
        t = pos.to(tl.int64)
    return t


@triton.jit
def _custom_tok(pos, PERM, T, HAS_PERM: tl.constexpr):
    """Custom layouts: the token (int64) of block-order positions, through the layout's ``PERM``
    table where it has one (e.g. bidirectional ``strided``, residue-major); a position past time
    reads token 0, which every such load and store masks by position."""
    if HAS_PERM:
        t = tl.load(PERM + pos, mask=pos < T, other=0).to(tl.int64)
    else:
        t = pos.to(tl.int64)
    return t


@triton.jit
def _summary_start(h, VLO_A, VLO_C, VLO_NV):
    """fixed: the first summary token of head ``h`` (int64); the layout's closed form, see
    ``launch.device_tables``."""
    return (VLO_A - (h % VLO_NV) * VLO_C).to(tl.int64)


@triton.jit
def _work_item(tile, r, WORK, DOCS: tl.constexpr):
    """``(tile, sequence)`` of this program: its grid position, or with packed documents
    (``DOCS``) its entry of the work list ``WORK`` (``[n, 2]`` int32: document, tile), which names
    only tiles that lie in a document (no program runs past a short document's end)."""
    if DOCS == 1:
        r = tl.load(WORK + 2 * tile)
        tile = tl.load(WORK + 2 * tile + 1)
    return tile, r


@triton.jit
def _sequence(r, T, CU, DOCS: tl.constexpr):
    """``(b, t0, n)`` of sequence ``r`` (the grid's second axis over heads): batch row ``r``
    (``b = r``, first token 0, length ``T``), or with packed documents (``DOCS``) document ``r``
    of the one sequence (batch 0, its first token ``cu[r]``, its length ``cu[r + 1] - cu[r]``).
    Positions are relative to ``t0``: the pattern restarts at every document's first token.
    (``DOCS == 2``: the batch row; documents are per position, :func:`_doc_bounds`.)"""
    if DOCS == 1:
        start = tl.load(CU + r)
        n = tl.load(CU + r + 1) - start
        b = (r * 0).to(tl.int64)
        t0 = start.to(tl.int64)
    else:
        b = r.to(tl.int64)
        t0 = (r * 0).to(tl.int64)
        n = T
    return b, t0, n


@triton.jit
def _periods(seq, P1, P1M, P1S, DIVS, MODE: tl.constexpr, DOCS: tl.constexpr):
    """``(P1, P1M, P1S)`` of sequence ``seq``: the launch's, or for ``strided`` on packed
    documents (``DOCS == 1``) the document's own ``n = ceil(length / l)`` and its magic numbers
    (``DIVS``: ``[n_docs, 3]`` int64, ``launch.DocumentTable.divisors``)."""
    if MODE == 2 and DOCS == 1:
        P1 = tl.load(DIVS + 3 * seq).to(tl.int32)
        P1M = tl.load(DIVS + 3 * seq + 1)
        P1S = tl.load(DIVS + 3 * seq + 2).to(tl.int32)
    return P1, P1M, P1S


@triton.jit
def _positions(TN, P1, P2: tl.constexpr, MODE: tl.constexpr, DOCS: tl.constexpr):
    """The block-order positions of a sequence of ``TN`` tokens: ``TN``, or for ``strided`` on
    packed documents ``P1 * l`` (``l`` residue classes of ``n = ceil(TN / l)`` positions each;
    the classes with fewer tokens end in a *hole*, a position without a token, see
    :func:`_valid`)."""
    TP = TN
    if MODE == 2 and DOCS == 1:
        TP = P1 * P2
    return TP


@triton.jit
def _valid(pos, tok, TN, P1, P2: tl.constexpr, MODE: tl.constexpr, DOCS: tl.constexpr):
    """Which positions hold a token of the sequence (``TN`` tokens): those before its end, or for
    ``strided`` on packed documents, whose residue classes are padded to one length ``n``, those
    before ``n * l`` whose token is before ``TN`` (the holes at the ends of the short classes
    hold none)."""
    if MODE == 2 and DOCS == 1:
        ok = (pos < P1 * P2) & (tok < TN)
    else:
        ok = pos < TN
    return ok


@triton.jit
def _doc_bounds(pos, T, BOUNDS):
    """``DOCS == 2``: ``(first token, end)`` of each position's document (``BOUNDS``: ``[2, T]``
    int32); a position past ``T`` takes the last token's."""
    p = tl.minimum(pos, T - 1)
    return tl.load(BOUNDS + p), tl.load(BOUNDS + T + p)


@triton.jit
def _doc_row_bounds(lo, flo, fhi, hi, m0, T, BOUNDS, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """``DOCS == 2``: :func:`_row_bounds` of the query tile [m0, m0 + BM) narrowed to its rows'
    documents: keys from the first row's document on; full tiles only where every key lies in
    every row's document. Documents are in order, so the first and last rows' bounds are the
    extremes (scalar loads, no reduction over the tile)."""
    first = tl.minimum(m0, T - 1)
    last = tl.minimum(m0 + BM - 1, T - 1)
    lo = tl.maximum(lo, tl.load(BOUNDS + first) // BN * BN)
    flo = tl.maximum(flo, (tl.load(BOUNDS + last) + BN - 1) // BN * BN)
    if not CAUSAL:
        hi = tl.minimum(hi, tl.load(BOUNDS + T + last))
        fhi = tl.minimum(fhi, tl.load(BOUNDS + T + first) // BN * BN)
    fhi = tl.minimum(tl.maximum(fhi, lo), hi)
    flo = tl.minimum(tl.maximum(flo, lo), fhi)
    return lo, flo, fhi, hi


@triton.jit
def _same_doc(ok, qpos, kpos, ds, de, CAUSAL: tl.constexpr):
    """``ok`` and key ``kpos`` in the document of query ``qpos`` (``[ds, de)``), as broadcast
    (``ds``, ``de`` shaped like ``qpos``); causal patterns need only the first token."""
    ok = ok & (kpos >= ds)
    if not CAUSAL:
        ok = ok & (kpos < de)
    return ok


@triton.jit
def _allowed(
    qp,
    kp,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    VSB: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """The in-block rule on positions ``qp [M, 1]`` / ``kp [1, N]`` (or transposed); not
    ``CAUSAL``: the bidirectional mode (SEMANTICS.md), on keys before and after the query."""
    if SUMMARY:
        if CAUSAL:
            ok = kp // VSB < _div(qp, P1M, P1S, P1C)
        else:  # every other group's summary keys (the own group's are in the local part)
            ok = kp // VSB != _div(qp, P1M, P1S, P1C)
    elif MODE == 0:
        if CAUSAL:
            ok = kp <= qp
        else:
            ok = (kp >= 0) & (qp >= 0)
    elif MODE == 1:
        if CAUSAL:
            ok = (kp <= qp) & (qp - kp < P1)
        else:
            ok = (qp - kp < P1) & (kp - qp < P1)
    else:
        # strided (segments of n positions) and fixed's local part (groups of l tokens)
        ok = _div(qp, P1M, P1S, P1C) == _div(kp, P1M, P1S, P1C)
        if CAUSAL:
            ok = ok & (kp <= qp)
    return ok


@triton.jit
def _row_bounds(
    m0, T, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr, P1, CAUSAL: tl.constexpr, DOCS: tl.constexpr
):
    """Key positions of the query tile [m0, m0 + BM): masked [lo, flo), full [flo, fhi), masked
    [fhi, hi). (Causal full tiles lie before the query tile in its segment: never a hole, which
    ends a segment.)"""
    if not CAUSAL:
        return _row_bounds_bidirectional(m0, T, BM, BN, MODE, P1, MODE == 2 and DOCS == 1)
    hi = tl.minimum((m0 + BM + BN - 1) // BN * BN, T)
    fhi = (m0 + 1) // BN * BN
    if MODE == 1:
        lo = tl.maximum(m0 - P1 + 1, 0) // BN * BN
        flo = (tl.maximum(m0 + BM - P1, 0) + BN - 1) // BN * BN
    elif MODE == 0:
        lo = m0 * 0
        flo = m0 * 0
    else:
        seg0 = m0 // P1 * P1
        lo = seg0 // BN * BN
        same = (m0 + BM - 1) // P1 == m0 // P1
        flo = tl.where(same, (seg0 + BN - 1) // BN * BN, hi)
    fhi = tl.maximum(fhi, lo)
    flo = tl.minimum(tl.maximum(flo, lo), fhi)
    return lo, flo, fhi, hi


@triton.jit
def _row_bounds_bidirectional(m0, T, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr, P1, HOLES: tl.constexpr):
    """:func:`_row_bounds` of the bidirectional modes: keys after the query tile too; full tiles
    end before the tile that ``T`` cuts (whose keys past ``T`` the masked loops drop), and with
    ``HOLES`` (strided per document) before the segment's last position, which may hold no
    token."""
    tfull = T // BN * BN
    if MODE == 1:  # |i - j| < L
        lo = tl.maximum(m0 - P1 + 1, 0) // BN * BN
        hi = tl.minimum(m0 + BM - 1 + P1, T)
        flo = (tl.maximum(m0 + BM - P1, 0) + BN - 1) // BN * BN
        fhi = tl.minimum((m0 + P1) // BN * BN, tfull)
    elif MODE == 0:
        lo = m0 * 0
        flo = m0 * 0
        fhi = tfull + m0 * 0
        hi = T + m0 * 0
    else:  # the segments (groups) of the tile's rows, whole
        seg0 = m0 // P1 * P1
        seg1 = ((m0 + BM - 1) // P1 + 1) * P1
        lo = seg0 // BN * BN
        hi = tl.minimum(seg1, T)
        same = (m0 + BM - 1) // P1 == m0 // P1
        flo = tl.where(same, (seg0 + BN - 1) // BN * BN, hi)
        send = seg1
        if HOLES:
            send = seg1 - 1
        fhi = tl.where(same, tl.minimum(send // BN * BN, tfull), hi)
    fhi = tl.maximum(fhi, lo)
    flo = tl.minimum(tl.maximum(flo, lo), fhi)
    return lo, flo, fhi, hi


@triton.jit
def _summary_bounds(m0, T, vlo, BM: tl.constexpr, BN: tl.constexpr, P1, VSB: tl.constexpr, CAUSAL: tl.constexpr):
    """fixed: the virtual summary keys (``VSB`` per group of ``P1`` tokens) of the query tile
    [m0, m0 + BM): full [0, sf) (the groups before the tile's first group), masked [sf, se) (up to
    its last group); bidirectional, also the later groups' keys: full [se, sa) (those wholly
    before ``T``), masked [sa, sz) (the last ones, cut by ``T``)."""
    g0 = m0 // P1
    g1 = (m0 + BM - 1) // P1
    sf = g0 * VSB // BN * BN
    if CAUSAL:
        se = (g1 * VSB + BN - 1) // BN * BN
        sa = se
        sz = se
    else:
        se = ((g1 + 1) * VSB + BN - 1) // BN * BN
        whole = tl.maximum(T - vlo - VSB + P1, 0) // P1 * VSB  # groups whose summary keys are all < T
        sa = tl.maximum(se, whole // BN * BN)
        sz = tl.maximum(sa, (T + P1 - 1) // P1 * VSB)
    return sf, se, sa, sz


@triton.jit
def _col_bounds(
    n0,
    T,
    BM: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    VSB: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Query positions of the key tile [n0, n0 + BN): masked [lo, flo), full [flo, fhi), masked
    [fhi, hi); bidirectional: [lo, hi) only (the dK/dV loops mask every tile)."""
    if not CAUSAL:
        if SUMMARY or MODE == 0:  # every query (fixed: the own group's masked)
            lo = n0 * 0
            hi = T + n0 * 0
        elif MODE == 1:
            lo = tl.maximum(n0 - P1 + 1, 0) // BM * BM
            hi = tl.minimum(n0 + BN - 1 + P1, T)
        else:
            lo = n0 // P1 * P1 // BM * BM
            hi = tl.minimum(((n0 + BN - 1) // P1 + 1) * P1, T)
        return lo, lo, lo, hi
    if SUMMARY:
        lo = tl.minimum((n0 // VSB + 1) * P1 // BM * BM, T)
        flo = ((n0 + BN - 1) // VSB + 1) * P1
        flo = (flo + BM - 1) // BM * BM
        hi = T + n0 * 0
        fhi = T + n0 * 0
    else:
        lo = n0 // BM * BM
        # the first query tile whose rows all come at or after the tile's last key
        flo = (n0 + BN - 1 + BM - 1) // BM * BM
        if MODE == 0:
            hi = T + n0 * 0
            fhi = T + n0 * 0
        elif MODE == 1:
            hi = tl.minimum((n0 + BN + P1 - 1 + BM - 1) // BM * BM, T)
            fhi = (n0 + P1) // BM * BM
        else:
            sa = n0 // P1
            sb = (n0 + BN - 1) // P1
            hi = tl.minimum(((sb + 1) * P1 + BM - 1) // BM * BM, T)
            fhi = tl.where(sa == sb, (sa + 1) * P1 // BM * BM, lo)
    fhi = tl.maximum(tl.minimum(fhi, hi), lo)
    flo = tl.minimum(tl.maximum(flo, lo), fhi)
    return lo, flo, fhi, hi


@triton.jit
def _load_rows(base, tok, stride_t, offs_d, rmask, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr, HEAD_D: tl.constexpr):
    ptrs = base + tok[:, None] * stride_t + offs_d[None, :]
    if MASK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=rmask[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows(ptrs, x, rmask, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr, HEAD_D: tl.constexpr, offs_d):
    """Store ``x [rows, BLOCK_D]`` at ``ptrs``, the rows of ``rmask`` only where ``MASK_ROWS``."""
    if MASK_ROWS:
        if PAD_D:
            tl.store(ptrs, x, mask=rmask[:, None] & (offs_d[None, :] < HEAD_D))
        else:
            tl.store(ptrs, x, mask=rmask[:, None])
    else:
        if PAD_D:
            tl.store(ptrs, x, mask=offs_d[None, :] < HEAD_D)
        else:
            tl.store(ptrs, x)


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k, v, ok, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    # [BM, BN] scores in base 2
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with nothing allowed so far keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _key_tile(
    k_base,
    v_base,
    skt,
    svt,
    n0,
    T,
    vlo,
    offs_d,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    MASKED: tl.constexpr,
    PAD_D: tl.constexpr,
    HEAD_D: tl.constexpr,
    TAIL: tl.constexpr,
    DOCS: tl.constexpr,
):
    """The key tile at block-order position ``n0`` of the forward's and dQ's key loops: ``(kpos,
    k, v, rmask)``, k and v ``[BN, BLOCK_D]`` with the rows that hold no token (``rmask`` false)
    read as 0 where they can occur."""
    kpos = n0 + tl.arange(0, BN)
    ktok = _tok(kpos, MODE, SUMMARY, P1, P1M, P1S, P1C, P2, VSB, vlo)
    # rows past time: fixed's virtual summary keys of the last group, or the tail tile of a
    # time that is not a multiple of the tile (TAIL; a position >= T has no token)
    if SUMMARY:
        rmask = ktok < T
    else:
        rmask = _valid(kpos, ktok, T, P1, P2, MODE, DOCS)
    mrows: tl.constexpr = (MASKED and SUMMARY) or (TAIL and not SUMMARY)
    k = _load_rows(k_base, ktok, skt, offs_d, rmask, mrows, PAD_D, HEAD_D)
    v = _load_rows(v_base, ktok, svt, offs_d, rmask, mrows, PAD_D, HEAD_D)
    return kpos, k, v, rmask


@triton.jit
def _pair_mask(
    qpos,
    kpos,
    rmask,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    VSB: tl.constexpr,
    CAUSAL: tl.constexpr,
    ds,
    de,
    DOCS: tl.constexpr,
):
    """``[BM, BN]``: which (query, key) pairs of a masked tile (:func:`_key_tile`) the pattern
    allows, in the same document (``DOCS == 2``)."""
    ok = _allowed(qpos[:, None], kpos[None, :], MODE, SUMMARY, P1, P1M, P1S, P1C, VSB, CAUSAL)
    if not CAUSAL:  # keys past time (in causal patterns, later than every query)
        ok = ok & rmask[None, :]
    if DOCS == 2:
        ok = _same_doc(ok, qpos[:, None], kpos[None, :], ds[:, None], de[:, None], CAUSAL)
    return ok


@triton.jit
def _custom_key_tile(
    COLS,
    MASK_IDX,
    e,
    k_base,
    v_base,
    skt,
    svt,
    PERM,
    TN,
    offs_d,
    BN: tl.constexpr,
    HAS_PERM: tl.constexpr,
    TAIL: tl.constexpr,
    PAD_D: tl.constexpr,
    HEAD_D: tl.constexpr,
):
    """Entry ``e`` of a custom layout's block row: ``(k, v, mi)``, its key block's k and v
    ``[BN, BLOCK_D]`` and the index of its in-block mask (-1: a full block)."""
    c = tl.load(COLS + e)
    mi = tl.load(MASK_IDX + e)
    kp = c * BN + tl.arange(0, BN)
    ktok = _custom_tok(kp, PERM, TN, HAS_PERM)
    # the layout's masks keep keys past time out of every row
    k = _load_rows(k_base, ktok, skt, offs_d, kp < TN, TAIL, PAD_D, HEAD_D)
    v = _load_rows(v_base, ktok, svt, offs_d, kp < TN, TAIL, PAD_D, HEAD_D)
    return k, v, mi


@triton.jit
def _block_mask(MASKS, mi, BM: tl.constexpr, BN: tl.constexpr):
    """``[BM, BN]`` bool: in-block mask ``mi`` of a custom layout (queries by keys)."""
    mp = MASKS + mi.to(tl.int64) * (BM * BN) + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    return tl.load(mp) != 0


@triton.jit
def _stage_range(stage: tl.constexpr, SPLIT: tl.constexpr, sf, se, sa, sz, lo, flo, fhi, hi):
    """``(start, end)``: the key positions of the forward's and dQ's ``stage`` (see fwd_kernel):
    fixed's summary keys ``[0, sf)``, ``[sf, se)``, ``[se, sa)``, ``[sa, sz)`` (0-3), then the
    pattern's own ``[lo, flo)``, ``[flo, fhi)``, ``[fhi, hi)`` (4-6), or ``[lo, hi)`` at 4 without
    ``SPLIT``."""
    if stage == 0:
        start, end = 0, sf
    elif stage == 1:
        start, end = sf, se
    elif stage == 2:
        start, end = se, sa
    elif stage == 3:
        start, end = sa, sz
    elif stage == 4:
        start, end = lo, (flo if SPLIT else hi)
    elif stage == 5:
        start, end = flo, fhi
    else:
        start, end = fhi, hi
    return start, end


@triton.jit
def _fwd_range(
    acc,
    l_i,
    m_i,
    q,
    qpos,
    k_base,
    v_base,
    skt,
    svt,
    start,
    end,
    T,
    vlo,
    qk_scale,
    offs_d,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    MASKED: tl.constexpr,
    PAD_D: tl.constexpr,
    HEAD_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TAIL: tl.constexpr,
    CAUSAL: tl.constexpr,
    ds,
    de,
    DOCS: tl.constexpr,
):
    for n0 in range(start, end, BN):
        kpos, k, v, rmask = _key_tile(
            k_base, v_base, skt, svt, n0, T, vlo, offs_d, BN, MODE, SUMMARY, P1, P1M, P1S, P1C, P2, VSB, MASKED,
            PAD_D, HEAD_D, TAIL, DOCS,
        )  # fmt: skip
        if MASKED:
            ok = _pair_mask(qpos, kpos, rmask, MODE, SUMMARY, P1, P1M, P1S, P1C, VSB, CAUSAL, ds, de, DOCS)
        else:
            ok = None
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, ok, qk_scale, MASKED, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _tile_and_head(HEAVY_LAST: tl.constexpr, MODE: tl.constexpr):
    """``(tile, bh)`` of this program. Blocks start in grid order (axis 0 fastest); for the
    triangular patterns (``all``, ``fixed``: a tile's work grows with its query position, or
    shrinks with its key position) the heaviest tiles of every head go first, so that the light
    ones fill the tail of the launch instead of a few long programs."""
    if MODE == 0 or MODE == 3:
        pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        nbh = tl.num_programs(1)
        tile = pid // nbh
        if HEAVY_LAST:
            tile = tl.num_programs(0) - 1 - tile
        bh = pid % nbh
    else:
        tile = tl.program_id(0)
        bh = tl.program_id(1)
    return tile, bh


@triton.jit(do_not_specialize=["P1", "P1M", "P1S"])
def fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    VLO_A,
    VLO_C,
    VLO_NV,
    HEAD_PAT,
    PERM,
    CU,
    WORK,
    DIVS,
    ROW_PTR,
    COLS,
    MASK_IDX,
    MASKS,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sob,
    soh,
    sot,
    T,
    H,
    NBLK,
    qk_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
    G: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_PERM: tl.constexpr,
    DOCS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # float scalars in float32 however they come (Inductor passes Python floats as constants)
    qk_scale = tl.cast(qk_scale, tl.float32)
    m_blk, bh = _tile_and_head(True, MODE)
    h = bh % H
    m_blk, seq = _work_item(m_blk, bh // H, WORK, DOCS)
    # T: the batch rows' length (the statistics' row stride); TN: this sequence's (a document's)
    b, t0, TN = _sequence(seq, T, CU, DOCS)
    P1, P1M, P1S = _periods(seq, P1, P1M, P1S, DIVS, MODE, DOCS)
    TP = _positions(TN, P1, P2, MODE, DOCS)
    m0 = m_blk * BM
    hk = (h // G).to(tl.int64)  # the key/value head of query head h (grouped-query attention)
    q_base = Q + b * sqb + h.to(tl.int64) * sqh + t0 * sqt
    k_base = K + b * skb + hk * skh + t0 * skt
    v_base = V + b * svb + hk * svh + t0 * svt
    stats = (b * H + h) * T + t0
    PAD_D: tl.constexpr = BLOCK_D != HEAD_D
    offs_d = tl.arange(0, BLOCK_D)
    qpos = m0 + tl.arange(0, BM)
    qtok = _tok(qpos, MODE, False, P1, P1M, P1S, P1C, P2, VSB, 0)
    if MODE == 4:
        qtok = _custom_tok(qpos, PERM, TN, HAS_PERM)
    qvalid = _valid(qpos, qtok, TN, P1, P2, MODE, DOCS)  # TAIL: past time (a position >= TN has no token)
    ds, de = qpos, qpos
    if DOCS == 2:
        ds, de = _doc_bounds(qpos, T, WORK)
    q = _load_rows(q_base, qtok, sqt, offs_d, qvalid, TAIL, PAD_D, HEAD_D)  # [BM, BLOCK_D]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    if MODE == 4:
        pat = tl.load(HEAD_PAT + h)
        rp = ROW_PTR + pat.to(tl.int64) * (NBLK + 1) + m_blk
        start = tl.load(rp)
        end = tl.load(rp + 1)
        for e in range(start, end):
            k, v, mi = _custom_key_tile(
                COLS, MASK_IDX, e, k_base, v_base, skt, svt, PERM, TN, offs_d, BN, HAS_PERM, TAIL, PAD_D, HEAD_D
            )
            if mi >= 0:
                ok = _block_mask(MASKS, mi, BM, BN)
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, ok, qk_scale, True, DOT_PREC)
            else:
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, None, qk_scale, False, DOT_PREC)
    else:
        vlo = 0
        sf, se, sa, sz = 0, 0, 0, 0  # fixed's summary ranges (stages 0-3)
        lo, flo, fhi, hi = 0, 0, 0, 0  # the pattern's own (stages 4-6), set at stage 4
        if MODE == 3:
            vlo = _summary_start(h, VLO_A, VLO_C, VLO_NV)
            sf, se, sa, sz = _summary_bounds(m0, TN, vlo, BM, BN, P1, VSB, CAUSAL)
        # One loop over the key ranges, unrolled (constexpr stage), in the order they accumulate:
        # fixed's summary keys, full [0, sf) (0) then masked [sf, se) (1), bidirectional also
        # full [se, sa) (2) and masked [sa, sz) (3); then the pattern's own keys, masked [lo,
        # flo), full [flo, fhi), masked [fhi, hi) (4, 5, 6) when SPLIT, else one masked loop over
        # [lo, hi) (4): with few tiles per row it pipelines better than three.
        for stage in tl.static_range(7):
            if stage == 4:
                # after fixed's summary stages, next to its loops (hoisted, fixed compiles differently)
                lo, flo, fhi, hi = _row_bounds(m0, TP, BM, BN, MODE, P1, CAUSAL, DOCS)
                if DOCS == 2 and (MODE == 0 or SPLIT):
                    # all: from the documents' first keys; local: its window's few tiles need no
                    # narrowing (the mask drops the other document's keys), full tiles do
                    lo, flo, fhi, hi = _doc_row_bounds(lo, flo, fhi, hi, m0, T, WORK, BM, BN, CAUSAL)
            if (MODE == 3 and (stage < 2 or (stage < 4 and not CAUSAL))) or stage == 4 or (SPLIT and stage > 4):
                start, end = _stage_range(stage, SPLIT, sf, se, sa, sz, lo, flo, fhi, hi)
                acc, l_i, m_i = _fwd_range(
                    acc,
                    l_i,
                    m_i,
                    q,
                    qpos,
                    k_base,
                    v_base,
                    skt,
                    svt,
                    start,
                    end,
                    TN,
                    vlo,
                    qk_scale,
                    offs_d,
                    BN,
                    MODE,
                    stage < 4,  # SUMMARY
                    P1,
                    P1M,
                    P1S,
                    P1C,
                    P2,
                    VSB,
                    stage == 1 or stage == 3 or stage == 4 or stage == 6,  # MASKED
                    PAD_D,
                    HEAD_D,
                    DOT_PREC,
                    TAIL,
                    CAUSAL,
                    ds,
                    de,
                    DOCS,
                )
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = O + b * sob + h.to(tl.int64) * soh + (t0 + qtok)[:, None] * sot + offs_d[None, :]
    _store_rows(o_ptrs, out.to(O.dtype.element_ty), qvalid, TAIL, PAD_D, HEAD_D, offs_d)
    if TAIL:
        tl.store(LSE + stats + qtok, lse, mask=qvalid)
    else:
        tl.store(LSE + stats + qtok, lse)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse, delta, ok, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
    pT = tl.math.exp2(qkT - lse[None, :])
    if MASKED:
        pT = tl.where(ok, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _load_query_rows(
    q_base,
    do_base,
    lse_base,
    d_base,
    qtok,
    qvalid,
    sqt,
    sdt,
    offs_d,
    TAIL: tl.constexpr,
    PAD_D: tl.constexpr,
    HEAD_D: tl.constexpr,
):
    """A query tile's q, dO, log-sum-exp and delta for dK/dV; rows past time (TAIL) read as
    q = dO = 0 and lse = +inf, so that they add nothing."""
    q = _load_rows(q_base, qtok, sqt, offs_d, qvalid, TAIL, PAD_D, HEAD_D)
    do = _load_rows(do_base, qtok, sdt, offs_d, qvalid, TAIL, PAD_D, HEAD_D)
    if TAIL:
        lse = tl.load(lse_base + qtok, mask=qvalid, other=float("inf"))
        delta = tl.load(d_base + qtok, mask=qvalid, other=0.0)
    else:
        lse = tl.load(lse_base + qtok)
        delta = tl.load(d_base + qtok)
    return q, do, lse, delta


@triton.jit
def _dkdv_range(
    dk,
    dv,
    k,
    v,
    kpos,
    q_base,
    do_base,
    lse_base,
    d_base,
    sqt,
    sdt,
    start,
    end,
    T,
    qk_scale,
    offs_d,
    BM: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    MASKED: tl.constexpr,
    PAD_D: tl.constexpr,
    HEAD_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TAIL: tl.constexpr,
    CAUSAL: tl.constexpr,
    ks,
    ke,
    DOCS: tl.constexpr,
):
    for m0 in range(start, end, BM):
        qpos = m0 + tl.arange(0, BM)
        qtok = _tok(qpos, MODE, False, P1, P1M, P1S, P1C, P2, VSB, 0)
        q, do, lse, delta = _load_query_rows(
            q_base,
            do_base,
            lse_base,
            d_base,
            qtok,
            _valid(qpos, qtok, T, P1, P2, MODE, DOCS),
            sqt,
            sdt,
            offs_d,
            TAIL,
            PAD_D,
            HEAD_D,
        )
        if MASKED:
            ok = _allowed(qpos[None, :], kpos[:, None], MODE, SUMMARY, P1, P1M, P1S, P1C, VSB, CAUSAL)
            if DOCS == 2:  # query i in key j's document [ks, ke): causal, i >= j, needs i < ke only
                ok = ok & (qpos[None, :] < ke[:, None])
                if not CAUSAL:
                    ok = ok & (qpos[None, :] >= ks[:, None])
        else:
            ok = None
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, ok, qk_scale, MASKED, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["P1", "P1M", "P1S"])
def dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    ACC,
    VLO_A,
    VLO_C,
    VLO_NV,
    HEAD_PAT,
    PERM,
    CU,
    WORK,
    DIVS,
    COL_PTR,
    ROWS,
    ENTRY_MASK,
    MASKS,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sdb,
    sdh,
    sdt,
    sgkb,
    sgkh,
    sgkt,
    sgvb,
    sgvh,
    sgvt,
    T,
    H,
    NBLK,
    NKEYS,
    NSUM,
    qk_scale,
    sm_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    G: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_PERM: tl.constexpr,
    DOCS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # float scalars in float32 however they come (Inductor passes Python floats as constants)
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    # One program per key tile and key/value head (grouped-query attention: its G query heads
    # are walked in turn, so k and v are read once per group). fixed's summary pass runs one
    # program per summary class present in the group (class r: the heads h with h % NV == r,
    # whose summary keys start at VLO_A - r * VLO_C); classes own disjoint keys, so no race.
    n_blk, prog = _tile_and_head(False, MODE)
    HK = H // G
    if MODE == 3 and G > 1:
        NCLS = tl.minimum(VLO_NV, G)
    else:
        NCLS = 1
    n_blk, seq = _work_item(n_blk, prog // (HK * NCLS), WORK, DOCS)
    b, t0, TN = _sequence(seq, T, CU, DOCS)
    P1, P1M, P1S = _periods(seq, P1, P1M, P1S, DIVS, MODE, DOCS)
    TP = _positions(TN, P1, P2, MODE, DOCS)
    n0 = n_blk * BN
    voff = (t0 * 0).to(tl.int32)  # fixed, packed documents: the document's first virtual summary key
    if DOCS == 1:
        # fixed: document d's groups' virtual summary keys start at (cu[d] // l + d) * VSB (each
        # document's ceil(n / l) groups fit before the next)
        if MODE == 3:
            voff = (t0 // P1C + seq).to(tl.int32) * VSB
    rem = prog % (HK * NCLS)
    hk = rem // NCLS
    j = rem % NCLS
    hk64 = hk.to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_D
    offs_d = tl.arange(0, BLOCK_D)
    kpos = n0 + tl.arange(0, BN)
    vlo = 0
    if SUMMARY:
        vlo = _summary_start(hk * G + j, VLO_A, VLO_C, VLO_NV)
    ktok = _tok(kpos, MODE, SUMMARY, P1, P1M, P1S, P1C, P2, VSB, vlo)
    if MODE == 4:
        ktok = _custom_tok(kpos, PERM, TN, HAS_PERM)
    if MODE == 2 and DOCS == 1:  # strided per document: padded residue classes (see _valid)
        kvalid = _valid(kpos, ktok, TN, P1, P2, MODE, DOCS)
    else:
        kvalid = (kpos < NKEYS) & (ktok < TN)
    k_base = K + b * skb + hk64 * skh + t0 * skt
    v_base = V + b * svb + hk64 * svh + t0 * svt
    k = _load_rows(k_base, ktok, skt, offs_d, kvalid, SUMMARY or TAIL, PAD_D, HEAD_D)  # [BN, BLOCK_D]
    v = _load_rows(v_base, ktok, svt, offs_d, kvalid, SUMMARY or TAIL, PAD_D, HEAD_D)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    # the query heads this program walks: the group's (summary pass: those of its class)
    if G == 1:
        g0 = 0
        gstep = 1
    elif SUMMARY:
        g0 = j
        gstep = VLO_NV
    else:
        g0 = 0
        gstep = 1
    ks, ke = kpos, kpos
    if MODE != 4:
        lo, flo, fhi, hi = _col_bounds(n0, TP, BM, BN, MODE, SUMMARY, P1, VSB, CAUSAL)
        if DOCS == 2:
            ks, ke = _doc_bounds(kpos, T, WORK)
            if MODE == 0:  # the queries of the key tile's documents (local: its window, masked)
                hi = tl.minimum(hi, tl.load(WORK + T + tl.minimum(n0 + BN - 1, T - 1)))
                if not CAUSAL:
                    lo = tl.maximum(lo, tl.load(WORK + tl.minimum(n0, T - 1)) // BM * BM)
    for g in range(g0, G, gstep):
        h = hk * G + g
        hh = h.to(tl.int64)
        bh = b * H + hh
        q_base = Q + b * sqb + hh * sqh + t0 * sqt
        do_base = DO + b * sdb + hh * sdh + t0 * sdt
        lse_base = LSE + bh * T + t0
        d_base = DELTA + bh * T + t0
        if MODE == 4:
            pat = tl.load(HEAD_PAT + h)
            cp = COL_PTR + pat.to(tl.int64) * (NBLK + 1) + n_blk
            start = tl.load(cp)
            end = tl.load(cp + 1)
            for e in range(start, end):
                r = tl.load(ROWS + e)
                mi = tl.load(ENTRY_MASK + e)
                qp = r * BM + tl.arange(0, BM)
                qtok = _custom_tok(qp, PERM, TN, HAS_PERM)
                q, do, lse, delta = _load_query_rows(
                    q_base, do_base, lse_base, d_base, qtok, qp < TN, sqt, sdt, offs_d, TAIL, PAD_D, HEAD_D
                )
                if mi >= 0:
                    # the block mask is [query, key]; read it transposed
                    mp = (
                        MASKS + mi.to(tl.int64) * (BM * BN) + tl.arange(0, BM)[None, :] * BN + tl.arange(0, BN)[:, None]
                    )
                    ok = tl.load(mp) != 0
                    dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, ok, qk_scale, True, DOT_PREC)
                else:
                    dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, None, qk_scale, False, DOT_PREC)
        else:
            # One loop that masks every tile: splitting off the full tiles into their own loop makes
            # ptxas serialize the wgmma chain here (C7515), which costs more than the mask.
            dk, dv = _dkdv_range(
                dk,
                dv,
                k,
                v,
                kpos,
                q_base,
                do_base,
                lse_base,
                d_base,
                sqt,
                sdt,
                lo,
                hi,
                TN,
                qk_scale,
                offs_d,
                BM,
                MODE,
                SUMMARY,
                P1,
                P1M,
                P1S,
                P1C,
                P2,
                VSB,
                True,
                PAD_D,
                HEAD_D,
                DOT_PREC,
                TAIL,
                CAUSAL,
                ks,
                ke,
                DOCS,
            )
    dk = dk * sm_scale
    dk_ptrs = DK + b * sgkb + hk64 * sgkh + (t0 + ktok)[:, None] * sgkt + offs_d[None, :]
    dv_ptrs = DV + b * sgvb + hk64 * sgvh + (t0 + ktok)[:, None] * sgvt + offs_d[None, :]
    smask = kvalid[:, None] & (offs_d[None, :] < HEAD_D)
    # fixed: a summary key's gradients are its local part (first pass) plus its summary part
    # (second pass), summed in float32 and rounded once: the first pass keeps the local part of
    # the summary keys in ACC [B*HK*NCLS, NSUM, 2, HEAD_D] (float32), indexed by summary class
    # and virtual summary key
    acc_row = ACC + ((b * HK + hk64) * NCLS) * NSUM * 2 * HEAD_D + offs_d[None, :]
    if SUMMARY:
        # each virtual key lies in one tile of one pass: no race
        acc_ptrs = acc_row + j.to(tl.int64) * NSUM * 2 * HEAD_D + (voff + kpos)[:, None].to(tl.int64) * (2 * HEAD_D)
        dk += tl.load(acc_ptrs, mask=smask, other=0.0)
        dv += tl.load(acc_ptrs + HEAD_D, mask=smask, other=0.0)
    elif MODE == 3:
        group = _div(kpos, P1M, P1S, P1C).to(tl.int64)  # fixed's first pass: ktok == kpos
        off = ktok - group * P1C  # the key's offset in its group
        if G == 1:
            # one query head: its own summary keys only (no division by runtime values here: this
            # epilogue runs once per program, and G = 1 is the common case)
            r = off - _summary_start(hk, VLO_A, VLO_C, VLO_NV)
            is_summary = kvalid & (r >= 0) & (r < VSB)
            acc_ptrs = acc_row + (voff + group * VSB + r)[:, None] * (2 * HEAD_D)
        else:
            # its summary class c (VLO_A - c * VSB <= off < that + VSB), if any, and whether a head
            # of this group is of that class (then the summary pass finishes the key)
            in_any = (off >= VLO_A - (VLO_NV - 1) * VSB) & (off < VLO_A + VSB)
            cls = tl.maximum(VLO_A + VSB - 1 - off, 0) // VSB
            jj = ((cls - hk * G) % VLO_NV + VLO_NV) % VLO_NV
            is_summary = kvalid & in_any & (jj < G)
            vkey = voff + group * VSB + off - (VLO_A - cls * VSB)
            acc_ptrs = acc_row + (jj.to(tl.int64) * NSUM + vkey)[:, None] * (2 * HEAD_D)
        amask = is_summary[:, None] & (offs_d[None, :] < HEAD_D)
        tl.store(acc_ptrs, dk, mask=amask)
        tl.store(acc_ptrs + HEAD_D, dv, mask=amask)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=smask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=smask)


@triton.jit
def _dq_step(dq, q, do, k, v, lse, delta, ok, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_range(
    dq,
    q,
    do,
    lse,
    delta,
    qpos,
    k_base,
    v_base,
    skt,
    svt,
    start,
    end,
    T,
    vlo,
    qk_scale,
    offs_d,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    SUMMARY: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    MASKED: tl.constexpr,
    PAD_D: tl.constexpr,
    HEAD_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TAIL: tl.constexpr,
    CAUSAL: tl.constexpr,
    ds,
    de,
    DOCS: tl.constexpr,
):
    for n0 in range(start, end, BN):
        kpos, k, v, rmask = _key_tile(
            k_base, v_base, skt, svt, n0, T, vlo, offs_d, BN, MODE, SUMMARY, P1, P1M, P1S, P1C, P2, VSB, MASKED,
            PAD_D, HEAD_D, TAIL, DOCS,
        )  # fmt: skip
        if MASKED:
            ok = _pair_mask(qpos, kpos, rmask, MODE, SUMMARY, P1, P1M, P1S, P1C, VSB, CAUSAL, ds, de, DOCS)
        else:
            ok = None
        dq = _dq_step(dq, q, do, k, v, lse, delta, ok, qk_scale, MASKED, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["P1", "P1M", "P1S"])
def dq_kernel(
    Q,
    K,
    V,
    DO,
    O,
    DQ,
    LSE,
    DELTA,
    VLO_A,
    VLO_C,
    VLO_NV,
    HEAD_PAT,
    PERM,
    CU,
    WORK,
    DIVS,
    ROW_PTR,
    COLS,
    MASK_IDX,
    MASKS,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sdb,
    sdh,
    sdt,
    sob,
    soh,
    sot,
    sgb,
    sgh,
    sgt,
    T,
    H,
    NBLK,
    qk_scale,
    sm_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    P1,
    P1M,
    P1S,
    P1C: tl.constexpr,
    P2: tl.constexpr,
    VSB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
    G: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_PERM: tl.constexpr,
    DOCS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # float scalars in float32 however they come (Inductor passes Python floats as constants)
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    m_blk, bh = _tile_and_head(True, MODE)
    h = bh % H
    m_blk, seq = _work_item(m_blk, bh // H, WORK, DOCS)  # as in the forward kernel
    b, t0, TN = _sequence(seq, T, CU, DOCS)
    P1, P1M, P1S = _periods(seq, P1, P1M, P1S, DIVS, MODE, DOCS)
    TP = _positions(TN, P1, P2, MODE, DOCS)
    m0 = m_blk * BM
    hh = h.to(tl.int64)
    hk = (h // G).to(tl.int64)  # the key/value head of query head h (grouped-query attention)
    k_base = K + b * skb + hk * skh + t0 * skt
    v_base = V + b * svb + hk * svh + t0 * svt
    stats = (b * H + hh) * T + t0
    PAD_D: tl.constexpr = BLOCK_D != HEAD_D
    offs_d = tl.arange(0, BLOCK_D)
    qpos = m0 + tl.arange(0, BM)
    qtok = _tok(qpos, MODE, False, P1, P1M, P1S, P1C, P2, VSB, 0)
    if MODE == 4:
        qtok = _custom_tok(qpos, PERM, TN, HAS_PERM)
    qvalid = _valid(qpos, qtok, TN, P1, P2, MODE, DOCS)  # TAIL: the query tile past time
    ds, de = qpos, qpos
    if DOCS == 2:
        ds, de = _doc_bounds(qpos, T, WORK)
    q, do, lse, _ = _load_query_rows(
        Q + b * sqb + hh * sqh + t0 * sqt, DO + b * sdb + hh * sdh + t0 * sdt, LSE + stats, LSE, qtok, qvalid,
        sqt, sdt, offs_d, TAIL, PAD_D, HEAD_D,
    )  # fmt: skip
    # delta = rowsum(dO * O) of this tile's rows, stored for the dK/dV kernel that runs next
    o = _load_rows(O + b * sob + hh * soh + t0 * sot, qtok, sot, offs_d, qvalid, TAIL, PAD_D, HEAD_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if TAIL:
        tl.store(DELTA + stats + qtok, delta, mask=qvalid)
    else:
        tl.store(DELTA + stats + qtok, delta)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    if MODE == 4:
        pat = tl.load(HEAD_PAT + h)
        rp = ROW_PTR + pat.to(tl.int64) * (NBLK + 1) + m_blk
        start = tl.load(rp)
        end = tl.load(rp + 1)
        for e in range(start, end):
            k, v, mi = _custom_key_tile(
                COLS, MASK_IDX, e, k_base, v_base, skt, svt, PERM, TN, offs_d, BN, HAS_PERM, TAIL, PAD_D, HEAD_D
            )
            if mi >= 0:
                ok = _block_mask(MASKS, mi, BM, BN)
                dq = _dq_step(dq, q, do, k, v, lse, delta, ok, qk_scale, True, DOT_PREC)
            else:
                dq = _dq_step(dq, q, do, k, v, lse, delta, None, qk_scale, False, DOT_PREC)
    else:
        vlo = 0
        sf, se, sa, sz = 0, 0, 0, 0  # fixed's summary ranges (stages 0-3)
        lo, flo, fhi, hi = 0, 0, 0, 0  # the pattern's own (stages 4-6), set at stage 4
        if MODE == 3:
            vlo = _summary_start(h, VLO_A, VLO_C, VLO_NV)
            sf, se, sa, sz = _summary_bounds(m0, TN, vlo, BM, BN, P1, VSB, CAUSAL)
        # the forward kernel's stages, in the same order
        for stage in tl.static_range(7):
            if stage == 4:
                lo, flo, fhi, hi = _row_bounds(m0, TP, BM, BN, MODE, P1, CAUSAL, DOCS)
                if DOCS == 2 and (MODE == 0 or SPLIT):
                    # all: from the documents' first keys; local: its window's few tiles need no
                    # narrowing (the mask drops the other document's keys), full tiles do
                    lo, flo, fhi, hi = _doc_row_bounds(lo, flo, fhi, hi, m0, T, WORK, BM, BN, CAUSAL)
            if (MODE == 3 and (stage < 2 or (stage < 4 and not CAUSAL))) or stage == 4 or (SPLIT and stage > 4):
                start, end = _stage_range(stage, SPLIT, sf, se, sa, sz, lo, flo, fhi, hi)
                dq = _dq_range(
                    dq,
                    q,
                    do,
                    lse,
                    delta,
                    qpos,
                    k_base,
                    v_base,
                    skt,
                    svt,
                    start,
                    end,
                    TN,
                    vlo,
                    qk_scale,
                    offs_d,
                    BN,
                    MODE,
                    stage < 4,  # SUMMARY
                    P1,
                    P1M,
                    P1S,
                    P1C,
                    P2,
                    VSB,
                    stage == 1 or stage == 3 or stage == 4 or stage == 6,  # MASKED
                    PAD_D,
                    HEAD_D,
                    DOT_PREC,
                    TAIL,
                    CAUSAL,
                    ds,
                    de,
                    DOCS,
                )
    dq = dq * sm_scale
    dq_ptrs = DQ + b * sgb + hh * sgh + (t0 + qtok)[:, None] * sgt + offs_d[None, :]
    _store_rows(dq_ptrs, dq.to(DQ.dtype.element_ty), qvalid, TAIL, PAD_D, HEAD_D, offs_d)
