"""The lease's file (job/lease.py) on each kind of store: read it, create it if absent, replace or remove it if
unchanged, each safe against another attempt doing the same at the same moment.

Races, per backend (see `backend`):
- local path: created with link(2) of a complete temporary file (fails if it exists); renewals, take-overs and the
  release compare the nonce and replace the file under a mutex made with O_EXCL (broken when older than 30 s, i.e.
  left by a process killed inside a millisecond-long section). Atomic on a local filesystem and on NFS.
- S3: PutObject with If-None-Match: * to create, If-Match: <ETag> to renew or take over, DeleteObject with If-Match
  to release; S3 (since 2024-11), MinIO and moto evaluate them atomically: of two racing attempts exactly one wins.
- a store that refuses those headers (501 NotImplemented, an older S3-compatible server): write, wait
  SETTLE_SECONDS, read back and keep the lease only if it still carries our nonce. A heuristic: two writers whose
  writes land more than SETTLE_SECONDS apart are told apart, closer ones may both believe they won.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from job import log
from job.storage import LocalStorage, S3Storage, Storage

KEY = "lease.json"
SETTLE_SECONDS = 2.0
MUTEX_STALE_SECONDS = 30.0


@dataclass
class Record:
    """The lease's content. `heartbeat` and `started` are Unix seconds; `nonce` changes with every write."""

    run_id: str
    attempt: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float
    nonce: str = ""
    pid_ns: str = ""  # the holder's PID namespace (/proc/self/ns/pid), so that `pid` is only judged where it means

    def stamped(self) -> Record:
        return Record(**{**asdict(self), "heartbeat": time.time(), "nonce": uuid.uuid4().hex})

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return f"attempt {self.attempt} on {self.host} (pid {self.pid}), heartbeat {age:.0f}s ago"

    @classmethod
    def parse(cls, raw: bytes) -> Record | None:
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: treated as stale


def pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), or "" where there is no /proc."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def holder_gone(holder: Record) -> bool:
    """Whether the holder is provably dead: same host and PID namespace as this process, and its pid is gone.
    Elsewhere (another pod, a container restarted in place whose new process may have the old pid) only the
    heartbeat's age can tell."""
    if not holder.pid_ns or holder.pid_ns != pid_namespace() or holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


