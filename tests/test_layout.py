"""How the package is put together (docs/architecture.md): its modules in layers that import only
downwards (lazy imports inside functions included), no import cycle, the file format free of model
code, no family named outside the model-facing layer, modules of a readable size, and the demo
model's pieces in one sub-package."""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

import nulltext

ROOT = pathlib.Path(nulltext.__file__).parent
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
    parts = ["nulltext", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def import_edges() -> dict[str, list[tuple[str, int]]]:
    """Every module of the package -> (the package module it imports, the line) for each import
    anywhere in its code: at the top, inside functions, under TYPE_CHECKING. (Modules imported by
    name through importlib, as the family registry and the package's lazy attributes do, are not
    seen.)"""
    modules = _modules()
    out: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: list[tuple[str, int]] = []
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
            edges += [(t, node.lineno) for t in targets if t in modules and t != name]
        out[name] = edges
    return out


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports anywhere in its code."""
    return {name: {t for t, _ in edges} for name, edges in import_edges().items()}


def third_party_imports() -> dict[str, set[str]]:
    """Every module of the package -> the top-level names of what it imports from outside the
    package and the standard library (torch, diffusers, ...), anywhere in its code."""
    out: dict[str, set[str]] = {}
    for name, path in _modules().items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        out[name] = {n for n in found if n != "nulltext" and n not in sys.stdlib_module_names}
    return out


def _where(module: str) -> str:
    path = _modules()[module]
    return str(path.relative_to(ROOT.parent.parent) if ROOT.parent.name == "src" else path)


# The layers of docs/architecture.md, lowest first. A module may import modules of its own layer
# (the cycle test keeps those acyclic) and of the layers below it, never one above. An entry names
# a module and, for a package, everything under it (with a final *, every module whose name starts
# so); the longest entry that names a module gives its layer ("nulltext" alone is the package's own
# __init__: its lazy public names).
LAYERS: dict[str, tuple[str, ...]] = {
    # no model components: configs and their options, errors, output files, the model fingerprint,
    # Prompt-to-Prompt's token alignment and controllers, the samplers' step math and loops, pictures
    "core": ("nulltext.errors", "nulltext.options", "nulltext.schedules", "nulltext.config", "nulltext.files", "nulltext.fingerprint",
             "nulltext.alignment", "nulltext.controllers", "nulltext.editors", "nulltext.samplers", "nulltext.ddim", "nulltext.visual"),
    # a checkpoint's components and what runs them: loading, the families, text and images through
    # the pipeline, the attention processors, the tiny and demo models
    "model": ("nulltext.hub", "nulltext.cpu", "nulltext.families", "nulltext.models", "nulltext.tiny",
              "nulltext.tiny_sd3", "nulltext.demo", "nulltext.text", "nulltext.image", "nulltext.processors"),
    # the algorithms on a loaded pipeline, and the inversion file
    "library": ("nulltext.storage", "nulltext.inversion", "nulltext.editing"),
    "api": ("nulltext",),
    # many jobs from a manifest
    "runners": ("nulltext.jobs", "nulltext.protocols", "nulltext.batch", "nulltext.evaluation", "nulltext.pie_bench"),
    # what a person runs: the command line, the web UI, plots, the demo model's training
    "front-ends": ("nulltext.cli", "nulltext.__main__", "nulltext.ui", "nulltext.plots", "nulltext.demo.train*",
                   "nulltext.experiments"),
}
RANK = {layer: i for i, layer in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, entries in LAYERS.items():
        for entry in entries:
            if entry.endswith("*"):
                covers = module.startswith(entry[:-1])
            else:
                covers = module == entry or (entry != "nulltext" and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = layer, len(entry)
    return best


def test_the_layer_table_reads_as_documented():
    assert layer_of("nulltext") == "api" and layer_of("nulltext.storage.format") == "library"
    assert layer_of("nulltext.demo.scenes") == "model" and layer_of("nulltext.demo.train") == "front-ends"
    assert layer_of("nulltext.demo.train_stages") == "front-ends" and layer_of("nulltext.demo") == "model"
    assert layer_of("nulltext.samplers.ddim") == "core" and layer_of("nulltext.newthing") is None
    text = (pathlib.Path(__file__).parent.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for entries in LAYERS.values():  # each entry is named in the document's table
        for entry in entries:
            assert f"`{entry if entry == 'nulltext' else entry.removeprefix('nulltext.')}" in text, entry


def test_every_module_has_a_layer():
    """A new module is placed in a layer here and in docs/architecture.md."""
    missing = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS and docs/architecture.md: {missing}"


def upward_imports(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Each import of a higher layer's module, as 'module:line: ...' (a module without a layer is
    test_every_module_has_a_layer's to report)."""
    return [f"{module}:{line}: {module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
            for module, targets in sorted(edges.items()) for target, line in targets
            if layer_of(module) and layer_of(target) and RANK[layer_of(target)] > RANK[layer_of(module)]]


def test_the_layer_check_finds_an_upward_import():
    assert upward_imports({"nulltext.controllers": [("nulltext.processors", 7), ("nulltext.errors", 8)],
                           "nulltext.cli.commands": [("nulltext.models", 17)]}) == [
        "nulltext.controllers:7: nulltext.controllers (core) imports nulltext.processors (model)"]


def test_layers_import_only_downwards():
    """A lower layer never imports a higher one, not even lazily inside a function."""
    bad = upward_imports(import_edges())
    assert not bad, "\n".join(f"{_where(b.split(':')[0])}:{b.split(':', 1)[1]}" for b in bad)


def test_the_core_loads_no_model_library():
    """The core runs on plain tensors and text: no diffusers, transformers or hub client. The one
    exception is a sampler module's make_scheduler (samplers/ddim.py: diffusers' DDIMScheduler),
    which builds its scheduler from a config, no weights: the sampler interface hands it to a family."""
    model_libraries = {"diffusers", "transformers", "huggingface_hub", "accelerate", "gradio", "safetensors"}
    imports = third_party_imports()
    core = [m for m in imports if layer_of(m) == "core"]
    assert {"nulltext.controllers", "nulltext.samplers", "nulltext.samplers.ddim"} <= set(core)
    for module in core:
        allowed = {"diffusers"} if module.startswith("nulltext.samplers.") else set()
        assert not (imports[module] & model_libraries) - allowed, (module, imports[module])


def test_the_inversion_file_imports_no_model_code():
    """storage (the Inversion and its file) reads and checks files without a model: everything it
    imports, directly or through others, is storage itself and config, options, errors, files and
    the pure fingerprint comparison; outside the package only torch (tensors) and safetensors."""
    graph, imports = import_graph(), third_party_imports()
    storage = {m for m in graph if m == "nulltext.storage" or m.startswith("nulltext.storage.")}
    assert "nulltext.storage" in storage
    reached, todo = set(), list(storage)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    allowed = storage | {f"nulltext.{m}" for m in ("config", "schedules", "options", "errors", "files",
                                                           "fingerprint")}
    assert reached <= allowed, sorted(reached - allowed)
    outside = set().union(*(imports[m] for m in reached))
    assert outside <= {"torch", "safetensors"}, sorted(outside)
    assert "safetensors" in outside  # the check sees the file library's (lazy) import


def test_the_pure_optimisation_imports_only_the_core():
    """inversion.optimise is the algorithms over an eps callable: a test runs them on a fake model."""
    graph = import_graph()
    assert all(layer_of(m) == "core" for m in graph["nulltext.inversion.optimise"]), graph["nulltext.inversion.optimise"]
    ablations = graph["nulltext.inversion.ablations"]  # the same for the ablations, over the optimisation
    assert all(layer_of(m) == "core" or m == "nulltext.inversion.optimise" for m in ablations), ablations


def _long_modules() -> dict[str, int]:
    return {_where(m): n for m, p in sorted(_modules().items())
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}


def test_no_module_is_over_500_lines():
    """A module past 500 lines holds more than one concern: split it into a package (as cli,
    editing, inversion and storage were)."""
    assert not _long_modules(), f"modules over {MAX_LINES} lines: {_long_modules()}"


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
    # the product reaches the demo only where a user names it (--model demo; the experiments'
    # --scenes, their held-out scenes and judge)
    users = sorted(m for m, edges in graph.items() if not m.startswith("nulltext.demo")
                   and any(e.startswith("nulltext.demo") for e in edges))
    assert users == ["nulltext.experiments.common", "nulltext.models"]


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
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nulltext.nope  # noqa: B018


# What a function may import lazily: what makes a module slow to import or heavy in memory. ``import
# nulltext`` and the command line's --help and usage errors answer without them.
HEAVY = {"torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors", "gradio",
         "gradio_client", "matplotlib", "torchmetrics", "torchvision", "PIL", "numpy", "tqdm", "skimage"}
# function-level imports kept on purpose, with the reason
LAZY_BY_DESIGN = {
    ("nulltext.models", "nulltext.tiny"): "the random model is built only when a user names --model tiny",
    ("nulltext.models", "nulltext.demo"): "the demo model is reached only when a user names --model demo",
    ("nulltext.evaluation", "resource"): "POSIX only",
    ("nulltext.experiments.common", "nulltext.demo"): "the demo's scenes are reached only when a user names --scenes",
}


def _top_and_lazy_imports() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """Per module: what it imports at module level (package modules and top-level names of others;
    TYPE_CHECKING blocks left out), and what its functions import, with lines."""
    modules = _modules()
    top: dict[str, set[str]] = {}
    lazy: dict[str, list[tuple[str, int]]] = {}

    def targets(name: str, path: pathlib.Path, node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        base = package
        for _ in range(max(node.level - 1, 0)):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]

    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: set[str] = set()

        def module_level(statements):
            for node in statements:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.update(targets(name, path, node))
                elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    module_level(node.body)
                    module_level(node.orelse)
                elif isinstance(node, ast.Try):
                    module_level(node.body)
                    for handler in node.handlers:
                        module_level(handler.body)

        module_level(tree.body)
        top[name] = {t if t in modules else t.split(".")[0] for t in found}
        lazy[name] = [(t if t in modules else t.split(".")[0], node.lineno)
                      for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))
                      for t in targets(name, path, node)]
    return top, lazy


