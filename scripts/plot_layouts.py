"""Draw the four built-in modes (token-level masks, natural order) into one PNG.

python scripts/plot_layouts.py docs/layouts.png
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparse_attention import make_layout  # noqa: E402

CASES = [
    ("all", {}),
    ("local", {"local_attn_ctx": 64}),
    ("strided", {"local_attn_ctx": 16}),
    ("fixed", {"local_attn_ctx": 64, "num_verts": 2, "vertsize": 1}),
]


def main(path="docs/layouts.png"):
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6))
    for ax, (mode, kw) in zip(axes, CASES):
        lay = make_layout(256, 2, mode, blocksize=16, **kw)
        lay.plot(heads=[0], ax=ax, tokens=True)
        extra = ", ".join(f"{k}={v}" for k, v in kw.items())
        ax.set_title(f"{mode}\n{extra}", fontsize=9)
    lay = make_layout(256, 2, "fixed", blocksize=16, **CASES[3][1])
    lay.plot(heads=[1], ax=axes[4], tokens=True)
    axes[4].set_title("fixed, head 1\n(the other summary block)", fontsize=9)
    fig.suptitle("Allowed (query, key) pairs, time=256, blocksize=16", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
