"""Idempotent completion and the end of a run: a complete run is not trained again, a clean-up cut short (SIGTERM,
kill -9, a storage error) does not change the outcome and is finished by the next attempt, and a signal at any
moment of start-up ends with the interrupted code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_remote import s3, s3_env  # noqa: F401 - the module's S3 fixture, shared
from test_resilience import resumable_env, start
from test_run import events, run_job

from conftest import DATA, ROOT
from job.errors import CODE_BY_NAME

SLOW = {"PYTHONPATH": f"{ROOT / 'tests' / 'e2e' / 'slow_checkpoints'}:{ROOT}"}


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job"], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def published_exactly(run_dir: Path) -> dict:
    """The run folder holds exactly the files its manifest lists, each with its checksum."""
    import hashlib

    manifest = json.loads((run_dir / "manifest.json").read_text())
    found = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert found == set(manifest["files"]) | {"manifest.json"}, found ^ (set(manifest["files"]) | {"manifest.json"})
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((run_dir / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    return manifest


def assert_finished_without_training(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [e["event"] for e in events(proc)]
    assert "run already complete: nothing to train" in names
    assert "loading model" not in names and "training started" not in names


@pytest.mark.parametrize("how, delay", [("sigterm", 0.0), ("sigterm", 1.0), ("kill", 1.0)])
def test_a_signal_after_publishing_ends_0_and_the_retry_finishes_the_clean_up(tiny_model, tmp_path, how, delay):
    env = resumable_env(tiny_model, tmp_path, FT_OVERWRITE="false", FT_SAVE_STEPS="4", SLOW_CHECKPOINT_DELETE="0.3",
                        **SLOW)
    proc = start(env)
    for line in proc.stdout:
        if '"published"' in line:
            time.sleep(delay)  # 0: as the manifest lands; 1 s: inside the (slowed) checkpoint clean-up
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            break
    rest = proc.stdout.read()
    code = proc.wait(timeout=60)
    assert code == (0 if how == "sigterm" else -9), rest[-3000:]
    assert "Traceback" not in rest
    run_dir = tmp_path / "out" / "demo"
    left = [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()]
    if delay:
        assert left, "the signal should have cut the clean-up short"
    manifest = json.loads((run_dir / "manifest.json").read_text())

    env.pop("SLOW_CHECKPOINT_DELETE")
    second = run(env)
    assert_finished_without_training(second)
    assert not (run_dir / "checkpoints").exists()
    assert published_exactly(run_dir) == manifest


def test_a_storage_error_in_the_clean_up_does_not_fail_the_run(s3, tmp_path):  # noqa: F811
    server, proxy = s3
    env = s3_env(server, proxy, FT_RUN_ID="cleanup", FT_SAVE_STEPS="1", FT_STORAGE_ATTEMPTS="2")
    proxy.clear()
    proxy.fail("503", "DELETE", "/results/runs/cleanup/checkpoints/")
    proc = run_job(env, tmp_path)
    proxy.clear()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [e for e in events(proc) if e["event"].startswith("removing the checkpoints failed")]
    assert warnings and warnings[0]["level"] == "warning" and "Traceback" not in proc.stdout + proc.stderr
    client = server.client()
    listed = client.list_objects_v2(Bucket="results", Prefix="runs/cleanup/checkpoints/")
    assert listed.get("KeyCount", 0) > 0

    second = run_job(env, tmp_path)
    assert_finished_without_training(second)
    assert client.list_objects_v2(Bucket="results", Prefix="runs/cleanup/checkpoints/").get("KeyCount", 0) == 0
    assert client.head_object(Bucket="results", Key="runs/cleanup/manifest.json")


def test_a_complete_run_with_other_settings_or_data_stays_a_config_error(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes((DATA / "sample-text.jsonl").read_bytes())
    env = resumable_env(tiny_model, tmp_path, FT_OVERWRITE="false", FT_MAX_STEPS="2", FT_DATASET=str(data))
    assert run(env).returncode == 0

    again = run({**env, "FT_LOGGING_STEPS": "7", "FT_EVAL_STEPS": "9"})  # not what is trained: the same run
    assert_finished_without_training(again)
    other = run({**env, "FT_LEARNING_RATE": "0.001", "FT_LOGGING_STEPS": "7"})
    assert other.returncode == CODE_BY_NAME["config"], other.stdout[-2000:]
    assert ("FT_RUN_ID=demo: a completed run with other training settings (FT_LEARNING_RATE: 0.003 saved, 0.001 "
            "now) already exists") in other.stdout
    data.write_bytes(data.read_bytes() + b'{"text": "one more line"}\n')
    changed = run(env)
    assert changed.returncode == CODE_BY_NAME["config"], changed.stdout[-2000:]
    assert "FT_DATASET: the completed run at" in changed.stdout and "was trained on other data" in changed.stdout
    assert run({**env, "FT_OVERWRITE": "true"}).returncode == 0  # trains again and replaces it


DELAYS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0)


def test_a_signal_at_any_moment_of_start_up_ends_with_the_interrupted_code(tiny_model, tmp_path):
    """Never 1 (an exception inside an import), -15 (before the handler), a crash or a lost signal."""
    outcomes = {}
    for i, delay in enumerate(DELAYS):
        (tmp_path / str(i)).mkdir()
        env = resumable_env(tiny_model, tmp_path / str(i), FT_MAX_STEPS="200")
        proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        outcomes[delay] = proc.returncode
        assert "Traceback" not in out, (delay, out[-3000:])
        if proc.returncode == CODE_BY_NAME["interrupted"]:
            assert (tmp_path / str(i) / "termination-log").read_text().startswith("interrupted: stopped by SIGTERM")
    assert set(outcomes.values()) == {CODE_BY_NAME["interrupted"]}, outcomes
