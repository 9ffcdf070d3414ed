"""Loaded by the job's interpreter in one test (PYTHONPATH): checkpoint uploads to a local store take
SLOW_CHECKPOINT_PUT seconds per file, so that a kill -9 lands while a checkpoint is being mirrored."""

import os
import time

from job.storage import local

_put = local.LocalStorage.put


def _slow_put(self, src, key):
    if "checkpoint-" in key:
        time.sleep(float(os.environ.get("SLOW_CHECKPOINT_PUT", "0")))
    return _put(self, src, key)


local.LocalStorage.put = _slow_put
