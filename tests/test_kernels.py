"""The fused Triton kernels at tiny sizes, forward and backward, against a float64 reference.

On a machine without CUDA (CI) the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set here before the kernels are imported); with a CUDA build of torch they run compiled on the
GPU. The full GPU suite (every mode, dtype, blocksize, head_dim; 1M tokens) is ``tests/gpu/``.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from _attn_ref import check_against_reference
from _kernel_env import INTERPRET, launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)
from _kernel_env import device as _device

from sparse_attention.layouts import custom_layout, from_dense, make_layout, packed_layout


def _custom_empty_row():
    nb = 8
    lay = np.tril(np.ones((2, nb, nb), int))
    lay[0, 3, :] = 0  # head 0: query block 3 has no key at all
    lay[1] = np.eye(nb, dtype=int)
    lay[1, 5, 2] = 1

    def cb(shape, h, qi, ki, e):
        if qi == ki:
            return np.arange(shape[0])[:, None] >= np.arange(shape[1])[None, :]
        return np.random.RandomState(e).rand(*shape) > 0.3

    return custom_layout(lay, 16, callback=cb)


def _from_dense_row_gaps():
    T = 128
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    m = (j <= i) & ((i - j) % 3 != 1)
    m[7] = False  # a token row with no allowed key inside an enabled block
    return from_dense(m[None], 32)


CASES = [
    pytest.param(lambda: make_layout(128, 2, "all", blocksize=16), 32, torch.float32, id="all-T128-b16-D32-fp32"),
    pytest.param(
        lambda: make_layout(128, 2, "local", local_attn_ctx=48, blocksize=16),
        32,
        torch.float32,
        id="local-T128-L48-b16-D32-fp32",
    ),
    pytest.param(
        lambda: make_layout(192, 2, "strided", local_attn_ctx=8, blocksize=16),
        16,
        torch.float32,
        id="strided-T192-l8-b16-D16-fp32",
    ),
    pytest.param(
        lambda: make_layout(128, 4, "fixed", local_attn_ctx=32, blocksize=16, num_verts=2, vertsize=1),
        32,
        torch.float32,
        id="fixed-T128-l32-b16-nv2-D32-fp32",
    ),
    pytest.param(
        lambda: make_layout(128, 2, "fixed", local_attn_ctx=16, blocksize=16, num_verts=1, vertsize=1),
        32,
        torch.float32,
        id="fixed-T128-l16-tile-over-groups-fp32",
    ),
    pytest.param(_custom_empty_row, 32, torch.float32, id="custom-perhead-emptyrow-callback-fp32"),
    pytest.param(_from_dense_row_gaps, 48, torch.float32, id="custom-fromdense-b32-D48pad-fp32"),
    pytest.param(
        lambda: make_layout(128, 2, "local", local_attn_ctx=32, blocksize=32),
        32,
        torch.float16,
        id="local-T128-L32-b32-D32-fp16",
    ),
    pytest.param(
        lambda: make_layout(128, 2, "strided", local_attn_ctx=16, blocksize=16),
        32,
        torch.float16,
        id="strided-T128-l16-D32-fp16",
    ),
]


def kernels(launch, lay):
    """The launchers as one differentiable function (the autograd Function of the dispatch)."""
    from sparse_attention.torch.dispatch import EagerAttention

    return lambda q, k, v: EagerAttention.apply(q, k, v, launch.forward, launch.backward, lay)


@pytest.mark.parametrize("make, D, dtype", CASES)
def test_forward_backward(launch, make, D, dtype):
    lay = make()
    B, H, T = 1, lay.heads, lay.time
    dev = _device()
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(dev, dtype) for _ in range(4))
    mask = lay.to_dense()
    o = check_against_reference(kernels(launch, lay), q, k, v, do, mask=mask)[0]
    empty = ~mask.any(-1)  # [H, T]
    if empty.any():
        assert (o[:, torch.from_numpy(empty)] == 0).all(), "rows with no allowed key must output 0"


def _retile_layouts(tile: int) -> dict:
    """Custom layouts around the kernels' tile (32 in the interpreter, 64 on the GPU)."""
    return {
        # blocks half the tile: coarsened (in-block masks put together), per-head, an empty row
        "coarser-packed": lambda: packed_layout([0, 37, 100, 256], 2, "local", tile, blocksize=tile // 2),
        # blocks twice the tile: cut (parts without a pair dropped), a time past whole blocks
        "finer-packed-tail": lambda: packed_layout([0, 37, 100, 300], 2, "local", 2 * tile, blocksize=2 * tile),
        # the residue-major permuted order
        "coarser-bidirectional-strided": lambda: make_layout(
            256, 2, "strided", local_attn_ctx=4, blocksize=tile // 2, causal=False
        ),
    }


@pytest.mark.parametrize("retile", [True, False], ids=["retiled", "own-blocks"])
@pytest.mark.parametrize("name", list(_retile_layouts(32)))
def test_custom_layouts_retiled(launch, monkeypatch, name, retile):
    """Custom layouts run at the kernels' tile (coarser or finer than their blocks), or at their
    own blocks with ``RETILE`` off; both equal the reference."""
    monkeypatch.setattr(launch, "RETILE", retile)
    tile = launch.custom_tile(32)
    lay = _retile_layouts(tile)[name]()
    kl = launch.kernel_layout(lay, 32)
    assert kl.blocksize == (tile if retile else lay.blocksize)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, lay.heads, lay.time, 32, generator=g).to(_device()) for _ in range(4))
    check_against_reference(kernels(launch, lay), q, k, v, do, mask=lay.to_dense())


