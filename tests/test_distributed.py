"""Context parallelism (``sparse_attention.torch.distributed``): 2 and 4 gloo processes on the
CPU, every mode (and custom layouts, per-head patterns, both balances), float64 and float32,
forward and the three gradients against the float64 dense reference; the bytes exchanged equal
what the pattern needs; bad input refused. The plan and its kernels: ``tests/test_sharding.py``."""

from __future__ import annotations

import json
import socket

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import _distributed as W  # noqa: E402

DTYPES = ("float64", "float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request, tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = request.param
    out = tmp_path_factory.mktemp(f"cp{world}")
    torch.multiprocessing.spawn(W.worker, args=(world, _free_port(), str(out), DTYPES), nprocs=world)
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(W.CASES))
def test_matches_reference(results, case, dtype):
    world, ranks = results
    for r, res in enumerate(ranks):
        got = res[f"{case}/{dtype}"]
        for name, e, b in zip(("out", "dq", "dk", "dv", "gathered"), got["errs"], got["budgets"]):
            assert e <= b, f"rank {r}/{world} {name}: error {e:.2e} > budget {b:.2e}"


@pytest.mark.parametrize("case", list(W.CASES))
def test_exchanges_only_what_the_pattern_needs(results, case):
    world, ranks = results
    got = ranks[0][f"{case}/float32"]
    assert got["sent"] == got["need"] == got["planned"], got
    if case.startswith("local"):
        assert got["sent"] <= 2 * got["ring"] / 4, "a halo exchange should move far less than a ring"


def test_functions_and_errors(results):
    world, ranks = results
    for res in ranks:
        f = res["functions"]
        assert f["functions"] < 1e-12
        errors = f["errors"]
        assert "time / world" in errors["short"]
        if world > 1:
            assert "equal shards" in errors["uneven"]
        assert "zigzag" in errors["zigzag-uneven"]
        assert "balance must be one of" in errors["balance"]
        assert errors["dtype"] is not None
