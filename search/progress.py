"""The progress a search prints: one line per finished trial and a bar over trained trials, read
from the storage, so it works for any number of workers (``adabudget search``, the evolution and
the Hydra sweeper alike)."""

from __future__ import annotations

import sys
import time

import optuna
from adabudget.search.optuna_factory import finished
from adabudget.search.trial import Setup, trial_row
from optuna.trial import TrialState


class Progress:
    """One line per finished trial (number, state, objective, best so far, params in short, time,
    ETA) and a bar over trained trials, read from the storage, so it works for any number of workers."""

    def __init__(self, setup: Setup):
        from tqdm.auto import tqdm

        self.setup = setup
        self.seen: set[int] = set()
        self.names = setup.scfg.objective_names(setup.primary)
        self.sign = [1 if d == "maximize" else -1 for d in setup.scfg.direction_names(setup.primary)]
        self.best = None
        self.start = time.time()
        self.bar = tqdm(
            total=setup.scfg.n_trials,
            desc=setup.study,
            leave=False,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )

    def poll(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.number in self.seen or t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            self.seen.add(t.number)
            row = trial_row(t)
            self.note_best(t)
            value = (
                " ".join(f"{n}={v:.4g}" for n, v in zip(self.names, row["values"])) if row["values"] else "-"
            )
            params = ", ".join(f"{k}={_short(v)}" for k, v in list(t.params.items())[:6])
            if row["baseline"]:
                params = f"baseline {row['baseline']}" + (f", {params}" if params else "")
            if row["infeasible"]:
                params += f"; infeasible: {row['infeasible'][:90]}"
            elif row["state"] == "fail" and row["error"]:
                params += f"; {str(row['error'])[:90]}"
            done = sum(finished(x) for x in trials)
            timed = [
                x.user_attrs["wall_time_s"] for x in trials if finished(x) and "wall_time_s" in x.user_attrs
            ]
            left = max(0, self.setup.scfg.n_trials - done)
            eta = statistics_mean(timed) * left / self.setup.scfg.workers if timed else None
            best = f"best {self.best[1]:.4g} (#{self.best[0]})" if self.best else "best -"
            wall = f"{row['wall_time_s']:.0f}s" if row["wall_time_s"] else ""
            self.bar.write(
                f"trial {t.number:>3} {row['state']:<10} {value:<22} {best:<20} {wall:>6}  "
                f"ETA {eta / 60:.0f} min  [{params}]"
                if eta is not None
                else f"trial {t.number:>3} {row['state']:<10} {value:<22} {best:<20} {wall:>6}  [{params}]"
            )
            self.bar.n = min(done, self.setup.scfg.n_trials)
            self.bar.refresh()

    def note_best(self, t) -> None:
        """Keep the best trained trial (first objective); infeasible ones carry placeholders."""
        if (
            t.state == TrialState.COMPLETE
            and finished(t)
            and (self.best is None or self.sign[0] * t.values[0] > self.sign[0] * self.best[1])
        ):
            self.best = (t.number, t.values[0])

    def close(self) -> None:
        self.bar.close()


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
