"""A search's workers as submitit jobs: ``search.launcher=slurm`` (one Slurm job per worker,
``search.slurm``) or ``search.launcher=local`` (submitit's LocalExecutor: the same code path on one
machine, how the Slurm path is tested).

    adabudget search search.launcher=slurm search.workers=8 search.storage=postgresql://... \\
        search.slurm.partition=gpu search.slurm.gpus_per_task=1

Every job runs ``search.workers.worker_main``: the study's storage is the only thing the jobs
share, so the start lock keeps exactly ``search.n_trials`` and a dead job's trial is re-queued by
``search.liveness`` as for any worker. The command records the jobs in ``<study>/jobs.json``; run
again, it adopts the jobs still alive and submits only the missing ones (none once the study is
full), so the same command resumes, reports or waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.procs import HOST, pid_alive
from adabudget.search import devices
from adabudget.search.trial import Setup

JOBS_FILE = "jobs.json"
# Slurm states of a job that will still run trials (sacct / squeue through submitit)
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


def job_worker(setup: Setup, index: int, gpus: list[str] | None = None) -> None:
    """What one job runs: a worker (``search.workers.worker_main``). ``gpus``: a local job's own
    GPUs (``search.devices``): submitit's LocalExecutor sets ``CUDA_VISIBLE_DEVICES`` from its own
    count, so it is set here, before CUDA starts; a Slurm job keeps the GPUs Slurm gave it."""
    from adabudget.search.workers import worker_main

    os.environ.update(devices.worker_env(gpus))
    worker_main(setup, index)


def slurm_parameters(setup: Setup) -> dict:
    """``SlurmExecutor.update_parameters`` for one worker job: one task, ``search.slurm``'s
    resources, and ``--signal=USR1@<signal_delay_s>`` (submitit's own line says USR2, which
    adabudget does not take as a stop request: its ``additional_parameters`` win)."""
    s = setup.scfg.slurm
    params = {
        "job_name": f"adabudget-{setup.study}",
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": s.cpus_per_task,
        "time": s.timeout_min,
        "signal_delay_s": s.signal_delay_s,
        "setup": list(s.setup),
        "additional_parameters": {"signal": f"USR1@{s.signal_delay_s}", **dict(s.additional)},
    }
    if s.gpus_per_task:
        params["gpus_per_task"] = s.gpus_per_task
    if s.partition:
        params["partition"] = s.partition
    if s.account:
        params["account"] = s.account
    if s.mem_gb:
        params["mem"] = f"{s.mem_gb:g}GB"
    return params


def make_executor(setup: Setup):
    """The submitit executor of ``search.launcher``; its logs go to ``<study>/jobs/<job id>/``."""
    import submitit

    folder = Path(setup.root).resolve() / "jobs" / "%j"
    scfg = setup.scfg
    if scfg.launcher == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=scfg.slurm.timeout_min)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder)
    except RuntimeError as err:  # no srun: not on a Slurm cluster
        raise ConfigError(
            f"search.launcher=slurm: {err} Run the command on a node of the cluster (a login node), or use "
            "search.launcher=local for submitit's local jobs on this machine"
        ) from None
    executor.update_parameters(**slurm_parameters(setup))
    return executor


@contextlib.contextmanager
def _detached_stdio():
    """stdout and stderr on /dev/null while local jobs start: their submitit controller inherits
    the command's descriptors (its own output goes to the job's log files), and one holding the
    command's pipe keeps a caller reading it (``cmd | tee``, ``subprocess.run``) waiting for the
    jobs even with ``search.wait=false``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


class Jobs:
    """The worker jobs of a study: those this command submitted (submitit ``Job``s) and those an
    earlier command recorded in ``<study>/jobs.json`` that are still alive."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.path = Path(setup.root) / JOBS_FILE
        self.mine: list = []  # submitit jobs of this command
        self.adopted: list[dict] = [r for r in self._recorded() if self._alive_record(r)]

    # ------------------------------------------------------------ what exists
    def _recorded(self) -> list[dict]:
        try:
            records = json.loads(self.path.read_text())["jobs"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []
        return [r for r in records if r.get("launcher") == self.setup.scfg.launcher]

    def _alive_record(self, record: dict) -> bool:
        if record["launcher"] == "local":  # a LocalExecutor job id is its process id
            if record.get("host") != HOST:
                return False
            return bool(pid_alive(int(record["id"])))
        import submitit

        state = submitit.SlurmJob(Path(record["folder"]), record["id"]).state
        return state.split()[0] in SLURM_ALIVE or state == "UNKNOWN"

    def alive(self) -> int:
        self.adopted = [r for r in self.adopted if self._alive_record(r)]
        return sum(not job.done() for job in self.mine) + len(self.adopted)

    # ------------------------------------------------------------ submitting
    def submit(self, count: int) -> None:
        """Submit ``count`` worker jobs (local ones each on their own GPUs: ``search.devices``)."""
        scfg = self.setup.scfg
        executor = make_executor(self.setup)
        gpus = [None] * count
        if scfg.launcher == "local":
            gpus = devices.assign(count, scfg.gpus_per_trial, scfg.devices, visible=devices.visible_gpus())
        first = len(self._recorded())  # each worker's index: its sampler's own random stream
        if devices.describe(gpus):
            print(devices.describe(gpus), flush=True)
        with _detached_stdio() if scfg.launcher == "local" else contextlib.nullcontext():
            for offset, own in enumerate(gpus):
                self.mine.append(executor.submit(job_worker, self.setup, first + offset, own))
        self._record()

    def _record(self) -> None:
        records = self._recorded() + [
            {
                "id": str(job.job_id),
                "launcher": self.setup.scfg.launcher,
                "host": HOST,
                "folder": str(job.paths.folder),
                "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr),
                "submitted": time.time(),
            }
            for job in self.mine
            if str(job.job_id) not in {r["id"] for r in self._recorded()}
        ]
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"jobs": records}, indent=1))
        os.replace(tmp, self.path)

    def describe(self) -> str:
        lines = []
        for job in self.mine:
            lines.append(f"  job {job.job_id}: submitted; log {job.paths.stdout} / {job.paths.stderr.name}")
        for r in self.adopted:
            lines.append(f"  job {r['id']}: running (submitted earlier); log {r['stdout']}")
        return "\n".join(lines)

    def failures(self) -> list[str]:
        """This command's jobs that ended with an error: id, state and the last line of stderr."""
        bad = []
        for job in self.mine:
            if not job.done():
                continue
            state = job.state
            code = getattr(getattr(job, "_process", None), "returncode", None)  # a local job's exit code
            if (code == 0) if code is not None else state.split()[0] == "COMPLETED":
                continue
            err = Path(job.paths.stderr)
            tail = err.read_text(errors="replace").strip().splitlines()[-1:] if err.exists() else []
            bad.append(f"job {job.job_id} ({state}): {tail[0] if tail else 'no stderr'} (log {err})")
        return bad
