"""Idempotent completion: a run id whose complete run is already at the destination is not trained again.

A run is complete when its manifest exists and every file it lists is there with its checksum. The manifest records
the fingerprint of the training settings (identity.settings_fingerprint) and the dataset's revision, and its config
the settings themselves (secrets redacted): an attempt with the same fingerprinted settings and data (a Job retried
after its pod was preempted in its last seconds) ends with 0 at once, after removing the checkpoints an earlier
attempt could not; one with other settings (the error names them) or data is a configuration error unless
FT_OVERWRITE=true, which trains again and replaces the run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.errors import ConfigError, storage_failure
from job.identity import Fingerprint
from job.publish import MANIFEST
from job.storage import Storage, StorageError


@dataclass
class Completed:
    """What the destination holds for a run id: `manifest` (None: no run), and whether its files match it."""

    manifest: dict | None = None
    intact: bool = False

    @property
    def settings(self) -> str | None:
        return (self.manifest or {}).get("fingerprint", {}).get("settings")

    @property
    def data(self) -> str | None:
        return (self.manifest or {}).get("fingerprint", {}).get("data")


def read_manifest(dest: Storage, run_id: str) -> dict | None:
    """The manifest of the completed run `run_id` at `dest`, or None. The Hub keeps the run at the repository's root,
    whose manifest names its run id."""
    if not dest.exists(f"{run_id}/{MANIFEST}"):
        return None
    if hasattr(dest, "_root_manifest"):  # storage.hub.HubDestination: exists() read it already
        return dest._root_manifest()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(dest.get(f"{run_id}/{MANIFEST}", Path(tmp) / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def find(dest: Storage, run_id: str, fingerprint: Fingerprint, overwrite: bool, export: str = "adapter") -> Completed:
    """Look for a completed run before any work is done. Raises ConfigError when one exists with other training
    settings (or from a version that did not record them), or without the merged model `export` (FT_EXPORT) asks
    for, and FT_OVERWRITE is off; storage_failure's error when the destination cannot be read. With FT_OVERWRITE=true
    an existing run is ignored here (publish replaces it)."""
    try:
        found = Completed(None if overwrite else read_manifest(dest, run_id))
        if found.manifest is None:
            return found
        config = found.manifest.get("config")  # every setting, redacted; the fingerprinted ones are compared
        differ = (" (not named: it was published by a version that recorded no fingerprint)"
                  if found.settings is None else fingerprint.mismatch(found.settings, config))
        if differ:
            raise ConfigError([f"FT_RUN_ID={run_id}: a completed run with other training settings{differ} already "
                               f"exists at {dest.describe(run_id)}; choose another run id or set FT_OVERWRITE=true"])
        found.intact = _intact(dest, run_id, found.manifest)
        if found.intact and export == "merged" and not found.manifest.get("export"):  # not in the fingerprint
            raise ConfigError([f"FT_EXPORT=merged: the completed run at {dest.describe(run_id)} was published without "
                               "a merged model; set FT_OVERWRITE=true to train and publish it again with one, or "
                               "choose another FT_RUN_ID"])
    except OSError as e:  # S3 or the Hub: access denied, no such bucket, bad token, unreachable
        raise storage_failure(f"FT_OUTPUT_URI={dest.uri}: cannot be read ({e})", e) from None
    if not found.intact:
        log.get().warning("the completed run's files do not match its manifest: training again to replace it",
                          uri=dest.describe(run_id))
    return found


def check_data(found: Completed, dest: Storage, run_id: str, data: str | None) -> None:
    """Raise ConfigError when the completed run was trained on other data than `data` (fetch.Fetched.revision)."""
    if found.data != data:
        raise ConfigError([f"FT_DATASET: the completed run at {dest.describe(run_id)} was trained on other data "
                           f"({found.data}; now {data}); choose another FT_RUN_ID or set FT_OVERWRITE=true"])


def _intact(dest: Storage, run_id: str, manifest: dict) -> bool:
    if dest.versioned:  # the Hub: the run is one commit, checked against its manifest when it was made
        return True
    try:
        dest.verify(run_id, manifest.get("files", {}))
        return True
    except StorageError as e:
        if "does not match" in str(e):
            return False
        raise


def remove_checkpoints(checkpoints) -> bool:
    """Remove a complete run's checkpoints (checkpoints.CheckpointStore), best effort: the run's outcome is decided
    and cannot change, so a failure is logged (the next attempt with this run id removes them) and False returned."""
    try:
        if checkpoints.steps() or checkpoints.store.exists("latest"):
            checkpoints.clear()
            log.get().info("checkpoints removed", uri=checkpoints.store.describe())
        return True
    except Exception as e:  # noqa: BLE001 - after the manifest nothing may fail the run
        log.get().warning("removing the checkpoints failed; the next attempt with this run id removes them",
                          uri=checkpoints.store.describe(), error=log.redact(" ".join(str(e).split())[:300]))
        return False
