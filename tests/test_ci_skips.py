"""Under CI a skipped must-run test fails the session (``tests/conftest.py``: ``MUST_RUN_IN_CI``):
a machine that lacks PostgreSQL, Chromium, pdflatex or peft cannot turn CI green by skipping.

Each case runs a real pytest session in a subprocess, on a scratch project whose
``tests/conftest.py`` is this suite's own and whose test files carry the names of the listed ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
FILES = {
    # a browser test that skips as on a machine without Chromium, and one that runs
    "test_dashboard.py": "import pytest\n\n"
    "def test_in_the_browser():\n    pytest.skip('Debian chromium is not installed')\n\n"
    "def test_records():\n    assert True\n",
    # a whole file skipped at collection, as test_export.py is without peft
    "test_export.py": "import pytest\n\npytest.importorskip('no_such_module_for_this_test')\n\n"
    "def test_export():\n    assert True\n",
    # a skip of a test outside the list (a GPU test on a CPU machine), and an expected failure
    "test_other.py": "import pytest\n\n"
    "def test_needs_a_gpu():\n    pytest.skip('needs a CUDA device')\n\n"
    "@pytest.mark.xfail(reason='known')\ndef test_known_bug():\n    assert False\n",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ci_project")
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    (root / "tests").mkdir()
    shutil.copy(CONFTEST, root / "tests" / "conftest.py")
    for name, text in FILES.items():
        (root / "tests" / name).write_text(text)
    return root


def session(project: Path, *args: str, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_skipped_must_run_test_fails_the_session_under_ci(project):
    proc = session(project, ci="true")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "skipped tests that must run in CI" in out
    assert "tests/test_dashboard.py::test_in_the_browser: needs Chromium (apt-get install chromium); " in out
    assert "skipped: Skipped: Debian chromium is not installed" in out
    assert "tests/test_export.py: needs peft, the parity reference" in out  # the collection-time skip
    assert "test_needs_a_gpu" not in out.split("skipped tests that must run in CI")[1]  # not listed
    assert "2 must-run test(s) skipped with CI set" in out
    assert "1 passed, 3 skipped, 1 xfailed" in out  # nothing failed: the skips alone fail the session


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_the_same_skips_pass(project, ci):
    proc = session(project, ci=ci)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "must run in CI" not in proc.stdout


def test_under_ci_other_skips_pass(project):
    proc = session(project, "tests/test_other.py", "tests/test_dashboard.py::test_records", ci="1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed, 1 skipped, 1 xfailed" in proc.stdout


def test_the_list_names_tests_that_exist():
    """Each entry of MUST_RUN_IN_CI names a test file of this suite (a rename must update it)."""
    from conftest import MUST_RUN_IN_CI

    root = Path(__file__).resolve().parents[1]
    for need, patterns in MUST_RUN_IN_CI.items():
        for pattern in patterns:
            file, _, test = pattern.partition("::")
            assert (root / file).is_file(), (need, pattern)
            if test:
                names = test.replace("*", "")
                assert names in (root / file).read_text(), (need, pattern)