def test_rerun_is_bitwise_equal(launch):
    lay = make_layout(128, 4, "fixed", local_attn_ctx=32, blocksize=16, num_verts=2, vertsize=1)
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, 4, 128, 32, generator=g).to(_device()) for _ in range(4))
    runs = []
    for _ in range(2):
        o, lse = launch.forward(q, k, v, lay)
        runs.append([o, *launch.backward(do, q, k, v, o, lse, lay)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


VIEW_LAYOUTS = {
    "all": lambda: make_layout(64, 2, "all", blocksize=16),
    "local": lambda: make_layout(64, 2, "local", local_attn_ctx=16, blocksize=16),
    "strided": lambda: make_layout(64, 2, "strided", local_attn_ctx=8, blocksize=16),
    "fixed": lambda: make_layout(64, 2, "fixed", local_attn_ctx=32, blocksize=16, num_verts=2, vertsize=1),
    "custom": _custom_empty_row,
}


@pytest.mark.parametrize("packing", ["heads-of-btd", "packed-qkv"])
@pytest.mark.parametrize("mode", list(VIEW_LAYOUTS))
def test_strided_views_need_no_copy(launch, mode, packing):
    """q, k, v as views (what the front end and a model pass): the heads of ``[B, T, H * D]``
    tensors, or slices of one packed ``[B, T, 3, H, D]`` projection. Forward and the three
    gradients are right, and o, dq, dk, dv come back in time-major memory, so that merging the
    heads back into ``[B, T, H * D]`` is a view, not a copy."""
    lay = VIEW_LAYOUTS[mode]()
    B, H, T, D = 2, lay.heads, lay.time, 32
    g = torch.Generator().manual_seed(3)
    if packing == "packed-qkv":
        qkv = torch.randn(B, T, 3, H, D, generator=g).to(_device())
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (
            torch.randn(B, T, H * D, generator=g).to(_device()).view(B, T, H, D).transpose(1, 2) for _ in range(3)
        )
    do = torch.randn(B, T, H * D, generator=g).to(_device()).view(B, T, H, D).transpose(1, 2)
    got = check_against_reference(kernels(launch, lay), q, k, v, do, mask=lay.to_dense())
    for name, x in zip(("o", "dq", "dk", "dv"), got):
        assert x.transpose(1, 2).is_contiguous(), f"{name} is not time-major: merging heads would copy"


@pytest.mark.parametrize("mode", list(VIEW_LAYOUTS))
def test_public_call_on_a_packed_projection(launch, monkeypatch, mode):
    """``blocksparse_attention_impl`` on column slices of one ``[B, T, 3 * H * D]`` projection
    (``qkv[..., i * H * D:(i + 1) * H * D]``: strided, not contiguous), through the fused kernels:
    forward and the three gradients against float64, and the call is one autograd node (heads are
    split and merged inside it as views: no view, reshape or copy node between the caller's tensors
    and ours; ``all`` excepted, which is SDPA's)."""
    import sparse_attention as sa
    from sparse_attention.torch import dispatch

    monkeypatch.setattr(dispatch, "fused_unsupported_reasons", lambda q, lay: [])  # CPU tensors: interpreter
    lay = VIEW_LAYOUTS[mode]()
    B, H, T, D = 2, lay.heads, lay.time, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(_device())
    heads = [qkv[..., i * H * D : (i + 1) * H * D].view(B, T, H, D).transpose(1, 2) for i in range(3)]
    do = torch.randn(B, T, H * D, generator=g).to(_device()).view(B, T, H, D).transpose(1, 2)

    def public(a, b, c):  # heads in, heads out; the call itself sees slices of one projection
        packed = torch.cat([x.transpose(1, 2).reshape(B, T, H * D) for x in (a, b, c)], dim=-1)
        q, k, v = (packed[..., i * H * D : (i + 1) * H * D] for i in range(3))
        assert not q.is_contiguous() and q.stride() == (T * 3 * H * D, 3 * H * D, 1)
        o = sa.blocksparse_attention_impl(q, k, v, H, lay)
        return o.view(B, T, H, D).transpose(1, 2)

    check_against_reference(public, *heads, do, mask=lay.to_dense())
    leaf = qkv.clone().requires_grad_()
    o = sa.blocksparse_attention_impl(*(leaf[..., i * H * D : (i + 1) * H * D] for i in range(3)), H, lay)
    if mode != "all":  # ``all`` runs PyTorch's SDPA on the head views
        assert "EagerAttention" in type(o.grad_fn).__name__, o.grad_fn
    assert o.is_contiguous()


@pytest.mark.parametrize(
    "heads,l,b,nv,vs", [(8, 128, 32, 4, 1), (6, 128, 16, 3, 2), (4, 256, 32, 2, 4), (3, 32, 32, 1, 1)]
)
def test_builtin_layouts_put_nothing_on_the_device(launch, heads, l, b, nv, vs):
    """Built-in modes pass ``q`` for every table pointer (never read) and ``fixed``'s per-head first
    summary token in closed form, equal to the layout's own ``fixed_vert_range``; so nothing is
    allocated on the device (a first call may run inside a CUDA-graph recording)."""
    from sparse_attention.layouts import fixed_vert_range

    lay = make_layout(4 * l, heads, "fixed", local_attn_ctx=l, blocksize=b, num_verts=nv, vertsize=vs)
    q = torch.zeros(1, heads, 4 * l, 16)

    def allocates_nothing(lay):
        # every tensor argument is the placeholder q itself (never read: the closed form decides),
        # and a second device or dtype would give the same scalars
        tab = launch.device_tables(lay, q)
        tensors = {name for name, x in tab.items() if isinstance(x, torch.Tensor)}
        other = launch.device_tables(lay, torch.zeros(1, dtype=torch.float64))
        return (
            tensors == set(launch.POINTER_TABLES)
            and all(x is q for x in map(tab.get, tensors))
            and all(tab[n] == other[n] for n in tab if n not in tensors)
        )

    tab = launch.device_tables(lay, q)
    assert allocates_nothing(lay)
    for h in range(heads):
        assert tab["VLO_A"] - (h % tab["VLO_NV"]) * tab["VLO_C"] == fixed_vert_range(h, l // b, nv, vs)[0] * b
    for mode, kw in (("all", {}), ("local", dict(local_attn_ctx=l)), ("strided", dict(local_attn_ctx=l))):
        assert allocates_nothing(make_layout(4 * l, heads, mode, blocksize=b, **kw))
    # the check can fail: a custom layout's tables are tensors of their own
    assert not allocates_nothing(from_dense(lay.to_dense(), b))


def test_large_batch_times_heads_runs_in_slices(launch, monkeypatch):
    """``batch x heads`` above CUDA's 65,535 programs of the second grid dimension runs as several
    launches over batch slices (forced here with a small limit), with the same results."""
    lay = make_layout(64, 3, "fixed", local_attn_ctx=32, blocksize=16, num_verts=1, vertsize=1)
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(5, 3, 64, 16, generator=g).to(_device()) for _ in range(4))
    whole = [*launch.forward(q, k, v, lay)]
    whole += launch.backward(do, q, k, v, whole[0], whole[1], lay)
    monkeypatch.setattr(launch, "MAX_GRID_Y", 7)  # 2 batch rows (6 programs) per launch
    assert launch.batch_slices(5, 3) == [(0, 2), (2, 4), (4, 5)]
    sliced = [*launch.forward(q, k, v, lay)]
    sliced += launch.backward(do, q, k, v, sliced[0], sliced[1], lay)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)
    monkeypatch.setattr(launch, "MAX_GRID_Y", 2)
    with pytest.raises(ValueError, match="heads"):
        launch.forward(q, k, v, lay)


@pytest.mark.parametrize("D", [16, 64, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_tile_configs_fit_shared_memory(launch, kind, dtype, D, monkeypatch):
    """The tile config of every kernel fits the shared memory by the estimate (the launcher shrinks
    the tuned one: stages first, then tiles), with tiles of at least 16; a custom layout whose
    blocks cannot fit is refused with a clear error, and the dispatch then takes the gather path."""
    lay = make_layout(1024, 2, "fixed", local_attn_ctx=128, blocksize=32, num_verts=1, vertsize=1)
    q = torch.empty(1, 2, 1024, D, dtype=dtype)
    cfg = launch._tiles(kind, q, lay)
    bd = max(16, 1 << (D - 1).bit_length())
    assert launch.shared_memory_estimate(kind, cfg, bd, q.element_size()) <= launch.shared_memory_limit("cpu")
    assert min(cfg["BM"], cfg["BN"]) >= 16 and cfg["num_stages"] >= 1
    if kind == "fwd" and dtype == torch.float16 and D == 256:
        big = from_dense(np.tril(np.ones((256, 256), bool))[None], 128)
        # the estimate only, on the kernels' device (a CPU tensor on a GPU machine is refused first)
        qb = torch.empty(1, 1, 256, 256, dtype=torch.float16, device=_device())
        with pytest.raises(ValueError, match="cannot fit head_dim 256"):
            launch._tiles("dkdv", qb, big)
        # at its own blocks it is refused; retiled to the kernels' smaller tile it runs
        assert launch.kernel_layout(big, 256).blocksize == launch.custom_tile(256) < 128
        assert not any("cannot fit" in r or "blocksize" in r for r in launch.unsupported_reasons(qb, big))
        with monkeypatch.context() as m:
            m.setattr(launch, "RETILE", False)
            assert any("cannot fit" in r for r in launch.unsupported_reasons(qb, big))
        assert any("float32 with head_dim 256" in r for r in launch.unsupported_reasons(qb.float(), big))


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("all", {}),
        ("local", dict(local_attn_ctx=32)),
        ("strided", dict(local_attn_ctx=16)),
        ("fixed", dict(local_attn_ctx=32, num_verts=1, vertsize=1)),
    ],
)
def test_one_compilation_for_every_time(launch, monkeypatch, mode, kw):
    """A kernel's compile-time constants do not depend on ``time`` (``strided``'s ``time / l`` is
    a runtime argument), so a model sampling or training at many lengths compiles each kernel
    once; ``SPLIT`` (whether a range is long enough for a separate unmasked loop) is the one
    constant that may flip, once, as segments grow: at most two variants per kernel."""
    from sparse_attention.torch.kernels import attention as K

    seen: dict = {}

    class Recorder:
        def __init__(self, kernel):
            params = inspect.signature(kernel.fn).parameters.values()
            self.fn, self.names = kernel.fn, [p.name for p in params if "constexpr" in str(p.annotation)]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                key = tuple((n, kwargs[n]) for n in self.names if n in kwargs and n != "SPLIT")
                seen.setdefault(self.fn.__name__, {}).setdefault(key, set()).add(kwargs.get("SPLIT"))

            return run

    for name in ("fwd_kernel", "dq_kernel", "dkdv_kernel"):
        monkeypatch.setattr(K, name, Recorder(getattr(K, name)))
    for T in (256, 512, 1024, 2048):
        lay = make_layout(T, 2, mode, blocksize=16, **kw)
        q = torch.zeros(1, 2, T, 32)
        o, lse = launch.forward(q, q, q, lay)
        launch.backward(q, q, q, q, o, lse, lay)
    summary_pass = 1 if mode == "fixed" else 0  # dK/dV's second pass is its own specialization
    for name, keys in seen.items():
        assert len(keys) == 1 + (summary_pass if name == "dkdv_kernel" else 0), (name, list(keys))
        assert all(len(split) <= 2 for split in keys.values()), (name, keys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("engine", ["fused", "gather"])
def test_fixed_summary_gradients_rounded_once(launch, engine, dtype):
    """``fixed``'s dV of a summary key is the sum of its own group's part and the later groups'
    part, rounded to half precision once. Inputs built so that the sum is exact in float32 and
    the parts cancel: q = k = 0 (uniform attention; the chosen queries see 16, 32 or 128 keys, so
    their probabilities are exact powers of two), dO nonzero on three queries. Keys 0..15 (group
    0 is all summary: l=64, blocksize 16, vertsize 4) get 4096/16 + 2/32 from their group and
    -32768/128 from query 127 in group 1: exactly 0.0625. Rounding the first part to half
    precision before adding the second (256.0625 -> 256) gives 0."""
    from sparse_attention.torch import gather

    if engine == "fused" and INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter computes bfloat16 on raw bits (the GPU suite runs this case)")
    lay = make_layout(256, 1, "fixed", local_attn_ctx=64, blocksize=16, num_verts=1, vertsize=4)
    dev = _device() if engine == "fused" else "cpu"
    q = torch.zeros(1, 1, 256, 16, dtype=dtype, device=dev)
    do = torch.zeros_like(q)
    do[0, 0, 15], do[0, 0, 31], do[0, 0, 127] = 4096.0, 2.0, -32768.0
    fwd, bwd = (launch.forward, launch.backward)
    if engine == "gather":
        fwd, bwd = gather.gather_forward, gather.gather_backward
    o, lse = fwd(q, q, q, lay)
    _, _, dv = bwd(do, q, q, q, o, lse, lay)
    assert torch.equal(dv[0, 0, :16].float().cpu(), torch.full((16, 16), 0.0625))


def test_magic_divisor_divides_exactly(launch):
    """The kernels' division by the pattern's period: exact for every position below 2**31, at
    divisors 1..4096 and random large ones (float64-free: integer arithmetic as the kernel does)."""
    rng = np.random.default_rng(0)
    divisors = list(range(1, 4097)) + [int(d) for d in rng.integers(4097, 2**31 - 1, 200)] + [2**31 - 1]
    x = np.concatenate([np.arange(70_000), rng.integers(0, 2**31, 20_000), [2**31 - 2, 2**31 - 1]]).astype(np.uint64)
    for d in divisors:
        m, s = launch.magic_divisor(d)
        assert 0 < m < 2**32
        q = (((x * np.uint64(m)) >> np.uint64(32)) + x) >> np.uint64(s)
        assert np.array_equal(q, x // np.uint64(d)), d
    with pytest.raises(ValueError, match="divisor"):
        launch.magic_divisor(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fixed_long_summary_tiles(launch, monkeypatch, dtype):
    """``fixed`` whose summary keys outgrow the L2 cache runs its query-tile kernels (forward,
    dQ) at the long-summary tiles, equal to the reference; with room in L2 it keeps the tuned
    tiles. The L2 size is made small here, so the switch happens at a testable length."""
    lay = make_layout(512, 2, "fixed", local_attn_ctx=64, blocksize=16, num_verts=2, vertsize=1)
    D = 64
    q = torch.empty(1, 2, 512, D, dtype=dtype, device=_device())
    tuned = {k: launch._tiles(k, q, lay) for k in ("fwd", "dq", "dkdv")}
    # one head's summary keys and values: 512 // 64 groups x 16 keys x 2 x D x itemsize bytes
    monkeypatch.setattr(launch, "l2_cache_bytes", lambda device: 4 * 8 * 16 * 2 * D * q.element_size() - 4)
    launch.configs_changed()
    form = launch.closed_form(lay)
    try:
        assert launch._streams_past_l2(form, lay, q)
        long = {k: launch._tiles(k, q, lay) for k in ("fwd", "dq", "dkdv")}
        assert long["dkdv"] == tuned["dkdv"]
        if dtype == torch.float16 and not INTERPRET:  # float32 keeps its own tiles; the interpreter 32
            for k in ("fwd", "dq"):
                assert long[k]["BM"] == launch.LONG_SUMMARY_CONFIGS[(k, 64)]["BM"] != tuned[k]["BM"]
        g = torch.Generator().manual_seed(7)
        x = [torch.randn(1, 2, 512, D, generator=g).to(_device(), dtype) for _ in range(4)]
        check_against_reference(kernels(launch, lay), *x, mask=lay.to_dense())
        monkeypatch.setattr(launch, "l2_cache_bytes", lambda device: 4 * 8 * 16 * 2 * D * q.element_size())
        assert not launch._streams_past_l2(form, lay, q) and launch._tiles("fwd", q, lay) == tuned["fwd"]
    finally:
        monkeypatch.undo()
        launch.configs_changed()
