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
unchanged for longer than the TTL (so a holder whose clock runs ahead cannot keep it forever), or at once when the
holder ran on this host, in this PID namespace, and its pid is gone (lease_backends.holder_gone); a stale lease is
taken over, with a warning naming the holder.

How each store makes taking it race-free: job/lease_backends.py.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from job import log
from job.errors import LeaseHeldError, first_line, storage_failure
from job.lease_backends import KEY, Backend, Record, backend, holder_gone, pid_namespace
from job.storage import Storage


def new_attempt_id() -> str:
    """A new attempt's id: `a-<12 hex>`, unique enough to name a work directory and a lease holder."""
    return "a-" + uuid.uuid4().hex[:12]


# --- holding a lease --------------------------------------------------------------------------------------------------
class Lease:
    """A lease this attempt holds, renewed by a daemon thread until `release()` (also run at interpreter exit).
    `lost` is a one-line reason once another attempt took it over (after our heartbeats failed for a TTL)."""

    def __init__(self, ops: Backend, record: Record, token: str, waited: bool, took_over: str | None = None):
        self.ops, self.record, self.token, self.waited = ops, record, token, waited
        self.took_over = took_over  # the attempt id of the stale lease taken over, if any
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
                    if not self._renew():
                        return
                except OSError as e:  # a storage hiccup: the next beat tries again, within the TTL
                    log.get().warning("lease heartbeat failed", uri=self.uri, error=first_line(e))

    def _renew(self) -> bool:
        """One heartbeat; False once the lease is lost."""
        token = self.ops.replace(self.record.stamped(), self.token)
        if token is None:
            found = self.ops.read()
            if found and found[0] and found[0].attempt == self.record.attempt:
                token = found[1]  # our write landed but its answer was lost, and the retry was refused
            else:
                holder = found[0].describe() if found and found[0] else "nobody"
                self.lost = f"the lease at {self.uri} was taken over (now held by {holder})"
                log.get().warning("lease lost: another attempt of this run took it over", uri=self.uri,
                                  holder=holder)
                return False
        self.token = token
        return True

    def check(self) -> None:
        """Raise LeaseHeldError unless the lease is still ours, read back from the store now (one small read): this
        attempt must not mirror, prune or publish once another has taken the run over."""
        with self._lock:
            if not self.lost and not self._stop.is_set():
                try:
                    found = self.ops.read()
                except OSError as e:  # cannot tell: the heartbeat's verdict stands
                    log.get().warning("the lease could not be read back", uri=self.uri, error=first_line(e))
                    found = None, self.token
                if found is None or (found[1] != self.token and not (found[0] and found[0].attempt ==
                                                                      self.record.attempt)):
                    holder = found[0].describe() if found and found[0] else "nobody"
                    self.lost = f"the lease at {self.uri} was taken over (now held by {holder})"
        if self.lost:
            raise LeaseHeldError(f"FT_RUN_ID={self.record.run_id}: {self.lost}; this attempt stops without "
                                 "publishing")

    def guard(self, store: Storage) -> GuardedStore:
        """`store`, writing only while this lease is held."""
        return GuardedStore(store, self)

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


class GuardedStore:
    """A store whose writes first check that `lease` is still held (Lease.check), for the writers that run beside
    training (the live TensorBoard sync): an attempt that lost the run writes nothing more into it."""

    def __init__(self, store: Storage, lease: Lease):
        self.store, self.lease = store, lease

    def __getattr__(self, name):
        return getattr(self.store, name)

    def bounded(self, seconds: float) -> GuardedStore:
        return GuardedStore(self.store.bounded(seconds), self.lease)

    def put(self, src: Path, key: str) -> None:
        self.lease.check()
        self.store.put(src, key)


class NoLease:
    """What a process that does not hold the lease (a worker of a distributed run) gets: nothing to do."""

    waited = False
    lost = None
    took_over = None

    def check(self) -> None:
        pass

    def guard(self, store: Storage) -> Storage:
        return store

    def release(self) -> None:
        pass


def acquire(store: Storage, run_id: str, attempt: str, ttl: float, wait: float, poll: float = 1.0) -> Lease:
    """Take the lease of `run_id` at `store` (the run's checkpoint store): at once when there is none, after up to
    `wait` seconds while another attempt's is live, at once (with a warning) when it is stale (see the module).
    Raises LeaseHeldError (exit code `busy`) naming the holder when it stays live; InputError or UnavailableError
    when the store cannot be read or written."""
    ops = backend(store.bounded(max(ttl, 10.0)))  # no lease operation may hang longer than a TTL
    mine = Record(run_id, attempt, socket.gethostname(), os.getpid(), time.time(), 0.0, ttl, pid_ns=pid_namespace())
    deadline, waited, seen, took_over = time.monotonic() + wait, False, {}, None
    try:
        while True:
            found = ops.read()
            if found is not None and found[0] is not None and found[0].attempt == attempt:
                record, token = found  # our write landed though its answer was lost (and a retry was refused)
            elif found is None:
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
                took_over = holder.attempt if holder else None
            if token is not None:
                log.get().info("lease taken", uri=store.describe(KEY), attempt=attempt, guarantee=ops.guarantee)
                return Lease(ops, record, token, waited, took_over)
    except OSError as e:
        raise storage_failure(f"FT_CHECKPOINT_URI={store.uri}: the run's lease cannot be taken ({first_line(e)})",
                              e) from None


def _stale(holder: Record | None, unchanged_for: float) -> bool:
    if holder is None or holder_gone(holder):
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


def remove_leftover(store: Storage) -> None:
    """Remove a lease left at a complete run's checkpoint store (its holder was stopped or killed after the manifest
    was written, before releasing it). Nobody can be training a complete run, so whoever holds it is only cleaning
    up, and its release of a lease already gone is harmless. Best effort, as all clean-up after the manifest."""
    try:
        if store.exists(KEY):
            store.delete(KEY)
    except Exception as e:  # noqa: BLE001 - the run is complete: nothing here may fail it
        log.get().warning("removing the complete run's leftover lease failed", uri=store.describe(KEY),
                          error=first_line(e))


def remove_work_dir(scratch: Path) -> None:
    """Remove this attempt's work directory, and the run's folder above it when no other attempt's is left."""
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.parent.rmdir()
    except OSError:
        pass  # another attempt's folder (or none at all)


def clear_other_attempts(scratch: Path, held: Lease | NoLease) -> None:
    """Remove the work directories of earlier attempts of this run (`scratch` is `<FT_WORK_DIR>/<run id>/<attempt>`)
    once this attempt holds the lease: they ended, releasing it. They hold nothing to resume (checkpoints are resumed
    from the checkpoint URI). Spared: the attempt whose stale lease was taken over, which may be frozen rather than
    dead (it finds the lease lost and stops with `busy` when it wakes); a later attempt removes it."""
    import shutil

    if scratch.parent.is_dir():
        for other in scratch.parent.iterdir():
            if other.name not in (scratch.name, held.took_over):
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
