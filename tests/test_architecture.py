"""The package's import graph: one direction, no private names across modules, numpy at the bottom.

Read from the source (``ast``), imports inside functions included, so a lazy import cannot hide
a circle. The stack, bottom to top: the numpy layer (``modes``, ``tables``, ``layouts``,
``patterns``, ``plot``), the engines (``torch.gather``, ``torch.kernels``), ``torch.dispatch``,
``torch.merged``, ``torch.interface``, ``torch.nn``, ``models``; ``tensorflow`` beside torch.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "sparse_attention"
NUMPY_LAYER = ("modes", "tables", "layouts", "migrate", "patterns", "plot", "sharding", "decoding")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str):
    """``(target module, imported name or None)`` for every import statement of ``mod``."""
    path = MODULES[mod]
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                # "from . import gather" imports a module, "from .x import y" a name
                yield (sub, None) if sub in MODULES else (target, a.name)


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _ancestors_are_implicit(src: str, dst: str) -> bool:
    # importing sparse_attention.torch.x runs sparse_attention/torch/__init__.py first; a module
    # of a package that its own __init__ imports is not a circle of the code's design
    return src.startswith(dst + ".")


def test_the_import_graph_is_acyclic():
    graph = {m: {t for t in ts if not _ancestors_are_implicit(m, t)} for m, ts in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_names():
    bad = [
        f"{m} imports {name} from {t}"
        for m in MODULES
        for t, name in _imports(m)
        if t.startswith("sparse_attention") and name and name.startswith("_") and name != "__version__"
    ]
    assert not bad, bad


def test_no_module_reads_another_modules_private_attributes():
    bad = []
    for m, path in MODULES.items():
        # names bound to modules of this package (other libraries' private names are their business)
        imported = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom):
                target = _resolve(m, path.name == "__init__.py", n)
                imported |= {a.asname or a.name for a in n.names if f"{target}.{a.name}" in MODULES}
            elif isinstance(n, ast.Import):
                imported |= {a.asname for a in n.names if a.asname and a.name in MODULES}
        for n in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id in imported
                and n.attr.startswith("_")
                and not n.attr.startswith("__")
            ):
                bad.append(f"{m}: {n.value.id}.{n.attr}")
    assert not bad, bad


@pytest.mark.parametrize("name", NUMPY_LAYER)
def test_the_numpy_layer_imports_no_framework_layer(name):
    mod = f"sparse_attention.{name}"
    for target, _ in _imports(mod):
        assert not target.startswith(
            ("sparse_attention.torch", "sparse_attention.tensorflow", "sparse_attention.models")
        ), f"{mod} imports {target}"


def test_engines_do_not_import_the_layers_above_them():
    above = ("sparse_attention.torch.interface", "sparse_attention.torch.nn", "sparse_attention.models")
    for mod in MODULES:
        if mod.startswith(
            ("sparse_attention.torch.gather", "sparse_attention.torch.kernels", "sparse_attention.torch.dispatch")
        ):
            for target, _ in _imports(mod):
                assert not target.startswith(above), f"{mod} imports {target}"


def test_the_check_finds_a_circle(tmp_path, monkeypatch):
    """The cycle check can fail: a graph with a circle is reported."""
    monkeypatch.setattr("test_architecture._graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    with pytest.raises(pytest.fail.Exception, match="a -> b -> c -> a"):
        test_the_import_graph_is_acyclic()
