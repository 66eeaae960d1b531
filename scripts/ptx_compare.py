"""Compile the forward and backward kernels of a source tree for sm_90 offline (no GPU needed) and
write their PTX, to compare the code two trees generate when no device is at hand:

    PYTHONPATH=<tree> python scripts/ptx_compare.py OUT_PREFIX --mode fixed

writes ``OUT_PREFIX_<kernel>_<i>.ptx`` for the launches of ``launch.forward`` and
``launch.backward`` at 16,384 tokens (``--n-ctx``), 8 heads, head_dim 64, fp16 (the launches are
captured, not run; the target presets' layouts), each argument specialised as Triton's JIT
specialises it at a launch. ``--against PREFIX`` then compares each file with the same kernel's
file of another run (instructions only: registers, labels, line and debug records normalised
away), e.g. before and after a change to the kernels' source that should compile to the same
code.
"""

from __future__ import annotations

import collections
import os
import re

from sparse_attention.utils.benchmark import script_parser


def capture(mode: str, time: int = 16384, documents: bool = False, doc_rows: bool = False, causal: bool = True):
    """``[(kernel, args, constexprs)]`` of ``launch.forward`` and ``launch.backward`` for ``mode``'s
    target preset; ``documents``: the tokens packed as three documents of unequal lengths (with
    ``doc_rows``, ``launch.DOC_ROWS``); ``causal=False``: the bidirectional pattern."""
    import torch

    import sparse_attention as sa
    from sparse_attention.patterns import preset
    from sparse_attention.torch.kernels import launch as L

    captured = []

    def fake_run(self, grid_of, *args, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        args = L._per_tile(args, kw)  # documents' work lists, made for the tiles
        if "time" in kw:  # trees with tail tiles: the flag the launch would set
            T = kw.pop("time")
            kw["TAIL"] = bool(T % kw["BM"] or T % kw["BN"])
        captured.append((self.kernel, args, kw))

    L._Kernel.run = fake_run
    L.shared_memory_limit = lambda device: 232448  # the H100's / H200's
    if mode == "custom":  # a band of 3 blocks of 64 per row, causal inside the diagonal blocks
        import numpy as np

        nb = time // 64
        band = np.tril(np.ones((nb, nb), dtype=int)) - np.tril(np.ones((nb, nb), dtype=int), -3)
        lay = sa.layouts.custom_layout(
            band, 64, lambda s, h, i, j, n: np.tril(np.ones(s, bool)) if i == j else np.ones(s, bool), heads=8
        )
    else:
        lay = sa.make_layout(time, 8, **preset(mode).kwargs(), causal=causal)
    L.DOC_ROWS = doc_rows
    docs = None
    if documents:
        import numpy as np

        docs = L.documents(np.array([0, time // 2 - 7, 3 * time // 4, time], dtype=np.int64), "cpu")
    q = torch.randn(1, 8, time, 64, dtype=torch.float16)
    L.forward(q, q, q, lay, docs)
    L.backward(q, q, q, q, torch.empty_like(q), torch.empty(1, 8, time), lay, docs)
    return captured


def compile_ptx(kernel, args, kw) -> str:
    """``kernel``'s sm_90 PTX for these arguments, specialised as Triton's JIT does at a launch
    (integers equal to 1 as constants, integers and pointers divisible by 16 marked so, except
    the kernel's ``do_not_specialize`` arguments): without that the loads are not vectorised."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    names = kernel.arg_names
    given = dict(zip([n for n in names if n not in kw], args))
    sig, const, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in kw:
            sig[n], const[n] = "constexpr", kw[n]
            continue
        ty, attr = native_specialize_impl(CUDABackend, given[n], False, n not in kernel.do_not_specialize, True)
        if ty == "constexpr":  # an integer equal to 1
            sig[n], const[n] = ty, attr
            continue
        sig[n] = ty
        if attr:
            attrs[(i,)] = backend.parse_attr(attr)
    opts = {"num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3)}
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton_compile(src, target=target, options=opts).asm["ptx"]


def instructions(ptx: str) -> list[str]:
    """The instructions and directives of ``ptx`` without what a refactor moves: register
    numbers, labels, line records and debug information."""
    out = []
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith((".loc", ".file", "//", "$L__", ".section", ".b8")) or "// DW_AT" in s:
            continue
        if "Length of Unit" in s or "debug" in s:
            continue
        out.append(re.sub(r"\$L__\w+", "L", re.sub(r"%[a-z]+\d+", "%R", s)))
    return out


def compare(a: str, b: str) -> str:
    """``identical``, or how the instruction mix of PTX ``b`` differs from ``a``'s."""
    x, y = instructions(a), instructions(b)
    if x == y:
        return f"identical ({len(x)} lines)"
    mix = collections.Counter(s.split()[0] for s in y)
    mix.subtract(collections.Counter(s.split()[0] for s in x))
    return f"differs ({len(x)} -> {len(y)} lines; opcode counts {dict((k, v) for k, v in mix.items() if v)})"


def main(argv=None):
    ap = script_parser(__doc__)
    ap.add_argument("out", help="prefix of the PTX files to write")
    ap.add_argument("--mode", default="fixed", choices=["all", "local", "strided", "fixed", "custom"])
    ap.add_argument("--against", help="prefix of an earlier run's files: compare each kernel's PTX with it")
    ap.add_argument("--documents", action="store_true", help="the tokens as three packed documents")
    ap.add_argument("--doc-rows", action="store_true", help="with --documents: launch.DOC_ROWS (all, local)")
    ap.add_argument("--bidirectional", action="store_true", help="causal=False")
    ap.add_argument("--n-ctx", type=int, default=16384, help="tokens (one the tiles do not divide: the tail masks)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
    launches = capture(args.mode, args.n_ctx, args.documents, args.doc_rows, not args.bidirectional)
    for i, (kernel, kargs, kw) in enumerate(launches):
        ptx = compile_ptx(kernel, kargs, kw)
        path = f"{args.out}_{kernel.__name__}_{i}.ptx"
        with open(path, "w") as fh:
            fh.write(ptx)
        print(f"wrote {path} ({len(ptx)} characters)")
        if args.against:
            with open(f"{args.against}_{kernel.__name__}_{i}.ptx") as fh:
                print(f"  against {args.against}: {compare(fh.read(), ptx)}")


if __name__ == "__main__":
    main()
