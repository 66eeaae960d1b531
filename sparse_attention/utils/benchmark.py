"""What the scripts share: timers, the allowed-pair count of a layout, FlexAttention's forms of a
preset, the environment record of a results file and the argparse helpers (one spelling of each
flag, one ``--device``, one ``--dtype``).

Only the scripts (``scripts/``, ``attention.py``) import this module, never the library. torch is
imported inside the functions that need it: ``attention.py --framework tf`` runs without it.

Timers of a call ``fn()``:

* :func:`timeit`: median milliseconds of single calls, CUDA events around each (what a caller of
  one call sees: host and GPU time); ``perf_counter`` off the GPU;
* :func:`graph_ms`: one replay of the call captured in a CUDA graph (GPU time alone);
* :func:`host_us`: host microseconds per call, from many calls without synchronising;
* :func:`gpu_us`: the kernels' summed durations per call (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..patterns import Group, Preset, Spec
from ..tables import partial_entries

# -- argparse helpers ------------------------------------------------------------------------------

# The --dtype names and the frameworks' names of them.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# One spelling per model argument (its first flag); the other flags are aliases, kept because
# commands in README.md and in the checked-in benchmark logs use them.
MODEL_ARGS = {
    "batch": (("--batch", "--batch-size"), int, "sequences per batch"),
    "n_ctx": (("--n-ctx", "--time"), int, "tokens per sequence (the attention's time)"),
    "n_head": (("--n-head", "--heads"), int, "attention heads"),
    "head_dim": (("--head-dim",), int, "channels per head"),
    "d_model": (("--d-model", "--dim"), int, "model width (n_head * head_dim)"),
    "n_layer": (("--n-layer", "--layers"), int, "residual blocks"),
    "blocksize": (("--blocksize",), int, "layout block size (16, 32, 64, 128)"),
    "stride": (("--stride",), int, "the paper's l: the stride of strided, the group length of fixed"),
    "c": (("--c",), int, "fixed: summary tokens per group, a multiple of --blocksize"),
}


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is the script's docstring, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(parser: argparse.ArgumentParser, help: dict | None = None, **defaults) -> None:
    """Add the model arguments named by ``defaults`` (keys of :data:`MODEL_ARGS`, e.g.
    ``n_head=8``) with their one spelling, aliases and type; ``help`` replaces texts by name.

    >>> p = script_parser(None)
    >>> add_model_args(p, n_head=8, n_ctx=1024)
    >>> p.parse_args(["--heads", "4"])
    Namespace(n_head=4, n_ctx=1024)
    """
    for name, default in defaults.items():
        if name not in MODEL_ARGS:
            raise ValueError(f"add_model_args: unknown argument {name!r}; choose from {list(MODEL_ARGS)}")
        flags, kind, text = MODEL_ARGS[name]
        text = (help or {}).get(name, text)
        parser.add_argument(*flags, dest=name, type=kind, default=default, help=f"{text} (default: %(default)s)")


def default_device() -> str:
    """``"cuda"`` where a GPU is visible, else ``"cpu"`` (PyTorch's view; TensorFlow's without torch)."""
    try:
        import torch
    except ImportError:
        try:
            import tensorflow as tf
        except ImportError:
            return "cpu"
        return "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arg(parser: argparse.ArgumentParser, default: str | None = "auto", help: str | None = None) -> None:
    """``--device`` (cpu, cuda, cuda:1, ...); by default :func:`default_device`."""
    if default == "auto":
        default = default_device()
    text = help or "cpu, cuda, cuda:1, ... (default: %(default)s, the GPU if there is one)"
    parser.add_argument("--device", default=default, help=text)


def dtype_name(text: str) -> str:
    """argparse type of ``--dtype``: ``fp32``, ``fp16``, ``bf16`` (``float32``, ``float16``,
    ``bfloat16`` accepted)."""
    if text in DTYPES:
        return text
    for short, long in DTYPES.items():
        if text == long:
            return short
    raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")


class _PositionalDtype(argparse.Action):
    """The optional positional dtype of ``attention.py`` (``python attention.py fp16``): sets
    ``dtype`` when given, leaves ``--dtype``'s value otherwise."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None:
            namespace.dtype = values


def add_dtype_arg(
    parser: argparse.ArgumentParser,
    default: str = "fp32",
    help: str | None = None,
    positional: bool = False,
    aliases: tuple = (),
) -> None:
    """``--dtype`` with the choices of :data:`DTYPES` (``aliases``: older spellings of the flag);
    ``positional`` also takes it as an optional first positional argument."""
    text = help or "dtype of the inputs"
    kinds = dict(type=dtype_name, choices=list(DTYPES))
    parser.add_argument(
        "--dtype", *aliases, dest="dtype", default=default, help=f"{text} (default: %(default)s)", **kinds
    )
    if positional:
        how = "the same as --dtype (as in `python attention.py fp16`)"
        parser.add_argument("dtype_arg", nargs="?", action=_PositionalDtype, metavar="DTYPE", help=how, **kinds)


