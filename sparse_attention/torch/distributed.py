"""Context parallelism: block-sparse attention over a sequence sharded along ``time`` across the
ranks of a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPU).

Each rank holds ``time / world`` tokens of ``q``, ``k``, ``v`` (``[batch, time / world, heads *
head_dim]``) in the order of :meth:`ContextParallel.shard`, and sends and receives only the
key/value blocks that a remote query may read (the plan: :mod:`sparse_attention.sharding`):

* **Forward.** The exchange starts (``batch_isend_irecv``), the shard's queries attend its own
  keys meanwhile, then the queries that see remote keys attend the received blocks; the two
  partial results merge by their log-sum-exps (in the engine's base).
* **Backward.** Each round's backward runs with the merged output and log-sum-exp, so it gives
  exactly the full softmax's gradient restricted to its keys (as in flash attention's split
  passes). The received blocks' key/value gradients go back to their owners, which add them
  to their own; the own round is computed while they travel.

Both rounds run the engine :func:`~sparse_attention.torch.dispatch.choose_engine` picks (the
fused kernels on CUDA, else the block gather). Usage::

    cp = ContextParallel(time, heads, "local", local_attn_ctx=1024, blocksize=64)
    q, k, v = (cp.shard(x) for x in (q_full, k_full, v_full))   # or load the shard directly
    y = cp(q, k, v)                                               # [batch, time / world, dim]
    y_full = cp.gather(y)                                         # every rank gets it all
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.distributed as dist

from ..frontend import kv_heads_of, resolve_spec
from ..layouts import Layout
from ..sharding import ShardPlan, kv_head_mask, shard_plan
from .dispatch import choose_engine, engine_pair
from .reference import check_dtypes, compute_dtype, expand_kv, merge_heads, split_heads, split_qkv

__all__ = ["ContextParallel", "dense_backend", "gather_sequence", "shard_sequence", "sharded_attention"]


class ContextParallel:
    """One pattern over a sequence of ``time`` tokens sharded across ``group``'s ranks.

    Args:
        time: the whole sequence's length (each rank holds ``time / world``).
        heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize: as
            ``blocksparse_attention_impl`` (``attn_mode`` may be a :class:`Layout` of ``time``).
        group: the process group (``None``: the default group).
        balance: ``"contiguous"``, ``"zigzag"`` or ``None`` (zigzag for ``all`` and ``fixed``,
            whose later rows have more keys; see :func:`sparse_attention.sharding.shard_plan`).
        natural_order: shards cut in natural token order and held in it (the order a model shards
            its sequence in, :func:`sparse_attention.sharding.shard_positions`), also for
            ``strided``, which is otherwise sharded in its residue-major order (less exchange).
    """

    def __init__(
        self,
        time,
        heads,
        attn_mode,
        local_attn_ctx=None,
        blocksize=32,
        num_verts=None,
        vertsize=None,
        *,
        group=None,
        balance=None,
        natural_order: bool = False,
    ):
        self.group = group
        self.world = _world(group)
        self.rank = dist.get_rank(group)
        self.heads = heads
        self.layout: Layout = resolve_spec(
            time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, sparse=True
        )
        self.plan: ShardPlan = shard_plan(self.layout, self.world, balance, natural_order)
        self.part = self.plan.rank(self.rank)
        # natural_order with a reordering layout (strided): tensors hold the shard's tokens in natural
        # order and are put in the layout's order inside the call (one gather each way)
        self._order = None
        if natural_order and self.layout.perm is not None:
            tokens = self.plan.positions(self.rank)  # in the layout's order
            to_layout = np.searchsorted(np.sort(tokens), tokens)
            self._order = (torch.from_numpy(to_layout), torch.from_numpy(np.argsort(to_layout)))
        self.sent_bytes = 0  # key/value (forward) and gradient (backward) bytes this rank has sent

    # -- the order of the shards ------------------------------------------------------------
    def positions(self, device=None) -> torch.Tensor:
        """Token indices of this rank's shard, in its order (for positional embeddings)."""
        pos = _positions(self.plan, self.rank, str(device) if device is not None else "cpu")
        return pos if self._order is None else pos.sort().values

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a whole sequence ``x`` (``x.shape[dim] == time``)."""
        if x.shape[dim] != self.layout.time:
            raise ValueError(
                f"x.shape[{dim}] must be the whole sequence's time ({self.layout.time}), got {x.shape[dim]}"
            )
        return x.index_select(dim, self.positions(x.device))

    def gather(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence, natural order, from every rank's shard ``y`` (an all-gather; not
        differentiable)."""
        if y.shape[dim] != self.plan.shard_time:
            raise ValueError(f"y.shape[{dim}] must be the shard's time ({self.plan.shard_time}), got {y.shape[dim]}")
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        order = torch.cat([_positions(self.plan, r, str(y.device)) for r in range(self.world)])
        if self._order is not None:  # every rank holds its tokens in natural order
            order = order.view(self.world, -1).sort(dim=1).values.reshape(-1)
        out = torch.empty_like(torch.cat(parts, dim))
        return out.index_copy_(dim, order, torch.cat(parts, dim))

    # -- attention ---------------------------------------------------------------------------
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this rank's queries, ``[batch, time / world, heads * head_dim]``."""
        check_dtypes(q, k, v)
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != 3:
                raise ValueError(
                    f"{name} must have shape [batch, time / world, heads * head_dim], got {tuple(x.shape)}"
                )
        if k.shape != v.shape or q.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"q, k, v must have the same batch and time and k, v one shape, got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[1] != self.plan.shard_time:
            raise ValueError(
                f"q has {q.shape[1]} tokens; each of the {self.world} ranks must hold time / world = "
                f"{self.plan.shard_time} (use ContextParallel.shard)"
            )
        if q.shape[2] % self.heads:
            raise ValueError(f"dim ({q.shape[2]}) must be divisible by heads ({self.heads})")
        kv_heads_of(q.shape[2], k.shape[2], self.heads)  # grouped-query attention: k, v of fewer heads
        qh = split_heads(q, self.heads)
        lays = [self.part.own] + ([self.part.remote] if self.part.remote is not None else [])
        index = max(choose_engine(qh, lay) for lay in lays)  # fused only if both rounds run fused
        if self._order is None:
            return _Sharded.apply(q, k, v, self, index)
        cache = self.__dict__.setdefault("_order_on", {})
        if str(q.device) not in cache:  # once per device: a copy per call would wait for queued kernels
            cache[str(q.device)] = tuple(x.to(q.device) for x in self._order)
        to_layout, back = cache[str(q.device)]
        q, k, v = (x.index_select(1, to_layout) for x in (q, k, v))
        return _Sharded.apply(q, k, v, self, index).index_select(1, back)

    def exchanged_bytes(self, batch: int, dim: int, itemsize: int, kv_heads: int | None = None) -> int:
        """Key/value bytes all ranks send in one forward pass (the backward sends as many back);
        ``kv_heads``: grouped-query attention (:meth:`ShardPlan.exchanged_bytes`)."""
        return self.plan.exchanged_bytes(batch, dim, itemsize, kv_heads)


