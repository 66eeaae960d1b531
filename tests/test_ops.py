"""``blocksparse_attention_bhtd`` and its torch.library ops, on the CPU (block-gather fallback)."""

from __future__ import annotations

import pytest
import torch
from _attn_ref import check_against_reference, compiled_graphs, fwd_bwd, masked_reference, rel_err

from sparse_attention.layouts import make_layout
from sparse_attention.torch import blocksparse_attention_bhtd, register_layout
from sparse_attention.torch.dispatch import layout_spec


def _inputs(lay, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, lay.heads, lay.time, D, generator=g, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("all", {}),
        ("local", dict(local_attn_ctx=32)),
        ("strided", dict(local_attn_ctx=8)),
        ("fixed", dict(local_attn_ctx=32, num_verts=2, vertsize=1)),
    ],
)
def test_fallback_matches_reference(mode, kw):
    lay = make_layout(128, 2, mode, blocksize=16, **kw)
    q, k, v, do = _inputs(lay)
    check_against_reference(lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay), q, k, v, do, mask=lay.to_dense())


def test_compile_fullgraph_matches_eager():
    lay = make_layout(128, 2, "fixed", local_attn_ctx=32, blocksize=16, num_verts=2, vertsize=1)
    q, k, v, do = _inputs(lay, seed=1)

    def f(a, b, c):
        return torch.tanh(blocksparse_attention_bhtd(a, b, c, lay)) * 2

    eager = fwd_bwd(f, q, k, v, do)
    compiled = fwd_bwd(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do)
    for x, r in zip(compiled, eager):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-6)


def test_compile_strided_views():
    # [batch, time, heads * d] split into heads by a view: the op's fake gradients must have the
    # real ones' (contiguous) strides, or the compiled backward breaks
    lay = make_layout(128, 2, "local", local_attn_ctx=32, blocksize=16)
    x = [torch.randn(1, 128, 2 * 16, dtype=torch.float64) for _ in range(4)]

    def f(a, b, c):
        heads = [t.view(1, 128, 2, 16).transpose(1, 2) for t in (a, b, c)]
        return blocksparse_attention_bhtd(*heads, lay).transpose(1, 2).reshape(1, 128, 32)

    eager = fwd_bwd(f, *x)
    compiled = fwd_bwd(torch.compile(f, fullgraph=True, backend="aot_eager"), *x)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_opcheck():
    lay = make_layout(64, 2, "local", local_attn_ctx=16, blocksize=16)
    q, k, v, do = _inputs(lay, seed=2)
    key = layout_spec(lay)
    torch.library.opcheck(torch.ops.sparse_attention.attn_fwd.default, (q, k, v, key, 1))
    o, lse = torch.ops.sparse_attention.attn_fwd(q, k, v, key, 1)
    torch.library.opcheck(torch.ops.sparse_attention.attn_bwd.default, (do, q, k, v, o, lse, key, 1))


def test_errors_name_the_argument():
    lay = make_layout(64, 2, "local", local_attn_ctx=16, blocksize=16)
    q, k, v, _ = _inputs(lay)
    with pytest.raises(ValueError, match="heads=2, time=64"):
        blocksparse_attention_bhtd(q[:, :1], k[:, :1], v[:, :1], lay)
    with pytest.raises(ValueError, match="same shape"):
        blocksparse_attention_bhtd(q, k[..., :8], v, lay)
    with pytest.raises(TypeError, match="Layout"):
        blocksparse_attention_bhtd(q, k, v, "local")
    with pytest.raises(ValueError, match="batch, heads, time, head_dim"):
        blocksparse_attention_bhtd(q[0], k[0], v[0], lay)


def test_compile_custom_layout_registered():
    import numpy as np

    from sparse_attention.layouts import custom_layout

    lay = custom_layout(np.tril(np.ones((4, 4), int)), 16, heads=2)
    register_layout(lay)
    q, k, v, do = _inputs(lay, seed=3)
    f = torch.compile(lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay), fullgraph=True, backend="aot_eager")
    for x, r in zip(
        fwd_bwd(f, q, k, v, do), fwd_bwd(lambda a, b, c: masked_reference(a, b, c, lay.to_dense()), q, k, v, do)
    ):
        assert rel_err(x, r) < 1e-5


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_backward_runs_the_engine_the_forward_ran(monkeypatch, compiled):
    """The engine is chosen once per call: flipping the choice between forward and backward (an
    environment variable, a device policy) must not mix a base-2 log-sum-exp of the fused kernels
    with the gather's natural-log backward. Forward on the fused kernels (interpreted on the CPU),
    then the policy says "gather"; the gradients must still be right."""
    pytest.importorskip("triton")
    import _kernel_env  # noqa: F401  (TRITON_INTERPRET=1 on a CPU-only torch)

    from sparse_attention.torch import dispatch

    if not _kernel_env.INTERPRET:
        pytest.skip("CPU test of the interpreted kernels")
    lay = make_layout(128, 2, "local", local_attn_ctx=32, blocksize=16)
    q, k, v, do = _inputs(lay, seed=4)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    monkeypatch.setattr(dispatch, "use_fused", lambda q, layout: True)
    fn = lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay)  # noqa: E731
    if compiled:  # the custom ops: the engine is an argument of both, fixed when traced
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    o = fn(qs, ks, vs)
    monkeypatch.setattr(dispatch, "use_fused", lambda q, layout: False)
    o.backward(do)
    ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, lay.to_dense()), q, k, v, do)
    for x, r in zip((o.detach(), qs.grad, ks.grad, vs.grad), ref):
        assert rel_err(x, r) < 1e-5


def _op_calls(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "sparse_attention" in str(n.target)]


