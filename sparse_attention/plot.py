"""Pictures of layouts (needs matplotlib, the ``viz`` extra): :meth:`Layout.plot` calls this."""

from __future__ import annotations


def plot_layout(lay, path=None, heads=None, ax=None, tokens: bool | None = None):
    """Draw ``lay``'s first heads; write a PNG when ``path`` is given; returns the figure.

    ``tokens=True`` draws the token-level mask in natural order (small ``time``), otherwise
    the block layout in block order; the default picks tokens for ``time <= 512``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Layout.plot needs matplotlib: pip install 'sparse-attention[viz]'") from e
    heads = list(range(min(lay.heads, 4))) if heads is None else list(heads)
    tokens = lay.time <= 512 if tokens is None else tokens
    img = lay.to_dense() if tokens else lay.block_layout()
    fig = None
    if ax is None:
        fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.4), squeeze=False)
        axes = axes[0]
    else:
        axes = [ax] * len(heads)
    for a, h in zip(axes, heads):
        a.imshow(img[h], cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
        a.set_title(f"{lay.mode} head {h}", fontsize=9)
        a.set_xlabel("key" + ("" if tokens else " block"), fontsize=8)
        a.set_ylabel("query" + ("" if tokens else " block"), fontsize=8)
        a.tick_params(labelsize=7)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
    return fig
