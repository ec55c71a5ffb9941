"""Layering held by a test (STYLE.md practice 18): every import of every module of pretrain/, objectives/ and scripts/
(lazy imports inside functions included, relative imports resolved) is checked against the forbidden arrows below,
and the project's import graph must have no cycle. The checker itself is tested on a planted source tree.

Decision on ``pretrain/data/**``: a leaf that imports no other ``pretrain`` module, the config included (it reads the
config objects it is handed by attribute); it imports nothing else of ours today.

Imports made through importlib from strings (the registries: ``objectives.OBJECTIVES``,
``pretrain.decouple.modes.DECOUPLING``, ``pretrain.steps.STEPS``) are not arrows this walk can see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("pretrain", "objectives", "scripts")

LEAVES = ("pretrain.hf_io", "pretrain.optim", "pretrain.checkpoint", "pretrain.schedules", "pretrain.metrics",
          "pretrain.model", "pretrain.fast", "pretrain.config_io", "pretrain.data")

#: (rule, importer pattern, imported pattern, allowed imported patterns); a pattern ``a.b`` matches ``a.b`` and
#: ``a.b.*``; a pattern ending in ``.*`` matches only strictly below it
RULES = [
    ("1 objectives -> pretrain (except its leaves)", ["objectives"], ["pretrain"],
     ["pretrain.hf_io", "pretrain.model", "pretrain.fast", "pretrain.metrics"]),
    ("2 decouple -> trainer/steps/export/config_io", ["pretrain.decouple"],
     ["pretrain.trainer", "pretrain.steps", "pretrain.export", "pretrain.config_io"], []),
    ("3 steps -> trainer", ["pretrain.steps"], ["pretrain.trainer"], []),
    ("3 trainer -> torch.distributed/accelerate", ["pretrain.trainer"], ["torch.distributed", "accelerate"], []),
    ("4 config -> an objective module", ["pretrain.config"], ["objectives.*"], []),
    *[(f"5 leaf {leaf} -> pretrain", [leaf], ["pretrain"], [leaf]) for leaf in LEAVES],
    ("6 library -> scripts/tests", ["pretrain", "objectives"], ["scripts", "tests"], []),
    ("6 scripts -> tests", ["scripts"], ["tests"], []),
    ("7 backbones -> an objective", ["objectives.backbones"], ["objectives.*"], ["objectives.base"]),
]


def matches(name: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return name.startswith(pattern[:-1])
    return name == pattern or name.startswith(pattern + ".")


def module_name(root: Path, path: Path) -> str:
    """``pretrain/decouple/__init__.py`` -> ``pretrain.decouple``; ``scripts/pretrain.py/__main__.py`` ->
    ``scripts.pretrain`` (a directory run as a script)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] in ("__init__", "__main__"):
        parts.pop()
    return ".".join(p.removesuffix(".py") for p in parts)


