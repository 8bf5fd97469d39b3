"""The command line a user meets first: ``--version``, every subcommand's ``--help`` (each in a fresh
interpreter, which must not have imported torch after it), and shell completion of the subcommands,
groups, presets and keys in real bash and zsh processes (``adabudget.completion``)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from adabudget.bench_cli import HELP_COMMANDS
from adabudget.completion import BENCHES
from adabudget.version import __version__

# the text each --help must show: the real choices
EXPECTED = {
    "train --help": ["method", "paper/lora_r8", "hydra/launcher", "joblib", "glue_sst2", "init_r", "-m"],
    "search --help": ["search.space=", "s4", "autopeft", "lora_grid", "n_trials", "method"],
    "search export-wandb-sweep --help": ["--out FILE", "wandb sweep"],
    "search serve-storage --help": ["DATABASE_URL", "--port"],
    "data --help": ["glue_sst2", "data.max_length", "--prefetch"],
    "table --help": ["--layout", "latex"],
    "reproduce --help": ["minilm-budget", "adalora-glue", "--dry-run"],
    "dashboard --help": ["--out", "--png"],
    "bench --help": [f"  {name} " for name in BENCHES],
    "bench step --help": ["--init-r", "--methods"],
    "bench lr --help": ["--variants", "--lrs"],
    "bench search --help": ["adabudget bench search"],
    "bench supernet --help": ["adabudget bench supernet"],
    "bench load --help": ["--models", "--repeat"],
    "bench storage --help": ["adabudget bench storage"],
    "bench dashboard --help": ["--trials", "--runs"],
    "bench cli --help": ["--repeat"],
    "--help": ["train", "search", "--version", "--completion", "bench cli"],
}
RUN_MAIN = """
import sys
from adabudget.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as err:
    code = err.code or 0
