"""The package's own imports: no circle inside ``immune_trainer/``, and every import points down the layers.

A small checker over the ``import`` statements of the source (module level and inside functions; those
under ``if TYPE_CHECKING:`` are annotations, not imports). Importing ``a.b.c`` runs the ``__init__`` of
``a.b`` first, so an import of a submodule is also an import of every package above it that the importer
is not itself inside. The layers are those of docs/architecture.md.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "immune_trainer"

LAYERS: list[set[str]] = [
    {"errors", "files", "lazy", "runtime", "progress"},  # foundation: no import of ours but these
    {"conditions"},  # pure arithmetic, schema, report, comparison (no torch)
    {"model_card"},  # a report rendered as a card, badges and plots (no registry, no torch)
    {"run_cache", "losses", "modeling"},  # measurement cache; loss terms and model plumbing
    {"data"},  # formats, tokenization, pairing, Hub and embedded datasets, assets, loaders
    {"scoring"},  # harmfulness and capability scorers, judges
    {"attacks"},  # the attacker's fine-tuning, its families and the search
    {"trainer", "defenses"},  # ImmunizationTrainer and the defenses
    {"evaluation", "callbacks"},  # the staged evaluation; condition tracking during training
    {"sweep"},  # the defense sweep (Optuna)
    {"hub", "leaderboard", "leaderboard_specs"},  # cards, badges, plots, push, verify; every defense ranked
    {"demo", "testing"},  # the embedded demo; tiny models for tests
    {"cli", "__init__"},  # the command line; the package's lazy public facade
]


def _layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(
        f"immune_trainer.{unit} is in no layer of tests/test_layering.py: add it to the layer it belongs to "
        "(and to docs/architecture.md)."
    )


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_edges(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``root``'s package that importing it (or calling its functions) imports."""
    modules = module_names(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            for target in targets:
                if target not in modules or target == name or name.startswith(target + "."):
                    continue  # a package we are inside is already being imported
                edges[name].add(target)
                # the packages above the target run their __init__ first (unless we are inside them)
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not (name == parent or name.startswith(parent + ".")):
                        edges[name].add(parent)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def upward_imports(edges: dict[str, set[str]], package: str = "immune_trainer") -> list[str]:
    """Imports from a lower layer into a higher one, as ``"a -> b"`` lines."""

    def unit(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if _layer_of(unit(dst)) > _layer_of(unit(src)):
                bad.append(f"{src} -> {dst}")
    return bad


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_edges(ROOT))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_import_points_down_the_layers():
    assert upward_imports(import_edges(ROOT)) == []


def test_every_module_has_a_layer():
    for module in module_names(ROOT):
        parts = module.split(".")
        _layer_of(parts[1] if len(parts) > 1 else "__init__")


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "immune_trainer"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_finds_a_planted_circle(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "attacks/__init__.py": "from .harness import run\n",
            "attacks/harness.py": "from .families import get\n\ndef run():\n    return get()\n",
            "attacks/families.py": "def get():\n    from .harness import run\n    return run\n",
            "data.py": "X = 1\n",
        },
    )
    cycle = find_cycle(import_edges(root))
    assert cycle is not None and set(cycle) == {"immune_trainer.attacks.harness", "immune_trainer.attacks.families"}


def test_checker_finds_a_circle_through_a_package_init(tmp_path):
    # evaluation/__init__ imports its pipeline, which imports attacks, which imports evaluation.report:
    # importing evaluation.report runs evaluation/__init__ first, a circle although no module names another.
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "evaluation/__init__.py": "from .pipeline import evaluate\n",
            "evaluation/pipeline.py": "from ..attacks import attack\n\ndef evaluate():\n    return attack\n",
            "evaluation/report.py": "R = 1\n",
            "attacks.py": "from .evaluation.report import R\n\nattack = R\n",
        },
    )
    assert find_cycle(import_edges(root)) is not None


def test_checker_finds_an_upward_import_and_ignores_type_checking(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "conditions.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .attacks import A\n",
            "data.py": "def load():\n    from .cli import main\n    return main\n",
            "attacks.py": "A = 1\n",
            "cli.py": "from .data import load\n\ndef main():\n    return load\n",
        },
    )
    edges = import_edges(root)
    assert find_cycle(edges) == ["immune_trainer.cli", "immune_trainer.data", "immune_trainer.cli"]
    assert upward_imports(edges) == ["immune_trainer.data -> immune_trainer.cli"]


@pytest.mark.parametrize("module", ["conditions", "conditions.report", "conditions.compare"])
def test_the_pure_layer_does_not_import_torch(module):
    import subprocess
    import sys

    code = f"import sys, immune_trainer.{module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
