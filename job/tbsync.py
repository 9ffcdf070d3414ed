"""TensorBoard event files copied to the destination while training, so that TensorBoard pointed at the bucket
(`tensorboard --logdir s3://bucket/prefix/<run id>/tensorboard`) follows the run as it happens.

A background thread copies the files that changed every FT_TB_SYNC_SECONDS, and once more when training ends,
also when it fails (the logs of a failed run are the ones worth reading), but not on SIGTERM, whose grace period
belongs to the checkpoint. Copying is best effort and bounded in time: a failure is logged and tried again next
time, and the results upload carries every file anyway. Destinations where each write is a new version (the Hub: a
commit) get the logs with the results only.
"""

from __future__ import annotations

import threading
from pathlib import Path

from job import log
from job.errors import InterruptedJob
from job.storage import Storage

MIN_BOUND = 30.0  # seconds one round of copies may take at least, however short the interval


class TensorBoardSync:
    def __init__(self, dest: Storage, local: Path, prefix: str, every_seconds: float):
        self.dest = dest.bounded(max(every_seconds, MIN_BOUND))
        self.local, self.prefix, self.every = local, prefix.rstrip("/"), every_seconds
        self.enabled = every_seconds > 0 and dest.live_sync
        self._copied: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when last copied
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TensorBoardSync:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="tensorboard-sync", daemon=True)
            self._thread.start()
            log.get().info("tensorboard sync", every_s=self.every, uri=self.dest.describe(self.prefix))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(self.every, MIN_BOUND))
        if self.enabled and not (exc_type and issubclass(exc_type, InterruptedJob)):
            self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sync()

    def sync(self) -> int:
        """Copy the event files that changed since the last copy; return how many were copied."""
        copied = 0
        files = sorted(p for p in self.local.rglob("*") if p.is_file()) if self.local.is_dir() else []
        for path in files:
            rel, stat = path.relative_to(self.local).as_posix(), path.stat()
            state = (stat.st_size, stat.st_mtime_ns)
            if self._copied.get(rel) == state:
                continue
            try:
                self.dest.put(path, f"{self.prefix}/{rel}")
            except Exception as e:  # noqa: BLE001 - best effort: training goes on, the next round tries again
                log.get().warning("tensorboard sync failed", uri=self.dest.describe(self.prefix), error=str(e)[:300])
                return copied
            self._copied[rel] = state
            copied += 1
        return copied
