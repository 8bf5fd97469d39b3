"""``adabudget bench cli``: how long the command line takes to answer, as a user sees it.

Each command runs in a fresh interpreter (``python -m adabudget.cli ...``, the console script's
code, output discarded), ``--repeat`` times; the median wall time is shown, every command in one
table measured in one process one after the other, so they share the machine's load. The index of
groups and keys that help and completion read (``adabudget.completion``) is built once first, in a
fresh cache folder, and that build is reported on its own line: it is paid once per install and
after any change to the configs or the config modules.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

# every --help a user may ask for (tests/test_cli_help.py runs the same list)
HELP_COMMANDS = [
    ["--version"],
    ["--help"],
    ["train", "--help"],
    ["search", "--help"],
    ["search", "export-wandb-sweep", "--help"],
    ["search", "serve-storage", "--help"],
    ["data", "--help"],
    ["table", "--help"],
    ["reproduce", "--help"],
    ["dashboard", "--help"],
    ["bench", "--help"],
    ["bench", "step", "--help"],
    ["bench", "lr", "--help"],
    ["bench", "search", "--help"],
    ["bench", "supernet", "--help"],
    ["bench", "load", "--help"],
    ["bench", "storage", "--help"],
    ["bench", "dashboard", "--help"],
    ["bench", "cli", "--help"],
]
# one TAB: the line the shell hands over, up to the cursor
COMPLETIONS = ["adabudget search search.sp", "adabudget train method=lora method."]


def _time(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "adabudget.cli", *args], env=env, capture_output=True, text=True
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"adabudget {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return took


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="adabudget bench cli", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repeat", type=int, default=3, help="fresh interpreters per command (the median is shown)"
    )
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    print(
        f"bench cli: {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f}, "
        f"median of {a.repeat} fresh interpreter(s) per command"
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ADABUDGET_CACHE": cache, "OMP_NUM_THREADS": "1"}
        build = _time(["train", "--help"], env)  # the first one builds the index
        print(f"index of groups and keys built once (train --help, empty cache): {build:.2f} s")
        cases = [(" ".join(c), c, {}) for c in HELP_COMMANDS]
        cases += [(f"TAB: {line}<TAB>", ["--complete"], {"COMP_LINE": line}) for line in COMPLETIONS]
        width = max(len(name) for name, _, _ in cases)
        print(f"\n| {'command':<{width}} | median s | min s |")
        print(f"|{'-' * (width + 2)}|---------:|------:|")
        for name, args, extra in cases:
            times = [_time(args, {**env, **extra}) for _ in range(a.repeat)]
            rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times)})
            print(f"| {name:<{width}} | {statistics.median(times):8.2f} | {min(times):5.2f} |", flush=True)
    print(f"\n1-min load average after: {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()