def collect_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports anywhere in its file: ``from X import y`` counts as ``X.y`` when that is a
    module of ours, else as ``X``."""
    is_package = path.name in ("__init__.py", "__main__.py") and path.parent.suffix != ".py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    modules = collect_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def violations(graph: dict[str, set[str]], rules=RULES) -> list[str]:
    found = []
    for rule, sources, targets, allowed in rules:
        for src, imported in sorted(graph.items()):
            if not any(matches(src, s) for s in sources):
                continue
            for dst in sorted(imported):
                if any(matches(dst, t) for t in targets) and not any(matches(dst, a) for a in allowed):
                    found.append(f"rule {rule}: {src} imports {dst}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), among the graph's own modules; an import
    of a package's submodule also loads the package, but that is not an arrow of its own here."""
    own = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(own[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(own):
        if v not in index:
            visit(v)
    return out


# --------------------------------------------------------------------------- the project


def test_no_forbidden_arrow():
    found = violations(import_graph(ROOT))
    assert not found, "forbidden imports:\n  " + "\n  ".join(found)


def test_no_import_cycle():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_walk_sees_lazy_relative_and_script_imports():
    graph = import_graph(ROOT)
    assert "pretrain.config_io" in graph["pretrain.config"] and "objectives" in graph["pretrain.config"]
    assert "pretrain.decouple.modes" in graph["pretrain.decouple.pipeline"]
    assert "pretrain.steps" in graph["pretrain.trainer"] and "pretrain.trainer" in graph["pretrain.lr_find"]
    assert "pretrain.cli" in graph["scripts.pretrain"] and "pretrain.studies.objectives" in graph[
        "scripts.compare_objectives"]
    assert "pretrain.config" in graph["pretrain.cli"], "lazy imports inside functions are seen"


# --------------------------------------------------------------------------- the checker on a planted tree


def plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_planted_violations_and_cycles(tmp_path):
    root = plant(tmp_path, {
        "pretrain/__init__.py": "",
        "pretrain/trainer.py": "import accelerate\nfrom .config import load\n",
        "pretrain/config.py": "def load():\n    from objectives.mlm import MLMConfig\n    from . import trainer\n",
        "pretrain/hf_io.py": "from .metrics import x\n",
        "pretrain/metrics.py": "x = 1\n",
        "pretrain/data/__init__.py": "from .blocks import y\n",
        "pretrain/data/blocks.py": "from ..config import load\ny = 1\n",
        "pretrain/decouple/__init__.py": "",
        "pretrain/decouple/runtime.py": "def f():\n    from .. import config_io\n",
        "pretrain/config_io.py": "",
        "objectives/__init__.py": "",
        "objectives/mlm.py": "from pretrain.model import m\nfrom pretrain.trainer import fit\nimport scripts.pretrain\n",
        "scripts/pretrain.py/__main__.py": "from pretrain.cli import main\nimport tests.helpers\n",
    })
    found = violations(import_graph(root))
    expected = [
        "rule 1 objectives -> pretrain (except its leaves): objectives.mlm imports pretrain.trainer",
        "rule 2 decouple -> trainer/steps/export/config_io: pretrain.decouple.runtime imports pretrain.config_io",
        "rule 3 trainer -> torch.distributed/accelerate: pretrain.trainer imports accelerate",
        "rule 4 config -> an objective module: pretrain.config imports objectives.mlm",
        "rule 5 leaf pretrain.hf_io -> pretrain: pretrain.hf_io imports pretrain.metrics",
        "rule 5 leaf pretrain.data -> pretrain: pretrain.data.blocks imports pretrain.config",
        "rule 6 library -> scripts/tests: objectives.mlm imports scripts.pretrain",
        "rule 6 scripts -> tests: scripts.pretrain imports tests.helpers",
    ]
    for line in expected:
        assert line in found, (line, found)
    assert "objectives.mlm imports pretrain.model" not in str(found), "a leaf objectives may import"
    assert cycles(import_graph(root)) == [["objectives.mlm", "pretrain.config", "pretrain.trainer"]]


def test_relative_imports_resolve_against_the_package(tmp_path):
    root = plant(tmp_path, {
        "pretrain/__init__.py": "",
        "pretrain/decouple/__init__.py": "from .runtime import f\nfrom . import modes\n",
        "pretrain/decouple/modes.py": "",
        "pretrain/decouple/runtime.py": "from ..trainer import fit\nfrom .. import config_io\n",
        "pretrain/trainer.py": "",
        "pretrain/config_io.py": "",
    })
    graph = import_graph(root, ("pretrain",))
    assert graph["pretrain.decouple"] == {"pretrain.decouple.runtime", "pretrain.decouple.modes"}
    assert graph["pretrain.decouple.runtime"] == {"pretrain.trainer", "pretrain.config_io"}
    assert violations(graph) == [
        "rule 2 decouple -> trainer/steps/export/config_io: pretrain.decouple.runtime imports pretrain.config_io",
        "rule 2 decouple -> trainer/steps/export/config_io: pretrain.decouple.runtime imports pretrain.trainer",
    ]


@pytest.mark.parametrize("name, pattern, expected", [
    ("pretrain.data.blocks", "pretrain.data", True), ("pretrain.database", "pretrain.data", False),
    ("objectives", "objectives.*", False), ("objectives.mlm", "objectives.*", True),
])
def test_patterns(name, pattern, expected):
    assert matches(name, pattern) is expected
