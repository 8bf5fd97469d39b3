"""Database URLs without their passwords: what a search stores and shows of its storage.

The docs let a user write ``search.storage=postgresql://user:pass@host:5432/db``. The search
itself opens that URL as given (in memory, in every worker), but every file, record, printed
line and error message gets it without the password (``postgresql+psycopg2://user@host:5432/db``),
so nothing written holds the secret. A reader reopening such a URL (``adabudget dashboard``,
``analysis.records``, a second machine) gets the password from libpq itself, which reads
``PGPASSWORD`` or ``~/.pgpass`` (``PGPASSFILE``) when the URL has none.

A leaf module (not ``secrets``: run as ``python search/bench.py``, that name would shadow the
standard library's): ``search.study``, ``search.sweeper``, ``search.wandb`` and ``adabudget.cli``
import it; ``analysis`` keeps its own copy of ``scrub`` (it imports nothing from ``search``).
"""

from __future__ import annotations

import re

# scheme://user:password@  ->  scheme://user@  (SQLAlchemy's own grammar: the password ends at the first @)
_LOGIN = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")
_QUERY = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)  # libpq also takes ?password=...

PASSWORD_HELP = (
    "give the password in PGPASSWORD or a ~/.pgpass line (host:port:database:user:password, mode 0600); "
    "adabudget writes the URL without it"
)


def scrub(text: str) -> str:
    """``text`` with the password of every URL in it removed (``postgresql://u:p@h/db`` -> ``postgresql://u@h/db``)."""
    return _QUERY.sub(r"\1***", _LOGIN.sub(r"\1@", str(text)))


def without_password(url: str) -> str:
    """The storage URL to store and show: a database URL without its password (nor a ``password``
    query parameter); a journal path as it is."""
    url = str(url)
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # not SQLAlchemy's URL grammar: drop what looks like a password anyway
        return scrub(url)
    # URL.set(password=None) keeps the password (None means "unchanged" there): replace the field
    parsed = parsed._replace(password=None).difference_update_query(["password"])
    return parsed.render_as_string(hide_password=False)


def refused_login(err: BaseException) -> bool:
    """Whether ``err`` (SQLAlchemy / psycopg) is the database refusing the login: no password, or
    a wrong one."""
    text = str(err).lower()
    return any(
        s in text
        for s in ("password authentication failed", "no password supplied", "authentication failed for user")
    )
