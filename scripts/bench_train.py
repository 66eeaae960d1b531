"""Time per training iteration of the paper's enwik8 model: dense SDPA vs FlexAttention vs ours.

    python scripts/bench_train.py --out benchmarks/train_h100          # needs a CUDA GPU
    python scripts/bench_train.py --merge run1 run2 --out benchmarks/train_h100   # combine runs' tables
    python scripts/bench_train.py --device cpu --contexts 128 --n-layer 1 --d-model 64 --stride 32 \
        --c 16 --blocksize 16 --iters 2 --warmup 1 --no-compile --out /tmp/bt   # CPU smoke test

One iteration = forward, backward and an AdamW step of the byte-level Sparse Transformer
(``d_model`` 512, 8 heads, ``--n-layer`` blocks, batch 1) under bf16 autocast and ``torch.compile``,
at each ``--contexts`` length (12288 = the paper's enwik8, 65536 = its audio). Variants
(``impl:pattern``): ``sdpa:dense`` (causal ``F.scaled_dot_product_attention``), ``flex:*``
(FlexAttention with the pattern's closed form as ``mask_mod``), ``ours:*`` (this library).
Patterns (``sparse_attention.patterns.PAPER_PRESETS``, at ``--stride``, ``--c``, ``--blocksize``):
``fixed`` (stride 128, c 32, merged head), ``strided-interleaved`` / ``-merged`` / ``-heads``
(local and strided A1/A2 of stride 128, eqs. 6, 7, 8), ``local`` (A1 alone: the floor).

Before timing, each pattern's attention (ours and Flex) is checked against a float32 masked
reference at a short context; a variant that fails is reported as failed, not timed. Results go
to ``--out`` as JSON, a markdown table and a PNG, written after every variant (a run cut short
keeps what it measured). ``--budget`` seconds: no new variant starts after it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from sparse_attention.models import SparseTransformer, SparseTransformerConfig
from sparse_attention.patterns import PAPER_PRESETS, paper_preset
from sparse_attention.utils.benchmark import (
    add_compile_args,
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    autocast,
    call_ms,
    environment,
    median,
    script_parser,
    torch_dtype,
)

DEFAULT_VARIANTS = [
    "sdpa:dense",
    "ours:fixed",
    "flex:fixed",
    "ours:strided-interleaved",
    "ours:strided-heads",
    "ours:strided-merged",
    "flex:strided-interleaved",
    "flex:local",
    "ours:local",
    "flex:strided-heads",
    "flex:strided-merged",
]


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--out", default="benchmarks/train_gpu", help="output directory (default: %(default)s)")
    p.add_argument("--contexts", type=int, nargs="+", default=[12288, 65536], help="the n_ctx values to time")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="IMPL:PATTERN, IMPL in sdpa/flex/ours")
    add_model_args(p, n_layer=4, d_model=512, n_head=8, batch=1, stride=128, c=32, blocksize=32)
    add_dtype_arg(p, "bf16", help="autocast dtype of the model (fp32: no autocast)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    add_compile_args(p, default=True)
    p.add_argument(
        "--compile-scope",
        default="blocks",
        choices=("blocks", "model"),
        help="torch.compile each residual block (default, faster to compile) or the whole model",
    )
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which no new variant starts")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, run torch.profiler over STEPS steps and write the top operators by self CPU "
        "and self CUDA time to --out (profile-VARIANT-T.txt): where a step's host and GPU time go",
    )
    p.add_argument(
        "--merge", nargs="+", metavar="DIR", help="no timing: rewrite --out's tables from these runs' results.json"
    )
    add_device_arg(p, help="cpu, cuda, ... (default: %(default)s; cpu: a smoke test of the script, pass tiny sizes)")
    args = p.parse_args(argv)
    for v in args.variants:
        impl, _, pat = v.partition(":")
        if impl not in ("sdpa", "flex", "ours") or pat not in PAPER_PRESETS:
            p.error(
                f"variant {v!r}: expected IMPL:PATTERN with IMPL in sdpa/flex/ours and PATTERN in {list(PAPER_PRESETS)}"
            )
    return args


def patterns(pattern: str, args) -> list:
    return paper_preset(pattern, stride=args.stride, c=args.c, blocksize=args.blocksize)


def build(pattern: str, impl: str, time_: int, args) -> SparseTransformer:
    cfg = SparseTransformerConfig(
        vocab_size=256,
        n_ctx=time_,
        d_model=args.d_model,
        n_head=args.n_head,
        n_layer=args.n_layer,
        patterns=patterns(pattern, args),
        blocksize=args.blocksize,
        impl={"ours": "sparse"}.get(impl, impl),
    )
    return SparseTransformer(cfg)


def check_attention(pattern: str, impl: str, args, device) -> float:
    """Relative error of the pattern's attention (``--dtype`` inputs) against a float32 masked reference."""
    from sparse_attention.torch.nn import attend

    T, d, heads, b = 2048, 64, args.n_head, args.blocksize
    if device.type != "cuda":
        T = 512
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, T, heads * d, device=device, generator=g).to(torch_dtype(args.dtype)) for _ in range(3))
    err = 0.0
    for s in patterns(pattern, args):
        got = attend(q, k, v, heads, s, b, {"ours": "sparse"}.get(impl, impl)).float()
        want = attend(q.float(), k.float(), v.float(), heads, s, b, "sdpa")
        err = max(err, ((got - want).norm() / want.norm()).item())
    return err


