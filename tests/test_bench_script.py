"""``scripts/bench.py --merge``: the benchmark's table writer, run on the recorded H100 results
(no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _case(rec):
    return tuple(rec[k] for k in ("mode", "dtype", "batch", "heads", "time", "head_dim"))


def test_merge_writes_one_table_of_several_runs(tmp_path):
    """Two runs sharing the cases ``fixed`` and ``all`` at the target shape: one row per case,
    the later run's for the shared ones."""
    runs = [ROOT / "benchmarks" / "bench-target.json", ROOT / "benchmarks" / "bench-fixed-all.json"]
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--merge", *map(str, runs)]
    subprocess.run(cmd + ["--tag", "m", "--outdir", str(tmp_path)], check=True, capture_output=True, timeout=120)
    md = (tmp_path / "bench-m.md").read_text()
    cases = {_case(rec) for r in runs for rec in json.loads(r.read_text())["records"]}
    assert len(cases) < sum(len(json.loads(r.read_text())["records"]) for r in runs)  # they overlap
    rows = [line for line in md.splitlines() if line.startswith("| ") and "×" in line and "mode" not in line]
    gpu_rows = [r for r in rows if r.count("|") == 9]  # the GPU-time table has 8 columns
    assert len(rows) - len(gpu_rows) == len(cases)
    fixed = [r for r in gpu_rows if r.startswith("| fixed | fp16 | 2×8×16384×64 |")]
    assert len(fixed) == 1 and fixed[0].startswith("| fixed | fp16 | 2×8×16384×64 | 0.423 / 1.573")  # the later run
    merged = json.loads((tmp_path / "bench-m.json").read_text())
    assert len(merged["records"]) == len(cases) and " ; " in merged["meta"]["command"]
