"""Time the public calls of several source trees side by side, on one GPU, in one run.

For a refactor ("behaviour and speed unchanged"): each tree's ``sparse_attention`` runs in its own
worker process (``PYTHONPATH=<tree>``), in alternating rounds, through the public entry points
that every tree has: ``blocksparse_attention_impl`` on ``[batch, time, heads * head_dim]`` and the
``[batch, heads, time, head_dim]`` op. Per mode of the target presets: GPU time (CUDA-graph
replays) and events per call, forward and forward+backward; the table gives each tree's median
over the rounds and its ratio to the first tree. Self-contained (Triton's timers), so that an old
tree without ``sparse_attention.utils`` runs it too.

    python scripts/bench_compare.py --trees baseline . --out benchmarks/compare
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# the target presets (fp16, B2 H8 T16384 D64), written out: an old tree may not have them
CASES = {
    "all": dict(local_attn_ctx=None, blocksize=128),
    "local": dict(local_attn_ctx=128, blocksize=128),
    "strided": dict(local_attn_ctx=128, blocksize=128),
    "fixed": dict(local_attn_ctx=128, blocksize=32, num_verts=4, vertsize=1),
}
SHAPE = dict(B=2, H=8, T=16384, D=64)


def worker(modes: list[str]) -> dict:
    import torch
    import triton.testing as tt

    import sparse_attention as sa

    try:
        from sparse_attention.torch import blocksparse_attention_bhtd
    except ImportError:  # trees before the one-house layout
        from sparse_attention.torch.ops import blocksparse_attention_bhtd

    B, H, T, D = SHAPE["B"], SHAPE["H"], SHAPE["T"], SHAPE["D"]
    out = {}
    for mode in modes:
        kw = {k: v for k, v in CASES[mode].items() if v is not None}
        lay = sa.make_layout(T, H, mode, **kw)
        x = [torch.randn(B, T, H * D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)]
        xh = [t.detach().view(B, T, H, D).transpose(1, 2).requires_grad_() for t in x]
        do = torch.randn(B, T, H * D, device="cuda", dtype=torch.float16)
        calls = {
            "public": lambda x=x, mode=mode, kw=kw: sa.blocksparse_attention_impl(*x, H, mode, **kw),
            "bhtd": lambda xh=xh, lay=lay: blocksparse_attention_bhtd(*xh, lay),
        }
        for path, fn in calls.items():
            grad = do if path == "public" else do.view(B, T, H, D).transpose(1, 2)

            def fb(fn=fn, grad=grad):
                fn().backward(grad)

            with torch.no_grad():
                out[f"{mode}/{path}/fwd/graph"] = tt.do_bench_cudagraph(fn, rep=100)
                out[f"{mode}/{path}/fwd/events"] = tt.do_bench(fn, rep=100)
            out[f"{mode}/{path}/fb/graph"] = tt.do_bench_cudagraph(fb, rep=100)
            out[f"{mode}/{path}/fb/events"] = tt.do_bench(fb, rep=100)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", default=["."], help="source trees (the first is the reference)")
    ap.add_argument("--modes", default="all,local,strided,fixed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for compare.json and compare.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.worker:
        print(json.dumps(worker(modes)))
        return
    runs = {t: [] for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--modes", args.modes]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=os.path.abspath(tree))
            runs[tree].append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = list(runs[args.trees[0]][0])
    med = {t: {k: statistics.median(r[k] for r in runs[t]) for k in keys} for t in args.trees}
    head = (
        "| case (ms) | "
        + " | ".join(args.trees)
        + " | "
        + " | ".join(f"{t} / {args.trees[0]}" for t in args.trees[1:])
        + " |"
    )
    lines = [head, "|" + "---|" * (1 + 2 * len(args.trees) - 1)]
    for k in keys:
        ref = med[args.trees[0]][k]
        vals = " | ".join(f"{med[t][k]:.3f}" for t in args.trees)
        ratios = " | ".join(f"{med[t][k] / ref:.3f}" for t in args.trees[1:])
        lines.append(f"| {k} | {vals} | {ratios} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "shape": SHAPE, "cases": CASES, "rounds": args.rounds}
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump({"meta": meta, "runs": runs, "median": med}, f, indent=1)
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
