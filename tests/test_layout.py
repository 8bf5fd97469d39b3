"""The layout shows the architecture: imports flow one way, ``search -> budget``; ``analysis``
reads run files and storages only; ``budget`` imports neither. Every import counts, those inside
functions too (read with ``ast``, nothing is imported); ``budget/cli.py``, the console script's
dispatcher, is the one module that names all three packages."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, anywhere in it (relative imports stay in its package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    "package, forbidden, allowed",
    [
        ("budget", {"search", "analysis"}, {"budget/cli.py"}),
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
        "import os\n\ndef f():\n    from search.study import run_search\n    import analysis.tables\n"
    )
    assert imported_packages(path) == {"os", "search", "analysis"}
