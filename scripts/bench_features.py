"""Packed documents and bidirectional patterns against FlexAttention with the same masks, in one
run (grouped-query heads: ``scripts/bench_gqa.py``).

* ``packed``: ``time`` tokens in one sequence as documents (``cu_seqlens``): one document, equal
  documents of ``--doc-len`` tokens, two unequal ones (3/4 + 1/4) and a long-tailed mix; against the same tokens
  without boundaries (``[1, time]``), the equal documents as a batch (``[time / doc_len, doc_len]``), and
  Flex under the pattern composed with the document mask; and ``[1, time - 1]`` (every launch
  masks a tail tile, as documents whose lengths the tiles do not divide do; not ``strided``).
  The public call runs equal documents as a batch and mixed lengths of ``all``/``local``/``fixed``
  on the document-aware kernels;
  ``packed layout``: the same documents as a packed layout (``attn_mode=packed_layout(...)``, the
  kernels' table-driven path), and ``layout_ms`` the host time to build it (once per batch of
  documents). ``new documents``: what a training step sees, a forward+backward with another
  long-tailed mix every call (wall milliseconds per call, synchronised, median): the public
  call, the packed layout built per call, and Flex with its block mask built per call.
* ``bidirectional``: ``causal=False`` against the causal call and Flex's bidirectional mask.

GPU time (CUDA-graph replays) and events, forward and forward+backward, in ms.

    python scripts/bench_features.py --out benchmarks/features-h200
"""

from __future__ import annotations

import functools
import json
import sys
import time as _time

import numpy as np
import torch

import sparse_attention as sa
from sparse_attention.layouts import packed_layout
from sparse_attention.modes import allowed
from sparse_attention.patterns import preset
from sparse_attention.utils.benchmark import (
    attention_parser,
    comma_list,
    environment,
    fwd_fb_ms,
    torch_dtype,
    write_results,
)


def parse_args(argv=None):
    p = attention_parser(__doc__, dtype="fp16", n_head=8, n_ctx=16384, head_dim=64)
    p.add_argument("--sections", type=comma_list(str, ("packed", "bidirectional")), default=["packed", "bidirectional"])
    p.add_argument("--doc-len", type=int, default=4096, help="length of the equal documents (default: %(default)s)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--no-packed-layout", action="store_true", help="skip the documents as a packed layout")
    p.add_argument(
        "--new-docs", type=int, default=8, help="calls, each with new documents, of the 'new documents' rows"
    )
    p.add_argument("--out", default=None, help="directory for features.json and features.md")
    return p.parse_args(argv)


