"""Checkpoints mirrored to storage, and the choice of the one to resume from.

Layout under the checkpoint URI (one per run id):

    checkpoint-120/...              the Trainer's checkpoint: adapter, optimizer, scheduler, RNG and trainer state
    checkpoint-120/checkpoint.json  written after every other file of it: step, the fingerprints of the training
                                    settings (their hash, and the settings themselves with secrets redacted) and
                                    of the data, and the sha256 of each file
    latest                          written after checkpoint.json: {"checkpoint": "checkpoint-120", "step": 120},
                                    for people and tools that look; resume takes the newest complete checkpoint

A checkpoint without its checkpoint.json, or whose files do not match it, is incomplete: resume skips it for the
previous complete one. Pruning removes checkpoint.json first, so a half-deleted checkpoint never looks complete.

A checkpoint saved from other data (the dataset file edited in place, a new Hub commit) is not resumed: the run
stops with a ConfigError, or with FT_ON_DATA_CHANGE=restart deletes the checkpoints and trains from step 0.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from job import log
from job.errors import ConfigError, DiskFullError, LeaseHeldError, UnavailableError
from job.identity import Fingerprint
from job.storage.base import file_sha256
from job.storage import Storage

MARKER = "checkpoint.json"
LATEST = "latest"
NAME = re.compile(r"^checkpoint-(\d+)$")


def read_json(store: Storage, key: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            store.get(key, Path(tmp) / "f.json")
            return json.loads((Path(tmp) / "f.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None


def write_json(store: Storage, key: str, data: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        store.put(path, key)


class CheckpointStore:
    """The checkpoints of one run id at one URI. `fingerprint` is identity.training_fingerprint(cfg), `data` the
    dataset's revision (fetch.Fetched.revision); either None leaves that check out. `on_data_change` is
    FT_ON_DATA_CHANGE."""

    def __init__(self, store: Storage, keep: int, fingerprint: Fingerprint | None = None, data: str | None = None,
                 on_data_change: str = "fail"):
        self.store, self.keep, self.fingerprint = store, keep, fingerprint
        self.data, self.on_data_change = data, on_data_change
        self.log = log.get()
        self.guard = lambda: None  # raises when this attempt may no longer write here (lease.Lease.check)
        self.run_complete = lambda: False  # whether the run's results are published (completion.find)

    def steps(self) -> list[int]:
        """Steps of every checkpoint that has files here, complete or not, newest first."""
        names = {key.split("/", 1)[0] for key in self.store.list() if "/" in key}
        return sorted((int(m.group(1)) for n in names if (m := NAME.match(n))), reverse=True)

    def mirror(self, local: Path, step: int) -> None:
        """Upload a saved checkpoint, then its marker, then the `latest` pointer; prune old ones."""
        self.guard()
        name = f"checkpoint-{step}"
        files = {p.relative_to(local).as_posix(): file_sha256(p) for p in sorted(local.rglob("*")) if p.is_file()}
        marker = {"step": step, "settings": self.fingerprint and self.fingerprint.digest,
                  "training_settings": self.fingerprint and self.fingerprint.settings, "data": self.data,
                  "files": files}
        (local / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        self.log.info("mirroring checkpoint", step=step, uri=self.store.describe(name), files=len(files))
        try:
            self.store.put_tree(local, name, skip={MARKER})
            self.store.put(local / MARKER, f"{name}/{MARKER}")
        except DiskFullError:
            # Without its marker the copy is no checkpoint; its files would only keep the disk full.
            self.store.delete_tree(name)
            raise
        except OSError:
            # An attempt frozen while writing may find its directory removed by the attempt that took the run over
            # and cleaned up after publishing: that is a lost lease (LeaseHeldError), not a failed write.
            self.recheck_after_writing()
            raise
        write_json(self.store, LATEST, {"checkpoint": name, "step": step})
        self.recheck_after_writing()
        self.log.info("checkpoint mirrored", step=step, uri=self.store.describe(name))
        self.prune()

    def recheck_after_writing(self) -> None:
        """The guard again, after the writes: an attempt frozen between the first check and its writes (a paused node)
        may have lost the run meanwhile. If the attempt that took over has published and cleaned up, whatever
        checkpoint is here now is this stale attempt's own: remove it all, then raise. Otherwise the new owner's
        checkpoints may be among the files, and they stay (its own next mirror and clean-up settle them)."""
        try:
            self.guard()
        except LeaseHeldError:
            if self.run_complete():
                for step in self.steps():
                    self.store.delete_tree(f"checkpoint-{step}")
                self.store.delete(LATEST)
                self.log.warning("a checkpoint written after this attempt lost the run was removed",
                                 uri=self.store.describe())
            raise

    def prune(self) -> None:
        complete = [s for s in self.steps() if self.store.exists(f"checkpoint-{s}/{MARKER}")]
        for step in complete[self.keep:]:
            name = f"checkpoint-{step}"
            self.store.delete(f"{name}/{MARKER}")
            self.store.delete_tree(name)

    def check_data(self) -> None:
        """Compare the data fingerprint of the newest checkpoint that has a marker with this run's: on a change,
        raise ConfigError, or (FT_ON_DATA_CHANGE=restart) delete every checkpoint so that training starts over.
        Cheap (one small file), so a run calls it before loading the model; restore() calls it again."""
        for step in self.steps():
            marker = read_json(self.store, f"checkpoint-{step}/{MARKER}")
            if not marker:
                continue
            saved = marker.get("data")
            if self.data is None or saved is None or saved == self.data:
                return  # unknown on either side (a checkpoint of an older version): nothing to compare
            where = self.store.describe(f"checkpoint-{step}")
            if self.on_data_change != "restart":
                raise ConfigError([f"FT_DATASET: {where} was trained on other data ({saved}; now {self.data}); "
                                   "restore the data to resume, set FT_ON_DATA_CHANGE=restart to delete the "
                                   "checkpoints and train from step 0, or choose another FT_RUN_ID"])
            self.log.warning("the data changed since the checkpoints were saved; training starts over "
                             "(FT_ON_DATA_CHANGE=restart)", step=step, uri=where, saved=saved, now=self.data)
            self.clear()
            return

    def restore(self, dest: Path) -> tuple[Path, int] | None:
        """Download the newest complete checkpoint into `dest`; None when there is none. The newest, rather than
        the one `latest` names: a run killed between a checkpoint's marker and the pointer loses nothing."""
        self.check_data()
        for step in self.steps():
            local = dest / f"checkpoint-{step}"
            problem = self._download_verified(f"checkpoint-{step}", local)
            if problem is None:
                return local, step
            self.log.warning("skipping incomplete checkpoint", step=step, problem=problem,
                             uri=self.store.describe(f"checkpoint-{step}"))
            shutil.rmtree(local, ignore_errors=True)
        return None

    def restore_everywhere(self, dest: Path) -> tuple[Path, int] | None:
        """restore(), in every process of a distributed run: rank 0 picks the checkpoint, the first process of every
        other node downloads that same one, and all wait until each has it."""
        from job import distributed

        if not distributed.active():
            return self.restore(dest)
        found = self.restore(dest) if distributed.is_main() else None
        step = distributed.broadcast(found[1] if found else None)
        if step is None:
            return None
        local = dest / f"checkpoint-{step}"
        if not distributed.is_main() and distributed.local_rank() == 0:  # a node without rank 0's files
            problem = self._download_verified(f"checkpoint-{step}", local)
            if problem:
                raise UnavailableError(f"FT_CHECKPOINT_URI: checkpoint-{step}, chosen by rank 0, could not be "
                                       f"downloaded on this node: {problem}")
        distributed.barrier()
        return local, step

    def _download_verified(self, name: str, local: Path) -> str | None:
        marker = read_json(self.store, f"{name}/{MARKER}")
        if not marker or not isinstance(marker.get("files"), dict):
            return f"no {MARKER} (the upload did not finish)"
        differ = self.fingerprint and marker.get("settings") is not None and self.fingerprint.mismatch(
            marker.get("settings"), marker.get("training_settings"))
        if differ:
            # The same run id with other training settings: resuming would mix two trainings.
            raise ConfigError([f"FT_RUN_ID: {self.store.describe(name)} was saved by this run id with other "
                               f"training settings{differ}; choose another FT_RUN_ID, restore the settings, or "
                               "delete the checkpoints"])
        for rel, digest in marker["files"].items():
            try:
                self.store.get(f"{name}/{rel}", local / rel)
            except FileNotFoundError:
                return f"{rel} is missing"
            if file_sha256(local / rel) != digest:
                return f"{rel} does not match its checksum"
        return None

    def clear(self) -> None:
        """After a successful run: the pointer first, so it never names a deleted checkpoint."""
        self.store.delete(LATEST)
        for step in self.steps():
            self.store.delete(f"checkpoint-{step}/{MARKER}")
            self.store.delete_tree(f"checkpoint-{step}")
