"""The ``adabudget`` console script: ``train``, ``search``, ``dashboard``, ``table``, ``bench``,
``data``. Each subcommand is a thin wrapper.

``adabudget train`` is a Hydra app. Hydra's own output folders are switched off
(``hydra.run.dir=.``, no ``.hydra/`` subdir, console-only logging: ``configs/train.yaml``):
``adabudget.training`` claims each run's folder itself, atomically, and this wrapper then copies
Hydra's record (config, overrides) into ``<run>/.hydra/``. In a multirun each job's folder is
``<sweep dir>/<job number>`` and the sweep folder gets ``summary.json`` at the end; one failed
or refused job does not end the sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python budget/cli.py train ...` (a W&B sweep's ${program}): Python put budget/ itself first
    # on sys.path, where its config.py, data/ and metrics.py would shadow top-level modules of
    # that name; import from the folder that holds the package instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from adabudget.job import REFUSED_SUFFIX  # noqa: E402
from adabudget.version import __version__  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402

USAGE = """usage: adabudget <command> [args]

commands:
  train [key=value ...]   train one configuration (Hydra overrides; -m sweeps)
  bench step [options]    per-step time/memory of LoRA vs AdaLoRA (ours and peft's)
  bench lr [options]      the learning-rate grid of AdaLoRA variants, peft's AdaLoRA and LoRA
  bench search [options]  search overhead per trial outside train(), 1 and 2 workers side by side
  bench supernet [opts]   supernet vs stand-alone ranking (Kendall tau), cost, equal-compute search
  bench load [options]    peak memory of a load: fp32, load-then-quantise, nf4 quantised while read
  bench storage [options] trials/s and time in storage calls of N workers: journal, PostgreSQL, gRPC proxy
  bench cli [--repeat N]  wall time of every --help and of one TAB, each in a fresh interpreter
  bench                   the list of benches (each takes --help)
  data [key=value ...]    fetch and describe the configured task (data=mr, data.task=...)
  search [key=value ...]  an Optuna study over PEFT configurations (search.space, search.budget, ...)
  table PATH... [options] a paper table (mean ± std over seeds) from run records, Markdown or LaTeX
  reproduce PROTOCOL      run the missing cells of a paper table (configs/reproduce/), then write it
  search export-wandb-sweep [key=value ...] [--out FILE]
                          the search as a W&B sweep YAML (declarative spaces, one objective)
  search serve-storage DATABASE_URL [--host H] [--port P]
                          Optuna's gRPC proxy (and the start lock) in front of a database, for
                          workers on many machines: search.storage=grpc://H:P
  dashboard PATH... [opts] rank allocations, runs side by side, studies: served on localhost,
                          or --out FILE.html (self-contained), --png DIR (PNG + PDF per figure)
  --version, -V           the version
  --completion bash|zsh   the shell completion script (subcommands, groups, presets, keys)
  COMMAND --help          each command's options; train and search list their groups and keys

examples:
  adabudget train                                  # AdaLoRA on packaged MiniLM + movie reviews
  adabudget train method=lora method.r=8 train.lr=5e-4
  adabudget train model=bert-base-uncased data=glue_sst2 method.target_r=2
  adabudget train -m method.score=adalora,sensitivity,magnitude
  adabudget train resume=runs/default/2026-11-22_12-00-00
  adabudget dashboard runs/default runs/search/s4-mr --out dashboard.html
  torchrun --nproc_per_node 2 $(command -v adabudget) train train.device=cuda
  eval "$(adabudget --completion bash)"            # TAB completion (zsh: --completion zsh)
"""
COMMANDS = ("train", "search", "dashboard", "table", "reproduce", "bench", "data")


def _exit_code(result: dict) -> int:
    """Single runs: 0 completed / pruned / stopped by train.stop_after_step, 1 failed, 128 + N after
    signal N."""
    if result["status"] == "failed":
        return 1
    cause = str(result.get("interrupted_by") or "")
    if result["status"] == "interrupted" and cause.startswith("SIG"):
        return 128 + int(getattr(signal, cause.split()[0]))
    return 0


def _save_hydra_record(run_dir: Path, cfg, hydra_cfg) -> None:
    """Hydra's record of the command line, in the run's own folder (Hydra writes none itself),
    without the password of any URL in it (a database storage given on the command line)."""
    from adabudget.search.credentials import scrub
    from omegaconf import OmegaConf

    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(scrub(OmegaConf.to_yaml(cfg)))
    overrides = [scrub(o) for o in hydra_cfg.overrides.task]
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))


def _forget_passwords() -> None:
    """Once Hydra has composed the config: ``sys.argv`` without the password of any URL in it. W&B
    records ``sys.argv`` in each run's metadata, and forked or spawned workers inherit it; the
    composed config keeps the password where the command needs it (``search.storage``)."""
    from adabudget.search.credentials import scrub

    sys.argv = [scrub(a) for a in sys.argv]


def run_job(cfg, hydra_cfg, multirun: bool, hook=None):
    """One ``adabudget train`` job (``adabudget.job.run_job``), then its record and summary line.

    Returns the job's ``JobOutcome`` (``.value``: the primary dev metric, NaN when the run did
    not complete, the objective any Hydra sweeper reads). A single run exits with its code
    instead; ``hook``: the trial a sweeper runs the job for (``adabudget.job.TrialHook``)."""
    from adabudget.config import ConfigError
    from adabudget.job import run_job as run
    from adabudget.report import summary

    try:
        cfg, outcome = run(cfg, hydra_cfg, multirun, hook)
    except ConfigError as err:  # a single run's config (a multirun's is an outcome)
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C twice): the last periodic checkpoint stands", file=sys.stderr)
        if multirun:
            raise
        sys.exit(130)
    if outcome.refused is not None:
        print(f"config error: {outcome.refused}", file=sys.stderr)
        return outcome
    result = outcome.result
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for the run
        if cfg.resume is None and Path(result["run_dir"]).is_dir():
            _save_hydra_record(Path(result["run_dir"]), cfg, hydra_cfg)
        print(summary(result))
        if result.get("note"):
            print(result["note"])
    if not multirun and _exit_code(result):
        sys.exit(_exit_code(result))
    return outcome


class MultirunSummary(Callback):
    """After a ``-m`` sweep: one line per job (status, primary dev metric, run folder, overrides),
    and why a job did not complete, also written to ``<sweep dir>/summary.json``. Every job is
    read from its folder, so any launcher works (joblib's processes, submitit's, Slurm's jobs): a
    run's ``result.json``, a refused config's ``<job>.refused.json``. They are all in one sweep
    folder because ``hydra.sweep.dir`` resolves once, in the launching process (its
    ``${adabudget.pid:}`` is cached, ``adabudget.compose.register_configs``)."""

    def __init__(self):
        self.overrides: dict[str, list[str]] = {}

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from omegaconf import OmegaConf

        num = OmegaConf.select(config, "hydra.job.num", default=None, throw_on_missing=False)
        if num is not None:  # single runs (no job number) have nothing to summarise
            self.overrides[str(num)] = list(job_return.overrides or [])

    def on_multirun_end(self, config, **kwargs) -> None:
        from adabudget.search.credentials import scrub

        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir():
            return
        rows = {}
        for path in sweep.glob("*/result.json"):
            r = json.loads(path.read_text())
            metric = r.get("primary_metric", "accuracy")
            value = ((r.get("final") or {}).get("dev") or {}).get(metric)
            rows[path.parent.name] = {
                "job": path.parent.name,
                "status": r.get("status"),
                "metric": metric,
                "dev": value,
                "run_dir": str(path.parent),
                "error": r.get("error"),
            }
        for path in sweep.glob(f"*{REFUSED_SUFFIX}"):
            job = path.name.removesuffix(REFUSED_SUFFIX)
            record = json.loads(path.read_text())
            rows.setdefault(
                job,
                {
                    "job": job,
                    "status": "refused",
                    "metric": None,
                    "dev": None,
                    "run_dir": None,
                    "error": record.get("error"),
                    "overrides": record.get("overrides"),  # a job in another process told no callback here
                },
            )
        rows = [rows[k] for k in sorted(rows, key=lambda k: (len(k), k))]
        for row in rows:
            job = row["job"].split("_")[0]
            saved = row.pop("overrides", None) or _saved_overrides(row["run_dir"])
            row["overrides"] = [scrub(o) for o in self.overrides.get(job) or saved]
        (sweep / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        done = sum(r["status"] == "completed" for r in rows)
        print(f"\nsweep {sweep}: {done} of {len(rows)} job(s) completed")
        for r in rows:
            dev = f"{r['metric']}={r['dev']:.4f}" if r["dev"] is not None else "-"
            print(f"  job {r['job']:>3}  {r['status']:<11} dev {dev:<18} {' '.join(r['overrides'])}")
            if r["status"] != "completed" and r["error"]:
                print(f"           {str(r['error']).splitlines()[0][:200]}")
        print(f"  (runs in {sweep}/<job>, this table in {sweep / 'summary.json'})")


def _saved_overrides(run_dir: str | None) -> list[str]:
    """A job's overrides from its run folder (``.hydra/overrides.yaml``), for jobs that ran in
    another process (the adabudget sweeper's pool, other launchers)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml" if run_dir else None
    if path is None or not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _train_app(args: list[str]) -> None:
    import hydra
    from adabudget.compose import config_dir, register_configs
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    register_configs()
    if "hydra/sweeper=adabudget" in args and not _sweeper_installed():
        print(
            "hydra/sweeper=adabudget: the sweeper plugin is not installed here; run `pip install -e .` "
            "again (pyproject.toml maps hydra_plugins from search/plugins/)",
            file=sys.stderr,
        )
        sys.exit(2)
    # Hydra reads sys.argv; its shell-completion script registers argv[0]'s name: `adabudget`
    sys.argv = ["adabudget", *_experiment_files(args)]
    started = []

    def app(cfg) -> float:
        started.append(True)
        _forget_passwords()
        hydra_cfg = HydraConfig.get()
        return run_job(cfg, hydra_cfg, hydra_cfg.mode == RunMode.MULTIRUN).value

    def for_trial(hook):
        """The job bound to a sweeper's trial (``adabudget.job.bind_trial``): its outcome returned whole."""
        return lambda cfg: run_job(cfg, HydraConfig.get(), True, hook)

    app.for_trial = for_trial
    main = hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(app)
    _exit_2_on_composition_error(main, sys.argv[1:], "train", started)


def _exit_2_on_composition_error(
    app: Callable[[], object], args: list[str], config_name: str, started: list
) -> None:
    """Run Hydra's ``app``; an override Hydra cannot apply (an unknown key, a value of the wrong
    type) makes it print its report and exit 1 before the job starts: that is a config error
    (exit 2, as ours are), with a line naming the key and the fix. Composed again only then, to
    tell it from Hydra's other early exits; sweeps (``-m``) keep Hydra's handling."""
    try:
        app()
    except SystemExit as err:
        if err.code != 1 or started or any(a in ("-m", "--multirun") or a.startswith("-") for a in args):
            raise
        message = _composition_error(args, config_name)
        if message is None:
            raise
        print(f"config error: {message}", file=sys.stderr)
        sys.exit(2)


def _composition_error(args: list[str], config_name: str) -> str | None:
    """Why ``args`` do not compose (None: they do), naming the key and its fix."""
    import dataclasses

    from adabudget.compose import compose
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    try:
        compose(args, config_name=config_name)
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
            kind = getattr(cause, "object_type", None)
            known = [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []
            where = key.rsplit(".", 1)[0] if "." in key else "the config"
            listed = f"; the keys of {where}: {', '.join(known)}" if known else ""
            return f"{key}: unknown key{listed} (`adabudget {config_name} --cfg job` prints the whole config)"
        if key:
            return f"{key}: {str(cause).splitlines()[0]}"
        return str(err).splitlines()[0]
    return None


def _sweeper_installed() -> bool:
    """Whether Hydra can find the adabudget sweeper (an editable install made before it existed cannot)."""
    import importlib.util

    try:
        return importlib.util.find_spec("hydra_plugins.adabudget_sweeper") is not None
    except ModuleNotFoundError:
        return False


def _search_app(args: list[str]) -> None:
    """``adabudget search``: the train config plus a ``search`` node (``search.command.run_search``)."""
    import hydra
    from adabudget.compose import config_dir, register_configs
    from adabudget.search.config import register_schema

    register_configs()
    register_schema()
    sys.argv = ["adabudget", *args]

    started = []

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="search")
    def app(cfg) -> None:
        started.append(True)
        import traceback

        from adabudget.config import ConfigError
        from adabudget.search.command import run_search
        from adabudget.search.credentials import scrub
        from adabudget.search.trial import SearchInterrupted

        _forget_passwords()
        try:
            run_search(cfg)
        except SearchInterrupted as err:  # the trial checkpointed and is queued again
            print(
                f"search interrupted ({err}): the running trial will be re-run; the same command "
                "resumes the study",
                file=sys.stderr,
            )
            sys.exit(err.code)
        except ConfigError as err:  # scrubbed: a message may quote search.storage as given
            print(f"config error: {scrub(err)}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as err:  # a worker died; the study and its record are kept
            print(f"error: {scrub(err)}", file=sys.stderr)
            sys.exit(1)
        except (
            Exception
        ):  # Hydra would print the traceback after the overrides, search.storage's password too
            print(scrub(traceback.format_exc()), file=sys.stderr, end="")
            sys.exit(1)

    _exit_2_on_composition_error(app, args, "search", started)


def _experiment_files(args: list[str]) -> list[str]:
    """``experiment=<file>.yaml`` (a search's best.yaml, any preset outside configs/): the file is
    put in Hydra's ConfigStore under the experiment group and selected by that name."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "experiment" and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            name = "file_" + hashlib.sha256(str(Path(value).resolve()).encode()).hexdigest()[:12]
            ConfigStore.instance().store(
                group="experiment", name=name, node=OmegaConf.load(value), package="_global_"
            )
            arg = f"{key}={name}"
        out.append(arg)
    return out


def _shell_completion(args: list[str]) -> None:
    """``adabudget -sc query=bash``, as the script of ``adabudget train -sc install=bash`` (Hydra's)
    calls it: the candidates of ``adabudget --complete`` for $COMP_LINE on one line, for its compgen,
    a group by its name as Hydra offers it (``method``, then ``=`` typed)."""
    from adabudget.completion import complete

    line = os.environ.get("COMP_LINE", "")
    print(" ".join(complete(line[: int(os.environ.get("COMP_POINT") or len(line))], hydra_style=True)))


def _print_script(shell: str, script: Callable[[str], str]) -> None:
    try:
        print(script(shell), end="")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _cli_index() -> None:
    """``python -m adabudget.cli _index``: the groups, presets and keys of ``train`` and ``search``
    as JSON (``adabudget.completion.index`` runs it in a child process and caches what it prints:
    composing imports torch, through the method config dataclasses)."""
    from adabudget.completion import flatten, user_groups
    from adabudget.compose import config_dir, register_configs
    from adabudget.search import optuna_factory
    from adabudget.search.config import SCORERS, SUPERNET_SAMPLING, register_schema
    from adabudget.search.spaces import SPACES
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def walk(parent: str):
            for group in loader.list_groups(parent):
                name = f"{parent}/{group}" if parent else group
                yield name
                yield from walk(name)

        raw = {g: loader.get_group_options(g) for g in walk("")}
        groups = user_groups({g: v for g, v in raw.items() if v})

        def plain(cfg):
            return OmegaConf.to_container(cfg, resolve=False)

        train, search = compose(config_name="train"), compose(config_name="search")
        method_keys = {
            preset: flatten(
                plain(compose(config_name="train", overrides=[f"method={preset}"]).method), "method."
            )
            for preset in groups["method"]
        }
    default_method = OmegaConf.to_container(train.method)["name"]
    keys = {k: v for k, v in flatten(plain(train)).items() if not k.startswith("method.")}
    spaces = [*SPACES, *(p.stem for p in sorted((Path(config_dir()) / "search" / "space").glob("*.yaml")))]
    values = {
        "search.space": list(dict.fromkeys(spaces)),
        "search.sampler": [*optuna_factory.SAMPLERS, "evolution"],
        "search.pruner": list(optuna_factory.PRUNERS),
        "search.scorer": list(SCORERS),
        "search.supernet.sampling": list(SUPERNET_SAMPLING),
    }
    search_node = plain(search)["search"]
    print(
        json.dumps(
            {
                "groups": {"train": groups, "search": groups},
                "keys": {"train": keys, "search": {**keys, **flatten(search_node, "search.")}},
                "method_keys": method_keys,
                "default_method": default_method if default_method in method_keys else "adalora",
                "values": {"train": {}, "search": values},
                "config_yaml": {
                    "train": OmegaConf.to_yaml(train),
                    "search": OmegaConf.to_yaml(OmegaConf.create({"search": search_node})),
                },
            },
            default=str,
        )
    )


def _table(args: list[str]) -> None:
    """``adabudget table PATH...``: a paper table of the completed runs at PATH (analysis.tables)."""
    import argparse

    from adabudget.analysis.records import RecordError
    from adabudget.analysis.tables import LAYOUTS, table

    p = argparse.ArgumentParser(
        prog="adabudget table",
        description="A paper table (AdaLoRA Table 1 layout) "
        "from run records: run folders, trees of them, or study folders.",
    )
    p.add_argument("paths", nargs="+")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help="named columns (tasks, metrics, split)")
    p.add_argument(
        "--rows", default="label", help="label (meta.label, else method and params) or a runs column"
    )
    p.add_argument("--format", default="markdown", choices=["markdown", "latex"])
    p.add_argument("--out", help="write to this file instead of stdout")
    a = p.parse_args(args)
    try:
        text = table(a.paths, a.layout, a.rows, a.format)
    except (RecordError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text, end="")


def _reproduce(args: list[str]) -> None:
    """``adabudget reproduce PROTOCOL``: the missing cells of a paper table, then the table."""
    import argparse

    from adabudget.completion import protocols

    p = argparse.ArgumentParser(
        prog="adabudget reproduce",
        description="Run the missing cells of a "
        "protocol (configs/reproduce/<name>.yaml), then write its table.",
    )
    p.add_argument("protocol", help=f"{', '.join(protocols())}, or a path to a protocol .yaml")
    p.add_argument("--variant", help="a named variant of the protocol (e.g. cpu: a reduced schedule)")
    p.add_argument("--workers", type=int, default=1, help="processes taking cells in turn")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--gpus", help="GPU indices the workers spread over, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--gpus-per-cell", help="GPUs per worker: an integer, or 1/k to pack k cells on one GPU")
    p.add_argument("--runs-root", default="runs")
    p.add_argument(
        "--rows",
        help="only the rows whose label matches one of these comma-separated shell patterns, "
        'e.g. "GeoLoRA*,LoRA r=4"',
    )
    p.add_argument("--tasks", help="only these comma-separated tasks of the protocol")
    p.add_argument("--out", help="also write the Markdown table here")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells (done, to resume, new) and the time left from the finished cells; run nothing",
    )
    a = p.parse_args(args)
    # after the parse: --help imports neither torch nor the search
    from adabudget.config import ConfigError
    from adabudget.search.reproduce import reproduce
    from adabudget.search.trial import SearchInterrupted

    rows = [r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else None
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
    if a.dry_run:
        from adabudget.search.reproduce import dry_run

        try:
            dry_run(a.protocol, a.variant, a.runs_root, a.workers, rows=rows, tasks=tasks)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    try:
        root, protocol, missing = reproduce(
            a.protocol, a.variant, a.workers, a.runs_root, a.threads, a.gpus, a.gpus_per_cell, rows, tasks
        )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except SearchInterrupted as err:  # a stop signal: the cell checkpointed, no table yet
        print(f"reproduce stopped by {err}: run the same command to resume", file=sys.stderr)
        sys.exit(err.code)
    from adabudget.analysis.tables import table

    try:
        text = table([root], layout=protocol.layout)
    except ValueError as err:  # no completed cell yet
        print(f"no table yet: {err}", file=sys.stderr)
        sys.exit(1)
    (root / "table.md").write_text(text)
    (root / "table.tex").write_text(table([root], layout=protocol.layout, fmt="latex"))
    if a.out:
        Path(a.out).write_text(text)
    print(text, end="")
    if missing:
        sys.exit(1)


def _dashboard(args: list[str]) -> None:
    """``adabudget dashboard PATH...``: serve the dashboard (analysis.dashboard), or write it."""
    import argparse

    from adabudget.analysis.dashboard import DashboardError, build, export_images, serve, to_html
    from adabudget.analysis.extras import MissingExtra
    from adabudget.analysis.records import STATUSES, RecordError

    p = argparse.ArgumentParser(
        prog="adabudget dashboard",
        description="Rank allocations of runs, runs side by "
        "side, and studies: served on localhost (refreshing while a run or study lives), or "
        "written as one self-contained HTML file and as images.",
    )
    p.add_argument("paths", nargs="+", help="run folders, folders above them, study folders or storages")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8050, help="0: any free port")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between a live page's checks")
    p.add_argument(
        "--status", action="append", choices=STATUSES, help="only runs of this status (repeat; default all)"
    )
    p.add_argument(
        "--out", help="write one self-contained HTML file (opens with no network) instead of serving"
    )
    p.add_argument(
        "--png", metavar="DIR", help="write every figure as PNG and PDF into DIR instead of serving"
    )
    a = p.parse_args(args)
    try:
        if a.out or a.png:
            dash = build(a.paths, a.status)
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(to_html(dash))
                print(f"wrote {a.out}")
            if a.png:
                written = export_images(dash, a.png)
                print(f"wrote {len(written)} images to {a.png}")
        else:
            serve(a.paths, a.host, a.port, a.status, a.refresh)
    except (RecordError, DashboardError, MissingExtra, OSError) as err:
        from adabudget.search.credentials import scrub

        print(f"error: {scrub(err)}", file=sys.stderr)
        sys.exit(2)


def _data(args: list[str]) -> None:
    if "--prefetch" in args:  # every packaged file into the cache, for machines without network
        if args != ["--prefetch"]:
            print(
                f"adabudget data --prefetch takes no other argument (got {args}); it fills $ADABUDGET_CACHE "
                "(default ~/.cache/adabudget): ADABUDGET_CACHE=DIR adabudget data --prefetch",
                file=sys.stderr,
            )
            sys.exit(2)
        from adabudget.prefetch import prefetch

        sys.exit(0 if prefetch() else 1)
    from adabudget.compose import compose, resolve
    from adabudget.config import ConfigError
    from adabudget.data import describe

    try:
        print(describe(resolve(compose(args)).data))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


HELP = ("-h", "--help")


def _answered_without_imports(command: str, rest: list[str]) -> bool:
    """What needs neither torch nor Hydra: the version, the completion scripts and candidates, and
    the help of the Hydra commands and of ``bench`` (``adabudget.completion``). True when answered."""
    from adabudget import completion

    wants_help = any(a in HELP for a in rest)
    if command in ("-V", "--version"):
        print(f"adabudget {__version__}")
    elif command == "--completion":
        _print_script(rest[0] if rest else "(none)", completion.script)
    elif command == "--complete":
        completion.complete_main()
    elif command == "train" and wants_help and "--hydra-help" not in rest:
        print(completion.train_help(), end="")
    elif command == "search" and rest[:1] == ["export-wandb-sweep"] and wants_help:
        print(completion.export_wandb_sweep_help(), end="")
    elif command == "search" and rest[:1] != ["serve-storage"] and wants_help and "--hydra-help" not in rest:
        print(completion.search_help(), end="")
    elif command == "data" and wants_help:
        print(completion.data_help(), end="")
    elif command == "bench" and (not rest or rest[0] in HELP):
        print(completion.bench_help(), end="")
    elif command == "bench" and rest[0] in ("step", "load") and wants_help:
        from adabudget.bench_args import load_parser, step_parser

        (step_parser if rest[0] == "step" else load_parser)().print_help()
    else:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    from adabudget.completion import IndexBuildError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    try:
        if _answered_without_imports(command, rest):
            return
    except IndexBuildError as err:  # a config that does not compose: say so, as train would
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if command in ("-sc", "--shell-completion"):
        _shell_completion(argv)
    elif command == "_index":  # internal: adabudget.completion.index builds its cache with it
        _cli_index()
    elif command == "train":
        _train_app(rest)
    elif command == "search" and rest[:1] == ["export-wandb-sweep"]:
        from adabudget.search.wandb import export_main

        export_main(rest[1:])
    elif command == "search" and rest[:1] == ["serve-storage"]:
        from adabudget.search.storage import serve_main

        serve_main(rest[1:])
    elif command == "search":
        _search_app(rest)
    elif command == "dashboard":
        _dashboard(rest)
    elif command == "table":
        _table(rest)
    elif command == "reproduce":
        _reproduce(rest)
    elif command == "bench" and rest[:1] == ["search"]:  # adabudget.bench imports no search: route it here
        from adabudget.search.bench import main as search_bench_main

        search_bench_main(rest[1:])
    elif command == "bench" and rest[:1] == ["supernet"]:
        from adabudget.search.bench_supernet import main as supernet_bench_main

        supernet_bench_main(rest[1:])
    elif command == "bench" and rest[:1] == ["dashboard"]:
        from adabudget.analysis.bench_dashboard import main as dashboard_bench_main

        dashboard_bench_main(rest[1:])
    elif command == "bench" and rest[:1] == ["storage"]:
        from adabudget.search.bench_storage import main as storage_bench_main

        storage_bench_main(rest[1:])
    elif command == "bench" and rest[:1] == ["lr"]:  # not through adabudget.bench: it imports torch
        from adabudget.bench_lr import main as lr_bench_main

        lr_bench_main(rest[1:])
    elif command == "bench" and rest[:1] == ["cli"]:
        from adabudget.bench_cli import main as cli_bench_main

        cli_bench_main(rest[1:])
    elif command == "bench":
        from adabudget.bench import main as bench_main

        bench_main(rest)
    elif command == "data":
        _data(rest)
    else:
        print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
