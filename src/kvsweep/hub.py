"""Is the Hugging Face hub there? One quick probe before the first hub request.

The Hugging Face libraries retry an unreachable hub for half a minute (their timeouts are read at import and
``http_backoff`` retries five times). Before its first hub request (unless ``HF_HUB_OFFLINE`` is set)
kvsweep sends one request to the hub's endpoint (``HF_ENDPOINT``); when nothing answers, models and
datasets come from the local hub cache alone, or fail at once with a clear message.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import urllib.error
import urllib.request

from huggingface_hub import constants as hub_constants

HUB_PROBE_SECONDS = 3.0  # how long the hub's endpoint has to answer before it counts as unreachable
_HUB_REACHABLE: dict[str, bool] = {}  # endpoint -> the probe's answer, once per process


def hub_endpoint() -> str:
    """The hub's address the Hugging Face libraries use: ``HF_ENDPOINT``, default https://huggingface.co."""
    return hub_constants.ENDPOINT.rstrip("/")


def hub_offline() -> bool:
    """Whether the user turned hub requests off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub's endpoint answers: one HEAD request, no retries, at most ``timeout`` seconds (s) for
    the name lookup, connection and reply together. Any HTTP reply counts, an error status too; the
    answer is kept for the rest of the process."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    if endpoint not in _HUB_REACHABLE:
        answer: list[bool] = []
        probe = threading.Thread(target=_probe, args=(endpoint + "/", timeout, answer), daemon=True)
        probe.start()
        probe.join(timeout)  # a name lookup can outlast urlopen's timeout: the thread is left behind then
        _HUB_REACHABLE[endpoint] = bool(answer) and answer[0]
    return _HUB_REACHABLE[endpoint]


def _probe(url: str, timeout: float, answer: list[bool]) -> None:
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "kvsweep"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            answer.append(True)
    except urllib.error.HTTPError:
        answer.append(True)  # an unwelcome answer is an answer
    except urllib.error.URLError as e:  # TLS set up differently from the hub libraries': leave it to them
        answer.append(isinstance(e.reason, ssl.SSLError))
    except (OSError, ValueError, http.client.HTTPException):
        answer.append(False)
