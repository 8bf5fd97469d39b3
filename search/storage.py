"""Storages for many machines: the gRPC proxy in front of a database, the start lock served beside
it, the MySQL rule and the check that every worker sees the study folder.

    adabudget search serve-storage postgresql://adabudget@db:5432/studies --port 13000   # one machine
    adabudget search ... search.storage=grpc://proxy-host:13000 search.workers=8         # every other

``serve`` runs Optuna's gRPC proxy (``optuna.storages._grpc.server.make_server``, what
``run_grpc_proxy_server`` runs) in front of the database, and adds one more service to the same
server and port: the study's start lock (``LockService``). Workers hold no database connection
and no credentials, so neither Optuna's RDB heartbeat nor a PostgreSQL advisory lock can reach
them: stale trials are ``search.liveness``'s (it works through any storage), and the start lock is
``ServedLock``, a lease the proxy grants to one worker at a time. The design and what each
storage guarantees: docs/scale-out.md#many-machines-on-postgresql-and-the-grpc-proxy.

Invariants:

- The lock is a lease: held while its holder renews it (a thread, every ``ttl / 4`` seconds), and
  free again ``ttl`` seconds after a holder died or lost the network, so a killed worker never
  blocks the study. A holder that could not renew in time is told (``lost``) and logs it.
- Lock calls are answered at once (granted or not): no server thread ever waits for a lock, so
  hundreds of waiting workers cannot starve the storage calls of the one that holds it.
- ``serve`` never prints the database password (``search.credentials``).
- A study records its folder (``ROOT_KEY``: the path, the host that wrote it, a random token also
  written into ``<study folder>/.adabudget-study``); a worker whose study folder holds no such
  token, or another one, does not see the same folder and is refused before any trial.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.procs import HOST

log = logging.getLogger("adabudget.search")
GRPC = "grpc://"
LOCK_SERVICE = "adabudget.StartLock"
LOCK_TTL = 30.0  # s a lease lasts without renewal: the longest a dead holder keeps others waiting
ROOT_KEY = "adabudget:root"  # the study's folder, as recorded in the storage
MARKER = ".adabudget-study"  # its token, in the study folder
SERVE_USAGE = (
    "usage: adabudget search serve-storage DATABASE_URL [--host HOST] [--port PORT] [--threads N]\n"
    "  runs Optuna's gRPC proxy (and the search's start lock) in front of a PostgreSQL or MySQL\n"
    "  database; workers then use search.storage=grpc://HOST:PORT and need no database credentials"
)


# ---------------------------------------------------------------- URLs
def database_url(url: str) -> str:
    """``postgresql://`` names no driver, and SQLAlchemy 2.1 then imports psycopg (3); with only
    psycopg2 installed (psycopg2-binary, as the docs say) that failed with an ImportError in
    every process: name psycopg2 then."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
        from adabudget.extras import require

        require("psycopg2", "postgres", "a postgresql:// storage")  # neither driver: MissingExtra
    return url


def parse_grpc(url: str, where: str = "search.storage") -> tuple[str, int]:
    """``grpc://host:port`` -> (host, port).

    Raises:
        ConfigError: naming ``where`` when the port is missing or not a number.
    """
    rest = url[len(GRPC) :].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{where}={url}: give grpc://HOST:PORT, the address `adabudget search serve-storage` listens on "
            "(e.g. grpc://proxy-host:13000)"
        )
    return host.strip("[]"), int(port)


def grpc_storage(url: str, timeout: float = 10.0):
    """Optuna's ``GrpcStorageProxy`` for ``grpc://host:port``, once the server answers.

    Raises:
        ConfigError: naming ``search.storage`` and how to start a server when none answers.
    """
    try:
        import grpc  # noqa: F401  (the extra that brings it: the message says which)
    except ImportError:
        raise ConfigError(
            f"search.storage={url}: the gRPC proxy needs grpcio; pip install 'adabudget[scale]'"
        ) from None
    from optuna.storages import GrpcStorageProxy

    host, port = parse_grpc(url)
    with warnings.catch_warnings():  # ExperimentalWarning (Optuna 4.2+), in every worker
        warnings.simplefilter("ignore")
        storage = GrpcStorageProxy(host=host, port=port)
    try:
        storage.wait_server_ready(timeout=timeout)
    except Exception as err:  # grpc.FutureTimeoutError: nothing listens there
        storage.close()
        raise ConfigError(
            f"search.storage={url}: no storage server answered within {timeout:g} s "
            f"({type(err).__name__}); start one on {host} with `adabudget search serve-storage "
            f"postgresql://user@dbhost:5432/db --host 0.0.0.0 --port {port}`"
        ) from None
    return storage


