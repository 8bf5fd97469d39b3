"""Processes by pid: whether the process a record names still runs, and claim files that say who
holds something. A leaf (standard library only): the run lock (``adabudget.log``), the search's
stale-trial judgment (``adabudget.search.liveness``) and ``adabudget reproduce``'s cells use it.

A pid alone is not a process: pids are reused, and containers on one kernel (which may share a
hostname) each count their own. So a record names its process by host, pid, start time (clock
ticks since boot, ``/proc/<pid>/stat`` field 22) and pid space (the kernel's boot id and the pid
namespace's inode), and a pid is judged only inside its own pid space.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import time
from pathlib import Path

HOST = socket.gethostname()
CLAIM = ".claim"  # the claim file's name inside a folder someone holds (a run folder, a reproduce cell)


@functools.lru_cache(maxsize=1)
def _pid_space() -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the hostname stands in (see same_pid_space)
        return None


def pid_space() -> str | None:
    """Where this process's pids mean something: ``<boot id>/pid:[<namespace inode>]`` (Linux)."""
    return _pid_space()


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def started_at(pid: int) -> float | None:
    """When process ``pid`` started, as a Unix time (to about 10 ms: now minus the time since)."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # the clock the start ticks count on
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists here (whoever's it is)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that pid
        return True
    return True


def identity() -> dict:
    """This process as a record names it: host, pid, start time and pid space."""
    pid = os.getpid()
    return {"host": HOST, "pid": pid, "start_ticks": start_ticks(pid), "pid_space": pid_space()}


def same_pid_space(record: dict) -> bool:
    """Whether ``record``'s pid names a process this one can see. A record without a pid space
    (an older one, or written off Linux) is judged by its hostname."""
    if "pid_space" not in record:
        return record.get("host") == HOST
    mine, theirs = pid_space(), record["pid_space"]
    if mine is not None and theirs is not None:
        return mine == theirs
    return mine is None and theirs is None and record.get("host") == HOST


def process_alive(record: dict) -> bool | None:
    """Whether the process ``record`` names (``host``, ``pid``, optional ``start_ticks`` and
    ``pid_space``) still runs: False when its pid is gone or now another process's (one that
    started at another time); None when it cannot be told from here (another pid space)."""
    pid = record.get("pid")
    if pid is None or not same_pid_space(record):
        return None
    if not pid_alive(int(pid)):
        return False
    ticks = record.get("start_ticks")
    return ticks is None or start_ticks(int(pid)) in (None, ticks)


def claim(path: str | Path) -> bool:
    """Take ``path`` (a claim file) for this process: created exclusively, holding ``identity()``.

    A claim whose process is gone (killed before it gave the claim back) is taken over, under an
    exclusive ``flock`` of the file, so of several processes taking it over at once one wins; a
    claim of a live process, of another pid space, or unreadable (being written this instant) is
    not. Give a claim back by deleting the file.
    """
    path = Path(path)
    me = json.dumps(identity()).encode()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return _take_over(path, me)
    try:
        os.write(fd, me)
    finally:
        os.close(fd)
    return True


def _take_over(path: Path, me: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:  # given back this instant
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the next taker reads what this one wrote
        owner = json.loads(os.pread(fd, 4096, 0) or b"null")
        if not isinstance(owner, dict) or process_alive(owner) is not False:
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        return True
    except (OSError, ValueError):  # no flock on this file system, or a claim being written
        return False
    finally:
        os.close(fd)  # and with it the lock
