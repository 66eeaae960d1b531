"""Which engine runs a call, and the wrappers that make it differentiable and compilable.

Engines take natural-order ``[batch, heads, time, head_dim]`` tensors and a layout, and come in
pairs ``forward(q, k, v, layout) -> (o, lse)`` / ``backward(do, q, k, v, o, lse, layout) -> (dq, dk,
dv)``: the fused Triton kernels (:mod:`sparse_attention.torch.kernels.launch`; CUDA; base-2
log-sum-exp) and the block gather (:mod:`sparse_attention.torch.gather`; any device; natural
log-sum-exp). :func:`engine` picks one pair per call; the backward runs the pair the forward
ran.

:class:`AttentionOp` makes an engine pair differentiable once for every path: eagerly a call is
one ``torch.autograd.Function`` (:class:`EagerAttention`); under ``torch.compile`` it is a
``torch.library`` custom op pair (``sparse_attention::attn_fwd`` / ``attn_bwd``) with fake
tensors, so that the compiler traces it without graph breaks (with
``SPARSE_ATTENTION_INLINE_LAUNCHES=1``, a call on the fused kernels and a built-in layout becomes
the kernels' launches in the graph instead: :meth:`AttentionOp.inlines`). Layouts
are Python objects, not op arguments: the ops take :func:`layout_spec`, a list of ints (a
built-in mode's parameters, rebuilt by the cached ``make_layout``; or the key of a custom
layout in a module-level registry).

Inputs are validated by the caller (:mod:`sparse_attention.torch.interface`).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

from ..frontend import DOCUMENT_MODES, Documents
from ..layouts import Layout, builtin_pattern, check_cu_seqlens, make_layout, packed_layout, split_documents
from . import gather
from .cache import derived
from .reference import (
    compute_dtype,
    empty_heads_like,
    in_layout_of,
    merge_heads,
    split_heads,
    split_qkv,
    traced_types,
)

__all__ = [
    "AttentionOp",
    "EagerAttention",
    "ENGINES",
    "attention",
    "attention_bhtd",
    "check_documents",
    "choose_engine",
    "document_attention",
    "document_attention_bhtd",
    "engine",
    "engine_pair",
    "fused_unsupported_reasons",
    "layout_of",
    "layout_spec",
    "packed_pair",
    "register_layout",
    "use_fused",
]

# Registered custom layouts by key (their id: a plain int lookup, which torch.compile traces)
_REGISTRY: dict[int, Layout] = {}
_MODES = ("all", "local", "strided", "fixed", "custom")


def register_layout(layout: Layout, device=None) -> int:
    """Register a custom layout for the custom ops (done by the first eager call; call it yourself
    before ``torch.compile`` if the first call of a custom layout is inside a compiled region).

    With a CUDA ``device``, also put the layout's tables for the fused kernels on it now: needed
    before ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) if the first call of the layout
    is inside the compiled region. Built-in modes have no tables and need neither."""
    if device is not None and torch.device(device).type == "cuda":
        from .kernels.launch import device_tables

        device_tables(layout, torch.empty(0, device=device))
    k = id(layout)
    _REGISTRY[k] = layout
    return k


def _register_eagerly(layout: Layout) -> None:
    """An eager call registers its custom layout, so that a later compiled call finds it; not a
    layout of packed documents, made per batch, which the registry would keep alive forever
    (register one yourself to use it under ``torch.compile``), nor a bidirectional built-in
    mode's, which the ops name by its parameters (:func:`layout_spec`)."""
    if layout.mode == "custom" and "cu_seqlens" not in layout.params and not _bidirectional_builtin(layout):
        register_layout(layout)


def _bidirectional_builtin(layout: Layout) -> bool:
    """A bidirectional built-in mode's layout at its own blocks, as ``make_layout(...,
    causal=False)`` builds it (and :func:`layout_of` rebuilds it)."""
    form = builtin_pattern(layout)
    return layout.mode == "custom" and form is not None and form[1]["blocksize"] == layout.blocksize


