"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    for module in ("torch", "tensorflow"):
        if f"import {module}" in BLOCKS[i]:
            pytest.importorskip(module)
    exec(compile(BLOCKS[i], f"README.md[python block {i}]", "exec"), {})


def test_readme_setup_commands():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "python attention.py" in bash[0], "the first command runs the main job"
    ci = (README.parent / ".ci" / "run").read_text()
    assert bash[1].strip() in ci, ".ci/run must run the README's test command"
