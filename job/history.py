"""The facts of a run over all its attempts: each attempt's steps and seconds, the resumes, the train loss over every
step, and the TensorBoard event files of the earlier attempts.

They travel in the checkpoint, so that an attempt that resumes (on this node or another) carries them on:

    checkpoint-N/run_history.json   {"attempts": [{"resumed_from": null, "ended_at_step": 5, "seconds": 12.3}, ...],
                                     "eval_loss_before": 6.27}: the attempts before this checkpoint, up to it
    checkpoint-N/tensorboard/...    the run's event files as they were at step N (this attempt's and earlier ones')

The Trainer keeps its log history (every logged loss, with its step) in the checkpoint's trainer_state.json and
restores it on resume; RunHistory makes the Trainer log at every checkpoint and at the last step, so that the logged
losses cover every step and the train loss over the whole run is their step-weighted mean.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from job import log

HISTORY = "run_history.json"
TENSORBOARD = "tensorboard"


class RunHistory(TrainerCallback):
    """Record this attempt into every checkpoint (list it before CheckpointMirror, after GracefulStop and SaveTimer:
    it reads their decision to save). `tensorboard` is the run's event file folder; `writer` its SummaryWriter (None
    on the processes that do not write)."""

    def __init__(self, tensorboard: Path, writer=None):
        self.tensorboard, self.writer = tensorboard, writer
        self.earlier: list[dict] = []  # the attempts before this one, each up to its last checkpoint
        self.eval_loss_before: float | None = None
        self.resumed_from: int | None = None
        self.started = time.monotonic()

    def restore(self, checkpoint: Path, step: int) -> None:
        """Take the history and the TensorBoard files that `checkpoint` (a local copy, saved at `step`) carries."""
        self.resumed_from = step
        saved = checkpoint / HISTORY
        if saved.is_file():
            data = json.loads(saved.read_text())
            self.earlier, self.eval_loss_before = data.get("attempts", []), data.get("eval_loss_before")
        events = checkpoint / TENSORBOARD
        if events.is_dir() and self.writer is not None:
            shutil.copytree(events, self.tensorboard, dirs_exist_ok=True)
        log.get().info(f"resumed from step {step}", step=step, checkpoint=str(checkpoint),
                       attempt=len(self.earlier) + 1)

    def start(self) -> None:
        """Training of this attempt begins now."""
        self.started = time.monotonic()
        if self.resumed_from is None:
            log.get().info("starting fresh", step=0, attempt=1)

    def attempts(self, step: int) -> list[dict]:
        """Every attempt so far, this one up to `step`."""
        now = {"resumed_from": self.resumed_from, "ended_at_step": step,
               "seconds": round(time.monotonic() - self.started, 2)}
        return [*self.earlier, now]

    def on_step_end(self, args, state, control, **kwargs):
        # A checkpoint's (and the run's last) losses are logged, so that the log history covers every step.
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The run's evaluation before training (SFTConfig.eval_on_start, at step 0 of the first attempt): it goes into
        # every checkpoint, so that a resumed attempt reports it too.
        if self.resumed_from is None and state.global_step == 0 and self.eval_loss_before is None:
            self.eval_loss_before = (metrics or {}).get("eval_loss")

    def on_save(self, args, state, control, **kwargs):
        if self.writer is None:
            return
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        data = {"attempts": self.attempts(state.global_step), "eval_loss_before": self.eval_loss_before}
        (local / HISTORY).write_text(json.dumps(data, indent=2) + "\n")
        self.writer.flush()
        if self.tensorboard.is_dir():
            shutil.copytree(self.tensorboard, local / TENSORBOARD, dirs_exist_ok=True)

    def facts(self, log_history: list[dict], step: int) -> dict:
        """The manifest's figures of the whole run: steps, train loss over every logged step, attempts, resumes."""
        attempts = self.attempts(step)
        resumes = [a["resumed_from"] for a in attempts if a["resumed_from"] is not None]
        return {"steps": step, "train_loss": train_loss(log_history), "attempts": attempts,
                "resumes": len(resumes), "resumed_from_steps": resumes,
                "seconds": round(sum(a["seconds"] for a in attempts), 2)}


def train_loss(log_history: list[dict]) -> float | None:
    """The mean training loss over every step the log history covers: each logged loss is the mean over the steps
    since the previous log, so it weighs by that many steps. None when nothing was logged."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > previous:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else None
