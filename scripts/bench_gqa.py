"""Grouped-query attention: ``blocksparse_attention_impl`` with ``k``, ``v`` of ``kv_heads`` heads
against the same call on k, v expanded to every query head, and against FlexAttention
(``enable_gqa=True``, the same masks), in one run.

Per mode of the target presets and per ``--kv-heads``: GPU time (CUDA-graph replays) and CUDA
events per call, forward and forward+backward, of

* ``grouped``: the public call on ``[B, T, kv_heads * D]`` k, v (the kernels read each key/value
  head once per group);
* ``expanded``: what a user without grouped heads writes: ``repeat_interleave`` of k, v to every
  query head, then the call (the gradients are summed back by autograd);
* ``pre-expanded``: the call on k, v already expanded (no copy timed; the same work as ``expanded``
  without its copies);
* ``flex``: compiled FlexAttention on ``[B, H, T, D]`` q and ``[B, kv_heads, T, D]`` k, v with
  ``enable_gqa=True``, best of its forms (``strided`` also transposed).

    python scripts/bench_gqa.py --kv-heads 1,2 --out benchmarks/gqa-h200
"""

from __future__ import annotations

import json

import torch

import sparse_attention as sa
from sparse_attention.patterns import preset
from sparse_attention.utils.benchmark import (
    attention_parser,
    comma_list,
    environment,
    flex_forms,
    fwd_fb_ms,
    torch_dtype,
    write_results,
)


def parse_args(argv=None):
    p = attention_parser(__doc__, dtype="fp16", batch=2, n_head=8, n_ctx=16384, head_dim=64)
    p.add_argument("--kv-heads", type=comma_list(int), default=[1, 2], help="key/value head counts (comma list)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--out", default=None, help="directory for gqa.json and gqa.md")
    return p.parse_args(argv)


def run(args) -> list[dict]:
    dev = args.device
    dtype = torch_dtype(args.dtype)
    B, H, T, D = args.batch, args.n_head, args.n_ctx, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for mode in args.modes:
        pr = preset(mode)
        kw = pr.kwargs()
        for hk in args.kv_heads:
            G = H // hk
            q = torch.randn(B, T, H * D, generator=g).to(dev, dtype)
            k, v = (torch.randn(B, T, hk * D, generator=g).to(dev, dtype) for _ in range(2))
            do = torch.randn(B, T, H * D, generator=g).to(dev, dtype)

            def expand(x, G=G, hk=hk):
                return x.view(B, T, hk, 1, D).expand(B, T, hk, G, D).reshape(B, T, hk * G * D)

            def call(a, b, c, kw=kw):
                return sa.blocksparse_attention_impl(a, b, c, H, **kw)

            res = {
                "grouped": fwd_fb_ms(call, q, k, v, do, dev),
                "expanded": fwd_fb_ms(lambda a, b, c: call(a, expand(b), expand(c)), q, k, v, do, dev),
                "pre-expanded": fwd_fb_ms(call, q, expand(k), expand(v), do, dev),
            }
            if not args.no_flex:
                res.update(flex_timings(pr, q, k, v, do, H))
            row = dict(kv_heads=hk, B=B, H=H, T=T, D=D, dtype=args.dtype, **kw, mode=mode, results=res)
            rows.append(row)
            print(json.dumps({"mode": mode, "kv_heads": hk, **{n: r for n, r in res.items()}}), flush=True)
    return rows


def flex_timings(pr, q, k, v, do, H) -> dict:
    from torch import _dynamo
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_attention.torch.baselines import flex_block_mask

    for name in ("recompile_limit", "cache_size_limit"):
        try:
            setattr(_dynamo.config, name, 64)
        except Exception:
            pass
    flex = torch.compile(flex_attention, dynamic=False)
    B, T, HD = q.shape
    D = HD // H
    out = {}
    for name, spec, perm in flex_forms(pr, T):
        try:
            bm = flex_block_mask(spec, H, T, pr.blocksize, q.device)
            xs = [x.view(B, T, -1, D).transpose(1, 2) for x in (q, k, v, do)]
            if perm is not None:
                idx = torch.from_numpy(perm).to(q.device)
                xs = [x.index_select(2, idx) for x in xs]
            xs = [x.contiguous() for x in xs]

            def f(a, b, c, bm=bm):
                return flex(a, b, c, block_mask=bm, enable_gqa=True)

            out[name] = fwd_fb_ms(f, *xs, q.device)
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    return out


def best(res: dict, key: str):
    got = [r[key] for n, r in res.items() if n.startswith("flex") and key in r]
    return min(got) if got else None


def table(rows: list[dict]) -> str:
    def f(x):
        return "–" if x is None else f"{x:.3f}"

    lines = [
        "GPU time (CUDA-graph replays), ms, forward / forward+backward; ratios are grouped's time over the "
        "other's (below 1: grouped is faster).",
        "",
        "| mode | kv heads | grouped | expanded | pre-expanded | Flex (enable_gqa) | grouped / expanded | "
        "grouped / pre-expanded | Flex / grouped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r["results"]

        def pair(name, res=res):
            x = res.get(name, {})
            return f"{f(x.get('fwd_gpu_ms'))} / {f(x.get('fb_gpu_ms'))}"

        def ratio(a, b, res=res, flip=False):
            out = []
            for k in ("fwd_gpu_ms", "fb_gpu_ms"):
                x = res.get(a, {}).get(k) if a != "flex" else best(res, k)
                y = res.get(b, {}).get(k) if b != "flex" else best(res, k)
                out.append("–" if x is None or y is None else f"{x / y:.2f}")
            return " / ".join(out)

        flex = f"{f(best(res, 'fwd_gpu_ms'))} / {f(best(res, 'fb_gpu_ms'))}"
        lines.append(
            f"| {r['mode']} | {r['kv_heads']} | {pair('grouped')} | {pair('expanded')} | {pair('pre-expanded')} | "
            f"{flex} | {ratio('grouped', 'expanded')} | {ratio('grouped', 'pre-expanded')} | "
            f"{ratio('flex', 'grouped')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    rec = dict(environment(args.device, argv, script="scripts/bench_gqa.py"), rows=rows)
    md = table(rows)
    print(md)
    write_results(args.out, "gqa", rec, md)


if __name__ == "__main__":
    main()