def comma_list(item=str, choices=None, what: str = "value"):
    """argparse type of a comma-separated list (``--modes local,fixed``, ``--times 4096,16384``)."""

    def parse(text: str) -> list:
        out = []
        for s in (x.strip() for x in text.split(",")):
            if not s:
                continue
            try:
                v = item(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what} {s!r} is not a valid {item.__name__}") from None
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {s!r}; choose from {','.join(map(str, choices))}")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError(f"give at least one {what}")
        return out

    return parse


def add_modes_arg(parser: argparse.ArgumentParser, default: str = "all,local,strided,fixed") -> None:
    """``--modes``: a comma-separated subset of the built-in modes, parsed to a list."""
    from ..layouts import MODES

    parser.add_argument(
        "--modes",
        type=comma_list(str, MODES, "mode"),
        default=default,
        help=f"comma-separated subset of {','.join(MODES)} (default: %(default)s)",
    )


def attention_parser(
    doc: str | None,
    modes: str = "all,local,strided,fixed",
    dtype: str = "fp32",
    device: bool = True,
    positional_dtype: bool = False,
    **model,
) -> argparse.ArgumentParser:
    """The parser of a script that runs the attention at one shape: ``--dtype`` (also positional:
    ``positional_dtype``), the model arguments ``model`` (:func:`add_model_args`), ``--modes`` and
    (``device``) ``--device``."""
    parser = script_parser(doc)
    add_dtype_arg(parser, dtype, positional=positional_dtype)
    add_model_args(parser, **model)
    add_modes_arg(parser, modes)
    if device:
        add_device_arg(parser)
    return parser


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def add_compile_args(parser: argparse.ArgumentParser, default: bool) -> None:
    """``--compile`` / ``--no-compile`` (``torch.compile`` the model, on by ``default``) and ``--compile-mode``."""
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=default, help="torch.compile the model"
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="with --compile: reduce-overhead replays CUDA graphs (no per-kernel host time; about 2x per step "
        "at 12,288 tokens on an H100, benchmarks/train_h100_graphs)",
    )


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name."""
    import torch

    return getattr(torch, DTYPES[name])


def autocast(device, dtype: str):
    """``torch.autocast`` to ``dtype`` (a ``--dtype`` name) on ``device``'s type; fp32: disabled."""
    import torch

    kind = torch.device(device).type
    if dtype == "fp32":
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=torch_dtype(dtype))


# -- timers ------------------------------------------------------------------------------------------


def is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def synchronize(device="cuda") -> None:
    """Wait for the device's queued work (nothing to wait for off the GPU)."""
    import torch

    if is_cuda(device):
        torch.cuda.synchronize(device)


def call_ms(fn, reps: int = 1, device="cuda", host: list | None = None) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``, synchronised after each: CUDA events
    around the call on a GPU, ``perf_counter`` elsewhere. ``host``: a list that receives each
    call's host milliseconds (until ``fn`` returns, the GPU idle at its start, so nothing waits
    for it unless ``fn`` synchronises): where it is close to the call's time, the call is
    host-bound."""
    out = []
    if is_cuda(device):
        import torch

        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            s.record()
            t = time.perf_counter()
            fn()
            t = time.perf_counter() - t
            e.record()
            torch.cuda.synchronize(device)
            out.append(s.elapsed_time(e))
            if host is not None:
                host.append(t * 1e3)
        return out
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
        if host is not None:
            host.append(out[-1])
    return out


def median(xs) -> float:
    """The middle value (the upper one of an even count)."""
    return sorted(xs)[len(xs) // 2]


def timeit(fn, budget_s: float = 1.0, max_reps: int = 100, device="cuda") -> float:
    """Median milliseconds of one call of ``fn`` (:func:`call_ms`): one warm-up call, then as
    many repeats (3 to ``max_reps``) as fit ``budget_s`` seconds."""
    fn()
    synchronize(device)
    est = call_ms(fn, 1, device)[0]
    reps = max(3, min(max_reps, int(budget_s * 1e3 / max(est, 1e-3))))
    return median(call_ms(fn, reps, device))


def graph_ms(fn, reps: int = 30) -> float:
    """Median milliseconds of one CUDA-graph replay of ``fn``: GPU time alone, without the host
    work of the call (which, for short kernels on a slow host, :func:`timeit` measures instead)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return timeit(g.replay, max_reps=reps, budget_s=0.1)


