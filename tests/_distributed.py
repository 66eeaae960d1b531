"""Worker of ``tests/test_distributed.py``: one process of a gloo group checks its shard of every
case against the float64 dense reference and writes what it found to ``out/rank{r}.json``."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import torch
import torch.distributed as dist
from _attn_ref import FLOOR, fwd_bwd, max_err

from sparse_attention import attention_impl, blocksparse_attention_impl, custom_layout
from sparse_attention.torch.distributed import ContextParallel, gather_sequence, shard_sequence, sharded_attention

B, T, H, D, BS = 2, 1024, 4, 16, 32


def custom(heads=H):
    """A per-head random causal block layout with random in-block masks (some rows empty)."""
    rng = np.random.default_rng(7)
    nb = T // BS
    lay = np.tril(rng.random((heads, nb, nb)) < 0.15) | np.eye(nb, dtype=bool)[None]
    masks = rng.random((heads, nb, nb, BS, BS)) < 0.7

    def cb(shape, h, qb, kb, e):
        m = masks[h, qb, kb]
        if qb == kb:
            m = m & np.tril(np.ones(shape, bool))
        return m

    return custom_layout(lay.astype(int), BS, callback=cb)


CASES = {
    "local": ("local", dict(local_attn_ctx=96)),
    "local-zigzag": ("local", dict(local_attn_ctx=64, balance="zigzag")),
    "strided": ("strided", dict(local_attn_ctx=64)),
    "strided-split": ("strided", dict(local_attn_ctx=2)),
    "strided-natural": ("strided", dict(local_attn_ctx=4, balance="zigzag", natural_order=True)),
    "fixed": ("fixed", dict(local_attn_ctx=128, num_verts=2, vertsize=1)),
    "fixed-contiguous": ("fixed", dict(local_attn_ctx=64, num_verts=1, vertsize=2, balance="contiguous")),
    "all": ("all", {}),
    "all-contiguous": ("all", dict(balance="contiguous")),
    "custom": ("custom", {}),
    "custom-zigzag": ("custom", dict(balance="zigzag")),
    # grouped-query attention: k, v of fewer heads; the exchange moves the key/value heads whose
    # group reads a block
    "local-gqa": ("local", dict(local_attn_ctx=96, kv_heads=2)),
    "fixed-mqa": ("fixed", dict(local_attn_ctx=128, num_verts=2, vertsize=1, kv_heads=1)),
    "all-gqa": ("all", dict(kv_heads=2)),
    "custom-gqa": ("custom", dict(balance="zigzag", kv_heads=2)),
}


def _mode(name):
    mode, kw = CASES[name]
    kw = dict(kw)
    balance = kw.pop("balance", None)
    kv_heads = kw.pop("kv_heads", H)
    extra = {k: kw.pop(k) for k in ("natural_order",) if k in kw}
    return (custom() if mode == "custom" else mode), kw, balance, extra, kv_heads


def needed_block_heads(layout, world, balance, natural=False, kv_heads=None):
    """(key block, head) pairs each rank reads from other ranks, from the dense block layout
    (independent of the plan): what the exchange may move, only the heads that read a block
    (``kv_heads``: the key/value heads, one read where any query head of its group reads).
    ``natural``: shards cut in natural token order, mapped to the layout's blocks by its ``perm``."""
    nb = layout.nb
    chunks = world * (2 if balance == "zigzag" else 1)
    c = np.arange(chunks)
    owner = np.repeat(np.minimum(c, chunks - 1 - c) if chunks > world else c, nb // chunks)
    if natural and layout.perm is not None:
        owner = np.repeat(owner, layout.blocksize)[layout.perm[:: layout.blocksize]]
    blocks = layout.block_layout()  # [heads, nb, nb]
    kv = layout.heads if kv_heads is None else kv_heads
    blocks = blocks.reshape(kv, layout.heads // kv, nb, nb).any(axis=1)
    return sum(int((blocks[h][owner == r].any(axis=0) & (owner != r)).sum()) for r in range(world) for h in range(kv))


def run_case(name, dtype, rank, world):
    mode, kw, balance, extra, kv_heads = _mode(name)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same on every rank
    q, do = (torch.randn(B, T, H * D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, T, kv_heads * D, generator=gen, dtype=torch.float64) for _ in range(2))

    def ref(a, b, c):
        return attention_impl(a, b, c, H, mode, blocksize=BS, **kw)

    def same(a, b, c):
        return blocksparse_attention_impl(a, b, c, H, mode, blocksize=BS, **kw)

    want = fwd_bwd(ref, q, k, v, do)
    cast = [x.to(dtype) for x in (q, k, v, do)]
    base = want if dtype == torch.float64 else fwd_bwd(same, *cast)
    cp = ContextParallel(T, H, mode, blocksize=BS, group=None, balance=balance, **kw, **extra)
    shards = [cp.shard(x) for x in cast]
    got = fwd_bwd(cp, *shards)
    errs, budgets = [], []
    for x, s, r in zip(got, base, want):
        errs.append(max_err(x, cp.shard(r)) if torch.isfinite(x).all() else float("inf"))
        budgets.append(2 * max_err(s, r) + FLOOR[dtype])
    # every rank's output gathered back in natural order
    full = cp.gather(got[0])
    errs.append(max_err(full, want[0]))
    budgets.append(2 * max_err(base[0], want[0]) + FLOOR[dtype])
    # bytes this rank sent, forward and backward, against what the pattern needs
    sent = torch.tensor([cp.sent_bytes], dtype=torch.int64)
    dist.all_reduce(sent)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    need = 2 * needed_block_heads(cp.layout, world, cp.plan.balance, bool(extra), kv_heads) * BS * B * D * itemsize
    return {
        "errs": errs,
        "budgets": budgets,
        "sent": int(sent.item()),
        "need": 2 * need,  # forward keys/values, backward their gradients
        "planned": 2 * cp.exchanged_bytes(B, H * D, itemsize, kv_heads),
        "ring": cp.plan.ring_bytes(B, H * D, itemsize),
        "work": cp.plan.work().tolist(),
    }


def run_functions(rank, world):
    """The function API (cached contexts) agrees with ContextParallel, and bad input is refused."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, T, H * D, generator=gen, dtype=torch.float64) for _ in range(3))
    kw = dict(local_attn_ctx=64, blocksize=BS)
    qs, ks, vs = (shard_sequence(x, H, "local", **kw) for x in (q, k, v))
    y = sharded_attention(qs, ks, vs, H, "local", **kw)
    ref = blocksparse_attention_impl(q, k, v, H, "local", **kw)
    cp = ContextParallel(T, H, "local", **kw)
    out = {"functions": max(max_err(y, cp.shard(ref)), max_err(gather_sequence(y, H, "local", **kw), ref))}
    errors = {}
    for label, call in {
        "short": lambda: cp(qs[:, :-BS], ks[:, :-BS], vs[:, :-BS]),
        "uneven": lambda: ContextParallel(T + BS, H, "local", **kw),
        "zigzag-uneven": lambda: ContextParallel(BS * 3 * world, H, "all", blocksize=BS, balance="zigzag"),
        "balance": lambda: ContextParallel(T, H, "local", balance="spiral", **kw),
        "dtype": lambda: cp(qs, ks.float(), vs),
    }.items():
        try:
            call()
            errors[label] = None
        except (ValueError, TypeError) as e:
            errors[label] = str(e)
    out["errors"] = errors
    return out


def worker(rank, world, port, out_dir, dtypes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in CASES:
            for dt in dtypes:
                results[f"{name}/{dt}"] = run_case(name, getattr(torch, dt), rank, world)
        results["functions"] = run_functions(rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
