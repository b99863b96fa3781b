"""Downloads from the Hugging Face Hub that fail fast and in one line when there is no network.

``huggingface_hub`` retries a failed metadata request five times with back-off (about 25 s) and logs every
attempt; for a command-line tool without a network that is a screenful of warnings before the real error. Here a
cached file is used without touching the network, the Hub's host is probed once (a few seconds at most) before
any request, the library's retry warnings are silenced, and every failure becomes one :class:`InputError` that
says what to do instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .errors import InputError, first_line

#: Seconds the reachability probe of the Hub's host may take.
PROBE_TIMEOUT = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def cache_dir_hint(cache_dir: str | Path | None = None) -> str:
    """The folder downloads are cached in (``HF_HUB_CACHE`` / ``HF_HOME``, default ``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hub's host opens within ``timeout`` seconds (True behind a proxy: the
    proxy decides)."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    # in a thread: the name lookup inside create_connection ignores the timeout
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@contextlib.contextmanager
def _quiet_hub(progress: bool) -> Iterator[None]:
    """Silence ``huggingface_hub``'s retry warnings; hide its progress bars unless ``progress``."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    bars_were_off = are_progress_bars_disabled()
    hub_logger.setLevel(logging.ERROR)
    if not progress:
        disable_progress_bars()
    try:
        yield
    finally:
        hub_logger.setLevel(level)
        if not progress and not bars_were_off:
            enable_progress_bars()


def _what_to_do(what: str, cache_dir: str | Path | None) -> str:
    return (f"cannot download {what} (no connection to the Hugging Face Hub); pass a local model folder or "
            f"checkpoint instead, or put the files in the cache folder {cache_dir_hint(cache_dir)} and set "
            "HF_HUB_OFFLINE=1")


def hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """The local path of ``filename`` in Hub repo ``repo_id``, downloaded (with a progress bar) unless cached."""
    from huggingface_hub import hf_hub_download

    what = f"{repo_id}/{filename}"
    with _quiet_hub(progress):
        try:  # a cached file needs no network
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=True))
        except Exception:  # not cached (or an incomplete cache): fetch below
            pass
        _check_online(what, cache_dir, local_files_only)
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
        except Exception as err:  # network, auth and missing-file errors all end here
            raise InputError(what, f"download failed: {first_line(err)}") from err


def hub_snapshot(
    repo_id: str,
    filenames: list[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """The local folder of ``filenames`` from Hub repo ``repo_id``, downloaded unless cached."""
    from huggingface_hub import snapshot_download

    with _quiet_hub(progress):
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=filenames, local_files_only=True))
        except Exception:
            pass
        _check_online(repo_id, cache_dir, local_files_only)
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=filenames))
        except Exception as err:
            raise InputError(repo_id, f"cannot fetch from the Hugging Face Hub: {first_line(err)}") from err


def _check_online(what: str, cache_dir: str | Path | None, local_files_only: bool) -> None:
    if local_files_only or _offline():
        raise InputError(what, f"not in the cache folder {cache_dir_hint(cache_dir)} and downloads are off "
                               "(HF_HUB_OFFLINE=1 or local_files_only); pass a local model folder or checkpoint")
    if not hub_reachable():
        raise InputError(what, _what_to_do("it", cache_dir))


