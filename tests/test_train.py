"""scripts/train.py on CPU: a tiny model learns, resumes exactly, and two gloo processes follow one."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = _load()

TINY = [
    "--n-ctx",
    "64",
    "--d-model",
    "32",
    "--n-head",
    "2",
    "--n-layer",
    "2",
    "--stride",
    "32",
    "--c",
    "16",
    "--blocksize",
    "16",
    "--batch",
    "4",
    "--lr",
    "3e-3",
    "--warmup",
    "2",
    "--eval-batches",
    "1",
    "--sample-len",
    "16",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Repetitive text: a tiny model must lower its loss on it within a few steps."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    line = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"
    path.write_bytes(line * 400)
    return path


def test_tiny_model_loss_falls_and_writes_outputs(corpus, tmp_path):
    recs = train.main(
        TINY
        + [
            "--data",
            str(corpus),
            "--out",
            str(tmp_path),
            "--steps",
            "12",
            "--eval-interval",
            "12",
            "--attn",
            "strided",
            "--factorization",
            "merged",
        ]
    )
    losses = [r["loss"] for r in recs]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert 0 < recs[-1]["val_bpb"] < 8
    assert (tmp_path / "ckpt.pt").exists()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 12
    assert "--- step 12" in (tmp_path / "samples.txt").read_text()


def test_resume_continues_exactly(corpus, tmp_path):
    args = TINY + [
        "--data",
        str(corpus),
        "--steps",
        "6",
        "--eval-interval",
        "6",
        "--ckpt-interval",
        "3",
        "--dropout",
        "0.1",
        "--sample-len",
        "0",
    ]
    straight = train.main(args + ["--out", str(tmp_path / "a")])
    train.main(args + ["--out", str(tmp_path / "b"), "--stop-at", "3"])  # interrupted after step 3
    resumed = train.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="d_model"):
        train.main(args + ["--out", str(tmp_path / "b"), "--resume", "--d-model", "64"])


def test_two_gloo_processes_follow_one(corpus, tmp_path):
    """DDP over 2 CPU processes (torchrun, gloo) with the global batch split in two gives the
    one-process losses and bits per byte."""
    args = TINY + ["--data", str(corpus), "--steps", "3", "--eval-interval", "3", "--sample-len", "0"]
    one = train.main(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
        + args
        + ["--out", str(tmp_path / "two")]
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    assert abs(one[-1]["val_bpb"] - two[-1]["val_bpb"]) < 1e-4


def test_default_corpus_is_the_stdlib_with_a_held_out_split():
    tr, va = train.default_corpus(300_000, 0.1)
    assert len(tr) + len(va) >= 300_000
    assert 0.05 < len(va) / (len(tr) + len(va)) < 0.2
    assert b"def " in tr and b"def " in va


def test_too_little_data_is_a_clear_error(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="too small"):
        train.main(TINY + ["--data", str(small), "--out", str(tmp_path), "--steps", "1"])


def test_compiled_training_runs(corpus, tmp_path):
    """``--compile`` (with ``--compile-mode reduce-overhead``, which on the CPU compiles without CUDA
    graphs) trains, evaluates and samples."""
    pytest.importorskip("torch._inductor")
    recs = train.main(
        TINY
        + ["--data", str(corpus), "--out", str(tmp_path), "--steps", "3", "--eval-interval", "3"]
        + ["--attn", "fixed", "--compile", "--compile-mode", "reduce-overhead"]
    )
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert 0 < recs[-1]["val_bpb"] < 9


def test_older_flag_spellings_are_aliases():
    """Commands in README.md and the benchmark logs spell ``--batch-size`` and ``--precision``."""
    old = train.parse_args(["--batch-size", "6", "--precision", "bf16", "--n-head", "2"])
    new = train.parse_args(["--batch", "6", "--dtype", "bf16", "--heads", "2"])
    assert vars(old) == vars(new)
    assert (new.batch, new.dtype, new.n_head) == (6, "bf16", 2)


@pytest.mark.parametrize(
    "procs,cp,attn",
    [
        (2, 2, "fixed"),
        (2, 2, "fixed/heads"),
        (4, 2, "local"),
        (2, 2, "strided"),
        (2, 2, "local+compile"),
        (2, 2, "fixed@mqa"),
    ],
)
def test_context_parallel_follows_one_process(corpus, tmp_path, procs, cp, attn):
    """--context-parallel C: each sequence sharded over C gloo processes (and the batch over the
    procs / C groups) gives the one-process losses and bits per byte, also with ``--compile``
    (the sharded attention runs eagerly inside the compiled model) and with one key/value head
    (``--n-kv-head 1``, multi-query attention). ``strided`` (interleaved
    local and strided layers) at 1,024 tokens with stride 16, where its natural-order shards are
    whole blocks of its residue order."""
    attn, _, mqa = attn.partition("@")  # mqa: one key/value head for the query heads
    attn, _, compiled = attn.partition("+")
    attn, _, factorization = attn.partition("/")  # heads: per-head groups, stacked into one layout
    args = TINY + ["--data", str(corpus), "--steps", "3", "--eval-interval", "3", "--sample-len", "8"]
    args += ["--n-kv-head", "1"] if mqa else []
    args += ["--factorization", factorization] if factorization else []
    args += ["--attn", attn] + (
        ["--n-ctx", "1024", "--stride", "16", "--factorization", "interleaved", "--val-fraction", "0.1"]
        if attn == "strided"
        else []
    )
    one = train.main(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), str(SCRIPT)]
    cmd += args + ["--context-parallel", str(cp), "--out", str(tmp_path / "cp")] + (["--compile"] if compiled else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"({cp} per sequence)" in proc.stdout + proc.stderr
    got = [json.loads(line) for line in (tmp_path / "cp" / "log.jsonl").read_text().splitlines()]
    assert len(got) == 3
    for a, b in zip(one, got):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert abs(one[-1]["val_bpb"] - got[-1]["val_bpb"]) < 1e-4


def test_context_parallel_refuses_a_bad_split(tmp_path):
    with pytest.raises(ValueError, match="multiple of --context-parallel"):
        train.main(TINY + ["--context-parallel", "3", "--out", str(tmp_path)])


def test_document_windows_cut_at_separators_and_n_ctx():
    """``document_window``: documents end after every separator and at most ``n_ctx`` bytes from
    their start; no target crosses a document's end."""
    data = np.frombuffer(b"ab||cdefghij||k||" + b"x" * 40, dtype=np.uint8)
    x, y, cu = train.document_window(data, 0, 50, b"||", 8, "cpu")
    assert cu.tolist() == [0, 4, 12, 14, 17, 25, 33, 41, 49, 50]
    assert x.shape == y.shape == (1, 50) and (x[0].numpy() == data[:50]).all()
    assert (y[0, cu[1:] - 1] == -100).all() and (y[0] != -100).sum() == 50 - (len(cu) - 1)


def test_training_on_packed_documents(corpus, tmp_path):
    """``--documents SEP``: every step one sequence of documents (cu_seqlens); the loss falls and
    the held-out bits per byte are finite."""
    recs = train.main(
        TINY
        + ["--data", str(corpus), "--out", str(tmp_path), "--steps", "10", "--eval-interval", "10"]
        + ["--attn", "fixed", "--factorization", "merged", "--documents", "\\n"]
    )
    losses = [r["loss"] for r in recs]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert 0 < recs[-1]["val_bpb"] < 8
    with pytest.raises(SystemExit):
        train.parse_args(["--documents", "\\n", "--context-parallel", "2"])
