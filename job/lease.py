"""A run's lease: one attempt of a run id at a time trains, mirrors checkpoints and publishes.

Where: `lease.json` at the run's checkpoint URI (`<FT_CHECKPOINT_URI>/<run id>/`, by default
`<FT_OUTPUT_URI>/<run id>/checkpoints/`), beside the checkpoints the attempts would otherwise fight over. That store
is cheap to write every few seconds and is never the Hub (where every write is a commit); it is not part of the
published run (the manifest lists the staged files only, and a run's checkpoints folder is removed when it
completes), and the lease goes with the checkpoints at the end. With `FT_OUTPUT_URI=hf://...` and no
FT_CHECKPOINT_URI the checkpoints, and so the lease, live in FT_WORK_DIR: it then only keeps apart attempts that
share that volume.

What: {"run_id", "attempt", "host", "pid", "started", "heartbeat", "ttl_s", "nonce"}; times are Unix seconds. The
holder rewrites it every FT_LEASE_TTL_SECONDS / 4 (a daemon thread). An attempt that finds a live lease waits up to
FT_LEASE_WAIT_SECONDS for it to be released or go stale, then exits with code `busy` (retriable), naming the holder.
A lease is stale when its heartbeat is older than its TTL by the reader's clock, or when the reader has seen it
unchanged for longer than the TTL (so a holder whose clock runs ahead cannot keep it forever); a stale lease is
taken over, with a warning naming the holder.

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

import atexit
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from job import log
from job.errors import LeaseHeldError, first_line, storage_failure
from job.storage import LocalStorage, S3Storage, Storage

KEY = "lease.json"
SETTLE_SECONDS = 2.0
MUTEX_STALE_SECONDS = 30.0


def new_attempt_id() -> str:
    """A new attempt's id: `a-<12 hex>`, unique enough to name a work directory and a lease holder."""
    return "a-" + uuid.uuid4().hex[:12]


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

    def stamped(self) -> Record:
        return Record(**{**asdict(self), "heartbeat": time.time(), "nonce": uuid.uuid4().hex})

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return f"attempt {self.attempt} on {self.host} (pid {self.pid}), heartbeat {age:.0f}s ago"

    @classmethod
    def parse(cls, raw: bytes) -> Record | None:
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: treated as stale


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

    def create(self, record: Record) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(record)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return record.nonce

    def replace(self, record: Record, token: str) -> str | None:
        with self._mutex():
            found = self.read()
            if found is None or found[1] != token:
                return None
            os.replace(self._temp(record), self.path)
        return record.nonce

    def remove(self, token: str) -> None:
        with self._mutex():
            found = self.read()
            if found is not None and found[1] == token:
                self.path.unlink(missing_ok=True)
        self.store.delete(KEY)  # no-op on the file now; removes the folders left empty, as an object store would

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


# --- holding a lease --------------------------------------------------------------------------------------------------
class Lease:
    """A lease this attempt holds, renewed by a daemon thread until `release()` (also run at interpreter exit).
    `lost` is a one-line reason once another attempt took it over (after our heartbeats failed for a TTL)."""

    def __init__(self, ops: Backend, record: Record, token: str, waited: bool):
        self.ops, self.record, self.token, self.waited = ops, record, token, waited
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")
        self._thread.start()
        atexit.register(self.release)

    @property
    def uri(self) -> str:
        return self.ops.store.describe(KEY)

    def _beat(self) -> None:
        while not self._stop.wait(self.record.ttl_s / 4):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    token = self.ops.replace(self.record.stamped(), self.token)
                except OSError as e:  # a storage hiccup: the next beat tries again, within the TTL
                    log.get().warning("lease heartbeat failed", uri=self.uri, error=first_line(e))
                    continue
                if token is None:
                    found = self.ops.read()
                    holder = found[0].describe() if found and found[0] else "nobody"
                    self.lost = f"the lease at {self.uri} was taken over (now held by {holder})"
                    log.get().error("lease lost: another attempt of this run took it over", uri=self.uri,
                                    holder=holder)
                    return
                self.token = token

    def check(self) -> None:
        """Raise LeaseHeldError when the lease was lost: this attempt must not write the run's results."""
        if self.lost:
            raise LeaseHeldError(f"FT_RUN_ID={self.record.run_id}: {self.lost}; this attempt stops without "
                                 "publishing")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours. Best effort: a failure is logged."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        atexit.unregister(self.release)
        if self.lost:
            return
        try:
            self.ops.remove(self.token)
            log.get().info("lease released", uri=self.uri)
        except OSError as e:
            log.get().warning("the lease could not be released; it goes stale after FT_LEASE_TTL_SECONDS",
                              uri=self.uri, error=first_line(e))