def host_us(fn, reps: int = 50, device="cuda") -> float:
    """Host microseconds per call of ``fn``, from ``reps`` calls without synchronising (the GPU
    catches up afterwards)."""
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = time.perf_counter() - t
    synchronize(device)
    return dt / reps * 1e6


def host_us_interleaved(fns: dict, reps: int = 200, device="cuda") -> dict:
    """Median host microseconds of one call of each of ``fns`` (name -> callable): calls timed one
    at a time with the device idle before each (no queue-full stalls), the callables taking turns
    in a rotating order, so that a slow spell of a shared host hits them all alike."""
    names = list(fns)
    samples: dict = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            synchronize(device)
            t = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t) * 1e6)
    synchronize(device)
    return {n: median(s) for n, s in samples.items()}


def gpu_us(fn, reps: int = 10, top: int = 6) -> tuple[float, dict]:
    """GPU microseconds per call of ``fn`` (the kernels' durations summed, ``torch.profiler``) and
    the ``top`` kernels' microseconds per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    tot, names = 0.0, {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.time_range.elapsed_us()
            tot += us
            names[ev.name] = names.get(ev.name, 0.0) + us / reps
    ranked = sorted(names.items(), key=lambda x: -x[1])[:top]
    return tot / reps, {k[:60]: round(v, 1) for k, v in ranked}


def _proc_status() -> dict:
    """The sizes in ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes; empty off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in lines if line.endswith(" kB"))
    return {key: int(value.split()[0]) * 1024 for key, value in fields}


