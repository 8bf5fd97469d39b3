"""A storage's password never reaches a file, a printed line, W&B or a page.

The docs tell users to write ``search.storage=postgresql://user:pass@host:5432/db``. Against the
real PostgreSQL server the tests start, here with SCRAM password authentication and that URL on
the command line: a search with two workers, a Hydra sweep (``hydra.sweeper.storage``), the
dashboard export and every trial's W&B offline mirror; then no byte of the password is in any
file under the run roots (records, ``.hydra/``, ``search.json``, ``sweep.json``, W&B's offline
folders and their recorded arguments) nor in the captured output. What is stored is the URL
without the password, and a reader reopening it gets the password from ``PGPASSWORD``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from adabudget.config import ConfigError
from adabudget.search.credentials import scrub, without_password
from conftest import cli, cli_env

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "search" / "plugins"
TINY = ["model=tiny-bert", "debug=fast", "train.max_steps=6", "train.eval_every=0", "train.num_threads=1"]
PASSWORD = "pw" + secrets.token_hex(12)  # 26 characters no file could hold by chance


def env(**extra: str) -> dict:
    """A CLI subprocess's environment without the password, plus ``extra`` (a test's PGPASSWORD)."""
    out = cli_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out.pop("PGPASSWORD", None)  # a reader gets it only where a test gives it
    out.update(extra)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(PLUGINS), out.get("PYTHONPATH")) if p)
    return out


def holding_password(root: Path) -> list[str]:
    """Every file under ``root`` with the password's bytes in it (binary files too: W&B's .wandb logs)."""
    secret = PASSWORD.encode()
    return [
        str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()
    ]


def wandb_args(run_dir: Path) -> list[str]:
    """The command-line arguments W&B recorded for the run's offline mirror (``sys.argv[1:]``)."""
    from test_wandb import wandb_records

    envs = [r.environment for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "environment"]
    return [a for e in envs for a in e.args]


@pytest.fixture(scope="module")
def postgres():
    from pg import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    with PostgresServer(bindir, password=PASSWORD) as server:
        yield server


# ---------------------------------------------------------------- the helpers
@pytest.mark.parametrize(
    "given, stored",
    [
        ("postgresql://u:p4ss@db:5432/studies", "postgresql://u@db:5432/studies"),
        ("postgresql+psycopg2://u:p%40ss@db/studies", "postgresql+psycopg2://u@db/studies"),
        (
            "postgresql://u@db/studies?password=p4ss&sslmode=require",
            "postgresql://u@db/studies?sslmode=require",
        ),
        ("mysql://root:p4ss@127.0.0.1/x", "mysql://root@127.0.0.1/x"),
        ("sqlite:////tmp/s.db", "sqlite:////tmp/s.db"),
        ("runs/search/lr-mr/journal.log", "runs/search/lr-mr/journal.log"),
    ],
)
def test_the_stored_url_has_no_password(given, stored):
    assert without_password(given) == stored
    assert "p4ss" not in scrub(f"study s in {given}: 3 trials") and "p%40ss" not in scrub(given)


def test_scrub_leaves_urls_without_a_password_alone():
    text = "see https://sqlalche.me/e/21/e3q8 and http://127.0.0.1:8050/ and postgresql://u@db:5432/x"
    assert scrub(text) == text
    assert scrub("search.storage=postgresql://u:a:b@db/x") == "search.storage=postgresql://u@db/x"


# ---------------------------------------------------------------- reopening without the password
def test_a_reader_takes_the_password_from_pgpassword_and_says_so_when_refused(
    postgres, tmp_path, monkeypatch
):
    """The stored URL (no password) reopens with PGPASSWORD; without it, or with a wrong one, the
    error names PGPASSWORD and ~/.pgpass (and holds no password); so does the search's own open."""
    import optuna
    from adabudget.analysis.records import RecordError, load_study
    from adabudget.search.study import database_url, open_study
    from adabudget.search.trial import Setup

    url = database_url(postgres.create_db("reopen"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))  # not the user's own ~/.pgpass
    optuna.create_study(study_name="s", storage=url)
    stored = without_password(url)
    assert PASSWORD not in stored and stored.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    with pytest.raises(RecordError, match="PGPASSWORD or a ~/.pgpass line") as refused:
        load_study(stored)
    assert "no password supplied" in str(refused.value) and PASSWORD not in str(refused.value)
    with pytest.raises(RecordError, match="password authentication failed"):
        load_study(url.replace(PASSWORD, "wrong"))
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert load_study(stored).study_name == "s"
    # the search itself: a wrong password in search.storage is a config error naming the field
    setup = Setup(
        base={"model": {"name": "m"}, "data": {"task": "t"}},
        search={"storage": url},
        study="s",
        storage=url.replace(PASSWORD, "wrong-" + PASSWORD[:6]),
        root=str(tmp_path),
        primary="accuracy",
        regression=False,
        num_labels=2,
    )
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(
        ConfigError,
        match=r"search.storage=postgresql\+psycopg2://postgres@127.0.0.1:\d+/reopen: "
        "the database refused the login",
    ) as err:
        open_study(setup)
    assert "PGPASSWORD" in str(err.value) and PASSWORD[:6] not in str(err.value)


