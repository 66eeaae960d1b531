"""`python attention.py` (the original's comparison script) at small sizes."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("attention_script", ROOT / "attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_every_mode_passes(dtype, capsys):
    script = _load()
    small = ["--batch", "1", "--n-ctx", "256", "--d-model", "64", "--n-head", "4", "--reps", "1"]
    rc = script.main(["--dtype", dtype, *small, "--device", "cpu", "--framework", "torch"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("PASS") == 5  # four modes and the summary line
    for mode in ("all", "local", "strided", "fixed"):
        assert f"\n{mode} " in out


def test_failure_exits_nonzero(monkeypatch, capsys):
    import sparse_attention

    script = _load()
    real = sparse_attention.blocksparse_attention_impl
    monkeypatch.setattr(script, "blocksparse_attention_impl", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01)
    small = ["--batch", "1", "--n-ctx", "128", "--d-model", "32", "--n-head", "2", "--reps", "1"]
    rc = script.main([*small, "--modes", "local", "--device", "cpu", "--framework", "torch"])
    assert rc == 1
    assert "FAIL: local" in capsys.readouterr().out


def test_bad_mode_is_a_usage_error():
    r = subprocess.run([sys.executable, str(ROOT / "attention.py"), "--modes", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown mode 'nope'" in r.stderr


def test_the_original_spellings_still_work(capsys):
    """``python attention.py fp16`` (the original's positional dtype) and the old flag spellings
    (``--time``, ``--dim``, ``--heads``) of earlier commands: the same run as the new ones."""
    script = _load()
    old = ["bf16", "--time", "128", "--dim", "32", "--heads", "2", "--modes", "strided", "--reps", "1"]
    new = ["--dtype", "bf16", "--n-ctx", "128", "--d-model", "32", "--n-head", "2", "--modes", "strided", "--reps", "1"]
    outs = []
    for argv in (old, new):
        assert script.main([*argv, "--batch", "1", "--device", "cpu", "--framework", "torch"]) == 0
        out = capsys.readouterr().out
        outs.append([line.split()[:5] for line in out.splitlines() if line.startswith("strided")])  # errors, not times
    assert outs[0] == outs[1] and len(outs[0]) == 2
    assert "time 128, dim 32, heads 2, blocksize 32, bfloat16" in out
