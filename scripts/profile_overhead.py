"""Where the time of a short block-sparse call goes on the GPU: host time against kernel time.

For each mode at the issue's target shape (fp16, B2 H8 T16384 D64; the target presets at
``--blocksize``) it measures, for the forward (no grad) and the forward+backward:

- ``event``: the benchmark's timing (CUDA events around one call, median), what users see;
- ``host``: host microseconds per call, from a loop of calls without synchronisation;
- ``gpu``: the sum of the kernels' durations per call (torch.profiler);
- ``graph``: one CUDA-graph replay of the call (the kernels back to back, no host work);

then ``host`` again for every call as interleaved medians (one call at a time on an idle device,
the callables taking turns: a shared host's slow spells hit all alike), with the ratio to Flex;
through the public function and through the bare autograd Function (no argument checks), and
for FlexAttention ``local`` as the peer; with ``--compiled`` also the public call under
``torch.compile`` (default mode), once with the opaque ops and once with the ops as kernel
launches that Inductor emits (``SPARSE_ATTENTION_INLINE_LAUNCHES=1``). ``calibrate`` first
times plain PyTorch calls on the machine (an allocation, a tiny kernel, a tiny autograd
backward) and our forward launcher. With ``--ops``, only the ops as a compiled graph with opaque
ops calls them, against PyTorch's flash and cuDNN SDPA ops, and a ``cProfile`` of our backward
op (a compiled model step's host time in attention; :func:`op_calls`).

    python scripts/profile_overhead.py --out results.json
    python scripts/profile_overhead.py --ops --out ops.json
"""

from __future__ import annotations

import functools
import json
import os

import torch

from sparse_attention import blocksparse_attention_impl
from sparse_attention.patterns import preset
from sparse_attention.torch import blocksparse_attention_bhtd
from sparse_attention.torch.baselines import flex_block_mask
from sparse_attention.torch.dispatch import EagerAttention, engine
from sparse_attention.torch.kernels import launch
from sparse_attention.utils.benchmark import (
    attention_parser,
    environment,
    fwd_and_fb,
    gpu_us,
    graph_ms,
    host_us,
    host_us_interleaved,
    timeit,
    torch_dtype,
)


def measure(name, f, q, k, v, do, graphs=True):
    fwd, fb = fwd_and_fb(f, q, k, v, do)
    rec = {}
    for tag, fn in (("fwd", fwd), ("fb", fb)):
        fn()
        fn()
        torch.cuda.synchronize()
        r = dict(event_ms=timeit(fn, budget_s=0.2, max_reps=50), host_us=host_us(fn))
        r["gpu_us"], r["kernels"] = gpu_us(fn)
        if graphs and tag == "fwd":
            try:
                r["graph_ms"] = graph_ms(fn)
            except Exception as e:  # capture is best effort
                r["graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rec[tag] = r
        print(
            f"{name:24s} {tag:3s} event {r['event_ms']:.3f} ms  host {r['host_us']:7.1f} us  "
            f"gpu {r['gpu_us']:7.1f} us  graph {r.get('graph_ms', float('nan')):.3f} ms  {r['kernels']}",
            flush=True,
        )
    return rec


def calibrate(res, args):
    """Host microseconds of plain PyTorch calls on this machine and of our forward launcher."""
    B, H, T, D = args.batch, args.n_head, args.n_ctx, args.head_dim
    x = torch.randn(1024, device="cuda")
    xs = x.clone().requires_grad_()
    g = torch.ones_like(x)
    cal = dict(
        empty_us=host_us(lambda: torch.empty(B, H, T, D, device="cuda", dtype=torch_dtype(args.dtype)), 200),
        add_us=host_us(lambda: x.add_(1.0), 200),
        autograd_mul_fb_us=host_us(lambda: (xs * 2.0).backward(g), 200),
    )
    lay = preset("local", blocksize=args.blocksize).layout(T, H)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch_dtype(args.dtype)) for _ in range(3))
    launch.forward(q, k, v, lay)
    cal["launch_forward_us"] = host_us(lambda: launch.forward(q, k, v, lay), 200)
    print("calibration:", cal, flush=True)
    res["calibration"] = cal