def layout_spec(layout: Layout) -> list[int]:
    """The op argument naming a layout: the parameters of a built-in mode, causal or
    bidirectional (the op rebuilds it with the cached ``make_layout``), or ``[4, key]`` of a
    registered custom layout. Built from constants only, so ``torch.compile`` folds it into the
    graph."""
    if layout.mode == "custom" and not _bidirectional_builtin(layout):
        k = id(layout)
        if _REGISTRY.get(k) is not layout:
            raise RuntimeError(
                "a custom layout must be registered before torch.compile traces it: call "
                "sparse_attention.torch.register_layout(layout) once (an eager call does it too, except for "
                "layouts of packed documents)"
            )
        return [4, k]
    p = layout.params
    return [
        _MODES.index(p.get("attn_mode", layout.mode)),
        layout.time,
        layout.heads,
        layout.blocksize,
        p.get("local_attn_ctx", 0),
        p.get("num_verts", 0),
        p.get("vertsize", 0),
        int(p.get("causal", True)),
    ]


def layout_of(spec: list[int]) -> Layout:
    """Inverse of :func:`layout_spec`."""
    if spec[0] == 4:
        return _REGISTRY[spec[1]]
    mode, T, H, b, ctx, nv, vs, causal = spec
    kw = {}
    if ctx:
        kw["local_attn_ctx"] = ctx
    if nv:
        kw.update(num_verts=nv, vertsize=vs)
    return make_layout(T, H, _MODES[mode], blocksize=b, causal=bool(causal), **kw)


