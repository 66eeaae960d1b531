"""Compile the backward kernels of a source tree for sm_90 offline (no GPU needed) and write their
PTX, to compare the code two trees generate when no device is at hand:

    PYTHONPATH=<tree> python scripts/ptx_compare.py OUT_PREFIX --mode fixed

writes ``OUT_PREFIX_<kernel>_<i>.ptx`` for the dQ and dK/dV launches of ``launch.backward`` at
16,384 tokens, 8 heads, head_dim 64, fp16 (the launches are captured, not run; the target presets'
layouts). Compare two trees' files with ``diff`` after normalising register numbers.
"""

from __future__ import annotations

import os

from sparse_attention.utils.benchmark import script_parser

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32", "int64": "i64", "int8": "i8"}


def capture(mode: str) -> list:
    """``[(kernel, args, constexprs)]`` of ``launch.backward`` for ``mode``'s target preset."""
    import torch

    import sparse_attention as sa
    from sparse_attention.patterns import preset
    from sparse_attention.torch.kernels import launch as L

    captured = []

    def fake_run(self, grid_of, *args, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        if "time" in kw:  # trees with tail tiles: the flag the launch would set
            T = kw.pop("time")
            kw["TAIL"] = bool(T % kw["BM"] or T % kw["BN"])
        captured.append((self.kernel, args, kw))

    L._Kernel.run = fake_run
    L.shared_memory_limit = lambda device: 232448  # the H100's / H200's
    lay = sa.make_layout(16384, 8, **preset(mode).kwargs())
    q = torch.randn(1, 8, 16384, 64, dtype=torch.float16)
    L.backward(q, q, q, q, torch.empty_like(q), torch.empty(1, 8, 16384), lay)
    return captured


def compile_ptx(kernel, args, kw) -> str:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    names = kernel.arg_names
    given = dict(zip([n for n in names if n not in kw], args))
    sig, const = {}, {}
    for n in names:
        if n in kw:
            sig[n], const[n] = "constexpr", kw[n]
        elif isinstance(given[n], torch.Tensor):
            sig[n] = "*" + DTYPES[str(given[n].dtype).replace("torch.", "")]
        elif isinstance(given[n], bool):
            sig[n] = "i1"
        elif isinstance(given[n], int):
            sig[n] = "i64" if abs(given[n]) >= 2**31 else "i32"
        else:
            sig[n] = "fp32"
    opts = {"num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3)}
    src = ASTSource(fn=kernel, signature=sig, constexprs=const)
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]


def main(argv=None):
    ap = script_parser(__doc__)
    ap.add_argument("out", help="prefix of the PTX files to write")
    ap.add_argument("--mode", default="fixed", choices=["all", "local", "strided", "fixed"])
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
    for i, (kernel, kargs, kw) in enumerate(capture(args.mode)):
        ptx = compile_ptx(kernel, kargs, kw)
        path = f"{args.out}_{kernel.__name__}_{i}.ptx"
        with open(path, "w") as fh:
            fh.write(ptx)
        print(f"wrote {path} ({len(ptx)} characters)")


if __name__ == "__main__":
    main()
