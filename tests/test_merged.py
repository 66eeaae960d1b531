"""``local | strided`` in one head (eq. 7) as two block-sparse passes merged by their
log-sum-exps (``sparse_attention.torch.merged``), against a float64 reference of the union."""

from __future__ import annotations

import pytest
import torch
from _attn_ref import check_against_reference, fwd_bwd, rel_err
from _kernel_env import INTERPRET, launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)
from _kernel_env import device as _device

from sparse_attention.layouts import make_layout
from sparse_attention.torch import merged as M
from sparse_attention.torch.dispatch import EagerAttention, layout_spec
from sparse_attention.torch.interface import merged_local_strided_bhtd

PAIRS = [(128, 128, 32), (64, 128, 16), (32, 64, 32), (16, 16, 16)]


def _pair(T, H, L, l, b):
    return (
        make_layout(T, H, "local", local_attn_ctx=L, blocksize=b),
        make_layout(T, H, "strided", local_attn_ctx=l, blocksize=b),
    )


def _check_against_reference(fn, loc, st, dtype, device="cpu", B=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, loc.heads, loc.time, D, generator=g).to(device, dtype) for _ in range(4))
    check_against_reference(fn, q, k, v, do, mask=loc.to_dense() | st.to_dense())


@pytest.mark.parametrize("L,l,b", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gather_path_matches_the_union(L, l, b, dtype):
    loc, st = _pair(256, 2, L, l, b)
    _check_against_reference(lambda a, b_, c: merged_local_strided_bhtd(a, b_, c, loc, st), loc, st, dtype)


@pytest.mark.parametrize(
    "L,l,b,T,D,dtype",
    [
        (32, 32, 16, 128, 16, torch.float32),
        (16, 32, 16, 128, 16, torch.float32),
        # time not a multiple of the merge kernels' 32 rows; head_dim padded to 32
        (16, 16, 16, 112, 24, torch.float16),
        # (bf16 on the GPU only: the interpreter computes through numpy, which has no bfloat16)
        (32, 64, 32, 128, 16, torch.float16),
    ],
)
def test_fused_kernels_merge(launch, monkeypatch, L, l, b, T, D, dtype):
    """The merge on the fused kernels' base-2 log-sum-exps, with its row-wise merge kernels
    (interpreter on the CPU); outputs NaN-poisoned, so a row the merge kernels skip fails."""
    monkeypatch.setattr(M, "choose_engine", lambda q, lay: 0)  # the fused kernels (interpreted on the CPU)
    loc, st = _pair(T, 2, L, l, b)
    _check_against_reference(
        lambda a, b_, c: EagerAttention.apply(a, b_, c, M.merged_forward, M.merged_backward, loc, st),
        loc,
        st,
        dtype,
        _device(),
        B=1,
        D=D,
    )


def test_fused_merge_takes_strided_views(launch, monkeypatch):
    """q, k, v as head-dim-contiguous views of one ``[batch, time, 3, heads, head_dim]`` tensor
    (how a model slices them), so the merge kernels' strides are not the contiguous ones."""
    monkeypatch.setattr(M, "choose_engine", lambda q, lay: 0)  # the fused kernels (interpreted on the CPU)
    loc, st = _pair(64, 2, 16, 16, 16)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 64, 3, 2, 16, generator=g).to(_device())
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = torch.randn(2, 2, 64, 16, generator=g).to(_device())
    mask = torch.from_numpy(loc.to_dense() | st.to_dense()).to(_device())
    fn = lambda a, b_, c: EagerAttention.apply(a, b_, c, M.merged_forward, M.merged_backward, loc, st)  # noqa: E731
    check_against_reference(fn, q, k, v, do, mask=mask)


def test_compile_fullgraph_and_opcheck():
    loc, st = _pair(128, 2, 32, 32, 16)
    q, k, v, do = (torch.randn(1, 2, 128, 16, dtype=torch.float64) for _ in range(4))
    eager = fwd_bwd(lambda a, b, c: merged_local_strided_bhtd(a, b, c, loc, st), q, k, v, do)
    comp = torch.compile(
        lambda a, b, c: merged_local_strided_bhtd(a, b, c, loc, st), fullgraph=True, backend="aot_eager"
    )
    for e, c in zip(eager, fwd_bwd(comp, q, k, v, do)):
        assert rel_err(c, e) < 1e-12
    keys = (layout_spec(loc), layout_spec(st), 1)  # the layouts, then the engine (1: the block gather)
    torch.library.opcheck(torch.ops.sparse_attention.merged_fwd.default, (q, k, v, *keys))
    o, lse = torch.ops.sparse_attention.merged_fwd(q, k, v, *keys)
    torch.library.opcheck(torch.ops.sparse_attention.merged_bwd.default, (do, q, k, v, o, lse, *keys))