def leftover_lazy_imports() -> list[str]:
    """Function-level imports that could be at the top without making their module heavier: a
    package module whose module-level imports bring no heavy library the importing module does
    not already load (and that would not form a cycle), a heavy library the module already loads,
    or a standard-library module."""
    top, lazy = _top_and_lazy_imports()

    def closure(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(top.get(m, ()))
        return seen

    def heavy(module: str) -> set[str]:
        return {m for m in closure(module) if m in HEAVY}

    out = []
    for module, imports in lazy.items():
        for target, line in imports:
            if target == "nulltext" or (module, target) in LAZY_BY_DESIGN or (
                    (module, target.rpartition(".")[0]) in LAZY_BY_DESIGN):
                continue
            if target in top:  # a package module
                leftover = module not in closure(target) and heavy(target) <= heavy(module)
            else:
                leftover = target in heavy(module) or target not in HEAVY and target in sys.stdlib_module_names
            if leftover:
                out.append(f"{_modules()[module].relative_to(ROOT.parent)}:{line}: {target}")
    return out


def test_lazy_imports_are_only_of_heavy_modules():
    """Importing inside a function defers what is slow or big to load (torch, diffusers, gradio,
    matplotlib, ...): anything else belongs at the top of its module."""
    leftovers = leftover_lazy_imports()
    assert not leftovers, "imports inside functions that belong at the top:\n" + "\n".join(leftovers)


def test_the_lazy_import_check_finds_a_leftover(monkeypatch):
    real = _top_and_lazy_imports

    def with_leftover():
        top, lazy = real()
        lazy["nulltext.jobs"] = [*lazy["nulltext.jobs"], ("nulltext.files", 1), ("re", 2), ("torch", 3)]
        return top, lazy

    monkeypatch.setattr(sys.modules[__name__], "_top_and_lazy_imports", with_leftover)
    found = leftover_lazy_imports()
    assert [f.rsplit(": ", 1)[1] for f in found] == ["nulltext.files", "re", "torch"]


def test_no_module_imports_another_modules_private_names():
    """A helper one module uses from another is public (named without a leading underscore)."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nulltext")):
                found += [f"{path.relative_to(ROOT.parent)}:{node.lineno}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def _message_text(node: ast.AST) -> str:
    """The literal text of a message argument: its string constants and f-string parts joined."""
    return "".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def flag_messages_without_the_api(modules: dict[str, pathlib.Path]) -> list[str]:
    """The errors and warnings raised below the runners and front-ends (code the Python API reaches)
    whose text tells the user to pass a command-line flag without saying so for both: such a text
    names the flag as the command line's ("--model on the command line") or the API's way too, or
    is about a command it names ("python -m ...")."""
    found = []
    for name, path in modules.items():
        if RANK[layer_of(name)] > RANK["api"]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if not (func.endswith("Error") or func == "warn"):
                continue
            text = _message_text(node.args[0])
            if (re.search(r"(^|[\s(])--[a-z]", text) and "on the command line" not in text
                    and "in the API" not in text and "python -m" not in text):
                found.append(f"{_where(name)}:{node.lineno}: {text}")
    return found


def test_library_messages_do_not_tell_an_api_user_to_pass_a_flag():
    """A NulltextError or warning the API can raise says what to pass for both ("pass the model it
    was made with (--model on the command line)"): a Python caller has no --model to pass."""
    assert flag_messages_without_the_api(_modules()) == []