class NoLease:
    """What a process that does not hold the lease (a worker of a distributed run) gets: nothing to do."""

    waited = False
    lost = None

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def acquire(store: Storage, run_id: str, attempt: str, ttl: float, wait: float, poll: float = 1.0) -> Lease:
    """Take the lease of `run_id` at `store` (the run's checkpoint store): at once when there is none, after up to
    `wait` seconds while another attempt's is live, at once (with a warning) when it is stale (see the module).
    Raises LeaseHeldError (exit code `busy`) naming the holder when it stays live; InputError or UnavailableError
    when the store cannot be read or written."""
    ops = backend(store)
    mine = Record(run_id, attempt, socket.gethostname(), os.getpid(), time.time(), 0.0, ttl)
    deadline, waited, seen = time.monotonic() + wait, False, {}
    try:
        while True:
            found = ops.read()
            if found is None:
                token = ops.create(record := mine.stamped())
            else:
                holder, token_seen = found
                first_seen = seen.setdefault(token_seen, time.monotonic())
                if not _stale(holder, time.monotonic() - first_seen):
                    if time.monotonic() >= deadline:
                        raise LeaseHeldError(
                            f"FT_RUN_ID={run_id}: another attempt holds the run's lease at {store.describe(KEY)} "
                            f"({holder.describe()}); still live after FT_LEASE_WAIT_SECONDS={wait:g}; a retry "
                            "waits again, and takes it over once its heartbeat is older than FT_LEASE_TTL_SECONDS")
                    if not waited:
                        log.get().info("waiting for another attempt of this run to finish", uri=store.describe(KEY),
                                       holder=asdict(holder), wait_s=wait)
                    waited = True
                    time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
                    continue
                log.get().warning("taking over a stale lease", uri=store.describe(KEY),
                                  holder=asdict(holder) if holder else "unreadable", ttl_s=ttl)
                token = ops.replace(record := mine.stamped(), token_seen)
            if token is not None:
                log.get().info("lease taken", uri=store.describe(KEY), attempt=attempt, guarantee=ops.guarantee)
                return Lease(ops, record, token, waited)
    except OSError as e:
        raise storage_failure(f"FT_CHECKPOINT_URI={store.uri}: the run's lease cannot be taken ({first_line(e)})",
                              e) from None


def _stale(holder: Record | None, unchanged_for: float) -> bool:
    if holder is None:
        return True
    return time.time() - holder.heartbeat > holder.ttl_s or unchanged_for > holder.ttl_s


def take(cfg, run_id: str, attempt: str) -> Lease | NoLease:
    """The run's lease at its checkpoint store, taken by the main process with the TTL and wait of the settings
    (`cfg` is a config.Settings); NoLease in the other processes of a distributed run."""
    from job import distributed, preflight
    from job.storage import open_destination

    if not distributed.is_main():
        return NoLease()
    store = open_destination(preflight.checkpoint_uri(cfg, run_id), "FT_CHECKPOINT_URI")
    return acquire(store, run_id, attempt, cfg.lease_ttl_seconds, cfg.lease_wait_seconds)


def clear_other_attempts(scratch: Path) -> None:
    """Remove the work directories of earlier attempts of this run (`scratch` is `<FT_WORK_DIR>/<run id>/<attempt>`),
    once this attempt holds the lease: none of them is live. They hold nothing to resume (checkpoints are resumed from
    the checkpoint URI)."""
    import shutil

    if scratch.parent.is_dir():
        for other in scratch.parent.iterdir():
            if other.name != scratch.name:
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
