"""How the package is put together: no import cycle between its modules (lazy imports inside
functions included), and the demo model's pieces live in one sub-package."""

from __future__ import annotations

import ast
import pathlib

import nulltext

ROOT = pathlib.Path(nulltext.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ["nulltext", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports anywhere in its code."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
                # "from P import x": the submodule P.x when there is one, else P itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert {"nulltext.models", "nulltext.storage", "nulltext.demo", "nulltext.demo.train"} <= set(graph)
    assert "nulltext.families" in graph["nulltext.models"]  # the parser sees real edges
    assert "nulltext.tiny" in graph["nulltext.models"]  # lazy ones too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_loops_controllers_inversion_and_files_never_name_a_family_or_sampler():
    """They reach the model's family and sampler through the pipeline and the schedule it gives
    (nulltext.families, nulltext.samplers), so a new family or sampler lands as new modules."""
    graph = import_graph()
    assert {"nulltext.families", "nulltext.families.sd", "nulltext.families.sdxl", "nulltext.samplers",
            "nulltext.samplers.ddim"} <= set(graph)
    specific = {m for m in graph if m.startswith("nulltext.families")} | {"nulltext.samplers.ddim", "nulltext.ddim"}
    neutral = [m for m in graph if (m.split(".") + [""])[1] in ("samplers", "inversion", "editing", "controllers", "processors",
                                                     "alignment", "storage", "text", "image")]
    assert "nulltext.samplers" in neutral and "nulltext.storage" in neutral
    for module in neutral:
        if module != "nulltext.samplers.ddim":
            assert not graph[module] & specific, (module, graph[module] & specific)


def test_the_demo_model_is_one_sub_package():
    demo = ROOT / "demo"
    assert {p.name for p in demo.iterdir()} >= {"__init__.py", "scenes.py", "train.py", "weights"}
    assert (demo / "weights" / "model_index.json").is_file()
    product = {p.stem for p in ROOT.glob("*.py")}
    assert not product & {"demo", "scenes", "train_demo_model"}
    graph = import_graph()
    # the product reaches the demo only where a user names it (--model demo)
    users = sorted(m for m, edges in graph.items() if not m.startswith("nulltext.demo")
                   and any(e.startswith("nulltext.demo") for e in edges))
    assert users == ["nulltext.models"]


def test_import_is_light_and_submodules_are_reachable_as_attributes():
    """``import nulltext`` loads no torch (so --help and usage errors answer at once), and the
    package's names and modules are there on first use."""
    import subprocess
    import sys

    code = ("import sys, nulltext; assert 'torch' not in sys.modules; "
            "assert callable(nulltext.ddim.step) and callable(nulltext.editing.edit_progressive); "
            "assert nulltext.invert is nulltext.inversion.invert_image; "
            "assert nulltext.Inversion is nulltext.storage.Inversion is nulltext.inversion.Inversion; "
            "print(sorted(set(nulltext.__all__) - set(dir(nulltext))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nulltext.nope  # noqa: B018
