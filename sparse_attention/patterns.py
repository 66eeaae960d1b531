"""Attention patterns of one layer, and the paper's ways of factorising them over heads.

A *pattern spec* says which key positions each head of a layer may attend to:

* :class:`Mode` - one built-in mode of the library (``all``, ``local``, ``strided``, ``fixed``);
* :class:`Custom` - a :class:`~sparse_attention.layouts.Layout` (custom layouts, fixed ``time``);
* :class:`Merged` - the union of several patterns inside every head (the paper's eq. 7);
* :class:`PerHead` - the heads split into equal groups, one pattern per group (eq. 8).

Factorising over residual blocks (eq. 6, "interleaved") is a list of specs, block ``r`` using
``specs[r % len(specs)]``; see :func:`paper_patterns`.

Every spec gives its block-sparse layouts (:meth:`Spec.groups`) for the library call and its
closed form :meth:`Spec.allowed` (built from :func:`sparse_attention.modes.allowed`, on numpy
arrays or torch tensors): the masks of KV-cache sampling, of the dense reference and of
FlexAttention's ``mask_mod`` are all this one function. Numpy only (torch only for torch inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass

import numpy as np

from .layouts import MODES, Layout, allowed, csr_layout, custom_layout, from_dense, validate_pattern

# Modes whose allowed(i, j) depends on i - j only: their union is built block by block without
# any time x time array, whatever the context.
_SHIFT_INVARIANT = ("all", "local", "strided")


class Spec:
    """Base class of the pattern specs."""

    def check(self, time: int, heads: int, blocksize: int) -> None:
        """Raise ValueError/TypeError if the spec cannot run at this size."""
        raise NotImplementedError

    def multiple(self, blocksize: int) -> int:
        """``time`` must be a multiple of this (the model pads its input up to one)."""
        raise NotImplementedError

    def allowed(self, i, j, h, heads: int, blocksize: int):
        """May query ``i`` of head ``h`` (of ``heads``) attend to key ``j``? Elementwise with
        broadcasting on numpy arrays or torch tensors (a FlexAttention ``mask_mod`` as it is)."""
        raise NotImplementedError

    def mask(self, i, j, heads: int, blocksize: int):
        """Allowed pairs ``bool [heads or 1, len(i), len(j)]`` for position vectors ``i``, ``j``."""
        h = _arange_like(i, heads)[:, None, None]
        m = self.allowed(i[None, :, None], j[None, None, :], h, heads, blocksize)
        return m

    def groups(self, heads: int):
        """``[(first_head, n_heads, attn_mode, kwargs)]``: one library call per group of heads."""
        raise NotImplementedError


@dataclass(frozen=True)
class Mode(Spec):
    """A built-in mode of the library: ``Mode("fixed", local_attn_ctx=128, num_verts=1, vertsize=1)``."""

    mode: str
    local_attn_ctx: int | None = None
    num_verts: int | None = None
    vertsize: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Mode.mode must be one of {MODES}, got {self.mode!r}")

    def kwargs(self, blocksize: int) -> dict:
        out = {"blocksize": blocksize}
        if self.mode != "all":
            out["local_attn_ctx"] = self.local_attn_ctx
        if self.mode == "fixed":
            out.update(num_verts=self.num_verts, vertsize=self.vertsize)
        return out

    def check(self, time, heads, blocksize):
        kw = self.kwargs(blocksize)
        validate_pattern(
            time, heads, self.mode, kw.get("local_attn_ctx"), blocksize, kw.get("num_verts"), kw.get("vertsize")
        )

    def multiple(self, blocksize):
        if self.mode == "strided" and isinstance(self.local_attn_ctx, int) and self.local_attn_ctx > 0:
            return math.lcm(blocksize, self.local_attn_ctx)
        return blocksize

    def allowed(self, i, j, h, heads, blocksize):
        return allowed(i, j, h, self.mode, self.local_attn_ctx, blocksize, self.num_verts, self.vertsize)

    def groups(self, heads):
        return [(0, heads, self.mode, self)]


@dataclass(frozen=True, eq=False)
class Custom(Spec):
    """A :class:`Layout` used as is (its ``time`` is the only context it runs at)."""

    layout: Layout

    def __post_init__(self):
        if not isinstance(self.layout, Layout):
            raise TypeError(f"Custom takes a sparse_attention.Layout, got {type(self.layout).__name__}")

    def check(self, time, heads, blocksize):
        if time != self.layout.time:
            raise ValueError(
                f"the custom layout covers time={self.layout.time}, got time={time}; "
                "build the layout for the model's padded context"
            )
        if self.layout.heads not in (1, heads):
            raise ValueError(f"the custom layout has {self.layout.heads} heads, the layer {heads}")

    def multiple(self, blocksize):
        return self.layout.time

    def dense(self, like):
        """The layout's dense mask ``bool [heads, time, time]``: numpy, or a torch tensor on the
        device of ``like`` (cached per layout and device)."""
        per = _DENSE.setdefault(self.layout, {})
        # numpy >= 2 arrays have a .device ("cpu") too: key them apart from torch's cpu tensors
        key = "numpy" if isinstance(like, np.ndarray) else str(like.device)
        if key not in per:
            dense = self.layout.to_dense()
            if not isinstance(like, np.ndarray):
                import torch

                dense = torch.from_numpy(dense).to(like.device)
            per[key] = dense
        return per[key]

    def allowed(self, i, j, h, heads, blocksize):
        h = h if self.layout.heads > 1 else h * 0
        return self.dense(i)[h, i, j]

    def mask(self, i, j, heads, blocksize):
        return self.dense(i)[:, i][:, :, j]

    def groups(self, heads):
        return [(0, heads, self.layout, self)]


@dataclass(frozen=True)
class Merged(Spec):
    """The union of several patterns in one head (paper eq. 7), e.g. ``Merged(local, strided)``.

    ``Merged(Mode("local", L), Mode("strided", l))`` with ``L <= l`` (the paper's case) runs, in
    the torch front end, as two fast passes (``local``, and ``strided`` in its residue-major order)
    merged exactly by their log-sum-exps (:mod:`sparse_attention.torch.merged`). ``layout()``
    gives the union as one layout: for ``all``/``local``/``strided`` a custom layout built block
    by block at any context (no ``time x time`` array); for other unions from a dense mask
    (``time <= 8192``).
    """

    parts: tuple

    def __init__(self, *parts):
        if len(parts) == 1 and isinstance(parts[0], (list, tuple)):
            parts = tuple(parts[0])
        parts = tuple(as_spec(p) for p in parts)
        if len(parts) < 2 or not all(isinstance(p, (Mode, Group)) for p in parts):
            raise ValueError(
                "Merged takes two or more built-in modes or Group, e.g. "
                f"Merged(Mode('local', 128), Mode('strided', 128)); got {parts}"
            )
        object.__setattr__(self, "parts", parts)

    def check(self, time, heads, blocksize):
        for p in self.parts:
            p.check(time, heads, blocksize)
        if not self._shift_invariant() and time > 8192:
            raise ValueError(
                f"{self} at time={time} needs a dense mask; merge only 'all', 'local' and 'strided' for long contexts"
            )

    def local_strided(self):
        """``(L, l)`` when this is ``Merged(Mode("local", L), Mode("strided", l))`` (either order)
        with ``L <= l``: a union that the torch front end runs as two fast block-sparse passes
        (:mod:`sparse_attention.torch.merged`); else ``None``."""
        if len(self.parts) != 2 or not all(isinstance(p, Mode) for p in self.parts):
            return None
        ctx = {p.mode: p.local_attn_ctx for p in self.parts}
        if set(ctx) != {"local", "strided"} or ctx["local"] > ctx["strided"]:
            return None
        return ctx["local"], ctx["strided"]

    def _shift_invariant(self):
        return all(isinstance(p, Mode) and p.mode in _SHIFT_INVARIANT for p in self.parts)

    def multiple(self, blocksize):
        return functools.reduce(math.lcm, (p.multiple(blocksize) for p in self.parts))

    def allowed(self, i, j, h, heads, blocksize):
        return functools.reduce(lambda a, b: a | b, (p.allowed(i, j, h, heads, blocksize) for p in self.parts))

    def layout(self, time, heads, blocksize) -> Layout:
        return _merged_layout(self, time, heads, blocksize)

    def groups(self, heads):
        return [(0, heads, self, self)]


@dataclass(frozen=True)
class PerHead(Spec):
    """Different patterns on different heads (paper eq. 8): ``heads`` split into ``len(parts)``
    equal contiguous groups, group ``g`` using ``parts[g]``."""

    parts: tuple

    def __init__(self, *parts):
        if len(parts) == 1 and isinstance(parts[0], (list, tuple)):
            parts = tuple(parts[0])
        parts = tuple(as_spec(p) for p in parts)
        if not parts or any(isinstance(p, PerHead) for p in parts):
            raise ValueError(f"PerHead takes one or more non-PerHead specs, got {parts}")
        object.__setattr__(self, "parts", parts)

    def _size(self, heads):
        if heads % len(self.parts):
            raise ValueError(f"heads ({heads}) must be a multiple of the number of PerHead parts ({len(self.parts)})")
        return heads // len(self.parts)

    def check(self, time, heads, blocksize):
        n = self._size(heads)
        for p in self.parts:
            p.check(time, n, blocksize)

    def multiple(self, blocksize):
        return functools.reduce(math.lcm, (p.multiple(blocksize) for p in self.parts))

    def allowed(self, i, j, h, heads, blocksize):
        # group g owns heads [g * n, (g + 1) * n) and sees them as its heads 0 .. n - 1
        n = self._size(heads)
        parts = (
            (g * n <= h) & (h < (g + 1) * n) & p.allowed(i, j, h - g * n, n, blocksize)
            for g, p in enumerate(self.parts)
        )
        return functools.reduce(lambda a, b: a | b, parts)

    def groups(self, heads):
        n = self._size(heads)
        out = []
        for g, p in enumerate(self.parts):
            out += [(g * n + h0, hn, mode, spec) for h0, hn, mode, spec in p.groups(n)]
        return out


@dataclass(frozen=True)
class Group(Spec):
    """A1 of the paper's fixed pattern: the earlier tokens of the query's own group of ``l``
    tokens, ``j <= i`` and ``i // l == j // l`` (``fixed`` without its summary columns)."""

    l: int

    def __post_init__(self):
        if not isinstance(self.l, int) or self.l <= 0:
            raise ValueError(f"Group.l must be a positive int, got {self.l!r}")

    def check(self, time, heads, blocksize):
        if self.l % blocksize:
            raise ValueError(f"the group length ({self.l}) must be a multiple of blocksize ({blocksize})")
        if time % blocksize:
            raise ValueError(f"time ({time}) must be a multiple of blocksize ({blocksize})")

    def multiple(self, blocksize):
        return blocksize

    def allowed(self, i, j, h, heads, blocksize):
        # with j <= i, "same group" (i div l == j div l) is i div l <= j div l (no ==: TF1-safe)
        return (j <= i) & (i // self.l <= j // self.l)

    def layout(self, time, heads, blocksize) -> Layout:
        return _group_layout(self.l, time, heads, blocksize)

    def groups(self, heads):
        return [(0, heads, self, self)]


@functools.lru_cache(maxsize=16)
def _group_layout(l: int, time: int, heads: int, blocksize: int) -> Layout:
    nb, s = time // blocksize, l // blocksize
    r = np.arange(nb)
    lay = (r[:, None] // s == r[None, :] // s) & (r[None, :] <= r[:, None])
    tril = np.tril(np.ones((blocksize, blocksize), bool))
    out = custom_layout(
        lay, blocksize, heads=heads, callback=lambda shape, h, q, k, e: tril if q == k else np.ones(shape, bool)
    )
    # named, so that packed documents run it as `all` on the documents cut into groups
    # (dispatch._on_documents; without documents nn._sparse_groups runs the groups as a batch)
    return dataclasses.replace(out, params={**out.params, "group": l})


def as_spec(x) -> Spec:
    """A :class:`Spec` from a spec, a :class:`Layout`, a mode name (``"all"``) or a dict of
    :class:`Mode` fields (``{"mode": "local", "local_attn_ctx": 128}``)."""
    if isinstance(x, Spec):
        return x
    if isinstance(x, Layout):
        return Custom(x)
    if isinstance(x, str):
        return Mode(x)
    if isinstance(x, dict):
        return Mode(**x)
    raise TypeError(f"an attention pattern must be a Spec, a Layout, a mode name or a dict, got {type(x).__name__}")


def paper_patterns(
    kind: str, factorization: str = "merged", stride: int = 128, c: int = 32, blocksize: int = 32
) -> list[Spec]:
    """The paper's patterns, as a list of per-block specs (cycled over the residual blocks).

    Args:
        kind: ``"dense"`` (causal), ``"fixed"`` (A1: own group of ``stride`` tokens, A2: the last
            ``c`` tokens of every earlier group), ``"strided"`` (A1: the last ``stride`` tokens,
            A2: every ``stride``-th token) or ``"local"`` (A1 alone).
        factorization: ``"interleaved"`` (eq. 6: blocks alternate A1 and A2), ``"merged"`` (eq. 7:
            A1 | A2 in every head) or ``"heads"`` (eq. 8: half of the heads A1, half A2).
        c: ``fixed`` only, a multiple of ``blocksize`` (the summary is ``c / blocksize`` blocks).
    """
    if kind == "dense":
        return [Mode("all")]
    if kind == "local":
        return [Mode("local", stride)]
    if factorization not in ("interleaved", "merged", "heads"):
        raise ValueError(f"factorization must be 'interleaved', 'merged' or 'heads', got {factorization!r}")
    if kind == "strided":
        a1, a2 = Mode("local", stride), Mode("strided", stride)
    elif kind == "fixed":
        if c % blocksize:
            raise ValueError(f"c ({c}) must be a multiple of blocksize ({blocksize}) for the fixed pattern")
        a1 = Group(stride)
        a2 = Mode("fixed", stride, num_verts=1, vertsize=c // blocksize)
        if factorization == "merged":
            return [a2]
    else:
        raise ValueError(f"kind must be 'dense', 'local', 'strided' or 'fixed', got {kind!r}")
    if factorization == "interleaved":
        return [a1, a2]
    if factorization == "merged":
        return [Merged(a1, a2)]
    return [PerHead(a1, a2)]


_DENSE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _arange_like(x, n):
    """``arange(n)`` of ``x``'s kind: numpy for numpy input, else a torch tensor on its device."""
    if isinstance(x, np.ndarray):
        return np.arange(n)
    import torch

    return torch.arange(n, device=x.device)


@functools.lru_cache(maxsize=16)
def _merged_layout(spec: Merged, time: int, heads: int, blocksize: int) -> Layout:
    spec.check(time, heads, blocksize)
    if not spec._shift_invariant():
        i = np.arange(time)
        m = np.zeros((heads, time, time), bool)
        for p in spec.parts:
            h = np.arange(heads)[:, None, None]
            m |= p.allowed(i[None, :, None], i[None, None, :], h, heads, blocksize)
        return from_dense(m, blocksize)
    return shift_invariant_union([p.allowed for p in spec.parts], time, heads, blocksize)


def shift_invariant_union(rules, time: int, heads: int, blocksize: int) -> Layout:
    """A custom layout for the union of rules ``allowed(i, j, h, heads, blocksize)`` (as
    :meth:`Spec.allowed`) that depend on
    ``i - j`` only (and are causal), built from one ``blocksize x blocksize`` mask per block
    diagonal: ``O(nb * blocksize**2)`` work, the in-block masks shared by every block of a diagonal.
    """
    b, nb = blocksize, time // blocksize
    a = np.arange(b)
    # diagonal delta = r - c of the block grid holds the token distances b * delta + (a - a')
    d = b * np.arange(nb)[:, None, None] + (a[:, None] - a[None, :])[None]  # [nb, b, b]
    i = np.full_like(d, time - 1)
    m = functools.reduce(np.logical_or, (np.broadcast_to(rule(i, i - d, 0, heads, b), d.shape) for rule in rules))
    m = m & (d >= 0)
    deltas = np.nonzero(m.any(axis=(1, 2)))[0]  # enabled diagonals, ascending
    full = m[deltas].all(axis=(1, 2))
    # per row r: columns r - delta for the deltas <= r, ascending in column = descending delta
    rows = np.repeat(np.arange(nb), len(deltas))
    dl = np.tile(deltas[::-1], nb)
    keep = dl <= rows
    rows, dl = rows[keep], dl[keep]
    cols = (rows - dl).astype(np.int32)
    row_ptr = np.zeros((1, nb + 1), np.int64)
    np.cumsum(np.bincount(rows, minlength=nb), out=row_ptr[0, 1:])
    partial_deltas = deltas[~full]
    mask_of_delta = np.full(nb, -1, np.int32)
    block_masks = np.zeros((0, b, b), bool)
    if len(partial_deltas):
        # diagonals with the same in-block mask (e.g. every stride diagonal) share one entry
        block_masks, inverse = np.unique(
            m[partial_deltas].reshape(len(partial_deltas), -1), axis=0, return_inverse=True
        )
        block_masks = block_masks.reshape(-1, b, b)
        mask_of_delta[partial_deltas] = inverse.reshape(-1).astype(np.int32)
    return csr_layout(row_ptr, cols, b, np.zeros(heads, np.int64), mask_of_delta[dl], block_masks)


# -- presets: the named patterns of the scripts and benchmarks ---------------------------------


@dataclass(frozen=True)
class Preset:
    """A built-in mode with its parameters and block size: one named case of the scripts.

    ``preset.kwargs()`` are the library call's keywords
    (``blocksparse_attention_impl(q, k, v, heads, **preset.kwargs())``), ``preset.layout(time,
    heads)`` its layout, ``preset.replace(blocksize=32)`` a variant.
    """

    spec: Mode
    blocksize: int

    @property
    def mode(self) -> str:
        return self.spec.mode

    def kwargs(self) -> dict:
        """``attn_mode``, ``blocksize`` and the mode's parameters (``local_attn_ctx``, ``num_verts``, ``vertsize``)."""
        return {"attn_mode": self.spec.mode, **self.spec.kwargs(self.blocksize)}

    def layout(self, time: int, heads: int) -> Layout:
        from .layouts import make_layout

        return make_layout(time, heads, **self.kwargs())

    def replace(self, **changes) -> Preset:
        """The preset with other values of ``blocksize`` or of :class:`Mode`'s fields."""
        blocksize = changes.pop("blocksize", self.blocksize)
        fields = {k: getattr(self.spec, k) for k in ("mode", "local_attn_ctx", "num_verts", "vertsize")}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"Preset.replace takes blocksize and {sorted(fields)}, got {sorted(unknown)}")
        return Preset(Mode(**{**fields, **changes}), blocksize)

    def __str__(self) -> str:
        names = {"local_attn_ctx": "l", "num_verts": "nv", "vertsize": "vs", "blocksize": "b"}
        kw = self.spec.kwargs(self.blocksize)
        return " ".join([self.mode] + [f"{names[k]}={kw[k]}" for k in names if k in kw])


def _presets(blocksize: int, ctx: dict, fixed: tuple, fixed_blocksize: int | None = None) -> dict:
    """``{mode: Preset}`` of the four modes: ``ctx`` the ``local_attn_ctx`` of local and strided,
    ``fixed`` the ``(local_attn_ctx, num_verts, vertsize)`` of fixed."""
    return {
        "all": Preset(Mode("all"), blocksize),
        "local": Preset(Mode("local", ctx["local"]), blocksize),
        "strided": Preset(Mode("strided", ctx["strided"]), blocksize),
        "fixed": Preset(Mode("fixed", *fixed), fixed_blocksize or blocksize),
    }


# Suites of presets, each ``{mode: Preset}``, named by what they are for.
PRESETS: dict[str, dict[str, Preset]] = {
    # The benchmark target (fp16, batch 2, 8 heads, time 16384, head_dim 64):
    # scripts/bench.py (these block sizes), scripts/profile_overhead.py (its --blocksize).
    "target": _presets(128, {"local": 128, "strided": 128}, (128, 4, 1), fixed_blocksize=32),
    # The original repository's attention.py (time 1024, 4 heads, blocksize 32).
    "original": _presets(32, {"local": 32, "strided": 32}, (128, 4, 1)),
    # Long sequences with any number of heads (one summary block per group): long_sequence.py.
    "long": _presets(32, {"local": 128, "strided": 128}, (128, 1, 1)),
    # Small enough to draw and to run under compute-sanitizer (time 256, 2 heads):
    # plot_layouts.py, gpu_memcheck.py.
    "small": _presets(16, {"local": 64, "strided": 16}, (64, 2, 1)),
    # Issue 11's 1,048,576-token comparison with FlexAttention (batch 1, 8 heads, head_dim 64):
    # 128-blocks, Flex's own tile, and fixed's summary the last block of each 1024-group.
    "million": _presets(128, {"local": 1024, "strided": 1024}, (1024, 1, 1)),
}


def preset(mode: str, suite: str = "target", **changes) -> Preset:
    """``PRESETS[suite][mode]``, with ``changes`` applied (:meth:`Preset.replace`)."""
    if suite not in PRESETS:
        raise ValueError(f"unknown preset suite {suite!r}; choose from {sorted(PRESETS)}")
    if mode not in PRESETS[suite]:
        raise ValueError(f"unknown mode {mode!r} in preset suite {suite!r}; choose from {sorted(PRESETS[suite])}")
    p = PRESETS[suite][mode]
    return p.replace(**changes) if changes else p


# The paper's patterns by name: ``(kind, factorization)`` of :func:`paper_patterns`
# (scripts/bench_train.py's variants, scripts/bench_curves.py's runs).
PAPER_PRESETS: dict[str, tuple[str, str]] = {
    "dense": ("dense", "merged"),
    "local": ("local", "merged"),
    "fixed": ("fixed", "merged"),
    "fixed-interleaved": ("fixed", "interleaved"),
    "fixed-heads": ("fixed", "heads"),
    "strided-interleaved": ("strided", "interleaved"),
    "strided-merged": ("strided", "merged"),
    "strided-heads": ("strided", "heads"),
}


def paper_preset(name: str, stride: int = 128, c: int = 32, blocksize: int = 32) -> list[Spec]:
    """The per-block specs of a named paper pattern (:data:`PAPER_PRESETS`, :func:`paper_patterns`)."""
    if name not in PAPER_PRESETS:
        raise ValueError(f"unknown paper pattern {name!r}; choose from {list(PAPER_PRESETS)}")
    kind, factorization = PAPER_PRESETS[name]
    return paper_patterns(kind, factorization, stride=stride, c=c, blocksize=blocksize)
