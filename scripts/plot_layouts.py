"""Draw the four built-in modes (token-level masks, natural order) into one PNG.

    python scripts/plot_layouts.py docs/layouts.png --migrated docs/layouts-migrated.png

The patterns are ``sparse_attention.patterns.PRESETS["small"]``; the last panel is ``fixed``'s
second head (the other summary block). ``--migrated`` also draws the layouts users bring from
elsewhere: DeepSpeed's configs (``layouts.deepspeed_layout``), Longformer and BigBird.
"""

from __future__ import annotations

from sparse_attention.patterns import PRESETS
from sparse_attention.utils.benchmark import add_model_args, script_parser


def main(argv=None):
    ap = script_parser(__doc__)
    ap.add_argument("path", nargs="?", default="docs/layouts.png", help="the PNG to write (default: %(default)s)")
    ap.add_argument("--migrated", default=None, help="also draw the migrated layouts into this PNG")
    add_model_args(ap, n_ctx=256)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6))
    presets = PRESETS["small"]
    for ax, p in zip(axes, presets.values()):
        p.layout(args.n_ctx, 2).plot(heads=[0], ax=ax, tokens=True)
        extra = ", ".join(f"{k}={v}" for k, v in p.kwargs().items() if k not in ("attn_mode", "blocksize"))
        ax.set_title(f"{p.mode}\n{extra}", fontsize=9)
    presets["fixed"].layout(args.n_ctx, 2).plot(heads=[1], ax=axes[4], tokens=True)
    axes[4].set_title("fixed, head 1\n(the other summary block)", fontsize=9)
    sizes = {p.blocksize for p in presets.values()}
    fig.suptitle(f"Allowed (query, key) pairs, time={args.n_ctx}, blocksize={'/'.join(map(str, sizes))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.path, dpi=110)
    print(f"wrote {args.path}")
    if args.migrated:
        plot_migrated(plt, args.n_ctx, args.migrated)


def plot_migrated(plt, T: int, path: str) -> None:
    from sparse_attention.layouts import bigbird_layout, deepspeed_layout, longformer_layout

    panels = {
        "DeepSpeed fixed\nbidirectional": deepspeed_layout("fixed", T, 1, 16),
        "DeepSpeed fixed\nunidirectional": deepspeed_layout("fixed", T, 1, 16, attention="unidirectional"),
        "DeepSpeed bigbird\n(seed 0)": deepspeed_layout("bigbird", T, 1, 16, seed=0),
        "DeepSpeed bslongformer": deepspeed_layout("bslongformer", T, 1, 16),
        "longformer_layout\nwindow 48, global 0, 100": longformer_layout(T, 1, 48, [0, 100], blocksize=16),
        "bigbird_layout causal\nwindow 32, global 0 (seed 0)": bigbird_layout(T, 1, 32, [0], blocksize=16, seed=0),
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 3.6))
    for ax, (title, lay) in zip(axes, panels.items()):
        lay.plot(heads=[0], ax=ax, tokens=True)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Layouts users migrate from, time={T}, blocksize 16", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
