"""Dense masked attention for torch tensors: ``attention_impl``, the reference of every fast path.

It materialises the ``[batch, heads, time, time]`` scores, so it is for checking, not for long
sequences. The mask comes from the closed form of SEMANTICS.md (``layouts.allowed``), not from
the block tables, so it checks them independently; custom layouts use ``Layout.to_dense()``.
"""

from __future__ import annotations

import functools
import math

import torch

from ..layouts import Layout
from ..modes import document_mask, pattern_allowed

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dtypes(q, k, v):
    """Torch tensors of one floating dtype on one device (shapes are checked by the caller)."""
    for name, x in zip("qkv", (q, k, v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}; convert it with {name}.float()"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and accumulation run in float32 for half inputs (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, time, heads * d]`` -> ``[batch, heads, time, d]`` (a view where the strides allow)."""
    b, t, dim = x.shape
    return x.reshape(b, t, heads, dim // heads).transpose(1, 2)


def split_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    """:func:`split_heads` of q, k, v, with k and v split into their own (grouped-query
    attention: fewer) heads of q's head_dim."""
    d = q.shape[-1] // heads
    return split_heads(q, heads), split_heads(k, k.shape[-1] // d), split_heads(v, v.shape[-1] // d)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads ``[batch, kv_heads, time, d]`` repeated for ``heads`` query heads (query
    head ``h`` reads ``h // (heads // kv_heads)``); ``x`` itself without grouping. The engines
    that materialise scores use it; the fused kernels read the grouped heads directly. Autograd
    sums the gradient of each key/value head over its group."""
    b, hk, t, d = x.shape
    if hk == heads:
        return x
    return x[:, :, None].expand(b, hk, heads // hk, t, d).reshape(b, heads, t, d)


def reshape_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``[batch, time, dim]`` as ``rows`` rows of ``batch * time / rows`` (a view where the
    strides allow): packed documents of one length as a batch, and back."""
    return x.reshape(rows, -1, x.shape[-1])


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, time, d]`` -> ``[batch, time, heads * d]``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _time_major(like: torch.Tensor) -> bool:
    return like.dim() == 4 and like.stride(1) < like.stride(2)


def empty_heads_like(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty ``[batch, heads, time, head_dim]`` tensor shaped like ``like``, in its memory
    order: time outside heads where ``like`` is a head view of a ``[batch, time, heads *
    head_dim]`` tensor (it then merges back into one without a copy), contiguous otherwise. What
    the fused kernels write and what the ops promise ``torch.compile`` (their outputs and
    gradients, so that a compiled graph needs no copy either)."""
    dtype = like.dtype if dtype is None else dtype
    if _time_major(like):
        B, H, T, D = like.shape
        return torch.empty_strided((B, H, T, D), (T * H * D, D, H * D, 1), dtype=dtype, device=like.device)
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def in_layout_of(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`empty_heads_like`'s memory order for ``like``: ``x`` itself where it is,
    else a copy."""
    if _time_major(like):
        B, H, T, D = like.shape
        same = x.stride() == (T * H * D, D, H * D, 1)
    else:
        same = x.is_contiguous()
    return x if same else empty_heads_like(like, x.dtype).copy_(x)


def traced(x) -> bool:
    """Whether ``x`` is a tensor being traced, not computed: a fake or functional tensor, as
    ``torch.compile`` passes them (e.g. where it decomposes the attention ops into their kernel
    launches: :class:`~sparse_attention.torch.dispatch.AttentionOp`)."""
    t = type(x)
    return t is not torch.Tensor and issubclass(t, traced_types())


@functools.cache
def traced_types() -> tuple:
    """The tensor types of ``torch.compile``'s tracing: fake and functional tensors."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return FakeTensor, FunctionalTensor


def pattern_mask(spec, time: int, heads: int, device) -> torch.Tensor:
    """The allowed pairs, ``bool [heads or 1, time, time]``."""
    if isinstance(spec, Layout):
        return torch.from_numpy(spec.to_dense()).to(device)
    if "cu_seqlens" in spec:  # packed documents
        return torch.from_numpy(document_mask(spec, heads)).to(device)
    i = torch.arange(time, device=device)
    return pattern_allowed(spec, i[None, :, None], i[None, None, :], torch.arange(heads, device=device)[:, None, None])


def masked_attention(q, k, v, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax attention of ``[batch, heads, tq, d]`` queries over ``[batch, heads, tk, d]`` keys
    under a bool ``mask`` broadcastable to ``[batch, heads, tq, tk]``, computed in ``dtype``
    (default :func:`compute_dtype`; the tests pass the inputs' own dtype for a plain same-dtype
    computation) and returned in ``q``'s dtype. Rows with no allowed key give 0 and pass 0
    gradient (no NaN)."""
    cd = compute_dtype(q.dtype) if dtype is None else dtype
    mask = torch.as_tensor(mask, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    any_key = mask.any(dim=-1, keepdim=True)
    # -inf on masked keys; an empty row gets 0 everywhere (uniform softmax) and is zeroed below.
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~any_key, 0.0)
    p = torch.softmax(s, dim=-1) * any_key
    return torch.matmul(p, v.to(cd)).to(q.dtype)


def dense_attention(q, k, v, heads: int, spec) -> torch.Tensor:
    """``attention_impl`` for torch tensors ``[batch, time, dim]`` (arguments already validated)."""
    check_dtypes(q, k, v)
    mask = pattern_mask(spec, q.shape[1], heads, q.device)
    qh, kh, vh = split_qkv(q, k, v, heads)
    o = masked_attention(qh, expand_kv(kh, heads), expand_kv(vh, heads), mask)
    return merge_heads(o)
