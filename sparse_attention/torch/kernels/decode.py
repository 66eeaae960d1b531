"""Decode attention in Triton: a few new tokens per sequence over a static key/value cache.

Each program owns one query row ``(batch, head, t)`` and one of ``SPLITS`` slices of its keys.
The query sits at ``i = lengths[batch] + t``; its keys are the union of at most two runs of
:class:`sparse_attention.decoding.DecodePlan` (numbered ``v = 0 .. n(i) - 1``, the second run
first), so the program walks ``v`` in tiles of ``BN``, computes each key's cache slot in closed
form and gathers only those rows: ``local`` reads its window, ``strided`` every ``l``-th key,
``fixed`` its group and its head's summary keys, ``all`` everything; no in-block mask, no key
outside the pattern, no slot that was never written. Scores are float32 (``exp2``, base-2 log-sum-exp).

Long key lists are split (split-K): each slice writes its normalised partial output and its
log-sum-exp, and :func:`_combine_kernel` merges the slices. With one slice the decode kernel
writes the output itself. A row with no key (never with a built-in plan) outputs 0.

Layouts with no closed-form plan (custom ones, other unions) walk the enabled blocks of the query's
layout row (the CSR tables of the training kernels) and apply their in-block masks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...decoding import DecodePlan
from . import launch  # noqa: F401  (under TRITON_INTERPRET=1 it mends Triton's interpreter first)


@triton.jit
def _slots(v, i, h, n2, start, RUN: tl.constexpr, SECOND: tl.constexpr, P, C, VLO_A, VLO_C, VLO_NV, RING, SUM_BASE):
    """Cache slots (int64) of the union's keys ``v`` of a query at ``i`` (see DecodePlan)."""
    if SECOND == 1:
        s2 = (i % P + v * P).to(tl.int64)
    elif SECOND == 2:
        if SUM_BASE >= 0:
            s2 = (SUM_BASE + v).to(tl.int64)
        else:
            s2 = (v // C).to(tl.int64) * P + (VLO_A - (h % VLO_NV) * VLO_C) + v % C
    else:
        s2 = v.to(tl.int64)
    p1 = (start + v - n2).to(tl.int64)
    if RING > 0:
        p1 = p1 % RING
    return tl.where(v < n2, s2, p1)


@triton.jit(do_not_specialize=["W", "P", "EXCL", "C", "VLO_A", "VLO_C", "VLO_NV", "RING", "SUM_BASE"])
def _decode_kernel(
    Q, K, V, O, OP, LP, LEN, HEAD_PAT, ROW_PTR, COLS, MASK_IDX, MASKS,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
    H, T, qk_scale, NBLK,
    W, P, EXCL, C, VLO_A, VLO_C, VLO_NV, RING, SUM_BASE, HOFF, KV_GROUP,
    RUN: tl.constexpr, SECOND: tl.constexpr, SPLITS: tl.constexpr,
    BN: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // (H * T)
    h = (row // T) % H
    t = row % T
    i = tl.load(LEN + b).to(tl.int32) + t
    if RUN == 1:
        start = i * 0
    elif RUN == 2:
        start = tl.maximum(i - W + 1, 0)
    elif RUN == 3:
        start = i // W * W
    else:  # no run (W is 0)
        start = i + 1
    n1 = i - start + 1
    if SECOND == 1:
        n2 = tl.maximum(i - EXCL - i % P + P, 0) // P
    elif SECOND == 2:
        n2 = (i // P) * C
    elif SECOND == 3:  # the enabled blocks of the query's layout row (C = blocksize)
        rp = ROW_PTR + tl.load(HEAD_PAT + h).to(tl.int64) * (NBLK + 1) + i // C
        e0 = tl.load(rp)
        n2 = ((tl.load(rp + 1) - e0) * C).to(tl.int32)
        iend = tl.load(LEN + b) + T  # keys past this step's tokens are not in the cache yet
    else:
        n2 = i * 0
    n = n1 + n2
    chunk = tl.cdiv(tl.cdiv(n, SPLITS), BN) * BN
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n)

    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + t * sqt + offs_d, mask=dmask, other=0.0)
    # the query repeated over 16 rows: both products run on the tensor cores, and Triton pipelines
    # the gathered key/value loads that feed them (the rows stay equal; row 0 is stored)
    qm = tl.broadcast_to(q[None, :], [16, BLOCK_D])
    # the key/value head: query head HOFF + h of the cache's heads, KV_GROUP query heads per
    # key/value head (grouped-query attention; 1: one each)
    hk64 = ((h + HOFF) // KV_GROUP).to(tl.int64)
    kbase = K + b64 * skb + hk64 * skh
    vbase = V + b64 * svb + hk64 * svh
    m_i = tl.full([16], -float("inf"), tl.float32)
    l_i = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, BLOCK_D], dtype=tl.float32)
    for v0 in range(lo, hi, BN):
        v = v0 + tl.arange(0, BN)
        ok = v < hi
        if SECOND == 3:
            e = e0 + v // C
            slot = tl.load(COLS + e, mask=ok, other=0).to(tl.int64) * C + v % C
            mi = tl.load(MASK_IDX + e, mask=ok, other=-1).to(tl.int64)
            inb = tl.load(MASKS + mi * C * C + (i % C) * C + v % C, mask=ok & (mi >= 0), other=1)
            ok = ok & (inb != 0) & (slot < iend)
        else:
            slot = _slots(v, i, h, n2, start, RUN, SECOND, P, C, VLO_A, VLO_C, VLO_NV, RING, SUM_BASE)
        slot = tl.where(ok, slot, 0)
        m2 = ok[:, None] & dmask[None, :]
        k = tl.load(kbase + slot[:, None] * sks + offs_d[None, :], mask=m2, other=0.0)
        vv = tl.load(vbase + slot[:, None] * svs + offs_d[None, :], mask=m2, other=0.0)
        s = tl.dot(qm, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(ok[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # a tile (so far) with no allowed key
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    first = tl.arange(0, 16) == 0
    acc1 = tl.sum(tl.where(first[:, None], acc, 0.0), axis=0)
    l1 = tl.sum(tl.where(first, l_i, 0.0), axis=0)
    m1 = tl.max(tl.where(first, m_i, -float("inf")), axis=0)
    empty = l1 == 0.0
    out = tl.where(empty, 0.0, acc1 / tl.where(empty, 1.0, l1))
    if SPLITS == 1:
        tl.store(O + b64 * sob + h64 * soh + t * sot + offs_d, out.to(O.dtype.element_ty), mask=dmask)
    else:
        r64 = row.to(tl.int64) * SPLITS + split
        tl.store(OP + r64 * HEAD_D + offs_d, out, mask=dmask)
        tl.store(LP + r64, tl.where(empty, -float("inf"), m1 + tl.log2(tl.where(empty, 1.0, l1))))


@triton.jit
def _combine_kernel(
    O, OP, LP, sob, soh, sot, H, T, SPLITS: tl.constexpr, BS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0)
    b = row // (H * T)
    h = (row // T) % H
    t = row % T
    offs_s = tl.arange(0, BS)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < SPLITS
    r64 = row.to(tl.int64) * SPLITS
    lse = tl.load(LP + r64 + offs_s, mask=smask, other=-float("inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(smask & (lse > -float("inf")), tl.exp2(lse - m), 0.0)
    tot = tl.sum(w, axis=0)
    w = w / tl.where(tot > 0, tot, 1.0)
    o = tl.load(
        OP + (r64 + offs_s[:, None]) * HEAD_D + offs_d[None, :],
        mask=smask[:, None] & (offs_d[None, :] < HEAD_D),
        other=0.0,
    )
    out = tl.sum(o * w[:, None], axis=0)
    dst = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + t * sot + offs_d
    tl.store(dst, out.to(O.dtype.element_ty), mask=offs_d < HEAD_D)


# Tile of keys per step, warps per program, programs per SM aimed at and the fewest keys per slice.
TUNE = dict(BN=128, num_warps=4, num_stages=3, per_sm=16, min_keys=256, max_splits=128)


def num_splits(plan: DecodePlan, rows: int, n_ctx: int, device: torch.device) -> int:
    """Slices per query row: enough programs for ``per_sm`` per SM, none shorter than
    ``min_keys`` keys at the longest context (a constant per cache, so a captured graph keeps it)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(TUNE["per_sm"] * sms, max(rows, 1))
    return int(max(1, min(want, triton.cdiv(plan.max_keys(n_ctx), TUNE["min_keys"]), TUNE["max_splits"])))


def decode(
    q, k_cache, v_cache, lengths, plan: DecodePlan, splits: int = 1, out=None, head_offset: int = 0, group: int = 1
):
    """Attention of ``q [batch, heads, t, d]`` (positions ``lengths[b] + 0 .. t - 1``, ``lengths``
    int32/int64 ``[batch]`` on the device) over the cache ``[batch, kv_heads, slots, d]`` laid out
    as ``plan`` says; keys of the new tokens must already be in the cache. Query head ``h`` is head
    ``head_offset + h`` of the layer and reads cache head ``(head_offset + h) // group``
    (grouped-query attention: ``group`` query heads per key/value head). Returns ``[batch,
    heads, t, d]`` in ``q``'s dtype (into ``out`` if given)."""
    B, H, T, D = q.shape
    if any(x.stride(-1) != 1 for x in (q, k_cache, v_cache)):
        raise ValueError("decode: q and the caches need a contiguous last dimension")
    o = torch.empty_like(q) if out is None else out
    rows = B * H * T
    block_d = max(16, triton.next_power_of_2(D))
    # one stage of keys and values within 64 KiB, so that the pipeline fits shared memory
    bn = max(16, min(TUNE["BN"], 32768 // (block_d * q.element_size())))
    if splits > 1:
        op = torch.empty(rows * splits * D, device=q.device, dtype=torch.float32)
        lp = torch.empty(rows * splits, device=q.device, dtype=torch.float32)
    else:
        op = lp = o
    if plan.layout is not None:
        from .launch import device_tables

        tab = device_tables(plan.layout, q)
        tables = (tab["HEAD_PAT"], tab["ROW_PTR"], tab["COLS"], tab["MASK_IDX"], tab["MASKS"])
    else:
        tables = (lengths,) * 5  # never read
    with torch.cuda.device(q.device) if q.is_cuda else _null():
        _decode_kernel[(rows, splits)](
            q, k_cache, v_cache, o, op, lp, lengths, *tables,
            *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *o.stride()[:3],
            H, T, math.log2(math.e) / math.sqrt(D), 0 if plan.layout is None else plan.layout.nb,
            plan.W, plan.P, plan.excl, plan.c, plan.vlo_a, plan.vlo_c, plan.nv, plan.ring, plan.sum_base,
            head_offset, group, RUN=plan.run, SECOND=plan.second, SPLITS=splits, BN=bn, HEAD_D=D, BLOCK_D=block_d,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=TUNE["num_warps"],
            num_stages=TUNE["num_stages"],
        )  # fmt: skip
        if splits > 1:
            _combine_kernel[(rows,)](
                o, op, lp, *o.stride()[:3], H, T,
                SPLITS=splits, BS=triton.next_power_of_2(splits), HEAD_D=D, BLOCK_D=block_d,
            )  # fmt: skip
    return o


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
