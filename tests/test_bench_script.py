"""The benchmark scripts on the CPU: ``bench.py``'s table writer on records built here, the
allowed-pair count of the FLOP floors against brute force, FlexAttention's transposed form, the
presets, the shared argparse helpers, every script's ``--help`` and the CPU smoke runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparse_attention import custom_layout, dense_mask, from_dense, make_layout  # noqa: E402
from sparse_attention.patterns import PAPER_PRESETS, PRESETS, Merged, Mode, paper_preset, preset  # noqa: E402
from sparse_attention.utils.benchmark import (  # noqa: E402
    MODEL_ARGS,
    PeakMemory,
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    add_modes_arg,
    allowed_pairs,
    call_ms,
    environment,
    flex_forms,
    script_parser,
    timeit,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "attention.py"]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- bench.py --merge: the table writer ----------------------------------------------------------


def _timings(fwd, fb, gpu):
    """One implementation's result: event times, and GPU times ``gpu`` times them."""
    return dict(fwd_ms=fwd, fb_ms=fb, fb_mem_mib=12.0, fwd_gpu_ms=fwd * gpu, fb_gpu_ms=fb * gpu)


def _record(mode, ours, cudnn, flex=(), flex_error=None):
    """A record of bench.py's run_case before :func:`summarize`: raw results only."""
    res = {"ours": _timings(*ours, 0.5) if ours else {"error": "RuntimeError: ours failed"}}
    if cudnn:
        res["sdpa-cudnn"] = _timings(*cudnn, 0.9)
        res["sdpa-flash"] = _timings(cudnn[0] * 2, cudnn[1] * 2, 0.9)
    for name, (f, b) in zip(("flex", "flex-transposed"), flex):
        res[name] = _timings(f, b, 0.8)
    if flex_error:
        res["flex"] = {"error": flex_error}
    rec = dict(mode=mode, dtype="fp16", batch=2, heads=8, time=4096, head_dim=64, params={"blocksize": 128})
    return dict(rec, floor_fwd_ms=0.011, floor_fb_ms=0.034, results=res)


RUN_A = [
    _record("local", (0.2, 0.8), (1.0, 4.0), flex=[(0.3, 1.2), (0.25, 1.6)]),
    _record("fixed", (0.5, 2.0), (1.0, 4.0), flex=[(3.0, 9.0)]),
]
RUN_B = [
    _record("fixed", (0.4, 1.5), (1.2, 4.8), flex=[(2.0, 6.0)]),
    _record("all", (1.0, 4.0), (1.1, 4.4), flex_error="OutOfMemoryError: flex"),
    _record("strided", None, (1.0, 4.0), flex=[(0.5, 2.0)]),
]


def _tables(md: str):
    """The rows of the two markdown tables (event time: 12 columns; GPU time: 8), as cell lists."""
    rows = [line for line in md.splitlines() if line.startswith("| ") and "×" in line and "mode" not in line]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]
    return [c for c in cells if len(c) == 12], [c for c in cells if len(c) == 8]


