"""Decoding: the plans' key lists equal the patterns, and the decode kernel (in the interpreter on
CPU) and the masked fallback equal a float64 reference over the whole history at every step, with
sequences at different positions, full and bounded caches, poisoned unused slots."""

import numpy as np
import pytest

from tests._kernel_env import INTERPRET, device

torch = pytest.importorskip("torch")

from sparse_attention.decoding import DecodePlan, keys, spec_plans  # noqa: E402
from sparse_attention.patterns import Group, Merged, Mode, PerHead  # noqa: E402

B16 = 16


def _custom(causal: bool, diagonal: bool):
    """A per-head random layout with in-block masks (``diagonal=False``: some rows allow nothing)."""
    from sparse_attention import from_dense
    from sparse_attention.patterns import Custom

    m = np.random.default_rng(0).random((4, 256, 256)) < 0.1
    m |= np.eye(256, dtype=bool) & diagonal
    return Custom(from_dense(np.tril(m) if causal else m, B16))


SPECS = {
    "all": Mode("all"),
    "local": Mode("local", 48),
    "strided": Mode("strided", 16),
    "fixed": Mode("fixed", 64, num_verts=1, vertsize=2),
    "fixed-nv2": Mode("fixed", 64, num_verts=2, vertsize=1),
    "group": Group(32),
    "local|strided": Merged(Mode("local", 32), Mode("strided", 32)),
    "group|fixed": Merged(Group(64), Mode("fixed", 64, num_verts=1, vertsize=1)),
    "per-head": PerHead(Mode("local", 32), Mode("strided", 16)),
    "custom": _custom(causal=True, diagonal=True),
    "custom-noncausal-empty-rows": _custom(causal=False, diagonal=False),
    "local|fixed": Merged(Mode("local", 32), Mode("fixed", 64, num_verts=1, vertsize=1)),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_plan_keys_are_the_pattern(name):
    spec, heads, T = SPECS[name], 4, 256
    i = np.arange(T)
    allowed = np.broadcast_to(spec.mask(i, i, heads, B16), (heads, T, T))
    for h0, hn, plan in spec_plans(spec, heads, B16, n_ctx=T):
        assert plan is not None
        for h in range(hn):
            for q in range(T):
                got = keys(plan, q, h)
                assert len(np.unique(got)) == len(got), (q, h)
                want = np.nonzero(allowed[h0 + h, q])[0]
                np.testing.assert_array_equal(np.sort(got), want, err_msg=f"query {q} head {h0 + h}")


@pytest.mark.parametrize("name", ["local", "fixed", "fixed-nv2", "group"])
def test_bounded_slots_hold_what_is_read(name):
    """In a bounded cache every key a query reads has its own slot among the live ones."""
    (_, hn, plan), n_ctx = spec_plans(SPECS[name], 2, B16)[0], 256
    bp = plan.bounded(n_ctx, max_query=3)
    assert bp.slots < n_ctx
    for h in range(hn):
        for i in range(n_ctx):
            n2, n1 = bp.count(i, h)
            ks = keys(bp, i, h)
            run_slot, sum_slot = bp.slot(ks, h)
            slots = np.where(np.arange(len(ks)) < n2, sum_slot if bp.sum_base >= 0 else run_slot, run_slot)
            assert (slots >= 0).all() and (slots < bp.slots).all()
            assert len(np.unique(slots)) == len(slots)


def test_layout_plans_need_a_layout_covering_the_context():
    from sparse_attention import from_dense
    from sparse_attention.decoding import SECOND_BLOCKS
    from sparse_attention.patterns import Custom

    lay = from_dense(np.tril(np.ones((1, 64, 64), bool)), 16)
    assert spec_plans(Custom(lay), 2, 16)[0][2] is None  # no context given: no layout plan
    plan = spec_plans(Custom(lay), 2, 16, n_ctx=64)[0][2]
    assert plan.second == SECOND_BLOCKS and plan.layout.heads == 2  # one head broadcast
    assert spec_plans(Custom(lay), 2, 16, n_ctx=80)[0][2] is None  # the layout is too short
    union = Merged(Mode("local", 32), Mode("fixed", 64, 1, 1))
    assert spec_plans(union, 2, 16)[0][2] is None
    assert spec_plans(union, 2, 16, n_ctx=100)[0][2].layout.time == 112
    assert spec_plans(union, 2, 16, n_ctx=9000)[0][2] is None  # its layout needs a dense mask


def _reference(q, K, V, spec, heads, i, end):
    """float64 attention of ``q [H, d]`` at position ``i`` over keys ``0 .. end - 1``."""
    from sparse_attention.torch.reference import masked_attention

    j = torch.arange(end)
    mask = spec.mask(torch.tensor([i]), j, heads, B16)
    return masked_attention(q[None, :, None].double(), K[None, :, :end].double(), V[None, :, :end].double(), mask)[
        0, :, 0
    ]


def _run_cache(
    name,
    kernel,
    bounded,
    dtype,
    D=32,
    steps=(1, 3),
    prompts=(5, 40, 64),
    heads=4,
    n_ctx=192,
    kv_heads=None,
    gather=0.25,
):
    """``kernel`` False: off the kernel, a step gathers the keys a closed form names where they are
    at most ``gather`` of the slots (1: always; unused slots are then NaN, as for the kernel),
    else masked attention over every slot (0: always)."""
    from sparse_attention.torch import decode as dec

    spec = SPECS[name]
    dev = device() if kernel else "cpu"
    g = torch.Generator().manual_seed(0)
    Bn = len(prompts)
    HK = heads if kv_heads is None else kv_heads
    Q = torch.randn(Bn, heads, n_ctx, D, generator=g).to(dev, dtype)
    K, V = (torch.randn(Bn, HK, n_ctx, D, generator=g).to(dev, dtype) for _ in range(2))
    # the reference reads the key/value head of each query head (grouped-query attention)
    Kq, Vq = (x.repeat_interleave(heads // HK, dim=1) for x in (K, V))
    old = dec.KERNEL_ON_CPU, dec.GATHER_FRACTION
    dec.KERNEL_ON_CPU, dec.GATHER_FRACTION = kernel, gather
    try:
        layer = dec.CacheLayer(spec, heads, D, B16, Bn, n_ctx, dtype, dev, bounded, max(steps), kv_heads)
        assert layer.kernel == kernel
        if kernel or (gather >= 1 and layer.gathered):
            # slots nobody wrote are NaN: a key read outside the pattern shows up
            layer.k.fill_(float("nan"))
            layer.v.fill_(float("nan"))
        lengths = torch.zeros(Bn, dtype=torch.int64, device=dev)
        ends = torch.tensor(prompts, device=dev)
        t0 = max(prompts)
        layer.write(K[:, :, :t0], V[:, :, :t0], lengths, ends)
        lengths = ends.clone()
        for step in steps * 4:
            if int(lengths.max()) + step > n_ctx:
                break
            idx = (lengths[:, None] + torch.arange(step, device=dev))[:, None, :, None]
            kidx = idx.expand(Bn, HK, step, D)
            layer.write(torch.gather(K, 2, kidx), torch.gather(V, 2, kidx), lengths)
            out = layer.attend(torch.gather(Q, 2, idx.expand(Bn, heads, step, D)), lengths)
            assert out.dtype == dtype
            for b in range(Bn):
                for t in range(step):
                    i = int(lengths[b]) + t
                    want = _reference(
                        Q[b, :, i].cpu(), Kq[b].cpu(), Vq[b].cpu(), spec, heads, i, int(lengths[b]) + step
                    )
                    tol = 1e-5 if dtype == torch.float32 else 2e-2
                    torch.testing.assert_close(out[b, :, t].cpu().double(), want, rtol=tol, atol=tol)
            lengths += step
    finally:
        dec.KERNEL_ON_CPU, dec.GATHER_FRACTION = old
    return layer


@pytest.mark.parametrize("gather", [0.0, 0.25, 1.0], ids=["masked", "default", "gathered"])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_fallback_cache_equals_reference(name, bounded, gather):
    layer = _run_cache(name, kernel=False, bounded=bounded, dtype=torch.float32, gather=gather)
    # every closed form gathers its keys (the block rows of custom layouts and other unions do not)
    assert layer.gathered == (not name.startswith("custom") and name != "local|fixed")


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_decode_kernel_equals_reference(kernels, name, bounded):
    _run_cache(name, kernel=True, bounded=bounded, dtype=torch.float32)


GQA_SPECS = ["all", "local", "strided", "fixed", "fixed-nv2", "per-head", "group|fixed", "custom"]


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("name", GQA_SPECS)
@pytest.mark.parametrize("kernel", [0.0, 1.0, True], ids=["masked", "gathered", "kernel"])
def test_grouped_query_cache(request, kernel, name, bounded, kv_heads):
    """A cache of ``kv_heads`` key/value heads for 4 query heads (grouped-query attention): the
    decode kernel and the masked path read head ``h // (4 // kv_heads)``, and equal the float64
    reference at every step; a bounded cache stays bounded where the group shares its summary
    keys (one summary class), and keeps every position where it does not (fixed-nv2)."""
    if kernel is True:
        request.getfixturevalue("kernels")
    gather = 0.25 if kernel is True else kernel
    layer = _run_cache(
        name, kernel=kernel is True, bounded=bounded, dtype=torch.float32, kv_heads=kv_heads, gather=gather
    )
    assert layer.k.shape[1] == kv_heads
    if bounded and name == "fixed-nv2":
        assert layer.slots == 192


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("D", [16, 40, 64, 128, 256])
def test_decode_kernel_dtypes_and_head_dims(kernels, dtype, D):
    if INTERPRET and dtype == "bfloat16":
        pytest.skip("Triton 3.6's interpreter computes bfloat16 on raw bits (the GPU suite runs this case)")
    _run_cache("fixed", kernel=True, bounded=True, dtype=getattr(torch, dtype), D=D, steps=(1, 2), heads=2, n_ctx=140)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_kernel_split_k(kernels, splits):
    """Every number of key slices (some empty at short positions) gives the same output."""
    from sparse_attention.torch.kernels.decode import decode

    plan = DecodePlan(run=1, slots=300)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 1, 16, generator=g).to(device())
    k, v = (torch.randn(2, 3, 301, 16, generator=g).to(device()) for _ in range(2))
    lengths = torch.tensor([3, 290], device=device())
    out = decode(q, k, v, lengths, plan, splits)
    for b in range(2):
        n = int(lengths[b]) + 1
        s = (q[b].double() @ k[b, :, :n].double().transpose(-1, -2)) / 4.0
        want = torch.softmax(s, -1) @ v[b, :, :n].double()
        torch.testing.assert_close(out[b].double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)


def test_custom_mask_on_numpy_then_torch():
    """A custom layout's dense mask is cached per kind: numpy >= 2 arrays have a ``.device`` too."""
    spec, i = _custom(causal=True, diagonal=True), np.arange(4)
    assert isinstance(spec.allowed(i, i, 0, 4, B16), np.ndarray)
    assert isinstance(spec.allowed(torch.from_numpy(i), torch.from_numpy(i), 0, 4, B16), torch.Tensor)


FUNCTIONAL = {
    "all": dict(attn_mode="all"),
    "local": dict(attn_mode="local", local_attn_ctx=32),
    "strided": dict(attn_mode="strided", local_attn_ctx=24),
    "fixed": dict(attn_mode="fixed", local_attn_ctx=64, num_verts=2, vertsize=1),
}


@pytest.mark.parametrize("kernel", [False, "gathered", True])
@pytest.mark.parametrize("name", list(FUNCTIONAL) + ["layout"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_blocksparse_decode_equals_the_full_attention(name, kernel, kv_heads, monkeypatch):
    """``blocksparse_decode`` on a [batch, n_ctx, kv_heads * head_dim] cache gives the rows of
    the dense reference at each sequence's new positions; rows past them are NaN and never read."""
    from sparse_attention import attention_impl
    from sparse_attention.torch import blocksparse_decode
    from sparse_attention.torch import decode as dec

    monkeypatch.setattr(dec, "GATHER_FRACTION", 1.0 if kernel == "gathered" else 0.0)
    if kernel is True:
        pytest.importorskip("triton")
        if not INTERPRET and not torch.cuda.is_available():
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        monkeypatch.setattr(dec, "KERNEL_ON_CPU", True)
    dev = device() if kernel is True else "cpu"
    kw = FUNCTIONAL.get(name) or dict(attn_mode=_custom(causal=True, diagonal=True).layout)
    B, N, heads, d, t = 3, (192 if name in FUNCTIONAL else 256), 4, 16, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, heads * d, generator=g)
    k, v = (torch.randn(B, N, kv_heads * d, generator=g) for _ in range(2))
    full = attention_impl(q, k, v, heads, blocksize=16, **kw)
    lengths = torch.tensor([0, 37, 150])
    rows = (lengths[:, None] + torch.arange(t))[:, :, None].expand(B, t, heads * d)
    past = torch.arange(N)[None, :, None] >= (lengths + t)[:, None, None]
    kc, vc = (x.masked_fill(past, float("nan")) for x in (k, v))
    out = blocksparse_decode(
        torch.gather(q, 1, rows).to(dev), kc.to(dev), vc.to(dev), lengths.to(dev), heads, blocksize=16, **kw
    )
    torch.testing.assert_close(out.cpu(), torch.gather(full, 1, rows), rtol=1e-5, atol=1e-5)


def test_blocksparse_decode_errors_name_the_argument():
    from sparse_attention.torch import blocksparse_decode

    q, c = torch.zeros(2, 1, 32), torch.zeros(2, 64, 32)
    with pytest.raises(ValueError, match="k_cache"):
        blocksparse_decode(q, c[:1], c, 0, 4, "all")
    with pytest.raises(ValueError, match="heads"):
        blocksparse_decode(q, c, c, 0, 3, "all")
    with pytest.raises(ValueError, match="kv_heads"):
        blocksparse_decode(q, c[..., :24], c[..., :24], 0, 4, "all")  # 3 kv heads for 4
    with pytest.raises(ValueError, match="lengths"):
        blocksparse_decode(q, c, c, torch.zeros(3, dtype=torch.int64), 4, "all")
    with pytest.raises(TypeError, match="lengths"):
        blocksparse_decode(q, c, c, torch.zeros(2), 4, "all")
    with pytest.raises(ValueError, match="local_attn_ctx"):
        blocksparse_decode(q, c, c, 0, 4, "strided", blocksize=16)
    with pytest.raises(ValueError, match="q must have shape"):
        blocksparse_decode(q[0], c, c, 0, 4, "all")