sys.stdout.flush()
print("\\nRESULT", code, "torch" in sys.modules)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An ``adabudget`` on PATH running this interpreter, a fresh cache folder, and the index of
    groups and keys built once in it (the first help builds it; every later call reads it)."""
    root = tmp_path_factory.mktemp("cli")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "adabudget"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m adabudget.cli "$@"\n')
    exe.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "ADABUDGET_CACHE": str(root / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    build = subprocess.run(["adabudget", "train", "--help"], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert (root / "cache" / "cli-index.json").is_file()
    return env


def run_main(args: list[str], env: dict, extra: dict | None = None) -> tuple[str, int, bool]:
    """``adabudget.cli.main(args)`` in a fresh interpreter: (its output, exit code, torch imported)."""
    proc = subprocess.run(
        [sys.executable, "-c", RUN_MAIN, *args],
        env={**env, **(extra or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, _, result = proc.stdout.rpartition("\nRESULT ")
    assert result, f"adabudget {' '.join(args)} did not finish:\n{proc.stdout}\n{proc.stderr}"
    code, torch = result.split()
    return out + proc.stderr, int(code), torch == "True"


def test_version(env):
    for flag in ("--version", "-V"):
        proc = subprocess.run(["adabudget", flag], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"adabudget {__version__}"


def test_every_help_is_listed_and_checked():
    assert {" ".join(c) for c in HELP_COMMANDS} - {"--version"} == set(EXPECTED)


@pytest.mark.parametrize("command", [" ".join(c) for c in HELP_COMMANDS if c != ["--version"]])
def test_help_answers_without_importing_torch(env, command):
    out, code, torch = run_main(command.split(), env)
    assert code == 0, out
    assert not torch, f"`adabudget {command}` imported torch"
    assert "Traceback" not in out and "error" not in out.lower(), out
    missing = [text for text in EXPECTED[command] if text not in out]
    assert not missing, f"`adabudget {command}` does not show {missing}:\n{out}"


def test_train_help_lists_only_groups_a_user_picks(env):
    out, code, _ = run_main(["train", "-h"], env)
    assert code == 0
    groups = out.split("groups (")[1].split("\nconfig (")[0]
    listed = {line.split(":")[0] for line in groups.splitlines()[1:] if line and not line.startswith(" ")}
    expected = {"model", "data", "method", "train", "logger", "debug", "experiment"}
    assert expected | {"hydra/launcher", "hydra/sweeper"} == listed
    # internal groups: the schemas, the reproduce protocols, the search spaces, the paper schedules
    for internal in ("schema", "reproduce", "search/space", "schedule/"):
        assert internal not in groups, internal
    assert "paper/adalora_b144" in groups and "adalora_glue/sst2" in groups


BASH = """
eval "$(adabudget --completion bash)"
complete -p adabudget >/dev/null || exit 3
ask() {
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
    read -ra COMP_WORDS <<< "$1"; COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMPREPLY=(); _adabudget
    printf '%s\\n' "$1" "$(IFS=' '; echo "${COMPREPLY[*]}")"
}
"""
CASES = {
    "adabudget search search.sp": ["search.space="],
    "adabudget search search.space=aut": ["autopeft"],  # bash replaces the word after '='
    "adabudget tr": ["train"],
    "adabudget se": ["search"],
    "adabudget bench s": ["step", "search", "supernet", "storage"],
    "adabudget train method=lo": ["longlora", "lora"],
    "adabudget train meth": ["method.", "method="],
    "adabudget train method=lora method.r": ["method.r=", "method.rslora="],
    "adabudget train hydra/la": ["hydra/launcher="],
    "adabudget search search.sampler=tp": ["tpe"],
    "adabudget train train.l": ["train.log_every=", "train.lr="],
}


def test_bash_completes_subcommands_groups_presets_and_keys(env):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = BASH + "".join(f"ask '{line}'\n" for line in CASES)
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    got = {lines[i]: lines[i + 1].split() for i in range(0, len(lines), 2)}
    for line, want in CASES.items():
        if line == "adabudget train train.l":  # a subset: more train.l* keys may come
            assert set(want) <= set(got[line]), (line, got[line])
        else:
            assert sorted(got[line]) == sorted(want), (line, got[line])


def test_a_tab_imports_no_torch(env):
    out, code, torch = run_main(["--complete"], env, {"COMP_LINE": "adabudget search search.supernet.l"})
    assert code == 0 and not torch
    assert out.split() == ["search.supernet.lora=", "search.supernet.lora_scaling="]


ZSH = r"""
zmodload zsh/zpty || exit 3
# what the terminal shows, up to a pattern (60 s at most: a broken completion fails, not hangs)
upto() {
    local chunk deadline=$(( SECONDS + 60 ))
    out=""
    while (( SECONDS < deadline )); do
        if zpty -r -t z chunk; then out+=$chunk; [[ $out == $~1 ]] && return 0; else sleep 0.1; fi
    done
    print -r -- "TIMEOUT waiting for $1 in: $out"; exit 4
}
zpty z 'zsh -f -i'
zpty -w z 'PS1="> "; autoload -Uz compinit; compinit -u -D; eval "$(adabudget --completion zsh)"'
# TAB runs `adabudget --complete`; the line itself, once entered, only prints its words
zpty -w z 'adabudget() { [[ $1 == --complete ]] && command adabudget "$@" || print -r -- "RAN:$*" }'
upto '*RAN*'
zpty -w -n z $'adabudget search search.sp\t'
upto '*search.space=*'
zpty -w z 'lr'
upto '*RAN:*'$'\n''*'
print -r -- "LINE:${${out##*RAN:}%%$'\r'*}"
zpty -w -n z $'adabudget train method=lo\t'
upto '*method=longlora*method=lora*'  # the list under the line, sorted
print -r -- "LIST:${out//$'\r'/}"
"""


def test_zsh_completes_a_search_key(env):
    """A real interactive zsh (in a pseudo-terminal, zsh's zpty) with the script loaded: TAB after
    ``search.sp`` puts ``search.space=`` on the line (no space after it: the value typed next joins
    it), and TAB after ``method=lo`` lists both presets."""
    if shutil.which("zsh") is None:  # in MUST_RUN_IN_CI (tests/conftest.py): .ci/run installs it
        pytest.skip("zsh is not installed (apt-get install zsh)")
    proc = subprocess.run(["zsh", "-f", "-c", ZSH], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.split("LINE:")[1].splitlines()[0]
    assert line == "search search.space=lr", line  # completed, and no space before the value typed
    listing = proc.stdout.split("LIST:")[1]
    assert "method=longlora" in listing and "method=lora" in listing, listing


def test_hydra_install_script_still_completes(env):
    """``adabudget train -sc install=bash`` (Hydra's script, in older setups' rc files) still works:
    its function asks ``adabudget -sc query=bash``, which answers from the same index."""
    proc = subprocess.run(
        ["adabudget", "train", "-sc", "install=bash"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout + "".join(
        f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; read -ra COMP_WORDS <<< \"$COMP_LINE\"; "
        'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); hydra_bash_completion; echo "${COMPREPLY[*]}"\n'
        for line in ("adabudget search search.sp", "adabudget train method=lo", "adabudget train meth")
    )
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    space, method, meth = out.stdout.splitlines()
    assert space.split() == ["search.space="]
    assert method.split() == ["method=longlora", "method=lora"]
    assert sorted(meth.split()) == ["method", "method."]  # the group (Hydra's way), the section


def test_the_index_follows_the_configs(env, tmp_path):
    """A preset added to the configs shows in help and completion at once: the cached index is
    rebuilt when what it was made from changes."""
    from adabudget.configs_dir import config_dir

    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    (configs / "data" / "my_task.yaml").write_text(
        textwrap.dedent("""\
        defaults:
          - /schema/data@_here_
          - _self_
        task: mr
        """)
    )
    extra = {"ADABUDGET_CONFIGS": str(configs)}
    proc = subprocess.run(
        ["adabudget", "--complete"],
        env={**env, **extra, "COMP_LINE": "adabudget train data=my"},
        capture_output=True,
        text=True,
    )
    assert proc.stdout.split() == ["data=my_task"], proc.stderr
    index = json.loads((Path(env["ADABUDGET_CACHE"]) / "cli-index.json").read_text())
    assert "my_task" in index["groups"]["train"]["data"]


def test_a_config_that_does_not_compose_is_an_error_not_a_traceback(env, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(env_configs(), configs)
    (configs / "train.yaml").write_text("defaults:\n  - model: no_such_model\n")
    for args, extra in ((["train", "--help"], {}), (["--complete"], {"COMP_LINE": "adabudget train meth"})):
        proc = subprocess.run(
            ["adabudget", *args],
            env={**env, **extra, "ADABUDGET_CONFIGS": str(configs)},
            capture_output=True,
            text=True,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        if args[0] == "train":
            assert proc.returncode == 2 and "could not compose the config" in proc.stderr, proc.stderr
            assert "no_such_model" in proc.stderr
        else:  # a TAB shows nothing rather than an error in the middle of the line
            assert proc.returncode == 0 and proc.stdout == ""


def env_configs() -> str:
    from adabudget.configs_dir import config_dir

    return config_dir()
