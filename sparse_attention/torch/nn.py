"""``torch.nn`` modules around the block-sparse attention call.

* :class:`SparseAttention` - ``forward(q, k, v)`` on ``[batch, time, dim]``, no parameters (the
  interface other PyTorch ports of the paper expose);
* :class:`SparseSelfAttention` - a self-attention layer: q/k/v and output projections, dropout,
  recompute, the pattern factorisations of :mod:`sparse_attention.patterns`, and a
  key/value cache for autoregressive sampling.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from ..frontend import resolve_spec
from ..layouts import Layout, make_layout, stack_heads
from ..patterns import Custom, Merged, Mode, Spec, as_spec
from . import baselines
from .decode import StaticKVCache
from .dispatch import attention_bhtd, document_attention_bhtd, register_layout
from .merged import merged_attention, merged_document_attention
from .reference import expand_kv, masked_attention

IMPLS = ("sparse", "dense", "sdpa", "flex")
# the sparse prefill and the model pad time to a multiple of this too: the fused kernels cap their
# tiles at the largest power of two dividing time
TILE_QUANTUM = 128


class SparseAttention(nn.Module):
    """Block-sparse attention as a module: ``y = SparseAttention(heads, "fixed", 128, num_verts=4,
    vertsize=1)(q, k, v)``.

    Args: those of :func:`sparse_attention.blocksparse_attention_impl` (``attn_mode`` may also be
    a :class:`Layout` or a pattern spec of :mod:`sparse_attention.patterns`, e.g.
    ``Merged(Mode("local", 128), Mode("strided", 128))``).

    ``forward(q, k, v, *, cu_seqlens=None)``: ``[batch, time, heads * head_dim]`` -> the same
    shape, dtype of ``q``; ``cu_seqlens``: packed documents (``batch`` 1, as in
    :func:`sparse_attention.blocksparse_attention_impl`), each under the pattern restarted at its
    first token, for ``impl`` ``"sparse"`` (patterns of built-in modes: a mode, or per-head
    groups of modes) and ``"dense"`` (any spec). Under ``torch.compile`` pass a tensor (a CPU one
    avoids a sync): a new batch of documents recompiles nothing.
    """

    def __init__(
        self,
        heads: int,
        attn_mode="all",
        local_attn_ctx=None,
        blocksize: int = 32,
        num_verts=None,
        vertsize=None,
        recompute: bool = False,
        impl: str = "sparse",
    ):
        super().__init__()
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be True or False, got {recompute!r}")
        if isinstance(attn_mode, str):
            spec = Mode(attn_mode, local_attn_ctx, num_verts, vertsize)
        else:
            if local_attn_ctx is not None or num_verts is not None or vertsize is not None:
                raise ValueError(
                    "local_attn_ctx, num_verts and vertsize go with a mode name; a Layout "
                    "or a pattern spec carries its own parameters"
                )
            spec = as_spec(attn_mode)
        self.heads, self.spec, self.blocksize = heads, spec, blocksize
        self.recompute, self.impl = recompute, impl
        self._layouts: dict = {}
        self._block_masks: dict = {}
        self.context = None  # (group, balance) under context parallelism: see context_parallel
        self._contexts: dict = {}

    def extra_repr(self):
        return f"heads={self.heads}, spec={self.spec}, blocksize={self.blocksize}, impl={self.impl!r}"

    def context_parallel(self, group=None, balance: str = "zigzag") -> None:
        """Take ``q, k, v`` from now on as this rank's shard of a sequence split over ``group``'s
        ranks (:mod:`sparse_attention.torch.distributed`; tokens at
        :func:`sparse_attention.sharding.shard_positions`, natural order, also for ``strided``);
        ``group=False`` turns it off. Needs ``impl="sparse"`` and a pattern with one layout over
        all heads (:func:`context_layout`)."""
        if group is False:
            self.context = None
            return
        if self.impl != "sparse":
            raise ValueError(f"context parallelism needs impl='sparse', this module has impl={self.impl!r}")
        self.context = (group, balance)
        self._contexts.clear()

    def forward(self, q, k, v, *, cu_seqlens=None):
        if self.context is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens does not run under context parallelism (one sequence over ranks)")
            return self._sharded(q, k, v)
        return self.forward_unsharded(q, k, v, cu_seqlens=cu_seqlens)

    def forward_unsharded(self, q, k, v, *, cu_seqlens=None):
        """``forward`` on a whole sequence, whatever :meth:`context_parallel` set (generation)."""
        T = q.shape[1]
        layouts = None
        if self.impl == "sparse":
            layouts = self._layouts.get(T)
            if layouts is None:
                layouts = self._layouts[T] = resolve_layouts(self.spec, T, self.heads, self.blocksize)
        return attend(
            q,
            k,
            v,
            self.heads,
            self.spec,
            self.blocksize,
            self.impl,
            self.recompute,
            block_mask=self._block_masks.get(T),
            layouts=layouts,
            cu_seqlens=cu_seqlens,
        )

    @torch.compiler.disable
    def _sharded(self, q, k, v):
        # not traced: the plan is numpy, the exchange torch.distributed point-to-point calls (a
        # compiled model runs this part eagerly, one graph break per layer)
        import torch.distributed as dist

        from .distributed import ContextParallel

        group, balance = self.context
        T = q.shape[1] * dist.get_world_size(group)
        cp = self._contexts.get(T)
        if cp is None:
            lay = context_layout(self.spec, T, self.heads, self.blocksize)
            cp = ContextParallel(T, self.heads, lay, group=group, balance=balance, natural_order=True)
            self._contexts[T] = cp
        return cp(q, k, v)

    def prepare(self, time: int, device) -> None:
        """Build what depends on the context only (the layouts, FlexAttention's block mask) ahead
        of ``torch.compile``, so that the compiled forward only reads it."""
        if self.impl == "sparse" and time not in self._layouts:
            self._layouts[time] = resolve_layouts(self.spec, time, self.heads, self.blocksize)
        if self.impl == "flex":
            self._block_masks[time] = baselines.flex_block_mask(self.spec, self.heads, time, self.blocksize, device)

    def mask(self, i, j):
        """Allowed pairs ``bool [heads or 1, len(i), len(j)]`` for position tensors ``i``, ``j``."""
        return self.spec.mask(i, j, self.heads, self.blocksize)


def context_layout(spec: Spec, time: int, heads: int, blocksize: int) -> Layout:
    """The one layout over all heads that context parallelism shards: a built-in mode, a custom
    layout, a spec with a ``layout`` method (``Group``, ``Merged``), or per-head groups in natural
    token order stacked (:func:`~sparse_attention.layouts.stack_heads`). Raises ``ValueError`` for
    per-head groups that mix token orders (``strided`` beside another pattern)."""
    groups = resolve_layouts(spec, time, heads, blocksize)
    if len(groups) == 1 and groups[0][1] == heads and isinstance(groups[0][2], Layout):
        return groups[0][2]
    if hasattr(spec, "layout"):
        return spec.layout(time, heads, blocksize)
    if all(isinstance(lay, Layout) and lay.perm is None for _, _, lay in groups):
        return stack_heads(groups)  # per-head groups in natural order: one layout, patterns side by side
    raise ValueError(
        f"context parallelism shards one layout over all heads; the head groups of {spec} do not share a "
        "token order (strided reorders its tokens): use one mode, a Merged spec or a custom layout"
    )


def resolve_layouts(spec: Spec, time: int, heads: int, blocksize: int) -> list:
    """``[(first_head, n_heads, Layout)]``: the block layouts of a spec at one context (a pair
    ``(local, strided)`` of layouts for a merged ``local | strided`` head)."""
    spec.check(time, heads, blocksize)
    out = []
    for h0, hn, mode, sub in spec.groups(heads):
        if isinstance(mode, str):
            kw = sub.kwargs(blocksize)
            lay = make_layout(
                time, hn, mode, kw.get("local_attn_ctx"), blocksize, kw.get("num_verts"), kw.get("vertsize")
            )
        elif isinstance(mode, Layout):
            lay = resolve_spec(time, hn, mode, None, blocksize, None, None, sparse=True)
        elif isinstance(mode, Merged) and mode.local_strided() is not None:
            # eq. 7's local | strided: two fast passes merged exactly (torch.merged)
            L, l = mode.local_strided()
            lay = (make_layout(time, hn, "local", L, blocksize), make_layout(time, hn, "strided", l, blocksize))
            out.append((h0, hn, lay))
            continue
        else:
            lay = mode.layout(time, hn, blocksize)
        if lay.mode == "custom":
            # custom layouts must be registered with the op before torch.compile traces a call
            register_layout(lay)
        out.append((h0, hn, lay))
    return out


def attend(
    q,
    k,
    v,
    heads: int,
    spec: Spec,
    blocksize: int,
    impl: str = "sparse",
    recompute: bool = False,
    block_mask=None,
    layouts=None,
    cu_seqlens=None,
):
    """Attention of ``[batch, time, heads * d]`` tensors under a pattern spec, through ``impl``:
    ``"sparse"`` (the library's block-sparse op, fused kernels on CUDA), ``"dense"`` (the
    library's dense reference ``attention_impl``), ``"sdpa"`` (``F.scaled_dot_product_attention``,
    causal, or a dense mask) or ``"flex"`` (FlexAttention, the spec's closed form as ``mask_mod``).

    ``layouts`` (from :func:`resolve_layouts`) and ``block_mask`` (from
    :func:`sparse_attention.torch.baselines.flex_block_mask`)
    may be given precomputed, as ``torch.compile`` wants. ``cu_seqlens``: packed documents
    (``impl`` ``"sparse"`` or ``"dense"``; see :class:`SparseAttention`).
    """
    B, T, dim = q.shape
    if impl == "sparse":
        if layouts is None:
            layouts = resolve_layouts(spec, T, heads, blocksize)
        if recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(_sparse_groups, q, k, v, layouts, cu_seqlens, use_reentrant=False)
        return _sparse_groups(q, k, v, layouts, cu_seqlens)
    spec.check(T, heads, blocksize)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if cu_seqlens is not None and impl != "dense":
        raise ValueError(f"cu_seqlens runs with impl 'sparse' or 'dense', not {impl!r}")
    qh, kh, vh = (x.view(B, T, -1, dim // heads).transpose(1, 2) for x in (q, k, v))
    if impl == "sdpa":
        oh = baselines.sdpa_attention(qh, kh, vh, spec, blocksize)
    elif impl == "flex":
        oh = baselines.flex_attention(qh, kh, vh, spec, blocksize, block_mask)
    else:  # the library's dense reference (attention_impl), under the spec's closed form
        pos = torch.arange(T, device=q.device)
        if cu_seqlens is None:
            mask = spec.mask(pos, pos, heads, blocksize)
        else:  # each document's own positions, and no pair across documents
            cu = torch.as_tensor(cu_seqlens, device=q.device)
            doc = torch.searchsorted(cu, pos, right=True) - 1
            rel = pos - cu[doc]
            mask = spec.mask(rel, rel, heads, blocksize) & (doc[:, None] == doc[None, :])
        kh, vh = expand_kv(kh, heads), expand_kv(vh, heads)
        if recompute and torch.is_grad_enabled():
            oh = torch.utils.checkpoint.checkpoint(masked_attention, qh, kh, vh, mask, use_reentrant=False)
        else:
            oh = masked_attention(qh, kh, vh, mask)
    return oh.transpose(1, 2).reshape(B, T, dim)


def _sparse_groups(q, k, v, layouts, cu_seqlens=None):
    B, T, dim = q.shape
    heads = sum(hn for _, hn, _ in layouts)
    d = dim // heads
    G = heads // (k.shape[-1] // d)  # query heads per key/value head (grouped-query attention)
    outs = []
    for h0, hn, lay in layouts:
        l = lay.params.get("group") if isinstance(lay, Layout) else None
        if l is not None and cu_seqlens is None and T % l == 0 and hn % G == 0:
            # a Group(l) head is causal attention within each group of l tokens: the groups as a
            # batch of [B * T / l, hn, l, d] views, one causal `all` call (no table-driven layout)
            qg, kg, vg = (
                x[..., h0 // c * d : (h0 + hn) // c * d].reshape(B * T // l, l, hn // c, d).transpose(1, 2)
                for x, c in ((q, 1), (k, G), (v, G))
            )
            og = attention_bhtd(qg, kg, vg, make_layout(l, hn, "all", blocksize=lay.blocksize))
            outs.append(og.transpose(1, 2).reshape(B, T, hn * d))
            continue
        # [B, T, hn * d] column slice -> [B, hn, T, d] view: the engines read it through its
        # strides, eagerly and compiled (the ops' results keep its memory order: no copy)
        qh = q[..., h0 * d : (h0 + hn) * d].reshape(B, T, hn, d).transpose(1, 2)
        if h0 % G or hn % G:  # a pattern's heads split a group: its key/value head for each of them
            kv = torch.arange(h0, h0 + hn, device=q.device) // G
            kh, vh = (x.reshape(B, T, -1, d).index_select(2, kv).transpose(1, 2) for x in (k, v))
        else:
            kh, vh = (
                x[..., h0 // G * d : (h0 + hn) // G * d].reshape(B, T, hn // G, d).transpose(1, 2) for x in (k, v)
            )
        if cu_seqlens is not None and isinstance(lay, tuple):
            oh = merged_document_attention(qh, expand_kv(kh, hn), expand_kv(vh, hn), *lay, cu_seqlens)
        elif cu_seqlens is not None:
            oh = document_attention_bhtd(qh, kh, vh, lay, cu_seqlens)
        elif isinstance(lay, tuple):
            # the merged head's kernels take one key/value head per query head
            oh = merged_attention(qh, expand_kv(kh, hn), expand_kv(vh, hn), *lay)
        else:
            oh = attention_bhtd(qh, kh, vh, lay)
        outs.append(oh.transpose(1, 2).reshape(B, T, hn * d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def dropout_or_identity(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` for ``p == 0`` (a compiled graph then has no copy
    where dropout would clone its input)."""
    return nn.Dropout(p) if p else nn.Identity()


class KVCache:
    """Keys and values of the tokens seen so far, one ``[batch, heads, slots, head_dim]`` pair per
    layer, filled by :meth:`SparseSelfAttention.forward` when passed ``cache=``.

    ``bounded=True``: a layer keeps only the positions a later query of its pattern may read
    (``local``: the window, memory flat in the context; ``fixed``: the current group and the
    summary blocks); other layers keep everything. ``pos[layer]`` holds the position of each
    kept key of those layers."""

    def __init__(self, n_layers: int, bounded: bool = False):
        self.bounded = bounded
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers
        self.pos: list = [None] * n_layers
        self.length = 0

    def reset(self):
        n = len(self.k)
        self.k, self.v, self.pos = [None] * n, [None] * n, [None] * n
        self.length = 0

    def nbytes(self) -> list[int]:
        """Bytes of keys and values held per layer."""
        return [0 if k is None else k.nbytes + v.nbytes for k, v in zip(self.k, self.v)]


class SparseSelfAttention(nn.Module):
    """Self-attention with the paper's sparse patterns: ``x [batch, time, dim]`` -> same shape.

    ``W_p . attend(x, S)`` with ``q, k, v = W_q x, W_k x, W_v x`` (paper eqs. 2-5).

    Example (local and strided patterns merged in every head, the paper's eq. 7)::

        >>> from sparse_attention.models import Merged, Mode
        >>> layer = SparseSelfAttention(256, 4, Merged(Mode("local", 128), Mode("strided", 128)))
        >>> layer(torch.randn(2, 1024, 256)).shape
        torch.Size([2, 1024, 256])

    Args:
        dim, heads: model width and head count (``dim % heads == 0``).
        spec: a pattern spec (:mod:`sparse_attention.patterns`), a mode name, a dict of
            :class:`Mode` fields or a :class:`Layout`.
        blocksize: layout block size.
        dropout: on the attention output (after the output projection).
        recompute: recompute the attention in the backward pass (activation checkpointing).
        impl: ``"sparse"`` (default), ``"dense"``, ``"sdpa"`` or ``"flex"`` (see :func:`attend`).
        layer_idx: this layer's slot in a :class:`KVCache`.
        out_scale: the output projection's initial weights are scaled by it (the paper uses
            ``1 / sqrt(2 * n_layers)``).
        kv_heads: key/value heads (grouped-query attention, ``heads % kv_heads == 0``; default
            ``heads``): the projection makes ``kv_heads * head_dim`` key and value columns, and a
            cache holds ``kv_heads`` heads (``heads / kv_heads`` times less memory); under context
            parallelism the ranks exchange key/value heads.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        spec="all",
        blocksize: int = 32,
        dropout: float = 0.0,
        recompute: bool = False,
        impl: str = "sparse",
        layer_idx: int = 0,
        out_scale: float = 1.0,
        kv_heads: int | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive divisor of heads ({heads}), got {kv_heads!r}")
        self.attn = SparseAttention(heads, as_spec(spec), blocksize=blocksize, recompute=recompute, impl=impl)
        self.kv_dim = dim // heads * kv_heads
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = dropout_or_identity(dropout)
        self.heads, self.layer_idx = heads, layer_idx
        with torch.no_grad():
            self.proj.weight.mul_(out_scale)

    def forward(self, x, cache: KVCache | None = None, *, cu_seqlens=None):
        """``x [batch, time, dim]``. With ``cache``: ``x`` holds the tokens at positions
        ``cache.length ...``, which attend to the cached keys/values plus their own (the caller
        advances ``cache.length`` once every layer has run). ``cu_seqlens``: packed documents
        (``batch`` 1; see :class:`SparseAttention`), not with a cache."""
        q, k, v = self.qkv(x).split([x.shape[-1], self.kv_dim, self.kv_dim], dim=-1)
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens is for training and scoring packed documents, not with a cache")
            y = self.attn(q, k, v, cu_seqlens=cu_seqlens)
        elif cache is None:
            y = self.attn(q, k, v)
        elif isinstance(cache, StaticKVCache):
            y = self._static(q, k, v, cache)
        else:
            y = self._cached(q, k, v, cache)
        return self.drop(self.proj(y))

    def _static(self, q, k, v, cache):
        """Tokens at positions ``cache.lengths[b] + 0 ..`` through a :class:`StaticKVCache`: a
        prefill runs the block-sparse forward where it can (and fills the cache), a decode step
        writes its keys and runs the decode kernel over the allowed ones."""
        B, t, dim = q.shape
        qh, kh, vh = self._heads_of(q, k, v)
        layer = cache.layers[self.layer_idx]
        layer.write(kh, vh, cache.lengths, cache.ends)
        if cache.prefilling:
            y = self._sparse_prefill(q, k, v)
            if y is not None:
                return y
        return layer.attend(qh, cache.lengths).transpose(1, 2).reshape(B, t, dim)

    def _heads_of(self, q, k, v):
        """``[batch, heads, t, head_dim]`` views of q and ``[batch, kv_heads, t, head_dim]`` of k, v."""
        B, t, dim = q.shape
        d = dim // self.heads
        return tuple(x.reshape(B, t, x.shape[-1] // d, d).transpose(1, 2) for x in (q, k, v))

    def _cached(self, q, k, v, cache):
        B, t, dim = q.shape
        H, d = self.heads, dim // self.heads
        qh, kh, vh = self._heads_of(q, k, v)
        HK = kh.shape[1]
        n0, n1, i = cache.length, cache.length + t, self.layer_idx
        if cache.bounded and self.prune_probes(n1) is not None:
            return self._pruned(qh, kh, vh, q, k, v, cache)
        if cache.k[i] is None or cache.k[i].shape[2] < n1:
            size = max(n1, 2 * (0 if cache.k[i] is None else cache.k[i].shape[2]), 256)
            kc = kh.new_zeros(B, HK, size, d)
            vc = vh.new_zeros(B, HK, size, d)
            if cache.k[i] is not None:
                kc[:, :, :n0] = cache.k[i][:, :, :n0]
                vc[:, :, :n0] = cache.v[i][:, :, :n0]
            cache.k[i], cache.v[i] = kc, vc
        cache.k[i][:, :, n0:n1] = kh
        cache.v[i][:, :, n0:n1] = vh
        if n0 == 0:
            y = self._sparse_prefill(q, k, v)
            if y is not None:
                return y
        keys, vals = cache.k[i][:, :, :n1], cache.v[i][:, :, :n1]
        pos_q = torch.arange(n0, n1, device=q.device)
        pos_k = torch.arange(n1, device=q.device)
        # Only the allowed cached positions of each new token (closed form of the pattern).
        o = masked_attention(qh, expand_kv(keys, H), expand_kv(vals, H), self.attn.mask(pos_q, pos_k))
        return o.transpose(1, 2).reshape(B, t, dim)

    def prune_probes(self, n1: int):
        """Queries whose allowed keys are every cached key a query at or after ``n1`` may read,
        in a bounded cache: for ``local``, the next query (later ones read less of the past); for
        ``fixed``, the next query (its own group) and the end of the next group (the summary
        blocks); None where every position stays (the other patterns)."""
        spec = self.attn.spec
        if isinstance(spec, Mode) and spec.mode == "local":
            return [n1]
        if isinstance(spec, Mode) and spec.mode == "fixed":
            l = spec.local_attn_ctx  # noqa: E741
            return [n1, (n1 // l + 2) * l - 1]
        return None

    def _pruned(self, qh, kh, vh, q, k, v, cache):
        """A bounded cache layer that keeps only the positions a later query may read (the
        pattern's closed form at :meth:`prune_probes`): ``local`` its last ``L - 1`` positions,
        ``fixed`` its current group and the summary blocks, ``O(l + n * c / l)`` positions."""
        B, H, t, d = qh.shape
        n0, n1, i = cache.length, cache.length + t, self.layer_idx
        pos_q = torch.arange(n0, n1, device=q.device)
        if cache.k[i] is None:
            cache.k[i], cache.v[i] = kh[:, :, :0], vh[:, :, :0]
            cache.pos[i] = pos_q[:0]
        keys = torch.cat([cache.k[i], kh], dim=2)
        vals = torch.cat([cache.v[i], vh], dim=2)
        pos_k = torch.cat([cache.pos[i], pos_q])
        y = self._sparse_prefill(q, k, v) if n0 == 0 else None
        if y is None:
            o = masked_attention(qh, expand_kv(keys, H), expand_kv(vals, H), self.attn.mask(pos_q, pos_k))
            y = o.transpose(1, 2).reshape(B, t, H * d)
        probes = torch.tensor(self.prune_probes(n1), device=q.device)
        keep = self.attn.mask(probes, pos_k).any(dim=1).any(dim=0)
        cache.k[i], cache.v[i], cache.pos[i] = keys[:, :, keep], vals[:, :, keep], pos_k[keep]
        return y

    def _sparse_prefill(self, q, k, v):
        """A prompt at the start of the cache through the block-sparse forward (no ``t x t``
        scores), padded at the end up to a length the pattern runs at: its patterns are causal,
        so the padding changes no earlier output. None where that does not apply (another
        ``impl``; a custom layout, which runs at its own length only)."""
        a = self.attn
        if a.impl != "sparse" or isinstance(a.spec, Custom):
            return None
        t = q.shape[1]
        # a multiple of 128 too: the fused kernels' tiles are capped by the largest power of two
        # dividing time (at 65,504 tokens fixed's forward ran 3.5x slower than at 65,536 on an H200)
        m = math.lcm(a.spec.multiple(a.blocksize), TILE_QUANTUM)
        T = -(-t // m) * m
        try:
            a.spec.check(T, a.heads, a.blocksize)
        except ValueError:
            return None
        if T != t:
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, T - t)) for x in (q, k, v))
        return a.forward_unsharded(q, k, v)[:, :t]
