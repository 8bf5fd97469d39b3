"""Smoke test of ``adabudget bench search`` on tiny settings: both studies run (one worker in this
process, two spawned), the table is printed and the last line gives two overhead fractions."""

import re

from adabudget.cli import main

LINE = re.compile(r"overhead workers1=(\S+) workers2=(\S+)")


def test_bench_search_prints_table_and_overhead_line(capsys):
    main(
        [
            "bench",
            "search",
            "--trials",
            "2",
            "--steps",
            "4",
            "--train-samples",
            "32",
            "--eval-samples",
            "16",
            "--threads",
            "1",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    match = LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    fractions = [float(x) for x in match.groups()]
    assert all(0 <= f < 1 for f in fractions), fractions
    table = "\n".join(lines)
    for row in (
        "trained trials",
        "train()",
        "sample (space, count, solve)",
        "process start",
        "overhead outside",
    ):
        assert row in table, row
    trained = next(line for line in lines if line.startswith("trained trials")).split()[-2:]
    assert trained == ["2", "2"]  # exactly n_trials in each study, whatever the number of workers
