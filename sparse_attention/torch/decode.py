"""A static key/value cache and one decode step's attention over it.

:class:`StaticKVCache` preallocates every layer's keys and values for ``n_ctx`` positions (or, with
``bounded=True``, only the slots its pattern can still read: :meth:`DecodePlan.bounded`) and keeps
each sequence's length as a tensor, so a decode step does the same work with the same shapes at
every position: nothing grows with the context on the host, and the step can be captured as a
CUDA graph. Sequences of one batch may sit at different positions (prompts of different lengths).

:meth:`CacheLayer.attend` runs the decode kernel (:mod:`.kernels.decode`) on CUDA, one launch per
head group of the layer's pattern. Elsewhere (the CPU) a pattern whose keys are runs in closed
form (:mod:`sparse_attention.decoding`: the built-in modes and their unions) gathers exactly the
slots the kernel would read and attends to them (:func:`_gathered_step`), so a step costs what its
pattern reads, not the whole cache; any other pattern (custom layouts, other unions) runs masked
attention over the cache's slots under the spec's closed form (:meth:`Spec.allowed` at the
positions each slot holds).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..decoding import (
    RUN_GROUP,
    RUN_NONE,
    RUN_WINDOW,
    SECOND_BLOCKS,
    SECOND_STRIDED,
    SECOND_SUMMARY,
    DecodePlan,
    spec_plans,
)
from .reference import masked_attention

# Tests set this (with TRITON_INTERPRET=1) to run the decode kernel on CPU tensors (read when a
# cache is made).
KERNEL_ON_CPU = False
# Off a GPU, a step whose queries read at most this fraction of a cache's slots gathers the keys a
# closed-form plan names; others run masked attention over every slot, as custom layouts do (on 2
# CPU cores, 8 heads, head_dim 64: gathering 128 keys costs about what SDPA over 4,096 does, and
# stays flat as the cache grows). Tests set 0 (always masked) and 1 (always gathered).
GATHER_FRACTION = 0.25


class CacheLayer:
    """One layer's slots: ``k``, ``v`` ``[batch, kv_heads, slots + 1, head_dim]`` and the position
    each slot holds, ``pos [batch, kv_heads, slots + 1]`` (-1: empty); the last slot is a spare
    that takes writes nobody reads. ``kv_heads`` (default ``heads``): grouped-query attention,
    query head ``h`` reads cache head ``h // (heads // kv_heads)``."""

    def __init__(
        self, spec, heads, head_dim, blocksize, batch, n_ctx, dtype, device, bounded, max_query, kv_heads=None
    ):
        self.spec, self.heads, self.blocksize, self.n_ctx = spec, heads, blocksize, n_ctx
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive divisor of heads ({heads}), got {kv_heads!r}")
        self.kv_heads, self.group = kv_heads, heads // kv_heads
        groups = spec_plans(spec, heads, blocksize, n_ctx)
        # one slot layout per layer: bounded only for a single head group with a plan that bounds;
        # a bounded cache keeps each head's own summary keys, so grouped heads need one summary class
        single = len(groups) == 1 and groups[0][2] is not None
        if single and self.group > 1 and groups[0][2].bounded(n_ctx, max_query).sum_base >= 0:
            single = groups[0][2].nv == 1
        if bounded and single:
            cache_plan = groups[0][2].bounded(n_ctx, max_query)
        else:
            cache_plan = DecodePlan(slots=n_ctx)
        self.plan = cache_plan
        self.groups = [(h0, hn, None if p is None else _with_slots(p, cache_plan)) for h0, hn, p in groups]
        self.slots = cache_plan.slots
        S = self.slots + 1
        self.k = torch.zeros(batch, kv_heads, S, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # the decode kernel finds its keys' slots in closed form; the masked path reads positions
        dev = torch.device(device)
        self.kernel = all(p is not None for _, _, p in self.groups) and (dev.type == "cuda" or KERNEL_ON_CPU)
        # off the kernel: the keys a closed form names, or (custom layouts; a step that reads most
        # slots anyway) masked attention over the slots at the positions they hold
        self.gathered = not self.kernel and all(_closed(p) for _, _, p in self.groups)
        self.pos = None if self.kernel else torch.full((batch, kv_heads, S), -1, dtype=torch.int64, device=device)
        self._heads = torch.arange(kv_heads, device=device)
        self.splits: dict = {}

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, kh, vh, lengths, ends=None):
        """Store ``kh, vh [batch, kv_heads, t, d]`` at positions ``lengths[b] + 0 .. t - 1``; those at
        or past ``ends[b]`` (default: all kept) go to the spare slot."""
        B, H, t, D = kh.shape
        pos = lengths[:, None] + torch.arange(t, device=kh.device)  # [B, t]
        end = lengths + t if ends is None else ends
        live = pos < end[:, None]
        p = self.plan
        spare = self.slots
        if p.ring:
            live = live & (pos >= end[:, None] - p.ring)
            run = torch.where(live, pos % p.ring, spare)
        else:
            run = torch.where(live, pos, spare)
        self._put(run[:, None, :].expand(B, H, t), kh, vh, pos)
        if p.sum_base >= 0:
            o = pos[:, None, :] % p.P - (p.vlo_a - (self._heads % p.nv) * p.vlo_c)[None, :, None]
            keep = (pos < end[:, None])[:, None, :] & (o >= 0) & (o < p.c)
            slot = torch.where(keep, p.sum_base + (pos // p.P)[:, None, :] * p.c + o, spare)
            self._put(slot, kh, vh, pos)
        if self.pos is not None:
            self.pos[:, :, spare] = -1

    def _put(self, slot, kh, vh, pos):
        B, H, t, D = kh.shape
        idx = slot[..., None].expand(B, H, t, D)
        self.k.scatter_(2, idx, kh.to(self.k.dtype))
        self.v.scatter_(2, idx, vh.to(self.v.dtype))
        if self.pos is not None:
            self.pos.scatter_(2, slot, pos[:, None, :].expand(B, H, t))

    def reset(self):
        if self.pos is not None:
            self.pos.fill_(-1)

    def attend(self, qh, lengths):
        """Attention of ``qh [batch, heads, t, d]`` at positions ``lengths[b] + 0 .. t - 1`` over
        the cache (their own keys written first)."""
        if self.kernel:
            out = torch.empty(qh.shape, dtype=qh.dtype, device=qh.device)
            return _kernel_step(qh, self.k, self.v, lengths, self.groups, self.n_ctx, out, self.splits)
        if self.gathered:
            out = _gathered_step(qh, self.k, self.v, lengths, self.groups, self.slots)
            if out is not None:
                return out
        i = lengths[:, None] + torch.arange(qh.shape[2], device=qh.device)  # [B, t]
        j = _per_query_head(self.pos[:, :, : self.slots], self.group)
        extra = None
        p = self.plan
        if p.sum_base >= 0:
            # a summary key sits in the summary slots and, while its group is recent, in the ring:
            # earlier groups count from the summary slots, the query's own group from the ring
            summary = torch.arange(self.slots, device=qh.device) >= p.sum_base
            extra = summary == ((j // p.P)[:, :, None, :] < (i // p.P)[:, None, :, None])
        k, v = (_per_query_head(x[:, :, : self.slots], self.group) for x in (self.k, self.v))
        # (a slot holds zeros or keys written before: finite, so masked weights need no zeroing)
        return _masked_step(self.spec, self.heads, self.blocksize, qh, k, v, i, j, j >= 0, extra, finite=True)


def _per_query_head(x, group: int):
    """Cache heads ``[B, kv_heads, ...]`` repeated for their ``group`` query heads each."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _kernel_step(qh, kh, vh, lengths, groups, n_ctx, out, splits=None):
    """The decode kernel on ``qh [B, H, t, d]`` over a cache ``kh, vh [B, kv_heads, slots, d]``
    (``H % kv_heads == 0``), one launch per head group ``(h0, hn, plan)``, into ``out`` (any
    strides); ``splits`` caches the slice counts per group and row count."""
    from .kernels.decode import decode, num_splits

    B, H, t, _ = qh.shape
    group = H // kh.shape[1]
    for h0, hn, plan in groups:
        key = (h0, B * hn * t)
        n = None if splits is None else splits.get(key)
        if n is None:
            n = num_splits(plan, B * hn * t, n_ctx, qh.device)
            if splits is not None:
                splits[key] = n
        sl = slice(h0, h0 + hn)
        decode(qh[:, sl], kh, vh, lengths, plan, n, out=out[:, sl], head_offset=h0, group=group)
    return out


def _closed(plan) -> bool:
    """Whether ``plan`` names its keys in closed form (not a layout's block rows)."""
    return plan is not None and plan.second != SECOND_BLOCKS


def _gathered_step(qh, kh, vh, lengths, groups, slots: int):
    """:func:`_kernel_step` in tensor operations, for any device: per head group, the cache slots
    of the keys each query reads (:func:`_plan_slots`, the decode kernel's enumeration), gathered
    and attended to; ``kh, vh [B, kv_heads, slots, d]`` (``H % kv_heads == 0``). Reads nothing
    else, so slots that hold no key may hold anything. None where a query may read more than
    :data:`GATHER_FRACTION` of the ``slots`` (``all``, a bounded cache): masked attention over
    every slot costs less there than gathering them."""
    B, H, t, D = qh.shape
    group = H // kh.shape[1]
    last = int(lengths.max()) + t
    counts = [max(plan.max_keys(last), 1) for _, _, plan in groups]
    if max(counts) > GATHER_FRACTION * slots:
        return None
    i = lengths[:, None] + torch.arange(t, device=qh.device)  # [B, t]
    outs = []
    for (h0, hn, plan), V in zip(groups, counts):
        slot, valid = _plan_slots(plan, i, torch.arange(h0, h0 + hn, device=qh.device), V)  # [B, hn, t, V]
        # (batch row, key/value head, slot) of each key: only those rows are read, whatever the strides
        rows = torch.arange(B, device=qh.device)[:, None, None]
        kv = (torch.arange(h0, h0 + hn, device=qh.device) // group)[None, :, None]
        k, v = (x[rows, kv, slot.view(B, hn, t * V)].view(B, hn, t, V, D) for x in (kh, vh))
        outs.append(_attend_rows(qh[:, h0 : h0 + hn], k, v, valid))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _attend_rows(q, k, v, valid):
    """Each query ``q [B, h, t, d]`` over its own keys ``k, v [B, h, t, V, d]`` where ``valid``
    ``[B, h, t, V]`` (:func:`masked_attention`, one key row per query); keys not valid may hold
    anything, so their values are zeroed first."""
    v = torch.where(valid[..., None], v, 0)
    return masked_attention(q[..., None, :], k, v, valid[..., None, :])[..., 0, :]


def _plan_slots(plan, i, heads, V: int):
    """``(slot, valid)``, ``[B, len(heads), t, V]``: the cache slots of the keys a query at ``i``
    ``[B, t]`` of head ``heads[h]`` reads under ``plan`` (a closed form: :func:`_closed`), key
    ``v`` of :func:`sparse_attention.decoding.keys`' order, and whether it exists (``v`` below the
    query's count); slot 0 where it does not."""
    I = i[:, None, :, None]  # noqa: E741 - [B, 1, t, 1]
    h = heads[None, :, None, None]
    v = torch.arange(V, device=i.device)
    if plan.second == SECOND_STRIDED:
        n2 = torch.clamp(I - plan.excl - I % plan.P + plan.P, min=0) // plan.P
        second = I % plan.P + v * plan.P
    elif plan.second == SECOND_SUMMARY:
        n2 = I // plan.P * plan.c
        second = v // plan.c * plan.P + (plan.vlo_a - h % plan.nv * plan.vlo_c) + v % plan.c
    else:
        n2, second = torch.zeros_like(I), v
    if plan.run == RUN_WINDOW:
        start = torch.clamp(I - plan.W + 1, min=0)
    elif plan.run == RUN_GROUP:
        start = I // plan.W * plan.W
    else:  # RUN_ALL from 0; RUN_NONE reads no run
        start = torch.zeros_like(I)
    n1 = torch.zeros_like(I) if plan.run == RUN_NONE else I - start + 1
    is2 = v < n2
    pos = torch.where(is2, second, start + (v - n2))
    slot = pos % plan.ring if plan.ring else pos
    if plan.sum_base >= 0:  # a bounded cache keeps summary key v at sum_base + v
        slot = torch.where(is2, plan.sum_base + v, slot)
    shape = (i.shape[0], len(heads), i.shape[1], V)
    valid = (v < n2 + n1).expand(shape)
    return torch.where(valid, slot, 0), valid


def _masked_step(spec, heads, blocksize, qh, kh, vh, i, j, keep, extra=None, finite=False):
    """Masked attention of ``qh [B, H, t, d]`` at positions ``i [B, t]`` over keys at positions ``j``
    (``[B, H or 1, S]``) that count where ``keep`` (same shape) and ``extra`` (``[B, H, t, S]``, if
    given) allow, under the spec's closed form; keys not kept are zeroed first (they may hold NaN),
    unless every slot is known to be ``finite``."""
    h = torch.arange(heads, device=qh.device)[None, :, None, None]
    mask = spec.allowed(i[:, None, :, None], j.clamp(min=0)[:, :, None, :], h, heads, blocksize)
    mask = mask & keep[:, :, None, :]
    if extra is not None:
        mask = mask & extra
    if not finite:
        kh, vh = (torch.where(keep[..., None], x, 0) for x in (kh, vh))
    return masked_attention(qh, kh, vh, mask)


def _with_slots(plan: DecodePlan, cache_plan: DecodePlan) -> DecodePlan:
    return replace(plan, ring=cache_plan.ring, sum_base=cache_plan.sum_base, slots=cache_plan.slots)


class StaticKVCache:
    """Keys and values of ``batch`` sequences for up to ``n_ctx`` positions, preallocated per
    layer (:class:`CacheLayer`), and ``lengths`` (int64 ``[batch]``): the tokens each sequence
    holds. ``layers``: ``(spec, heads, head_dim, blocksize)`` per layer, or ``(spec, heads,
    head_dim, blocksize, kv_heads)`` (grouped-query attention: the cache holds ``kv_heads``)."""

    def __init__(self, layers, batch, n_ctx, dtype, device, bounded=False, max_query=1):
        self.n_ctx, self.bounded, self.max_query = n_ctx, bounded, max_query
        self.layers = [
            CacheLayer(*layer[:4], batch, n_ctx, dtype, device, bounded, max_query, *layer[4:]) for layer in layers
        ]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.ends = None  # during a prefill: each prompt's length (positions past it are padding)
        self.prefilling = False

    def reset(self):
        self.lengths.zero_()
        for layer in self.layers:
            layer.reset()

    def nbytes(self) -> list[int]:
        """Bytes of keys and values per layer."""
        return [layer.nbytes() for layer in self.layers]


def blocksparse_decode(
    q,
    k_cache,
    v_cache,
    lengths,
    heads: int,
    attn_mode,
    local_attn_ctx=None,
    blocksize: int = 32,
    num_verts=None,
    vertsize=None,
):
    """Attention of new tokens over a key/value cache, under the pattern of
    ``blocksparse_attention_impl`` with the same arguments (or a ``Layout`` / pattern spec as
    ``attn_mode``): the decode kernel on CUDA, masked attention elsewhere.

    Args:
        q: ``[batch, t, heads * head_dim]``, the tokens at positions ``lengths[b] + 0 .. t - 1``.
        k_cache, v_cache: ``[batch, n_ctx, heads * head_dim]`` (any row stride), position ``j`` at
            row ``j``; rows ``< lengths[b] + t`` written, the new tokens' included; later rows are
            never read (they may hold anything). Or ``kv_heads * head_dim`` columns with ``heads %
            kv_heads == 0`` (grouped-query attention: query head ``h`` reads cache head ``h //
            (heads // kv_heads)``).
        lengths: int tensor ``[batch]`` (or an int): the tokens each sequence held before these.

    Returns ``[batch, t, heads * head_dim]`` in ``q``'s dtype. Each query ``i`` sees the keys
    ``j < lengths[b] + t`` its pattern allows, as row ``i`` of the full attention would.
    """
    from ..frontend import kv_heads_of
    from ..patterns import Mode, as_spec
    from .reference import check_dtypes

    check_dtypes(q, k_cache, v_cache)
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [batch, time, heads * head_dim], got {tuple(x.shape)}")
    B, t, dim = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B:
        raise ValueError(
            f"k_cache and v_cache must both be [batch={B}, n_ctx, kv_heads * head_dim], got {tuple(k_cache.shape)}, "
            f"{tuple(v_cache.shape)}"
        )
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ValueError(f"heads must be a positive int dividing dim ({dim}), got {heads!r}")
    kv_heads = kv_heads_of(dim, k_cache.shape[2], heads)
    n_ctx = k_cache.shape[1]
    if isinstance(lengths, int):
        lengths = torch.full((B,), lengths, dtype=torch.int64, device=q.device)
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be an int or an int32/int64 tensor [batch], got {type(lengths).__name__}")
    if lengths.shape != (B,) or lengths.device != q.device:
        raise ValueError(f"lengths must be [batch={B}] on {q.device}, got {tuple(lengths.shape)} on {lengths.device}")
    if isinstance(attn_mode, str):
        spec = Mode(attn_mode, local_attn_ctx, num_verts, vertsize)
        period = local_attn_ctx if attn_mode == "strided" and isinstance(local_attn_ctx, int) else 1
        spec.check(blocksize * max(period, 1), heads, blocksize)  # the arguments' errors
    else:
        spec = as_spec(attn_mode)
    d = dim // heads
    qh = q.view(B, t, heads, d).transpose(1, 2)
    kh, vh = (x.view(B, n_ctx, kv_heads, d).transpose(1, 2) for x in (k_cache, v_cache))
    groups = spec_plans(spec, heads, blocksize, n_ctx)
    out = torch.empty(B, t, heads, d, dtype=q.dtype, device=q.device)  # written through a transposed view
    if all(p is not None for _, _, p in groups) and (q.is_cuda or KERNEL_ON_CPU):
        groups = [(h0, hn, replace(p, slots=n_ctx)) for h0, hn, p in groups]
        _kernel_step(qh, kh, vh, lengths, groups, n_ctx, out.transpose(1, 2))
        return out.view(B, t, dim)
    end = int(lengths.max()) + t
    if all(_closed(p) for _, _, p in groups):
        o = _gathered_step(qh, kh, vh, lengths, groups, end)
        if o is not None:
            out.transpose(1, 2).copy_(o)
            return out.view(B, t, dim)
    i = lengths[:, None] + torch.arange(t, device=q.device)  # [B, t]
    j = torch.arange(end, device=q.device).expand(B, 1, end)
    keep = j < (lengths + t)[:, None, None]  # rows past each sequence are not read
    kh, vh = (_per_query_head(x[:, :, :end], heads // kv_heads) for x in (kh, vh))
    o = _masked_step(spec, heads, blocksize, qh, kh, vh, i, j, keep)
    out.transpose(1, 2).copy_(o)
    return out.view(B, t, dim)
