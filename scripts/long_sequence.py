"""Block-sparse attention on long sequences: forward + backward time and peak memory.

    python scripts/long_sequence.py --time 131072 --modes local,fixed --heads 1

Prints, per mode, the layout build time, the forward and forward+backward time, the peak memory
(CUDA: allocator peak; CPU: growth of the process's peak resident memory, Linux) and what a dense
score matrix would need. No dense reference runs: at these sizes it would not fit.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparse_attention import blocksparse_attention_impl, make_layout

CASES = {
    "all": {},
    "local": {"local_attn_ctx": 128},
    "strided": {"local_attn_ctx": 128},
    "fixed": {"local_attn_ctx": 128, "num_verts": 1, "vertsize": 1},
}


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", type=int, default=131072)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--blocksize", type=int, default=32)
    ap.add_argument("--modes", default="local,fixed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    T, H, D = args.time, args.heads, args.head_dim
    print(
        f"torch {torch.__version__} on {dev}; batch {args.batch}, time {T}, heads {H}, head_dim {D}, "
        f"blocksize {args.blocksize}, {args.dtype}; dense fp32 scores would be "
        f"{args.batch * H * T * T * 4 / 2**30:.0f} GiB"
    )
    for mode in args.modes.split(","):
        kw = dict(CASES[mode], heads=H, attn_mode=mode, blocksize=args.blocksize)
        t0 = time.perf_counter()
        lay = make_layout(T, H, mode, kw.get("local_attn_ctx"), args.blocksize, kw.get("num_verts"), kw.get("vertsize"))
        t_layout = time.perf_counter() - t0
        q, k, v = (torch.randn(args.batch, T, H * D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(args.batch, T, H * D, device=dev, dtype=dtype)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss("VmRSS:")
        t0 = time.perf_counter()
        with torch.no_grad():
            blocksparse_attention_impl(q, k, v, **kw)  # first call: also plans and caches the chunks
        sync()
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            blocksparse_attention_impl(q, k, v, **kw)
        sync()
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = blocksparse_attention_impl(q, k, v, **kw)
        out.backward(do)
        sync()
        t_fb = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss("VmHWM:")) - base
        ok = all(torch.isfinite(x).all().item() for x in (out, q.grad, k.grad, v.grad))
        print(
            f"{mode:8} layout {t_layout * 1e3:7.1f} ms ({lay.density():.4f} of blocks)  "
            f"first fwd {t_first:6.2f} s  fwd {t_fwd:6.2f} s  "
            f"fwd+bwd {t_fb:7.2f} s  peak +{peak / 2**30:.2f} GiB  finite={ok}"
        )


if __name__ == "__main__":
    main()
