"""Start-up checks against a store that accepts connections and never answers: the real CLI (`finetune-job check`,
the same checks a run starts with) fails with exit 8 within about a minute, naming the setting and the endpoint,
with the default settings (whose transfers would wait 8 attempts of 60 s: ~8 minutes on S3, forever on the Hub)."""

from __future__ import annotations

import time

import pytest
from servers import DUMMY_KEYS, SilentServer
from test_remote import the_error
from test_run import run_job

from conftest import DATA
from job.errors import CODE_BY_NAME

BOUND_S = 90  # a behaviour bound, not a benchmark: measured ~22 s (S3) and ~37 s (Hub) on two busy cores


@pytest.fixture(scope="module")
def silent():
    server = SilentServer()
    yield server
    server.stop()


def timed_check(env: dict[str, str], tmp_path) -> tuple[float, object]:
    start = time.monotonic()
    proc = run_job(env, tmp_path, "check")
    return time.monotonic() - start, proc


def test_a_silent_s3_destination_fails_the_start_up_check_within_a_minute(silent, tiny_model, tmp_path):
    seconds, proc = timed_check({"FT_BASE_MODEL": str(tiny_model), "FT_DATASET": str(DATA / "sample-text.jsonl"),
                                 "FT_OUTPUT_URI": "s3://results/runs", "AWS_ENDPOINT_URL": silent.url,
                                 "AWS_REGION": "us-east-1", **DUMMY_KEYS}, tmp_path)
    assert proc.returncode == CODE_BY_NAME["unavailable"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seconds < BOUND_S
    error = the_error(proc)
    assert "FT_OUTPUT_URI=s3://results/runs" in error and silent.url in error, error
    assert silent.accepted, "the check never reached the endpoint"


def test_a_silent_hub_fails_the_start_up_check_within_a_minute(silent, tmp_path):
    seconds, proc = timed_check({"FT_BASE_MODEL": "acme/silent-model", "FT_DATASET": str(DATA / "sample-text.jsonl"),
                                 "HF_ENDPOINT": silent.url, "HF_HUB_OFFLINE": "0",
                                 "HF_HUB_DISABLE_TELEMETRY": "1"}, tmp_path)
    assert proc.returncode == CODE_BY_NAME["unavailable"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seconds < BOUND_S
    error = the_error(proc)
    assert "FT_BASE_MODEL=acme/silent-model" in error and silent.url in error, error
