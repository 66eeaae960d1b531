"""Context parallelism: correctness on the process group, per-GPU throughput at a fixed per-GPU
length against one GPU, bytes exchanged against ring attention's, and the longest sequence that
runs forward+backward. Start one process per GPU::

    torchrun --nproc_per_node 2 scripts/bench_context_parallel.py --out results.json
    torchrun --nproc_per_node 2 scripts/bench_context_parallel.py --device cpu --shard-len 4096 \\
        --check-len 2048 --max-shard-len 0          # a smoke run on CPU (gloo)

* **check**: every mode at ``--check-len`` tokens per rank, forward and the three gradients of the
  sharded call against the unsharded call on one device, both against a float32 reference
  (budget: twice the unsharded error plus a floor).
* **throughput**: forward+backward of one attention layer at ``--shard-len`` tokens per GPU
  (``all``: ``--all-shard-len``), sharded over the group vs the plain call at the shard's length on
  each GPU alone; allowed pairs per second per GPU, and their ratio (1.0: perfect scaling).
* **bytes**: keys/values sent per forward pass by the plan vs a ring's ``(world - 1) / world`` of
  them (the backward sends as many gradient bytes back).
* **max length**: one forward+backward at ``--max-shard-len`` tokens per GPU (``local``, ``strided``).
"""

from __future__ import annotations

import functools
import json
import os

import torch
import torch.distributed as dist

from sparse_attention import blocksparse_attention_impl
from sparse_attention.layouts import make_layout
from sparse_attention.torch.distributed import ContextParallel, dense_backend
from sparse_attention.utils.benchmark import (
    add_dtype_arg,
    add_model_args,
    allowed_pairs,
    call_ms,
    comma_list,
    environment,
    median,
    script_parser,
    torch_dtype,
)


def patterns(args) -> dict:
    return {
        "local": ("local", dict(local_attn_ctx=args.ctx)),
        "strided": ("strided", dict(local_attn_ctx=args.stride)),
        "fixed": ("fixed", dict(local_attn_ctx=args.ctx, num_verts=args.num_verts, vertsize=1)),
        "all": ("all", {}),
    }


def _rand(shape, dtype, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)


def _fwd_bwd(fn, q, k, v, do):
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(qs, ks, vs)
    o.backward(do)
    return [o.detach(), qs.grad, ks.grad, vs.grad]


