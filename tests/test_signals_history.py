"""The signal module's constants agree with the exit codes and settings; the whole-run train loss."""

from __future__ import annotations

import pytest

from job import signals
from job.config import Settings
from job.errors import CODE_BY_NAME
from job.history import train_loss


def test_signal_constants_agree_with_the_exit_codes_and_settings():
    assert (signals.INTERRUPTED, signals.SUCCESS) == (CODE_BY_NAME["interrupted"], CODE_BY_NAME["success"])
    assert signals.DEFAULT_GRACE_SECONDS == Settings.model_fields["termination_grace_seconds"].default
    assert signals.DEFAULT_TERMINATION_LOG == Settings.model_fields["termination_log"].default


def test_the_train_loss_weighs_each_logged_loss_by_the_steps_it_covers():
    # Logged at step 1, 10 (steps 2-10), a checkpoint at 15 (11-15), resumed, 20 (16-20); evaluations in between.
    history = [{"loss": 4.0, "step": 1}, {"loss": 3.0, "step": 10}, {"eval_loss": 9.0, "step": 10},
               {"loss": 2.0, "step": 15}, {"loss": 1.0, "step": 20}, {"train_loss": 0.0, "step": 20}]
    assert train_loss(history) == pytest.approx((4 + 3 * 9 + 2 * 5 + 1 * 5) / 20)
    assert train_loss([]) is None


LATE_SIGNAL = """
import os, signal, sys, threading, time
from job import signals

stopper = signals.install()
# Joined while the interpreter shuts down: the signal lands after the entrypoint has its exit code.
threading.Thread(target=lambda: (time.sleep(0.5), os.kill(os.getpid(), signal.SIGTERM))).start()
stopper.finish(3)  # as job/__main__.py does with cli.main's code
sys.exit(3)
"""


def test_a_signal_after_the_exit_code_is_decided_does_not_change_it(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    log = tmp_path / "termination-log"
    proc = subprocess.run([sys.executable, "-c", LATE_SIGNAL], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "FT_TERMINATION_LOG": str(log)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not log.exists() and "Traceback" not in proc.stderr
