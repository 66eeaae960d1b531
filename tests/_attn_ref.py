"""The one harness of the torch tests: a fast path's output and its three gradients against a
float64 reference, within twice the error of a plain same-dtype computation (flash-attention's
rule) plus a small floor. References are the library's dense ``masked_attention`` under the mask
of the very layout the fast path consumes (or the dense front end ``attention_impl``)."""

from __future__ import annotations

import torch

from sparse_attention.torch.reference import masked_attention

# Floors: against the dense front end (whose same-dtype run is already float32 inside) the old
# front-end tests' floors; against a plain same-dtype masked computation the old kernel tests' 1e-4
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
MASK_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def masked_reference(q, k, v, mask, dtype=torch.float64):
    """Dense masked attention of ``[B, H, T, D]`` computed in ``dtype`` (rows with no key give 0)."""
    return masked_attention(q, k, v, mask, dtype=dtype).to(dtype)


def fwd_bwd(fn, q, k, v, do):
    """Output and the three gradients of ``fn`` at ``q, k, v`` with upstream gradient ``do``."""
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(qs, ks, vs)
    o.backward(do.to(o.dtype))
    return [o.detach(), qs.grad, ks.grad, vs.grad]


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_err(a, b) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude where that is
    above 1 (so that an all-zero reference, e.g. dq of a row with one key, is compared absolutely)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def check_against_reference(fn, q, k, v, do, *, mask=None, ref=None, floor=None):
    """Assert that ``fn``'s output and ``dq, dk, dv`` match the float64 reference.

    The reference is ``ref`` (a function of ``q, k, v``, run on float64 copies; its run on the
    inputs' dtype sets the budget) or, given ``mask``, dense masked attention under it. Every
    result must be finite, of the inputs' dtype and shape, with relative error at most
    ``2 * err(same dtype) + floor`` (:func:`max_err`). Returns ``fn``'s four results.
    """
    dtype = q.dtype
    if floor is None:
        floor = (MASK_FLOOR if ref is None else FLOOR)[dtype]
    if ref is None:

        def ref(a, b, c):
            return masked_attention(a, b, c, mask, dtype=a.dtype)

    want = fwd_bwd(ref, q.double(), k.double(), v.double(), do.double())
    same = want if dtype == torch.float64 else fwd_bwd(ref, q, k, v, do)
    got = fwd_bwd(fn, q, k, v, do)
    for name, x, s, r in zip(("out", "dq", "dk", "dv"), got, same, want):
        assert x.dtype == dtype and x.shape == r.shape, (name, x.dtype, x.shape)
        assert torch.isfinite(x).all(), f"{name}: non-finite values (an unwritten tile or NaN)"
        err, budget = max_err(x, r), 2 * max_err(s, r) + floor
        assert err <= budget, f"{name}: error {err:.2e} > budget {budget:.2e} (2 x same-dtype + floor)"
    return got


def compiled_graphs(fn, *args):
    """The forward and backward graphs AOTAutograd hands the compiler for ``fn`` (then run with
    ``aot_eager``'s boxed forward), and ``fn``'s compiled output."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def compiler(name):
        def run(gm, inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return run

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    out.sum().backward()
    return graphs, out