def _err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def check(args, dev, world, rank):
    """Sharded vs unsharded, each against float32, every mode and dtype; rows of a table."""
    rows = []
    B, H, D, b = 2, 4, 64, args.blocksize
    T = args.check_len * world
    floor = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
    dtypes = ["fp32"] if dev.type == "cpu" else ["fp16", "bf16"]
    for name, (mode, kw) in patterns(args).items():
        if name not in args.modes:
            continue
        for dt in dtypes:
            dtype = torch_dtype(dt)
            q, k, v, do = (_rand((B, T, H * D), torch.float32, dev, 10 + i) for i in range(4))

            def full(a, c, e, mode=mode, kw=kw):
                return blocksparse_attention_impl(a, c, e, H, mode, blocksize=b, **kw)

            want = _fwd_bwd(full, q, k, v, do)
            cast = [x.to(dtype) for x in (q, k, v, do)]
            base = _fwd_bwd(full, *cast)
            cp = ContextParallel(T, H, mode, blocksize=b, **kw)
            got = _fwd_bwd(cp, *(cp.shard(x) for x in cast))
            worst = 0.0
            for g, s, w in zip(got, base, want):
                e, budget = _err(g, cp.shard(w)), 2 * _err(s, w) + floor[dtype]
                worst = max(worst, e / budget)
            flag = torch.tensor([worst], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            rows.append({"mode": name, "dtype": dt, "error/budget": round(flag.item(), 3), "pass": flag.item() <= 1})
    return rows


def _step(attn, q, k, v, do):
    attn(q, k, v).backward(do)


def _plain(H, mode, b, kw):
    return functools.partial(_bsa, heads=H, attn_mode=mode, blocksize=b, **kw)


def _bsa(q, k, v, **kw):
    return blocksparse_attention_impl(q, k, v, **kw)


def _timed(fn, reps, dev):
    fn()
    dist.barrier()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return median(call_ms(fn, reps, dev))


def throughput(args, dev, world, rank):
    rows = []
    B, H, D, b = args.batch, args.n_head, args.head_dim, args.blocksize
    dtype = torch_dtype(args.dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for name, (mode, kw) in patterns(args).items():
        if name not in args.modes:
            continue
        n = args.all_shard_len if name == "all" else args.shard_len
        T = n * world
        cp = ContextParallel(T, H, mode, blocksize=b, **kw)
        q, k, v, do = (_rand((B, n, H * D), dtype, dev, 20 + i + rank) for i in range(4))
        for x in (q, k, v):
            x.requires_grad_(True)

        t_w = _timed(functools.partial(_step, cp, q, k, v, do), args.reps, dev)
        t_1 = _timed(functools.partial(_step, _plain(H, mode, b, kw), q, k, v, do), args.reps, dev)
        pairs_w = allowed_pairs(cp.layout) * B / world
        pairs_1 = allowed_pairs(make_layout(n, H, mode, blocksize=b, **kw)) * B
        sent = cp.exchanged_bytes(B, H * D, itemsize)
        ring = cp.plan.ring_bytes(B, H * D, itemsize)
        work = cp.plan.work()
        times = torch.tensor([t_w, t_1], device=dev)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        t_w, t_1 = times.tolist()
        rows.append(
            {
                "mode": name,
                "tokens/GPU": n,
                "time": T,
                "balance": cp.plan.balance,
                "1 GPU ms": round(t_1, 2),
                f"{world} GPUs ms": round(t_w, 2),
                "per-GPU throughput ratio": round((pairs_w / t_w) / (pairs_1 / t_1), 3),
                "sent MiB/layer": round(sent / 2**20, 2),
                "ring MiB/layer": round(ring / 2**20, 2),
                "sent/ring": round(sent / ring, 4) if ring else 0.0,
                "work max/mean": round(float(work.max() / work.mean()), 3),
            }
        )
    return rows


def max_length(args, dev, world, rank):
    rows = []
    if not args.max_shard_len:
        return rows
    B, H, D, b = 1, args.n_head, args.head_dim, args.blocksize
    dtype = torch_dtype(args.dtype)
    for name, (mode, kw) in patterns(args).items():
        if name not in args.modes or name not in ("local", "strided"):
            continue
        n = args.max_shard_len
        T = n * world
        row = {"mode": name, "time": T, "tokens/GPU": n}
        try:
            cp = ContextParallel(T, H, mode, blocksize=b, **kw)
            q, k, v, do = (_rand((B, n, H * D), dtype, dev, 30 + i + rank) for i in range(4))
            for x in (q, k, v):
                x.requires_grad_(True)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t = _timed(functools.partial(_step, cp, q, k, v, do), 2, dev)
            row.update({"fwd+bwd ms": round(t, 1), "ok": True})
            if dev.type == "cuda":
                row["peak GiB/GPU"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            del q, k, v, do
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # out of memory
            row.update({"ok": False, "error": str(e).splitlines()[0][:200]})
        rows.append(row)
    return rows


def table(rows) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = script_parser(__doc__)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--modes", type=comma_list(choices=["local", "strided", "fixed", "all"]), default="local,strided,fixed,all"
    )
    ap.add_argument("--shard-len", type=int, default=262144, help="tokens per GPU (throughput)")
    ap.add_argument("--all-shard-len", type=int, default=32768, help="tokens per GPU for all (dense causal)")
    ap.add_argument("--check-len", type=int, default=8192, help="tokens per GPU (correctness)")
    ap.add_argument("--max-shard-len", type=int, default=2097152, help="tokens per GPU of the max-length run (0: none)")
    add_model_args(ap, batch=1, n_head=8, head_dim=64, blocksize=64, stride=128)
    ap.add_argument("--ctx", type=int, default=1024, help="local window and fixed group length")
    ap.add_argument("--num-verts", type=int, default=1, help="fixed: summary patterns over the heads (vertsize 1)")
    add_dtype_arg(ap, "bf16", help="fp16 or bf16 (fp32 on the CPU)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        args.dtype = "fp32"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    env = environment(dev)
    env["world"] = world
    env["dense rounds"] = dense_backend(torch.empty(1, 1, 1, args.head_dim, device=dev, dtype=torch_dtype(args.dtype)))
    results = {"env": env, "args": vars(args)}
    for part in ("check", "throughput", "max_length"):
        results[part] = globals()[part](args, dev, world, rank)
        if rank == 0:
            print(f"\n## {part} (world {world}, {env['device']}, dense rounds: {env['dense rounds']})", flush=True)
            print(table(results[part]), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
