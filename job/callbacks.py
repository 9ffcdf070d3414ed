"""Trainer callbacks: one structured log event per logging step, with throughput, ETA and GPU memory."""

from __future__ import annotations

import math
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from job import distributed, log


class ProgressLog(TrainerCallback):
    """Turn the Trainer's log dicts into `train step` / `eval` events.

    tokens_per_s counts every input token (padding excluded) between two logging steps, from trl's cumulative
    `num_tokens`; ETA extrapolates the mean step time so far.
    """

    def __init__(self):
        self.log = log.get()
        self.start = self.last_time = None
        self.start_step, self.last_tokens = 0, None

    def on_train_begin(self, args, state, control, **kwargs):
        # On a resume, state is restored after this call: the first log sets the baselines.
        self.start = self.last_time = time.monotonic()
        self.start_step, self.last_tokens = None, None
        self.log.info("training started", max_steps=state.max_steps, epochs=args.num_train_epochs)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start_step is None:
            self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if any(k.startswith("eval_") for k in logs):
            self.log.info("eval", step=state.global_step, **{k: _round(v) for k, v in logs.items()})
            return
        if "loss" not in logs:
            return  # the end-of-training summary; the pipeline logs its own
        now = time.monotonic()
        tokens = float(logs.get("num_tokens", 0.0))
        # The first log of a resumed run would count every token seen before the interruption.
        rate = None if self.last_tokens is None and self.start_step else \
            (tokens - (self.last_tokens or 0.0)) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        done = state.global_step - (self.start_step or 0)
        eta = (now - self.start) / done * (state.max_steps - state.global_step) if done > 0 else None
        event = {
            "step": state.global_step, "max_steps": state.max_steps, "epoch": _round(state.epoch),
            "loss": _round(logs.get("loss")), "learning_rate": logs.get("learning_rate"),
            "grad_norm": _round(logs.get("grad_norm")),
            "tokens_per_s": round(rate, 1) if rate is not None else None,
            "eta_s": round(eta) if eta is not None else None,
        }
        if torch.cuda.is_available():
            event["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.log.info("train step", **event)


def _round(v, digits: int = 4):
    if isinstance(v, float) and math.isfinite(v):
        return round(v, digits)
    return v


class ProgressBar(ProgressCallback):
    """transformers' progress bar on a console, without the raw log dicts it writes under the bar at every log
    (`{'loss': '6.333', ...}`): ProgressLog logs them as events."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class SaveTimer(TrainerCallback):
    """Ask for a checkpoint when FT_SAVE_MINUTES have passed since the last one."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and time.monotonic() - self.last >= self.seconds:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class CheckpointMirror(TrainerCallback):
    """Mirror each checkpoint the Trainer saves to the checkpoint store (job.checkpoints)."""

    def __init__(self, store):
        self.store = store

    def on_save(self, args, state, control, model=None, **kwargs):
        from pathlib import Path

        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Each process saved its RNG state on its own node: rank 0 collects them, so that every rank resumes exactly.
        distributed.gather_files([local / f"rng_state_{distributed.rank()}.pth"], local)
        # A time- or step-based save can fall between the logging steps DivergenceGuard watches. Every process checks
        # its own (under FSDP: sharded) weights, and all agree.
        (nonfinite,) = distributed.any_rank(not _finite(model))
        if nonfinite:
            log.get().warning("not mirroring a checkpoint with non-finite weights", step=state.global_step)
        elif args.should_save:  # the main process only
            self.store.mirror(local, state.global_step)
        distributed.barrier()  # no process runs ahead (or exits on a stop) before the checkpoint is complete


def _finite(model) -> bool:
    trained = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    # Under FSDP2 a parameter is a DTensor: check the local shard, without a collective per parameter.
    return all(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in trained)


class GracefulStop(TrainerCallback):
    """After SIGTERM (job.signals.Stopper): end this step with a checkpoint and stop."""

    def __init__(self, stopper):
        self.stopper = stopper

    def on_step_end(self, args, state, control, **kwargs):
        # A signal reaches the processes of one node (a preempted pod), and SaveTimer's clock runs on each process
        # apart: every process stops, and saves, at the same step, or their collectives would no longer match.
        stop, save = distributed.any_rank(self.stopper.requested is not None, bool(control.should_save))
        control.should_save = save
        if stop:
            self.stopper.peer_requested = self.stopper.requested is None
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True


class DivergenceGuard(TrainerCallback):
    """Stop at the first logging step whose loss is NaN or infinite, without saving that state."""

    def __init__(self):
        self.diverged: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            self.diverged = (state.global_step, loss)
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
