"""Sources and destinations behind one interface, chosen by URI.

    /data/model, ./model, file:///data/model   a local or mounted directory (or file)
    org/name, hf://org/name                    a Hugging Face Hub repository
    hf://datasets/org/name                     a Hub dataset repository (a dataset source may omit `datasets/`)
"""

from __future__ import annotations

import re
from pathlib import Path

from job.errors import ConfigError
from job.storage.base import Storage
from job.storage.hub import HubStorage
from job.storage.local import LocalStorage

__all__ = ["Storage", "LocalStorage", "HubStorage", "open_source", "open_destination", "is_local"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REMOTE_SCHEMES = ("s3://", "gs://", "az://", "http://", "https://")


def is_local(uri: str) -> bool:
    if uri.startswith("file://"):
        return True
    if uri.startswith(("hf://", *REMOTE_SCHEMES)):
        return False
    # A Hub id (`org/name`) that also exists as a relative path is read from disk: the mounted volume wins.
    return not HUB_ID.match(uri) or Path(uri).expanduser().exists()


def open_source(uri: str, setting: str, repo_type: str, revision: str | None = None) -> Storage:
    """The storage a model (`repo_type="model"`) or dataset (`"dataset"`) is read from."""
    if is_local(uri):
        return LocalStorage(uri)
    if uri.startswith("hf://"):
        repo_id = uri.removeprefix("hf://").strip("/")
        for kind in ("datasets", "models"):
            if repo_id.startswith(kind + "/"):
                repo_id, repo_type = repo_id[len(kind) + 1:], kind[:-1]
        return HubStorage(uri, repo_id, repo_type, revision)
    if HUB_ID.match(uri):
        return HubStorage(uri, uri, repo_type, revision)
    raise ConfigError([f"{setting}={uri}: {uri.split('://')[0]}:// sources are not supported yet; use a local path "
                       "or a Hugging Face Hub id (org/name or hf://org/name)"])


def open_destination(uri: str, setting: str = "FT_OUTPUT_URI") -> Storage:
    if is_local(uri) or not uri.startswith(("hf://", *REMOTE_SCHEMES)):
        return LocalStorage(uri)
    raise ConfigError([f"{setting}={uri}: only local directories are supported as a destination in this version"])
