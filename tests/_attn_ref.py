"""Shared helpers for the kernel tests: a dense float64 reference built from the very layout the
kernels consume, and a same-dtype PyTorch computation that sets the error budget."""

from __future__ import annotations

import numpy as np
import torch


def masked_reference(q, k, v, mask: np.ndarray, dtype=torch.float64):
    """Dense masked attention in ``dtype`` on ``[B, H, T, D]``; rows with no allowed key give 0."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    m = torch.as_tensor(mask, device=q.device)[None]
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def fwd_bwd(fn, q, k, v, do):
    """Output and the three gradients of ``fn`` at ``q, k, v`` with upstream gradient ``do``."""
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(qs, ks, vs)
    o.backward(do.to(o.dtype))
    return [o.detach(), qs.grad, ks.grad, vs.grad]


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
