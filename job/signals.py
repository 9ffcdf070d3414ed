"""SIGTERM and SIGINT: a flag that the stages check at safe points, never an exception raised inside arbitrary code.

`install()` is the entrypoint's first statement (job/__main__.py, and job.cli.main for the console script), before
settings, torch or transformers are imported, so that a signal at any moment of start-up is ours. This module imports
only the standard library for that reason. What a signal does depends on the phase the run is in:

- `immediate` (start-up, checks, downloads, tokenizing, loading, evaluating, saving the adapter locally: nothing that
  a later attempt depends on is half-written): the process ends at once with "interrupted" (7).
- `deferred` (training; publishing): the signal only sets `requested`. Training finishes the current optimizer step,
  saves and mirrors a checkpoint (callbacks.GracefulStop) and ends with 7; publishing finishes its uploads, the
  manifest last, and the run ends with 0. A watchdog ends the process with 7 when that takes longer than
  FT_TERMINATION_GRACE_SECONDS; a second signal ends it at once.
- `complete` (the manifest is written: the run's outcome is decided): the process ends at once with 0; the
  checkpoint clean-up it cuts short is finished by the next attempt with this run id.
- `finished` (the entrypoint has its exit code, `finish()`): SIGTERM and SIGINT are ignored while the interpreter
  shuts down, so the process ends with that code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

INTERRUPTED, SUCCESS = 7, 0  # job.errors.EXIT_CODES' codes, here without importing it (a test checks they agree)
DEFAULT_GRACE_SECONDS = 25.0  # until the settings give FT_TERMINATION_GRACE_SECONDS (a test checks it is the default)
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def termination_log_path() -> Path | None:
    """FT_TERMINATION_LOG, else the batch service's failure file (SageMaker's) or Kubernetes' /dev/termination-log;
    None when FT_TERMINATION_LOG is set but empty (no termination log, as job.config reads it)."""
    # The settings may be the very thing that failed, so the path is read from the environment.
    from job import platforms  # the standard library only, like this module

    given = os.environ.get("FT_TERMINATION_LOG")
    if given is not None and not given.strip():
        return None
    return Path(given or platforms.termination_log(os.environ) or DEFAULT_TERMINATION_LOG)


def use_termination_log(path: Path | None) -> None:
    """Once the settings are valid, their FT_TERMINATION_LOG holds (set in FT_CONFIG_FILE or SageMaker's
    hyperparameters too, where termination_log_path, which reads the environment only, would not see it): written
    into the environment, which torchrun's workers inherit. None (an empty value): no termination log."""
    os.environ["FT_TERMINATION_LOG"] = "" if path is None else str(path)


def write_termination_log(reason: str) -> None:
    """Write the one-line reason to FT_TERMINATION_LOG (Kubernetes' /dev/termination-log only where it exists;
    nothing when FT_TERMINATION_LOG is empty)."""
    path = termination_log_path()
    if path is None or (path == DEFAULT_TERMINATION_LOG and not path.exists()):
        return
    try:
        path.write_text(reason[:4000] + "\n")
    except OSError:
        pass


