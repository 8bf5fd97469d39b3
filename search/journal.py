"""Repair of an Optuna journal file cut mid-line (a full disk, a kill during a write).

Optuna 5.1 never recovers from one by itself: the next process's ``ask`` fails with
``AttributeError`` (its new trial sits behind the torn bytes) and, from then on, every open with
``JSONDecodeError`` (its line and the torn bytes have become one). ``repair_journal`` runs before
the journal is opened: it keeps a copy as ``<journal>.bak``, drops a torn or unreadable last line,
and drops the torn bytes glued in front of a later record, all under the journal's own lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.log import fsync_dir, write_text_atomic

log = logging.getLogger("adabudget.search")
RECORD = b'{"op_code":'  # how every record of JournalFileBackend begins (compact separators)


def repair_journal(path: str | Path) -> str | None:
    """Make the journal at ``path`` readable again, if it needs it; returns what was done, or None.

    Under the lock Optuna's ``JournalFileBackend`` takes for every append (its ``<journal>.lock``),
    so that no worker writes meanwhile: the file is copied to ``<journal>.bak``, then cut after its
    last whole line (a torn end: the file keeps its inode, so other processes keep reading it), or
    rewritten without the torn bytes of a record that the next record was appended to. A line
    that is unreadable for another reason is refused, naming it: that is not a torn write.
    """
    from optuna.storages.journal import JournalFileSymlinkLock
    from optuna.storages.journal._file import get_lock_file

    path = Path(path)
    if not path.is_file() or _repaired(path.read_bytes(), path) is None:  # the usual case: no lock taken
        return None
    with get_lock_file(JournalFileSymlinkLock(str(path))):
        data = path.read_bytes()  # again: a worker may have finished its append meanwhile
        fixed = _repaired(data, path)
        if fixed is None:
            return None
        content, what = fixed
        backup = path.with_name(path.name + ".bak")
        shutil.copyfile(path, backup)
        if data.startswith(content):
            os.truncate(path, len(content))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        else:
            write_text_atomic(path, content, fsync=True)
        fsync_dir(path.parent)
    message = f"{path}: {what}; the journal as it was is kept in {backup}"
    log.warning("repaired the study journal %s", message)
    return message


def _repaired(data: bytes, path: Path) -> tuple[bytes, str] | None:
    """The journal's bytes made readable and what was changed, or None when nothing needs to."""
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: empty unless a write was cut
    kept, changes = [], []
    if tail:
        changes.append(f"dropped a torn last line ({len(tail)} bytes, no newline)")
    for n, line in enumerate(lines, 1):
        if _readable(line):
            kept.append(line)
            continue
        start = line.rfind(RECORD)
        if start > 0 and _readable(line[start:]):  # a torn record, then the next one appended to it
            kept.append(line[start:])
            changes.append(f"dropped the torn record ({start} bytes) in front of line {n}")
        elif n == len(lines):
            changes.append(f"dropped an unreadable last line ({n})")
        else:
            raise ConfigError(
                f"study journal {path}: line {n} is not a record ({line[:60]!r}...) "
                "and is not a torn write (lines follow it); restore the journal from a copy, or remove that "
                "line by hand and check the study"
            )
    if not changes:
        return None
    return b"".join(line + b"\n" for line in kept), "; ".join(changes)


def _readable(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