def long_tailed(total: int, seed: int = 0) -> list[int]:
    """Document lengths summing to ``total``: Pareto-distributed (many short, a few long)."""
    rng = np.random.default_rng(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(min(max(16, 64 * (1 + rng.pareto(1.2))), total)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


class FlexPeer:
    """Compiled FlexAttention under the mode's closed form, one compiled function per (mode,
    causal, documents): with documents the mask reads the document index and first position of
    each token from two buffers that :meth:`set_documents` overwrites in place, so every mix of
    documents reuses one compilation (a new ``mask_mod`` per mix would recompile Flex)."""

    def __init__(self, kw, heads, T, device, causal=True, documents=False):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mode = kw["attn_mode"]
        args = (kw.get("local_attn_ctx"), kw["blocksize"], kw.get("num_verts"), kw.get("vertsize"), causal)
        self.doc = torch.zeros(T, dtype=torch.int64, device=device)
        self.start = torch.zeros(T, dtype=torch.int64, device=device)
        doc, start = self.doc, self.start
        if documents:

            def mask_mod(b, h, i, j):
                return (doc[i] == doc[j]) & allowed(i - start[i], j - start[j], h, mode, *args)

        else:

            def mask_mod(b, h, i, j):
                return allowed(i, j, h, mode, *args)

        self.block_mask = lambda: create_block_mask(mask_mod, None, heads, T, T, device=device, _compile=T > 8192)
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.T = T

    def set_documents(self, cu) -> None:
        cut = torch.tensor(cu, device=self.doc.device)
        pos = torch.arange(self.T, device=self.doc.device)
        self.doc.copy_(torch.searchsorted(cut, pos, right=True) - 1)
        self.start.copy_(cut[self.doc])

    def __call__(self):
        """The call ``f(q, k, v)`` under the current documents."""
        bm = self.block_mask()
        return lambda q, k, v: self.flex(q, k, v, block_mask=bm)


def new_documents_ms(kw, H, T, xs, dev, peer, n) -> dict:
    """Wall milliseconds per forward+backward (median of ``n`` after a warm-up) with another
    long-tailed mix of documents every call: the public call (``cu_seqlens``), the packed layout
    built in the call, and Flex with its block mask built in the call (``peer``; its compiled
    kernel is reused)."""
    q, k, v, do = (x.detach().requires_grad_(i < 3) for i, x in enumerate(xs))
    mixes = [np.concatenate([[0], np.cumsum(long_tailed(T, seed=s))]).tolist() for s in range(1, n + 3)]

    def sync():
        if dev != "cpu":
            torch.cuda.synchronize()

    def ours(cu):
        sa.blocksparse_attention_impl(q, k, v, H, cu_seqlens=cu, **kw).backward(do)

    def layout(cu):
        sa.blocksparse_attention_impl(q, k, v, H, packed_layout(cu, H, **kw)).backward(do)

    def flex(cu):
        peer.set_documents(cu)
        heads = [x.view(1, T, H, -1).transpose(1, 2) for x in (q, k, v, do)]
        peer()(*heads[:3]).backward(heads[3])

    out = {}
    for name, fn in (("packed", ours), ("packed layout", layout), ("flex", flex if peer is not None else None)):
        if fn is None:
            continue
        times = []
        for cu in mixes:
            sync()
            t = _time.perf_counter()
            fn(cu)
            sync()
            times.append((_time.perf_counter() - t) * 1e3)
        out[name] = float(np.median(times[2:]))
    return out


def _log(t0, *what):
    print(f"[{_time.perf_counter() - t0:7.1f} s]", *what, file=sys.stderr, flush=True)


def run(args) -> list[dict]:
    dev, dtype = args.device, torch_dtype(args.dtype)
    H, T, D = args.n_head, args.n_ctx, args.head_dim
    g = torch.Generator().manual_seed(0)
    rows = []
    t0 = _time.perf_counter()

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    def flex_ms(peer, xs):
        try:
            return fwd_fb_ms(peer(), *[x.view(1, T, H, D).transpose(1, 2).contiguous() for x in xs], dev)
        except Exception as e:  # a peer that fails is reported, not fatal
            return {"error": f"{type(e).__name__}: {str(e)[:160]}"}

    for mode in args.modes:
        kw = preset(mode).kwargs()
        if "packed" in args.sections:
            mixes = {
                "1 document": [T],
                f"{T // args.doc_len} x {args.doc_len}": [args.doc_len] * (T // args.doc_len),
                f"{3 * T // 4} + {T // 4}": [3 * T // 4, T - 3 * T // 4],
                "long-tailed": long_tailed(T),
            }
            xs = q, k, v, do = tuple(rand(1, T, H * D) for _ in range(4))
            base = fwd_fb_ms(lambda a, b, c, kw=kw: sa.blocksparse_attention_impl(a, b, c, H, **kw), q, k, v, do, dev)
            _log(t0, mode, "unpacked", base)
            # the same call on T - 1 tokens: every launch masks its tail tile (TAIL), as packed
            # documents whose lengths the tiles do not divide do; against base, what the masks
            # cost (not strided, whose time is a multiple of its stride l)
            tail = None
            if mode != "strided":
                tail = fwd_fb_ms(
                    lambda a, b, c, kw=kw: sa.blocksparse_attention_impl(a, b, c, H, **kw),
                    *(x[:, : T - 1] for x in xs),
                    dev,
                )
                _log(t0, mode, "unpacked, T - 1 tokens", tail)
            peer = None if args.no_flex else FlexPeer(kw, H, T, dev, documents=True)
            for name, lens in mixes.items():
                cu = np.concatenate([[0], np.cumsum(lens)]).tolist()
                t1 = _time.perf_counter()
                lay = packed_layout(cu, H, **kw)
                layout_ms = (_time.perf_counter() - t1) * 1e3
                res = {"unpacked [1, T]": base, "layout_ms": layout_ms}
                if tail is not None:
                    res["unpacked [1, T - 1]"] = tail
                res["packed"] = fwd_fb_ms(
                    lambda a, b, c, cu=cu, kw=kw: sa.blocksparse_attention_impl(a, b, c, H, cu_seqlens=cu, **kw),
                    *xs,
                    dev,
                )
                _log(t0, mode, name, "packed", res["packed"])
                if mode in ("all", "local") and len(set(lens)) > 1:
                    from sparse_attention.torch.kernels import launch

                    # the other way of the kernels (launch.DOC_ROWS): tiles of the whole row with
                    # each position's document bounds, instead of per-document work lists
                    other = "packed, per position" if not launch.DOC_ROWS else "packed, per document"

                    def flipped(a, b, c, cu=cu, kw=kw):
                        launch.DOC_ROWS = not launch.DOC_ROWS
                        try:
                            return sa.blocksparse_attention_impl(a, b, c, H, cu_seqlens=cu, **kw)
                        finally:
                            launch.DOC_ROWS = not launch.DOC_ROWS

                    res[other] = fwd_fb_ms(flipped, *xs, dev)
                    _log(t0, mode, name, other, res[other])
                if not args.no_packed_layout:
                    res["packed layout"] = fwd_fb_ms(
                        lambda a, b, c, lay=lay: sa.blocksparse_attention_impl(a, b, c, H, lay), *xs, dev
                    )
                    _log(t0, mode, name, "packed layout", res["packed layout"])
                if len(set(lens)) == 1 and len(lens) > 1:
                    n = lens[0]
                    res["batch of documents"] = fwd_fb_ms(
                        lambda a, b, c, kw=kw: sa.blocksparse_attention_impl(a, b, c, H, **kw),
                        *[x.view(len(lens), n, -1) for x in xs],
                        dev,
                    )
                if peer is not None:
                    peer.set_documents(cu)
                    res["flex"] = flex_ms(peer, xs)
                    _log(t0, mode, name, "flex", res["flex"])
                rows.append(dict(section="packed", mode=mode, docs=name, n_docs=len(lens), T=T, H=H, D=D, results=res))
                print(json.dumps(rows[-1]), flush=True)
            res = new_documents_ms(kw, H, T, xs, dev, peer, args.new_docs)
            _log(t0, mode, "new documents", res)
            rows.append(dict(section="new documents", mode=mode, T=T, H=H, D=D, results=res))
            print(json.dumps(rows[-1]), flush=True)
        if "bidirectional" in args.sections:
            xs = q, k, v, do = tuple(rand(1, T, H * D) for _ in range(4))
            res = {}
            for causal in (True, False):
                tag = "causal" if causal else "bidirectional"
                call = functools.partial(sa.blocksparse_attention_impl, heads=H, causal=causal, **kw)
                res[tag] = fwd_fb_ms(call, *xs, dev)
                _log(t0, mode, tag, res[tag])
                if not args.no_flex:
                    res["flex " + tag] = flex_ms(FlexPeer(kw, H, T, dev, causal=causal), xs)
                    _log(t0, mode, "flex", tag, res["flex " + tag])
            rows.append(dict(section="bidirectional", mode=mode, T=T, H=H, D=D, results=res))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _f(x):
    return "–" if x is None else f"{x:.3f}"


def _pair(r: dict, key: str) -> str:
    x = r.get(key, {})
    return f"{_f(x.get('fwd_gpu_ms'))} / {_f(x.get('fb_gpu_ms'))}"


def _ratio(r: dict, a: str, b: str) -> str:
    out = []
    for k in ("fwd_gpu_ms", "fb_gpu_ms"):
        x, y = r.get(a, {}).get(k), r.get(b, {}).get(k)
        out.append("–" if x is None or y is None else f"{x / y:.2f}")
    return " / ".join(out)


def table(rows: list[dict]) -> str:
    lines = ["GPU time (CUDA-graph replays), ms, forward / forward+backward.", ""]
    packed = [r for r in rows if r["section"] == "packed"]
    if packed:
        lines += [
            "| mode | documents | packed | packed, the kernels' other way | packed layout | unpacked [1, T] | "
            "batch of documents | Flex + document mask | packed / unpacked | other way / packed | "
            "packed layout / packed | Flex / packed | layout build ms | unpacked T - 1 / T (tail masks) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in packed:
            r = row["results"]
            other = next((k for k in ("packed, per position", "packed, per document") if k in r), "-")
            lines.append(
                f"| {row['mode']} | {row['docs']} | {_pair(r, 'packed')} | {_pair(r, other)} | "
                f"{_pair(r, 'packed layout')} | {_pair(r, 'unpacked [1, T]')} | "
                f"{_pair(r, 'batch of documents')} | {_pair(r, 'flex')} | {_ratio(r, 'packed', 'unpacked [1, T]')} | "
                f"{_ratio(r, other, 'packed')} | {_ratio(r, 'packed layout', 'packed')} | "
                f"{_ratio(r, 'flex', 'packed')} | {r['layout_ms']:.0f} | "
                f"{_ratio(r, 'unpacked [1, T - 1]', 'unpacked [1, T]')} |"
            )
        lines.append("")
    fresh = [r for r in rows if r["section"] == "new documents"]
    if fresh:
        lines += [
            "New documents every call (a long-tailed mix): wall ms per forward+backward, median.",
            "",
            "| mode | packed | packed layout, built per call | Flex, block mask built per call |",
            "|---|---|---|---|",
        ]
        for row in fresh:
            r = row["results"]
            cells = " | ".join("–" if r.get(k) is None else f"{r[k]:.2f}" for k in ("packed", "packed layout", "flex"))
            lines.append(f"| {row['mode']} | {cells} |")
        lines.append("")
    bidir = [r for r in rows if r["section"] == "bidirectional"]
    if bidir:
        lines += [
            "| mode | bidirectional | causal | Flex bidirectional | Flex causal | Flex / ours, bidirectional | "
            "Flex / ours, causal |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in bidir:
            r = row["results"]
            lines.append(
                f"| {row['mode']} | {_pair(r, 'bidirectional')} | {_pair(r, 'causal')} | "
                f"{_pair(r, 'flex bidirectional')} | {_pair(r, 'flex causal')} | "
                f"{_ratio(r, 'flex bidirectional', 'bidirectional')} | {_ratio(r, 'flex causal', 'causal')} |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    rec = dict(environment(args.device, argv, script="scripts/bench_features.py"), rows=rows)
    md = table(rows)
    print(md)
    write_results(args.out, "features", rec, md)


if __name__ == "__main__":
    main()