def test_ops_stay_whole_on_the_gather_engine():
    """The block gather (CPU) keeps its ops opaque under ``torch.compile``: only the fused engine
    on built-in layouts becomes its kernel launches (the GPU suite checks those graphs)."""
    lay = make_layout(64, 2, "local", local_attn_ctx=32, blocksize=16)
    q, k, v = (x.requires_grad_() for x in _inputs(lay)[:3])
    graphs, _ = compiled_graphs(lambda a, b, c: blocksparse_attention_bhtd(a, b, c, lay), q, k, v)
    assert _op_calls(graphs["forward"]) == ["sparse_attention.attn_fwd.default"]
    assert _op_calls(graphs["backward"]) == ["sparse_attention.attn_bwd.default"]


class _InlineOp:
    """An :class:`AttentionOp` over the dense reference whose calls all decompose (as the fused
    engine's do on the GPU), to check the mechanism on the CPU."""

    op = None

    @classmethod
    def get(cls):
        if cls.op is None:
            from sparse_attention.torch import dispatch

            def probs(q, k, lay):  # rows with no key give 0 (none here: strided keeps i == j)
                s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
                return torch.softmax(s.masked_fill(~torch.from_numpy(lay.to_dense()), float("-inf")), -1)

            def pair(index):  # dense attention written out, backward by hand (torch ops only)
                def fwd(q, k, v, lay):
                    return probs(q, k, lay) @ v, q.new_zeros(q.shape[:-1])

                def bwd(do, q, k, v, o, lse, lay):
                    p = probs(q, k, lay)
                    dp = do @ v.transpose(-1, -2)
                    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / q.shape[-1] ** 0.5
                    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do

                return fwd, bwd

            class Op(dispatch.AttentionOp):
                def inlines(self, index, layouts):
                    return True

            cls.op = Op("test_inline", pair)
        return cls.op


def test_inline_ops_decompose_under_compile():
    """An op whose calls decompose (:meth:`AttentionOp.inlines`) leaves no op in the compiled
    graphs, only what its implementation runs, and its forward and gradients equal eager's. The
    choice is made as Dynamo traces the call and is in its graph (the op's engine argument), so
    the compiler's caches cannot hand a process the other choice's compilation."""
    from sparse_attention.torch import dispatch

    op = _InlineOp.get()
    lay = make_layout(64, 2, "strided", local_attn_ctx=8, blocksize=16)
    q, k, v, do = _inputs(lay, dtype=torch.float64)
    f = lambda a, b, c: op(a, b, c, lay)  # noqa: E731
    traced = []

    def backend(gm, inputs):
        traced.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=backend, fullgraph=True)(q, k, v)
    calls = [n for n in traced[0].graph.nodes if "test_inline_fwd" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[-1] >= dispatch.INLINE, traced[0].code
    eager = fwd_bwd(f, q, k, v, do)
    graphs, _ = compiled_graphs(f, *(x.clone().requires_grad_() for x in (q, k, v)))
    assert _op_calls(graphs["forward"]) == [] and _op_calls(graphs["backward"]) == []
    compiled = fwd_bwd(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do)
    for x, r in zip(compiled, eager):
        torch.testing.assert_close(x, r)
    ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, torch.from_numpy(lay.to_dense())), q, k, v, do)
    for x, r in zip(eager, ref):
        torch.testing.assert_close(x, r)


@pytest.mark.parametrize("flag", ["0", "1"])
def test_the_inline_choice_is_in_the_traced_graph(monkeypatch, flag):
    """``SPARSE_ATTENTION_INLINE_LAUNCHES`` is read as Dynamo traces a public call (``fullgraph``:
    no break): on the fused engine and a built-in layout the op's engine argument carries
    ``INLINE`` exactly where the flag is on (the graph is only traced here, not run)."""
    from sparse_attention import blocksparse_attention_impl
    from sparse_attention.torch import dispatch

    monkeypatch.setenv("SPARSE_ATTENTION_INLINE_LAUNCHES", flag)
    from sparse_attention.torch.kernels import launch

    monkeypatch.setattr(dispatch, "choose_engine", lambda q, layout, heads=None: 0)  # as on a GPU,
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # not Triton's interpreter
    traced = []

    def backend(gm, inputs):  # keeps the graph; runs nothing (no kernels on this machine)
        traced.append(gm)
        n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        return lambda *args: [None] * n_out

    q, k, v = (torch.randn(1, 64, 32) for _ in range(3))
    torch._dynamo.reset()
    torch.compile(
        lambda a, b, c: blocksparse_attention_impl(a, b, c, 2, "local", local_attn_ctx=32, blocksize=16),
        backend=backend,
        fullgraph=True,
    )(q, k, v)
    calls = [n for n in traced[0].graph.nodes if "attn_fwd" in str(n.target)]
    assert len(calls) == 1, traced[0].code
    assert calls[0].args[-1] == (dispatch.INLINE if flag == "1" else 0)
    torch._dynamo.reset()


def test_a_compiled_first_call_needs_no_eager_one():
    """``import torch`` then ``import sparse_attention``: the first call of the process may be a
    compiled one (``fullgraph``): the torch backend is loaded at the package's import, since
    ``torch.compile`` cannot trace a module's first import."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import torch
        import sparse_attention as sa

        def f(q, k, v):
            return sa.blocksparse_attention_impl(q, k, v, 2, "local", local_attn_ctx=32, blocksize=16)

        q, k, v = (torch.randn(1, 64, 32, requires_grad=True) for _ in range(3))
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v).sum().backward()
        print("compiled first call ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled first call ok" in r.stdout, r.stderr[-3000:]
