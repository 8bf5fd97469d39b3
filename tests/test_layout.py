"""The layout shows the architecture: imports flow one way, ``search -> budget``; ``analysis``
reads run files and storages only; ``budget`` imports neither. The folders are the import packages
``adabudget`` (budget/), ``adabudget.search`` and ``adabudget.analysis`` (pyproject's package-dir), so
the checks speak of folders. Every import counts, those inside
functions too (read with ``ast``, nothing is imported); ``budget/cli.py``, the console script's
dispatcher, is the one module that names all three packages."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def folder_of(module: str) -> str:
    """The top-level folder (or outside package) an import name lives in: ``adabudget.search.study``
    -> search, ``adabudget.training`` -> budget, ``torch.nn`` -> torch."""
    parts = module.split(".")
    if parts[0] != "adabudget":
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in ("search", "analysis") else "budget"


def imported_packages(path: Path) -> set[str]:
    """The top-level folders a module imports, anywhere in it (relative imports stay in its package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(folder_of(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "adabudget":  # from adabudget import search
                found.update(folder_of(f"adabudget.{alias.name}") for alias in node.names)
            else:
                found.add(folder_of(node.module))
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    "package, forbidden, allowed",
    [
        ("budget", {"search", "analysis"}, {"budget/cli.py", "budget/api.py"}),
        ("analysis", {"budget", "search"}, set()),
        ("search", {"analysis"}, set()),
    ],
)
def test_imports_flow_one_way(package, forbidden, allowed):
    assert modules(package), f"no modules under {package}/"
    wrong = {
        str(p.relative_to(ROOT)): sorted(imported_packages(p) & forbidden)
        for p in modules(package)
        if str(p.relative_to(ROOT)) not in allowed and imported_packages(p) & forbidden
    }
    assert not wrong, f"{package}/ must not import {sorted(forbidden)}: {wrong}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import os\n\ndef f():\n    from adabudget.search.study import run_search\n    import adabudget.analysis.tables\n"
    )
    assert imported_packages(path) == {"os", "search", "analysis"}


def test_no_generic_top_level_import_names():
    """The installed import names are adabudget's own: nothing imports a bare ``budget``, ``search``
    or ``analysis`` (a user's search.py or analysis/ folder in the working directory would shadow it)."""
    bare = []
    for package in ("budget", "search", "analysis", "tests"):
        for p in modules(package):
            for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                bare += [
                    f"{p.relative_to(ROOT)}: {n}"
                    for n in names
                    if n.split(".")[0] in ("budget", "search", "analysis")
                ]
    assert not bare, f"bare import names: {bare[:10]}"