# ---------------------------------------------------------------- the lock served beside the proxy
class LockService:
    """Leases by name: ``acquire`` grants a free (or expired) lease, or one its holder asks for
    again; ``renew`` extends a lease its holder still has; ``release`` ends it. Every call answers
    at once; the clock is the server's, so workers' clocks need not agree."""

    def __init__(self, ttl: float = LOCK_TTL):
        self.ttl = ttl
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (holder, expires at)
        self._mutex = threading.Lock()

    def call(self, method: str, request: dict) -> dict:
        name, holder = str(request["name"]), str(request["holder"])
        now = time.monotonic()
        with self._mutex:
            current = self._leases.get(name)
            mine = current is not None and current[0] == holder
            free = current is None or current[1] <= now
            if method == "acquire":
                if mine or free:
                    self._leases[name] = (holder, now + self.ttl)
                    return {"granted": True, "ttl": self.ttl}
                return {"granted": False}
            if method == "renew":
                if mine and not free:
                    self._leases[name] = (holder, now + self.ttl)
                    return {"granted": True, "ttl": self.ttl}
                return {"granted": False}
            if method == "release":
                if mine:
                    del self._leases[name]
                return {"granted": mine}
        raise ValueError(f"unknown lock method {method}")

    def handler(self):
        import grpc

        def unary(method):
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: self.call(method, request),
                request_deserializer=json.loads,
                response_serializer=lambda reply: json.dumps(reply).encode(),
            )

        methods = {m: unary(m) for m in ("acquire", "renew", "release")}
        return grpc.method_handlers_generic_handler(LOCK_SERVICE, methods)


