"""``scripts/bench.py --merge``: the benchmark's table writer, run on the recorded H100 results
(no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_merge_writes_one_table_of_several_runs(tmp_path):
    runs = [ROOT / "benchmarks" / "bench-target.json", ROOT / "benchmarks" / "bench-fixed-all.json"]
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--merge", *map(str, runs)]
    subprocess.run(cmd + ["--tag", "m", "--outdir", str(tmp_path)], check=True, capture_output=True, timeout=120)
    md = (tmp_path / "bench-m.md").read_text()
    n = sum(len(json.loads(r.read_text())["records"]) for r in runs)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "×" in line and "mode" not in line]
    gpu_rows = [r for r in rows if r.count("|") == 9]  # the GPU-time table has 8 columns
    assert len(rows) - len(gpu_rows) == n
    assert any(r.startswith("| fixed | fp16 | 2×8×16384×64 | 0.423 / 1.573") for r in gpu_rows)
    merged = json.loads((tmp_path / "bench-m.json").read_text())
    assert len(merged["records"]) == n and " ; " in merged["meta"]["command"]
