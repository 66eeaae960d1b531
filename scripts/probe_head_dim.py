"""Probe: every mode x blocksize x head_dim 129-256 on the fused kernels, full errors printed."""

import sys

import torch

from sparse_attention.layouts import make_layout
from sparse_attention.torch.dispatch import EagerAttention
from sparse_attention.torch.kernels import launch
from sparse_attention.torch.reference import masked_attention

dims = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "160,192,256").split(",")]
T, B, H = 256, 1, 2
for D in dims:
    for dt in (torch.float16, torch.float32):
        for mode, kw in (
            ("all", {}),
            ("local", dict(local_attn_ctx=64)),
            ("strided", dict(local_attn_ctx=64)),
            ("fixed", dict(local_attn_ctx=64, num_verts=1, vertsize=1)),
        ):
            for bs in (16, 64):
                lay = make_layout(T, H, mode, blocksize=bs, **kw)
                q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dt) for _ in range(4))
                qs = [x.clone().requires_grad_() for x in (q, k, v)]
                tag = f"D={D} {str(dt)[6:]} {mode} bs={bs}"
                stage = "fwd"
                try:
                    o = EagerAttention.apply(*qs, launch.forward, launch.backward, lay)
                    torch.cuda.synchronize()
                    stage = "bwd"
                    o.backward(do)
                    torch.cuda.synchronize()
                    m = torch.as_tensor(lay.to_dense(), device="cuda")
                    r = [x.double().clone().requires_grad_() for x in (q, k, v)]
                    ro = masked_attention(*r, m)
                    ro.backward(do.double())
                    errs = [
                        ((a.double() - b).abs().max() / b.abs().max().clamp(min=1)).item()
                        for a, b in zip([o] + [x.grad for x in qs], [ro] + [x.grad for x in r])
                    ]
                    print(tag, "ok", " ".join(f"{e:.1e}" for e in errs), flush=True)
                except Exception as e:
                    print(tag, "FAIL in", stage, type(e).__name__, str(e)[:400].replace("\n", " "), flush=True)
                    torch.cuda.synchronize()
