"""Compare the block-sparse path with the dense reference on every mode (the original's script).

    python attention.py          # float32
    python attention.py fp16     # float16 (bf16 also accepted)
    python attention.py --n-ctx 4096 --n-head 8 --dtype bf16 --modes local,fixed
    python attention.py --help   # sizes, device, modes, blocksize, framework

For each mode it checks the forward output and the gradients of q, k and v of both paths against
a float64 dense reference on the same random inputs, prints the errors, the forward time and the
peak memory of each path, and PASS/FAIL; it exits with status 1 on any FAIL. A path passes when
its error is at most twice the dense same-dtype path's error plus a small floor (the rule of
flash-attention's tests). Uses the GPU when there is one. The patterns are the original
script's (``sparse_attention.patterns.PRESETS["original"]``) at ``--blocksize``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from sparse_attention import attention_impl, blocksparse_attention_impl
from sparse_attention.patterns import PRESETS, preset
from sparse_attention.utils.benchmark import DTYPES, PeakMemory, add_device_arg, attention_parser, call_ms, median

FLOOR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


class TorchRunner:
    name = "torch"

    def __init__(self, device: str | None):
        import torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def describe(self) -> str:
        t = self.torch
        dev = t.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return f"PyTorch {t.__version__} on {dev}"

    def tensor(self, x: np.ndarray, dtype: str, grad: bool = True):
        t = self.torch.tensor(x, device=self.device).to(getattr(self.torch, dtype))
        return t.requires_grad_(grad)

    def numpy(self, x) -> np.ndarray:
        return x.detach().to(self.torch.float64).cpu().numpy()

    def forward_backward(self, fn, q, k, v, dout):
        out = fn(q, k, v)
        grads = self.torch.autograd.grad(out, (q, k, v), dout)
        return self.numpy(out), [self.numpy(g) for g in grads]

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def time_forward(self, fn, q, k, v, reps: int) -> float:
        """Median milliseconds of a forward pass (one warm-up call first)."""
        with self.torch.no_grad():
            fn(q, k, v)
            self.sync()
            return median(call_ms(lambda: fn(q, k, v), reps, self.device))

    def peak_memory(self, fn, q, k, v, dout) -> int | None:
        """Peak memory of one forward + backward, in bytes (device memory on CUDA, RSS on CPU)."""
        with PeakMemory(self.device) as m:
            self.forward_backward(fn, q, k, v, dout)
        return m.peak


def make_runner(framework: str, device: str | None):
    if framework == "torch":
        return TorchRunner(device)
    if framework == "tf":
        try:
            from sparse_attention.tensorflow.runner import TFRunner
        except ImportError as e:
            raise SystemExit(f"--framework tf needs TensorFlow and sparse_attention.tensorflow: {e}") from e
        return TFRunner(device)
    raise SystemExit(f"unknown --framework {framework!r}; use torch or tf")


def default_framework() -> str:
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return "torch"
    if importlib.util.find_spec("tensorflow") is not None:
        return "tf"
    raise SystemExit("neither torch nor tensorflow is installed: pip install 'sparse-attention[torch]'")


def rel_err(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    abs_err = float(np.max(np.abs(a - ref)))
    return abs_err, float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def fmt_mem(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def main(argv=None) -> int:
    modes = ",".join(PRESETS["original"])
    sizes = dict(batch=4, n_ctx=1024, d_model=256, n_head=4, blocksize=32)
    ap = attention_parser(__doc__, modes, device=False, positional_dtype=True, **sizes)
    add_device_arg(ap, default=None, help="cpu, cuda, cuda:1, ... (default: the GPU if the framework sees one)")
    ap.add_argument("--framework", default=None, choices=["torch", "tf"], help="default: torch if installed")
    ap.add_argument("--reps", type=int, default=5, help="timed forward passes per path (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    modes = args.modes

    runner = make_runner(args.framework or default_framework(), args.device)
    print(
        f"{runner.describe()}; batch {args.batch}, time {args.n_ctx}, dim {args.d_model}, heads {args.n_head}, "
        f"blocksize {args.blocksize}, {dtype}"
    )
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.n_ctx, args.d_model)
    failed = []
    header = f"{'mode':8} {'path':11} {'out err abs/rel':>20} {'grad rel':>10} {'fwd ms':>8} {'peak mem':>11}  result"
    print(header)
    print("-" * len(header))
    for mode in modes:
        kw = dict(preset(mode, "original", blocksize=args.blocksize).kwargs(), heads=args.n_head)
        x64 = [rng.standard_normal(shape) for _ in range(3)]
        dout64 = rng.standard_normal(shape)
        if dtype != "float32":
            # the reference sees the very values the half-precision paths see
            x64 = [runner.numpy(runner.tensor(x, dtype, grad=False)) for x in x64]
        q64, k64, v64 = (runner.tensor(x, "float64") for x in x64)
        dense = lambda q, k, v, kw=kw: attention_impl(q, k, v, **kw)  # noqa: E731
        sparse = lambda q, k, v, kw=kw: blocksparse_attention_impl(q, k, v, **kw)  # noqa: E731
        ref_out, ref_grads = runner.forward_backward(dense, q64, k64, v64, runner.tensor(dout64, "float64", False))
        q, k, v = (runner.tensor(x, dtype) for x in x64)
        dout = runner.tensor(dout64, dtype, grad=False)
        paths = {"dense": dense, "blocksparse": sparse}
        errs = {}
        for name, fn in paths.items():
            out, grads = runner.forward_backward(fn, q, k, v, dout)
            oa, orel = rel_err(out, ref_out)
            grel = max(rel_err(g, r)[1] for g, r in zip(grads, ref_grads))
            finite = bool(np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads))
            errs[name] = (orel, grel, finite)
            ms = runner.time_forward(fn, q, k, v, args.reps)
            mem = runner.peak_memory(fn, q, k, v, dout)
            result = ""
            if name == "blocksparse":
                d_orel, d_grel, _ = errs["dense"]
                ok = finite and orel <= 2 * d_orel + FLOOR[dtype] and grel <= 2 * d_grel + FLOOR[dtype]
                result = "PASS" if ok else "FAIL"
                if not ok:
                    failed.append(mode)
            print(f"{mode:8} {name:11} {oa:9.2e}/{orel:9.2e} {grel:10.2e} {ms:8.2f} {fmt_mem(mem):>11}  {result}")
    print("-" * len(header))
    if failed:
        print(f"FAIL: {', '.join(failed)}")
        return 1
    print(f"PASS: all {len(modes)} modes agree with the dense reference")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