@functools.cache
def _positions(plan: ShardPlan, rank: int, device: str) -> torch.Tensor:
    return torch.from_numpy(plan.positions(rank)).to(device)


@functools.lru_cache(maxsize=16)
def _context(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, group, balance):
    mode = attn_mode.layout if isinstance(attn_mode, _Keyed) else attn_mode
    return ContextParallel(
        time, heads, mode, local_attn_ctx, blocksize, num_verts, vertsize, group=group, balance=balance
    )


def _cached_context(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, group, balance):
    """The :class:`ContextParallel` of these arguments (cached: the plan is made once)."""
    mode = _Keyed(attn_mode) if isinstance(attn_mode, Layout) else attn_mode
    return _context(time, heads, mode, local_attn_ctx, blocksize, num_verts, vertsize, group, balance)


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised (dist.init_process_group)")
    return dist.get_world_size(group)


class _Keyed:
    """A layout hashed by identity, so the context cache holds it without comparing arrays."""

    def __init__(self, layout):
        self.layout = layout

    def __hash__(self):
        return id(self.layout)

    def __eq__(self, other):
        return isinstance(other, _Keyed) and other.layout is self.layout


def sharded_attention(
    q,
    k,
    v,
    heads,
    attn_mode,
    local_attn_ctx=None,
    blocksize=32,
    num_verts=None,
    vertsize=None,
    *,
    group=None,
    balance=None,
):
    """``blocksparse_attention_impl`` over a sequence sharded across ``group``'s ranks: ``q, k, v``
    are this rank's ``[batch, time / world, heads * head_dim]`` shard in :func:`shard_sequence`'s
    order; returns this rank's output rows. Differentiable. See :class:`ContextParallel`."""
    if q.dim() != 3:
        raise ValueError(f"q must have shape [batch, time / world, heads * head_dim], got {tuple(q.shape)}")
    time = q.shape[1] * _world(group)
    cp = _cached_context(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, group, balance)
    return cp(q, k, v)


