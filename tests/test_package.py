"""The package as a user installs it (issue 22 §2): the wheel holds LICENSE, py.typed and the configs,
its metadata the extras, URLs, classifiers and the one version; without the optional extras
adabudget imports and trains, and asking for an extra's feature names ``pip install
"adabudget[<extra>]"``; ``train.device=auto`` picks CUDA, then MPS, then the CPU."""

from __future__ import annotations

import email
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import adabudget
import pytest
import torch
from adabudget import extras as budget_extras
from adabudget.analysis import extras as analysis_extras
from adabudget.models import auto_device, pick_device
from conftest import TINY_RUN, cli_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, a dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# what the optional extras install: absent in the subprocess below (None in sys.modules makes
# `import x` raise ImportError, as on a machine without the package)
OPTIONAL = ["wandb", "plotly", "kaleido", "optuna_dashboard", "peft", "psycopg2", "psycopg"]


def _setuptools_version() -> tuple[int, ...]:
    """The installed setuptools' version, read from its metadata (importing setuptools here would
    swap distutils for the rest of the session)."""
    from importlib import metadata

    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version("setuptools"))[:2])
    except metadata.PackageNotFoundError:
        return (0,)


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of the checkout's files (tracked and not ignored) built in a copy, so no build/
    or egg-info lands in the working tree."""
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # pyproject's build requirement (setuptools >= 77, PEP 639 license fields): this environment's
    # setuptools when it is new enough (offline), else pip's build isolation fetches it from the
    # index, as the README's own `pip install -e` does (a fresh Python 3.11 venv holds 65.5)
    offline = ["--no-build-isolation"] if _setuptools_version() >= (77,) else []
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-w", str(tmp_path)] + [str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("adabudget-*.whl")
    return wheel


def test_the_wheel_holds_license_types_configs_and_its_metadata(tmp_path):
    wheel = build_wheel(tmp_path)
    assert wheel.name == f"adabudget-{adabudget.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"adabudget-{adabudget.__version__}.dist-info"
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "adabudget/py.typed" in names
    configs = {
        f"adabudget_configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")
    }
    assert configs and configs <= names, sorted(configs - names)[:5]
    assert "adabudget_configs/train.yaml" in names
    assert "hydra_plugins/adabudget_sweeper/adabudget_sweeper.py" in names

    assert meta["Version"] == adabudget.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    extras = set(meta.get_all("Provides-Extra"))
    assert {"wandb", "dashboard", "peft", "postgres", "scale", "qlora", "smollm2", "dev"} <= extras
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Repository", "Documentation", "Issues", "Changelog"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.10" in classifiers

    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    core_names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in core}
    assert not core_names & {"wandb", "plotly", "kaleido", "peft", "psycopg2-binary", "optuna-dashboard"}
    assert {"pandas", "optuna", "torch", "transformers"} <= core_names
    assert "optuna>=4.3" in core  # optuna.exceptions.UpdateFinishedTrialError (search/liveness.py)

    def of(extra):
        return [r.split(";")[0].strip() for r in requires if f'extra == "{extra}"' in r]

    assert any(r.startswith("wandb") for r in of("wandb"))
    assert {r.split(">")[0] for r in of("dashboard")} >= {"plotly", "kaleido"}
    assert any(r.startswith("peft") for r in of("peft"))
    assert any(r.startswith("psycopg2-binary") for r in of("postgres"))
    # the README's test command installs .[dev]: every extra the tests need comes with it
    (own,) = [r for r in of("dev") if r.startswith("adabudget[")]
    assert set(own[len("adabudget[") : own.index("]")].split(",")) >= {
        "wandb",
        "dashboard",
        "peft",
        "postgres",
        "qlora",
        "scale",
    }


def test_the_version_lives_in_one_place():
    """budget/version.py holds it; pyproject reads it; CITATION.cff and CHANGELOG.md name the same."""
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "adabudget.version.__version__"}
    assigned = [
        str(p.relative_to(ROOT))
        for folder in ("budget", "search", "analysis")
        for p in (ROOT / folder).rglob("*.py")
        if re.search(r"^__version__\s*=", p.read_text(), re.M)
    ]
    assert assigned == ["budget/version.py"]
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf'^version: "?{re.escape(adabudget.__version__)}"?$', cff, re.M)
    assert f"## [{adabudget.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_citation_cff_cites_the_software_and_the_adalora_paper():
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    for key in ("message", "title", "authors", "version", "license", "repository-code"):
        assert cff.get(key), key
    assert cff["license"] == PYPROJECT["project"]["license"]
    assert cff["repository-code"] == PYPROJECT["project"]["urls"]["Repository"]
    (paper,) = [r for r in cff["references"] if "Adaptive Budget Allocation" in r["title"]]
    assert paper["type"] == "conference-paper" and paper["year"] == 2023
    assert paper["authors"][0]["family-names"] == "Zhang"
    assert "ICLR" in paper["conference"]["name"] or "Learning Representations" in paper["conference"]["name"]


def test_both_copies_of_the_extras_helper_say_the_same_and_name_real_extras():
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    assert set(budget_extras.EXTRAS) <= declared
    for extra in budget_extras.EXTRAS:
        assert budget_extras.missing_message("m", extra, "f") == analysis_extras.missing_message(
            "m", extra, "f"
        )
    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        budget_extras.require("json", "nope", "f")


@pytest.mark.parametrize(
    "module, extra", [("plotly", "dashboard"), ("wandb", "wandb"), ("peft", "peft"), ("psycopg2", "postgres")]
)
def test_require_names_the_pip_command_when_the_module_is_missing(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when absent
    for helper in (budget_extras, analysis_extras):
        with pytest.raises(ImportError, match=re.escape(f'pip install "adabudget[{extra}]"')) as err:
            helper.require(module, extra, "the feature")
        assert isinstance(err.value, helper.MissingExtra)
    assert isinstance(budget_extras.MissingExtra("x"), adabudget.config.ConfigError)  # CLI: config error


BLOCK = "import sys\nfor m in {mods!r}:\n    sys.modules[m] = None\n"
WITHOUT_EXTRAS = """
import json, adabudget
from adabudget.extras import MissingExtra
result = adabudget.train(*{run!r})
print("STATUS", result["status"])
try:
    adabudget.dashboard(result["run_dir"], out="dash.html")
