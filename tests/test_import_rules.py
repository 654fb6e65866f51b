"""Imports flow one way (docs/architecture.md): commands -> toy/bench/eval -> sampling -> guidance;
training -> objectives -> families; data and families below; config above objectives (which build their
`Options` on `diffusion_po.typed`, not on config).

Every module of `diffusion_po` is parsed with `ast`: module-level and function-local `import` /
`from ... import` statements (relative ones resolved) and `importlib.import_module("diffusion_po...")`
calls with a literal (or f-string) name all count; imports under `if TYPE_CHECKING:` count for the layer
rules but not for the `runtime` rules or the cycle check (they never run). A violation is reported as
`file:line: a -> b`, an import cycle between the package's top-level modules as the chain of imports.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "diffusion_po"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


@dataclass(frozen=True)
class Rule:
    """Modules under `layer` may not import modules under any of `forbidden` (package-relative names);
    with `only` set, they may import nothing but those top-level modules, the standard library and
    their own layer."""

    layer: str
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    runtime: bool = False
    """Only imports that run count (`if TYPE_CHECKING:` imports, for annotations, are allowed)."""


RULES: tuple[Rule, ...] = (
    Rule("objectives", forbidden=("training",)),
    Rule("data", forbidden=("training",)),
    Rule("families", forbidden=("objectives", "training", "sampling")),
    Rule("guidance", only=("torch",)),
    Rule("sampling", forbidden=("toy", "eval", "training")),
    Rule("eval", forbidden=("training",)),
    Rule("objectives", forbidden=("config",), runtime=True),
    Rule("families", forbidden=("config",), runtime=True),
)


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    file: Path
    line: int
    importer: str
    target: str
    type_only: bool = False
    """Under `if TYPE_CHECKING:` (never runs)."""


def module_name(path: Path, root: Path) -> str:
    """`root/diffusion_po/data/cache.py` -> `diffusion_po.data.cache` (`__init__.py` names its package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    """Whether `a.b.c` is a module or package file under `root`."""
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _literal_prefix(node: ast.expr) -> str | None:
    """The module name of `import_module("a.b")`, or of `import_module(f"a.b.{x}")` its package `a.b`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        head = str(node.values[0].value)
        return head.rsplit(".", 1)[0] if "." in head else None
    return None


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside the body of an `if TYPE_CHECKING:` block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every module `path` imports, anywhere in the file (function bodies included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    type_only = _type_checking_nodes(tree)
    found: list[Import] = []
    for node in ast.walk(tree):
        typing_only = id(node) in type_only
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, name, alias.name, typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from diffusion_po.training import trainer` names the submodule, `... import train` the package
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append(Import(path, node.lineno, name, sub if _is_module(sub, root) else module, typing_only))
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            target = _literal_prefix(node.args[0])
            if target:
                found.append(Import(path, node.lineno, name, target, typing_only))
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violation(imp: Import, rule: Rule) -> bool:
    """Whether `imp` breaks `rule` (its importer is assumed to be in the rule's layer)."""
    layer = f"{PACKAGE}.{rule.layer}"
    if rule.runtime and imp.type_only:
        return False
    if rule.only is not None:
        top = imp.target.split(".")[0]
        allowed = (top in rule.only or top in sys.stdlib_module_names or top == "__future__"
                   or _under(imp.target, layer))
        return not allowed
    return any(_under(imp.target, f"{PACKAGE}.{f}") for f in rule.forbidden)


def check(root: Path, rules: tuple[Rule, ...] = RULES) -> list[str]:
    """`file:line: importer -> target (rule)` for every import under `root/diffusion_po` that breaks a rule."""
    problems: dict[str, None] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        imports = sorted(imports_of(path, root), key=lambda imp: imp.line)
        for rule in rules:
            if not imports or not _under(imports[0].importer, f"{PACKAGE}.{rule.layer}"):
                continue
            what = f"only {', '.join(rule.only)}" if rule.only is not None else f"not {', '.join(rule.forbidden)}"
            what += " at runtime" if rule.runtime else ""
            for imp in imports:
                if violation(imp, rule):
                    problems[f"{path.relative_to(root)}:{imp.line}: {imp.importer} -> {imp.target} "
                             f"({rule.layer} imports {what})"] = None
    return list(problems)


def unit_of(module: str) -> str:
    """The top-level module or subpackage a module belongs to: `diffusion_po.data.cache` -> `diffusion_po.data`."""
    return ".".join(module.split(".")[:2])


def module_graph(root: Path) -> dict[str, dict[str, Import]]:
    """importer unit -> imported unit -> the first import (by file and line) making that edge, for the
    imports that run (function-local ones included, `if TYPE_CHECKING:` ones not)."""
    graph: dict[str, dict[str, Import]] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        for imp in sorted(imports_of(path, root), key=lambda imp: imp.line):
            if imp.type_only or not _under(imp.target, PACKAGE):
                continue
            a, b = unit_of(imp.importer), unit_of(imp.target)
            if a != b:
                graph.setdefault(a, {}).setdefault(b, imp)
    return graph


def _path(graph: dict[str, dict[str, Import]], start: str, goal: str) -> list[str] | None:
    """The shortest chain of units from `start` to `goal` (breadth first), or None."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if node == goal:
            chain = [node]
            while previous[chain[-1]] is not None:
                chain.append(previous[chain[-1]])
            return chain[::-1]
        for nxt in sorted(graph.get(node, {})):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def import_cycles(root: Path) -> list[str]:
    """Each import cycle between the package's top-level modules/subpackages, once, as
    `a -> b (file:line) -> a (file:line)`."""
    graph = module_graph(root)
    found: dict[frozenset[str], str] = {}
    for a in sorted(graph):
        for b in sorted(graph[a]):
            back = _path(graph, b, a)
            if back is None:
                continue
            chain = [a, *back]
            key = frozenset(chain)
            if key in found:
                continue
            steps = [chain[0]]
            for x, y in zip(chain, chain[1:]):
                imp = graph[x][y]
                steps.append(f"{y} ({imp.file.relative_to(root)}:{imp.line})")
            found[key] = " -> ".join(steps)
    return list(found.values())


def test_the_package_imports_flow_one_way():
    problems = check(PACKAGE_DIR.parent)
    assert not problems, "imports against the layering (docs/architecture.md):\n" + "\n".join(problems)


def test_the_package_has_no_import_cycles():
    cycles = import_cycles(PACKAGE_DIR.parent)
    assert not cycles, "import cycles between diffusion_po's modules (function-local imports count):\n" + "\n".join(
        cycles)


def test_every_module_is_read():
    """The checker sees the package: every layer a rule names exists and has modules with imports."""
    for rule in RULES:
        files = list((PACKAGE_DIR / rule.layer).rglob("*.py"))
        assert files, rule.layer
        assert any(imports_of(f, PACKAGE_DIR.parent) for f in files), rule.layer


def _write(root: Path, relative: str, text: str) -> None:
    path = root / PACKAGE / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    """A small fake `diffusion_po` with one allowed module per layer."""
    for package in ("", "objectives", "data", "families", "guidance", "sampling", "eval", "training", "toy"):
        _write(tmp_path, f"{package}/__init__.py".lstrip("/"), "")
    _write(tmp_path, "guidance/cfg.py", "from __future__ import annotations\nimport math\nimport torch\n"
                                          "from typing import ClassVar\nfrom . import base\n")
    _write(tmp_path, "sampling/io.py", "from diffusion_po.guidance import cfg\nfrom diffusion_po.families import x\n")
    _write(tmp_path, "eval/report.py", "from diffusion_po.sampling import io\n")
    _write(tmp_path, "typed.py", "from diffusion_po.errors import ConfigError\n")
    _write(tmp_path, "errors.py", "")
    _write(tmp_path, "config.py", "from diffusion_po.typed import from_dict\n\n\ndef resolve():\n"
                                  "    from diffusion_po.objectives import get_method_class\n")
    _write(tmp_path, "objectives/options.py", "from typing import TYPE_CHECKING\nfrom diffusion_po.typed import from_dict\n"
                                           "if TYPE_CHECKING:\n    from diffusion_po.config import TrainConfig\n")
    return tmp_path


def test_checker_passes_a_clean_tree(synthetic):
    """TYPE_CHECKING imports of config from objectives and config's function-local import of objectives are fine."""
    assert check(synthetic) == []
    assert import_cycles(synthetic) == []


@pytest.mark.parametrize(
    ("relative", "text", "expected"),
    [
        ("objectives/dro.py", "def f():\n    from diffusion_po.training.online import x\n",
         "objectives/dro.py:2: diffusion_po.objectives.dro -> diffusion_po.training.online"),
        ("objectives/kto.py", "from ..training import trainer\n",
         "objectives/kto.py:1: diffusion_po.objectives.kto -> diffusion_po.training"),
        ("data/cache.py", "import diffusion_po.training.trainer as t\n",
         "data/cache.py:1: diffusion_po.data.cache -> diffusion_po.training.trainer"),
        ("families/sd.py", "x = 1\n\n\ndef g():\n    import importlib\n"
                           "    return importlib.import_module('diffusion_po.sampling.sampler')\n",
         "families/sd.py:6: diffusion_po.families.sd -> diffusion_po.sampling.sampler"),
        ("families/flow.py", "from diffusion_po.objectives import base\n",
         "families/flow.py:1: diffusion_po.families.flow -> diffusion_po.objectives"),
        ("guidance/npo.py", "import numpy as np\n", "guidance/npo.py:1: diffusion_po.guidance.npo -> numpy"),
        ("guidance/npo.py", "from diffusion_po.errors import UserError\n",
         "guidance/npo.py:1: diffusion_po.guidance.npo -> diffusion_po.errors"),
        ("sampling/experiments.py", "def f(name):\n    import importlib\n"
                                    "    return importlib.import_module(f'diffusion_po.toy.{name}')\n",
         "sampling/experiments.py:3: diffusion_po.sampling.experiments -> diffusion_po.toy"),
        ("sampling/io.py", "def f():\n    from diffusion_po.eval.prompts import load_prompt_set\n",
         "sampling/io.py:2: diffusion_po.sampling.io -> diffusion_po.eval.prompts"),
        ("sampling/__init__.py", "from .. import training\n",
         "sampling/__init__.py:1: diffusion_po.sampling -> diffusion_po.training"),
        ("eval/generate.py", "from diffusion_po.training.checkpoint import list_checkpoints\n",
         "eval/generate.py:1: diffusion_po.eval.generate -> diffusion_po.training.checkpoint"),
        ("objectives/npo.py", "from diffusion_po.config import TrainConfig\n",
         "objectives/npo.py:1: diffusion_po.objectives.npo -> diffusion_po.config"),
        ("families/flux.py", "def f():\n    from diffusion_po import config\n",
         "families/flux.py:2: diffusion_po.families.flux -> diffusion_po.config"),
    ],
)
def test_checker_names_a_synthetic_violation(synthetic, relative, text, expected):
    _write(synthetic, relative, text)
    problems = check(synthetic)
    assert problems and all(p.startswith(f"{PACKAGE}/{relative}:") for p in problems), problems
    assert any(p.startswith(f"{PACKAGE}/{expected} ") for p in problems), problems


def test_checker_allows_the_downward_direction(synthetic):
    """training may import objectives, toy may import sampling and eval: only the listed directions fail."""
    _write(synthetic, "training/trainer.py", "from diffusion_po.objectives import base\n")
    _write(synthetic, "toy/experiment.py", "from diffusion_po.eval import stats\nfrom diffusion_po.sampling import io\n"
                                           "from diffusion_po.training import trainer\n")
    _write(synthetic, "data/preference.py", "from diffusion_po.families import sd\n")
    assert check(synthetic) == []


def test_cycle_check_names_a_cycle_through_a_function_local_import(synthetic):
    """objectives -> config at module level closes a loop with config's function-local import of objectives."""
    _write(synthetic, "objectives/options.py", "from diffusion_po.config import from_dict\n")
    assert import_cycles(synthetic) == [
        "diffusion_po.config -> diffusion_po.objectives (diffusion_po/config.py:5) "
        "-> diffusion_po.config (diffusion_po/objectives/options.py:1)"
    ]


def test_cycle_check_follows_longer_loops_and_skips_type_checking(synthetic):
    _write(synthetic, "sampling/api.py", "def f():\n    from diffusion_po.eval import report\n")
    cycles = import_cycles(synthetic)
    assert len(cycles) == 1 and "diffusion_po.eval -> diffusion_po.sampling" in cycles[0], cycles
    assert "diffusion_po/sampling/api.py:2" in cycles[0] and "diffusion_po/eval/report.py:1" in cycles[0], cycles
    _write(synthetic, "sampling/api.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from diffusion_po.eval import report\n")
    assert import_cycles(synthetic) == []