# ---------------------------------------------------------------- end to end
@pytest.mark.slow  # ~2 min: a two-worker search, a dashboard export and a two-job sweep, as subprocesses
def test_no_byte_of_the_password_is_written_printed_or_mirrored(postgres, tmp_path):
    runs = tmp_path / "runs"
    outputs = []

    # 1. adabudget search, two workers, every trial mirrored to W&B offline
    url = postgres.create_db("search")
    assert PASSWORD in url and url.startswith("postgresql://postgres:")
    proc = cli(
        [
            "search",
            *TINY,
            "method=lora",
            "search.space=lr",
            "search.enqueue=[]",
            "search.n_trials=2",
            "search.workers=2",
            "search.threads=1",
            f"search.storage={url}",
            "logger=wandb",
            f"runs_root={runs}",
        ],
        cwd=tmp_path,
        env=env(),
    )
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, scrub(proc.stderr[-3000:])
    root = runs / "search" / "lr-mr"
    record = json.loads((root / "search.json").read_text())
    assert record["storage"] == without_password(url.replace("postgresql://", "postgresql+psycopg2://"))
    assert record["finished"] == 2
    for row in record["trials"]:
        run_dir = Path(row["run_dir"])
        result = json.loads((run_dir / "result.json").read_text())
        assert "storage" not in result["meta"] and result["meta"]["trial"] == row["number"]
        assert any(
            a.startswith("search.storage=postgresql://postgres@127.0.0.1:") for a in wandb_args(run_dir)
        )
    assert f"study lr-mr in {record['storage']}" in proc.stdout

    # 2. the dashboard of the study folder: the stored URL and PGPASSWORD; without it, a clear refusal
    page = tmp_path / "pages" / "study.html"
    refused = cli(
        ["dashboard", str(root), "--out", str(page)],
        cwd=tmp_path,
        env=env(PGPASSFILE=str(tmp_path / "no-pgpass")),
    )
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 2 and "PGPASSWORD" in refused.stderr and not page.exists()
    shown = cli(["dashboard", str(root), "--out", str(page)], cwd=tmp_path, env=env(PGPASSWORD=PASSWORD))
    outputs.append(shown.stdout + shown.stderr)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "Study lr-mr: 2 trials" in page.read_text()
    # the URL with its password given on the command line: the page and the line name it without
    direct = cli(["dashboard", url, "--out", str(tmp_path / "pages" / "url.html")], cwd=tmp_path, env=env())
    outputs.append(direct.stdout + direct.stderr)
    assert direct.returncode == 0, scrub(direct.stderr[-3000:])
    assert without_password(url) in (tmp_path / "pages" / "url.html").read_text()

    # 3. a Hydra sweep on the same server: its jobs' records, .hydra/ and W&B mirrors
    sweep_url = postgres.create_db("sweep")
    proc = cli(
        [
            "train",
            "-m",
            "hydra/sweeper=adabudget",
            *TINY,
            "method=lora",
            f"runs_root={runs}",
            f"hydra.sweeper.storage={sweep_url}",
            "hydra.sweeper.study_name=sw",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "logger=wandb",
            "train.lr=choice(5e-3,1e-3)",
        ],
        cwd=tmp_path,
        env=env(),
    )
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, scrub(proc.stderr[-3000:])
    sweep = json.loads((runs / "default" / "sweeps" / "sw" / "sweep.json").read_text())
    assert sweep["storage"] == without_password(sweep_url.replace("postgresql://", "postgresql+psycopg2://"))
    assert sweep["finished"] == 2
    for row in sweep["trials"]:
        run_dir = Path(row["run_dir"])
        meta = json.loads((run_dir / "result.json").read_text())["meta"]
        assert meta == {
            "study": "sw",
            "trial": row["number"],
            "params": row["params"],
            "sweeper": "adabudget",
        }
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()
        args = wandb_args(run_dir)  # the sweep's command line, as the forked job inherited it
        assert any(a.startswith("hydra.sweeper.storage=postgresql://postgres@127.0.0.1:") for a in args), args

    # nothing holds the password: no file under the run roots (W&B's offline folders are inside the
    # run folders), no page, no captured line
    assert holding_password(tmp_path) == []
    assert not [i for i, text in enumerate(outputs) if PASSWORD in text]
