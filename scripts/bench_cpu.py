"""The public call on the CPU (the block-gather engine) against PyTorch's SDPA, in one run.

    python scripts/bench_cpu.py                                  # time 1024,4096,16384; 4 heads, head_dim 64
    python scripts/bench_cpu.py --times 4096 --modes local --out benchmarks/cpu

What a user on a CPU sees: ``blocksparse_attention_impl`` on ``[batch, time, heads * head_dim]``
tensors (float32), forward and forward+backward, wall milliseconds (median), against the two
things they would call instead, on the same tensors:

- SDPA, causal and dense (``is_causal=True``: PyTorch's flash kernel for the CPU), which does
  every causal pair, allowed or not;
- SDPA with the pattern's boolean ``[time, time]`` mask (``attention_impl``'s mask, up to
  ``--mask-max`` tokens), which computes the same attention as ours.

Peak memory is the growth of the process's peak resident memory (Linux), so only a call that
exceeds every earlier one shows. The patterns are the presets ``--suite`` (default ``long``:
blocksize 32, ``local``/``strided`` 128, ``fixed`` 128 with one summary block) at ``--times``.
Writes ``cpu-<tag>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from sparse_attention import blocksparse_attention_impl, dense_mask
from sparse_attention.patterns import PRESETS, preset
from sparse_attention.utils.benchmark import (
    add_model_args,
    add_modes_arg,
    comma_list,
    environment,
    fwd_fb_ms,
    script_parser,
    write_results,
)


def parse_args(argv=None):
    ap = script_parser(__doc__)
    add_model_args(ap, n_head=4, head_dim=64, batch=1)
    add_modes_arg(ap, "local,strided,fixed,all")
    ap.add_argument("--times", type=comma_list(int, what="time"), default="1024,4096,16384", help="sequence lengths")
    ap.add_argument("--suite", default="long", choices=sorted(PRESETS), help="pattern presets (default: %(default)s)")
    ap.add_argument(
        "--mask-max", type=int, default=4096, help="longest time of SDPA with the boolean mask (default: %(default)s)"
    )
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--tag", default="bench", help="file names cpu-TAG.* (default: %(default)s)")
    ap.add_argument("--out", default=None, help="directory for cpu-TAG.json and .md")
    return ap.parse_args(argv)


def _heads(x, H):
    B, T, _ = x.shape
    return x.view(B, T, H, -1).transpose(1, 2)


def _merge(x):
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def run_case(mode: str, T: int, args) -> dict:
    """Ours and the peers at one (mode, time): their :func:`fwd_fb_ms` results by name."""
    B, H, D = args.batch, args.n_head, args.head_dim
    p = preset(mode, args.suite)
    kw = {k: v for k, v in p.kwargs().items() if k != "attn_mode"}
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H * D, generator=g) for _ in range(4))

    def ours(q, k, v):
        return blocksparse_attention_impl(q, k, v, H, mode, **kw)

    def causal(q, k, v):
        return _merge(F.scaled_dot_product_attention(_heads(q, H), _heads(k, H), _heads(v, H), is_causal=True))

    res = {"ours": fwd_fb_ms(ours, q, k, v, do, "cpu", args.budget)}
    res["sdpa causal"] = fwd_fb_ms(causal, q, k, v, do, "cpu", args.budget)
    if T <= args.mask_max:
        mask = torch.from_numpy(dense_mask(T, H, mode, **kw))  # [heads, T, T]

        def masked(q, k, v):
            o = F.scaled_dot_product_attention(_heads(q, H), _heads(k, H), _heads(v, H), attn_mask=mask)
            return _merge(o)

        res["sdpa mask"] = fwd_fb_ms(masked, q, k, v, do, "cpu", args.budget)
    return res


def _cell(r: dict) -> str:
    if "fwd_ms" not in r or "fb_ms" not in r:
        return "–"
    return f"{r['fwd_ms']:.1f} / {r['fb_ms']:.1f}"


def _ratio(r: dict, base: dict) -> str:
    if not all(x in d for d in (r, base) for x in ("fwd_ms", "fb_ms")):
        return "–"
    return f"{r['fwd_ms'] / base['fwd_ms']:.2f} / {r['fb_ms'] / base['fb_ms']:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| mode | time | ours | SDPA causal | SDPA + mask | SDPA causal / ours | SDPA + mask / ours |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        res = r["results"]
        ours = res["ours"]
        causal, masked = res["sdpa causal"], res.get("sdpa mask", {})
        lines.append(
            f"| {r['mode']} | {r['time']} | {_cell(ours)} | {_cell(causal)} | {_cell(masked)} | "
            f"{_ratio(causal, ours)} | {_ratio(masked, ours)} |"
        )
    return (
        head + "\n".join(lines) + "\n\nWall ms per call (median), forward / forward+backward; ratios > 1: ours faster."
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu", argv, "scripts/bench_cpu.py")
    print(f"{env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for T in args.times:
        for mode in args.modes:
            rows.append({"mode": mode, "time": T, "results": run_case(mode, T, args)})
            print(table(rows[-1:]).splitlines()[2], flush=True)
    text = table(rows)
    print(text)
    rec = {**env, "threads": torch.get_num_threads(), "args": vars(args), "rows": rows}
    write_results(args.out, f"cpu-{args.tag}", rec, text)


if __name__ == "__main__":
    main(sys.argv[1:])
