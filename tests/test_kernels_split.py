"""The kernels' two loop shapes (full tiles split off, or one masked loop) agree (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from _attn_ref import fwd_bwd, masked_reference, rel_err
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
    ref = fwd_bwd(lambda a, b, c: masked_reference(a, b, c, lay.to_dense()), q, k, v, do)
    launch.SPLIT_OVERRIDE = split
    try:
        o, lse = launch.forward(q, k, v, lay)
        got = [o, *launch.backward(do, q, k, v, o, lse, lay)]
    finally:
        launch.SPLIT_OVERRIDE = None
    for x, r in zip(got, ref):
        assert rel_err(x, r) < 1e-5
