"""Host side of the fused kernels: capability checks, per-layout device tables, tile configs and
launchers for the forward and backward passes on natural-order ``[batch, heads, time, head_dim]``.

Per (layout, head_dim, dtype, device) a :class:`_Plan` is made once (:func:`plan`): the kernels'
compile-time arguments, tiles fitted to the device's shared memory (:func:`_tiles`), the
layout's scalars and tables. A call then allocates its outputs (in the inputs' memory order) and
launches. The pattern's period is a runtime argument where it depends on ``time`` (``strided``),
divided by a multiply-high (:func:`magic_divisor`), so the kernels compile once for every length.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch
import triton

from ...layouts import Layout, builtin_pattern, retile
from ...modes import fixed_vert_range
from ..cache import derived
from ..reference import empty_heads_like, traced

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# float32 tiles of head_dim above 128 leave too little shared memory and registers for useful
# tiles (Triton's compile of them ran for minutes on the H100): such inputs take the gather path.
MAX_HEAD_DIM_FP32 = 128
MAX_BLOCKSIZE_CUSTOM = 128

# Tiles (queries x keys), warps and pipeline stages per kernel and head-dim bucket
# (:func:`head_dim_bucket`: 64, 128 or 256); the benchmark may override entries. The fitting in
# :func:`_tiles` shrinks them further where a device's shared memory is smaller.
CONFIGS = {
    ("fwd", 64): dict(BM=128, BN=64, num_warps=4, num_stages=3),
    ("fwd", 128): dict(BM=128, BN=64, num_warps=8, num_stages=3),
    ("fwd", 256): dict(BM=64, BN=64, num_warps=8, num_stages=2),
    ("dkdv", 64): dict(BM=32, BN=128, num_warps=4, num_stages=3),
    ("dkdv", 128): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("dkdv", 256): dict(BM=32, BN=32, num_warps=8, num_stages=2),
    ("dq", 64): dict(BM=128, BN=32, num_warps=4, num_stages=3),
    ("dq", 128): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("dq", 256): dict(BM=64, BN=32, num_warps=8, num_stages=2),
}
# float32 above head_dim 64 (kernel, bucket): twice the bytes per operand spill at the half
# precision tiles (on the H100 the local memory of 15 processes then exhausted the device), so
# smaller tiles over more warps.
FP32_CONFIGS = {
    ("fwd", 128): dict(BM=64, BN=32, num_warps=8, num_stages=2),
    ("dq", 128): dict(BM=64, BN=32, num_warps=8, num_stages=2),
    ("dkdv", 128): dict(BM=32, BN=64, num_warps=8, num_stages=2),
}
# Per-mode overrides (kernel, mode, head-dim bucket): the fastest of the sweep in
# benchmarks/sweep-h100.log (`python scripts/bench.py --sweep`, GPU time of CUDA-graph replays).
MODE_CONFIGS = {
    ("fwd", "local", 64): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("fwd", "strided", 64): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("fwd", "fixed", 64): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("dkdv", "local", 64): dict(BM=32, BN=64, num_warps=4, num_stages=4),
    ("dkdv", "strided", 64): dict(BM=32, BN=64, num_warps=4, num_stages=4),
    ("dkdv", "fixed", 64): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("dq", "local", 64): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("dq", "strided", 64): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("dq", "fixed", 64): dict(BM=64, BN=64, num_warps=4, num_stages=2),
}
# fixed on long sequences (:func:`_streams_past_l2`): the kernels over query tiles (forward, dQ)
# stream every summary key of the sequence through each tile, and once a head's summary keys no
# longer stay in L2 every tile reads them from memory: a 64-row tile then makes 64 FLOPs per byte
# in the forward, which caps it at ~300 TFLOP/s on the H100/H200 (~4.8 TB/s); 128 rows double
# that. At 1,048,576 tokens (128-blocks, groups of 1024) the forward went from 467 to 375 ms on
# the H200 (benchmarks/delivered-h200/README.md); at 16,384 tokens the 64-row tiles are 6% faster
# (L2 holds the keys), so they stay the default.
LONG_SUMMARY_CONFIGS = {
    ("fwd", 64): dict(BM=128, BN=64, num_warps=4, num_stages=3),
    ("dq", 64): dict(BM=128, BN=64, num_warps=4, num_stages=3),
}
# CUDA's limit on the second grid dimension (batch x heads here); larger batches run in slices.
MAX_GRID_Y = 65535
# Tests set this to fill outputs with NaN before the kernels run, so a skipped tile fails loudly.
POISON_OUTPUTS = False
# Tests force both the split (full + masked loops) and the single masked loop through this.
SPLIT_OVERRIDE: bool | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter turns scalars into Python ints with ``int(array_of_one)``, which
    numpy >= 2.4 refuses; make its ``tensor.__index__`` take the single element instead."""
    try:
        from triton.runtime import interpreter as itp
    except ImportError:  # pragma: no cover - other Triton layouts
        return
    orig = getattr(itp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_sparse_attention_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._sparse_attention_fix = True
    itp._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter()


def unsupported_reasons(q: torch.Tensor, layout: Layout) -> list[str]:
    """Why the fused kernels cannot run these inputs (empty list: they can)."""
    why = []
    if not (q.is_cuda or interpreting()):
        why.append(f"tensors are on {q.device}, the kernels need CUDA (or TRITON_INTERPRET=1)")
    if q.dtype not in SUPPORTED_DTYPES:
        why.append(f"dtype {q.dtype} is not one of {SUPPORTED_DTYPES}")
    if q.shape[-1] > MAX_HEAD_DIM:
        why.append(f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    elif q.dtype == torch.float32 and q.shape[-1] > MAX_HEAD_DIM_FP32:
        why.append(f"float32 with head_dim {q.shape[-1]} > {MAX_HEAD_DIM_FP32} (fp16/bf16 run up to {MAX_HEAD_DIM})")
    if closed_form(layout) is not None:
        return why
    compiling = torch.compiler.is_compiling()
    # the blocks the kernels would run (traced by torch.compile: the layout's own, no numpy)
    kl = layout if compiling else kernel_layout(layout, q.shape[-1])
    if kl.blocksize > MAX_BLOCKSIZE_CUSTOM:
        why.append(f"custom layout blocksize {kl.blocksize} > {MAX_BLOCKSIZE_CUSTOM}")
    if kl.blocksize < 16:
        why.append(f"custom layout blocksize {kl.blocksize} < 16")
    if not why:
        try:
            # eagerly the plan, made once; torch.compile traces the plain fitting instead
            if compiling:
                for kind in ("fwd", "dq", "dkdv"):
                    _tiles(kind, q, kl)
            else:
                plan(layout, q)
        except ValueError as e:  # the layout's blocks cannot fit the device
            why.append(str(e))
    return why


# The bidirectional built-in modes run the kernels' closed form (tests switch it off to compare
# with their custom layouts on the table-driven path).
CLOSED_BIDIRECTIONAL = True


def closed_form(layout: Layout) -> tuple[str, dict, bool] | None:
    """``(mode, params, causal)`` of the closed form the kernels run for ``layout``
    (:func:`~sparse_attention.layouts.builtin_pattern`, the bidirectional modes' unless switched
    off); None for other custom layouts (their tables)."""
    form = builtin_pattern(layout)
    if form is None or (not form[2] and not CLOSED_BIDIRECTIONAL):
        return None
    return form


# Custom layouts run at the kernels' tile (:func:`kernel_layout`); tests and benchmarks switch
# it off to run them at their own block size.
RETILE = True
# A coarser tile is taken while it computes at most this many times the layout's own area.
RETILE_MAX_AREA = 2.0


def custom_tile(head_dim: int) -> int:
    """The tile custom layouts run at: 64 (the tuned tiles of the built-in modes), 32 above
    head_dim 128 (shared memory) and in the interpreter (its cost grows with the tile)."""
    return 32 if head_dim > 128 or interpreting() else 64


def kernel_layout(layout: Layout, head_dim: int) -> Layout:
    """The layout the kernels run for a custom ``layout``: the same pattern cut into
    :func:`custom_tile` blocks (:func:`~sparse_attention.layouts.retile`: a layout of small
    blocks, 16 or 32, fills the tensor cores' tiles; one of 128 gets finer tiles, without the
    parts that hold no pair), unless the coarser tiles would compute more than
    :data:`RETILE_MAX_AREA` times the pairs of its own blocks (scattered small blocks). Made once
    per layout and tile; built-in modes run as they are."""
    if layout.mode != "custom" or not RETILE:
        return layout
    tile = custom_tile(head_dim)
    return derived(layout, ("kernel layout", tile), lambda: _retiled(layout, tile))


def _retiled(layout: Layout, tile: int) -> Layout:
    b = layout.blocksize
    try:
        out = retile(layout, tile)
    except ValueError:  # not a power-of-two multiple or divisor of the tile: its own blocks
        return layout
    if tile > b and out.nnz * tile * tile > RETILE_MAX_AREA * layout.nnz * b * b:
        return layout
    return out


def head_dim_bucket(D: int) -> int:
    """The tile tables' key of a head dimension: 64, 128 or 256."""
    return 64 if D <= 64 else 128 if D <= 128 else 256


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on ``device`` (the H100's 227 KiB when unknown)."""
    if interpreting() or not torch.cuda.is_available():
        return 232448
    return _smem_optin(torch.device(device).index or 0)


@functools.cache
def _smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def shared_memory_estimate(kind: str, cfg: dict, block_d: int, itemsize: int) -> int:
    """Shared memory of a kernel's tiles: the resident operands, the pipelined ones times the
    stages, and the probabilities tile(s) fed to the second matmul. An upper bound of what Triton
    allocates (which reuses some of these buffers)."""
    BM, BN, S = cfg["BM"], cfg["BN"], cfg["num_stages"]
    if kind == "fwd":  # q resident; k, v pipelined; p
        n = BM * block_d + S * 2 * BN * block_d + BM * BN
    elif kind == "dq":  # q, dO resident; k, v pipelined; dS
        n = 2 * BM * block_d + S * 2 * BN * block_d + BM * BN
    else:  # dkdv: k, v resident; q, dO pipelined; P^T, dS^T
        n = 2 * BN * block_d + S * 2 * BM * block_d + 2 * BM * BN
    return n * itemsize


def shrink(cfg: dict, fixed_tiles: bool) -> dict | None:
    """The next smaller config: fewer pipeline stages first, then the larger tile halved (tiles
    of at least 16, the smallest ``tl.dot``); None when nothing is left to shrink."""
    cfg = dict(cfg)
    if cfg["num_stages"] > 1:
        cfg["num_stages"] -= 1
    elif not fixed_tiles and max(cfg["BM"], cfg["BN"]) > 16:
        big = "BM" if cfg["BM"] >= cfg["BN"] else "BN"
        cfg[big] //= 2
        cfg["num_stages"] = 2
    else:
        return None
    return cfg


def _streams_past_l2(form, layout: Layout, q: torch.Tensor) -> bool:
    """Whether ``fixed``'s summary keys and values of one head (what a query tile at the end of
    the sequence streams) take more than a quarter of the device's L2 cache."""
    if form is None or form[0] != "fixed":
        return False
    params = form[1]
    keys = layout.time // params["local_attn_ctx"] * params["vertsize"] * params["blocksize"]
    return keys * 2 * q.shape[3] * q.element_size() > l2_cache_bytes(q.device) // 4


def l2_cache_bytes(device) -> int:
    """The L2 cache of ``device`` (the H100's 50 MiB where unknown: the interpreter, no GPU)."""
    if interpreting() or not torch.cuda.is_available():
        return 50 << 20
    return _l2(torch.device(device).index or 0)


@functools.cache
def _l2(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def _tiles(kind: str, q: torch.Tensor, layout: Layout) -> dict:
    """The tile config of a kernel for these inputs: the tuned table's entry for the head-dim
    bucket, shrunk (:func:`shrink`) until its tiles fit the device's shared memory. Any ``time``
    runs at these tiles (the kernels mask the tile past its end). Raises ValueError when nothing
    fits (custom layouts, whose tiles are their blocks)."""
    D = q.shape[3]
    bucket = head_dim_bucket(D)
    form = closed_form(layout)
    mode = "custom" if form is None else form[0]
    long = _streams_past_l2(form, layout, q) and LONG_SUMMARY_CONFIGS.get((kind, bucket))
    cfg = (FP32_CONFIGS.get((kind, bucket)) if q.dtype == torch.float32 else None) or (
        long or MODE_CONFIGS.get((kind, mode, bucket)) or CONFIGS[(kind, bucket)]
    )
    cfg = dict(cfg)
    if interpreting():
        cfg["BM"], cfg["BN"] = min(cfg["BM"], 32), min(cfg["BN"], 32)
    fixed_tiles = mode == "custom"
    if fixed_tiles:
        cfg["BM"] = cfg["BN"] = layout.blocksize
    block_d, limit = max(16, triton_next_pow2(D)), shared_memory_limit(q.device)
    fitted = cfg
    while fitted is not None and shared_memory_estimate(kind, fitted, block_d, q.element_size()) > limit:
        fitted = shrink(fitted, fixed_tiles)
    if fitted is None:
        raise ValueError(
            f"the fused kernels cannot fit head_dim {D} ({q.dtype}) with tiles of {cfg['BM']}x{cfg['BN']} "
            f"in {limit} bytes of shared memory; use a smaller head_dim or blocksize, or the block-gather "
            "path (SPARSE_ATTENTION_DISABLE_FUSED=1)"
        )
    return fitted


class _Kernel:
    """A kernel with its compile-time arguments (constants, tiles, warps, stages) resolved once.
    ``run(grid_of, *args)`` launches ``kernel[grid_of(BM, BN)](*args, **kw)``; where Triton finds
    the tiles too big for the device (its allocation differs from the estimate), it shrinks them
    (:func:`shrink`) and keeps the config that ran for later calls.

    Launches are pre-bound: the first launch of a call signature goes through Triton's JIT (which
    specializes the binary on the arguments: integer values equal to 1 or divisible by 16,
    pointers aligned to 16 bytes, dtypes) and keeps the compiled kernel under a key that is at
    least as fine (every integer's value, each tensor's address modulo 16; the plan fixes dtypes
    and device); a later launch with that key calls the compiled kernel directly, skipping the JIT's
    binding, specialization and cache-key work on the host (:func:`bound_key`)."""

    __slots__ = ("kernel", "kw", "fixed_tiles", "bound", "fitted")

    def __init__(self, kernel, kw: dict, fixed_tiles: bool):
        self.kernel, self.kw, self.fixed_tiles = kernel, kw, fixed_tiles
        self.bound: dict = {}
        self.fitted: set = set()  # traced launch signatures whose config is known to load

    def run(self, grid_of, *args, time: int, **extra) -> None:
        """``time``: the sequence length (packed documents: a length that divides every
        document's); a tile that runs past it is masked (``TAIL``, a compile-time flag: lengths
        that the tiles divide compile without the masks). Arguments that depend on the tiles
        (:class:`PerTile`) are made for the config that launches."""
        kw = self.kw
        raw = args
        if extra.get("DOCS") == 1:
            args = _per_tile(raw, kw)
        tail = _tail(kw, time)
        if traced(args[0]):  # torch.compile decomposing an op: the launch goes into its graph
            kw = self._fit_traced(args, extra, time)
            launcher(self.kernel, args[0])[grid_of(kw["BM"], kw["BN"])](*args, **kw, **extra, TAIL=_tail(kw, time))
            return
        key = None if interpreting() else bound_key(args, extra, tail)
        try:
            hit = self.bound.get(key) if key is not None else None
        except TypeError:  # an unhashable argument: the JIT launches
            hit = key = None
        if hit is not None:
            compiled, consts = hit
            _launch_bound(compiled, grid_of(kw["BM"], kw["BN"]), (*args, *consts))
            return
        while True:
            kw = self.kw
            try:
                tail = _tail(kw, time)
                if extra.get("DOCS") == 1:
                    args = _per_tile(raw, kw)
                compiled = self.kernel[grid_of(kw["BM"], kw["BN"])](*args, **kw, **extra, TAIL=tail)
                break
            except triton.runtime.errors.OutOfResources as e:
                self._shrink(e)
        if key is not None and len(self.bound) < MAX_BOUND and hasattr(compiled, "run"):
            merged = {**kw, **extra, "TAIL": tail}
            names = self.kernel.arg_names[len(args) :]
            if all(name in merged for name in names):  # else a default we do not know: keep the JIT
                self.bound[key] = (compiled, tuple(merged[name] for name in names))

    def _shrink(self, refused: Exception) -> None:
        """Take the next smaller config (:func:`shrink`) after Triton ``refused`` this one (too
        big for the device), forgetting the pre-bound launches; re-raise where none is left."""
        smaller = shrink(self.kw, self.fixed_tiles)
        if smaller is None:
            raise refused
        self.kw = smaller
        self.bound.clear()

    def _fit_traced(self, args: tuple, extra: dict, time: int) -> dict:
        """The config a traced launch records: Inductor compiles and launches it later, where a
        config too big for the device could not shrink and retry as :meth:`run` does. So the
        first trace of a signature compiles the kernel here (Triton's ``warmup`` on the tensors'
        dtypes), loads it on the device, and shrinks (:func:`shrink`) while Triton finds it too
        big; Triton's cache keeps the binary for Inductor's own compile of the same source."""
        q = args[0]
        if interpreting():
            return self.kw
        values = tuple(a.dtype if isinstance(a, torch.Tensor) else _hint(a) for a in args)
        key = (_tail(self.kw, time), *extra.items(), *(v for v in values if not isinstance(v, float)))
        while key not in self.fitted:
            kw = self.kw
            try:
                load(self.kernel, q.device, values, {**kw, **extra, "TAIL": _tail(kw, time)})
            except triton.runtime.errors.OutOfResources as e:
                self._shrink(e)
                key = (_tail(self.kw, time), *key[1:])
                continue
            except Exception as e:  # noqa: BLE001 - the check could not run: Inductor compiles as before
                warnings.warn(
                    f"sparse_attention: could not pre-load {self.kernel.fn.__name__} while tracing ({e!r}); "
                    "its config is not checked against the device",
                    stacklevel=2,
                )
            self.fitted.add(key)
        return self.kw


def load(kernel, device, args: tuple, kwargs: dict) -> None:
    """Compile ``kernel`` for arguments like these (tensors given by their dtypes) and load it on
    ``device``, without launching it: raises Triton's ``OutOfResources`` where the binary needs
    more shared memory (or threads) than the device has. Nothing to load off a GPU."""
    if device.type != "cuda":
        return
    with torch.cuda.device(device):
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        compiled._init_handles()


def _hint(x):
    """A traced integer's value (a ``SymInt``'s hint), anything else as it is."""
    return x.node.hint if isinstance(x, torch.SymInt) else x


def _tail(kw: dict, time: int) -> bool:
    return bool(time % kw["BM"] or time % kw["BN"])


class PerTile(NamedTuple):
    """A kernel argument made for the launch's tiles: ``make(BM, BN)``."""

    make: object


def _per_tile(args: tuple, kw: dict) -> tuple:
    return tuple(a.make(kw["BM"], kw["BN"]) if type(a) is PerTile else a for a in args)


# Pre-bound launch signatures kept per kernel (a training loop has a few; beyond this, the JIT).
MAX_BOUND = 64
# Tests switch the pre-bound launches off to compare both paths.
PREBOUND = True


Tensor = torch.Tensor


def bound_key(args: tuple, extra: dict, tail: bool):
    """A launch's signature for the pre-bound path, finer than Triton's specialization: integer
    (and float) arguments by value, tensors by their address modulo 16, the compile-time extras.
    Tensors' dtypes and device are not in it: a kernel belongs to one plan, made per dtype and
    device, whose tensors (inputs, outputs in the inputs' dtype, float32 statistics, the
    layout's tables) keep theirs. An unhashable argument makes an unhashable key (then the JIT
    launches)."""
    if not PREBOUND:
        return None
    # (Tensor bound once: a per-item global lookup costs a third of this on the host)
    return (tail, *extra.values(), *[a.data_ptr() & 15 if type(a) is Tensor else a for a in args])


def stand_ins(q: torch.Tensor, n: int) -> tuple:
    """``n`` pointer arguments that a launch does not read (a built-in mode's tables, the work
    lists without documents, the summary buffer of modes without one): ``q`` itself, which
    allocates nothing (a CUDA graph may record the call); traced, fresh one-element tensors of
    their own. Inductor's mutation analysis counts a pointer as written when a store's address
    depends on values loaded through it (the document lists), and ``q`` written would be an
    input mutation."""
    return tuple(q.new_empty(1) for _ in range(n)) if traced(q) else (q,) * n


def launcher(kernel, x):
    """What launches ``kernel[grid](...)`` on tensors like ``x``: the kernel itself, or while
    ``x`` is traced (:func:`traced`) ``torch.library.wrap_triton(kernel)``, which records the
    launch in the graph for Inductor to compile and emit."""
    if traced(x):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def current_stream() -> int:
    """The current CUDA stream of the current device, as Triton's JIT takes it (a CUDA graph's
    capture stream during capture)."""
    active = _driver().active
    return active.get_current_stream(active.get_current_device())


@functools.cache
def _driver():
    from triton.runtime.driver import driver

    return driver


def _launch_bound(compiled, grid: tuple, params: tuple) -> None:
    """What Triton's JIT does after its cache lookup: launch ``compiled`` on the current stream
    with every parameter (compile-time ones included, as the launcher expects)."""
    knobs = triton.knobs
    stream = current_stream()
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(
        grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata,
        compiled.launch_metadata(grid, stream, *params),
        knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *params,
    )  # fmt: skip


POINTER_TABLES = ("HEAD_PAT", "PERM", "ROW_PTR", "COLS", "MASK_IDX", "MASKS", "COL_PTR", "ROWS", "ENTRY_MASK")


def device_tables(layout: Layout, q: torch.Tensor) -> dict:
    """The kernels' layout arguments: scalars for the built-in modes (their tiles and masks come
    from the closed form, and ``fixed``'s first summary token of head ``h`` is ``VLO_A - (h %
    VLO_NV) * VLO_C``), plus the CSR tables of a custom layout on ``q``'s device.

    Built-in modes allocate nothing on the device (their pointer arguments are ``q``, never read),
    so a call can be the first one inside a CUDA-graph capture (``torch.compile(mode=
    "reduce-overhead")``); a custom layout's tables are made by its first call on a device, or by
    ``register_layout(layout, device)`` before capture."""
    if closed_form(layout) is None:
        return derived(layout, ("kernel tables", str(q.device)), lambda: _build_tables(layout, q.device))
    tab = derived(layout, ("kernel tables", None), lambda: _build_tables(layout, None))
    return {**tab, **dict.fromkeys(POINTER_TABLES, q)}


def _build_tables(layout: Layout, device) -> dict:
    form = closed_form(layout)
    mode, p = ("custom", layout.params) if form is None else form[:2]
    T = layout.time
    t = dict(P1=1, P2=1, VSB=1, NSUM=0, VLO_A=0, VLO_C=0, VLO_NV=1)
    if mode == "local":
        t["P1"] = p["local_attn_ctx"]
    elif mode == "strided":
        t["P1"], t["P2"] = T // p["local_attn_ctx"], p["local_attn_ctx"]
    elif mode == "fixed":
        b, l, nv, vs = p["blocksize"], p["local_attn_ctx"], p["num_verts"], p["vertsize"]
        s = l // b
        t["P1"], t["VSB"] = l, vs * b
        t["NSUM"] = math.ceil(T / l) * vs * b
        t["VLO_A"], t["VLO_NV"], t["VLO_C"] = fixed_vert_range(0, s, nv, vs)[0] * b, nv, vs * b
    elif mode == "custom":
        col_ptr, rows, entry = layout.col_table()

        def dev(x, dt):
            x = np.ascontiguousarray(x)
            return (
                torch.from_numpy(x).to(device=device, dtype=dt) if x.size else torch.zeros(1, dtype=dt, device=device)
            )

        t.update(
            HEAD_PAT=dev(layout.head_pattern, torch.int32),
            PERM=dev(np.zeros(0, np.int32) if layout.perm is None else layout.perm, torch.int32),
            ROW_PTR=dev(layout.row_ptr, torch.int64),
            COLS=dev(layout.cols, torch.int32),
            MASK_IDX=dev(layout.mask_idx, torch.int32),
            MASKS=dev(layout.block_masks.astype(np.int8), torch.int8),
            COL_PTR=dev(col_ptr, torch.int64),
            ROWS=dev(rows, torch.int32),
            ENTRY_MASK=dev(layout.mask_idx[entry], torch.int32),
        )
    elif mode != "all":
        raise ValueError(f"unknown layout mode {mode!r}")
    return t


def _split(mode: str, tab: dict, bn: int, tiles: int = 4) -> bool:
    """Whether a query tile's key range is long enough (>= ``tiles`` tiles that may be full) to be
    worth a separate unmasked loop; short ranges run as one masked, better pipelined loop
    (measured on an H100: the forward gains from splitting from 2 tiles on, dQ from 4)."""
    if SPLIT_OVERRIDE is not None:
        return SPLIT_OVERRIDE
    if mode in ("all", "custom"):
        return True
    return tab["P1"] >= tiles * bn


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def new_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A fresh output (NaN-filled under ``POISON_OUTPUTS``). Without ``shape``: ``like``'s shape
    ``[B, H, T, D]`` in ``like``'s memory order, so that an output for a head view of a
    ``[batch, time, heads * head_dim]`` tensor (time outside heads) merges back into one without
    a copy; otherwise contiguous."""
    dtype = like.dtype if dtype is None else dtype
    if shape is None:
        x = empty_heads_like(like, dtype)
    else:
        x = torch.empty(shape, dtype=dtype, device=like.device)
    return x.fill_(float("nan")) if POISON_OUTPUTS else x


class _Plan:
    """Everything a call on ``layout`` with inputs of one head_dim, dtype and device needs that
    does not change between calls: the kernels' compile-time arguments, the layout's scalars and
    tables, the scales. Made once (:func:`plan`); a call then only allocates its outputs and
    launches."""

    def __init__(self, layout: Layout, q: torch.Tensor):
        from . import attention as K

        D = q.shape[-1]
        form = closed_form(layout)
        if form is None:
            layout = kernel_layout(layout, D)
        name, _, causal = ("custom", None, True) if form is None else form
        tab = device_tables(layout, q)
        mode = K.MODE_IDS[name]
        consts = dict(
            HEAD_D=D,
            BLOCK_D=max(16, triton_next_pow2(D)),
            MODE=mode,
            P1=tab["P1"],
            P1M=magic_divisor(tab["P1"])[0],
            P1S=magic_divisor(tab["P1"])[1],
            # the period as a constant where it does not depend on time (see attention._div)
            P1C=tab["P1"] if name in ("local", "fixed") else 0,
            P2=tab["P2"],
            VSB=tab["VSB"],
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
            HAS_PERM=name == "custom" and layout.perm is not None,
            CAUSAL=causal,
        )
        custom = mode == K.MODE_CUSTOM
        fwd, dq, dkdv = (_tiles(kind, q, layout) for kind in ("fwd", "dq", "dkdv"))
        fwd["SPLIT"] = _split(name, tab, fwd["BN"], tiles=2)
        dq["SPLIT"] = _split(name, tab, dq["BN"])
        self.fwd = _Kernel(K.fwd_kernel, {**consts, **fwd}, custom)
        self.dq = _Kernel(K.dq_kernel, {**consts, **dq}, custom)
        self.dkdv = _Kernel(K.dkdv_kernel, {**consts, **dkdv, "SUMMARY": False}, custom)
        self.nsum = tab["NSUM"] if mode == K.MODE_FIXED else 0
        # packed documents: all and local (patterns of i - j alone) can run on tiles of the whole
        # row with per-position document bounds (DOC_ROWS); the others per document only
        self.doc_rows = mode in (K.MODE_ALL, K.MODE_LOCAL)
        # strided on packed documents: each document's l residue classes padded to one length
        # (its positions: its length rounded up to a multiple of l)
        self.stride = tab["P2"] if mode == K.MODE_STRIDED else 0
        self.period, self.vsb = tab["P1"], tab["VSB"]
        self.dkdv_summary = _Kernel(K.dkdv_kernel, {**consts, **dkdv, "SUMMARY": True}, custom)
        self.custom = custom
        self.vlo = (tab["VLO_A"], tab["VLO_C"], tab["VLO_NV"])
        # a custom layout's device tables; a built-in mode's pointer arguments are the call's q
        # (:meth:`tables`): the plan, kept for the layout's life, holds no caller's tensor
        if custom:
            self.head_pat, self.perm = tab["HEAD_PAT"], tab["PERM"]
            self.row_table = (tab["ROW_PTR"], tab["COLS"], tab["MASK_IDX"], tab["MASKS"])
            self.col_table = (tab["COL_PTR"], tab["ROWS"], tab["ENTRY_MASK"], tab["MASKS"])
        self.nb = layout.nb
        self.sm_scale = 1.0 / math.sqrt(D)
        self.qk_scale = math.log2(math.e) * self.sm_scale

    def tables(self, q: torch.Tensor) -> tuple:
        """``(summary, row table, column table)`` arguments; a built-in mode's pointer arguments
        are :func:`stand_ins` (never read: the kernels take their tiles from the closed form)."""
        if self.custom:
            return (*self.vlo, self.head_pat, self.perm), self.row_table, self.col_table
        return (*self.vlo, *stand_ins(q, 2)), stand_ins(q, 4), stand_ins(q, 4)


# Bumped by :func:`configs_changed`: plans made under older tile tables are not used again.
_GENERATION = 0


def configs_changed() -> None:
    """Call after changing :data:`CONFIGS` or :data:`MODE_CONFIGS` (the benchmark's sweep)."""
    global _GENERATION
    _GENERATION += 1


def plan(layout: Layout, q: torch.Tensor) -> _Plan:
    """The launch plan of ``layout`` for inputs like ``q`` (its head_dim, dtype and device),
    made once. Raises ValueError where a custom layout's blocks cannot fit the device."""
    key = ("launch plan", _GENERATION, SPLIT_OVERRIDE, RETILE, CLOSED_BIDIRECTIONAL, q.shape[-1], q.dtype, q.device)
    return derived(layout, key, lambda: _Plan(layout, q))


def magic_divisor(d: int) -> tuple[int, int]:
    """``(m, s)`` with ``x // d == (umulhi(x, m) + x) >> s`` for every ``0 <= x < 2**31``
    (Granlund and Montgomery's round-up method: ``s = ceil(log2 d)``, ``m = floor(2**32 (2**s -
    d) / d) + 1 < 2**32``); the kernels divide positions by the pattern's period this way."""
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor must be in [1, 2**31), got {d}")
    s = (d - 1).bit_length()
    return ((1 << 32) * ((1 << s) - d)) // d + 1, s


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def batch_slices(B: int, H: int):
    """Batch ranges whose ``batch x heads`` programs fit one launch's second grid dimension."""
    if H > MAX_GRID_Y:
        raise ValueError(f"heads ({H}) must be at most {MAX_GRID_Y} for the fused kernels")
    step = MAX_GRID_Y // H
    return [(a, min(a + step, B)) for a in range(0, B, step)]


def _whole_call(fn):
    """Run a launcher on its tensors' CUDA device (Triton launches on the current one), and in
    batch slices when ``batch x heads`` exceeds one launch's grid (outputs concatenated)."""

    @functools.wraps(fn)
    def run(*args):
        n = next(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
        ts, rest = args[:n], args[n:]
        x = ts[0]
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return run(*args)
        if x.shape[0] * x.shape[1] > MAX_GRID_Y:
            parts = [fn(*(t[a:b] for t in ts), *rest) for a, b in batch_slices(*x.shape[:2])]
            return tuple(torch.cat(g) for g in zip(*parts))
        return fn(*args)

    return run


def _strides(*xs) -> tuple:
    """The batch, head and time strides of each ``[B, H, T, D]`` tensor (the last one is 1)."""
    return tuple(st for x in xs for st in x.stride()[:3])


def kv_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key/value head of ``[B, H, T, D]`` q and ``[B, HK, T, D]`` k (grouped-query
    attention: query head ``h`` reads key/value head ``h // group``); 1 for ordinary attention."""
    return q.shape[1] // k.shape[1]


class DocumentTable:
    """Packed documents for the built-in kernels: document ``d`` is tokens ``cu[d]:cu[d + 1]`` of
    a batch of one, and runs the layout's pattern on its own positions. Programs take their
    (document, tile) from a work list (:meth:`work`) that names only the tiles inside documents,
    ordered by tile (the kernels run the heaviest tiles of causal patterns first); with
    :data:`DOC_ROWS`, ``all`` and ``local`` run tiles of the whole row and read each position's
    document bounds (:attr:`bounds`) instead. ``cu``: int32
    on the device; ``align``: the largest length that divides every document's (tiles that
    divide it need no masking past a document's end)."""

    __slots__ = ("cu", "count", "align", "_host", "_lens", "_work", "_bounds", "_divs")

    def __init__(self, cu: np.ndarray, device):
        self.cu = _to_device(cu.astype(np.int32), device)
        self._host = cu
        self._lens = np.diff(cu)
        self.count = len(self._lens)
        self.align = int(np.gcd.reduce(self._lens))
        self._work: dict = {}
        self._bounds = None
        self._divs: dict = {}

    @property
    def bounds(self) -> torch.Tensor:
        """``[2, time]`` int32: each position's document's first token, then its end (the
        kernels' ``DOCS == 2``: ``all`` and ``local`` on tiles of the whole row)."""
        if self._bounds is None:
            cu = self._host
            starts, ends = np.repeat(cu[:-1], self._lens), np.repeat(cu[1:], self._lens)
            self._bounds = _to_device(np.stack([starts, ends]).astype(np.int32), self.cu.device)
        return self._bounds

    def positions(self, stride: int = 0) -> np.ndarray:
        """Each document's block-order positions: its length, or with ``stride`` (``strided``'s
        ``l``) its ``l`` residue classes padded to ``ceil(length / l)`` positions each."""
        return self._lens if not stride else -(-self._lens // stride) * stride

    def tail_free(self, stride: int = 0) -> int:
        """A length that divides every document's positions and whose multiples need no masks
        (a tile that divides it never runs past a document's end); 1 where ``strided``'s padded
        residue classes hold positions without a token (then every launch masks)."""
        if stride and (self._lens % stride).any():
            return 1
        return self.align

    def divisors(self, stride: int) -> torch.Tensor:
        """``strided`` (``l = stride``): ``[count, 3]`` int64, each document's ``n = ceil(length /
        l)`` (positions per residue class) and its magic numbers (:func:`magic_divisor`)."""
        if stride not in self._divs:
            n = -(-self._lens // stride)
            lengths, which = np.unique(n, return_inverse=True)
            magic = np.array([magic_divisor(int(d)) for d in lengths], dtype=np.int64).reshape(-1, 2)
            rows = np.concatenate([n[:, None], magic[which.reshape(-1)]], axis=1).astype(np.int64)
            self._divs[stride] = _to_device(rows, self.cu.device)
        return self._divs[stride]

    def work(self, tile: int, group: int = 0, keys: int = 0, stride: int = 0) -> tuple[torch.Tensor, int]:
        """``(list, n)``: ``[n, 2]`` int32 (document, tile index) of the tiles of ``tile``
        positions in every document (:meth:`positions`); with ``group``, ``keys`` (fixed's
        summary pass) of its ``ceil(length / group) * keys`` virtual summary keys instead."""
        key = (tile, group, keys, stride)
        if key not in self._work:
            n = self.positions(stride) if not group else -(-self._lens // group) * keys
            counts = -(-n // tile)
            doc = np.repeat(np.arange(self.count), counts)
            first = np.cumsum(counts) - counts
            idx = np.arange(len(doc)) - np.repeat(first, counts)
            order = np.lexsort((doc, idx))
            items = np.stack([doc[order], idx[order]], axis=1).astype(np.int32)
            self._work[key] = (_to_device(items, self.cu.device), len(items))
        return self._work[key]


def _to_device(x: np.ndarray, device) -> torch.Tensor:
    """``x`` on ``device``; to a GPU through pinned memory without waiting (a copy from pageable
    memory would make the host wait for the queued kernels, once per new batch of documents)."""
    t = torch.from_numpy(x)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Recent documents' device tables by their boundaries (a benchmark or an evaluation repeats them).
_DOCUMENTS: dict = {}


def documents(cu: np.ndarray, device) -> DocumentTable:
    """The kernels' tables of packed documents with boundaries ``cu`` (int64 numpy, checked) on
    ``device``, kept for the last few boundaries."""
    key = (cu.tobytes(), str(device))
    hit = _DOCUMENTS.get(key)
    if hit is None:
        if len(_DOCUMENTS) >= 16:
            del _DOCUMENTS[next(iter(_DOCUMENTS))]
        hit = _DOCUMENTS[key] = DocumentTable(cu, device)
    return hit


# all and local can run packed documents on tiles of the whole row (DOCS == 2) instead of the
# per-document work lists (DOCS == 1). Off until measured ahead: its first version (bounds from
# reductions over the tile) made local's forward 1.24-1.28x the unpacked GPU time on the H200
# against 1.00-1.14x per document (benchmarks/features-h200/session11); this one (scalar bounds,
# no narrowing of local's window) is not measured yet: bench_features.py times both ways.
DOC_ROWS = False


def _documents(p: _Plan, T: int, docs: DocumentTable | None) -> dict:
    """The kernels' flags for packed ``docs`` under plan ``p``: ``DOCS`` (0 none, 1 per document,
    2 per position: :attr:`_Plan.doc_rows`) and the length whose multiples need no tail mask."""
    if docs is None:
        return dict(DOCS=0, time=T)
    if p.doc_rows and DOC_ROWS:
        return dict(DOCS=2, time=T)
    return dict(DOCS=1, time=docs.tail_free(p.stride))


def _grid(
    q, B: int, T: int, programs: int, docs, by: int, group: int = 0, keys: int = 0, rows: bool = False, stride: int = 0
):
    """``(grid_of, (CU, WORK, DIVS))`` of a launch over ``programs`` heads per sequence: each
    sequence (a row of the batch, or a document: its work list) in tiles of ``BM`` (``by`` 0) or
    ``BN`` (1) positions; with ``group``, ``keys`` (fixed's summary pass) of its ``ceil(length /
    group) * keys`` virtual summary keys instead. ``rows`` (``DOCS == 2``): documents per
    position, on tiles of the whole row. ``stride`` (``strided``'s ``l``, documents): each
    document's padded residue classes and their divisors (:meth:`DocumentTable.divisors`)."""
    if docs is None or rows:
        n = -(-T // group) * keys if group else T
        # -(-n // t): ceil without triton.cdiv, a JIT function (~5 us per call from the host)
        cu, bounds, divs = stand_ins(q, 3)
        bounds = bounds if docs is None else docs.bounds
        return (lambda *tiles: (-(-n // tiles[by]), B * programs)), (cu, bounds, divs)
    return (
        lambda *tiles: (docs.work(tiles[by], group, keys, stride)[1], programs),
        (
            docs.cu,
            PerTile(lambda *tiles: docs.work(tiles[by], group, keys, stride)[0]),
            docs.divisors(stride) if stride else docs.cu,
        ),
    )


def _summary_keys(p: _Plan, T: int, docs) -> tuple[int, int]:
    """fixed: ``(per sequence, in all)`` virtual summary keys, the latter the rows of the dK/dV
    passes' float32 buffer: per row of the batch, or for packed documents (whose own counts are
    in their work list: -1) one buffer in which document ``d``'s keys start at ``(cu[d] // l +
    d) * VSB`` (see ``dkdv_kernel``)."""
    if not p.nsum:
        return 0, 0
    if docs is None:
        return p.nsum, p.nsum
    return -1, (T // p.period + docs.count) * p.vsb


@_whole_call
def forward(q, k, v, layout: Layout, docs: DocumentTable | None = None):
    """``(o [B, H, T, D] dtype of q, lse [B, H, T] float32, base 2)``; ``k``, ``v`` may have fewer
    heads (``[B, HK, T, D]``, ``H % HK == 0``: grouped-query attention); ``docs``: packed
    documents (``B == 1``) for a built-in ``layout``."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    B, H, T, D = q.shape
    p = plan(layout, q)
    summary, rows, _ = p.tables(q)
    flags = _documents(p, T, docs)
    grid, seqs = _grid(q, B, T, H, docs, 0, rows=flags["DOCS"] == 2, stride=p.stride)
    o = new_output(q)
    lse = new_output(q, (B, H, T), torch.float32)
    p.fwd.run(
        grid, *(q, k, v, o, lse), *summary, *seqs, *rows, *_strides(q, k, v, o), *(T, H, p.nb, p.qk_scale),
        G=kv_group(q, k), **flags,
    )  # fmt: skip
    return o, lse


@_whole_call
def backward(do, q, k, v, o, lse, layout: Layout, docs: DocumentTable | None = None):
    """``(dq, dk, dv)`` for upstream gradient ``do`` (same shapes and dtypes as q, k, v)."""
    do, q, k, v, o = (last_dim_contiguous(x) for x in (do, q, k, v, o))
    B, H, T, D = q.shape
    G = kv_group(q, k)
    p = plan(layout, q)
    summary, rows, cols = p.tables(q)
    flags = dict(G=G, **_documents(p, T, docs))
    delta = new_output(q, (B, H, T), torch.float32)
    dq, dk, dv = new_output(q), new_output(k), new_output(v)
    strides = _strides(q, k, v, do)
    # dQ first: it computes delta = rowsum(dO * O) of its rows and stores it for dK/dV
    grid, seqs = _grid(q, B, T, H, docs, 0, rows=flags["DOCS"] == 2, stride=p.stride)
    p.dq.run(
        grid, *(q, k, v, do, o, dq, lse, delta), *summary, *seqs, *rows, *strides, *_strides(o, dq),
        *(T, H, p.nb, p.qk_scale, p.sm_scale), **flags,
    )  # fmt: skip
    # dK/dV: one program per key tile and key/value head (fixed: and summary class in its group)
    nsum, nsum_all = _summary_keys(p, T, docs)
    ncls = min(p.vlo[2], G) if nsum else 1
    programs = (H // G) * ncls
    # fixed: the summary keys' float32 partial gradients between the two dK/dV passes
    acc = new_output(q, (B * programs, nsum_all, 2, D), torch.float32) if nsum else stand_ins(dk, 1)[0]
    # the transposed table: per key-block column, its query blocks and their masks
    head = (q, k, v, do, dk, dv, lse, delta, acc, *summary)
    tail = (*cols, *strides, *_strides(dk, dv))
    grid, seqs = _grid(q, B, T, programs, docs, 1, rows=flags["DOCS"] == 2, stride=p.stride)
    p.dkdv.run(grid, *head, *seqs, *tail, *(T, H, p.nb, T, nsum_all, p.qk_scale, p.sm_scale), **flags)
    if nsum:
        grid, seqs = _grid(q, B, T, programs, docs, 1, p.period, p.vsb)
        p.dkdv_summary.run(
            grid, *head, *seqs, *tail, *(T, H, p.nb, nsum_all, nsum_all, p.qk_scale, p.sm_scale), **flags
        )  # fmt: skip
    return dq, dk, dv
