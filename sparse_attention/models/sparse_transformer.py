"""The Sparse Transformer of Child et al. (2019), section 5, in PyTorch.

    H_0 = embed(X, W_e)                              token + factorised position embeddings (eq. 15)
    H_k = H_{k-1} + resblock(H_{k-1})                a(H) + b(H) (eqs. 10-14)
    a(H) = dropout(attention(norm(H)))               pre-norm, sparse attention of block k
    b(H) = dropout(ff(norm(H + a(H))))               ff(x) = W_2 gelu(W_1 x + b_1) + b_2
    y = softmax(norm(H_N) W_out)

``W_p`` (attention output) and ``W_2`` are initialised scaled by ``1 / sqrt(2 N)``; ``gelu(x) =
x * sigmoid(1.702 x)``. Block ``k`` uses ``patterns[k % len(patterns)]`` (one pattern per block,
interleaved at any ratio: eq. 6); a pattern may be merged (eq. 7) or split over heads (eq. 8).
Mixed precision: run the model under ``torch.autocast`` (bf16 or fp16); the loss is in float32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..layouts import check_cu_seqlens
from ..patterns import Custom, as_spec
from ..torch.decode import StaticKVCache
from ..torch.nn import IMPLS, TILE_QUANTUM, KVCache, SparseSelfAttention, dropout_or_identity


@dataclass
class SparseTransformerConfig:
    """Hyper-parameters; the paper's enwik8 model is ``n_ctx=12288, d_model=512, n_head=8,
    n_layer=30, patterns=paper_patterns("fixed", stride=128, c=32)``.

    ``pos_shape``: the factorised positions (``n_emb = len(pos_shape)``): ``(rows, columns)`` for
    text and audio, ``(rows, columns, channels)`` for images; its product must cover the context.
    Default: ``(ceil(n_ctx / w), w)`` with ``w`` the power of two nearest ``sqrt(n_ctx)``.
    """

    vocab_size: int = 256
    n_ctx: int = 1024
    d_model: int = 256
    n_head: int = 4
    n_layer: int = 4
    n_kv_head: int | None = None
    d_ff: int | None = None
    dropout: float = 0.0
    pos_shape: tuple | None = None
    patterns: list = field(default_factory=lambda: ["all"])
    blocksize: int = 32
    impl: str = "sparse"
    recompute: bool = False
    attn_recompute: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "d_model", "n_head", "n_layer", "blocksize"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        kv = self.n_kv_head
        if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or self.n_head % kv):
            raise ValueError(f"n_kv_head must be a positive divisor of n_head ({self.n_head}), got {kv!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.patterns, (str, dict)) or not hasattr(self.patterns, "__len__"):
            self.patterns = [self.patterns]
        if len(self.patterns) == 0:
            raise ValueError("patterns must hold at least one pattern spec")
        self.patterns = [as_spec(p) for p in self.patterns]
        if self.pos_shape is None:
            w = 2 ** round(math.log2(math.sqrt(self.n_ctx)))
            self.pos_shape = (math.ceil(self.max_time / w), w)
        self.pos_shape = tuple(int(s) for s in self.pos_shape)
        if any(s < 1 for s in self.pos_shape):
            raise ValueError(f"pos_shape entries must be positive, got {self.pos_shape}")
        if math.prod(self.pos_shape) < self.max_time:
            raise ValueError(
                f"pos_shape {self.pos_shape} covers {math.prod(self.pos_shape)} positions; the "
                f"(padded) context needs {self.max_time}"
            )
        for p in self.patterns:
            p.check(self.max_time, self.n_head, self.blocksize)

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this (blocksize, strides, custom layout lengths)."""
        return functools.reduce(math.lcm, (p.multiple(self.blocksize) for p in self.patterns))

    @property
    def pad_multiple(self) -> int:
        """The forward pads its input to a multiple of this: :attr:`multiple`, and of 128 as well
        for ``impl="sparse"`` without custom layouts (the fused kernels cap their tiles at the
        largest power of two dividing ``time``: ``fixed``'s forward ran 3.5x slower at 65,504
        tokens than at 65,536 on an H200). The padding is at the end and every pattern is causal,
        so it changes nothing before it."""
        if self.impl == "sparse" and not any(isinstance(p, Custom) for p in self.patterns):
            return math.lcm(self.multiple, TILE_QUANTUM)
        return self.multiple

    @property
    def max_time(self) -> int:
        m = self.multiple
        return math.ceil(self.n_ctx / m) * m


