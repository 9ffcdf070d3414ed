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