def time_variant(variant: str, time_: int, args, device) -> dict:
    impl, _, pattern = variant.partition(":")
    torch.manual_seed(0)
    model = build(pattern, impl, time_, args).to(device)
    model.prepare(time_, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = model
    if args.compile and args.compile_scope == "model":
        fwd = torch.compile(model, dynamic=False, mode=args.compile_mode)
    elif args.compile:
        # One compiled graph per distinct block, reused by the blocks that share a pattern: a fraction
        # of the whole model's compile time; embedding, final norm and head stay eager (small here).
        for blk in model.blocks:
            blk.compile(dynamic=False, mode=args.compile_mode)
    x = torch.randint(0, 256, (args.batch, time_ + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    graphs = args.compile and args.compile_mode == "reduce-overhead"

    def step():
        if graphs:  # a new iteration: the CUDA-graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.dtype):
            _, loss = fwd(inp, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    losses = []
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    compile_s = time.perf_counter() - t0
    host = []
    times = sorted(call_ms(step, args.iters, device, host))  # CUDA events per iteration (perf_counter off the GPU)
    out = {
        "variant": variant,
        "context": time_,
        "ms_median": times[len(times) // 2],
        "ms_min": times[0],
        "ms_max": times[-1],
        "host_ms_median": median(host),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "warmup_s": compile_s,
        "loss": float(losses[-1]),
        "paths": fused_paths(model, device, impl, torch_dtype(args.dtype)),
    }
    if args.profile:
        path = Path(args.out) / f"profile-{variant.replace(':', '-')}-{time_}.txt"
        out["gpu_ms_profiled"] = profile_steps(step, args.profile, device, path)
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return out


def profile_steps(step, n: int, device, path: Path) -> float | None:
    """``torch.profiler`` over ``n`` calls of ``step``: the top operators by self CPU time, then by
    self CUDA time, written to ``path`` (and printed). Returns the GPU's busy milliseconds per
    step (the kernels' summed durations; None off the GPU): against the step's time, what the
    GPU waits."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ka = prof.key_averages()
    text = ka.table(sort_by="self_cpu_time_total", row_limit=30)
    if device.type == "cuda":
        text += "\n" + ka.table(sort_by="self_cuda_time_total", row_limit=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, flush=True)
    if device.type != "cuda":
        return None
    # the kernels' own events (the operators' device time counts them again)
    busy_us = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / n / 1e3


def fused_paths(model, device, impl, dtype) -> list[str]:
    """For ``ours``: which path each distinct layout takes (fused kernels or the gather fallback),
    from the same layouts the model's attention runs (``resolve_layouts``)."""
    if impl != "ours":
        return []
    from sparse_attention.torch import fused_unsupported_reasons
    from sparse_attention.torch.nn import resolve_layouts

    T = model.cfg.max_time
    seen = []
    for blk in model.blocks:
        a = blk.attn.attn
        for _h0, hn, lay in resolve_layouts(a.spec, T, a.heads, a.blocksize):
            merged = isinstance(lay, tuple)  # a merged local | strided head: two passes
            q = torch.empty(1, hn, T, model.cfg.d_model // a.heads, device=device, dtype=dtype)
            why = sorted({w for x in (lay if merged else (lay,)) for w in fused_unsupported_reasons(q, x)})
            name = "merged local|strided (two passes)" if merged else lay.mode
            desc = f"{name}: " + ("fused" if not why else "gather (" + "; ".join(why) + ")")
            if desc not in seen:
                seen.append(desc)
    return seen


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    by = {(r["variant"], r["context"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        f"# Training iteration time, {meta['model']}",
        "",
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; commit "
        f"`{meta['commit'][:10]}`; `{meta['command']}`",
        "",
        f"Median ms per iteration (forward + backward + AdamW, {meta.get('dtype', 'bf16')} autocast, "
        f"{meta.get('compile', 'torch.compile')}), speed-up over `sdpa:dense`, peak memory; *host*: the "
        "median host ms until a step returns, from an idle GPU (a step whose host ms is close to its ms "
        "is host-bound: the GPU waits for the launches).",
        "",
        "| variant | " + " | ".join(f"T={t} ms | host | x dense | GiB" for t in contexts) + " |",
        "| --- |" + " ---: | ---: | ---: | ---: |" * len(contexts),
    ]
    for v in variants:
        cells = []
        for t in contexts:
            r = by.get((v, t))
            dense = by.get(("sdpa:dense", t))
            if r is None:
                cells += ["-", "-", "-", "-"]
            elif "error" in r:
                cells += ["failed", "-", "-", "-"]
            else:
                sp = f"{dense['ms_median'] / r['ms_median']:.2f}" if dense and "ms_median" in dense else "-"
                host = f"{r['host_ms_median']:.1f}" if "host_ms_median" in r else "-"  # older runs' json: none
                cells += [f"{r['ms_median']:.1f}", host, sp, f"{r['peak_mem_gib']:.1f}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    notes = [f"- {r['variant']} T={r['context']}: {r['error']}" for r in rows if "error" in r]
    busy = [r for r in rows if r.get("gpu_ms_profiled") is not None]
    if busy:
        lines += ["", "GPU busy per step (`--profile`: the kernels' summed time), against the step's median:"]
        lines += [
            f"- {r['variant']} T={r['context']}: {r['gpu_ms_profiled']:.2f} of {r['ms_median']:.2f} ms" for r in busy
        ]
    paths = {r["variant"]: r["paths"] for r in rows if r.get("paths")}
    if paths:
        lines += ["", "Paths taken by `ours`:"] + [f"- {v}: {', '.join(p)}" for v, p in paths.items()]
    if notes:
        lines += ["", "Failures:"] + notes
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, t in zip(axes[0], contexts):
        vs = [v for v in variants if "ms_median" in by.get((v, t), {})]
        ax.barh(
            vs,
            [by[(v, t)]["ms_median"] for v in vs],
            color=["#888" if v.startswith("sdpa") else "#d62" if v.startswith("flex") else "#26b" for v in vs],
        )
        ax.set_xlabel("ms per training iteration")
        ax.set_title(f"context {t}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def merge(out: Path, dirs: list[str]) -> None:
    """Rewrite the tables of ``out`` from the ``results.json`` of several runs (later runs win)."""
    rows, meta = {}, None
    for d in dirs:
        data = json.loads((Path(d) / "results.json").read_text())
        meta = meta or data["meta"]
        for key in ("device", "model"):
            if data["meta"][key] != meta[key]:
                raise ValueError(f"{d} has {key} {data['meta'][key]!r}, the first run {meta[key]!r}: not comparable")
        for r in data["results"]:
            rows[(r["variant"], r["context"])] = r
        if data["meta"]["command"] not in meta["command"]:
            meta["command"] += " ; " + data["meta"]["command"]
    write(out, meta, list(rows.values()))


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        merge(Path(args.out), args.merge)
        print((Path(args.out) / "results.md").read_text())
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU (or --device cpu for a smoke test at tiny sizes)")
    if device.type == "cpu":
        print("on the CPU: a smoke test of the script (times are not the GPU's)", flush=True)
    meta = environment(device, argv, __file__)
    meta["dtype"] = args.dtype
    meta["compile"] = "eager" if not args.compile else f"torch.compile of the {args.compile_scope}"
    if args.compile and args.compile_mode != "default":
        meta["compile"] += f", mode={args.compile_mode}"
    if args.compile and os.environ.get("SPARSE_ATTENTION_INLINE_LAUNCHES", "0") == "1":
        meta["compile"] += ", our kernel launches in the graph (SPARSE_ATTENTION_INLINE_LAUNCHES=1)"
    meta["model"] = (
        f"{args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads, batch {args.batch}, byte vocabulary"
    )
    out = Path(args.out)
    rows, checks = [], {}
    start = time.perf_counter()
    # Variant-major: the first variants get every context before later variants start.
    for v in args.variants:
        for t in args.contexts:
            if time.perf_counter() - start > args.budget:
                print(f"budget of {args.budget:.0f} s spent: skipping {v} at {t}", flush=True)
                continue
            impl, _, pattern = v.partition(":")
            if impl != "sdpa" and v not in checks:
                try:
                    checks[v] = check_attention(pattern, impl, args, device)
                except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                    checks[v] = f"{type(e).__name__}: {e}"
            c = checks.get(v, 0.0)
            if isinstance(c, str) or c > 2e-2:
                rows.append({"variant": v, "context": t, "error": f"correctness check failed: {c}"})
            else:
                try:
                    r = time_variant(v, t, args, device)
                    r["check_rel_err"] = c
                    rows.append(r)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory; reported, the run goes on
                    rows.append({"variant": v, "context": t, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    torch._dynamo.reset()
                    torch.cuda.empty_cache()
            r = rows[-1]
            print(
                f"T={t:6d} {v:28s} "
                + (
                    f"{r['ms_median']:8.2f} ms  host {r['host_ms_median']:6.2f} ms  {r['peak_mem_gib']:5.1f} GiB  "
                    f"(warm-up {r['warmup_s']:.0f} s)"
                    if "ms_median" in r
                    else r["error"]
                ),
                flush=True,
            )
            write(out, meta, rows)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
