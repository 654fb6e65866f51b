"""Hugging Face hub access without retries: is the hub reachable, is a repo in the local cache.

Loading a hub id that is not cached while offline (``HF_HUB_OFFLINE=1``, or no route to the hub) makes
diffusers / huggingface_hub retry for 20-40 s before failing. :func:`hub_local_only` decides once, in well
under a second, and raises :class:`ModelLoadError` at once when the model can come from neither place.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from diffusion_po.errors import ModelLoadError

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the environment forbids hub access (read at call time, not at import)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=4)
def _endpoint_answers(endpoint: str, timeout: float) -> bool:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # any connection / DNS / TLS error means: not reachable now
        return False
    return True


def hub_reachable(timeout: float = 3.0) -> bool:
    """One HEAD request to the hub endpoint (``HF_ENDPOINT``; proxies respected), remembered per process."""
    from huggingface_hub import constants

    return _endpoint_answers(os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/"), timeout)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local cache folder of ``repo_id`` at ``revision``, or None when nothing of it is cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None


def hub_local_only(path: str, revision: str | None = None, what: str = "model") -> bool:
    """Whether ``path`` must be loaded with ``local_files_only=True``.

    False for an existing local path or when the hub is reachable; True when offline and the repo is in
    the cache; :class:`ModelLoadError` at once when offline and the repo is not cached.
    """
    if Path(path).expanduser().exists():
        return False
    if hub_offline():
        reason = "this machine is offline (HF_HUB_OFFLINE is set)"
    elif not hub_reachable():
        reason = "the hub is unreachable"
    else:
        return False
    if cached_snapshot(path, revision) is None:
        raise ModelLoadError(
            f"{what} '{path}' is not in the local Hugging Face cache and {reason}: download it once on a "
            "machine with network access (`hf download ID`), or pass a local diffusers folder."
        )
    return True
