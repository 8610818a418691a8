"""Fail fast when ``backbone.weights=hub`` cannot reach the hub, and use the local cache when it has the file.

huggingface_hub retries a failed request five times with back-off (about 50 s) before it gives up or falls
back to its cache, so a user without internet waited most of a minute for an error. Before timm downloads
anything, :func:`hub_access` makes one request with a short timeout to the host the weights live on (the
Hugging Face endpoint, ``HF_ENDPOINT`` honoured, or the host of timm's ``url``), through the same proxy
settings httpx uses. Unreachable -> the load runs in huggingface_hub's offline mode, i.e. exactly what
``HF_HUB_OFFLINE=1`` does: the cached file is used if there is one, otherwise the error comes at once.
Written by hand because no library offers "probe once, then go offline"; the loading itself stays timm's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HubAccess:
    """How a hub load will go: ``online``, or ``offline`` with the reason (``HF_HUB_OFFLINE`` or a failed probe)."""

    online: bool
    host: str
    reason: str = ""


def _endpoint() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub: only url weights, probed by their own host
        return "https://huggingface.co"
    return constants.ENDPOINT


def _offline_env() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """One HEAD request to ``url``; returns '' when any HTTP answer came back, else the network error."""
    import httpx  # a dependency of huggingface_hub; honours HTTPS_PROXY / NO_PROXY like the hub client

    try:
        httpx.head(url, timeout=timeout, follow_redirects=False)
    except httpx.TransportError as e:
        return f"{type(e).__name__}: {str(e) or 'no answer'}"
    return ""


def hub_access(pretrained_cfg: dict) -> HubAccess:
    """Decide, within :data:`PROBE_TIMEOUT_S`, whether the weights of ``pretrained_cfg`` can be downloaded."""
    if pretrained_cfg.get("hf_hub_id") or not pretrained_cfg.get("url"):
        target = _endpoint()
    else:
        parsed = urlparse(pretrained_cfg["url"])
        target = f"{parsed.scheme}://{parsed.netloc}"
    if _offline_env():
        return HubAccess(False, target, "HF_HUB_OFFLINE is set")
    error = probe(target)
    return HubAccess(not error, target, f"{target} is unreachable ({error})" if error else "")


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """huggingface_hub's offline mode for the duration of the block (what ``HF_HUB_OFFLINE=1`` sets at import)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
