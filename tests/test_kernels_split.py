"""The kernels' two loop shapes (full tiles split off, or one masked loop) agree (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from _attn_ref import check_against_reference
from _kernel_env import device as _device
from _kernel_env import launch_fixture  # noqa: F401  (sets TRITON_INTERPRET; the `launch` fixture)

from sparse_attention.layouts import make_layout


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize(
    "mode, kw",
    [
        ("local", dict(local_attn_ctx=48)),
        ("strided", dict(local_attn_ctx=4)),
        ("fixed", dict(local_attn_ctx=64, num_verts=2, vertsize=2)),
    ],
)
def test_split_and_single_loop(launch, mode, kw, split):
    """Full tiles in their own unmasked loop, or every tile masked in one loop: same result."""
    lay = make_layout(128, 2, mode, blocksize=16, **kw)
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, 2, 128, 16, generator=g).to(_device()) for _ in range(4))
    from sparse_attention.torch.dispatch import EagerAttention

    launch.SPLIT_OVERRIDE = split
    try:
        fn = lambda a, b, c: EagerAttention.apply(a, b, c, launch.forward, launch.backward, lay)  # noqa: E731
        check_against_reference(fn, q, k, v, do, mask=lay.to_dense())
    finally:
        launch.SPLIT_OVERRIDE = None
