"""Sources and destinations behind one interface, chosen by URI.

    /data/model, ./model, file:///data/model   a local or mounted directory (or file); C:\\data works too
    s3://bucket/prefix, s3://bucket/key        an S3 (or S3-compatible) prefix, or one object
    org/name, hf://org/name                    a Hugging Face Hub repository
    hf://datasets/org/name                     a Hub dataset repository (a dataset source may omit `datasets/`)

How remote stores are reached (retries, timeouts, the Hub repository's visibility) is a StorageOptions, set once
per process from the settings with `configure`, or passed to `open_source` / `open_destination`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from job.errors import ConfigError, InputError
from job.storage.base import Storage, StorageError, StorageOptions
from job.storage import hub
from job.storage.hub import HubDestination, HubStorage
from job.storage.local import LocalStorage
from job.storage.s3 import S3Storage
from job.storage.uri import scheme, uri_problem

__all__ = ["Storage", "StorageError", "StorageOptions", "LocalStorage", "HubStorage", "HubDestination", "S3Storage",
           "configure", "open_source", "open_destination", "is_local", "uri_problem"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What ends a file's name, never a Hub repository's: such a value names a local file
FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".safetensors", ".gguf", ".bin"}
_options = StorageOptions()

# The stores' HTTP clients log every request, credential and endpoint lookup at INFO: keep their warnings only.
for _name in ("botocore", "boto3", "s3transfer", "httpx2", "httpx"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def configure(options: StorageOptions) -> None:
    """The options every store opened later in this process gets, unless given its own; and the timeout of every
    request huggingface_hub sends (FT_STORAGE_TIMEOUT_SECONDS)."""
    global _options
    _options = options
    hub.set_timeout(options.storage_timeout_seconds)


def is_local(uri: str) -> bool:
    """Whether `uri` names a local path (or a `file:` URI) rather than a remote store or a Hub id."""
    if (found := scheme(uri)) is not None:
        return found == "file"
    # A Hub id (`org/name`) that also exists as a relative path is read from disk: the mounted volume wins.
    return not HUB_ID.match(uri) or Path(uri).expanduser().exists()


def open_source(uri: str, setting: str, repo_type: str, revision: str | None = None,
                options: StorageOptions | None = None) -> Storage:
    """The storage a model (`repo_type="model"`) or dataset (`"dataset"`) is read from; ConfigError naming `setting`
    for a URI it cannot be."""
    if problem := uri_problem(uri, "source"):
        raise ConfigError([f"{setting}={uri}: {problem}"])
    if is_local(uri):
        return LocalStorage(uri)
    if uri.startswith("s3://"):
        return _s3(uri, setting, options)
    if uri.startswith("hf://"):
        repo_id = uri.removeprefix("hf://").strip("/")
        for kind in ("datasets", "models"):
            if repo_id.startswith(kind + "/"):
                repo_id, repo_type = repo_id[len(kind) + 1:], kind[:-1]
        return HubStorage(uri, repo_id, repo_type, revision)
    if HUB_ID.match(uri):
        if Path(uri).suffix.lower() in FILE_SUFFIXES:  # "data/train.jsonl": a path that does not exist, not a Hub id
            raise InputError(f"{setting}={uri}: no such file or directory (relative to {Path.cwd()})")
        return HubStorage(uri, uri, repo_type, revision)
    raise AssertionError(f"uri_problem accepted {uri!r} but no store reads it")


def open_destination(uri: str, setting: str = "FT_OUTPUT_URI", options: StorageOptions | None = None) -> Storage:
    """The storage results (or, with `setting="FT_CHECKPOINT_URI"`, checkpoints) are written to; ConfigError naming
    `setting` for a URI it cannot be."""
    options = options or _options
    if problem := uri_problem(uri, "checkpoints" if setting == "FT_CHECKPOINT_URI" else "destination"):
        raise ConfigError([f"{setting}={uri}: {problem}"])
    if uri.startswith("s3://"):
        return _s3(uri, setting, options)
    if uri.startswith("hf://"):
        return HubDestination(uri, uri.removeprefix("hf://").strip("/").removeprefix("models/"), options)
    return LocalStorage(uri, setting)


def _s3(uri: str, setting: str, options: StorageOptions | None) -> S3Storage:
    try:
        return S3Storage(uri, options or _options)
    except ValueError as e:
        raise ConfigError([f"{setting}={uri}: {e}"]) from None
