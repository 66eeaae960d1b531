"""The pre-bound launches of the fused kernels (``launch._Kernel``), on the CPU: Triton's JIT is
replaced by a stand-in that binds the arguments as the JIT does (the kernel's signature), so the
parameters a pre-bound launch passes can be compared with those the JIT would bind. The GPU
suite (``tests/test_kernels_gpu.py``) runs the real launches."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton

from sparse_attention.layouts import make_layout
from sparse_attention.torch.kernels import launch


class _Compiled:
    """What ``kernel[grid](...)`` returns: ``run`` records each launch's parameters."""

    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, object(), object()

    def launch_metadata(self, grid, stream, *params):
        return None

    def run(self, g0, g1, g2, stream, function, packed_metadata, metadata, enter, exit, *params):
        self.log.append(("bound", (g0, g1, g2), params))


class _FakeJIT:
    """A JIT kernel with the signature of ``real``: a launch binds its arguments as Triton's JIT
    does (``inspect.signature(...).bind``) and records them."""

    def __init__(self, real, log):
        self.real, self.fn, self.arg_names, self.log = real, real.fn, real.arg_names, log
        self.sig = inspect.signature(real.fn)

    def __getitem__(self, grid):
        def launch_(*args, num_warps, num_stages, **kw):
            bound = self.sig.bind(*args, **kw)
            bound.apply_defaults()
            g = tuple(grid) + (1,) * (3 - len(grid))
            self.log.append(("jit", g, tuple(bound.arguments.values())))
            return _Compiled(self.log)

        return launch_


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
    return type(a) is type(b) and a == b


