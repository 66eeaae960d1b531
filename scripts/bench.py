"""Benchmark the fused block-sparse kernels against SDPA (cuDNN, flash) and FlexAttention.

A correctness gate runs first (every mode, fwd and the three gradients against a float32
reference); no timing is reported if it fails. Then, per configuration: forward and
forward+backward time (median, CUDA events) and peak memory of ours and the peers, with ratios
and the floor (the larger of allowed FLOPs at 400 TFLOP/s and the bytes of q, k, v, o at 3 TB/s).
The patterns are the presets of the issue's target (``sparse_attention.patterns.PRESETS["target"]``);
FlexAttention runs each one's closed form as its ``mask_mod``. Writes ``bench-<tag>.json``, ``.md``
and ``.png`` under ``--out``.

    python scripts/bench.py                 # the issue's target configuration + 1M-token runs
    python scripts/bench.py --full          # time 4096/16384/65536, fp16/bf16, head_dim 64/128
    python scripts/bench.py --sweep         # also try a few tile configs on the target shapes
    python scripts/bench.py --full --times 65536 --dtypes bf16 --tag full-65536-bf16   # a slice of --full
    python scripts/bench.py --merge benchmarks/bench-full-*.json --tag full           # one table of slices
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from sparse_attention import blocksparse_attention_impl
from sparse_attention.patterns import preset
from sparse_attention.torch import blocksparse_attention_bhtd
from sparse_attention.torch.baselines import flex_block_mask
from sparse_attention.torch.kernels import launch
from sparse_attention.torch.reference import masked_attention
from sparse_attention.utils.benchmark import (
    DTYPES,
    add_model_args,
    add_modes_arg,
    allowed_pairs,
    comma_list,
    dtype_name,
    environment,
    flex_forms,
    fwd_and_fb,
    graph_ms,
    peak_mem_mib,
    script_parser,
    timeit,
    torch_dtype,
)

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 400e12
PEAK_BYTES = 3e12
# Tile configs tried by --sweep, per kernel: BM x BN / num_warps / num_stages.
SWEEP_CONFIGS = {
    "fwd": "64x64/4/3 128x64/4/3 64x32/4/4 128x32/4/4 128x128/8/3 128x64/8/3 64x128/4/3 32x32/4/4 64x64/4/2 128x64/4/2",
    "dkdv": "32x64/4/4 64x64/4/3 32x128/4/3 64x128/8/3 64x32/4/4 128x64/8/3 32x32/4/4 64x64/4/2 128x128/8/3",
    "dq": "64x32/4/4 64x64/4/3 128x32/4/3 128x64/8/3 32x64/4/4 32x32/4/4 64x128/4/3 128x64/4/3 64x64/4/2",
}


def floors(pairs: int, B, H, T, D, elt=2):
    """Milliseconds (forward, forward+backward) at the peaks: the larger of the FLOPs of the
    ``pairs`` allowed pairs (per batch element, all heads) and the bytes of q, k, v, o."""
    f = 4.0 * D * pairs * B
    n = B * H * T * D * elt
    fwd = max(f / PEAK_FLOPS, 4 * n / PEAK_BYTES)
    fb = max(3.5 * f / PEAK_FLOPS, 12 * n / PEAK_BYTES)
    return fwd * 1e3, fb * 1e3


def correctness_gate(dtype) -> list[str]:
    """Every mode at time 2048 (fwd, dq, dk, dv) against float32 under the pattern's closed form;
    returns the failures."""
    fails = []
    T, H = 2048, 4
    pos = torch.arange(T, device="cuda")
    for mode in ("all", "local", "strided", "fixed"):
        p = preset(mode)
        p = p.replace(blocksize=min(p.blocksize, 32))
        lay = p.layout(T, H)
        mask = p.spec.mask(pos, pos, H, p.blocksize)
        q, k, v, do = (torch.randn(2, H, T, 64, device="cuda", dtype=dtype) for _ in range(4))
        outs = []
        for fn in (
            lambda a, b_, c, lay=lay: blocksparse_attention_bhtd(a, b_, c, lay),
            lambda a, b_, c, mask=mask: masked_attention(a.float(), b_.float(), c.float(), mask),
        ):
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            o = fn(*xs)
            o.backward(do.to(o.dtype))
            outs.append([o, *(x.grad for x in xs)])
        for name, a, r in zip(("out", "dq", "dk", "dv"), *outs):
            err = ((a.float() - r).norm() / r.norm()).item()
            ok = math.isfinite(err) and err < 2e-2
            print(f"gate {mode:8s} {name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
            if not ok:
                fails.append(f"{mode} {name} {err:.2e}")
    return fails


def summarize(rec: dict) -> dict:
    """Derive a record's comparisons from its ``results``: the best FlexAttention form and the
    speed-ups of ours over it and over cuDNN (event and GPU time). Returns ``rec``, updated."""
    for key in [k for k in rec if k.startswith(("flex_best_", "speedup_vs_"))]:
        del rec[key]
    res = rec["results"]
    ours = res.get("ours", {})
    if "error" in ours or "fwd_ms" not in ours:
        return rec
    flex = [r for n, r in res.items() if n.startswith("flex") and "fwd_ms" in r]
    cudnn = res.get("sdpa-cudnn", {})
    for k in ("fwd", "fb"):
        for suffix in ("ms", "gpu_ms"):
            mine = ours.get(f"{k}_{suffix}")
            tail = "" if suffix == "ms" else "_gpu"
            got = [r[f"{k}_{suffix}"] for r in flex if f"{k}_{suffix}" in r]
            if got and mine:
                rec[f"flex_best_{k}_{suffix}"] = min(got)
                rec[f"speedup_vs_flex_{k}{tail}"] = min(got) / mine
            if f"{k}_{suffix}" in cudnn and mine:
                rec[f"speedup_vs_cudnn_{k}{tail}"] = cudnn[f"{k}_{suffix}"] / mine
    return rec


def run_case(
    mode, dtype_name, B, H, T, D, peers=("sdpa", "flex"), budget=1.0, graphs=True, suite="target", public=False
):
    """Ours (the ``[b, h, t, d]`` op; with ``public`` also ``blocksparse_attention_impl`` on
    ``[b, t, h*d]``) and the ``peers`` named, on one preset of ``suite``."""
    dtype = torch_dtype(dtype_name)
    p = preset(mode, suite)
    lay = p.layout(T, H)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(4))
    params = p.spec.kwargs(p.blocksize)
    rec = dict(mode=mode, dtype=dtype_name, batch=B, heads=H, time=T, head_dim=D, params=params, suite=suite)
    rec["floor_fwd_ms"], rec["floor_fb_ms"] = floors(allowed_pairs(lay), B, H, T, D, dtype.itemsize)
    res = {}

    def measure(name, f, qq=q, kk=k, vv=v, dd=do):
        try:
            fwd, fb = fwd_and_fb(f, qq, kk, vv, dd)
            r = dict(fwd_ms=timeit(fwd, budget), fb_ms=timeit(fb, budget), fb_mem_mib=peak_mem_mib(fb))
        except Exception as e:  # a peer that cannot run this shape is reported, not fatal
            r = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        if "error" not in r and graphs:
            # GPU time alone: the same calls captured in a CUDA graph and replayed
            for key, fn in (("fwd_gpu_ms", fwd), ("fb_gpu_ms", fb)):
                try:
                    r[key] = graph_ms(fn)
                except Exception as e:  # capture is best effort (reported, not fatal)
                    r[key + "_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                torch.cuda.synchronize()
        res[name] = r
        print(
            f"  {mode:8s} {dtype_name} T={T:8d} D={D:3d} {name:16s} "
            + (
                f"fwd {r['fwd_ms']:9.3f} ms  fwd+bwd {r['fb_ms']:9.3f} ms  mem {r['fb_mem_mib']:8.0f} MiB"
                f"  GPU {fmt(r.get('fwd_gpu_ms'))} / {fmt(r.get('fb_gpu_ms'))} ms"
                if "error" not in r
                else r["error"]
            ),
            flush=True,
        )

    measure("ours", lambda a, b_, c: blocksparse_attention_bhtd(a, b_, c, lay))
    if public:  # the public call on [b, t, h*d] tensors (heads as strided views inside)
        kw = p.kwargs()
        btd = [x.transpose(1, 2).reshape(B, T, H * D) for x in (q, k, v, do)]
        measure("ours-public", lambda a, b_, c: blocksparse_attention_impl(a, b_, c, H, **kw), *btd)
        del btd
    if mode == "all":
        os.environ["SPARSE_ATTENTION_ALL_FUSED"] = "1"
        measure("ours-fused", lambda a, b_, c: blocksparse_attention_bhtd(a, b_, c, lay))
        os.environ.pop("SPARSE_ATTENTION_ALL_FUSED")
    if "sdpa" in peers:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):

            def f(a, b_, c, be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(a, b_, c, is_causal=True)

            measure(name, f)
    if "flex" in peers:
        try:
            from torch import _dynamo
            from torch.nn.attention.flex_attention import flex_attention

            # forward (no_grad) and forward+backward of several masks: more than the default 8 variants
            for name in ("recompile_limit", "cache_size_limit"):
                try:
                    setattr(_dynamo.config, name, 64)
                except Exception:
                    pass
            flex = torch.compile(flex_attention, dynamic=False)
            for name, spec, perm in flex_forms(p, T):
                # the mask of the spec's closed form, in Flex's 128-blocks (compiled at long T: a
                # dense [heads, T, T] evaluation at 65,536 would ask for 256 GiB)
                bm = flex_block_mask(spec, H, T, p.blocksize, "cuda")
                qq, kk, vv, dd = q, k, v, do
                if perm is not None:
                    idx = torch.from_numpy(perm).cuda()
                    qq, kk, vv, dd = (x.index_select(2, idx).contiguous() for x in (q, k, v, do))
                measure(name, lambda a, b_, c, bm=bm: flex(a, b_, c, block_mask=bm), qq, kk, vv, dd)
        except Exception as e:
            res["flex"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            print("  flex failed:", res["flex"]["error"])
    rec["results"] = res
    summarize(rec)
    del q, k, v, do
    torch.cuda.empty_cache()
    return rec


def sweep(dtype_name="fp16", B=2, H=8, T=16384, D=64, modes=("local", "strided", "fixed"), suite="target"):
    """Try tile configs per kernel and mode on the presets of ``suite`` at this shape, timed as
    CUDA-graph replays (GPU time: host time would swamp the short kernels); keep the fastest for
    the timings that follow (recorded in the JSON). Backward variants time the whole backward pass
    with the other backward kernel at its current config."""
    out = {}
    dtype = torch_dtype(dtype_name)
    for mode in modes:
        lay = preset(mode, suite).layout(T, H)
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(4))
        o, lse = launch.forward(q, k, v, lay)
        for kind, text in SWEEP_CONFIGS.items():
            key = (kind, mode, launch.head_dim_bucket(D))
            saved = launch.MODE_CONFIGS.get(key)
            res = []
            for c in text.split():
                tile, warps, stages = c.split("/")
                bm, bn = tile.split("x")
                c = dict(BM=int(bm), BN=int(bn), num_warps=int(warps), num_stages=int(stages))
                launch.MODE_CONFIGS[key] = c
                launch.configs_changed()
                if kind == "fwd":
                    fn = lambda a=(q, k, v, lay): launch.forward(*a)  # noqa: E731
                else:
                    fn = lambda a=(do, q, k, v, o, lse, lay): launch.backward(*a)  # noqa: E731
                try:
                    ms = graph_ms(fn)
                except Exception as e:
                    ms = float("inf")
                    print("   ", kind, c, type(e).__name__, str(e)[:100])
                res.append((c, ms))
                print(f"  sweep {mode:8s} {kind:5s} {c} {ms:.4f} ms", flush=True)
            best = min(res, key=lambda r: r[1])
            launch.MODE_CONFIGS[key] = best[0] if math.isfinite(best[1]) else saved
            launch.configs_changed()
            out.setdefault(mode, {})[kind] = dict(tried=res, chosen=launch.MODE_CONFIGS[key])
            print(f"  sweep {mode:8s} {kind:5s} chosen {launch.MODE_CONFIGS[key]}", flush=True)
    return out


def fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _plot(records, meta, path: Path):
    """Bars per case for one time; for a grid over several times, ms against time per mode (fp16;
    head_dim 64 solid, 128 dashed; GPU time where recorded, else CUDA-event time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "error" not in r["results"]["ours"]]
    grid = [r for r in recs if r["results"].get("sdpa-cudnn")]  # the peer-timed cases
    times = sorted({r["time"] for r in grid})
    if len(times) < 2:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        names = ["ours", "sdpa-cudnn", "sdpa-flash", "flex", "flex-transposed"]
        for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fb_ms", "forward + backward")):
            w = 0.16
            for ni, n in enumerate(names):
                ys = [r["results"].get(n, {}).get(key, 0) or 0 for r in recs]
                ax.bar([x + ni * w for x in range(len(recs))], ys, w, label=n)
            ax.set_xticks([x + 2 * w for x in range(len(recs))])
            ax.set_xticklabels(
                [f"{r['mode']}\n{r['dtype']} T={r['time']}\nD={r['head_dim']}" for r in recs], fontsize=7
            )
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{meta['device']}, batch×heads as in the table", fontsize=9)
    else:
        modes = list(dict.fromkeys(r["mode"] for r in grid))
        fig, axes = plt.subplots(2, len(modes), figsize=(3.6 * len(modes), 6.4), squeeze=False)
        peers = (("ours", "C0"), ("sdpa-cudnn", "C1"), ("flex best", "C3"))

        def ms(r, peer, k):
            if peer == "flex best":  # run_case's summary of the Flex forms
                return r.get(f"flex_best_{k}_gpu_ms", r.get(f"flex_best_{k}_ms"))
            x = r["results"].get(peer, {})
            return x.get(f"{k}_gpu_ms", x.get(f"{k}_ms"))

        for col, mode in enumerate(modes):
            for row, (k, title) in enumerate((("fwd", "forward"), ("fb", "forward + backward"))):
                ax = axes[row][col]
                for D, ls in ((64, "-"), (128, "--")):
                    rs = sorted(
                        (r for r in grid if r["mode"] == mode and r["dtype"] == "fp16" and r["head_dim"] == D),
                        key=lambda r: r["time"],
                    )
                    for peer, c in peers:
                        pts = [(r["time"], y) for r in rs if (y := ms(r, peer, k)) is not None]
                        if pts:
                            ax.plot(*zip(*pts), ls, color=c, marker="o", ms=3, label=f"{peer} D={D}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{mode}: {title}", fontsize=9)
                ax.set_xlabel("time (tokens)", fontsize=8)
                if col == 0:
                    ax.set_ylabel("ms (log), GPU time", fontsize=8)
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"{meta['device']}, fp16, batch 2, heads 8 (bf16 and event times: the table)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(records, meta, tag, outdir: Path):
    """``bench-<tag>.json``, ``.md`` (two tables: CUDA-event time, GPU time) and ``.png`` of the
    records under ``outdir``; returns the markdown. Comparisons are derived here (:func:`summarize`)."""
    records = [summarize(r) for r in records]
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"bench-{tag}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}",
        f"Command: `{meta['command']}`",
        "",
        "| mode | dtype | B×H×T×D | ours fwd / fwd+bwd (ms) | ours public call | SDPA cuDNN | SDPA flash | "
        "Flex best | × vs Flex (fwd / f+b) | × vs cuDNN (fwd / f+b) | floor (ms) | ours mem (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        res = r["results"]

        def pair(name, res=res):
            x = res.get(name)
            return "–" if not x or "error" in x else f"{x['fwd_ms']:.3f} / {x['fb_ms']:.3f}"

        flex = "–" if "flex_best_fwd_ms" not in r else f"{r['flex_best_fwd_ms']:.3f} / {r['flex_best_fb_ms']:.3f}"
        vf = (
            "–" if "speedup_vs_flex_fwd" not in r else f"{r['speedup_vs_flex_fwd']:.2f} / {r['speedup_vs_flex_fb']:.2f}"
        )
        vc = (
            "–"
            if "speedup_vs_cudnn_fwd" not in r
            else f"{r['speedup_vs_cudnn_fwd']:.2f} / {r['speedup_vs_cudnn_fb']:.2f}"
        )
        mem = res["ours"].get("fb_mem_mib")
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['batch']}×{r['heads']}×{r['time']}×{r['head_dim']} | "
            f"{pair('ours')} | {pair('ours-public')} | {pair('sdpa-cudnn')} | {pair('sdpa-flash')} | "
            f"{flex} | {vf} | {vc} | "
            f"{r['floor_fwd_ms']:.3f} / {r['floor_fb_ms']:.3f} | {fmt(mem, 0)} |"
        )
    lines += [
        "",
        "GPU time alone (the same calls captured in a CUDA graph and replayed; ms, forward / fwd+bwd):",
        "",
        "| mode | dtype | B×H×T×D | ours | SDPA cuDNN | Flex best | × vs Flex | × vs cuDNN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if "fwd_gpu_ms" in r["results"].get("ours", {})):
        res = r["results"]

        def gpair(x):
            return "–" if not x or "fwd_gpu_ms" not in x else f"{x['fwd_gpu_ms']:.3f} / {fmt(x.get('fb_gpu_ms'))}"

        def ratio(a, b, r=r):
            return "–" if a not in r else f"{r[a]:.2f} / {fmt(r.get(b), 2)}"

        fl = (
            "–"
            if "flex_best_fwd_gpu_ms" not in r
            else f"{r['flex_best_fwd_gpu_ms']:.3f} / {fmt(r.get('flex_best_fb_gpu_ms'))}"
        )
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['batch']}×{r['heads']}×{r['time']}×{r['head_dim']} | "
            f"{gpair(res.get('ours'))} | {gpair(res.get('sdpa-cudnn'))} | {fl} | "
            f"{ratio('speedup_vs_flex_fwd_gpu', 'speedup_vs_flex_fb_gpu')} | "
            f"{ratio('speedup_vs_cudnn_fwd_gpu', 'speedup_vs_cudnn_fb_gpu')} |"
        )
    md = "\n".join(lines) + "\n"
    (outdir / f"bench-{tag}.md").write_text(md)
    try:
        _plot(records, meta, outdir / f"bench-{tag}.png")
    except Exception as e:  # the plot is optional (matplotlib: the bench extra)
        print("plot skipped:", e)
    return md


