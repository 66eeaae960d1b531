"""Bits-per-byte curves of a small byte-level model with dense, fixed and strided attention.

    python scripts/bench_curves.py --out benchmarks/train_curves        # CPU is enough; GPU if present

Same data (the default corpus: the Python standard library sources), steps, seed and model for
every pattern (``--runs``: names of ``sparse_attention.patterns.PAPER_PRESETS``); each run is a
``python scripts/train.py`` process. Writes ``curves.json``, ``curves.md`` and ``curves.png``
under ``--out``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sparse_attention.patterns import PAPER_PRESETS
from sparse_attention.utils.benchmark import environment, script_parser

TRAIN = Path(__file__).resolve().with_name("train.py")
DEFAULT_RUNS = ["dense", "fixed", "strided-interleaved", "strided-merged"]


def train_args(name: str) -> list[str]:
    """train.py's arguments of a named paper pattern."""
    kind, factorization = PAPER_PRESETS[name]
    return ["--attn", kind, "--factorization", factorization]


def run(name: str, common: list[str], run_dir: Path) -> list[dict]:
    """One training run in its own process; returns its log records."""
    log = run_dir / "log.jsonl"
    if log.exists():
        log.unlink()  # train.py appends to its log: start this run's afresh
    cmd = [sys.executable, str(TRAIN), *common, *train_args(name), "--out", str(run_dir), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run {name!r} failed ({shlex.join(cmd)}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in log.read_text().splitlines()]


def main(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--out", default="benchmarks/train_curves", help="output directory (default: %(default)s)")
    p.add_argument("--runs-dir", default="benchmarks/scratch/curves", help="checkpoints and logs (git-ignored)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, choices=list(PAPER_PRESETS))
    p.add_argument(
        "--model",
        default="--n-ctx 512 --d-model 128 --n-head 4 --n-layer 3 --stride 32 --c 16 "
        "--blocksize 16 --batch 8 --lr 2e-3 --warmup 30 --eval-batches 4 --sample-len 0",
        help="train.py arguments shared by every run (default: %(default)s)",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = shlex.split(args.model) + [
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
        recs = run(name, common, Path(args.runs_dir) / name)
        results[name] = {
            "steps": [r["step"] for r in recs if "val_bpb" in r],
            "val_bpb": [r["val_bpb"] for r in recs if "val_bpb" in r],
            "train_bpb": [r["train_bpb"] for r in recs],
            "seconds": time.perf_counter() - t0,
        }
    meta = environment(None, argv, __file__)
    meta.update(train_args=common, corpus="Python standard library sources (default corpus)")
    (out / "curves.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    steps = results[args.runs[0]]["steps"]
    lines = [
        f"# Held-out bits per byte, {args.steps} steps, same seed and data",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; command: `{meta['command']}`",
        "",
        "| pattern | " + " | ".join(f"step {s}" for s in steps) + " | time (s) |",
        "| --- |" + " --- |" * (len(steps) + 1),
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
