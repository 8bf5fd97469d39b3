"""adabudget reproduce: a two-cell tiny protocol runs, resumes without re-running finished cells,
and writes its table; the shipped protocols compose and validate every cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adabudget.search.reproduce import cell_state, cells, check, load_protocol
from conftest import cli

TINY = """name: tiny
seeds: [42]
base: [model=tiny-bert, debug=fast, train.max_steps=8, train.num_threads=1]
tasks:
  mr: [data=mr]
rows:
  - {label: "LoRA r=2", overrides: [method=lora, method.r=2]}
  - {label: "AdaLoRA 4->2",
     overrides: [method=adalora, method.init_r=4, method.target_r=2, method.mask_interval=2]}
"""


def test_two_cells_run_resume_and_tabulate(tmp_path):
    proto = tmp_path / "tiny.yaml"
    proto.write_text(TINY)
    first = cli(["reproduce", str(proto), "--runs-root", str(tmp_path / "runs")], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 cells, 0 done, 2 to run" in first.stdout
    root = tmp_path / "runs" / "reproduce" / "tiny"
    table = (root / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| LoRA") or line.startswith("| AdaLoRA")]
    assert [line.split(" | ")[0] for line in lines] == [
        "| LoRA r=2",
        "| AdaLoRA 4->2",
    ]  # the protocol's order
    assert all("(1)" in line for line in lines) and (root / "table.tex").exists()

    protocol = load_protocol(str(proto))
    lora, ada = cells(protocol, root)
    lora_run = cell_state(lora)[1]
    before = (lora_run / "result.json").stat().st_mtime
    for path in sorted(Path(ada.folder).rglob("*"), reverse=True):  # the AdaLoRA cell never finished
        path.unlink() if path.is_file() else path.rmdir()
    again = cli(["reproduce", str(proto), "--runs-root", str(tmp_path / "runs")], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 cells, 1 done, 1 to run" in again.stdout
    assert "AdaLoRA 4->2 | mr | seed 42: completed" in again.stdout and "LoRA r=2 | mr" not in again.stdout
    assert (lora_run / "result.json").stat().st_mtime == before  # the finished cell was not re-run
    assert cell_state(ada)[0] == "done"


@pytest.mark.parametrize(
    "name, variant, n",
    [
        ("minilm-budget", None, 144),
        ("minilm-budget", "cpu", 96),
        ("adalora-glue", None, 480),
        ("peft-metamath", None, 5),
        ("smollm2-instruct", None, 30),
        ("smollm2-instruct", "cpu", 20),
        ("minilm-fair", None, 792),
        ("minilm-fair", "cpu", 88),
        ("minilm-fair", "long", 792),
    ],
)
def test_shipped_protocols_compose(tmp_path, name, variant, n):
    protocol = load_protocol(name, variant)
    assert len(cells(protocol, tmp_path)) == n
    check(protocol, str(tmp_path))  # every row on every task composes and validates (nothing is loaded)


def test_unknown_protocol_and_variant():
    from adabudget.config import ConfigError

    with pytest.raises(ConfigError, match="known protocols"):
        load_protocol("nope")
    with pytest.raises(ConfigError, match="variants"):
        load_protocol("minilm-budget", "nope")


def test_one_bad_cell_does_not_stop_the_rest(tmp_path, capsys, monkeypatch):
    """The LoRA cell's run raises (an injected OSError inside ``train``): it is reported and left
    missing, the AdaLoRA cell after it still runs and completes, and the count of missing cells
    says 1 (the CLI exits 1 and the same command retries it)."""
    import adabudget.training
    from adabudget.search.reproduce import reproduce

    real = adabudget.training.train

    def train(cfg, on_eval=None):
        if cfg.meta.label == "LoRA r=2":
            raise OSError(28, "No space left on device")
        return real(cfg, on_eval=on_eval)

    monkeypatch.setattr(adabudget.training, "train", train)
    proto = tmp_path / "tiny.yaml"
    proto.write_text(TINY)
    root, protocol, missing = reproduce(str(proto), runs_root=str(tmp_path / "runs"), threads=1)
    out = capsys.readouterr()
    lora, ada = cells(protocol, root)
    assert missing == 1 and cell_state(lora)[0] == "new" and cell_state(ada)[0] == "done"
    assert "LoRA r=2 | mr | seed 42: failed (OSError: [Errno 28] No space left on device)" in out.out
    assert "AdaLoRA 4->2 | mr | seed 42: completed" in out.out
    assert "1 cell(s) did not complete (e.g. LoRA r=2 | mr | seed 42)" in out.out
    assert not (Path(lora.folder) / ".claim").exists()  # its claim is given back: a later run retries it


def test_a_stopped_cell_stops_the_protocol(tmp_path, capsys):
    """A cell that ends ``interrupted`` (here by train.stop_after_step, as a scheduler's SIGTERM
    ends it) stops the protocol: the cells after it do not start, and the same command resumes
    the stopped cell from its checkpoint. (It went on with the next cell before.)"""
    from adabudget.search.reproduce import reproduce
    from adabudget.search.trial import SearchInterrupted

    proto = tmp_path / "tiny.yaml"
    proto.write_text(
        TINY.replace(
            "overrides: [method=lora, method.r=2]",
            "overrides: [method=lora, method.r=2, train.stop_after_step=4]",
        )
    )
    with pytest.raises(SearchInterrupted):
        reproduce(str(proto), runs_root=str(tmp_path / "runs"), threads=1)
    out = capsys.readouterr().out
    lora, ada = cells(load_protocol(str(proto)), tmp_path / "runs" / "reproduce" / "tiny")
    assert cell_state(lora)[0] == "resume" and cell_state(ada)[0] == "new"
    assert "LoRA r=2 | mr | seed 42: interrupted" in out and "the same command resumes it" in out
    root, _, missing = reproduce(str(proto), runs_root=str(tmp_path / "runs"), threads=1)
    assert missing == 0 and cell_state(lora)[0] == "done" and cell_state(ada)[0] == "done"


GRID = """name: grid
seeds: [42]
levels: {tiny: 1000}
base: [model=tiny-bert, debug=fast, train.max_steps=6, train.num_threads=1]
tasks:
  mr: [data=mr]
