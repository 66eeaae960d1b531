"""Small fused forward+backward per mode, for ``compute-sanitizer --tool memcheck`` (device script).

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/gpu_memcheck.py

The built-in modes are ``sparse_attention.patterns.PRESETS["small"]`` (time 256, 2 heads; block
size 32, ``fixed`` at its 16 with head_dim 48), then a custom layout with an in-block callback.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from sparse_attention.layouts import custom_layout
from sparse_attention.patterns import PRESETS
from sparse_attention.torch.kernels import launch
from sparse_attention.utils.benchmark import add_dtype_arg, script_parser, torch_dtype


def layouts() -> list:
    """``[(layout, head_dim)]`` to run."""
    out = [
        (p.layout(256, 2), 48) if mode == "fixed" else (p.replace(blocksize=32).layout(256, 2), 64)
        for mode, p in PRESETS["small"].items()
    ]
    nb = 8
    lay3 = np.tril(np.ones((2, nb, nb), int))
    lay3[0, 3] = 0
    diag = lambda s, h, q, k, e: np.tri(*s, dtype=bool) if q == k else np.ones(s, bool)  # noqa: E731
    return out + [(custom_layout(lay3, 32, callback=diag), 64)]


def main(argv=None):
    ap = script_parser(__doc__)
    add_dtype_arg(ap, "fp16")
    args = ap.parse_args(argv)
    dtype = torch_dtype(args.dtype)
    for lay, D in layouts():
        q, k, v, do = (torch.randn(1, lay.heads, lay.time, D, device="cuda", dtype=dtype) for _ in range(4))
        o, lse = launch.forward(q, k, v, lay)
        dq, dk, dv = launch.backward(do, q, k, v, o, lse, lay)
        torch.cuda.synchronize()
        ok = all(torch.isfinite(x).all().item() for x in (o, dq, dk, dv))
        print(f"{lay.mode:8s} D={D}: {'ok' if ok else 'NON-FINITE'}", flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
