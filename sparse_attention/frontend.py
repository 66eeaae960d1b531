"""Framework-neutral part of a call: argument checks, layout resolution, backend dispatch.

Each backend (``sparse_attention.torch``, ``sparse_attention.tensorflow``) exposes
``dense_attention(q, k, v, heads, spec)`` and ``blocksparse_attention(q, k, v, heads, layout)``
on validated ``[batch, time, dim]`` tensors; ``spec`` is a :class:`~sparse_attention.layouts.Layout`
or the dict of :func:`~sparse_attention.layouts.validate_pattern`. No framework is imported here.
"""

from __future__ import annotations

import sys
import weakref
from typing import NamedTuple

import numpy as np

from .layouts import Layout, broadcast_layout, check_cu_seqlens, make_layout, packed_layout, validate_pattern

_BACKENDS = {"torch": "sparse_attention.torch", "tensorflow": "sparse_attention.tensorflow"}


def backend_module_names() -> dict[str, str]:
    """``{framework module: its backend module}``."""
    return dict(_BACKENDS)


_FRAMEWORK_OF_TYPE: dict = {}


def framework_of(x) -> str | None:
    """``"torch"`` or ``"tensorflow"`` from the type of ``x`` (without importing either), else None."""
    t = type(x)
    if t not in _FRAMEWORK_OF_TYPE:
        _FRAMEWORK_OF_TYPE[t] = _framework_of_type(t)
    return _FRAMEWORK_OF_TYPE[t]


def _framework_of_type(t) -> str | None:
    for cls in t.__mro__:
        root = cls.__module__.split(".")[0]
        if root == "torch":
            return "torch"
        if root in ("tensorflow", "tf_keras", "keras"):
            return "tensorflow"
    return None


def backend_for(q, k, v):
    """The backend module for the tensors' framework; all three must share it."""
    names = [framework_of(x) for x in (q, k, v)]
    for arg, name, x in zip("qkv", names, (q, k, v)):
        if name is None:
            raise TypeError(
                f"{arg} must be a torch.Tensor or a tf.Tensor of shape [batch, time, dim], "
                f"got {type(x).__module__}.{type(x).__name__}"
            )
    if len(set(names)) != 1:
        raise TypeError(f"q, k and v must come from one framework, got {names}")
    name = _BACKENDS[names[0]]
    if name not in sys.modules:  # torch.compile traces the lookup, not the import
        # __import__ rather than importlib: AutoGraph cannot convert importlib's frames and warns
        # when the first call happens inside a tf.function
        __import__(name)
    return sys.modules[name]