rows:
  - {label: "LoRA r=2", level: tiny, lr: [1e-3, 5e-3], overrides: [method=lora, method.r=2]}
  - {label: "LoRA r=1", overrides: [method=lora, method.r=1]}
"""


def test_a_learning_rate_grid_runs_a_cell_per_rate_and_the_dry_run_estimates_from_finished_cells(
    tmp_path, capsys
):
    """A row's lr grid is a cell per rate (its own folder, train.lr and meta.lr set); --dry-run lists
    every cell with its state and estimates the time left from the finished cells' wall times; a run
    prints [done/total, time left] after each cell; the table keeps the rate chosen on dev."""
    import json

    from adabudget.analysis.tables import table
    from adabudget.search.reproduce import dry_run, estimate, reproduce

    proto = tmp_path / "grid.yaml"
    proto.write_text(GRID)
    protocol = load_protocol(str(proto))
    root = tmp_path / "runs" / "reproduce" / "grid"
    grid_cells = cells(protocol, root)
    assert [(c.label, c.lr) for c in grid_cells] == [
        ("LoRA r=2", 1e-3),
        ("LoRA r=2", 5e-3),
        ("LoRA r=1", None),
    ]
    assert (
        Path(grid_cells[0].folder).parts[-2:] == ("lr0.001", "s42")
        and "train.lr=0.001" in grid_cells[0].overrides
    )
    assert Path(grid_cells[2].folder).parts[-2:] == (
        "mr",
        "s42",
    )  # a row without a grid: the layout as before

    assert dry_run(str(proto), runs_root=str(tmp_path / "runs")) == 3
    out = capsys.readouterr().out
    assert "LoRA r=2 | mr | lr 0.001 | seed 42: new" in out and "LoRA r=1 | mr | seed 42: new" in out
    assert "3 cells, 0 done, 0 to resume, 3 new" in out and "unknown (no finished cell yet)" in out
    assert not root.exists()  # a dry run creates nothing

    _, _, missing = reproduce(str(proto), runs_root=str(tmp_path / "runs"), threads=1)
    out = capsys.readouterr().out
    assert missing == 0
    assert "LoRA r=2 | mr | lr 0.005 | seed 42: completed" in out
    assert "[1/3 cells done, ~" in out and "[3/3 cells done, ~0 s left]" in out
    record = json.loads(next(Path(grid_cells[1].folder).glob("*/result.json")).read_text())
    assert record["meta"]["lr"] == 5e-3 and record["meta"]["level_params"] == 1000
    config = next(Path(grid_cells[1].folder).glob("*/config.yaml")).read_text()
    assert "lr: 0.005" in config

    # the estimate: a missing cell counts the mean wall time of its row and task's finished cells
    walls = [
        json.loads(next(Path(c.folder).glob("*/result.json")).read_text())["wall_time_s"] for c in grid_cells
    ]
    for path in sorted(Path(grid_cells[1].folder).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    left, basis, done, total = estimate(protocol, root)
    assert (basis, done, total) == (2, 2, 3) and left == pytest.approx(walls[0])
    assert dry_run(str(proto), runs_root=str(tmp_path / "runs"), workers=2) == 1
    assert "from 2 finished cell(s)" in capsys.readouterr().out

    text = table([root], made="2026-12-06")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| LoRA")}
    assert "@0.001" in rows["| LoRA r=2"] and "@" not in rows["| LoRA r=1"]  # the rate it ran at
    assert "Levels in trainable adapter parameters: tiny = 1,000" in text


@pytest.mark.parametrize(
    "row, match",
    [
        ('{label: "A", level: big, overrides: [method=lora]}', "level 'big' is not one of levels"),
        ('{label: "A", lr: [1e-3, 0.001], overrides: [method=lora]}', "distinct positive learning rates"),
        ('{label: "A", lr: [-1e-3], overrides: [method=lora]}', "distinct positive learning rates"),
        ('{label: "A", lr: 1e-3, overrides: [method=lora]}', "distinct positive learning rates"),
        ('{label: "A", lr: [1e-3], overrides: [method=lora, train.lr=1e-3]}', "or an lr grid, not both"),
        ('{label: "A", rate: [1e-3], overrides: [method=lora]}', "unknown key"),
        ('{label: "A", tasks: [sst2], overrides: [method=lora]}', r"tasks \['sst2'\] are not tasks"),
        ('{label: "A", tasks: mr, overrides: [method=lora]}', "tasks must be a list of task names"),
    ],
)
def test_bad_rows_are_refused_naming_the_row_and_the_fix(tmp_path, row, match):
    from adabudget.config import ConfigError

    proto = tmp_path / "bad.yaml"
    proto.write_text(GRID.split("rows:")[0] + f"rows:\n  - {row}\n")
    with pytest.raises(ConfigError, match=match) as err:
        load_protocol(str(proto))
    assert "row 'A'" in str(err.value)


TWO_TASKS = """name: two
seeds: [42, 1]
base: [model=tiny-bert, debug=fast, train.max_steps=6]
tasks:
  mr: [data=mr]
  sst2: [data=sst2]