class FactorisedEmbedding(nn.Module):
    """``x_i W_e + sum_j o_i^(j) W_j`` (eq. 15): token embedding plus one learned embedding per
    position coordinate (mixed radix over ``pos_shape``, the last coordinate fastest; positions
    past the grid, e.g. the padding of a sequence, wrap around it).

    ``forward(idx, positions)``: ``positions`` a tensor of each token's position, or an int
    ``start`` for ``start, start + 1, ...``. From 0 over whole rows of the position grid (``time``
    a multiple of ``prod(pos_shape[1:])`` within the grid, as a padded training sequence is), the position
    embeddings are added by broadcasting over the grid instead of gathered per token: the same
    sums, whose gradients are then sums over the grid's other axes, not the scatter of
    ``embedding_dense_backward`` (on an H100, 2 of the 3 embedding backwards of a training step,
    ~0.5 ms of host time and ~0.2 ms of GPU time at 12,288 tokens)."""

    def __init__(self, vocab_size: int, dim: int, pos_shape: tuple, std: float):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.ModuleList(nn.Embedding(n, dim) for n in pos_shape)
        strides = [math.prod(pos_shape[k + 1 :]) for k in range(len(pos_shape))]
        self.register_buffer("strides", torch.tensor(strides), persistent=False)
        self.register_buffer("sizes", torch.tensor(pos_shape), persistent=False)
        nn.init.normal_(self.tok.weight, std=std)
        for e in self.pos:
            nn.init.normal_(e.weight, std=std / math.sqrt(len(pos_shape)))
        self.pos_shape = tuple(pos_shape)
        self.row = strides[0]  # positions per step of the first coordinate

    def _on_grid(self, h):
        """``h`` (``[..., time, dim]``, positions ``0 .. time - 1``) plus the position embeddings,
        added in the order of :meth:`forward`'s gather, each broadcast over the grid."""
        *lead, T, d = h.shape
        grid = (T // self.row, *self.pos_shape[1:])
        h = h.view(*lead, *grid, d)
        for k, e in enumerate(self.pos):
            shape = [1] * len(grid) + [d]
            shape[k] = grid[k]
            w = e.weight if e.weight.shape[0] == grid[k] else e.weight[: grid[k]]  # (a slice's backward copies)
            h = h + w.view(shape)
        return h.view(*lead, T, d)

    def forward(self, idx, positions):
        h = self.tok(idx)
        if isinstance(positions, int):
            T = idx.shape[-1]
            if positions == 0 and T % self.row == 0 and T // self.row <= self.pos_shape[0]:
                return self._on_grid(h)
            positions = torch.arange(positions, positions + T, device=idx.device)
        coords = (positions[..., None] // self.strides) % self.sizes  # [(batch,) time, n_emb]
        for k, e in enumerate(self.pos):
            h = h + e(coords[..., k])
        return h


class GELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the paper's approximation."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResBlock(nn.Module):
    """``H + a(H) + b(H)`` with ``a(H) = dropout(attn(norm(H)))``, ``b(H) = dropout(ff(norm(H + a(H))))``."""

    def __init__(self, cfg: SparseTransformerConfig, spec, layer_idx: int):
        super().__init__()
        d, scale = cfg.d_model, 1.0 / math.sqrt(2 * cfg.n_layer)
        self.norm1 = nn.LayerNorm(d)
        self.attn = SparseSelfAttention(
            d,
            cfg.n_head,
            spec,
            cfg.blocksize,
            cfg.dropout,
            cfg.attn_recompute,
            cfg.impl,
            layer_idx,
            kv_heads=cfg.n_kv_head,
        )
        self.norm2 = nn.LayerNorm(d)
        d_ff = cfg.d_ff or 4 * d
        self.ff = nn.Sequential(nn.Linear(d, d_ff), GELU(), nn.Linear(d_ff, d), dropout_or_identity(cfg.dropout))
        for lin in (self.attn.qkv, self.attn.proj, self.ff[0], self.ff[2]):
            nn.init.normal_(lin.weight, std=cfg.init_std)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.attn.proj.weight.mul_(scale)
            self.ff[2].weight.mul_(scale)

    def forward(self, h, cache: KVCache | None = None, cu_seqlens=None):
        # h + a computed once (h + a + b is (h + a) + b): fewer kernels forward and backward
        r = h + self.attn(self.norm1(h), cache, cu_seqlens=cu_seqlens)
        return r + self.ff(self.norm2(r))


def _unpadded(h, T: int):
    """The first ``T`` positions of ``h [batch, time, dim]``: ``h`` itself where nothing was padded
    (a slice's backward would allocate and copy a whole gradient)."""
    return h if h.shape[1] == T else h[:, :T]


class SparseTransformer(nn.Module):
    """Decoder-only Sparse Transformer over a token vocabulary (bytes by default).

    ``forward(idx [batch, time], targets=None)`` -> ``(logits [batch, time, vocab], loss)``; ``time
    <= n_ctx``, padded internally to a multiple of :attr:`SparseTransformerConfig.pad_multiple`.
    :meth:`generate` samples with a key/value cache.

    ``forward(idx [1, time], targets, cu_seqlens=cu)``: packed documents (boundaries as in
    :func:`sparse_attention.blocksparse_attention_impl`, each at most ``n_ctx`` tokens): every
    document is a sequence of its own (positions from its first token, attention within it),
    as if the model ran on each alone; ``time`` may then exceed ``n_ctx``. Targets of a
    document's last token that name the next document's first are the caller's to mask (-100).
    """

    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__()
        if not isinstance(cfg, SparseTransformerConfig):
            raise TypeError(f"cfg must be a SparseTransformerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = FactorisedEmbedding(cfg.vocab_size, cfg.d_model, cfg.pos_shape, cfg.init_std)
        self.drop = dropout_or_identity(cfg.dropout)
        self.blocks = nn.ModuleList(ResBlock(cfg, cfg.patterns[k % len(cfg.patterns)], k) for k in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=cfg.init_std)

    context = None  # (group, balance) under context parallelism

    def context_parallel(self, group=None, balance: str = "zigzag") -> None:
        """Train on sequences sharded over ``group``'s ranks: from now on ``forward(idx, targets)``
        takes this rank's tokens, ``idx[:, model.shard_positions(time)]`` of a ``[batch, time]``
        sequence (every layer's attention exchanges only the key/value blocks its pattern reads,
        :mod:`sparse_attention.torch.distributed`), and returns their logits and mean loss.
        ``group=False`` turns it off. Generation (a cache) always runs unsharded."""
        import torch.distributed as dist

        if group is not False and not dist.is_initialized():
            raise RuntimeError("context_parallel needs torch.distributed initialised (dist.init_process_group)")
        self.context = None if group is False else (group, balance)
        for blk in self.blocks:
            blk.attn.attn.context_parallel(group, balance)

    def shard_positions(self, time: int) -> torch.Tensor:
        """The token positions of this rank's shard of a ``time``-token sequence (ascending)."""
        import torch.distributed as dist

        from ..sharding import shard_positions

        if self.context is None:
            raise RuntimeError("call context_parallel(group) first")
        group, balance = self.context
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if time % self.cfg.multiple or time > self.cfg.n_ctx:
            raise ValueError(
                f"under context parallelism time ({time}) must be a multiple of {self.cfg.multiple} "
                f"and at most n_ctx ({self.cfg.n_ctx}); the model does not pad a sharded sequence"
            )
        return torch.from_numpy(shard_positions(time, self.cfg.blocksize, world, rank, balance))

    def prepare(self, time: int, device) -> None:
        """Precompute per-context state (FlexAttention block masks) before ``torch.compile``."""
        t = math.ceil(time / self.cfg.pad_multiple) * self.cfg.pad_multiple
        for blk in self.blocks:
            blk.attn.attn.prepare(t, device)

    def forward(self, idx, targets=None, cache: KVCache | None = None, *, cu_seqlens=None):
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be integer tokens [batch, time], got {idx.dtype} {list(idx.shape)}")
        B, T = idx.shape
        if cu_seqlens is not None:
            return self._documents_forward(idx, targets, cache, cu_seqlens)
        if self.context is not None and cache is None:
            return self._sharded_forward(idx, targets)
        if isinstance(cache, StaticKVCache):
            return self._static_forward(idx, cache), None
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.n_ctx:
            raise ValueError(f"positions {start}..{start + T - 1} exceed n_ctx ({self.cfg.n_ctx})")
        if cache is None:
            pad = -T % self.cfg.pad_multiple
            if pad:
                # Every pattern is causal: tokens appended at the end change nothing before them.
                idx = F.pad(idx, (0, pad))
        h = self.drop(self.embed(idx, start))
        for blk in self.blocks:
            if self.cfg.recompute and cache is None and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h, cache)
        if cache is not None:
            cache.length += T
        logits = self.head(self.norm(_unpadded(h, T)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def _documents_forward(self, idx, targets, cache, cu_seqlens):
        if cache is not None or self.context is not None:
            raise ValueError("cu_seqlens (packed documents) runs without a cache and without context parallelism")
        cu = check_cu_seqlens(cu_seqlens)
        B, T = idx.shape
        if B != 1 or int(cu[-1]) != T:
            raise ValueError(
                f"cu_seqlens packs documents into idx [1, time] and ends at time; got idx {list(idx.shape)}"
            )
        if np.diff(cu).max() > self.cfg.n_ctx:
            raise ValueError(
                f"each document must have at most n_ctx ({self.cfg.n_ctx}) tokens, got {np.diff(cu).max()}"
            )
        pad = -T % self.cfg.pad_multiple
        if pad:  # the padding joins the last document, after its tokens (causal patterns: no effect)
            idx = F.pad(idx, (0, pad))
            cu = np.concatenate([cu[:-1], [T + pad]])
        doc = np.searchsorted(cu, np.arange(T + pad), side="right") - 1
        positions = torch.from_numpy(np.arange(T + pad) - cu[doc])
        if idx.is_cuda:  # pinned, not waiting for the queued kernels (a pageable copy would)
            positions = positions.pin_memory().to(idx.device, non_blocking=True)
        h = self.drop(self.embed(idx, positions))
        for blk in self.blocks:
            if self.cfg.recompute and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, None, cu, use_reentrant=False)
            else:
                h = blk(h, None, cu)
        logits = self.head(self.norm(_unpadded(h, T)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(T, -1), targets.reshape(T))
        return logits, loss

    def _sharded_forward(self, idx, targets):
        import torch.distributed as dist

        group, _ = self.context
        time = idx.shape[1] * dist.get_world_size(group)
        positions = self.shard_positions(time).to(idx.device)
        h = self.drop(self.embed(idx, positions))
        for blk in self.blocks:
            if self.cfg.recompute and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        logits = self.head(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def _static_forward(self, idx, cache: StaticKVCache):
        # every shape is fixed and nothing waits on the device: a decode step can be a CUDA graph
        B, T = idx.shape
        if B != cache.lengths.shape[0]:
            raise ValueError(f"the cache holds {cache.lengths.shape[0]} sequences, idx has batch {B}")
        if T > cache.max_query and not cache.prefilling:
            raise ValueError(
                f"a decode step through this cache takes at most max_query={cache.max_query} tokens, got {T}; "
                "prefill prompts with model.prefill(prompt, cache)"
            )
        positions = cache.lengths[:, None] + torch.arange(T, device=idx.device)
        h = self.drop(self.embed(idx, positions))
        for blk in self.blocks:
            h = blk(h, cache)
        cache.lengths.add_(T)
        return self.head(self.norm(h))

    def new_static_cache(
        self, batch: int, dtype=None, device=None, bounded: bool = False, max_query: int = 1
    ) -> StaticKVCache:
        """A preallocated cache of ``batch`` sequences up to ``n_ctx`` tokens for :meth:`prefill`
        and decode steps ``model(tokens [batch, <= max_query], cache=cache)`` (positions from
        ``cache.lengths``, per sequence). ``bounded``: layers whose pattern allows it keep only
        what later tokens read (``local`` its window, ``fixed`` its group and the summary keys).
        ``dtype``/``device``: of the keys and values (default: the model's parameters). A step
        is not checked against ``n_ctx`` (that would wait on the device): keep ``lengths + step <=
        n_ctx`` (:meth:`generate` checks it up front)."""
        p = next(self.parameters())
        d = self.cfg.d_model // self.cfg.n_head
        layers = [
            (blk.attn.attn.spec, self.cfg.n_head, d, self.cfg.blocksize, blk.attn.kv_dim // d) for blk in self.blocks
        ]
        return StaticKVCache(
            layers, batch, self.cfg.n_ctx, dtype or p.dtype, device or p.device, bounded=bounded, max_query=max_query
        )

    @torch.no_grad()
    def prefill(self, prompt, cache: StaticKVCache, lengths=None):
        """Run ``prompt [batch, t0]`` into an empty static cache (block-sparse forward where the
        pattern allows it) and return the logits of each sequence's last prompt token ``[batch,
        vocab]``. ``lengths``: each prompt's length (``<= t0``; the rest of its row is padding,
        never attended to and overwritten by later tokens); default ``t0`` for all."""
        B, t0 = prompt.shape
        if t0 > self.cfg.n_ctx:
            raise ValueError(f"prompt ({t0} tokens) exceeds n_ctx ({self.cfg.n_ctx})")
        ends = torch.full((B,), t0, device=prompt.device, dtype=torch.int64)
        if lengths is not None:
            ends = torch.as_tensor(lengths, device=prompt.device).to(torch.int64).reshape(B)
            if bool(((ends < 1) | (ends > t0)).any()):
                raise ValueError(f"lengths must be in 1 .. {t0} (the prompt's width), got {ends.tolist()}")
        cache.reset()
        cache.ends, cache.prefilling = ends, True
        try:
            logits = self._static_forward(prompt, cache)
        finally:
            cache.ends, cache.prefilling = None, False
        cache.lengths.copy_(ends)
        return logits[torch.arange(B, device=prompt.device), ends - 1]

    def new_cache(self, bounded: bool = False) -> KVCache:
        """An empty key/value cache; ``bounded``: ``local`` layers keep only their window."""
        return KVCache(self.cfg.n_layer, bounded=bounded)

    @torch.no_grad()
    def generate(
        self,
        prompt,
        n_new: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        prefill_chunk: int | None = None,
        bounded_cache: bool = False,
        prompt_lengths=None,
        static: bool | None = None,
        cuda_graph: bool = False,
    ):
        """Sample ``n_new`` tokens after ``prompt [batch, t0]`` (``t0 >= 1``) with a key/value
        cache: each new token attends only to the allowed cached positions of its layer's pattern.
        Returns ``[batch, t0 + n_new]``.

        ``static`` (default: on CUDA, or with ``prompt_lengths`` or ``cuda_graph``): a
        preallocated :class:`~sparse_attention.torch.decode.StaticKVCache`, the prompt prefilled by
        :meth:`prefill`, then decode steps through the decode kernel (CUDA; masked attention over
        the cache's slots elsewhere). ``prompt_lengths``: each row's prompt length (``<= t0``, the
        rest padding); row ``b``'s sequence is then ``out[b, :prompt_lengths[b] + n_new]``.
        ``cuda_graph``: one decode step captured as a CUDA graph and replayed (no host work per
        layer).

        Otherwise a growing :class:`~sparse_attention.torch.nn.KVCache`: the prompt is prefilled
        in one pass through the block-sparse forward (``impl="sparse"``, built-in patterns; padded
        internally to a length the patterns run at), or in chunks of ``prefill_chunk`` tokens
        (default 1024 for the other ``impl``) through masked attention over the cache.

        ``bounded_cache``: ``local`` and ``fixed`` layers keep only what later tokens read."""
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be [batch, t0] with t0 >= 1, got shape {list(prompt.shape)}")
        if prompt.shape[1] + n_new > self.cfg.n_ctx:
            raise ValueError(f"prompt ({prompt.shape[1]}) + n_new ({n_new}) exceeds n_ctx ({self.cfg.n_ctx})")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if static is None:
            static = prompt.is_cuda or prompt_lengths is not None or cuda_graph
        if not static and (prompt_lengths is not None or cuda_graph):
            raise ValueError("prompt_lengths and cuda_graph need static=True")
        if cuda_graph and not prompt.is_cuda:
            raise ValueError("cuda_graph=True needs the prompt and the model on a CUDA device")
        was_training = self.training
        self.eval()
        try:
            if static:
                return self._generate_static(
                    prompt, n_new, temperature, top_k, generator, bounded_cache, prompt_lengths, cuda_graph
                )
            cache = self.new_cache(bounded=bounded_cache)
            if prefill_chunk is None:
                prefill_chunk = prompt.shape[1] if self.cfg.impl == "sparse" else 1024
            for s in range(0, prompt.shape[1], prefill_chunk):
                logits, _ = self(prompt[:, s : s + prefill_chunk], cache=cache)
            out = [prompt]
            for _ in range(n_new):
                tok = _sample(logits[:, -1], temperature, top_k, generator)
                out.append(tok)
                if len(out) - 1 == n_new:
                    break
                logits, _ = self(tok, cache=cache)
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)

    def _generate_static(self, prompt, n_new, temperature, top_k, generator, bounded, prompt_lengths, cuda_graph):
        B, t0 = prompt.shape
        cache = self.new_static_cache(B, bounded=bounded)
        last = self.prefill(prompt, cache, prompt_lengths)
        ends = cache.lengths.clone()
        step = self.decode_graph(cache) if cuda_graph else (lambda tok: self(tok, cache=cache)[0])
        out = torch.cat([prompt, prompt.new_zeros(B, n_new)], dim=1)
        for n in range(n_new):
            tok = _sample(last, temperature, top_k, generator)
            out.scatter_(1, (ends + n)[:, None], tok.to(out.dtype))
            if n + 1 == n_new:
                break
            last = step(tok)[:, -1]
        return out

    @torch.no_grad()
    def decode_graph(self, cache: StaticKVCache):
        """One decode step ``tok [batch, 1] -> logits [batch, 1, vocab]`` through ``cache``,
        captured as a CUDA graph: each call copies ``tok`` in and replays it (the returned logits
        are the graph's own buffer, overwritten by the next call)."""
        B = cache.lengths.shape[0]
        tok = torch.zeros(B, 1, dtype=torch.int64, device=cache.lengths.device)
        saved = cache.lengths.clone()
        side = torch.cuda.Stream(device=tok.device)
        side.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile the kernels; the steps' writes are overwritten by the real ones
                self(tok, cache=cache)
                cache.lengths.copy_(saved)
        torch.cuda.current_stream(tok.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, _ = self(tok, cache=cache)
        cache.lengths.copy_(saved)

        def step(t):
            tok.copy_(t)
            graph.replay()
            return logits

        step.graph = graph
        return step


def _sample(last, temperature, top_k, generator):
    last = last.float() / temperature
    if top_k is not None:
        kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
        last = last.masked_fill(last < kth, float("-inf"))
    return torch.multinomial(torch.softmax(last, dim=-1), 1, generator=generator)