class PeakMemory:
    """Peak memory growth over a ``with`` block, in bytes (``.peak``): on a GPU the allocator's
    peak above what was allocated at entry; elsewhere the growth of the process's peak resident
    memory (Linux: the high-water mark is reset at entry; ``None`` where it cannot be read)."""

    def __init__(self, device="cuda"):
        self.device = device
        self.peak = None

    def __enter__(self):
        self.cuda = is_cuda(self.device)
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident memory
            self.base = _proc_status().get("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            hwm = _proc_status().get("VmHWM")
            self.peak = None if hwm is None else hwm - self.base
        return False


def peak_mem_mib(fn, device="cuda") -> float | None:
    """Peak memory of one call of ``fn`` beyond what was allocated before it, in MiB (:class:`PeakMemory`)."""
    with PeakMemory(device) as m:
        fn()
    return None if m.peak is None else m.peak / 2**20


def fwd_and_fb(f, q, k, v, do):
    """Two calls to time for an attention ``f(q, k, v)``: the forward without autograd, and the
    forward plus the backward of ``do`` (inputs that require grad, gradients reset each call)."""
    import torch

    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            f(q, k, v)

    def fb():
        for x in (qs, ks, vs):
            x.grad = None
        f(qs, ks, vs).backward(do)

    return fwd, fb


def fwd_fb_ms(f, q, k, v, do, device, budget_s: float = 0.5) -> dict:
    """Milliseconds of :func:`fwd_and_fb`'s two calls of ``f``: events (``fwd_ms``, ``fb_ms``) and,
    on CUDA, GPU time of CUDA-graph replays (``fwd_gpu_ms``, ``fb_gpu_ms``); a call that fails
    (or cannot be captured) leaves ``<name>_error`` instead."""
    import torch

    out = {}
    for name, fn in zip(("fwd", "fb"), fwd_and_fb(f, q, k, v, do)):
        try:
            out[f"{name}_ms"] = timeit(fn, budget_s=budget_s, device=device)
            if torch.device(device).type == "cuda":
                out[f"{name}_gpu_ms"] = graph_ms(fn)
        except Exception as e:
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def write_results(out: str | None, stem: str, rec: dict, table: str) -> None:
    """``<out>/<stem>.json`` (the record) and ``<out>/<stem>.md`` (device, versions, date, the
    command, the table); nothing without ``out``."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as fh:
        json.dump(rec, fh, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as fh:
        fh.write(f"{rec['device']}, torch {rec['torch']}, triton {rec['triton']}, {rec['date']}\n\n")
        fh.write(f"`{rec['command']}`\n\n{table}\n")


# -- what a pattern costs, and FlexAttention's forms of it ---------------------------------------


def allowed_pairs(layout) -> int:
    """Allowed ``(query, key)`` pairs of a layout, summed over its heads: the pairs of the FLOP count.

    Read from the layout, not from a formula: ``blocksize**2`` per full enabled block and the sum
    of the in-block mask of each partial one (``layout.partial``, ``layout.entry_masks``). Fast at
    a million tokens: a built-in layout is read in its structured form, whose shared prefix
    (``fixed``'s summary blocks of the earlier groups, wholly below the diagonal) is full blocks,
    counted without listing them; partial blocks that repeat along the pattern's period
    (:func:`period_blocks`) share one evaluation of their mask.
    """
    b = layout.blocksize
    if not layout.structured:
        heads = np.bincount(layout.head_pattern, minlength=layout.n_patterns)
        per_entry = np.full(layout.nnz, b * b, np.int64)
        partial = layout.partial
        if partial.any():
            per_entry[partial] = layout.block_masks.sum(axis=(1, 2))[layout.mask_idx[partial]]
        return int((per_entry * np.repeat(heads, layout.row_counts().sum(axis=1))).sum())
    total = 0
    for p in range(layout.n_patterns):
        lo = layout.row_lo[p].astype(np.int64)
        width = np.maximum(layout.row_hi[p].astype(np.int64) - lo + 1, 0)
        rows = np.repeat(np.arange(layout.nb, dtype=np.int64), width)
        start = np.repeat(np.cumsum(width) - width, width)
        cols = np.repeat(lo, width) + np.arange(len(rows)) - start
        partial = partial_entries(layout, rows, cols)
        n_full = int(layout.prefix_len[p].sum()) + int((~partial).sum())
        pairs = n_full * b * b + _partial_pairs(layout, p, rows[partial], cols[partial])
        total += pairs * len(layout.heads_of(p))
    return total


def period_blocks(layout) -> int:
    """Moving a query block and a key block of a built-in layout both by this many blocks keeps
    their in-block mask: ``all`` and ``local`` depend on ``i - j`` only, ``fixed`` repeats every
    group of ``l`` tokens, and in ``strided``'s residue-major order ``time / l`` positions on are
    the next tokens (``i + 1``, ``j + 1``: the same ``i - j``)."""
    b, ctx = layout.blocksize, layout.params.get("local_attn_ctx")
    if layout.mode == "fixed":
        return ctx // b
    if layout.mode == "strided":
        return math.lcm(layout.time // ctx, b) // b
    return 1


def _partial_pairs(layout, pattern: int, rows, cols, chunk: int = 256) -> int:
    """Summed in-block masks of the partial blocks ``(rows, cols)`` of one head pattern."""
    if not len(rows):
        return 0
    q = period_blocks(layout)
    _, first, inverse = np.unique((rows - cols) * q + rows % q, return_index=True, return_inverse=True)
    sums = np.concatenate(
        [
            layout.entry_masks(pattern, rows[first[a : a + chunk]], cols[first[a : a + chunk]]).sum(axis=(1, 2))
            for a in range(0, len(first), chunk)
        ]
    )
    return int(sums[inverse.reshape(-1)].sum())


def flex_forms(preset: Preset, time: int) -> list[tuple[str, Spec, np.ndarray | None]]:
    """FlexAttention's forms of a preset: ``[(name, spec, perm)]``, the spec to give
    :func:`sparse_attention.torch.baselines.flex_block_mask` and the token order of q, k, v
    (``perm[p]``: the token at position ``p``; ``None``: natural order).

    ``strided`` also runs transposed, in its residue-major order (the layout's ``perm``), where it
    is causal attention inside segments of ``time / l`` positions: ``Group(time // l)``.
    """
    forms = [("flex", preset.spec, None)]
    if preset.mode == "strided":
        forms.append(("flex-transposed", Group(time // preset.spec.local_attn_ctx), preset.layout(time, 1).perm))
    return forms


# -- the environment record of a results file ------------------------------------------------------


def command_line(argv=None, script: str | None = None) -> str:
    """The command that ran, to paste into a shell: ``sys.argv``, or ``script`` with ``argv`` for
    a ``main(argv)`` called in-process (paths inside the working directory made relative)."""
    words = list(sys.argv) if argv is None else [script or sys.argv[0], *argv]
    path = Path(words[0])
    if path.is_absolute():
        try:
            words[0] = str(path.relative_to(Path.cwd()))
        except ValueError:
            pass
    return "python " + shlex.join(words)


def git_commit() -> str:
    """``HEAD`` of the checkout the scripts run from (``-dirty`` with uncommitted changes to tracked
    files); ``$BENCH_COMMIT`` or ``"unknown"`` for a copied tree without history."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        if re.fullmatch(r"[0-9a-f]{7,40}", head):
            return head + ("-dirty" if git("diff", "--quiet", "HEAD", "--").returncode else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BENCH_COMMIT", "unknown")


def environment(device=None, argv=None, script: str | None = None) -> dict:
    """What a results file records of the run: the device's name, the torch, triton, CUDA, cuDNN
    and Python versions, the date (UTC), the commit and the exact command line."""
    import torch

    dev = torch.device(device if device is not None else default_device())
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": command_line(argv, script),
    }
