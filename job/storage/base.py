"""The one interface every source and destination implements, addressed by URI."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """A transfer that failed, in one line without the store's own URI (the caller names it). `retriable` is False
    for what a retry cannot fix: access denied, bad credentials, a missing bucket, repository or key."""

    def __init__(self, message: str, retriable: bool = True):
        super().__init__(message)
        self.retriable = retriable


# Start-up checks (a probe write, a listing, one small read) ask little of a store: an endpoint that does not answer
# them within these bounds is down, and the job says so in well under a minute rather than after the transfers'
# patient retries (8 attempts x 60 s: ~8 minutes). A setting below a bound applies to the checks too.
CHECK_ATTEMPTS = 2
CHECK_TIMEOUT_SECONDS = 10.0
CHECK_DEADLINE_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """How remote stores are reached; each field is the setting of the same name (`FT_HUB_PRIVATE`, ...), except
    `multipart_bytes` and `checking`."""

    hub_private: bool = True
    hub_revision: str | None = None
    storage_attempts: int = 8
    storage_timeout_seconds: float = 60.0
    storage_deadline_seconds: float = 3600.0
    multipart_bytes: int = 64 * 2**20  # not a setting: S3 part size, and the size from which uploads are multipart
    checking: bool = False  # not a setting: these are the bounds of start-up checks (for_checks)

    @classmethod
    def of(cls, settings: Any) -> StorageOptions:
        defaults = cls()
        return cls(**{f.name: getattr(settings, f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)})

    def for_checks(self) -> StorageOptions:
        """These options bounded for start-up checks: at most CHECK_ATTEMPTS attempts of CHECK_TIMEOUT_SECONDS
        (connect, and each read) per request, and CHECK_DEADLINE_SECONDS per operation."""
        return dataclasses.replace(
            self, checking=True, storage_attempts=min(self.storage_attempts, CHECK_ATTEMPTS),
            storage_timeout_seconds=min(self.storage_timeout_seconds, CHECK_TIMEOUT_SECONDS),
            storage_deadline_seconds=min(self.storage_deadline_seconds, CHECK_DEADLINE_SECONDS))

    def attempts_note(self) -> str:
        """How many attempts a failed request had, and what set them, for messages."""
        if self.checking:
            return (f"after {self.storage_attempts} attempts of {self.storage_timeout_seconds:g} s (the start-up "
                    "check's bounds)")
        return (f"after {self.storage_attempts} attempts (FT_STORAGE_ATTEMPTS) of {self.storage_timeout_seconds:g} s "
                "(FT_STORAGE_TIMEOUT_SECONDS)")


class Storage(abc.ABC):
    """A tree of files under one URI. Keys are `/`-separated paths relative to that root."""

    # Every write makes a new version of the whole tree (the Hub: a commit), so nothing is replaced in place.
    versioned = False
    # Cheap enough to mirror TensorBoard logs to every minute while training.
    live_sync = True

    def __init__(self, uri: str):
        self.uri = uri

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys of every file under `prefix`, sorted."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the file `key` exists."""

    @abc.abstractmethod
    def get(self, key: str, dest: Path) -> Path:
        """Copy the file `key` to `dest` and return `dest`; FileNotFoundError when there is no such file."""

    @abc.abstractmethod
    def put(self, src: Path, key: str) -> None:
        """Write the local file `src` as `key`, atomically: readers see the old file or the whole new one."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the file `key`; a missing file is not an error."""

    def delete_tree(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def probe_write(self, key: str) -> None:
        """Prove write access with a real write (and removal) of a small file at `key`."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".probe") as f:
            f.write("finetune-job write probe\n")
            f.flush()
            self.put(Path(f.name), key)
        self.delete(key)

    def fetch(self, cache: Path, patterns: list[str] | None = None) -> Path:
        """Make the whole tree (or the files matching `patterns`) available locally and return its directory."""
        from fnmatch import fnmatch

        for key in self.list():
            if patterns is None or any(fnmatch(key, p) for p in patterns):
                self.get(key, cache / key)
        return cache

    def put_tree(self, src: Path, prefix: str = "", skip: set[str] | None = None) -> list[str]:
        """Write every file under `src` to `prefix/<relative path>`, except relative paths in `skip`."""
        written = []
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if skip and rel in skip:
                continue
            key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            self.put(path, key)
            written.append(key)
        return written

    def bounded(self, seconds: float) -> Storage:
        """This store, with every transfer bounded by `seconds` (for background copies that must not hang)."""
        return self

    def for_checks(self) -> Storage:
        """This store with StorageOptions.for_checks' short timeouts and few attempts, for start-up checks: a store
        that does not answer fails them within about half a minute. A local store is itself."""
        return self

    def put_run(self, stage: Path, prefix: str, marker: str) -> None:
        """Publish a finished run from `stage` under `prefix`: every file, checked against `marker` (a JSON manifest
        whose `files` maps each relative path to its `sha256` and `bytes`), then the marker itself, last."""
        self.put_tree(stage, prefix, skip={marker})
        self.verify(prefix, manifest_files(stage / marker))
        self.put(stage / marker, f"{prefix}/{marker}")

    def verify(self, prefix: str, files: dict[str, dict]) -> None:
        """Raise StorageError unless every file of `files` is at `prefix/<path>` with its size, and its sha256 where
        the store can tell it."""
        for rel, expected in files.items():
            key = f"{prefix}/{rel}"
            size, sha256 = self.stat(key)
            if size != expected["bytes"] or (sha256 is not None and sha256 != expected["sha256"]):
                raise StorageError(f"{self.describe(key)} does not match the manifest after upload: {size} bytes, "
                                   f"sha256 {sha256 or 'unknown'}; expected {expected['bytes']} bytes, sha256 "
                                   f"{expected['sha256']}")

    def stat(self, key: str) -> tuple[int | None, str | None]:
        """Size and sha256 (None where unknown) of the file `key`; (None, None) when there is none."""
        raise NotImplementedError(f"{type(self).__name__} cannot check what it stored")

    def describe(self, key: str = "") -> str:
        """The URI of `key`, for messages."""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri


def manifest_files(path: Path) -> dict[str, dict]:
    """The `files` of a run's manifest: relative path -> {"sha256": ..., "bytes": ...}."""
    return json.loads(path.read_text())["files"]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
