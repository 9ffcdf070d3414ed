"""Start-up checks ask stores with short timeouts and few attempts; transfers keep the settings' patience."""

from __future__ import annotations

import time

import pytest
from servers import SilentServer

from job.storage import S3Storage, StorageOptions
from job.storage.base import CHECK_ATTEMPTS, CHECK_DEADLINE_SECONDS, CHECK_TIMEOUT_SECONDS


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.stop()


def test_checks_are_bounded_and_transfers_keep_the_settings():
    options = StorageOptions()  # the settings' defaults: 8 attempts of 60 s, an hour per transfer
    store = S3Storage("s3://bucket/prefix", options)
    checks = store.for_checks()
    assert (checks.options.storage_attempts, checks.options.storage_timeout_seconds,
            checks.options.storage_deadline_seconds) == (CHECK_ATTEMPTS, CHECK_TIMEOUT_SECONDS, CHECK_DEADLINE_SECONDS)
    assert store.options == options and not store.options.checking  # the store used for transfers is unchanged
    lower = StorageOptions(storage_attempts=1, storage_timeout_seconds=2).for_checks()
    assert (lower.storage_attempts, lower.storage_timeout_seconds) == (1, 2)  # a lower setting applies to checks


def test_a_silent_s3_endpoint_fails_a_check_within_its_bounds(silent, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = S3Storage("s3://bucket/prefix", StorageOptions(storage_timeout_seconds=0.5)).for_checks()
    start = time.monotonic()
    with pytest.raises(OSError, match=f"{silent.url}.*after 2 attempts of 0.5 s .the start-up check's bounds"):
        store.list()
    assert time.monotonic() - start < 5


def test_hub_requests_without_a_timeout_of_their_own_get_the_bound(silent, monkeypatch):
    """huggingface_hub's HfApi calls pass timeout=None (its client has none either): without the bound a silent
    Hub holds a request forever."""
    from huggingface_hub import constants, get_session

    from job.storage import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite's default; this test talks to loopback

    with hub.timeout(0.3):
        start = time.monotonic()
        with pytest.raises(Exception, match="(?i)timed out") as e:
            get_session().get(f"{silent.url}/api/models/acme/x", timeout=None)
        assert "Timeout" in type(e.value).__name__ and time.monotonic() - start < 3
    with hub.timeout(5, deadline_seconds=0.01):
        time.sleep(0.05)
        with pytest.raises(hub.HubDeadline, match=silent.url):
            get_session().get(f"{silent.url}/api/models/acme/x")
    assert hub._deadline is None  # the bounds end with the block


def test_credentials_left_at_the_examples_placeholder_are_refused(monkeypatch):
    """k8s/secret.example.yaml sets every key to REPLACE_ME and its README calls the keys optional: a user on IRSA who
    filled in only HF_TOKEN shipped AWS_ACCESS_KEY_ID=REPLACE_ME, which boto3 uses before the pod's role."""
    from job.errors import ConfigError
    from job.config_sources import check_credentials

    env = {"HF_TOKEN": "hf_real", "AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}
    with pytest.raises(ConfigError) as info:
        check_credentials(env)
    assert [p.split(":")[0] for p in info.value.problems] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert "still the examples' placeholder value" in info.value.problems[0]
    check_credentials({"HF_TOKEN": "hf_real"})  # unset keys are the library's business


def test_a_placeholder_credential_is_named_before_the_destination_is_read(tmp_path):
    """`check` and `run` read the destination (a completed run?) before the preflight checks: boto3 signed that read
    with the placeholder and the job failed on the storage error instead."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "FT_OUTPUT_URI": "s3://bucket/runs",
           "AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME", "AWS_EC2_METADATA_DISABLED": "true",
           "FT_TERMINATION_LOG": str(tmp_path / "reason")}
    for command in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "job", command], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        # (the value itself is redacted from the log, as every credential's is)
        assert "AWS_ACCESS_KEY_ID: still the examples' placeholder value" in proc.stdout + proc.stderr