# --- backends: read, create if absent, replace if unchanged, remove if unchanged ----------------------------------
class Backend:
    """Conditional operations on one key. `token` is what identifies the version read (the nonce, or S3's ETag)."""

    guarantee = "write, settle, read back"

    def __init__(self, store: Storage):
        self.store = store

    def read(self) -> tuple[Record | None, str] | None:
        """(record, token), or None when there is no lease. A record that cannot be parsed is (None, token)."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                raw = self.store.get(KEY, Path(tmp) / KEY).read_bytes()
            except FileNotFoundError:
                return None
        record = Record.parse(raw)
        return record, record.nonce if record else raw.hex()[:32]

    def create(self, record: Record) -> str | None:
        """Write `record` if there is no lease; its token, or None when another attempt was first."""
        if self.read() is not None:
            return None
        return self._write_settled(record)

    def replace(self, record: Record, token: str) -> str | None:
        """Write `record` if the lease is still the version `token`; the new token, or None when it changed."""
        found = self.read()
        if found is None or found[1] != token:
            return None
        return self._write_settled(record)

    def remove(self, token: str) -> None:
        found = self.read()
        if found is not None and found[1] == token:
            self.store.delete(KEY)

    def _write_settled(self, record: Record) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / KEY
            path.write_text(json.dumps(asdict(record)))
            self.store.put(path, KEY)
        time.sleep(SETTLE_SECONDS)
        found = self.read()
        return record.nonce if found is not None and found[1] == record.nonce else None


class LocalBackend(Backend):
    guarantee = "link(2) to create, O_EXCL mutex to replace"

    def __init__(self, store: LocalStorage):
        super().__init__(store)
        self.path = store.root / KEY
        self.made: list[Path] = []  # folders the lease created (the run's folder, say): removed with it when empty

    def create(self, record: Record) -> str | None:
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.made = self.made or missing
        tmp = self._temp(record)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return record.nonce

    def replace(self, record: Record, token: str) -> str | None:
        if not self.path.exists():
            return None  # released or cleared: nothing to replace, and no folder to make for the mutex
        with self._mutex():
            found = self.read()
            if found is None or found[1] != token:
                return None
            os.replace(self._temp(record), self.path)
        return record.nonce

    def remove(self, token: str) -> None:
        if not self.path.exists():
            return
        with self._mutex():
            found = self.read()
            if found is not None and found[1] == token:
                self.path.unlink(missing_ok=True)
        self.store.delete(KEY)  # no-op on the file now; removes the folders left empty, as an object store would
        for folder in self.made:  # deepest first
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue  # removed with the lease's own folder
            except OSError:
                break  # not empty: checkpoints, results

    def _temp(self, record: Record) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{KEY}.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(record)))
        return Path(tmp)

    def _mutex(self):
        return _Mutex(self.path.with_name(KEY + ".mutex"))


class _Mutex:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return self
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > MUTEX_STALE_SECONDS:
                        self.path.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                time.sleep(0.01)

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


class S3Backend(Backend):
    guarantee = "conditional PutObject (If-None-Match / If-Match)"

    def __init__(self, store: S3Storage):
        super().__init__(store)
        self.s3: S3Storage = store
        self.conditional = True

    def read(self):
        def get(client):
            from botocore.exceptions import ClientError

            try:
                obj = client.get_object(Bucket=self.s3.bucket, Key=self.s3._key(KEY))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return obj["Body"].read(), obj["ETag"]

        found = self.s3._call(f"reading {self.s3.describe(KEY)}", get)
        return None if found is None else (Record.parse(found[0]), found[1])

    def create(self, record: Record) -> str | None:
        return self._put(record, {"IfNoneMatch": "*"}) if self.conditional else super().create(record)

    def replace(self, record: Record, token: str) -> str | None:
        if not self.conditional:
            return super().replace(record, token)
        return self._put(record, {"IfMatch": token})

    def remove(self, token: str) -> None:
        if not self.conditional:
            return super().remove(token)
        self.s3._call(f"deleting {self.s3.describe(KEY)}", self._lost_is_none(
            lambda c: c.delete_object(Bucket=self.s3.bucket, Key=self.s3._key(KEY), IfMatch=token)))

    def _put(self, record: Record, condition: dict) -> str | None:
        body = json.dumps(asdict(record)).encode()
        put = self._lost_is_none(lambda c: c.put_object(Bucket=self.s3.bucket, Key=self.s3._key(KEY), Body=body,
                                                        ContentType="application/json", **condition))
        answer = self.s3._call(f"writing {self.s3.describe(KEY)}", put)
        if answer == "unsupported":
            log.get().warning("the S3 store refuses conditional writes; the lease falls back to write, settle and "
                              "read back", uri=self.s3.describe(KEY), settle_s=SETTLE_SECONDS)
            self.conditional = False
            return self.create(record) if "IfNoneMatch" in condition else self.replace(record, condition["IfMatch"])
        return None if answer is None else answer["ETag"]

    @staticmethod
    def _lost_is_none(call):
        """`call(client)`, with a failed precondition (412; 409 for a concurrent conditional write, 404 for a key
        deleted meanwhile) as None and a refused header as "unsupported"."""

        def run(client):
            from botocore.exceptions import ClientError

            try:
                return call(client)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (404, 409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                         "NoSuchKey"):
                    return None
                if status == 501 or code == "NotImplemented":
                    return "unsupported"
                raise

        return run


def backend(store: Storage) -> Backend:
    """The strongest race-safe lease operations `store` offers."""
    if isinstance(store, LocalStorage):
        return LocalBackend(store)
    if isinstance(store, S3Storage):
        return S3Backend(store)
    return Backend(store)
