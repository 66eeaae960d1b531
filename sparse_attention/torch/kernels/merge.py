"""Row-wise Triton kernels that merge the two passes of a ``local | strided`` head
(``torch/merged.py``, the paper's eq. 7) on the fused path.

Written as eager torch, the merge is a dozen float32 passes over ``[batch, heads, time,
head_dim]`` tensors per call (forward and backward), each a separate kernel that cannot be fused
inside the custom op; on the H100 that made the merged head cost more than the two attention
passes themselves. Here each operand is read once and each result written once.

Scores and log-sum-exps are base 2, as the attention kernels keep them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

ROWS = 32  # rows (tokens) per program


@triton.jit
def _program_rows(T, H, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr):
    """This program's rows: ``(bh, b, h, t, d, rm, m2)``, the (batch, head) pair and its parts, ``BT``
    positions ``t`` of that head and the ``BLOCK_D`` columns ``d``, the positions inside time
    (``rm``) and the elements inside the tensor (``m2``, ``[BT, BLOCK_D]``)."""
    pid = tl.program_id(0)
    nt = tl.cdiv(T, BT)
    bh = pid // nt
    b = bh // H
    h = bh % H
    t = (pid % nt) * BT + tl.arange(0, BT)
    d = tl.arange(0, BLOCK_D)
    rm = t < T
    m2 = rm[:, None] & (d[None, :] < HEAD_D)
    return bh, b, h, t, d, rm, m2


@triton.jit
def _rows(base, b, h, t, sb, sh, st, offs_d):
    """Pointers to the ``[ROWS, BLOCK_D]`` tile of rows ``t`` of head ``(b, h)``."""
    return base + b.to(tl.int64) * sb + h.to(tl.int64) * sh + t.to(tl.int64)[:, None] * st + offs_d[None, :]


@triton.jit
def _merge_fwd_kernel(
    Q,
    K,
    V,
    O1,
    O2,
    L1,
    L2,
    O,
    LSE,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    s1b,
    s1h,
    s1t,
    s2b,
    s2h,
    s2t,
    sob,
    soh,
    sot,
    T,
    H,
    qk_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BT: tl.constexpr,
):
    # float scalars in float32 however they come (Inductor passes Python floats as constants)
    qk_scale = tl.cast(qk_scale, tl.float32)
    bh, b, h, t, d, rm, m2 = _program_rows(T, H, HEAD_D, BLOCK_D, BT)
    q = tl.load(_rows(Q, b, h, t, sqb, sqh, sqt, d), mask=m2, other=0.0).to(tl.float32)
    k = tl.load(_rows(K, b, h, t, skb, skh, skt, d), mask=m2, other=0.0).to(tl.float32)
    lrow = bh.to(tl.int64) * T + t
    l1 = tl.load(L1 + lrow, mask=rm, other=0.0)
    l2 = tl.load(L2 + lrow, mask=rm, other=0.0)
    m = tl.maximum(l1, l2)  # both passes hold the diagonal key: finite, >= its score
    w1 = tl.exp2(l1 - m)
    w2 = tl.exp2(l2 - m)
    wd = tl.exp2(tl.sum(q * k, 1) * qk_scale - m)  # the diagonal, counted by both passes
    z = w1 + w2 - wd
    o1 = tl.load(_rows(O1, b, h, t, s1b, s1h, s1t, d), mask=m2, other=0.0).to(tl.float32)
    o2 = tl.load(_rows(O2, b, h, t, s2b, s2h, s2t, d), mask=m2, other=0.0).to(tl.float32)
    v = tl.load(_rows(V, b, h, t, svb, svh, svt, d), mask=m2, other=0.0).to(tl.float32)
    o = (o1 * w1[:, None] + o2 * w2[:, None] - v * wd[:, None]) / z[:, None]
    tl.store(_rows(O, b, h, t, sob, soh, sot, d), o.to(O.dtype.element_ty), mask=m2)
    tl.store(LSE + lrow, m + tl.log2(z), mask=rm)


@triton.jit
def _merge_bwd_kernel(
    DO,
    Q,
    K,
    V,
    O,
    LSE,
    DQ,
    DK,
    DV,
    DQ2,
    DK2,
    DV2,
    sdb,
    sdh,
    sdt,
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
    sgb,
    sgh,
    sgt,
    T,
    H,
    qk_scale,
    sm_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BT: tl.constexpr,
):
    # float scalars in float32 however they come (Inductor passes Python floats as constants)
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    bh, b, h, t, d, rm, m2 = _program_rows(T, H, HEAD_D, BLOCK_D, BT)
    do = tl.load(_rows(DO, b, h, t, sdb, sdh, sdt, d), mask=m2, other=0.0).to(tl.float32)
    q = tl.load(_rows(Q, b, h, t, sqb, sqh, sqt, d), mask=m2, other=0.0).to(tl.float32)
    k = tl.load(_rows(K, b, h, t, skb, skh, skt, d), mask=m2, other=0.0).to(tl.float32)
    v = tl.load(_rows(V, b, h, t, svb, svh, svt, d), mask=m2, other=0.0).to(tl.float32)
    o = tl.load(_rows(O, b, h, t, sob, soh, sot, d), mask=m2, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + t, mask=rm, other=0.0)
    p = tl.exp2(tl.sum(q * k, 1) * qk_scale - lse)  # the diagonal's probability
    ds = p * (tl.sum(do * v, 1) - tl.sum(do * o, 1)) * sm_scale
    g = _rows(DQ, b, h, t, sgb, sgh, sgt, d)
    g2 = _rows(DQ2, b, h, t, sgb, sgh, sgt, d)
    dq = tl.load(g, mask=m2, other=0.0).to(tl.float32) + tl.load(g2, mask=m2, other=0.0).to(tl.float32)
    tl.store(g, (dq - ds[:, None] * k).to(DQ.dtype.element_ty), mask=m2)
    g = _rows(DK, b, h, t, sgb, sgh, sgt, d)
    g2 = _rows(DK2, b, h, t, sgb, sgh, sgt, d)
    dk = tl.load(g, mask=m2, other=0.0).to(tl.float32) + tl.load(g2, mask=m2, other=0.0).to(tl.float32)
    tl.store(g, (dk - ds[:, None] * q).to(DK.dtype.element_ty), mask=m2)
    g = _rows(DV, b, h, t, sgb, sgh, sgt, d)
    g2 = _rows(DV2, b, h, t, sgb, sgh, sgt, d)
    dv = tl.load(g, mask=m2, other=0.0).to(tl.float32) + tl.load(g2, mask=m2, other=0.0).to(tl.float32)
    tl.store(g, (dv - p[:, None] * do).to(DV.dtype.element_ty), mask=m2)


def _on_device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_consts(q: torch.Tensor) -> tuple[tuple[int], dict]:
    B, H, T, D = q.shape
    grid = (B * H * -(-T // ROWS),)
    return grid, dict(HEAD_D=D, BLOCK_D=max(16, 1 << (D - 1).bit_length()), BT=ROWS)


def merge_forward(q, k, v, o1, l1, o2, l2):
    """``(o, lse)`` of the union from the passes' ``(o1, l1)`` and ``(o2, l2)`` (base-2
    log-sum-exps ``[B, H, T]``, contiguous, as ``launch.forward`` returns them)."""
    from .launch import last_dim_contiguous, launcher, new_output

    q, k, v, o1, o2 = (last_dim_contiguous(x) for x in (q, k, v, o1, o2))
    B, H, T, D = q.shape
    o = new_output(q)
    lse = new_output(q, (B, H, T), torch.float32)
    grid, consts = _launch_consts(q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o1.stride()[:3], *o2.stride()[:3])
    with _on_device(q):
        launcher(_merge_fwd_kernel, q)[grid](
            q, k, v, o1, o2, l1.contiguous(), l2.contiguous(), o, lse, *strides, *o.stride()[:3],
            T, H, math.log2(math.e) / math.sqrt(D), **consts,
        )  # fmt: skip
    return o, lse


def merge_backward(do, q, k, v, o, lse, g1, g2):
    """The union's ``(dq, dk, dv)`` from the passes' gradients ``g1`` and ``g2`` (each computed
    with the merged ``o`` and ``lse``): their sum less the diagonal's share, counted twice.
    Written into ``g1``'s tensors (fresh outputs of ``launch.backward``), which it returns."""
    from .launch import last_dim_contiguous, launcher

    do, q, k, v, o = (last_dim_contiguous(x) for x in (do, q, k, v, o))
    if any(x.stride() != g1[0].stride() for x in (*g1, *g2)):  # the kernel takes one set of strides
        g1, g2 = (tuple(x.contiguous() for x in g) for g in (g1, g2))
    B, H, T, D = q.shape
    grid, consts = _launch_consts(q)
    strides = (*do.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    with _on_device(q):
        launcher(_merge_bwd_kernel, q)[grid](
            do, q, k, v, o, lse.contiguous(), *g1, *g2, *strides, *g1[0].stride()[:3], T, H,
            math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D), **consts,
        )  # fmt: skip
    return g1