def check_shapes(q, k, v, heads) -> tuple[int, int, int]:
    """Rank, shapes, heads; dtypes and devices are the backend's to check. Returns (batch, time, dim).

    ``k`` and ``v`` have one shape, ``[batch, time, kv_heads * head_dim]``: ``q``'s, or fewer
    heads of the same ``head_dim`` with ``heads % kv_heads == 0`` (grouped-query attention, see
    :func:`kv_heads_of`)."""
    if not isinstance(heads, int) or isinstance(heads, bool):
        raise TypeError(f"heads must be an int, got {type(heads).__name__} {heads!r}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    shapes = []
    for name, x in zip("qkv", (q, k, v)):
        # TF1 shapes hold Dimension objects (or None where unknown): take their int values
        shape = tuple(getattr(d, "value", d) for d in x.shape)
        if len(shape) != 3:
            raise ValueError(f"{name} must have rank 3, [batch, time, heads * head_dim], got shape {list(shape)}")
        shapes.append(shape)
    if shapes[1] != shapes[2]:
        raise ValueError(f"k and v must have the same shape, got {list(shapes[1])} and {list(shapes[2])}")
    if shapes[0][:2] != shapes[1][:2]:
        raise ValueError(
            f"q, k and v must have the same batch and time, got q {list(shapes[0])}, k and v {list(shapes[1])}"
        )
    batch, time, dim = shapes[0]
    if time is not None and time < 1:
        raise ValueError(f"time (q.shape[1]) must be >= 1, got {time}")
    if dim is not None and dim % heads:
        raise ValueError(
            f"dim (q.shape[2] = {dim}) must be divisible by heads ({heads}); "
            f"valid heads here: {[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]}"
        )
    kv_heads_of(dim, shapes[1][2], heads)
    return batch, time, dim


def kv_heads_of(dim, kv_dim, heads: int) -> int:
    """Key/value heads of grouped-query attention: ``k`` and ``v`` of ``kv_dim = kv_heads *
    head_dim`` columns with ``head_dim = dim / heads`` and ``heads % kv_heads == 0``; query head
    ``h`` reads key/value head ``h // (heads // kv_heads)`` (the convention of PyTorch SDPA's
    ``enable_gqa``). ``kv_dim == dim`` is ordinary attention (``kv_heads == heads``)."""
    if dim is None or kv_dim is None or kv_dim == dim:
        return heads
    d = dim // heads
    valid = [h * d for h in range(1, heads + 1) if heads % h == 0]
    if kv_dim % d or heads % (kv_dim // d):
        raise ValueError(
            f"k and v have {kv_dim} columns, but with heads={heads} and q's {dim} columns (head_dim {d}) "
            f"they must have kv_heads * {d} columns with heads % kv_heads == 0 (grouped-query attention): "
            f"one of {valid}"
        )
    return kv_dim // d


# Resolved calls of torch tensors: the checks' and the layout resolution's result per key of
# everything they read (the tensors' types and shapes, the arguments and their types), so that a
# training loop's repeated call skips them. Dtypes and devices are checked by the backend on
# every call. Bounded: the oldest entry goes first. Not under torch.compile, which traces the
# checks once per graph anyway.
_RESOLVED: dict = {}
RESOLVED_MAX = 64


def resolve_call(
    q, k, v, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, *, sparse, causal, cu_seqlens
):
    """``(backend, spec)`` of a public call: :func:`backend_for`, :func:`check_shapes` and
    :func:`resolve_spec`, remembered for torch tensors and the built-in modes (packed documents
    by the value of ``cu_seqlens`` given as a list, tuple or numpy array)."""
    args = (heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal)
    key = None
    docs = _documents_key(cu_seqlens)
    if (
        docs is not False
        and not isinstance(attn_mode, Layout)  # not kept alive here: a custom layout may be large
        and framework_of(q) == "torch"
        and not sys.modules["torch"].compiler.is_compiling()
    ):
        # the types too: heads=True equals heads=1 as a key, but is refused
        key = (type(q), type(k), type(v), q.shape, k.shape, v.shape, sparse, args, tuple(map(type, args)), docs)
        try:
            hit = _RESOLVED.get(key)
        except TypeError:  # an unhashable argument: the checks below say what is wrong
            hit = key = None
        if hit is not None:
            return hit
    backend = backend_for(q, k, v)
    batch, time, _ = check_shapes(q, k, v, heads)
    shape_args = (time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
    spec = resolve_spec(*shape_args, sparse=sparse, causal=causal, cu_seqlens=cu_seqlens, batch=batch)
    if key is not None:
        if len(_RESOLVED) >= RESOLVED_MAX:
            del _RESOLVED[next(iter(_RESOLVED))]
        _RESOLVED[key] = (backend, spec)
    return backend, spec


def _documents_key(cu):
    """``cu_seqlens`` as part of a remembered call's key: None without documents, its values for
    a list, tuple or numpy array, False otherwise (a tensor: not remembered)."""
    if cu is None:
        return None
    if type(cu) in (list, tuple):
        return (type(cu), *cu, *map(type, cu))
    if type(cu) is np.ndarray:
        return (cu.dtype.str, cu.shape, cu.tobytes())
    return False


def resolve_spec(
    time,
    heads,
    attn_mode,
    local_attn_ctx,
    blocksize,
    num_verts,
    vertsize,
    *,
    sparse: bool,
    causal=True,
    cu_seqlens=None,
    batch=None,
):
    """A Layout (block-sparse path, or a custom layout) or a validated pattern dict (dense path);
    ``causal=False``: the built-in mode's bidirectional version; ``cu_seqlens``: packed documents
    (:func:`~sparse_attention.layouts.packed_layout`, ``batch`` 1)."""
    if cu_seqlens is not None:
        args = (time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
        return _documents(*args, sparse=sparse, causal=causal, cu=cu_seqlens, batch=batch)
    if isinstance(attn_mode, Layout):
        if causal is not True:
            raise ValueError(
                "causal applies to the built-in modes only; a Layout says itself which pairs attend "
                "(make_layout(..., causal=False) builds a bidirectional one)"
            )
        lay = attn_mode
        if lay.time != time:
            raise ValueError(f"the layout covers time={lay.time} but q has time={time}")
        if lay.heads not in (1, heads):
            raise ValueError(f"the layout has {lay.heads} heads but heads={heads}")
        if lay.heads != heads:
            lay = broadcast_heads(lay, heads)
        return lay
    if time is None:
        raise ValueError("time (q.shape[1]) must be known statically; give the placeholder a fixed time")
    if sparse:
        return make_layout(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal)
    return validate_pattern(
        time, heads, attn_mode, local_attn_ctx, blocksize if attn_mode == "fixed" else None, num_verts, vertsize, causal
    )


class AsBatch(NamedTuple):
    """Packed documents of one length: the sequence is a batch of ``docs`` rows (a view), each
    under ``spec`` at the documents' length (a document's pattern restarts at its first token,
    as a batch row's does)."""

    docs: int
    spec: object


class Documents(NamedTuple):
    """Packed documents of mixed lengths under a built-in mode, causal or not: engines with
    document-aware kernels run ``pattern`` (the mode's layout at the packed length,
    :func:`document_pattern`) on each document's own positions,
    from ``cu`` (int64, ``[n_docs + 1]``); others run :meth:`layout`, the packed layout, made on
    first use."""

    cu: np.ndarray
    pattern: Layout
    args: tuple  # packed_layout's arguments after cu_seqlens

    def layout(self) -> Layout:
        return packed_layout(self.cu, *self.args)


# Modes whose pattern document-aware kernels run per document (every built-in mode).
DOCUMENT_MODES = ("all", "local", "strided", "fixed")


def document_pattern(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal) -> Layout:
    """The built-in mode's layout that names the pattern of packed documents in ``time`` tokens:
    at ``time``, or for ``strided`` (whose stride must divide a sequence's length, not the
    documents') at ``time`` rounded up to a multiple of its stride. The document-aware kernels
    take the pattern from it and each document's length from ``cu_seqlens``."""
    if attn_mode == "strided" and isinstance(local_attn_ctx, (int, np.integer)) and local_attn_ctx > 0:
        time = -(-time // local_attn_ctx) * local_attn_ctx
    return make_layout(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal)


def call(fn, reshape, q, k, v, heads, spec):
    """``fn(q, k, v, heads, spec)`` (a backend's attention), through the batch view of
    :class:`AsBatch` (``reshape(x, n)``: ``[batch, time, dim]`` as ``n`` rows)."""
    if isinstance(spec, AsBatch):
        y = fn(*(reshape(x, spec.docs) for x in (q, k, v)), heads, spec.spec)
        return reshape(y, 1)
    return fn(q, k, v, heads, spec)


def _documents(time, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, *, sparse, causal, cu, batch):
    """:func:`resolve_spec` for packed documents: documents of one length are a batch of them
    (:class:`AsBatch`, where the pattern runs at their length), others a packed layout."""
    if isinstance(attn_mode, Layout):
        raise ValueError(
            "cu_seqlens applies to the built-in modes only; build a Layout of packed documents with "
            "sparse_attention.layouts.packed_layout(cu_seqlens, heads, mode, ...) and pass it as attn_mode"
        )
    if batch is not None and batch != 1:
        raise ValueError(f"cu_seqlens packs documents into one sequence: batch must be 1, got {batch}")
    cu = check_cu_seqlens(cu)
    if time is not None and int(cu[-1]) != time:
        raise ValueError(
            f"cu_seqlens must end at time ({time}), the packed sequence's length; it ends at {int(cu[-1])}"
        )
    lens = np.diff(cu)
    if (lens == lens[0]).all():
        try:  # not for a length the pattern refuses (strided's stride must divide it): packed then
            args = (int(lens[0]), heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
            return AsBatch(len(lens), resolve_spec(*args, sparse=sparse, causal=causal))
        except ValueError:
            pass
    if sparse:
        args = (heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, causal)
        if attn_mode in DOCUMENT_MODES:
            return Documents(cu, document_pattern(time, *args), args)
        return packed_layout(cu, *args)
    b = blocksize if attn_mode == "fixed" else None
    p = validate_pattern(time, heads, attn_mode, local_attn_ctx, b, num_verts, vertsize, causal, documents=True)
    return {**p, "cu_seqlens": tuple(int(x) for x in cu)}


_BROADCAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def broadcast_heads(lay: Layout, heads: int) -> Layout:
    """A one-head layout shared by ``heads`` heads (tables are shared, not copied); one per
    ``(layout, heads)``, so that a training loop reuses it (and its device tables)."""
    if lay.heads == heads:
        return lay
    per = _BROADCAST.setdefault(lay, {})
    if heads not in per:
        per[heads] = broadcast_layout(lay, heads)
    return per[heads]
