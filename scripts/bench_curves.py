"""Bits-per-byte curves of a small byte-level model with dense, fixed and strided attention.

    python scripts/bench_curves.py --out benchmarks/train_curves        # CPU is enough; GPU if present

Same data (the default corpus: the Python standard library sources), steps, seed and model for
every pattern; writes ``curves.json``, ``curves.md`` and ``curves.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "dense": ["--attn", "dense"],
    "fixed (merged)": ["--attn", "fixed", "--factorization", "merged"],
    "strided (interleaved)": ["--attn", "strided", "--factorization", "interleaved"],
    "strided (merged)": ["--attn", "strided", "--factorization", "merged"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/train_curves")
    p.add_argument("--runs-dir", default="benchmarks/scratch/curves", help="checkpoints and logs (git-ignored)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument(
        "--model",
        default="--n-ctx 512 --d-model 128 --n-head 4 --n-layer 3 --stride 32 --c 16 "
        "--blocksize 16 --batch-size 8 --lr 2e-3 --warmup 30 --eval-batches 4 --sample-len 0",
        help="train.py arguments shared by every run",
    )
    args = p.parse_args(argv)
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = args.model.split() + [
        "--steps",
        str(args.steps),
        "--eval-interval",
        str(args.eval_interval),
        "--seed",
        "0",
        "--ckpt-interval",
        str(10**9),
    ]
    results = {}
    for name in args.runs:
        t0 = time.perf_counter()
        slug = name.replace(" (", "_").replace(")", "")
        recs = train.main(common + RUNS[name] + ["--out", str(Path(args.runs_dir) / slug), "--no-progress"])
        results[name] = {
            "steps": [r["step"] for r in recs if "val_bpb" in r],
            "val_bpb": [r["val_bpb"] for r in recs if "val_bpb" in r],
            "train_bpb": [r["train_bpb"] for r in recs],
            "seconds": time.perf_counter() - t0,
        }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    meta = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
        "train_args": common,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "corpus": "Python standard library sources (default corpus)",
    }
    (out / "curves.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        f"# Held-out bits per byte, {args.steps} steps, same seed and data",
        "",
        f"Device: {device}; torch {torch.__version__}; command: `{meta['command']}`",
        "",
        "| pattern | " + " | ".join(f"step {s}" for s in results[args.runs[0]]["steps"]) + " | time (s) |",
        "| --- |" + " --- |" * (len(results[args.runs[0]]["steps"]) + 1),
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["val_bpb"]) + f" | {r['seconds']:.0f} |")
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["steps"], r["val_bpb"], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("byte-level LM on the Python stdlib sources")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