def merge_records(runs: list[dict]) -> list[dict]:
    """The records of several runs, in order; a case (mode, dtype, shape) measured again in a
    later run is replaced by that run's record (ours and every peer come from one run)."""
    out: dict = {}
    for r in runs:
        for rec in r["records"]:
            out[tuple(rec[k] for k in ("mode", "dtype", "batch", "heads", "time", "head_dim"))] = rec
    return list(out.values())


def parse_args(argv=None):
    ap = script_parser(__doc__)
    ap.add_argument("--full", action="store_true", help="time 4096/16384/65536 x fp16/bf16 x head_dim 64/128")
    ap.add_argument(
        "--times", type=comma_list(int, what="time"), help="comma list (default: 16384; with --full 4096,16384,65536)"
    )
    ap.add_argument(
        "--dtypes",
        type=comma_list(dtype_name, what="dtype"),
        help=f"comma list of {', '.join(DTYPES)} (default: fp16; with --full fp16,bf16)",
    )
    ap.add_argument(
        "--head-dims", type=comma_list(int, what="head_dim"), help="comma list (default: 64; with --full 64,128)"
    )
    add_model_args(ap, batch=2, n_head=8, help={"batch": "batch of the grid (the 1,048,576-token runs: 1)"})
    add_modes_arg(ap)
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="no timing: write one table (--tag, --out) from the records of earlier runs' JSON files "
        "(a case in several runs: the last one's record)",
    )
    ap.add_argument("--no-million", action="store_true", help="skip the time=1,048,576 runs")
    ap.add_argument("--million-only", action="store_true", help="only the time=1,048,576 runs")
    ap.add_argument("--no-peers", action="store_true", help="ours alone (no SDPA, no FlexAttention)")
    ap.add_argument("--sweep", action="store_true", help="try tile configs on the target shapes first")
    ap.add_argument(
        "--sweep-million",
        action="store_true",
        help="sweep on the 1,048,576-token presets instead, at batch 1 and time 131,072 (their tiles' loops)",
    )
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per measurement")
    ap.add_argument("--tag", default=None, help="file names bench-TAG.* (default: target, full or merged)")
    ap.add_argument("--out", "--outdir", dest="out", default=str(ROOT / "benchmarks"), help="output directory")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        meta = dict(runs[0]["meta"])
        meta["command"] = " ; ".join(r["meta"]["command"] for r in runs)
        meta["date"] = " ; ".join(sorted({r["meta"]["date"] for r in runs}))
        print(write(merge_records(runs), meta, args.tag or "merged", Path(args.out)))
        return
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    meta = environment("cuda", argv, __file__)
    meta["configs"] = {f"{k[0]}-d{k[1]}": v for k, v in launch.CONFIGS.items()}
    t0 = time.time()
    fails = correctness_gate(torch.float16) + correctness_gate(torch.bfloat16)
    if fails:
        print("correctness gate FAILED, no timings reported:", fails)
        sys.exit(1)
    modes = args.modes
    if args.sweep or args.sweep_million:
        where = dict(B=1, T=1 << 17, suite="million") if args.sweep_million else {}
        meta["sweep"] = sweep(modes=[m for m in modes if m != "all"], H=args.n_head, **where)
        if args.sweep_only:
            for k, v in launch.MODE_CONFIGS.items():
                print(k, v)
            return
    meta["mode_configs"] = {"-".join(map(str, k)): v for k, v in launch.MODE_CONFIGS.items()}
    full = args.full
    times = args.times or ([4096, 16384, 65536] if full else [16384])
    dtypes = args.dtypes or (["fp16", "bf16"] if full else ["fp16"])
    dims = args.head_dims or ([64, 128] if full else [64])
    B, H = args.batch, args.n_head
    grid = dict(peers=()) if args.no_peers else {}  # every peer, GPU time too
    # Issue 11's comparison: the public call and Flex on the "million" presets, one event-timed
    # call after a warm-up (the budget allows no more at these sizes)
    million = dict(peers=() if args.no_peers else ("flex",), graphs=False, suite="million", public=True)
    cases = (
        []
        if args.million_only
        else [((m, dt, B, H, T, D), grid) for T in times for dt in dtypes for D in dims for m in modes]
    )
    if not args.no_million:
        cases += [((m, "fp16", 1, H, 1 << 20, 64), million) for m in modes if m != "all"]
    records = []
    tag = args.tag or ("million" if args.million_only else "full" if full else "target")
    for c, kw in cases:
        records.append(run_case(*c, budget=args.budget, **kw))
        md = write(records, meta, tag, Path(args.out))  # after every case: a cut-off run keeps its results
    print(f"\n({time.time() - t0:.0f} s)\n")
    print(md)


if __name__ == "__main__":
    main()
