"""Small fused forward+backward per mode, for ``compute-sanitizer --tool memcheck`` (device script).

compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/gpu_memcheck.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_attention.layouts import custom_layout, make_layout  # noqa: E402
from sparse_attention.torch.kernels import launch  # noqa: E402


def main():
    nb = 8
    lay3 = np.tril(np.ones((2, nb, nb), int))
    lay3[0, 3] = 0
    layouts = [
        (make_layout(256, 2, "all", blocksize=32), 64),
        (make_layout(256, 2, "local", local_attn_ctx=64, blocksize=32), 64),
        (make_layout(256, 2, "strided", local_attn_ctx=16, blocksize=32), 64),
        (make_layout(256, 2, "fixed", local_attn_ctx=64, blocksize=16, num_verts=2, vertsize=1), 48),
        (
            custom_layout(
                lay3, 32, callback=lambda s, h, q, k, e: np.tri(*s, dtype=bool) if q == k else np.ones(s, bool)
            ),
            64,
        ),
    ]
    for lay, D in layouts:
        q, k, v, do = (torch.randn(1, lay.heads, lay.time, D, device="cuda", dtype=torch.float16) for _ in range(4))
        o, lse = launch.forward(q, k, v, lay)
        dq, dk, dv = launch.backward(do, q, k, v, o, lse, lay)
        torch.cuda.synchronize()
        ok = all(torch.isfinite(x).all().item() for x in (o, dq, dk, dv))
        print(f"{lay.mode:8s} D={D}: {'ok' if ok else 'NON-FINITE'}", flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