@pytest.fixture
def fake_jit(monkeypatch):
    """Launches through :class:`_FakeJIT` (not interpreted), with the pre-bound path on; the
    plans' kernels are restored afterwards (plans are cached per layout and shared)."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "current_stream", lambda: 0)
    monkeypatch.setattr(launch, "PREBOUND", True)
    log, swapped = [], []

    def use(p):
        for name in ("fwd", "dq", "dkdv", "dkdv_summary"):
            k = getattr(p, name)
            if not isinstance(k.kernel, _FakeJIT) or k.kernel.log is not log:
                real = k.kernel.real if isinstance(k.kernel, _FakeJIT) else k.kernel
                swapped.append((k, real, dict(k.kw)))
                k.kernel, k.bound, k.fitted = _FakeJIT(real, log), {}, set()
        return p

    real_plan = launch.plan
    monkeypatch.setattr(launch, "plan", lambda layout, q: use(real_plan(layout, q)))
    yield log
    for k, real, kw in reversed(swapped):
        k.kernel, k.bound, k.kw, k.fitted = real, {}, kw, set()


def _inputs(B=1, H=2, T=64, D=16, dtype=torch.float16):
    return [torch.randn(B, H, T, D, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("mode", ["local", "strided", "fixed"])
def test_prebound_launch_passes_what_the_jit_binds(fake_jit, mode):
    """The second call of a signature is pre-bound and passes, parameter by parameter, what the
    JIT bound for the first (compile-time ones included), with the same grid."""
    kw = dict(local=dict(local_attn_ctx=32), strided=dict(local_attn_ctx=16), fixed=dict(local_attn_ctx=32))[mode]
    if mode == "fixed":
        kw.update(num_verts=2, vertsize=1)
    lay = make_layout(64, 2, mode, blocksize=16, **kw)
    q, k, v, do = _inputs()
    for _ in range(2):
        o, lse = launch.forward(q, k, v, lay)
        launch.backward(do, q, k, v, o, lse, lay)
    kinds = [e[0] for e in fake_jit]
    n = len(kinds) // 2
    assert kinds == ["jit"] * n + ["bound"] * n, kinds  # every launch of the second call pre-bound
    for (_, g1, p1), (_, g2, p2) in zip(fake_jit[:n], fake_jit[n:]):
        assert g1 == g2
        assert len(p1) == len(p2)
        bad = [i for i, (a, b) in enumerate(zip(p1, p2)) if not _same(a, b)]
        assert not bad, bad


def test_new_signature_goes_through_the_jit(fake_jit):
    """Another length, another dtype or a pointer off 16-byte alignment (a column slice) is a
    new signature: the JIT launches it (it may specialize differently), then it is pre-bound."""
    lay = make_layout(64, 2, "local", 32, blocksize=16)
    q, k, v, _ = _inputs()
    launch.forward(q, k, v, lay)
    launch.forward(q, k, v, lay)
    wide = torch.randn(1, 2, 64, 20, dtype=torch.float16)
    q2 = wide[..., 4:]  # 8 bytes past an aligned address
    assert q2.data_ptr() % 16 == 8
    launch.forward(q2, k, v, lay)
    launch.forward(q2, k, v, lay)
    launch.forward(*(x.float() for x in (q, k, v)), lay)  # another plan, its own kernels
    assert [e[0] for e in fake_jit] == ["jit", "bound", "jit", "bound", "jit"]


def test_prebound_off(fake_jit, monkeypatch):
    monkeypatch.setattr(launch, "PREBOUND", False)
    lay = make_layout(64, 2, "local", 32, blocksize=16)
    q, k, v, _ = _inputs()
    for _ in range(3):
        launch.forward(q, k, v, lay)
    assert [e[0] for e in fake_jit] == ["jit"] * 3


def test_key_covers_specialization():
    """Integers by value, tensors by address modulo 16; an unhashable argument makes no key.
    Dtypes and devices are fixed per plan (one plan per dtype and device)."""
    x = torch.zeros(8, dtype=torch.float16)
    a = launch.bound_key((x, 16, 1.5), {"G": 1}, False)
    assert a == launch.bound_key((x.clone(), 16, 1.5), {"G": 1}, False)
    assert a != launch.bound_key((x, 17, 1.5), {"G": 1}, False)
    assert a != launch.bound_key((x, 16, 1.5), {"G": 2}, False)
    assert a != launch.bound_key((x, 16, 1.5), {"G": 1}, True)
    assert a != launch.bound_key((x[1:], 16, 1.5), {"G": 1}, False)
    with pytest.raises(TypeError):
        hash(launch.bound_key((x, [1]), {}, False))
    lay = make_layout(64, 2, "local", 32, blocksize=16)
    q = torch.zeros(1, 2, 64, 16, dtype=torch.float16)
    assert launch.plan(lay, q) is not launch.plan(lay, q.float())


@pytest.mark.parametrize("mode", ["local", "strided", "fixed"])
def test_traced_launch_passes_what_the_jit_binds(fake_jit, monkeypatch, mode):
    """On traced (fake) tensors, as ``torch.compile`` passes them where it decomposes the ops, each
    launch goes through ``torch.library.wrap_triton`` (which records it for Inductor) with what
    the JIT binds for real tensors, and the same grid; nothing is pre-bound. Pointers the launch
    does not read are fresh tensors, not q: Inductor counts a pointer as written when a store's
    address depends on values loaded through it, and on the GPU that made q an input mutation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    wrapped = []

    def wrap_triton(kernel):
        wrapped.append(kernel)
        return kernel  # the stand-in JIT: records the launch

    monkeypatch.setattr(torch.library, "wrap_triton", wrap_triton)
    kw = dict(local=dict(local_attn_ctx=32), strided=dict(local_attn_ctx=16), fixed=dict(local_attn_ctx=32))[mode]
    if mode == "fixed":
        kw.update(num_verts=2, vertsize=1)
    lay = make_layout(64, 2, mode, blocksize=16, **kw)
    q, k, v, do = _inputs()
    o, lse = launch.forward(q, k, v, lay)
    launch.backward(do, q, k, v, o, lse, lay)
    n = len(fake_jit)
    assert not wrapped
    with FakeTensorMode() as mode_:
        fq, fk, fv, fdo = (mode_.from_tensor(x) for x in (q, k, v, do))
        fo, flse = launch.forward(fq, fk, fv, lay)
        launch.backward(fdo, fq, fk, fv, fo, flse, lay)
    assert len(wrapped) == n and all(isinstance(x, _FakeJIT) for x in wrapped)
    assert [e[0] for e in fake_jit] == ["jit"] * (2 * n)
    for (_, g1, p1), (_, g2, p2) in zip(fake_jit[:n], fake_jit[n:]):
        assert g1 == g2
        bad = []
        for i, (a, b) in enumerate(zip(p1, p2, strict=True)):
            if isinstance(a, torch.Tensor) and any(a is x for x in p1[:i]):
                # a pointer the launch does not read (eagerly a repeat of q or dk): traced, a fresh
                # one-element tensor, so that Inductor's mutation analysis never sees an input
                ok = isinstance(b, torch.Tensor) and b.numel() == 1 and not any(b is x for x in p2[:i])
            else:
                ok = _same(a, b)
            if not ok:
                bad.append(i)
        assert not bad, bad