def shard_sequence(
    x,
    heads,
    attn_mode,
    local_attn_ctx=None,
    blocksize=32,
    num_verts=None,
    vertsize=None,
    *,
    group=None,
    balance=None,
    dim=1,
):
    """This rank's shard of the whole sequence ``x`` in the order :func:`sharded_attention` expects."""
    _world(group)
    time = x.shape[dim]
    cp = _cached_context(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, group, balance)
    return cp.shard(x, dim)


def gather_sequence(
    y,
    heads,
    attn_mode,
    local_attn_ctx=None,
    blocksize=32,
    num_verts=None,
    vertsize=None,
    *,
    group=None,
    balance=None,
    dim=1,
):
    """The whole sequence (natural order, on every rank) from each rank's shard ``y``."""
    time = y.shape[dim] * _world(group)
    cp = _cached_context(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, group, balance)
    return cp.gather(y, dim)


# -- the exchange ----------------------------------------------------------------------------------


def _block_index(cp: ContextParallel, key, local_blocks: np.ndarray, device) -> torch.Tensor:
    """Token indices of ``local_blocks`` (cached per context, key and device: a host-to-device copy
    per call would wait for the queued kernels)."""
    cache = cp.__dict__.setdefault("_indices", {})
    k = (key, str(device))
    if k not in cache:
        b = cp.layout.blocksize
        pos = (local_blocks[:, None] * b + np.arange(b)).reshape(-1)
        cache[k] = torch.from_numpy(pos).to(device)
    return cache[k]


def _exchange(cp: ContextParallel, outgoing: dict, incoming: dict):
    """Start sending ``outgoing[peer]`` and receiving into ``incoming[peer]`` (tensors); returns
    the requests to wait on."""
    ops = []
    cp.sent_bytes += sum(buf.numel() * buf.element_size() for buf in outgoing.values())
    for peer, buf in incoming.items():
        ops.append(dist.P2POp(dist.irecv, buf, _global(cp, peer), cp.group))
    for peer, buf in outgoing.items():
        ops.append(dist.P2POp(dist.isend, buf, _global(cp, peer), cp.group))
    return dist.batch_isend_irecv(ops) if ops else []


def _global(cp: ContextParallel, rank: int) -> int:
    return rank if cp.group is None else dist.get_global_rank(cp.group, rank)


def _rows(x: torch.Tensor, rows: torch.Tensor, every: bool) -> torch.Tensor:
    """Rows ``rows`` of ``x [B, H, t, ...]`` (``every``: all of them, in order: no copy)."""
    return x if every else x.index_select(2, rows)