def fused_unsupported_reasons(q: torch.Tensor, layout: Layout) -> list[str]:
    """Why the fused kernels would not run ``q`` with ``layout`` (empty: they would)."""
    if os.environ.get("SPARSE_ATTENTION_DISABLE_FUSED", "0") == "1":
        return ["SPARSE_ATTENTION_DISABLE_FUSED=1"]
    # CPU tensors take the block-gather path even under TRITON_INTERPRET=1 (the interpreter is
    # for the kernel tests, which call the launchers directly)
    if not q.is_cuda:
        return [f"tensors are on {q.device}; the fused kernels need CUDA"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["triton is not installed"]
    from .kernels.launch import unsupported_reasons

    return unsupported_reasons(q, layout)


def use_fused(q: torch.Tensor, layout: Layout) -> bool:
    return not fused_unsupported_reasons(q, layout)


ENGINES = ("fused", "gather")


def choose_engine(q: torch.Tensor, layout: Layout, heads: int | None = None) -> int:
    """Index in :data:`ENGINES` of the engine for ``q`` (``[batch, heads, time, head_dim]``, or
    ``[batch, time, heads * head_dim]`` with ``heads``) and ``layout``: the fused kernels where
    they run, else the block gather. Works on fake tensors too (``torch.compile`` traces it).
    Eagerly, the choice is kept per layout, dtype, device and head_dim (and the environment
    switch), since it depends on nothing else."""
    if torch.compiler.is_compiling():
        return 0 if use_fused(q if heads is None else split_heads(q, heads), layout) else 1
    D = q.shape[-1] if heads is None else q.shape[-1] // heads
    key = ("engine", q.dtype, q.device, D, os.environ.get("SPARSE_ATTENTION_DISABLE_FUSED"))
    return derived(layout, key, lambda: 0 if use_fused(q if heads is None else split_heads(q, heads), layout) else 1)


def engine_pair(index: int):
    """``(forward, backward, base2)`` of engine ``ENGINES[index]``; ``base2``: whether its
    log-sum-exp is base 2."""
    if ENGINES[index] == "fused":
        from .kernels import launch

        return launch.forward, launch.backward, True
    return gather.gather_forward, gather.gather_backward, False


def engine(q: torch.Tensor, layout: Layout):
    """``(forward, backward, base2)`` of the engine for ``q`` and ``layout``."""
    return engine_pair(choose_engine(q, layout))


class EagerAttention(torch.autograd.Function):
    """One differentiable call of an engine pair (``forward``, ``backward``): the eager path,
    without the custom-op dispatch (a few hundred microseconds per forward+backward, which short
    sparse patterns notice). ``layouts`` are passed through to the pair."""

    @staticmethod
    def forward(ctx, q, k, v, forward, backward, *layouts):
        o, lse = forward(q, k, v, *layouts)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.backward_fn, ctx.layouts = backward, layouts
        return o

    @staticmethod
    def backward(ctx, do):
        # any strides: the engines read do through its strides (the kernels) or reshape it (gather)
        grads = ctx.backward_fn(do, *ctx.saved_tensors, *ctx.layouts)
        return (*grads, None, None, *(None,) * len(ctx.layouts))


@functools.cache
def packed_pair(forward, backward, heads: int):
    """An engine pair over ``[batch, time, heads * head_dim]`` tensors from one over ``[batch,
    heads, time, head_dim]``: heads are split as strided views inside, and outputs (the fused
    kernels write them in the inputs' memory order) merged back as views. An eager call then
    records one autograd node, not the four views' eight."""

    def fwd(q, k, v, *layouts):
        o, lse = forward(*split_qkv(q, k, v, heads), *layouts)
        return merge_heads(o), lse

    def bwd(do, q, k, v, o, lse, *layouts):
        grads = backward(split_heads(do, heads), *split_qkv(q, k, v, heads), split_heads(o, heads), lse, *layouts)
        return tuple(merge_heads(g) for g in grads)

    return fwd, bwd


def _fake_fwd(q, k, v, *keys):
    # what every forward op returns: o in q's memory order (empty_heads_like: a head view of a
    # [batch, time, heads * head_dim] tensor gets one that merges back without a copy), lse
    # contiguous
    return empty_heads_like(q), q.new_empty(q.shape[:-1], dtype=compute_dtype(q.dtype))


def _fake_bwd(do, q, k, v, o, lse, *keys):
    # gradients in the memory order of q, k, v (the kernels write them so; other paths are copied)
    return tuple(empty_heads_like(x) for x in (q, k, v))


def _exporting() -> bool:
    """``torch.export`` keeps such ops whole (as it does ``triton_op``s): an exported program names
    the op, not Triton kernels."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


# Added to an op's engine argument where the call becomes its kernel launches under torch.compile
# (AttentionOp.inlines).
INLINE = 2

# The library of the attention ops (AttentionOp), one per process.
_LIB = torch.library.Library("sparse_attention", "DEF")


class AttentionOp:
    """An attention computation over ``n_layouts`` layouts, made differentiable once for every
    path: ``pairs(i) -> (forward, backward)`` is the pair of engine ``ENGINES[i]``, with
    ``forward(q, k, v, *layouts) -> (o, lse)`` and ``backward(do, q, k, v, o, lse, *layouts) ->
    (dq, dk, dv)``; the engine is chosen once per call, by :func:`choose_engine` on ``q`` and the
    first layout, and the backward runs the same one.

    ``op(q, k, v, *layouts)`` runs eagerly as :class:`EagerAttention` and, under
    ``torch.compile``, as the custom ops ``sparse_attention::{name}_fwd`` / ``{name}_bwd`` with
    fake tensors and autograd; their layout arguments are :func:`layout_spec` lists and the
    engine an int, which the compiler folds into the graph. With ``n_tensors``, the last that many
    of ``layouts`` are tensors (e.g. packed documents' boundaries), op arguments of their own that
    the pairs receive after the layouts."""

    def __init__(self, name: str, pairs, n_layouts: int = 1, n_tensors: int = 0):
        self.pairs, self.n_tensors = pairs, n_tensors
        tensors = "".join(f", Tensor t{i}" for i in range(n_tensors))
        keys = ", ".join(f"int[] key{i}" for i in range(n_layouts)) + ", int engine"
        fwd_schema = f"(Tensor q, Tensor k, Tensor v{tensors}, {keys}) -> (Tensor, Tensor)"
        bwd_schema = (
            f"(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse{tensors}, {keys}) "
            "-> (Tensor, Tensor, Tensor)"
        )
        # Defined with torch.library.Library, not torch.library.custom_op: the same functional ops
        # (fake tensors, autograd), without custom_op's per-call Python wrappers (~9 us of host
        # time a call on a CPU, more on a slow host), which a compiled graph pays at every call
        for op, schema, impl, fake in (
            (f"{name}_fwd", fwd_schema, self._op_forward, _fake_fwd),
            (f"{name}_bwd", bwd_schema, self._op_backward, _fake_bwd),
        ):
            _LIB.define(op + schema)
            _LIB.impl(op, impl, "CompositeExplicitAutograd")
            torch.library.register_fake(f"sparse_attention::{op}", fake, lib=_LIB)
        torch.library.register_autograd(
            f"sparse_attention::{name}_fwd", self._op_autograd_backward, setup_context=self._op_setup_context, lib=_LIB
        )
        # torch.compile: where the ops run the fused kernels on built-in layouts (and the user opts
        # in: launches_inline), their functionalization (AOTAutograd) runs their implementation
        # instead, so that the graph holds the kernel launches (torch.library.wrap_triton) and
        # Inductor emits those itself
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        for op, impl, n in ((f"{name}_fwd", self._op_forward, 3), (f"{name}_bwd", self._op_backward, 6)):
            rule = functools.partial(self._decompose, impl, n)
            torch.library.register_torch_dispatch(f"sparse_attention::{op}", FunctionalTensorMode, rule, lib=_LIB)
        self.fwd_op = getattr(torch.ops.sparse_attention, f"{name}_fwd").default
        self.bwd_op = getattr(torch.ops.sparse_attention, f"{name}_bwd").default

    def __call__(self, q, k, v, *layouts, heads: int | None = None) -> torch.Tensor:
        """``q, k, v``: ``[batch, heads, time, head_dim]``, or with ``heads`` ``[batch, time,
        heads * head_dim]`` (heads split inside the one autograd node, output merged)."""
        if heads is not None and torch.compiler.is_compiling():
            # the compiler makes views free: the ops see [b, h, t, d]
            return merge_heads(self(*split_qkv(q, k, v, heads), *layouts))
        index = choose_engine(q, layouts[0], heads)
        if torch.compiler.is_compiling():
            n = len(layouts) - self.n_tensors
            if self.inlines(index, layouts[:n]):
                # decided as Dynamo traces the call: the choice is in its graph, and so in the
                # keys of the compiler's caches (a later process with the other setting
                # cannot reuse this compilation)
                index += INLINE
            return self.fwd_op(q, k, v, *layouts[n:], *(layout_spec(lay) for lay in layouts[:n]), index)[0]
        pair = self.pairs(index)
        if heads is not None:
            pair = packed_pair(*pair, heads)
        return EagerAttention.apply(q, k, v, *pair, *layouts)

    def _layouts(self, args: tuple) -> tuple[int, list]:
        """``(engine, layouts and then tensors)`` of an op's arguments after its tensors."""
        tensors, keys, index = args[: self.n_tensors], args[self.n_tensors : -1], args[-1] % INLINE
        return index, [*(layout_of(key) for key in keys), *tensors]

    def _op_forward(self, q, k, v, *args):
        index, layouts = self._layouts(args)
        o, lse = self.pairs(index)[0](q, k, v, *layouts)
        return in_layout_of(o, q), lse.contiguous()

    def _op_backward(self, do, q, k, v, o, lse, *args):
        index, layouts = self._layouts(args)
        grads = self.pairs(index)[1](do, q, k, v, o, lse, *layouts)
        return tuple(in_layout_of(g, x) for g, x in zip(grads, (q, k, v)))

    def inlines(self, index: int, layouts) -> bool:
        """Whether a compiled call on engine ``index`` with these layouts becomes its kernel
        launches in the graph: the fused engine on built-in layouts, which need no device tables
        (not packed documents, whose tables are made on the host per batch; not custom layouts).

        Opt-in for now, with ``SPARSE_ATTENTION_INLINE_LAUNCHES=1``, read here as Dynamo traces
        the call. With it on, the compiled GPU tests pass on an H100 (this choice in the graph
        included), and each launch's tile config is loaded on the device at trace time
        (``launch._Kernel._fit_traced``); but no clean A/B has measured it faster (a compiled
        training step moved by -13% to +3% on a fresh machine, within the run-to-run noise of
        that host-bound step). By default the ops stay opaque (the same kernels, launched by the
        op's Python at run time), and always under Triton's CPU interpreter (tests), whose
        kernels Inductor cannot emit."""
        if self.n_tensors or index != 0 or os.environ.get("SPARSE_ATTENTION_INLINE_LAUNCHES", "0") != "1":
            return False
        from .kernels.launch import closed_form, interpreting

        return not interpreting() and all(closed_form(layout) is not None for layout in layouts)

    @staticmethod
    def launches_inline(args: tuple) -> bool:
        """Whether the op call with these arguments (after its tensors) was marked, when Dynamo
        traced it, to become its kernel launches (:meth:`inlines`: ``INLINE`` added to its
        engine argument)."""
        return args[-1] >= INLINE

    def _decompose(self, impl, n, mode, func, types, args, kwargs):
        """The ops' rule under ``FunctionalTensorMode`` (``torch.compile``'s functionalization, as
        ``torch.library.triton_op`` does it): trace ``impl`` (the op's own implementation, whose
        kernels then launch through ``wrap_triton``) where :meth:`launches_inline`, else keep the
        op. ``n``: the op's leading tensors."""
        plain = all(t is torch.Tensor or issubclass(t, traced_types()) for t in types)
        if plain and self.launches_inline(args[n:]) and not _exporting():
            with mode:
                return impl(*args, **(kwargs or {}))
        return mode.__torch_dispatch__(func, types, args, kwargs)

    @staticmethod
    def _op_setup_context(ctx, inputs, output):
        q, k, v, *args = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.args = args

    def _op_autograd_backward(self, ctx, do, dlse):
        # dO in any strides: the engines read it through them
        return (*self.bwd_op(do, *ctx.saved_tensors, *ctx.args), *(None,) * len(ctx.args))


# One block-sparse pass through engine i (fused kernels or block gather).
attention_op = AttentionOp("attn", lambda index: engine_pair(index)[:2])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: Layout) -> torch.Tensor:
    """Block-sparse attention on validated ``[batch, time, heads * head_dim]`` tensors (the
    public call): one autograd node eagerly, no copies (heads are strided views)."""
    if _dense_all(layout) or torch.compiler.is_compiling():
        return merge_heads(attention_bhtd(*split_qkv(q, k, v, heads), layout))
    _register_eagerly(layout)
    return attention_op(q, k, v, layout, heads=heads)


def _documents_of(cu) -> np.ndarray:
    """Packed documents' boundaries as int64 numpy (a tensor is read once: a CUDA one syncs)."""
    return cu if isinstance(cu, np.ndarray) else cu.detach().cpu().numpy().astype(np.int64)


def _on_documents(pattern: Layout, cu) -> tuple[Layout, object]:
    """The built-in pattern and the documents the engines run: ``pattern`` and ``cu`` as they are,
    or for the layout of a ``patterns.Group(l)`` (the earlier tokens of the query's own group of
    ``l``), causal ``all`` on every document cut into groups of ``l`` tokens counted from its start."""
    l = pattern.params.get("group")
    if l is None:
        return pattern, cu
    every = make_layout(pattern.time, pattern.heads, "all", blocksize=pattern.blocksize)
    return every, split_documents(_documents_of(cu), l)


def _packed_of(pattern: Layout, cu) -> Layout:
    """The packed layout of ``pattern``'s mode (causal or bidirectional) over documents ``cu``."""
    mode, p, causal = builtin_pattern(pattern)
    return packed_layout(
        _documents_of(cu),
        pattern.heads,
        mode,
        p.get("local_attn_ctx"),
        p["blocksize"],
        p.get("num_verts"),
        p.get("vertsize"),
        causal,
    )


def document_pair(index: int):
    """The engine pair of packed documents: ``forward(q, k, v, pattern, cu)`` with ``pattern`` a
    built-in mode's layout (causal or bidirectional) at the packed length and ``cu`` the
    documents' boundaries (numpy or a tensor). The fused kernels run the pattern on each
    document's own positions (no packed layout is built); the block gather, or a pattern the
    kernels have no closed form for, runs the packed layout."""
    if ENGINES[index] == "fused":
        from .kernels import launch

        def run(pattern, cu, q):
            pattern, cu = _on_documents(pattern, cu)
            form = launch.closed_form(pattern)
            if form is None or form[0] not in DOCUMENT_MODES:
                return (_packed_of(pattern, cu),)
            return pattern, launch.documents(_documents_of(cu), q.device)

        def fwd(q, k, v, pattern, cu):
            return launch.forward(q, k, v, *run(pattern, cu, q))

        def bwd(do, q, k, v, o, lse, pattern, cu):
            return launch.backward(do, q, k, v, o, lse, *run(pattern, cu, q))

        return fwd, bwd

    def gfwd(q, k, v, pattern, cu):
        return gather.gather_forward(q, k, v, _packed_of(*_on_documents(pattern, cu)))

    def gbwd(do, q, k, v, o, lse, pattern, cu):
        return gather.gather_backward(do, q, k, v, o, lse, _packed_of(*_on_documents(pattern, cu)))

    return gfwd, gbwd


# Packed documents: the pattern and the documents' boundaries (a tensor argument of the ops, so
# that a compiled model takes a new batch of documents without recompiling).
document_op = AttentionOp("docs", document_pair, n_layouts=1, n_tensors=1)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, docs: Documents) -> torch.Tensor:
    """Packed documents of mixed lengths (:class:`~sparse_attention.frontend.Documents`) on
    validated ``[1, time, heads * head_dim]`` tensors (:func:`document_pair`): one autograd node."""
    return document_op(q, k, v, docs.pattern, docs.cu, heads=heads)