def test_traced_launch_records_a_config_that_loads(fake_jit, monkeypatch):
    """Inductor compiles a traced launch later, where a config too big for the device could not
    shrink and retry: the first trace of a signature compiles and loads the kernel first
    (``launch.load``; here a stand-in that refuses tiles above 32x16 or more than one stage, as
    Triton's ``OutOfResources``) and records the config that loads; later traces of the same
    signature load nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    loads = []

    def load(kernel, device, args, kwargs):
        loads.append((kwargs["BM"], kwargs["BN"], kwargs["num_stages"]))
        assert all(not isinstance(a, torch.Tensor) for a in args)  # compiled from dtypes
        if kwargs["BM"] * kwargs["BN"] > 32 * 16 or kwargs["num_stages"] > 1:
            raise triton.runtime.errors.OutOfResources(1 << 20, 1 << 17, "shared memory")

    monkeypatch.setattr(launch, "load", load)
    lay = make_layout(64, 2, "local", blocksize=16, local_attn_ctx=32)
    q, k, v, _ = _inputs()
    names = list(inspect.signature(launch.plan(lay, q).fwd.kernel.fn).parameters)
    n = []
    for _ in range(2):
        with FakeTensorMode() as mode_:
            launch.forward(*(mode_.from_tensor(x) for x in (q, k, v)), lay)
        n.append(len(loads))
    assert n[0] > 1 and n[1] == n[0]  # shrunk at the first trace; the second loads nothing
    assert loads[0] != loads[-1] and loads[-1][0] * loads[-1][1] <= 32 * 16 and loads[-1][2] == 1
    assert len(fake_jit) == 2
    for _, _, params in fake_jit:  # both traces record the config that loaded
        args = dict(zip(names, params, strict=True))
        assert (args["BM"], args["BN"]) == loads[-1][:2]


def test_a_refused_launch_shrinks_and_retries(fake_jit, monkeypatch):
    """Eagerly, a launch that Triton refuses (``OutOfResources``: tiles too big for the device)
    retries with the next smaller config and keeps it; where nothing smaller is left, the
    refusal reaches the caller."""
    refuse = {"area": 32 * 16}
    real_getitem = _FakeJIT.__getitem__

    def getitem(self, grid):
        launch_ = real_getitem(self, grid)

        def checked(*args, num_warps, num_stages, **kw):
            if kw["BM"] * kw["BN"] > refuse["area"] or num_stages > 1:
                raise triton.runtime.errors.OutOfResources(1 << 20, 1 << 17, "shared memory")
            return launch_(*args, num_warps=num_warps, num_stages=num_stages, **kw)

        return checked

    monkeypatch.setattr(_FakeJIT, "__getitem__", getitem)
    lay = make_layout(64, 2, "local", blocksize=16, local_attn_ctx=32)
    q, k, v, _ = _inputs()
    launch.forward(q, k, v, lay)
    kw = launch.plan(lay, q).fwd.kw
    assert kw["BM"] * kw["BN"] <= 32 * 16 and kw["num_stages"] == 1 and len(fake_jit) == 1
    refuse["area"] = 0  # nothing fits: Triton's error, not a silent skip
    launch.plan(lay, q).fwd.bound.clear()
    with pytest.raises(triton.runtime.errors.OutOfResources):
        launch.forward(q, k, v, lay)


def test_traced_launch_survives_a_loader_that_fails(fake_jit, monkeypatch):
    """Where the trace-time check itself cannot run (any error but ``OutOfResources``), the launch
    is recorded with its config as before, with a warning that names the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)

    def load(kernel, device, args, kwargs):
        raise RuntimeError("no driver")

    monkeypatch.setattr(launch, "load", load)
    lay = make_layout(64, 2, "local", blocksize=16, local_attn_ctx=32)
    q, k, v, _ = _inputs()
    kw = dict(launch.plan(lay, q).fwd.kw)
    with pytest.warns(UserWarning, match="fwd_kernel.*no driver"), FakeTensorMode() as mode_:
        launch.forward(*(mode_.from_tensor(x) for x in (q, k, v)), lay)
    assert len(fake_jit) == 1 and launch.plan(lay, q).fwd.kw == kw


def test_traced_merge_launches_through_wrap_triton(monkeypatch):
    """The merge kernels of ``local | strided`` (``kernels/merge.py``) launch through
    ``wrap_triton`` on traced tensors too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparse_attention.torch.kernels import merge

    wrapped = []

    class _Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: wrapped.append((self.kernel, grid))

    monkeypatch.setattr(torch.library, "wrap_triton", _Record)
    with FakeTensorMode() as m:
        q, k, v, do, o1, o2 = (m.from_tensor(x) for x in _inputs() + _inputs()[:2])
        l1, l2 = (m.from_tensor(torch.zeros(1, 2, 64)) for _ in range(2))
        o, lse = merge.merge_forward(q, k, v, o1, l1, o2, l2)
        g = tuple(m.from_tensor(torch.zeros(1, 2, 64, 16, dtype=torch.float16)) for _ in range(3))
        merge.merge_backward(do, q, k, v, o, lse, g, g)
    assert [w[0] for w in wrapped] == [merge._merge_fwd_kernel, merge._merge_bwd_kernel]


def test_a_plan_holds_no_caller_tensor():
    """A built-in mode's plan (kept as long as its layout) keeps no tensor of the call that made
    it: its pointer arguments are each call's own q."""
    import gc
    import weakref

    lay = make_layout(64, 2, "local", 32, blocksize=16)
    q = torch.randn(1, 2, 64, 16, dtype=torch.float16)
    p = launch.plan(lay, q)
    assert p.tables(q)[1][0] is q
    ref = weakref.ref(q)
    del q
    gc.collect()
    assert ref() is None