except ImportError as err:
    print("DASHBOARD", type(err).__name__, err)
try:
    adabudget.train(*{run!r}, "logger.wandb=true")
except MissingExtra as err:
    print("WANDB", err)
try:
    adabudget.train(*{run!r}, "method=peft_lora")
except MissingExtra as err:
    print("PEFT", err)
print("LOADED", json.dumps(sorted(m for m in {mods!r} if sys.modules.get(m) is not None)))
"""


def test_without_the_optional_extras_adabudget_trains_and_names_the_extra_to_install(tmp_path):
    """A fresh interpreter in which wandb, plotly, kaleido, optuna-dashboard, peft and the PostgreSQL
    drivers cannot be imported: a tiny run completes; the dashboard, the W&B mirror and peft's
    methods each fail naming their extra, the CLI's dashboard as an error line with exit 2."""
    run = [*TINY_RUN, "method=lora", "train.max_steps=4", "train.eval_every=4"]
    code = BLOCK.format(mods=OPTIONAL) + WITHOUT_EXTRAS.format(run=run, mods=OPTIONAL)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line for line in out.stdout.splitlines()}
    assert lines["STATUS"] == "STATUS completed"
    assert "MissingExtra" in lines["DASHBOARD"] and 'pip install "adabudget[dashboard]"' in lines["DASHBOARD"]
    assert 'pip install "adabudget[wandb]"' in lines["WANDB"] and "logger.wandb" in lines["WANDB"]
    assert 'pip install "adabudget[peft]"' in lines["PEFT"] and "method.name=peft_" in lines["PEFT"]
    assert json.loads(lines["LOADED"].split(" ", 1)[1]) == []  # none slipped in through another path

    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("result.json")]
    dash = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK.format(mods=OPTIONAL) + "from adabudget.cli import main; main()",
            "dashboard",
            str(run_dir),
            "--out",
            str(tmp_path / "d.html"),
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dash.returncode == 2, dash.stderr[-2000:]
    assert 'pip install "adabudget[dashboard]"' in dash.stderr and "Traceback" not in dash.stderr
    assert not (tmp_path / "d.html").exists()


@pytest.mark.parametrize(
    "cuda, mps, distributed, expected",
    [
        (True, True, False, "cuda"),
        (True, False, False, "cuda"),
        (False, True, False, "mps"),
        (False, False, False, "cpu"),
        (False, True, True, "cpu"),  # torchrun on a Mac: gloo reduces CPU tensors
        (True, True, True, "cuda"),
    ],
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, distributed, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert auto_device(distributed=distributed) == expected


def test_train_device_auto_resolves_to_mps_where_only_mps_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