def test_merge_writes_one_table_of_two_runs(tmp_path):
    """Two runs sharing the case ``fixed``: one row per case in the order first seen, the later
    run's values for ``fixed``, and the comparisons computed from the raw results (best Flex form,
    speed-ups over Flex and cuDNN by event and by GPU time); a failed ``ours`` or Flex gives "–"."""
    paths = []
    for i, records in enumerate((RUN_A, RUN_B)):
        meta = dict(device="Test GPU", torch="2.x", triton="3.x", date=f"2026-01-0{i + 1}", command=f"run {i}")
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(dict(meta=meta, records=records)))
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--merge", *map(str, paths), "--tag", "m"]
    subprocess.run(cmd + ["--out", str(tmp_path)], check=True, capture_output=True, timeout=120)
    events, gpu = _tables((tmp_path / "bench-m.md").read_text())
    assert [r[0] for r in events] == ["local", "fixed", "all", "strided"]
    by = {r[0]: r for r in events}
    # columns: mode dtype shape ours ours-public cudnn flash flex-best xflex xcudnn floor mem
    assert by["fixed"][3] == "0.400 / 1.500" and by["fixed"][5] == "1.200 / 4.800"  # the later run
    assert all(r[4] == "–" for r in events)  # no public-call timings in these runs
    assert by["fixed"][7:10] == ["2.000 / 6.000", "5.00 / 4.00", "3.00 / 3.20"]
    assert by["local"][7:10] == ["0.250 / 1.200", "1.25 / 1.50", "5.00 / 5.00"]  # best of two Flex forms
    assert by["all"][7:10] == ["–", "–", "1.10 / 1.10"]  # Flex failed
    assert by["strided"][3] == "–" and by["strided"][7:10] == ["–", "–", "–"]  # ours failed
    assert by["fixed"][10:] == ["0.011 / 0.034", "12"]
    # GPU time: ours at 0.5 x its event time, cuDNN at 0.9 x, Flex at 0.8 x
    g = {r[0]: r for r in gpu}
    assert set(g) == {"local", "fixed", "all"}
    assert g["fixed"][3:] == ["0.200 / 0.750", "1.080 / 4.320", "1.600 / 4.800", "8.00 / 6.40", "5.40 / 5.76"]
    assert g["all"][5:] == ["–", "–", "1.98 / 1.98"]
    merged = json.loads((tmp_path / "bench-m.json").read_text())
    assert len(merged["records"]) == 4
    assert merged["records"][1]["results"]["ours"]["fwd_ms"] == 0.4
    assert merged["records"][1]["speedup_vs_flex_fwd"] == pytest.approx(5.0)
    assert merged["meta"]["command"] == "run 0 ; run 1" and merged["meta"]["date"] == "2026-01-01 ; 2026-01-02"


def test_summarize_derives_and_replaces_the_comparisons():
    bench = _load(ROOT / "scripts" / "bench.py")
    rec = _record("local", (0.2, 0.8), (1.0, 4.0), flex=[(0.3, 1.2)])
    rec["speedup_vs_flex_fwd"] = 99.0  # a stale value is recomputed
    out = bench.summarize(rec)
    assert out["flex_best_fwd_ms"] == 0.3 and out["speedup_vs_flex_fwd"] == pytest.approx(1.5)
    assert out["speedup_vs_cudnn_fb_gpu"] == pytest.approx(4.0 * 0.9 / (0.8 * 0.5))
    failed = bench.summarize(_record("local", None, (1.0, 4.0), flex=[(0.3, 1.2)]))
    assert not [k for k in failed if k.startswith(("flex_best", "speedup"))]


# -- the allowed pairs of the FLOP floors ------------------------------------------------------------

# (suite, time, heads) at which every preset of the suite runs, plus awkward cases: strided with
# segments of time / l positions that straddle blocks, fixed with vertsize 2 and several groups.
SUITE_SIZES = {"target": (1024, 4), "original": (512, 4), "long": (512, 2), "small": (256, 2), "million": (4096, 2)}
BUILT_IN = [
    pytest.param(p.kwargs(), *SUITE_SIZES[s], id=f"{s}-{m}") for s, ps in PRESETS.items() for m, p in ps.items()
] + [
    pytest.param(dict(attn_mode="strided", local_attn_ctx=16, blocksize=16), 384, 2, id="strided-straddling"),
    pytest.param(dict(attn_mode="strided", local_attn_ctx=48, blocksize=16), 768, 3, id="strided-l48"),
    pytest.param(dict(attn_mode="local", local_attn_ctx=16, blocksize=16), 512, 1, id="local-L=b"),
    pytest.param(
        dict(attn_mode="fixed", local_attn_ctx=64, blocksize=16, num_verts=2, vertsize=2), 512, 4, id="fixed-vs2"
    ),
]


@pytest.mark.parametrize("kw,time_,heads", BUILT_IN)
def test_allowed_pairs_is_the_brute_force_count(kw, time_, heads):
    lay = make_layout(time_, heads, **kw)
    assert allowed_pairs(lay) == int(dense_mask(time_, heads, **kw).sum())


def test_allowed_pairs_of_custom_layouts():
    rng = np.random.default_rng(0)
    m = np.tril(rng.random((3, 256, 256)) < 0.1)
    lays = [
        from_dense(m, 32),
        Merged(Mode("local", 32), Mode("strided", 48)).layout(384, 2, 16),
        custom_layout(np.tril(np.ones((8, 8), int)), 16, heads=2),  # shared, full blocks only
    ]
    for lay in lays:
        assert allowed_pairs(lay) == int(lay.to_dense().sum())


