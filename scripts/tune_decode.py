"""Tile sweep of the decode kernel: GPU time of one decode step's attention per tile setting.

    python scripts/tune_decode.py --out benchmarks/generate-h200     # needs a CUDA GPU

For each case (pattern, context, batch; 8 heads, head_dim 64, bf16, the cache full of random
keys) every combination of key tile ``BN``, warps, pipeline stages and programs per SM
(``sparse_attention.torch.kernels.decode.TUNE``) is timed as a CUDA-graph replay beside PyTorch
SDPA over the whole cache, and its output compared with the default setting's. Writes
``decode-tune.json`` and prints the best setting per case.
"""

from __future__ import annotations

import itertools
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attention.patterns import Mode
from sparse_attention.torch.decode import CacheLayer
from sparse_attention.torch.kernels import decode as K
from sparse_attention.utils.benchmark import environment, graph_ms, script_parser

CASES = [
    ("all", Mode("all"), 65536, 32),
    ("all", Mode("all"), 65536, 1),
    ("fixed", Mode("fixed", 128, num_verts=1, vertsize=1), 65536, 32),
    ("fixed", Mode("fixed", 128, num_verts=1, vertsize=1), 65536, 1),
    ("strided", Mode("strided", 128), 65536, 1),
    ("local", Mode("local", 128), 65536, 1),
]


def main(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    dev, dt, H, D = torch.device("cuda"), torch.bfloat16, 8, 64
    default = dict(K.TUNE)
    rows = []
    for name, spec, n, B in CASES:
        q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
        layer = CacheLayer(spec, H, D, 32, B, n, dt, dev, False, 1)
        layer.k.normal_()
        layer.v.normal_()
        lengths = torch.full((B,), n - 1, device=dev, dtype=torch.int64)
        sdpa_us = graph_ms(partial(F.scaled_dot_product_attention, q, layer.k[:, :, :n], layer.v[:, :, :n])) * 1e3
        ref = layer.attend(q, lengths).float()
        for bn, warps, stages, per_sm in itertools.product([64, 128, 256], [4, 8], [2, 3, 4], [8, 16]):
            K.TUNE.update(BN=bn, num_warps=warps, num_stages=stages, per_sm=per_sm, max_splits=128)
            layer.splits.clear()
            row = dict(mode=name, n=n, batch=B, BN=bn, warps=warps, stages=stages, per_sm=per_sm)
            try:
                row["max_abs_diff"] = (layer.attend(q, lengths).float() - ref).abs().max().item()
                row["us"] = round(graph_ms(partial(layer.attend, q, lengths)) * 1e3, 1)
            except Exception as e:  # noqa: BLE001 - a setting that does not run is reported
                row["error"] = str(e)[:120]
            row["sdpa_us"] = round(sdpa_us, 1)
            rows.append(row)
        K.TUNE.clear()
        K.TUNE.update(default)
    a.out.mkdir(parents=True, exist_ok=True)
    env = environment(dev, argv, "scripts/tune_decode.py")
    (a.out / "decode-tune.json").write_text(json.dumps({"env": env, "default": default, "rows": rows}, indent=1))
    for name, _, n, B in CASES:
        ok = [r for r in rows if (r["mode"], r["n"], r["batch"]) == (name, n, B) and "us" in r]
        best = min(ok, key=lambda r: r["us"])
        print(f"{name} n={n} batch={B}: best {best}")


if __name__ == "__main__":
    main()
