"""Block-sparse attention on long sequences: forward + backward time and peak memory.

    python scripts/long_sequence.py --n-ctx 131072 --modes local,fixed --n-head 1

The patterns are ``sparse_attention.patterns.PRESETS["long"]`` at ``--blocksize``. Prints, per
mode, the layout build time, the forward and forward+backward time, the peak memory (CUDA:
allocator peak; CPU: growth of the process's peak resident memory, Linux) and what a dense score
matrix would need. No dense reference runs: at these sizes it would not fit.
"""

from __future__ import annotations

import time

import torch

from sparse_attention import blocksparse_attention_impl
from sparse_attention.patterns import preset
from sparse_attention.utils.benchmark import PeakMemory, attention_parser, call_ms, torch_dtype


def main(argv=None):
    ap = attention_parser(__doc__, "local,fixed", n_ctx=131072, n_head=1, head_dim=64, batch=1, blocksize=32)
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), torch_dtype(args.dtype)
    B, T, H, D = args.batch, args.n_ctx, args.n_head, args.head_dim
    print(
        f"torch {torch.__version__} on {dev}; batch {B}, time {T}, heads {H}, head_dim {D}, "
        f"blocksize {args.blocksize}, {args.dtype}; dense fp32 scores would be {B * H * T * T * 4 / 2**30:.0f} GiB"
    )
    for mode in args.modes:
        p = preset(mode, "long", blocksize=args.blocksize)
        kw = p.kwargs()
        t0 = time.perf_counter()
        lay = p.layout(T, H)
        t_layout = time.perf_counter() - t0
        q, k, v = (torch.randn(B, T, H * D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, T, H * D, device=dev, dtype=dtype)

        def fwd(q=q, k=k, v=v, kw=kw):
            with torch.no_grad():
                blocksparse_attention_impl(q, k, v, H, **kw)

        outs = []

        def fb(q=q, k=k, v=v, kw=kw, do=do, outs=outs):
            outs.append(blocksparse_attention_impl(q, k, v, H, **kw))
            outs[-1].backward(do)

        with PeakMemory(dev) as mem:
            (t_first,) = call_ms(fwd, 1, dev)  # the first call also plans and caches the chunks
            (t_fwd,) = call_ms(fwd, 1, dev)
            (t_fb,) = call_ms(fb, 1, dev)
        ok = all(torch.isfinite(x).all().item() for x in (outs[-1], q.grad, k.grad, v.grad))
        peak = "n/a" if mem.peak is None else f"+{mem.peak / 2**30:.2f} GiB"
        print(
            f"{mode:8} layout {t_layout * 1e3:7.1f} ms ({lay.density():.4f} of blocks)  "
            f"first fwd {t_first / 1e3:6.2f} s  fwd {t_fwd / 1e3:6.2f} s  "
            f"fwd+bwd {t_fb / 1e3:7.2f} s  peak {peak}  finite={ok}"
        )


if __name__ == "__main__":
    main()