class Stopper:
    """The run's answer to SIGTERM and SIGINT. `requested` names the signal once one came in a deferred phase;
    `peer_requested` is set when another process of a distributed run got one (callbacks.GracefulStop)."""

    def __init__(self, grace_seconds: float = DEFAULT_GRACE_SECONDS, on_exit=write_termination_log):
        self.grace = grace_seconds
        self.on_exit = on_exit or (lambda reason: None)  # writes the termination log
        self.phase = "immediate"
        self.stage = "start-up"  # what the run is doing, for the messages
        self.requested: str | None = None
        self.peer_requested = False
        self.code = SUCCESS  # the process's exit code, once finish() has it

    @property
    def training(self) -> bool:
        return self.phase == "deferred" and self.stage == "training"

    def install(self) -> None:
        """Make this Stopper the process's handler of SIGTERM and SIGINT."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def configure(self, grace_seconds: float, on_exit=None) -> None:
        """Take the settings' grace budget at the start of a run (nothing is deferred yet)."""
        self.grace = grace_seconds
        self.phase, self.stage, self.requested, self.peer_requested = "immediate", "start-up", None, False
        if on_exit is not None:
            self.on_exit = on_exit

    @contextlib.contextmanager
    def deferred(self, stage: str):
        """Within this block a signal only sets `requested` (and starts the watchdog); the block's code checks it."""
        previous = (self.phase, self.stage)
        self.phase, self.stage = "deferred", stage
        try:
            yield self
        finally:
            if self.phase == "deferred":
                self.phase, self.stage = previous

    def complete(self) -> None:
        """The manifest is written: from now on a signal ends the process with 0."""
        self.phase, self.stage = "complete", "clean-up"

    def finish(self, code: int) -> None:
        """The process's exit code is decided: ignore SIGTERM and SIGINT from now on. While the interpreter shuts
        down (threads joined, modules torn down: a few tenths of a second after a run) no Python handler runs, and
        CPython gives a handled signal its default action back, so a signal then would end the process as killed by
        it (-15; 143 in a pod) instead of with `code`; an ignored signal stays ignored."""
        self.phase, self.code = "finished", code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        # Runs between two bytecodes of whatever the main thread does: it decides, and raises nothing.
        name = signal.Signals(signum).name
        if self.phase == "finished":  # came in just before finish() ignored it: the decided code stands
            self._flush()
            os._exit(self.code)
        if self.phase == "complete":
            self._exit_now(SUCCESS, f"stopped by {name} after the run was published; the next attempt with this run "
                                    "id removes its checkpoints", level="warning")
        if self.phase == "immediate":
            self._exit_now(INTERRUPTED, f"stopped by {name} during {self.stage}")
        if self.requested:
            what = "the checkpoint was saved" if self.stage == "training" else f"{self.stage} finished"
            self._exit_now(INTERRUPTED, f"stopped by a second signal ({name}) before {what}")
        self.requested = name
        what = ("finishing this step and saving a checkpoint" if self.stage == "training"
                else f"finishing {self.stage} first")
        self._say("warning", f"stop requested: {what}", signal=name, budget_s=self.grace)
        threading.Thread(target=self._watchdog, daemon=True, name="sigterm-watchdog").start()

    def _watchdog(self) -> None:
        time.sleep(self.grace)
        if self.phase in ("complete", "finished"):
            return
        what, outcome = ("the checkpoint could not be saved", "the last periodic checkpoint stands") \
            if self.stage == "training" else (f"{self.stage} could not finish", "a retry resumes")
        self._exit_now(INTERRUPTED, f"stopped by {self.requested}; {what} within "
                                    f"FT_TERMINATION_GRACE_SECONDS={self.grace:g}, {outcome}")

    def _exit_now(self, code: int, reason: str, level: str = "error") -> None:
        self._say(level, reason, exit_code=code, reason="success" if code == SUCCESS else "interrupted")
        if code != SUCCESS:
            self.on_exit(f"interrupted: {reason}")
        self._flush()
        os._exit(code)

    @staticmethod
    def _flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a stream busy in the interrupted code: its tail is lost
                pass

    @staticmethod
    def _say(level: str, message: str, **fields) -> None:
        """Log through job.log once it is set up, else one JSON line on stderr; never raise (the interrupted code
        may be writing to the same stream)."""
        try:
            log = sys.modules.get("job.log")
            if log is not None and log.is_configured():
                getattr(log.get(), level)(message, **fields)
                return
            line = json.dumps({"event": message, "level": level, **fields}) + "\n"
            os.write(2, line.encode())
        except BaseException:  # noqa: BLE001
            pass


STOPPER = Stopper()


def install() -> Stopper:
    """Install the process's Stopper (idempotent) and return it."""
    STOPPER.install()
    return STOPPER