def op_calls(res, a, out_prefix=None):
    """Host microseconds of the attention ops as a compiled graph with opaque ops calls them
    (``torch.ops.sparse_attention.attn_fwd`` / ``attn_bwd`` on ``[B, H, T, D]``), against
    PyTorch's flash and cuDNN SDPA ops called the same way (forward, then backward from the
    forward's outputs), interleaved; then ``cProfile`` of our backward op's Python per mode
    (printed, and written next to ``--out``): where a compiled step's host time in attention
    goes."""
    import cProfile
    import io
    import pstats

    from sparse_attention.torch.dispatch import attention_op, layout_spec

    B, H, T, D = a.batch, a.n_head, a.n_ctx, a.head_dim
    dt = torch_dtype(a.dtype)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dt) for _ in range(4))
    aten = torch.ops.aten
    flash, cudnn = aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention
    peers = {  # name: (forward, backward from the forward's outputs), as AOTAutograd's graphs call them
        "flash": (
            lambda: flash.default(q, k, v, 0.0, True),
            lambda r: aten._scaled_dot_product_flash_attention_backward.default(
                do, q, k, v, r[0], r[1], r[2], r[3], r[4], r[5], 0.0, True, r[6], r[7]
            ),
        ),
        "cudnn": (
            lambda: cudnn.default(q, k, v, None, True, 0.0, True),
            lambda r: aten._scaled_dot_product_cudnn_attention_backward.default(
                do, q, k, v, r[0], r[1], r[6], r[7], None, r[2], r[3], r[4], r[5], 0.0, True
            ),
        ),
    }
    calls = {}
    for name, (fwd, bwd) in peers.items():
        try:
            r = fwd()
            bwd(r)
        except Exception as e:  # noqa: BLE001 - a peer this device or build lacks
            print(f"{name} ops skipped: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        calls[f"{name}/fwd"], calls[f"{name}/bwd"] = fwd, functools.partial(bwd, r)
    fwd_op, bwd_op = attention_op.fwd_op, attention_op.bwd_op
    bwds = {}
    for mode in a.modes:
        key = layout_spec(preset(mode, blocksize=a.blocksize).layout(T, H))
        o, lse = fwd_op(q, k, v, key, 0)
        calls[f"{mode}/fwd"] = lambda key=key: fwd_op(q, k, v, key, 0)
        calls[f"{mode}/bwd"] = bwds[mode] = lambda key=key, o=o, lse=lse: bwd_op(do, q, k, v, o, lse, key, 0)
    for f in calls.values():
        f()
    torch.cuda.synchronize()
    ops = host_us_interleaved(calls, reps=a.host_reps)
    print("\nhost us per op call, as a compiled graph calls the ops (interleaved medians):", flush=True)
    for name, us in ops.items():
        print(f"  {name:20s} {us:8.1f}", flush=True)
    res["op_host_us"] = ops
    for mode, f in bwds.items():
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(100):
            f()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(f"\ncProfile, 100 calls of the {mode} backward op:\n{text.getvalue()}", flush=True)
        if out_prefix:
            with open(f"{out_prefix}-cprofile-{mode}-bwd.txt", "w") as fh:
                fh.write(text.getvalue())


@torch.compile(fullgraph=True, dynamic=False)
def compiled_op(q, k, v, heads, kw):
    return blocksparse_attention_impl(q, k, v, heads, **kw)


@torch.compile(fullgraph=True, dynamic=False)
def compiled_launches(q, k, v, heads, kw):
    return blocksparse_attention_impl(q, k, v, heads, **kw)


def main(argv=None):
    ap = attention_parser(
        __doc__, "local,strided,fixed", "fp16", device=False, batch=2, n_head=8, n_ctx=16384, head_dim=64, blocksize=32
    )
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention peer (local)")
    ap.add_argument("--out", default=None, help="JSON file of the results")
    ap.add_argument("--host-reps", type=int, default=200, help="interleaved host-time samples per call")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="also the public call under torch.compile: opaque ops, and ops as kernel launches (Inductor's)",
    )
    ap.add_argument(
        "--ops",
        action="store_true",
        help="only the host time of the ops as a compiled graph calls them (ours against the flash and "
        "cuDNN SDPA ops), and cProfile of our backward op",
    )
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_overhead.py needs a CUDA GPU")
    B, H, T, D = a.batch, a.n_head, a.n_ctx, a.head_dim

    def inputs():
        return (torch.randn(B, H, T, D, device="cuda", dtype=torch_dtype(a.dtype)) for _ in range(4))

    res, callables = {}, {}
    calibrate(res, a)
    if a.ops:
        op_calls(res, a, a.out and os.path.splitext(a.out)[0])
        if a.out:
            with open(a.out, "w") as f:
                json.dump(dict(meta=environment("cuda", argv, __file__), results=res), f, indent=1)
        return
    for mode in a.modes:
        lay = preset(mode, blocksize=a.blocksize).layout(T, H)
        q, k, v, do = inputs()
        f = lambda x, y, z, lay=lay: blocksparse_attention_bhtd(x, y, z, lay)  # noqa: E731
        res[f"{mode}/ours"] = measure(f"{mode}/ours", f, q, k, v, do)
        callables[f"{mode}/ours"] = (f, q, k, v, do)
        # the public call on [batch, time, heads * head_dim] (heads split as views, no copies)
        pq, pk, pv, pdo = (x.transpose(1, 2).reshape(B, T, H * D) for x in (q, k, v, do))
        kw = preset(mode, blocksize=a.blocksize).kwargs()
        pub = lambda x, y, z, kw=kw: blocksparse_attention_impl(x, y, z, H, **kw)  # noqa: E731
        res[f"{mode}/public"] = measure(f"{mode}/public", pub, pq, pk, pv, pdo)
        callables[f"{mode}/public"] = (pub, pq, pk, pv, pdo)
        if a.compiled:
            # compiled (default mode) public call: the opaque ops, then the ops as kernel launches
            # that Inductor emits (SPARSE_ATTENTION_INLINE_LAUNCHES, read as Dynamo traces a call);
            # two functions, so that each has its own compiled graphs
            for inline, comp in (("0", compiled_op), ("1", compiled_launches)):
                name = f"{mode}/compiled-" + ("launches" if inline == "1" else "op")
                os.environ["SPARSE_ATTENTION_INLINE_LAUNCHES"] = inline
                fn = lambda x, y, z, kw=kw, comp=comp: comp(x, y, z, H, kw)  # noqa: E731
                try:
                    res[name] = measure(name, fn, pq, pk, pv, pdo, graphs=False)
                    callables[name] = (fn, pq, pk, pv, pdo)
                except Exception as e:  # report and go on: the opt-in path is new
                    res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                    print(f"{name}: {res[name]['error']}", flush=True)
            os.environ.pop("SPARSE_ATTENTION_INLINE_LAUNCHES")
        fwd, bwd, _ = engine(q, lay)
        lf = lambda x, y, z, lay=lay, fwd=fwd, bwd=bwd: EagerAttention.apply(x, y, z, fwd, bwd, lay)  # noqa: E731
        res[f"{mode}/no-checks"] = measure(f"{mode}/no-checks", lf, q, k, v, do, graphs=False)
    if not a.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        p = preset("local", blocksize=a.blocksize)
        bm = flex_block_mask(p.spec, H, T, p.blocksize, "cuda")
        q, k, v, do = inputs()
        fl = lambda x, y, z: flex(x, y, z, block_mask=bm)  # noqa: E731
        res["flex-local"] = measure("flex-local", fl, q, k, v, do)
        callables["flex-local"] = (fl, q, k, v, do)
    # host time per call, the callables taking turns (the host's slow spells hit all alike)
    host = {}
    for tag in ("fwd", "fb"):
        calls = {name: fwd_and_fb(*c)[0 if tag == "fwd" else 1] for name, c in callables.items()}
        for name, us in host_us_interleaved(calls, reps=a.host_reps).items():
            host[f"{name}/{tag}"] = us
    ref = {tag: host.get(f"flex-local/{tag}") for tag in ("fwd", "fb")}
    print("\nhost us per call, interleaved medians (x flex-local):")
    for key, us in host.items():
        r = ref[key.rsplit("/", 1)[1]]
        print(f"  {key:28s} {us:8.1f}" + (f"  {us / r:5.2f}x" if r else ""))
    res["host_interleaved_us"] = host
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=environment("cuda", argv, __file__), results=res), f, indent=1)


if __name__ == "__main__":
    main()
