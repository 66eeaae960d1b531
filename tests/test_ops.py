"""``blocksparse_attention_bhtd`` and its torch.library ops, on the CPU (block-gather fallback)."""

from __future__ import annotations

import pytest
import torch
from _attn_ref import check_against_reference, fwd_bwd, masked_reference, rel_err

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
