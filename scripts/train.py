"""Train a byte-level Sparse Transformer language model.

    python scripts/train.py --steps 2000                       # default corpus: the Python stdlib sources
    python scripts/train.py --data enwik8 --n-ctx 12288 --attn fixed --dtype bf16 --compile
    torchrun --nproc_per_node 2 scripts/train.py --steps 100   # data parallel (nccl on GPUs, gloo on CPU)
    torchrun --nproc_per_node 4 scripts/train.py --context-parallel 2 --n-ctx 65536 --attn local
                                                               # each sequence over 2 ranks, 2 data-parallel groups
    python scripts/train.py --out runs/a --resume              # continue from runs/a/ckpt.pt
    python scripts/train.py --documents '\n\n\n'              # packed documents (cu_seqlens), split after each SEP

Reports bits per byte on a held-out split (the last ``--val-fraction`` of the bytes), writes
``log.jsonl``, ``samples.txt`` and ``ckpt.pt`` under ``--out``. ``--batch`` is the global batch:
each of the N processes takes its share, so N processes follow the one-process run. With
``--context-parallel C`` every sequence is sharded over C consecutive ranks (its attention
exchanges only the key/value blocks its pattern reads; ``sparse_attention.torch.distributed``),
and the batch over the N / C groups of them. The patterns are the paper's
(``paper_patterns(--attn, --factorization)``).
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sparse_attention.models import SparseTransformer, SparseTransformerConfig, paper_patterns
from sparse_attention.utils.benchmark import (
    add_compile_args,
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    autocast,
    script_parser,
)

# The arguments that define the model: a checkpoint records them, --resume checks them.
MODEL_KEYS = (
    "n_ctx",
    "d_model",
    "n_head",
    "n_kv_head",
    "n_layer",
    "d_ff",
    "dropout",
    "attn",
    "factorization",
    "stride",
    "c",
    "blocksize",
    "impl",
)


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--data", help="any file, read as bytes (default: the Python standard library's sources)")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="cap on the default corpus")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument(
        "--documents",
        default=None,
        metavar="SEP",
        help="train on packed documents: the data split after every SEP (Python escapes, e.g. '\\n\\n\\n'); "
        "each step one sequence of batch x n_ctx bytes whose documents (cut at n_ctx) attend only within "
        "themselves (cu_seqlens), no target across a document's end",
    )
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    add_model_args(
        p,
        n_ctx=512,
        d_model=256,
        n_head=4,
        n_layer=4,
        stride=128,
        c=32,
        blocksize=32,
        batch=8,
        help={"batch": "global batch (split over processes)"},
    )
    p.add_argument(
        "--n-kv-head",
        type=int,
        default=None,
        help="key/value heads (grouped-query attention; a divisor of --n-head; default: --n-head)",
    )
    p.add_argument("--d-ff", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attn", default="fixed", choices=("dense", "local", "fixed", "strided"))
    p.add_argument("--factorization", default="merged", choices=("interleaved", "merged", "heads"))
    p.add_argument("--impl", default="sparse", choices=("sparse", "dense", "sdpa", "flex"))
    p.add_argument("--recompute", action="store_true", help="recompute each residual block in backward")
    p.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="C",
        help="ranks per sequence (it is sharded over them; needs --impl sparse and a natural-order pattern)",
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step (split a run into jobs; the schedule still follows --steps)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    add_compile_args(p, default=False)
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--ckpt-interval", type=int, default=500)
    p.add_argument("--sample-len", type=int, default=200, help="bytes sampled at each evaluation (0: none)")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_arg(p, "fp32", help="autocast dtype (fp32: none; fp16 adds loss scaling)", aliases=("--precision",))
    add_device_arg(p, help="cpu, cuda, cuda:1, ... (default: %(default)s; cuda: each process its LOCAL_RANK's GPU)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "n_ctx", "eval_interval", "eval_batches", "ckpt_interval", "context_parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    args.sep = None
    if args.documents is not None:
        args.sep = args.documents.encode("utf-8").decode("unicode_escape").encode("latin-1")
        if not args.sep:
            p.error("--documents needs a non-empty separator")
        if args.context_parallel > 1:
            p.error("--documents runs without --context-parallel (packed documents are one sequence per rank)")
    return args


# -- data ------------------------------------------------------------------------------------------


def default_corpus(max_bytes: int, val_fraction: float) -> tuple[bytes, bytes]:
    """The ``.py`` files of the running Python's standard library (not site-packages): a corpus
    every machine with Python has. Files are taken in a fixed pseudo-random order (CRC-32 of the
    relative path, so every package is represented) up to ``max_bytes``; whole files go to the
    held-out split until it holds ``val_fraction`` of the bytes. Returns ``(train, val)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    paths.sort(key=lambda p: zlib.crc32(p.relative_to(root).as_posix().encode()))
    train, val, n_train, n_val = [], [], 0, 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if n_val < val_fraction * (n_train + n_val + len(data)):
            val.append(data)
            n_val += len(data)
        else:
            train.append(data)
            n_train += len(data)
        if n_train + n_val >= max_bytes:
            break
    if n_train == 0 or n_val == 0:
        raise FileNotFoundError(f"too few .py files under {root}; pass --data PATH")
    return b"".join(train), b"".join(val)


