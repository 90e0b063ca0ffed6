"""The Hugging Face hub at the front door: ``--offline`` and a fast, clear failure when a hub id
cannot be reached.

Without this, a model id that is not in the local cache and a hub that cannot be reached cost a
minute of retries before a traceback: huggingface_hub's ``hf_hub_download`` first asks without
retries, then, finding no cached copy, asks again through ``http_backoff`` (5 retries, 1+2+4+8+8 s
of sleeps plus each attempt's timeout), once per file transformers looks for. Every hub id a
stage loads passes through ``StageContext.resolve_source``, which asks about an id that is not
cached once, with a short timeout and no retries, before any library does; an unreachable hub
is then a usage error (exit 2) naming the id and the ways out. Stages that are skipped (done and
unchanged) never ask.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlsteps.errors import HERE, UserError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# A reachable hub answers a HEAD in well under a second; a silent network gets this long.
PROBE_TIMEOUT_S = 4.0


def set_offline() -> None:
    """``--offline``: the hub libraries read only their caches (set before they are imported)."""
    for name in OFFLINE_VARS:
        os.environ[name] = "1"


def is_offline() -> bool:
    return any(os.environ.get(n, "").upper() in ("1", "ON", "YES", "TRUE") for n in OFFLINE_VARS)


def _cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    snapshots = Path(constants.HF_HUB_CACHE) / folder / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_hub_id(repo_id: str, *, repo_type: str = "model") -> None:
    """Raise UserError (exit 2) within seconds when ``repo_id`` is not in the hub cache and the
    hub cannot be reached. Offline (``--offline``), the libraries themselves fail at once on an
    id that is not cached; a cached id, or a hub that answers, is left to them."""
    if is_offline() or _cached(repo_id, repo_type):
        return
    if not _reachable(repo_id, repo_type):
        raise UserError(
            f"cannot reach the hub for '{repo_id}'",
            field=HERE,
            hint="check the network, or use --offline with a cached model, or a local directory",
        )


def _reachable(repo_id: str, repo_type: str) -> bool:
    """One request, no retries: does the hub answer at all (any HTTP status counts)?"""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    prefix = "datasets/" if repo_type == "dataset" else ""
    url = f"{constants.ENDPOINT}/{prefix}{repo_id}/resolve/main/README.md"
    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except (httpx2.TransportError, OSError):
        return False
    return True