def test_allowed_pairs_at_a_million_tokens_is_fast_and_exact():
    """At time 1,048,576 (the benchmark's long runs) the count takes milliseconds, and it equals
    the closed forms of SEMANTICS.md summed over the queries (an independent oracle)."""
    T, H = 1 << 20, 8
    i = np.arange(T, dtype=np.int64)
    closed = {
        "local": np.minimum(i + 1, 128).sum(),
        "strided": (i // 128 + 1).sum(),
        "fixed": ((i % 128) + 1 + (i // 128) * 1 * 32).sum(),  # own group + vertsize blocks per earlier group
    }
    t0 = time.perf_counter()
    counts = {m: allowed_pairs(preset(m).layout(T, H)) for m in closed}
    assert time.perf_counter() - t0 < 5.0
    assert counts == {m: int(c) * H for m, c in closed.items()}


@pytest.mark.parametrize("time_,l", [(512, 32), (384, 16)])
def test_flex_transposed_form_is_the_strided_pattern(time_, l):
    """The transposed Flex run: causal segments (``Group(time // l)``) on q, k, v permuted to the
    residue-major order are exactly ``strided`` in natural order."""
    p = preset("strided", local_attn_ctx=l, blocksize=16)
    forms = {name: (spec, perm) for name, spec, perm in flex_forms(p, time_)}
    assert forms["flex"] == (p.spec, None) and set(forms) == {"flex", "flex-transposed"}
    spec, perm = forms["flex-transposed"]
    pos = np.arange(time_)
    natural = p.spec.mask(pos, pos, 1, 16)[0]
    assert np.array_equal(spec.mask(pos, pos, 1, 16)[0], natural[np.ix_(perm, perm)])
    assert [n for n, _, _ in flex_forms(preset("local"), time_)] == ["flex"]


def test_flex_block_masks_of_the_forms():
    """The block masks bench.py gives Flex (CPU build): the transposed strided form touches only
    the diagonal blocks, the natural one every causal block."""
    from sparse_attention.torch.baselines import flex_block_mask

    pytest.importorskip("torch.nn.attention.flex_attention")
    p = preset("strided")
    T, H = 4096, 2
    blocks = {}
    for name, spec, _ in flex_forms(p, T):
        bm = flex_block_mask(spec, H, T, p.blocksize, "cpu", compile=False)
        full = 0 if bm.full_kv_num_blocks is None else int(bm.full_kv_num_blocks.sum())
        blocks[name] = int(bm.kv_num_blocks.sum()) + full
    nb = T // 128
    assert blocks == {"flex": H * nb * (nb + 1) // 2, "flex-transposed": H * nb}


# -- presets --------------------------------------------------------------------------------------


def test_presets_lookup_and_variants():
    p = preset("fixed")
    assert p.kwargs() == dict(attn_mode="fixed", blocksize=32, local_attn_ctx=128, num_verts=4, vertsize=1)
    q = preset("fixed", blocksize=16, num_verts=1)
    assert (q.blocksize, q.spec.num_verts, q.spec.local_attn_ctx) == (16, 1, 128) and p.spec.num_verts == 4
    assert str(preset("local", "small")) == "local l=64 b=16"
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="suite"):
        preset("local", "nope")
    with pytest.raises(ValueError, match="stride"):
        p.replace(stride=3)


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_paper_presets_run_at_the_benchmark_sizes(name):
    for kw, (T, H) in ((dict(), (12288, 8)), (dict(stride=32, c=16, blocksize=16), (512, 4))):
        for spec in paper_preset(name, **kw):
            spec.check(T, H, kw.get("blocksize", 32))
    with pytest.raises(ValueError, match="unknown paper pattern"):
        paper_preset("nope")


# -- argparse helpers and every script's flags ------------------------------------------------------


def test_the_argparse_helpers():
    p = script_parser("doc")
    add_model_args(p, batch=1, n_ctx=64, n_head=2, n_layer=1, d_model=32)
    add_dtype_arg(p, "fp32", positional=True)
    add_modes_arg(p, "local")
    add_device_arg(p)
    old = p.parse_args(["bf16", "--batch-size", "3", "--time", "128", "--heads", "4", "--layers", "2", "--dim", "8"])
    new = p.parse_args(["--dtype", "bfloat16", "--batch", "3", "--n-ctx", "128", "--n-head", "4", "--n-layer", "2"])
    assert vars(old) == dict(vars(new), d_model=8)
    assert (new.dtype, new.batch, new.n_head, new.modes) == ("bf16", 3, 4, ["local"])
    assert p.parse_args(["--modes", "fixed, all"]).modes == ["fixed", "all"]
    assert p.parse_args([]).device == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in (["--modes", "local,nope"], ["--dtype", "fp8"], ["--heads", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(ValueError, match="unknown argument 'heads'"):
        add_model_args(p, heads=2)


@pytest.fixture(scope="module")
def helps():
    """Every script's ``--help`` (run in parallel): ``{name: text}``."""
    env = dict(os.environ, COLUMNS="200")
    procs = {
        s.name: subprocess.Popen(
            [sys.executable, str(s), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for s in SCRIPTS
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name} --help: {stderr[-2000:]}"
        out[name] = stdout
    return out


def _option_groups(text: str) -> list[list[str]]:
    """The option strings of each argument in a help text, e.g. ``["--n-head", "--heads"]``."""
    groups = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("--"):
            head = re.split(r"\s{2,}", line)[0]
            groups.append([w.split()[0] for w in head.split(", ")])
    return groups


def test_every_script_has_help_and_one_spelling_per_flag(helps):
    """One spelling per model argument (the old ones only as aliases after it), one ``--dtype``
    with the same choices, ``--device`` where a script picks a device."""
    aliases = {flag: flags[0] for flags, _, _ in MODEL_ARGS.values() for flag in flags[1:]}
    primary = {flags[0] for flags, _, _ in MODEL_ARGS.values()}
    seen = set()
    for name, text in helps.items():
        for group in _option_groups(text):
            for flag in group[1:]:
                if flag in aliases:
                    assert group[0] == aliases[flag], f"{name}: {flag} is an alias of {aliases[flag]}, not {group[0]}"
            assert group[0] not in aliases, f"{name}: {group[0]} is an old spelling of {aliases.get(group[0])}"
            seen |= set(group) & primary
            if group[0] == "--dtype":
                assert "--dtype {fp32,fp16,bf16}" in text, name
    assert {"--n-head", "--n-layer", "--d-model", "--n-ctx", "--batch", "--blocksize"} <= seen
    for name in ("attention.py", "long_sequence.py", "train.py", "bench_train.py"):
        assert "--device" in helps[name], name


def test_scripts_import_the_package_not_each_other():
    for path in SCRIPTS:
        src = path.read_text()
        assert "sys.path" not in src and "spec_from_file_location" not in src, path.name
        local = {p.stem for p in SCRIPTS}
        imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", src, flags=re.M)
        assert not local & set(imports), f"{path.name} imports a script: {local & set(imports)}"


# -- timers, environment record, CPU smoke runs -----------------------------------------------------


def test_timers_and_environment_on_the_cpu(monkeypatch):
    calls = []
    assert timeit(lambda: calls.append(1), budget_s=0.01, max_reps=5, device="cpu") >= 0
    assert 4 <= len(calls) <= 7  # a warm-up, an estimate, 3 to 5 timed calls
    assert len(call_ms(lambda: None, 4, "cpu")) == 4
    host = []
    assert call_ms(lambda: time.sleep(0.002), 2, "cpu", host) == host and min(host) >= 2  # off the GPU: the same
    # the arithmetic, on given /proc readings (the kernel's resident-memory counters are
    # approximate under concurrent threads, so a real allocation makes a flaky assertion)
    from sparse_attention.utils import benchmark

    readings = iter([{"VmRSS": 100 * 2**20}, {"VmHWM": 164 * 2**20}])
    monkeypatch.setattr(benchmark, "_proc_status", lambda: next(readings))
    with PeakMemory("cpu") as m:
        pass
    if m.base is not None:  # /proc/self/clear_refs is writable (Linux)
        assert m.peak == 64 * 2**20
    env = environment("cpu", ["--flag", "a b"], "scripts/x.py")
    assert env["command"] == "python scripts/x.py --flag 'a b'"
    assert {"device", "torch", "triton", "cuda", "python", "date", "commit"} <= set(env)


def test_bench_train_smoke_on_the_cpu(tmp_path):
    """``bench_train.py --device cpu`` at tiny sizes: checks, times and tabulates each variant,
    then ``--merge`` rewrites the table from two runs."""
    tiny = "--contexts 64 --n-layer 1 --d-model 32 --n-head 2 --stride 32 --c 16 --blocksize 16"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", *tiny.split()]
    cmd += ["--iters", "1", "--warmup", "1", "--no-compile", "--variants", "sdpa:dense", "ours:strided-merged"]
    for run in ("a", "b"):
        extra = ["--profile", "1"] if run == "a" else []
        proc = subprocess.run(cmd + extra + ["--out", str(tmp_path / run)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Self CPU time total" in (tmp_path / "a" / "profile-ours-strided-merged-64.txt").read_text()
    rows = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["sdpa:dense", "ours:strided-merged"]
    assert all(r["ms_median"] > 0 and r["check_rel_err"] < 2e-2 for r in rows[1:])
    assert all(r["host_ms_median"] > 0 for r in rows)
    assert rows[1]["paths"] == [
        "merged local|strided (two passes): gather (tensors are on cpu; the fused kernels need CUDA)"
    ]
    merge = [
        sys.executable,
        str(ROOT / "scripts" / "bench_train.py"),
        "--merge",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
    ]
    subprocess.run(merge + ["--out", str(tmp_path / "m")], check=True, capture_output=True, timeout=120)
    md = (tmp_path / "m" / "results.md").read_text()
    assert "| ours:strided-merged |" in md and md.count("python scripts/bench_train.py") == 2  # both commands


def test_bench_curves_smoke_on_the_cpu(tmp_path):
    """``bench_curves.py`` runs ``train.py`` per named pattern and tabulates the curves."""
    model = "--n-ctx 64 --d-model 32 --n-head 2 --n-layer 1 --stride 16 --c 16 --blocksize 16 --batch 2 "
    model += "--eval-batches 1 --sample-len 0 --max-bytes 100000"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_curves.py"), "--out", str(tmp_path / "out")]
    cmd += ["--runs-dir", str(tmp_path / "runs"), "--steps", "2", "--eval-interval", "2", "--runs", "fixed"]
    proc = subprocess.run(cmd + ["--model", model], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "curves.json").read_text())["results"]
    assert list(res) == ["fixed"] and res["fixed"]["steps"] == [2] and 0 < res["fixed"]["val_bpb"][0] < 9


def test_host_us_interleaved_takes_turns():
    """Every callable is called ``reps`` times, in a rotating order (no callable always first),
    and gets one median of positive microseconds."""
    from sparse_attention.utils.benchmark import host_us_interleaved

    order = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    got = host_us_interleaved(fns, reps=6, device="cpu")
    assert sorted(got) == ["a", "b", "c"] and all(v > 0 for v in got.values())
    assert [order.count(n) for n in "abc"] == [6, 6, 6]
    assert {order[3 * r] for r in range(6)} == {"a", "b", "c"}


def test_ptx_compare_ignores_registers_labels_and_debug_records():
    """``ptx_compare.compare``: the same instructions under other register numbers, labels, line
    records and debug information are identical; another instruction is a difference, by opcode."""
    ptx = _load(ROOT / "scripts" / "ptx_compare.py")
    a = ".loc 1 10 2\n$L__BB0_1:\n  add.s32 %r1, %r2, 1;\n  @%p1 bra $L__BB0_1;\n.b32 515 // Length of Unit\n"
    b = ".loc 1 12 4\n$L__BB0_7:\n  add.s32 %r5, %r9, 1;\n  @%p3 bra $L__BB0_7;\n.b32 567 // Length of Unit\n"
    assert ptx.compare(a, b).startswith("identical (2 lines)")
    c = b.replace("add.s32 %r5, %r9, 1", "mul.lo.s32 %r5, %r9, 3")
    assert ptx.compare(a, c).startswith("differs") and "'mul.lo.s32': 1, 'add.s32': -1" in ptx.compare(a, c)


def test_bench_context_parallel_runs_on_two_cpu_processes(tmp_path):
    """scripts/bench_context_parallel.py under torchrun with gloo: every check passes, the
    throughput rows and the max-length rows are written."""
    out = tmp_path / "cp.json"
    tiny = "--device cpu --shard-len 2048 --all-shard-len 1024 --check-len 1024 --max-shard-len 2048"
    tiny += f" --ctx 256 --n-head 2 --head-dim 16 --reps 1 --out {out}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "scripts" / "bench_context_parallel.py"), *tiny.split()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["env"]["world"] == 2 and res["env"]["dense rounds"] == "cpu-flash"
    assert [r["mode"] for r in res["check"]] == ["local", "strided", "fixed", "all"]
    assert all(r["pass"] for r in res["check"])
    assert {r["mode"] for r in res["throughput"]} == {"local", "strided", "fixed", "all"}
    assert all(r["ok"] for r in res["max_length"]) and len(res["max_length"]) == 2
    local = next(r for r in res["throughput"] if r["mode"] == "local")
    assert 0 < local["sent/ring"] < 0.1  # a 256-token halo of 2048-token shards


def test_bench_generate_smoke_on_the_cpu(tmp_path):
    """``bench_generate.py --device cpu`` at tiny sizes: both tables, every pattern, no failures."""
    tiny = "--contexts 128 --batches 1,2 --n-layer 2 --d-model 32 --stride 32 --c 16 --blocksize 16"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--device", "cpu", *tiny.split()]
    cmd += ["--tokens", "2", "--million", "0", "--no-flex", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "generate.json").read_text())
    assert len(res["attention"]) == 2 and len(res["model"]) == 8
    assert not [r for r in res["model"] if "error" in r]
    for r in res["attention"]:
        assert all("error" not in v for k, v in r.items() if ":" in k)
        assert r["ours:local:bounded"]["cache_mib"] < r["ours:local"]["cache_mib"]
    assert "| fixed | 128 | 2 |" in (tmp_path / "generate.md").read_text()


def test_bench_gqa_smoke_on_the_cpu(tmp_path):
    """``bench_gqa.py --device cpu`` at a tiny size: every mode, both kv-head counts, no failures."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gqa.py"), "--device", "cpu", "--n-ctx", "256"]
    cmd += ["--batch", "1", "--kv-heads", "1,4", "--no-flex", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "gqa.json").read_text())
    assert [(r["mode"], r["kv_heads"]) for r in rec["rows"]] == [
        (m, hk) for m in ("all", "local", "strided", "fixed") for hk in (1, 4)
    ]
    for r in rec["rows"]:
        assert set(r["results"]) == {"grouped", "expanded", "pre-expanded"}
        assert all(v["fwd_ms"] > 0 and v["fb_ms"] > 0 for v in r["results"].values())
    assert "| fixed | 1 |" in (tmp_path / "gqa.md").read_text()


def test_bench_features_smoke_on_the_cpu(tmp_path):
    """``bench_features.py --device cpu`` at a tiny size: both sections, every mode, ours never fails."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_features.py"), "--device", "cpu", "--n-ctx", "256"]
    cmd += ["--doc-len", "128", "--no-flex", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "features.json").read_text())["rows"]
    assert [(r["section"], r["mode"]) for r in rows if r["section"] == "bidirectional"] == [
        ("bidirectional", m) for m in ("all", "local", "strided", "fixed")
    ]
    assert {r["docs"] for r in rows if r["section"] == "packed"} == {"1 document", "2 x 128", "192 + 64", "long-tailed"}
    for r in rows:
        for name, v in r["results"].items():
            if isinstance(v, dict):
                assert v.get("fwd_ms", 0) > 0 and v.get("fb_ms", 0) > 0, (name, v)
    assert "| fixed | long-tailed |" in (tmp_path / "features.md").read_text()
    tails = {r["mode"] for r in rows if "unpacked [1, T - 1]" in r["results"]}
    assert tails == {"all", "local", "fixed"}  # strided's time is a multiple of its stride


def test_bench_cpu_smoke(tmp_path):
    """``bench_cpu.py`` at a tiny size: ours and both SDPA peers for every mode, a table row each."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--times", "256", "--budget", "0.01"]
    cmd += ["--tag", "smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "cpu-smoke.json").read_text())
    assert [(r["mode"], r["time"]) for r in rec["rows"]] == [(m, 256) for m in ("local", "strided", "fixed", "all")]
    for r in rec["rows"]:
        assert set(r["results"]) == {"ours", "sdpa causal", "sdpa mask"}
        assert all(v["fwd_ms"] > 0 and v["fb_ms"] > 0 for v in r["results"].values()), r
    assert "| fixed | 256 |" in (tmp_path / "cpu-smoke.md").read_text()