def load_bytes(args) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` uint8 arrays; for ``--data`` the last ``val_fraction`` of the bytes is held out."""
    if args.data:
        raw = Path(args.data).read_bytes()
        n_val = int(len(raw) * args.val_fraction)
        tr, va = raw[: len(raw) - n_val], raw[len(raw) - n_val :]
    else:
        tr, va = default_corpus(args.max_bytes, args.val_fraction)
    if min(len(tr), len(va)) < args.n_ctx + 2:
        raise ValueError(
            f"the data ({len(tr)} train, {len(va)} held-out bytes) is too small for --n-ctx "
            f"{args.n_ctx}; use more data, a larger --val-fraction or a shorter context"
        )
    return np.frombuffer(tr, dtype=np.uint8), np.frombuffer(va, dtype=np.uint8)


def windows(data: np.ndarray, starts, n_ctx: int, device, shard=None):
    """Inputs and targets ``[n, n_ctx]`` of the windows at ``starts``; only the positions ``shard``
    (context parallelism) where given."""
    idx = np.asarray(starts)[:, None] + np.arange(n_ctx + 1)[None]
    xy = torch.from_numpy(data[idx].astype(np.int64)).to(device)
    x, y = xy[:, :-1], xy[:, 1:]
    if shard is not None:
        x, y = x[:, shard], y[:, shard]
    return x, y


def document_window(data: np.ndarray, start: int, length: int, sep: bytes, n_ctx: int, device):
    """Inputs ``[1, length]``, targets (-100 at each document's last byte: no prediction across
    documents) and ``cu_seqlens`` of the bytes at ``start``: documents end after every ``sep``
    (and at the window's ends) and are cut every ``n_ctx`` bytes from their start."""
    xy = data[start : start + length + 1].astype(np.int64)
    ends = [0]
    hits = _find_all(xy[:length], sep)
    for e in [*(int(h) + len(sep) for h in hits), length]:
        while e - ends[-1] > n_ctx:
            ends.append(ends[-1] + n_ctx)
        if e > ends[-1]:
            ends.append(e)
    cu = np.asarray(ends, np.int64)
    y = xy[1:].copy()
    y[cu[1:] - 1] = -100
    x = torch.from_numpy(xy[None, :length]).to(device)
    return x, torch.from_numpy(y[None]).to(device), cu


def _find_all(x: np.ndarray, sep: bytes) -> np.ndarray:
    """Start offsets of every occurrence of ``sep`` in the bytes ``x``."""
    s = np.frombuffer(sep, np.uint8).astype(np.int64)
    if len(x) < len(s):
        return np.zeros(0, np.int64)
    win = np.lib.stride_tricks.sliding_window_view(x, len(s))
    return np.flatnonzero((win == s).all(axis=1))


def train_batch(data, step, args, rank, world, device, shard=None):
    """This rank's share of the global batch of ``step`` (a function of seed and step only, so a
    resumed run and an N-process run draw the same bytes as one uninterrupted process); ``rank``
    and ``world`` count data-parallel groups, ``shard`` the positions this rank holds under
    context parallelism."""
    rng = np.random.default_rng([args.seed, step])
    starts = rng.integers(0, len(data) - args.n_ctx - 1, size=args.batch)
    per = args.batch // world
    if args.documents is not None:  # one sequence of this rank's share of the batch
        length = per * args.n_ctx
        start = int(rng.integers(0, len(data) - length - 1, size=world)[rank])
        return document_window(data, start, length, args.sep, args.n_ctx, device)
    return windows(data, starts[rank * per : (rank + 1) * per], args.n_ctx, device, shard)


# -- helpers -----------------------------------------------------------------------------------


def build_model(args) -> SparseTransformer:
    kind = "dense" if args.attn == "dense" else args.attn
    patterns = paper_patterns(kind, args.factorization, stride=args.stride, c=args.c, blocksize=args.blocksize)
    cfg = SparseTransformerConfig(
        n_ctx=args.n_ctx,
        d_model=args.d_model,
        n_head=args.n_head,
        n_kv_head=args.n_kv_head,
        n_layer=args.n_layer,
        d_ff=args.d_ff,
        dropout=args.dropout,
        patterns=patterns,
        blocksize=args.blocksize,
        impl="sdpa" if args.attn == "dense" and args.impl == "sparse" else args.impl,
        recompute=args.recompute,
    )
    return SparseTransformer(cfg)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


@torch.no_grad()
def evaluate(model, val, args, rank, world, device, shard=None) -> float:
    """Bits per byte on ``eval_batches * batch`` windows spread evenly over the held-out bytes
    (``rank``, ``world``: data-parallel groups; ``shard``: as :func:`train_batch`)."""
    model.eval()
    n = args.eval_batches * args.batch
    starts = np.linspace(0, len(val) - args.n_ctx - 1, n).astype(np.int64)[rank::world]
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    for s in range(0, len(starts), args.batch):
        if args.documents is not None:  # the windows' bytes as one sequence of documents
            length = len(starts[s : s + args.batch]) * args.n_ctx
            x, y, cu = document_window(
                val, min(int(starts[s]), len(val) - length - 1), length, args.sep, args.n_ctx, device
            )
            kw = {"cu_seqlens": cu}
        else:
            x, y = windows(val, starts[s : s + args.batch], args.n_ctx, device, shard)
            kw = {}
        if args.compile and args.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.dtype):
            _, loss = model(x, y, **kw)
        counted = (y != -100).sum().item()
        tot += torch.tensor([loss.item() * counted, counted], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tot)
    model.train()
    return (tot[0] / tot[1]).item() / math.log(2)


def sample_text(model, val, args, device) -> str:
    prompt_len = min(64, args.n_ctx // 2)
    n_new = min(args.sample_len, args.n_ctx - prompt_len)
    prompt = torch.from_numpy(val[:prompt_len].astype(np.int64))[None].to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(device, args.dtype):
        out = model.generate(prompt, n_new, temperature=0.8, top_k=None, generator=g)
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    return text[:prompt_len] + " ||| " + text[prompt_len:]


def model_args(args) -> dict:
    return {k: getattr(args, k) for k in MODEL_KEYS}


# -- main --------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
    """Train; returns the log records (rank 0; others get an empty list)."""
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cp = args.context_parallel
    if world % cp:
        raise ValueError(f"the process count ({world}) must be a multiple of --context-parallel ({cp})")
    if args.batch % (world // cp):
        raise ValueError(
            f"--batch ({args.batch}) must be a multiple of the data-parallel group count ({world // cp} = "
            f"{world} processes / --context-parallel {cp})"
        )
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world, device) -> list[dict]:
    from tqdm import tqdm

    out = Path(args.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    train, val = load_bytes(args)
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    step, records = 0, []
    ckpt_path = out / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if {"n_kv_head": None, **ckpt["model_args"]} != model_args(args):  # (older checkpoints lack it)
            raise ValueError(
                f"{ckpt_path} holds a model with {ckpt['model_args']}, the arguments give "
                f"{model_args(args)}; pass the same model arguments or another --out"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, records = ckpt["step"], ckpt["records"]
    raw = model
    model.prepare(args.n_ctx, device)
    # context parallelism: C consecutive ranks share a sequence, the N / C groups split the batch
    cp = args.context_parallel
    dp_rank, dp_world, shard = rank // cp, world // cp, None
    if cp > 1:
        groups = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(dp_world)]
        model.context_parallel(groups[dp_rank])
        shard = model.shard_positions(args.n_ctx).to(device)
    fwd = model
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        fwd = torch.compile(fwd, mode=args.compile_mode)
    graphs = args.compile and args.compile_mode == "reduce-overhead"
    if is_main:
        n_params = sum(p.numel() for p in raw.parameters())
        tqdm.write(
            f"{n_params / 1e6:.2f}M parameters, {len(train)} train / {len(val)} held-out bytes, "
            f"{world} process(es) on {device} ({cp} per sequence), patterns {[str(p) for p in raw.cfg.patterns]}"
        )

    def save():
        if is_main:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(
                {
                    "model": raw.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "records": records,
                    "model_args": model_args(args),
                },
                tmp,
            )
            os.replace(tmp, ckpt_path)

    def log(rec):
        records.append(rec)
        if is_main:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    bar = tqdm(total=args.steps, initial=step, disable=not is_main or args.no_progress, unit="step")
    t0 = time.perf_counter()
    model.train()
    last = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    while step < last:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        # Dropout masks depend on (seed, step, rank) only: a resumed run repeats them.
        torch.manual_seed(args.seed * 1_000_003 + step * 101 + rank)
        x, y, *docs = train_batch(train, step, args, dp_rank, dp_world, device, shard)
        if graphs:  # a new step: CUDA-graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.dtype):
            _, loss = fwd(x, y, cu_seqlens=docs[0]) if docs else fwd(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        lval = loss.detach().double()
        if world > 1:
            dist.all_reduce(lval)
            lval /= world
        rec = {
            "step": step,
            "loss": lval.item(),
            "train_bpb": lval.item() / math.log(2),
            "lr": lr_at(step - 1, args),
            "grad_norm": float(gnorm),
            "time": time.perf_counter() - t0,
        }
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if step % args.eval_interval == 0 or step == args.steps:
            rec["val_bpb"] = evaluate(fwd, val, args, dp_rank, dp_world, device, shard)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val_bpb=f"{rec['val_bpb']:.3f}")
            if is_main and args.sample_len > 0:
                text = sample_text(raw, val, args, device)
                with open(out / "samples.txt", "a") as f:
                    f.write(f"--- step {step}, val {rec['val_bpb']:.4f} bits/byte\n{text}\n")
        log(rec)
        if step % args.ckpt_interval == 0 or step == last:
            save()
    bar.close()
    if is_main and records and "val_bpb" in records[-1]:
        tqdm.write(f"step {step}: held-out {records[-1]['val_bpb']:.4f} bits/byte")
    return records if is_main else []


if __name__ == "__main__":
    main()