rows:
  - {label: "LoRA r=2", overrides: [method=lora, method.r=2]}
  - {label: "SoRA", tasks: [mr], overrides: [method=sora]}
variants:
  short:
    tasks: {sst2: [data=sst2]}
"""


def test_a_row_limited_to_some_tasks_runs_only_there(tmp_path):
    proto = tmp_path / "two.yaml"
    proto.write_text(TWO_TASKS)
    got = [(c.label, c.task, c.seed) for c in cells(load_protocol(str(proto)), tmp_path)]
    assert got == [
        ("LoRA r=2", "mr", 42),
        ("LoRA r=2", "mr", 1),
        ("LoRA r=2", "sst2", 42),
        ("LoRA r=2", "sst2", 1),
        ("SoRA", "mr", 42),
        ("SoRA", "mr", 1),
    ]
    # a variant without the row's task leaves the row without cells (it is not an error)
    short = cells(load_protocol(str(proto), "short"), tmp_path)
    assert [(c.label, c.task) for c in short] == [("LoRA r=2", "sst2")] * 2


def test_rows_and_tasks_select_part_of_the_same_table(tmp_path, capsys):
    """``--rows`` (shell patterns on the labels) and ``--tasks`` run only those cells, in their own
    folders of the protocol's table, so the rest runs later into the same table; a pattern that
    matches no row, or a task the protocol lacks, is refused naming the known ones."""
    from adabudget.config import ConfigError
    from adabudget.search.reproduce import dry_run, reproduce

    proto = tmp_path / "tiny.yaml"
    proto.write_text(TINY)
    runs = str(tmp_path / "runs")
    assert dry_run(str(proto), runs_root=runs, rows=["Ada*"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert lines == ["  AdaLoRA 4->2 | mr | seed 42: new"]
    root, protocol, missing = reproduce(str(proto), runs_root=runs, threads=1, rows=["Ada*"], tasks=["mr"])
    assert missing == 0 and [r["label"] for r in protocol.rows] == ["AdaLoRA 4->2"]
    assert (root / "AdaLoRA_4-_2" / "mr" / "s42").is_dir() and not (root / "LoRA_r=2").exists()
    (result,) = (root / "AdaLoRA_4-_2" / "mr" / "s42").glob("*/result.json")
    assert json.loads(result.read_text())["meta"]["row"] == 1  # its place in the file: the table's order
    assert dry_run(str(proto), runs_root=runs) == 1  # the whole table: the LoRA cell still to run
    with pytest.raises(
        ConfigError, match=r"--rows GeoLoRA\*: no row of tiny matches; its rows: \['LoRA r=2'"
    ):
        dry_run(str(proto), runs_root=runs, rows=["GeoLoRA*"])
    with pytest.raises(ConfigError, match=r"--tasks sst2: not a task of tiny; its tasks: \['mr'\]"):
        reproduce(str(proto), runs_root=runs, rows=["LoRA*"], tasks=["sst2"])
    assert not (root / "LoRA_r=2").exists()  # refused before any cell ran
