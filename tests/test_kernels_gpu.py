"""GPU suite of the fused kernels (marker ``gpu``; skipped without CUDA).

Every mode x dtype x blocksize x head_dim (a covering set of combinations), forward and the three
gradients against a float64 reference, with the error budget set by a plain same-dtype PyTorch
computation (at most 2x its error); outputs NaN-poisoned before every launch; custom layouts with
empty rows, per-head layouts and callbacks; bitwise-equal reruns; 64-bit offsets at 1M tokens;
``torch.compile`` with the inductor backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference, compiled_graphs, fwd_bwd, masked_reference, rel_err

from sparse_attention.layouts import custom_layout, from_dense, make_layout

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def launch():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from sparse_attention.torch.kernels import launch as L

    L.POISON_OUTPUTS = True
    yield L
    L.POISON_OUTPUTS = False


DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _layout(mode, T, H, b):
    if mode == "all":
        return make_layout(T, H, "all", blocksize=b)
    if mode == "local":
        return make_layout(T, H, "local", local_attn_ctx=max(2 * b, 128), blocksize=b)
    if mode == "strided":
        return make_layout(T, H, "strided", local_attn_ctx=32, blocksize=b)
    return make_layout(T, H, "fixed", local_attn_ctx=4 * b, blocksize=b, num_verts=2, vertsize=1)


COMBOS = [
    ("fp16", 32, 64),
    ("bf16", 32, 64),
    ("fp32", 32, 64),
    ("fp16", 16, 64),
    ("fp16", 128, 64),
    ("bf16", 64, 128),
    ("fp16", 64, 32),
    ("bf16", 32, 48),
]
PARAMS = [
    pytest.param(m, dt, b, D, id=f"{m}-{dt}-b{b}-D{D}")
    for m in ("all", "local", "strided", "fixed")
    for dt, b, D in COMBOS
]


def _check(launch, lay, D, dtype, B=2, seed=0):
    from sparse_attention.torch.dispatch import EagerAttention

    T, H = lay.time, lay.heads
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).cuda().to(dtype) for _ in range(4))
    mask = torch.from_numpy(lay.to_dense()).cuda()
    fn = lambda a, b, c: EagerAttention.apply(a, b, c, launch.forward, launch.backward, lay)  # noqa: E731
    return check_against_reference(fn, q, k, v, do, mask=mask)


SWEEP = [
    pytest.param(m, dt, b, D, id=f"sweep-{m}-{dt}-b{b}-D{D}")
    for m in ("all", "local", "strided", "fixed")
    for b in (16, 32, 64, 128)
    for D in (16, 32, 48, 64, 80, 96, 128, 160, 192, 256)
    for dt in ("fp16", "bf16", "fp32")
]


@pytest.mark.parametrize("mode, dt, b, D", SWEEP)
def test_every_advertised_shape_runs(launch, mode, dt, b, D):
    """Every mode x blocksize x head_dim x dtype the library advertises runs on the device's
    shared memory (tile configs fitted to it, never a Triton OutOfResources), forward and
    backward, against the float64 reference; float32 above head_dim 128 is refused by the fused
    kernels with a reason (the dispatch then runs the gather path, tested on the CPU). Small
    time: 1024 tokens, 2 heads, batch 1."""
    lay = _layout(mode, 1024, 2, b)
    if DT[dt] == torch.float32 and D > launch.MAX_HEAD_DIM_FP32:  # refused up front: the gather path runs it
        q = torch.empty(1, 2, 1024, D, device="cuda")
        assert any("float32 with head_dim" in r for r in launch.unsupported_reasons(q, lay))
        return
    _check(launch, lay, D, DT[dt], B=1)


@pytest.mark.parametrize("mode, dt, b, D", PARAMS)
def test_modes(launch, mode, dt, b, D):
    _check(launch, _layout(mode, 1024, 4, b), D, DT[dt])


def _custom_cases():
    nb = 16
    lay = np.tril(np.ones((3, nb, nb), int))
    lay[0, 5, :] = 0
    lay[1] = np.eye(nb, dtype=int)
    lay[2, :, 0] = 1

    def cb(shape, h, qi, ki, e):
        if qi == ki:
            return np.arange(shape[0])[:, None] >= np.arange(shape[1])[None, :]
        m = np.random.RandomState(e).rand(*shape) > 0.4
        m[0] = False  # a row with no allowed key inside this block
        return m

    T = 512
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    dense = (j <= i) & ((i - j) % 5 != 2)
    dense[40] = False
    return [
        pytest.param(lambda: custom_layout(lay, 32, callback=cb), id="perhead-callback-emptyrows-b32"),
        pytest.param(lambda: custom_layout(lay, 64), id="perhead-b64"),
        pytest.param(lambda: from_dense(np.stack([dense, dense.T & (i >= j)]), 16), id="fromdense-b16"),
        pytest.param(lambda: custom_layout(np.tril(np.ones((4, 4), int)), 128, heads=2), id="shared-b128"),
    ]


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
@pytest.mark.parametrize("make", _custom_cases())
def test_custom(launch, make, dt):
    lay = make()
    o = _check(launch, lay, 64, DT[dt])[0]
    empty = torch.from_numpy(~lay.to_dense().any(-1)).cuda()
    assert (o[:, empty] == 0).all()


@pytest.mark.parametrize("mode", ["local", "strided", "fixed"])
def test_rerun_bitwise_equal(launch, mode):
    lay = _layout(mode, 4096, 8, 32)
    q, k, v, do = (torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.float16) for _ in range(4))
    runs = []
    for _ in range(3):
        o, lse = launch.forward(q, k, v, lay)
        runs.append([o, *launch.backward(do, q, k, v, o, lse, lay)])
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["local", "strided", "fixed", "custom"])
def test_prebound_launches(launch, mode, monkeypatch):
    """Repeated calls launch the compiled kernels directly (pre-bound): bitwise the JIT's result,
    also inside a CUDA graph (the capture stream), and a misaligned column slice of q (a new
    specialization) still goes through the JIT and is right."""
    from sparse_attention.frontend import broadcast_heads

    T, H, D = 512, 4, 64
    if mode == "custom":
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        lay = broadcast_heads(from_dense((j <= i) & (i - j < 100), 32), H)
    else:
        lay = _layout(mode, T, H, 32)
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, do = (torch.randn(2, H, T, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(4))

    def run():
        o, lse = launch.forward(q, k, v, lay)
        return (o, *launch.backward(do, q, k, v, o, lse, lay))

    monkeypatch.setattr(launch, "PREBOUND", False)
    jit = run()
    monkeypatch.setattr(launch, "PREBOUND", True)
    run()
    p = launch.plan(lay, q)
    assert p.fwd.bound and p.dq.bound and p.dkdv.bound
    for a, b in zip(jit, run()):
        assert torch.equal(a, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(jit, out):
        assert torch.equal(a, b)
    wide = torch.randn(2, H, T, D + 4, device="cuda", dtype=torch.float16, generator=g)
    wide[..., 4:] = q
    q2 = wide[..., 4:]
    assert q2.data_ptr() % 16 == 8
    torch.testing.assert_close(launch.forward(q2, k, v, lay)[0], jit[0], atol=1e-3, rtol=0)


def test_million_tokens_64bit_offsets(launch):
    """B*H*T*D = 2**31 elements: every offset past 2**31 must be 64-bit."""
    T, H, D, L = 1 << 20, 32, 64, 128
    lay = make_layout(T, H, "local", local_attn_ctx=L, blocksize=64)
    q, k, v, do = (torch.randn(1, H, T, D, device="cuda", dtype=torch.float16) for _ in range(4))
    o, lse = launch.forward(q, k, v, lay)
    dq, dk, dv = launch.backward(do, q, k, v, o, lse, lay)
    n = 512
    sl = slice(T - n - L, T)
    small = make_layout(n + L, H, "local", local_attn_ctx=L, blocksize=64)
    mask = torch.from_numpy(small.to_dense()).cuda()
    ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, mask), q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl])
    for x, r in zip((o, dq, dk, dv), ref):
        assert torch.isfinite(x[:, -1]).all()
        assert rel_err(x[:, :, -n:], r[:, :, -n:]) < 5e-3


def test_ops_dispatch_and_compile(launch):
    from sparse_attention.torch import blocksparse_attention_bhtd

    for lay in (_layout("fixed", 2048, 4, 32), _layout("all", 2048, 4, 32)):
        q, k, v, do = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        mask = torch.from_numpy(lay.to_dense()).cuda()
        # the lambdas run inside this iteration, so late binding of lay/mask is harmless
        ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, mask), q, k, v, do)  # noqa: B023
        eager = fwd_bwd(lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay), q, k, v, do)  # noqa: B023
        comp = fwd_bwd(
            torch.compile(
                lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay),  # noqa: B023
                fullgraph=True,
            ),
            q,
            k,
            v,
            do,
        )
        for e, c, r in zip(eager, comp, ref):
            assert rel_err(e, r) < 1e-2
            assert rel_err(c, r) < 1e-2


_VIEWS = ("view", "permute", "transpose", "slice", "select", "as_strided", "expand", "reshape", "unsqueeze", "alias")


def _base(node):
    """The node a chain of view ops starts from."""
    while node.op == "call_function" and any(v in str(node.target) for v in _VIEWS):
        node = node.args[0]
    return node


@pytest.mark.parametrize("mode", ["local", "strided", "fixed", "merged"])
def test_compiled_ops_become_kernel_launches(launch, monkeypatch, mode):
    """Under ``torch.compile`` the ops on built-in layouts become their kernel launches
    (``wrap_triton``), which Inductor emits itself: the graphs AOTAutograd hands the compiler hold
    Triton kernel nodes and no ``sparse_attention`` op, and the only tensors those nodes copy
    (functionalization's clones of what a kernel writes) are fresh outputs, never an input or a
    view of one. Inductor's forward and gradients match the reference; the public
    ``[batch, time, heads * head_dim]`` call (heads as strided views of a packed qkv projection)."""
    from sparse_attention import blocksparse_attention_impl
    from sparse_attention.torch import merged_local_strided_bhtd
    from sparse_attention.torch.reference import merge_heads, split_heads

    monkeypatch.setenv("SPARSE_ATTENTION_INLINE_LAUNCHES", "1")
    B, T, H, D, b = 2, 1024, 4, 64, 32
    kw = dict(local_attn_ctx=128, blocksize=b)
    if mode == "merged":
        loc, st = (make_layout(T, H, m, **kw) for m in ("local", "strided"))
        dense = loc.to_dense() | st.to_dense()

        def f(qkv):
            q, k, v = (split_heads(x, H) for x in qkv.chunk(3, dim=-1))
            return merge_heads(merged_local_strided_bhtd(q, k, v, loc, st))
    else:
        if mode == "fixed":
            kw.update(num_verts=2, vertsize=1)
        dense = make_layout(T, H, mode, **kw).to_dense()

        def f(qkv):
            return blocksparse_attention_impl(*qkv.chunk(3, dim=-1), H, mode, **kw)

    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.float16, requires_grad=True)
    graphs, _ = compiled_graphs(f, qkv)
    for name, gm in graphs.items():
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert not [n for n in nodes if "sparse_attention" in str(n.target)], (name, gm.code)
        kernels = [n for n in nodes if "triton_kernel_wrapper" in str(n.target)]
        assert kernels, (name, gm.code)
        for n in kernels:
            for arg in n.kwargs.get("tensors_to_clone", ()):
                base = _base(n.kwargs["kwargs"][arg])
                assert base.op != "placeholder", (name, arg, gm.code)

    mask = torch.from_numpy(dense).cuda()
    do = torch.randn(B, T, H * D, device="cuda", dtype=torch.float16)

    def ref_fn(q, k, v):
        return merge_heads(masked_reference(*(split_heads(x, H) for x in (q, k, v)), mask))

    q, k, v = (x.detach() for x in qkv.chunk(3, dim=-1))
    ref = fwd_bwd(ref_fn, q, k, v, do)
    torch._dynamo.reset()
    comp = torch.compile(f, fullgraph=True)
    x = qkv.detach().clone().requires_grad_()
    o = comp(x)
    o.backward(do)
    got = [o, *x.grad.chunk(3, dim=-1)]
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-2


@pytest.mark.parametrize(
    "mode,D,dtype",
    [("fixed", 128, torch.float32), ("local", 256, torch.float16), ("strided", 192, torch.bfloat16)],
)
def test_compiled_launches_fit_the_device(launch, monkeypatch, mode, D, dtype):
    """The largest head dims compile inline too (float32 runs the kernels up to head_dim 128):
    Inductor launches the config that the trace loaded on the device (``_Kernel._fit_traced``),
    shrunk where the tuned tiles do not fit, and its output and gradients match float64."""
    from sparse_attention import blocksparse_attention_impl
    from sparse_attention.torch.reference import merge_heads, split_heads

    monkeypatch.setenv("SPARSE_ATTENTION_INLINE_LAUNCHES", "1")
    B, T, H, b = 1, 512, 2, 32
    kw = dict(local_attn_ctx=64, blocksize=b)
    if mode == "fixed":
        kw.update(num_verts=1, vertsize=1)
    mask = torch.from_numpy(make_layout(T, H, mode, **kw).to_dense()).cuda()

    def f(q, k, v):
        return blocksparse_attention_impl(q, k, v, H, mode, **kw)

    def ref_fn(q, k, v):
        return merge_heads(masked_reference(*(split_heads(x, H) for x in (q, k, v)), mask))

    q, k, v, do = (torch.randn(B, T, H * D, device="cuda", dtype=dtype) for _ in range(4))
    graphs, _ = compiled_graphs(f, *(x.clone().requires_grad_() for x in (q, k, v)))
    for name, gm in graphs.items():
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert any("triton_kernel_wrapper" in t for t in targets), (name, gm.code)
        assert not any("sparse_attention" in t for t in targets), (name, gm.code)
    ref = fwd_bwd(ref_fn, q, k, v, do)
    torch._dynamo.reset()
    got = fwd_bwd(torch.compile(f, fullgraph=True), q, k, v, do)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < (2e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("mode", ["local", "strided", "fixed", "custom"])
def test_cuda_graphs_reduce_overhead(launch, mode):
    """``torch.compile(mode="reduce-overhead")`` records the fused kernels in CUDA graphs: a
    layout's first call may be inside the recording (built-in modes allocate no device tables;
    a custom layout's are put on the device by ``register_layout``), and replays match eager."""
    from sparse_attention.torch import blocksparse_attention_bhtd, register_layout

    T, H = 768, 4  # a shape no other test uses: the layout's first fused call is the compiled one
    if mode == "custom":
        qb, kb = np.indices((T // 32, T // 32))
        lay = custom_layout(((kb <= qb) & ((qb - kb) % 3 == 0)).astype(int), 32, heads=H)
        register_layout(lay, "cuda")
    else:
        lay = _layout(mode, T, H, 32)

    def f(a, b, c):
        return blocksparse_attention_bhtd(a, b, c, lay)

    comp = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    q, k, v, do = (torch.randn(2, H, T, 64, device="cuda", dtype=torch.float16) for _ in range(4))
    mask = torch.from_numpy(lay.to_dense()).cuda()
    ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, mask), q, k, v, do)
    for _ in range(3):  # warm-up, recording, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = [x.clone() for x in fwd_bwd(comp, q, k, v, do)]
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-2


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_merged_local_strided_on_the_fused_kernels(launch, dt):
    """Eq. 7's ``local | strided`` head as two fused passes merged by their base-2 log-sum-exps
    (``sparse_attention.torch.merged``), eager and compiled, against the union's reference."""
    from sparse_attention.torch import merged_local_strided_bhtd

    T, H, dtype = 2048, 4, DT[dt]
    loc = make_layout(T, H, "local", local_attn_ctx=128, blocksize=32)
    st = make_layout(T, H, "strided", local_attn_ctx=128, blocksize=32)
    mask = torch.from_numpy(loc.to_dense() | st.to_dense()).cuda()
    q, k, v, do = (torch.randn(2, H, T, 64, device="cuda", dtype=dtype) for _ in range(4))
    ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, mask), q, k, v, do)
    same = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, mask, dtype=dtype), q, k, v, do)

    def f(a, b, c):
        return merged_local_strided_bhtd(a, b, c, loc, st)

    for fn in (f, torch.compile(f, fullgraph=True)):
        for g, r, s in zip(fwd_bwd(fn, q, k, v, do), ref, same):
            assert rel_err(g, r) <= 2 * rel_err(s, r) + 1e-4
