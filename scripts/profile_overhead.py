"""Where the time of a short block-sparse call goes on the GPU: host time against kernel time.

For each mode at the issue's target shape (fp16, B2 H8 T16384 D64) it measures, for the forward
(no grad) and the forward+backward:

- ``event``: the benchmark's timing (CUDA events around one call, median), what users see;
- ``host``: host microseconds per call, from a loop of calls without synchronisation;
- ``gpu``: the sum of the kernels' durations per call (torch.profiler);
- ``graph``: one CUDA-graph replay of the call (the kernels back to back, no host work);

through the public function and through the bare autograd Function (no argument checks), and
for FlexAttention ``local`` as the peer. ``calibrate`` first times plain PyTorch calls on the
machine (an allocation, a tiny kernel, a tiny autograd backward) and our forward launcher.

    python scripts/profile_overhead.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench import fwd_and_fb, graph_ms, timeit  # scripts/bench.py: the benchmark's timers

from sparse_attention.layouts import make_layout
from sparse_attention.torch import ops
from sparse_attention.torch.kernels import launch

PATTERNS = {
    "local": dict(local_attn_ctx=128, blocksize=32),
    "strided": dict(local_attn_ctx=128, blocksize=32),
    "fixed": dict(local_attn_ctx=128, blocksize=32, num_verts=4, vertsize=1),
}


def host_us(fn, reps=50):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / reps * 1e6


def gpu_us(fn, reps=10):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    tot, names = 0.0, {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.time_range.elapsed_us()
            tot += us
            names[ev.name] = names.get(ev.name, 0.0) + us / reps
    return tot / reps, {k[:60]: round(v, 1) for k, v in sorted(names.items(), key=lambda x: -x[1])[:6]}


def event_ms(fn):
    return timeit(fn, budget_s=0.2, max_reps=50)


def measure(name, f, q, k, v, do, graphs=True):
    fwd, fb = fwd_and_fb(f, q, k, v, do)
    rec = {}
    for tag, fn in (("fwd", fwd), ("fb", fb)):
        fn()
        fn()
        torch.cuda.synchronize()
        r = dict(event_ms=event_ms(fn), host_us=host_us(fn))
        r["gpu_us"], r["kernels"] = gpu_us(fn)
        if graphs and tag == "fwd":
            try:
                r["graph_ms"] = graph_ms(fn)
            except Exception as e:  # capture is best effort
                r["graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rec[tag] = r
        print(
            f"{name:24s} {tag:3s} event {r['event_ms']:.3f} ms  host {r['host_us']:7.1f} us  "
            f"gpu {r['gpu_us']:7.1f} us  graph {r.get('graph_ms', float('nan')):.3f} ms  {r['kernels']}",
            flush=True,
        )
    return rec


def calibrate(res):
    """Host microseconds of plain PyTorch calls on this machine and of our forward launcher."""
    x = torch.randn(1024, device="cuda")
    xs = x.clone().requires_grad_()
    g = torch.ones_like(x)
    cal = dict(
        empty_us=host_us(lambda: torch.empty(2, 8, 16384, 64, device="cuda", dtype=torch.float16), 200),
        add_us=host_us(lambda: x.add_(1.0), 200),
        autograd_mul_fb_us=host_us(lambda: (xs * 2.0).backward(g), 200),
    )
    lay = make_layout(16384, 8, "local", **PATTERNS["local"])
    q, k, v = (torch.randn(2, 8, 16384, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    launch.forward(q, k, v, lay)
    cal["launch_forward_us"] = host_us(lambda: launch.forward(q, k, v, lay), 200)
    print("calibration:", cal, flush=True)
    res["calibration"] = cal


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", default="local,strided,fixed")
    ap.add_argument("--time", type=int, default=16384)
    ap.add_argument("--no-flex", action="store_true")
    a = ap.parse_args()
    B, H, T, D = 2, 8, a.time, 64
    res = {}
    calibrate(res)
    for mode in a.modes.split(","):
        lay = make_layout(T, H, mode, **PATTERNS[mode])
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.float16) for _ in range(4))
        f = lambda x, y, z, lay=lay: ops.blocksparse_attention_bhtd(x, y, z, lay)  # noqa: E731
        res[f"{mode}/ours"] = measure(f"{mode}/ours", f, q, k, v, do)
        lf = lambda x, y, z, lay=lay: ops._FusedAttention.apply(x, y, z, lay)  # noqa: E731
        res[f"{mode}/no-checks"] = measure(f"{mode}/no-checks", lf, q, k, v, do, graphs=False)
    if not a.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        bm = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < 128), None, None, T, T, device="cuda")
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.float16) for _ in range(4))
        res["flex-local"] = measure("flex-local", lambda x, y, z: flex(x, y, z, block_mask=bm), q, k, v, do)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=res), f, indent=1)


if __name__ == "__main__":
    main()
