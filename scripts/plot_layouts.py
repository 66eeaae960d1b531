"""Draw the four built-in modes (token-level masks, natural order) into one PNG.

    python scripts/plot_layouts.py docs/layouts.png --migrated docs/layouts-migrated.png \
        --features docs/layouts-features.png

The patterns are ``sparse_attention.patterns.PRESETS["small"]``; the last panel is ``fixed``'s
second head (the other summary block). ``--migrated`` also draws the layouts users bring from
elsewhere: DeepSpeed's configs (``layouts.deepspeed_layout``), Longformer and BigBird.
``--features`` draws the bidirectional modes (``causal=False``) and packed documents
(``cu_seqlens``), at a time that is not a multiple of the block size.
"""

from __future__ import annotations

from sparse_attention.patterns import PRESETS
from sparse_attention.utils.benchmark import add_model_args, script_parser


def main(argv=None):
    ap = script_parser(__doc__)
    ap.add_argument("path", nargs="?", default="docs/layouts.png", help="the PNG to write (default: %(default)s)")
    ap.add_argument("--migrated", default=None, help="also draw the migrated layouts into this PNG")
    ap.add_argument("--features", default=None, help="also draw bidirectional modes and packed documents")
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
    if args.features:
        plot_features(plt, args.n_ctx - 16 - 7, args.features)


def plot_features(plt, T: int, path: str) -> None:
    """Bidirectional modes and packed documents of the small presets at ``time = T``."""
    from sparse_attention.layouts import make_layout, packed_layout

    presets = PRESETS["small"]
    cut = [0, T // 5, T // 5 + 9, T // 2 + 3, T]
    panels = {}
    for mode, p in presets.items():
        t = T - T % p.spec.local_attn_ctx if mode == "strided" else T  # its stride divides time
        panels[f"{mode}, causal=False" + (f"\n(time {t})" if t != T else "")] = make_layout(
            t, 2, **p.kwargs(), causal=False
        )
    for mode in ("local", "fixed"):
        panels[f"{mode}, 4 documents\n(cu_seqlens {cut})"] = packed_layout(cut, 2, **presets[mode].kwargs())
    title = f"Bidirectional modes and packed documents, time={T} (not a multiple of the blocks)"
    draw_panels(plt, panels, title, path, height=3.8, fontsize=8)


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
    draw_panels(plt, panels, f"Layouts users migrate from, time={T}, blocksize 16", path)


def draw_panels(plt, panels: dict, title: str, path: str, height: float = 3.6, fontsize: int = 9) -> None:
    """One row of token-level pictures (head 0 of each layout in ``panels``: title -> Layout)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(19, height))
    for ax, (name, lay) in zip(axes, panels.items()):
        lay.plot(heads=[0], ax=ax, tokens=True)
        ax.set_title(name, fontsize=fontsize)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
