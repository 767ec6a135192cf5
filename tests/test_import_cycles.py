"""The package imports form no cycle (DESIGN.md section 2: a lower layer never imports a higher one).

The graph is read with ``ast`` from the sources of medgen_rt (python/medgen_rt, kernels/ as
medgen_rt.kernels, export/ as medgen_rt.export), without importing anything. What counts:

* module-level imports, also inside module-level ``if``/``try``/``with`` blocks and class bodies:
  they run when the module is imported, so a cycle among them breaks or half-initialises a module
  depending on which side is imported first;
* not imports inside functions: they are lazy edges that run on call, after every module has
  loaded (used on purpose, e.g. to keep torch out of the CLI parser and the ONNX engine);
* not ``if TYPE_CHECKING:`` blocks, which never run.

An edge goes to the imported module (``from pkg import name`` to ``pkg.name`` when that is a
module, else to ``pkg``) and to its parent packages, which Python imports first, except the
importer's own parents (they are already being imported when it runs).

A second check is about direction, not cycles: models/, sampling/, io/ and evaluation/ never
import train/ or cli/, eagerly or lazily (a short, commented allowlist names the exceptions).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"medgen_rt": ROOT / "python" / "medgen_rt", "medgen_rt.kernels": ROOT / "kernels",
            "medgen_rt.export": ROOT / "export"}


def modules(packages: dict) -> dict:
    """module name -> source file."""
    found = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package,) + parts)] = path
    return found


def _module_level_imports(tree: ast.AST):
    """Import nodes that run at import time (not in functions, not under TYPE_CHECKING)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _module_level_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _module_level_imports(node)


def import_graph(packages: dict = PACKAGES) -> dict:
    """module -> set of package modules it imports at module level (see the docstring)."""
    mods = modules(packages)
    graph = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in mods else module)
        own_parents = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        edges = set()
        for target in targets:
            parts = target.split(".")
            for k in range(1, len(parts) + 1):  # the module and the parent packages Python imports first
                edges.add(".".join(parts[:k]))
        graph[name] = {e for e in edges if e in mods and e != name and e not in own_parents}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 80  # the walk saw the whole package, kernels and export included
    # edges it must see (so an empty graph cannot pass)
    assert "medgen_rt.runtime.schedulers" in graph["medgen_rt.diffusion.samplers"]
    assert "medgen_rt.runtime.schedulers" in graph["medgen_rt.export.engine"]
    assert "medgen_rt.train.config" in graph["medgen_rt.train.run"]
    found = cycles(graph)
    assert not found, "import cycles at module level:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycles_the_review_found_stay_gone():
    """Issue 15 listed cycles through lazy imports too; these directions are now one-way."""
    graph = import_graph()
    kernels = [m for m in graph if m.startswith("medgen_rt.kernels")]
    assert kernels and not any(t.startswith("medgen_rt.ops") for m in kernels for t in graph[m])
    assert not graph["medgen_rt.diffusion.flow"] & {"medgen_rt.diffusion.samplers", "medgen_rt.diffusion"}
    assert not any(m.startswith("medgen_rt.cli") for m in graph["medgen_rt.train.run"])
    for source in ("diffusion/flow.py", "train/run.py"):  # not even lazily
        text = (PACKAGES["medgen_rt"] / source).read_text()
        assert "samplers import" not in text and "medgen_rt.cli" not in text, source


def all_imports(path: Path, name: str, mods: dict):
    """(line, target module, lazy) of every import in a file, resolved like :func:`import_graph`;
    lazy: inside a function (or under TYPE_CHECKING), i.e. not run when the module is imported."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    eager = {id(node) for node in _module_level_imports(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) not in eager
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{module}.{alias.name}" if f"{module}.{alias.name}" in mods else module
                yield node.lineno, target, id(node) not in eager


# DESIGN.md section 2: the library layers below the verbs never reach up into training or the CLI.
LOWER_LAYERS = ("models", "sampling", "io", "evaluation")
UPPER_LAYERS = ("train", "cli")
# Lazy (in-function) imports still allowed, each with its reason (none today). Keep it small: every
# entry is a known debt to pay, not a pattern to copy.
LAZY_ALLOWED: set = set()


def upward_imports(packages: dict = PACKAGES, root: str = "medgen_rt") -> list:
    """(module, line, target, lazy) for every import from a lower layer into train/ or cli/."""
    mods = modules(packages)
    found = []
    for name, path in mods.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[0] != root or parts[1] not in LOWER_LAYERS:
            continue
        for line, target, lazy in all_imports(path, name, mods):
            t = target.split(".")
            if t[0] == root and len(t) > 1 and t[1] in UPPER_LAYERS:
                found.append((name, line, target, lazy))
    return found


def test_lower_layers_never_import_train_or_cli():
    """models/, sampling/, io/, evaluation/ import nothing from train/ or cli/: not at module level,
    and not lazily inside functions either (a lazy import is still an upward dependency)."""
    mods = modules(PACKAGES)
    assert {"medgen_rt.models.weights", "medgen_rt.io.run_folder", "medgen_rt.sampling.api"} <= set(mods)
    bad = [f"{name}:{line} imports {target}" + (" (inside a function)" if lazy else "")
           for name, line, target, lazy in upward_imports()
           if not (lazy and (name, target) in LAZY_ALLOWED)]
    assert not bad, "lower layers import train/ or cli/ (DESIGN.md section 2):\n" + "\n".join(bad)


def test_the_lazy_allowlist_is_not_stale():
    """Every allowlisted lazy import still exists: drop an entry once its import is gone."""
    found = {(name, target) for name, _, target, lazy in upward_imports() if lazy}
    stale = sorted(LAZY_ALLOWED - found)
    assert not stale, f"LAZY_ALLOWED entries whose import is gone (remove them): {stale}"


def test_the_upward_check_sees_eager_and_lazy_imports(tmp_path):
    pkg = tmp_path / "medgen_rt"
    for sub in ("models", "train", "io"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "checkpoint.py").write_text("")
    (pkg / "models" / "a.py").write_text("def load():\n    from medgen_rt.train.checkpoint import f\n")
    (pkg / "io" / "b.py").write_text("from ..train import checkpoint\n")
    found = upward_imports({"medgen_rt": pkg})
    assert sorted((n, t, lazy) for n, _, t, lazy in found) == [
        ("medgen_rt.io.b", "medgen_rt.train.checkpoint", False),
        ("medgen_rt.models.a", "medgen_rt.train.checkpoint", True),
    ]


def test_the_walker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("from pkg.b import g\ndef f():\n    from pkg import c\n")
    (pkg / "b.py").write_text("try:\n    from .sub import a\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.c"] == set() and "pkg.c" not in graph["pkg.sub.a"]  # lazy and TYPE_CHECKING: no edges
    assert cycles(graph) == [["pkg.b", "pkg.sub", "pkg.sub.a"]]