class ServedLock:
    """The start lock of a study behind ``grpc://``: ``acquire`` blocks (polling the server, from
    5 ms to at most 0.2 s apart), ``release`` may be called more than once, ``close`` ends the channel."""

    def __init__(self, url: str, name: str):
        import grpc

        host, port = parse_grpc(url)
        self.name, self.holder = name, f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._channel = grpc.insecure_channel(f"{host}:{port}")
        self._calls = {
            m: self._channel.unary_unary(
                f"/{LOCK_SERVICE}/{m}",
                request_serializer=lambda r: json.dumps(r).encode(),
                response_deserializer=json.loads,
            )
            for m in ("acquire", "renew", "release")
        }
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _call(self, method: str) -> dict:
        return self._calls[method]({"name": self.name, "holder": self.holder}, timeout=30)

    def acquire(self) -> None:
        wait = 0.005  # the lock is held for one ask: milliseconds; polled at most 0.2 s apart
        while True:
            reply = self._call("acquire")
            if reply["granted"]:
                break
            time.sleep(wait)
            wait = min(0.2, wait * 1.5)
        self.held, self.lost = True, False
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew, args=(reply["ttl"] / 4,), name="adabudget-start-lock", daemon=True
        )
        self._renewer.start()

    def _renew(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                granted = self._call("renew")["granted"]
            except Exception as err:  # the proxy restarting, the network: the lease may still hold
                log.warning("start lock: renewing the lease failed (%s); retrying", type(err).__name__)
                continue
            if not granted:
                self.lost = True
                log.warning(
                    "start lock: the lease on %s expired while held (no renewal for %g s); another worker "
                    "may start a trial meanwhile",
                    self.name,
                    LOCK_TTL,
                )
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        self.held = False
        try:
            self._call("release")
        except Exception as err:  # unreleased, it expires after LOCK_TTL
            log.warning("start lock: release failed (%s); the lease expires by itself", type(err).__name__)

    def close(self) -> None:
        self.release()
        self._channel.close()


# ---------------------------------------------------------------- adabudget search serve-storage
def serve(
    url: str, host: str = "localhost", port: int = 13000, threads: int = 32, lock_ttl: float = LOCK_TTL
) -> None:
    """Serve the database at ``url`` through Optuna's gRPC proxy, with the start lock beside it,
    until SIGTERM or Ctrl-C. ``lock_ttl``: seconds a dead holder's start lock lasts."""
    from adabudget.search.credentials import without_password
    from optuna.storages import RDBStorage, get_storage
    from optuna.storages._grpc.server import make_server

    shown = without_password(url)
    if not url.startswith(("postgresql", "mysql")):
        raise ConfigError(
            f"serve-storage {shown}: give a postgresql:// (or mysql://) database URL; a journal file "
            "or SQLite needs no proxy (one machine), and Optuna's proxy cannot serve a journal"
        )
    # the cached storage Optuna recommends in front of the proxy; a pooled connection the server
    # dropped is replaced, not used
    storage = get_storage(RDBStorage(database_url(url), engine_kwargs={"pool_pre_ping": True}))
    server = make_server(storage, host, port, ThreadPoolExecutor(max_workers=threads))
    server.add_generic_rpc_handlers((LockService(lock_ttl).handler(),))
    server.start()
    print(
        f"serving {shown} at grpc://{host}:{port} (the storage and the search's start lock); "
        f"workers: search.storage=grpc://<this host>:{port}",
        flush=True,
    )
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop(grace=5).wait()
        print("storage server stopped", flush=True)


def serve_main(args: list[str]) -> None:
    """``adabudget search serve-storage DATABASE_URL [--host H] [--port P] [--threads N]``."""
    import argparse
    import sys

    from adabudget.search.credentials import scrub

    parser = argparse.ArgumentParser(  # argparse prefixes "usage: " itself
        prog="adabudget search serve-storage", usage=SERVE_USAGE.removeprefix("usage: ")
    )
    parser.add_argument("url")
    parser.add_argument("--host", default="localhost", help="address to listen on (0.0.0.0: every one)")
    parser.add_argument("--port", type=int, default=13000)
    parser.add_argument("--threads", type=int, default=32, help="server threads answering storage calls")
    parser.add_argument(
        "--lock-ttl",
        type=float,
        default=LOCK_TTL,
        help="s a dead worker's start lock lasts (renewed while alive)",
    )
    a = parser.parse_args(args)
    try:
        serve(a.url, a.host, a.port, a.threads, a.lock_ttl)
    except (ConfigError, RuntimeError, OSError) as err:  # scrubbed: a message may quote the URL
        print(f"error: {scrub(err)}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- MySQL
def check_mysql_host(storage_url: str, recorded: dict | None) -> None:
    """A MySQL study runs on one machine: its start lock is the file lock in the study folder (not
    ``GET_LOCK``, which no test here can run against a server), which does not hold across
    machines, so a second host would break "exactly n_trials" silently.

    Raises:
        ConfigError: naming ``search.storage`` when ``recorded`` (the study's ``ROOT_KEY``) was
            written by another host.
    """
    from adabudget.search.credentials import without_password

    if not storage_url.startswith("mysql") or not recorded or recorded.get("host") in (None, HOST):
        return
    raise ConfigError(
        f"search.storage={without_password(storage_url)}: this study runs on {recorded['host']}, and "
        f"this is {HOST}: on MySQL the start lock is a file lock on one machine, so workers on two "
        "machines could start more than search.n_trials trials; run every worker of it on "
        f"{recorded['host']} (search.workers=N there), or serve the database to every machine with "
        "`adabudget search serve-storage mysql://...` and search.storage=grpc://HOST:PORT (the lock "
        "served beside it), or use postgresql:// (an advisory lock)"
    )


# ---------------------------------------------------------------- the study folder
def check_study_folder(study, root: str | Path, storage_url: str) -> dict:
    """Record where the study's trial folders live, or check that this process sees them.

    The first process records ``ROOT_KEY`` (the folder, its host, a token) in the study and the
    token in ``<root>/.adabudget-study``; every later one (another worker, another machine, a
    resume) reads the folder's token back and compares. Returns the recorded entry.

    Raises:
        ConfigError: naming ``search.root`` when this process's study folder is not the recorded
            one (no token, or another study's), and ``search.storage`` for a second MySQL host.
    """
    root = Path(root)
    marker = root / MARKER
    recorded = study.user_attrs.get(ROOT_KEY)
    if recorded is None:
        root.mkdir(parents=True, exist_ok=True)
        token = _marker_token(marker) or _write_marker(marker, study.study_name)
        study.set_user_attr(ROOT_KEY, {"path": str(root), "host": HOST, "token": token})
        recorded = study.user_attrs[ROOT_KEY]  # read back: with two first processes, the last one's
    check_mysql_host(storage_url, recorded)
    seen = _marker_token(marker)
    if seen != recorded["token"]:
        what = "holds another study's token" if seen else "is missing"
        raise ConfigError(
            f"search.root: this machine ({HOST}) does not see the folder of study {study.study_name}: "
            f"{marker} {what}, and {recorded['host']} keeps its trials in {recorded['path']}; every "
            "worker writes its trial folders there, so put search.root on a filesystem every machine "
            "mounts at the same path (NFS, Lustre, ...) and give it on every machine"
        )
    return recorded


def _marker_token(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text())["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_marker(marker: Path, study: str) -> str:
    """Create the marker once, whole (written aside, then linked into place: a process that finds
    it there reads the token it holds, never a half-written file)."""
    token = uuid.uuid4().hex
    aside = marker.with_name(f"{MARKER}.{token}")
    aside.write_text(json.dumps({"study": study, "token": token, "host": HOST}) + "\n")
    try:
        os.link(aside, marker)
    except FileExistsError:  # another process made it first: its token is the study's
        return _marker_token(marker) or token
    finally:
        aside.unlink()
    return token
