"""Compile the backward kernels of a source tree for sm_90 offline (no GPU needed) and write their
PTX, to compare the code two trees generate when no device is at hand:

    PYTHONPATH=<tree> python scripts/ptx_compare.py OUT_PREFIX fixed|local|strided

writes ``OUT_PREFIX_<kernel>_<i>.ptx`` for the dQ and dK/dV launches of ``launch.backward`` at
16,384 tokens, 8 heads, head_dim 64, fp16 (the launches are captured, not run). Compare two trees'
files with ``diff`` after normalising register numbers."""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as tcompile

import sparse_attention as sa
from sparse_attention.torch.kernels import launch as L

out = sys.argv[1]
captured = []


def fake_run(self, grid_of, *args, **extra):
    kw = dict(self.kw)
    kw.update(extra)
    if "time" in kw:
        T = kw.pop("time")
        kw["TAIL"] = bool(T % kw["BM"] or T % kw["BN"])
    captured.append((self.kernel, args, kw))


L._Kernel.run = fake_run
L.shared_memory_limit = lambda dev: 232448


def tensor_type(t):
    return (
        "*"
        + {
            torch.float16: "fp16",
            torch.bfloat16: "bf16",
            torch.float32: "fp32",
            torch.int32: "i32",
            torch.int64: "i64",
            torch.int8: "i8",
        }[t.dtype]
    )


mode = sys.argv[2]
kw = (
    dict(local_attn_ctx=128, blocksize=32, num_verts=4, vertsize=1)
    if mode == "fixed"
    else dict(local_attn_ctx=128, blocksize=128)
)
lay = sa.make_layout(16384, 8, mode, **kw)
q = torch.randn(1, 8, 16384, 64, dtype=torch.float16)
o = torch.empty_like(q)
lse = torch.empty(1, 8, 16384)
L.backward(q, q, q, q, o, lse, lay)
for idx, (kernel, args, kw) in enumerate(captured):
    names = kernel.arg_names
    sig, const = {}, {}
    pos = dict(zip(names, args))
    for n in names:
        if n in kw:
            sig[n] = "constexpr"
            const[(names.index(n),)] = kw[n]
        else:
            v = pos[n]
            if isinstance(v, torch.Tensor):
                sig[n] = tensor_type(v)
            elif isinstance(v, bool):
                sig[n] = "i1"
            elif isinstance(v, int):
                sig[n] = "i64" if abs(v) >= 2**31 else "i32"
            elif isinstance(v, float):
                sig[n] = "fp32"
    src = ASTSource(fn=kernel, signature=sig, constexprs={names[k[0]]: v for k, v in const.items()})
    opts = {"num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3)}
    ck = tcompile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = ck.asm["ptx"]
    open(f"{out}_{kernel.__name__}_{idx}.ptx", "w").write(ptx)
    print(kernel.__name__, idx, "ptx chars", len(ptx), "shared bytes", getattr(ck.metadata, "shared", "?"))
