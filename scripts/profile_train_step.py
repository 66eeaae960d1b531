"""Where one training step of ``bench_train.py``'s model spends its host and GPU time
(``torch.profiler``): the top operators by self CPU and self CUDA time over a few steps.

    python scripts/profile_train_step.py --variant ours:local --context 12288 --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="ours:local")
    p.add_argument("--context", type=int, default=12288)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (default mode)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args(argv)
    args = bench_train.parse_args(["--device", "cuda", "--compile" if a.compile else "--no-compile"])
    impl, _, pattern = a.variant.partition(":")
    dev = torch.device("cuda")
    model = bench_train.build(pattern, impl, a.context, args).to(dev)
    model.prepare(a.context, dev)
    if a.compile:
        for blk in model.blocks:
            blk.compile(dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 256, (1, a.context + 1), device=dev)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    print(ka.table(sort_by="self_cuda_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