def _wait(reqs):
    for r in reqs:
        r.wait()


LN2 = math.log(2.0)


def _lse_merge(o1, l1, o2, l2):
    """``(o, lse)`` of the union of two disjoint key sets from each one's ``(o, lse)`` (natural
    log-sum-exps); a row with no key in a part has ``lse = +inf`` there (the engines' convention)
    and in the result only if it has none in both."""
    cd = l1.dtype
    a = torch.where(torch.isinf(l1), -math.inf, l1)
    b = torch.where(torch.isinf(l2), -math.inf, l2)
    m = torch.maximum(a, b)
    m = torch.where(torch.isinf(m), 0.0, m)
    w1, w2 = torch.exp(a - m), torch.exp(b - m)
    z = w1 + w2
    o = (o1.to(cd) * w1[..., None] + o2.to(cd) * w2[..., None]) / torch.where(z > 0, z, 1.0)[..., None]
    lse = torch.where(z > 0, m + torch.log(torch.where(z > 0, z, 1.0)), math.inf)
    return o.to(o1.dtype), lse


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [B, H, t, ...]`` with rows appended (zeros) up to ``n`` along dim 2."""
    if x.shape[2] >= n:
        return x
    pad = x.new_zeros(*x.shape[:2], n - x.shape[2], *x.shape[3:])
    return torch.cat([x, pad], 2)


class _Round:
    """One round of a rank: ``fwd(q, k, v) -> (o, lse)`` and ``bwd(do, q, k, v, o, lse) -> (dq, dk,
    dv)`` with natural log-sum-exps, over ``[B, H, t, D]``. A round that is plain causal or full
    attention runs PyTorch's flash attention (CUDA half precision; the CPU's flash kernel for any
    float dtype), the rest the block-sparse engine ``index`` over its layout (``pad``: rows and
    keys padded to the layout's square)."""

    def __init__(self, layout, index: int, q, dense: str | None):
        self.layout, self.dense, self.pad = layout, None, layout.time if layout is not None else 0
        if dense is not None and _flash_runs(q):
            self.dense, self.pad = dense, 0
        self.engine = engine_pair(index)

    def fwd(self, q, k, v):
        if self.dense is not None:  # PyTorch's dense kernels take one key/value head per query head
            H = q.shape[1]
            o, lse, self.aux = _flash_fwd(q, expand_kv(k, H), expand_kv(v, H), self.dense == "causal")
            return o, lse
        fwd, _, base2 = self.engine
        q, k, v = (_pad_rows(x, self.pad) for x in (q, k, v))
        o, lse = fwd(q, k, v, self.layout)
        return o, lse * LN2 if base2 else lse

    def bwd(self, do, q, k, v, o, lse):
        if self.dense is not None:
            H, HK = q.shape[1], k.shape[1]
            dq, dk, dv = _flash_bwd(do, q, expand_kv(k, H), expand_kv(v, H), o, lse, self.dense == "causal", self.aux)
            if HK != H:  # each key/value head's gradient: the sum over its group, in the compute dtype
                dk, dv = (x.unflatten(1, (HK, H // HK)).to(compute_dtype(x.dtype)).sum(2).to(x.dtype) for x in (dk, dv))
            return dq, dk, dv
        _, bwd, base2 = self.engine
        do, q, k, v, o, lse = (_pad_rows(x, self.pad) for x in (do, q, k, v, o, lse))
        return bwd(do, q, k, v, o, lse / LN2 if base2 else lse, self.layout)


def _flash_runs(q) -> bool:
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    return q.dtype in (torch.float32, torch.float64)


def _flash_fwd(q, k, v, causal: bool):
    """``(o, lse [B, H, t] natural, aux)``; ``aux``: what the backward takes back from the forward.
    CUDA: cuDNN's attention where it passes :func:`_cudnn_ok` (the kernel SDPA itself picks on
    Hopper), else flash attention's."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if not q.is_cuda:
        return (*torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale), None)
    if _cudnn_ok(str(q.device), q.dtype):
        return _cudnn_fwd(q, k, v, causal, scale)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    # (cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused), as SDPA's own backward takes them
    return out[0], out[1], ("flash", *out[2:8])


def _cudnn_fwd(q, k, v, causal: bool, scale: float):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    o, lse = out[0], out[1]
    # (lse's own shape, philox_seed, philox_offset, cum_seq_q, cum_seq_k, max_q, max_k)
    aux = ("cudnn", lse.shape, out[6], out[7], out[2], out[3], out[4], out[5])
    return o, lse.reshape(lse.shape[:3]), aux


def _flash_bwd(do, q, k, v, o, lse, causal: bool, aux):
    scale = 1.0 / math.sqrt(q.shape[-1])
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.contiguous(), q, k, v, o, lse, 0.0, causal, scale=scale
        )
    if aux[0] == "cudnn":
        shape, seed, offset, cq, ck, mq, mk = aux[1:]
        bias = None  # the undefined tensor SDPA's own backward passes (an empty one is refused)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do,
            q,
            k,
            v,
            o,
            lse.reshape(shape).contiguous(),
            seed,
            offset,
            bias,
            cq,
            ck,
            mq,
            mk,
            0.0,
            causal,
            scale=scale,
        )
    cq, ck, mq, mk, seed, offset = aux[1:]
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale
    )


def dense_backend(q: torch.Tensor) -> str | None:
    """The kernel that runs the plain causal and full-rectangle rounds for tensors like ``q``:
    ``"cudnn"``, ``"flash"``, ``"cpu-flash"``, or None (the block-sparse engine runs them)."""
    if not _flash_runs(q):
        return None
    if not q.is_cuda:
        return "cpu-flash"
    return "cudnn" if _cudnn_ok(str(q.device), q.dtype) else "flash"


@functools.cache
def _cudnn_ok(device: str, dtype) -> bool:
    """Whether cuDNN's attention runs here and agrees with flash attention (forward, log-sum-exp
    and gradients; causal square and full rectangle), checked once per device and dtype."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        for causal, tq in ((True, 256), (False, 128)):
            q = torch.randn(1, 2, tq, 64, device=device, dtype=dtype, generator=g)
            k, v, do = (torch.randn(1, 2, n, 64, device=device, dtype=dtype, generator=g) for n in (256, 256, tq))
            scale = 0.125
            o1, l1, aux = _cudnn_fwd(q, k, v, causal, scale)
            ref = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            if not (torch.allclose(o1.float(), ref[0].float(), atol=2e-2) and torch.allclose(l1, ref[1], atol=2e-2)):
                return False
            g1 = _flash_bwd(do, q, k, v, o1, l1, causal, aux)
            g2 = _flash_bwd(do, q, k, v, ref[0], ref[1], causal, ("flash", *ref[2:8]))
            if not all(torch.allclose(a.float(), b.float(), atol=5e-2) for a, b in zip(g1, g2)):
                return False
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


class _Groups:
    """The blocks exchanged with one peer, grouped by the heads that read them (only those heads
    travel): per group, the token indices on this side (``tok``) and the heads (``heads``, None:
    all). Built once per context, peer and direction, and the same on both sides (both derive it
    from the receiver's need in the plan)."""

    def __init__(self, slots: np.ndarray, mask: np.ndarray, blocksize: int, device):
        heads = mask.shape[1]
        keys, inverse = np.unique(mask, axis=0, return_inverse=True)
        self.groups = []
        for g, key in enumerate(keys):
            sel = slots[inverse.reshape(-1) == g]
            tok = torch.from_numpy((sel[:, None] * blocksize + np.arange(blocksize)).reshape(-1)).to(device)
            hs = None if key.all() else torch.from_numpy(np.nonzero(key)[0]).to(device)
            self.groups.append((tok, hs, int(key.sum()) if hs is not None else heads))
        # one group of every head over slots 0, 1, ...: the buffer is the tensor itself (no gather)
        self.whole = (
            len(self.groups) == 1 and self.groups[0][1] is None and np.array_equal(slots, np.arange(len(slots)))
        )

    def numel(self, batch: int, head_dim: int) -> int:
        """Elements of one packed buffer: keys and values (or their gradients) of every group."""
        return 2 * sum(tok.numel() * nh for tok, _, nh in self.groups) * batch * head_dim

    def pack(self, k, v, heads: int):
        """One flat buffer of the groups' rows and heads of ``k, v`` (``[b, t, heads * d]``)."""
        if self.whole and k.shape[1] == self.groups[0][0].numel():
            return torch.cat([k.reshape(-1), v.reshape(-1)])
        parts = []
        for tok, hs, _ in self.groups:
            for x in (k, v):
                y = x.index_select(1, tok)
                if hs is not None:
                    y = y.view(*y.shape[:2], heads, -1).index_select(2, hs)
                parts.append(y.reshape(-1))
        return torch.cat(parts)

    def unpack(self, flat, batch: int, heads: int, head_dim: int):
        """``(tok, heads or None, k piece, v piece)`` per group from a buffer of :meth:`pack`;
        pieces ``[b, n, heads of the group, d]``."""
        at = 0
        for tok, hs, nh in self.groups:
            n = batch * tok.numel() * nh * head_dim
            kp = flat[at : at + n].view(batch, tok.numel(), nh, head_dim)
            vp = flat[at + n : at + 2 * n].view(batch, tok.numel(), nh, head_dim)
            at += 2 * n
            yield tok, hs, kp, vp


def _groups(cp: ContextParallel, direction: str, peer: int, device, kv_heads: int) -> _Groups:
    cache = cp.__dict__.setdefault("_groups", {})
    key = (direction, peer, str(device), kv_heads)
    if key not in cache:
        part = cp.part
        if direction == "send":
            slots, mask = part.send[peer], part.send_heads[peer]
        else:  # slots of the received blocks in the concatenated receive buffer (sources in order)
            offset = sum(len(part.recv[s]) for s in sorted(part.recv) if s < peer)
            slots, mask = offset + np.arange(len(part.recv[peer])), part.recv_heads[peer]
        cache[key] = _Groups(slots, kv_head_mask(mask, kv_heads), cp.layout.blocksize, device)
    return cache[key]


def _put(dst, tok, hs, piece, add: bool):
    """``dst [b, t, heads, d]`` at rows ``tok`` and heads ``hs`` (None: all) := / += ``piece``."""
    if hs is None:
        if add:
            dst.index_add_(1, tok, piece)
        else:
            dst.index_copy_(1, tok, piece)
    elif add:
        dst[:, tok[:, None], hs[None, :]] += piece
    else:
        dst[:, tok[:, None], hs[None, :]] = piece


class _Sharded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, index: int):
        part, b, H = cp.part, cp.layout.blocksize, cp.heads
        dev, B, D = q.device, q.shape[0], q.shape[2] // H
        HK = k.shape[2] // D  # key/value heads (grouped-query attention: fewer than H)
        # the blocks other ranks read, with the (key/value) heads that read them, one flat buffer per peer
        out = {dst: _groups(cp, "send", dst, dev, HK).pack(k, v, HK) for dst in part.send}
        inc = {src: k.new_empty(_groups(cp, "recv", src, dev, HK).numel(B, D)) for src in part.recv}
        reqs = _exchange(cp, out, inc)
        qh, kh, vh = split_qkv(q, k, v, H)
        own = _Round(part.own, index, qh, "causal" if part.own_causal else None)
        t = qh.shape[2]
        o, lse = own.fwd(qh, kh, vh)
        o, lse = o[:, :, :t], lse[:, :, :t]
        kx = vx = rem = None
        _wait(reqs)
        if part.remote is not None:
            # received blocks in source order; heads a block was not sent for stay 0 (never read)
            n = part.recv_blocks * b
            only = _groups(cp, "recv", min(inc), dev, HK)
            if len(inc) == 1 and only.whole:  # one source, every head: views of its buffer
                _, _, kr, vr = next(only.unpack(inc[min(inc)], B, HK, D))
            else:
                kr, vr = (k.new_zeros(B, n, HK, D) for _ in range(2))
                for src in sorted(inc):
                    for tok, hs, kp, vp in _groups(cp, "recv", src, dev, HK).unpack(inc[src], B, HK, D):
                        _put(kr, tok, hs, kp, add=False)
                        _put(vr, tok, hs, vp, add=False)
            kx, vx = (x.transpose(1, 2) for x in (kr, vr))
            rows = _block_index(cp, "rows", part.rows, dev)
            m = rows.numel()
            every = m == t
            rem = _Round(part.remote, index, qh, "full" if part.remote_full else None)
            o2, l2 = rem.fwd(_rows(qh, rows, every), kx, vx)
            om, lm = _lse_merge(_rows(o, rows, every), _rows(lse, rows, every), o2[:, :, :m], l2[:, :, :m])
            o, lse = (om, lm) if every else (o.index_copy(2, rows, om), lse.index_copy(2, rows, lm))
        ctx.save_for_backward(q, k, v, o, lse, kx, vx)
        ctx.cp, ctx.rounds = cp, (own, rem)
        return merge_heads(o)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kx, vx = ctx.saved_tensors
        cp, part, H = ctx.cp, ctx.cp.part, ctx.cp.heads
        dev, B, D = q.device, q.shape[0], q.shape[2] // H
        HK = k.shape[2] // D
        (qh, kh, vh), doh = split_qkv(q, k, v, H), split_heads(do, H)
        t = qh.shape[2]
        back, dqx = {}, None
        if part.remote is not None:
            # the remote round first, so that its key/value gradients travel during the own round
            rows = _block_index(cp, "rows", part.rows, dev)
            m, n = rows.numel(), kx.shape[2]
            every = m == t
            rem = ctx.rounds[1]
            dox, qx, ox, lx = (_rows(x, rows, every) for x in (doh, qh, o, lse))
            dqx, dkx, dvx = rem.bwd(dox, qx, kx, vx, ox, lx)
            dkr, dvr = (merge_heads(x[:, :, :n]) for x in (dkx, dvx))
            back = {src: _groups(cp, "recv", src, dev, HK).pack(dkr, dvr, HK) for src in part.recv}
        inc = {dst: k.new_empty(_groups(cp, "send", dst, dev, HK).numel(B, D)) for dst in part.send}
        reqs = _exchange(cp, back, inc)
        own = ctx.rounds[0]
        dq, dk, dv = (merge_heads(x[:, :, :t]) for x in own.bwd(doh, qh, kh, vh, o, lse))
        if dqx is not None:
            dqx = merge_heads(dqx[:, :, :m])
            dq = dq + dqx if every else dq.index_add(1, rows, dqx)
        _wait(reqs)
        if inc:
            dk, dv = dk.contiguous().view(B, t, HK, D), dv.contiguous().view(B, t, HK, D)
            for dst in sorted(inc):
                for tok, hs, kp, vp in _groups(cp, "send", dst, dev, HK).unpack(inc[dst], B, HK, D):
                    _put(dk, tok, hs, kp, add=True)
                    _put(dv, tok, hs, vp, add=True)
            dk, dv = dk.view(B, t, HK * D), dv.view(B, t, HK * D)
        return dq, dk, dv, None, None