def _documents_mask(cu, H, L, l, b):
    """The union of the two modes inside each document, from their closed forms (independent of
    the packed layouts the block gather runs)."""
    from sparse_attention.modes import document_mask, validate_pattern

    T = cu[-1]
    masks = [
        document_mask({**validate_pattern(T, H, m, ctx, b, documents=True), "cu_seqlens": cu}, H)
        for m, ctx in (("local", L), ("strided", l))
    ]
    return torch.from_numpy(masks[0] | masks[1])


@pytest.mark.parametrize("engine", ["gather", "fused"])
@pytest.mark.parametrize("L,l", [(16, 16), (16, 32)])
def test_merged_on_packed_documents(launch, monkeypatch, engine, L, l):
    """The merged head on packed documents (documents shorter than the stride, lengths it does not
    divide: strided's residue classes of unequal lengths), both engines, against float64 under the
    union inside each document; outputs NaN-poisoned on the fused path."""
    if engine == "fused":
        monkeypatch.setattr(M, "choose_engine", lambda q, lay: 0)
    cu, H, b = [0, 5, 6, 50, 131, 160], 2, 16
    T = cu[-1]
    loc, st = _pair(T, H, L, l, b)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, H, T, 16, generator=g).to(_device()) for _ in range(4))
    mask = _documents_mask(cu, H, L, l, b).to(_device())
    fn = lambda a, b_, c: merged_local_strided_bhtd(a, b_, c, loc, st, cu_seqlens=cu)  # noqa: E731
    check_against_reference(fn, q, k, v, do, mask=mask, floor=1e-4)


def test_merged_documents_under_compile_and_opcheck():
    """The documents' merged ops trace without graph breaks (boundaries a tensor argument: other
    documents reuse the graph) and pass opcheck."""
    from torch._dynamo.utils import counters

    loc, st = _pair(96, 2, 16, 32, 16)
    q, k, v, do = (torch.randn(1, 2, 96, 16, dtype=torch.float64) for _ in range(4))
    f = lambda a, b, c, cu: merged_local_strided_bhtd(a, b, c, loc, st, cu_seqlens=cu)  # noqa: E731
    torch._dynamo.reset()
    counters.clear()
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")
    for cu in ([0, 40, 41, 96], [0, 3, 70, 96]):
        want = fwd_bwd(lambda a, b, c, cu=cu: f(a, b, c, cu), q, k, v, do)
        got = fwd_bwd(lambda a, b, c, cu=cu: comp(a, b, c, torch.tensor(cu)), q, k, v, do)
        for x, w in zip(got, want):
            assert rel_err(x, w) < 1e-12
    assert counters["stats"]["unique_graphs"] == 1
    keys = (torch.tensor([0, 40, 41, 96]), layout_spec(loc), layout_spec(st), 1)
    torch.library.opcheck(torch.ops.sparse_attention.merged_docs_fwd.default, (q, k, v, *keys))
    o, lse = torch.ops.sparse_attention.merged_docs_fwd(q, k, v, *keys)
    torch.library.opcheck(torch.ops.sparse_attention.merged_docs_bwd.default, (do, q, k, v, o, lse, *keys))


def test_errors_name_the_argument():
    loc, st = _pair(256, 2, 64, 32, 16)
    q = torch.randn(1, 2, 256, 16)
    with pytest.raises(ValueError, match="must be <= the stride"):
        merged_local_strided_bhtd(q, q, q, loc, st)
    with pytest.raises(ValueError, match="mode 'strided'"):
        merged_local_strided_bhtd(q, q, q, loc, loc)
    with pytest.raises(ValueError, match="share time, heads and blocksize"):
        merged_local_strided_bhtd(q, q, q, *_pair(256, 2, 32, 32, 16)[:1], _pair(256, 2, 32, 32, 32)[1])
