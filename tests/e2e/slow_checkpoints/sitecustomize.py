"""Loaded by the job's interpreter in some tests (PYTHONPATH): checkpoint uploads to a local store take
SLOW_CHECKPOINT_PUT seconds per file, so that a kill -9 lands while a checkpoint is being mirrored; other uploads
(the results, TensorBoard files) SLOW_RESULT_PUT seconds per file, so that a signal lands while the run is being
published; and deletions of checkpoint files SLOW_CHECKPOINT_DELETE seconds each, so that a signal lands in the
clean-up after publishing."""

import os
import time

# Like job/__main__.py, the job's signal handlers come first: importing the storage below takes a while.
from job import signals

signals.install()

from job.storage import local  # noqa: E402

_put = local.LocalStorage.put


def _slow_put(self, src, key):
    slow = "SLOW_CHECKPOINT_PUT" if "checkpoint-" in key else "SLOW_RESULT_PUT"
    time.sleep(float(os.environ.get(slow, "0")))
    return _put(self, src, key)


local.LocalStorage.put = _slow_put

_delete = local.LocalStorage.delete


def _slow_delete(self, key):
    # SLOW_CHECKPOINT_DELETE: the clean-up after a published run takes long enough for a signal to land in it.
    if "checkpoint" in key or key.endswith("latest"):
        time.sleep(float(os.environ.get("SLOW_CHECKPOINT_DELETE", "0")))
    return _delete(self, key)


local.LocalStorage.delete = _slow_delete
