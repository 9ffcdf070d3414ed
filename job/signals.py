"""SIGTERM and SIGINT: stop cleanly in training, at once elsewhere.

Outside training a signal raises InterruptedJob where the program is. During training the first signal only asks
the Trainer (through callbacks.GracefulStop) to finish the current optimizer step, save and mirror a checkpoint,
and stop; a watchdog ends the process when that takes longer than FT_TERMINATION_GRACE_SECONDS. A second signal
ends it at once. Either way the exit code is "interrupted".
"""

from __future__ import annotations

import os
import signal
import threading
import time

from job import log
from job.errors import CODE_BY_NAME, StopSignal


class Stopper:
    def __init__(self, grace_seconds: float, on_exit=None):
        self.grace = grace_seconds
        self.on_exit = on_exit or (lambda reason: None)  # writes the termination log
        self.training = False
        self.requested: str | None = None  # the signal's name, once one came during training
        self.peer_requested = False  # another process of a distributed run got one (callbacks.GracefulStop)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            raise StopSignal(f"stopped by {name}")
        if self.requested:
            self._exit_now(f"stopped by a second signal ({name}) before the checkpoint was saved")
        self.requested = name
        log.get().warning("stop requested: finishing this step and saving a checkpoint", signal=name,
                          budget_s=self.grace)
        threading.Thread(target=self._watchdog, daemon=True, name="sigterm-watchdog").start()

    def _watchdog(self) -> None:
        time.sleep(self.grace)
        self._exit_now(f"stopped by {self.requested}; the checkpoint could not be saved within "
                       f"FT_TERMINATION_GRACE_SECONDS={self.grace:g}, the last periodic checkpoint stands")

    def _exit_now(self, reason: str) -> None:
        log.get().error(reason, exit_code=CODE_BY_NAME["interrupted"], reason="interrupted")
        self.on_exit(f"interrupted: {reason}")
        os._exit(CODE_BY_NAME["interrupted"])