def document_attention_bhtd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, cu) -> torch.Tensor:
    """``layout`` (a built-in mode's, causal or bidirectional, or a ``patterns.Group``'s, at the
    packed length) on each of the packed documents ``cu`` of validated ``[1, heads, time,
    head_dim]`` tensors; under
    ``torch.compile`` a tensor ``cu`` is an argument of the ops (read when they run: a new batch
    of documents recompiles nothing; a CPU tensor needs no device sync)."""
    if builtin_pattern(layout) is None and "group" not in layout.params:
        raise ValueError(
            "cu_seqlens runs a built-in mode's layout (make_layout(time, heads, mode, ...), causal or not) "
            "or a patterns.Group's on each document; for a custom pattern build "
            "sparse_attention.layouts.packed_layout or your own layout of the packed sequence"
        )
    return document_op(q, k, v, layout, check_documents(q, cu))


def check_documents(q: torch.Tensor, cu):
    """Packed documents' boundaries ``cu`` for ``[1, heads, time, head_dim]`` ``q``, checked (int64
    numpy; under ``torch.compile`` a tensor, an argument of the ops, unchecked)."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs documents into one sequence: batch must be 1, got {q.shape[0]}")
    if not (torch.compiler.is_compiling() and isinstance(cu, torch.Tensor)):
        cu = check_cu_seqlens(cu)
        if int(cu[-1]) != q.shape[2]:
            raise ValueError(f"cu_seqlens must end at time ({q.shape[2]}); it ends at {int(cu[-1])}")
        if torch.compiler.is_compiling():
            cu = torch.from_numpy(cu)
    return cu


def _dense_all(layout: Layout) -> bool:
    """``all``, causal or bidirectional (the latter a custom layout naming its mode)."""
    custom_all = layout.params.get("attn_mode") == "all" and "cu_seqlens" not in layout.params
    return layout.mode == "all" or (layout.mode == "custom" and custom_all)


def attention_bhtd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Block-sparse attention on validated natural-order ``[batch, heads, time, head_dim]``
    tensors: PyTorch's causal SDPA for ``all`` where it is the faster dense kernel, else the
    engine of :func:`engine` (eagerly :class:`EagerAttention`, compiled the custom ops)."""
    if _dense_all(layout) and os.environ.get("SPARSE_ATTENTION_ALL_FUSED", "0") != "1":
        # Causal SDPA where it is the faster dense kernel: half inputs on CUDA (cuDNN / flash,
        # fp32 softmax inside), and every dtype on the CPU, where it runs 8-10x faster than the
        # block gather; there the inputs are upcast first, since the CPU kernels keep half
        # precision in parts of the backward pass (the contract: fp32 softmax and accumulation).
        kw = dict(
            is_causal=layout.params.get("causal", True),
            scale=1.0 / math.sqrt(q.shape[-1]),
            enable_gqa=k.shape[1] != q.shape[1],
        )
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        if not q.is_cuda:
            cd = compute_dtype(q.dtype)
            return torch.nn.functional.scaled_dot_product_attention(q.to(cd), k.to(cd), v.to(cd), **kw).to(q.dtype)
    if not torch.compiler.is_compiling():
        _register_eagerly(layout)
    return attention_op(q, k, v, layout)
