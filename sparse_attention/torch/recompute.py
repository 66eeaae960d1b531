"""``recompute=True`` for torch tensors: activation checkpointing."""

import torch
import torch.utils.checkpoint


def checkpoint_call(fn, args, kwargs):
    if not torch.is_grad_enabled() or not any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in list(args) + list(kwargs.values())
    ):
        return fn(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
