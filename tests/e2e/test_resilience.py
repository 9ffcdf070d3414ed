"""Preemption: SIGTERM saves and resumes exactly, kill -9 mid-mirror falls back, divergence and preflight codes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_run import demo_env, events, run_job

from conftest import ROOT
from job.errors import CODE_BY_NAME

STEPS = "12"


def resumable_env(model: Path, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ, "HOME": str(tmp), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
        "FT_WORK_DIR": str(tmp / "work"), "FT_OUTPUT_URI": str(tmp / "out"), "FT_LOG_FORMAT": "json",
        "FT_TERMINATION_LOG": str(tmp / "termination-log"), "OMP_NUM_THREADS": "2",
        **demo_env(model, FT_MAX_STEPS=STEPS, FT_LOGGING_STEPS="1", FT_EVAL_STEPS="100", FT_SAVE_MINUTES="0"),
        **extra,
    }


def start(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def losses(lines: list[str]) -> dict[int, float]:
    found = {}
    for line in lines:
        if line.startswith("{"):
            e = json.loads(line)
            if e["event"] == "train step":
                found[e["step"]] = e["loss"]
    return found


def adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run([sys.executable, "-m", "job"], env=resumable_env(tiny_model, tmp), capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = json.loads((tmp / "out" / "demo" / "manifest.json").read_text())
    return losses(proc.stdout.splitlines()), adapter(tmp / "out" / "demo"), manifest


def test_sigterm_saves_and_a_restart_resumes_exactly(tiny_model, tmp_path, uninterrupted):
    import torch

    expected_losses, expected_adapter, expected_manifest = uninterrupted
    env = resumable_env(tiny_model, tmp_path)
    seed = random.randrange(10**6)
    stop_after = random.Random(seed).randint(2, 8)
    print(f"SIGTERM after step {stop_after} (seed {seed})")  # shown when the test fails
    proc, first = start(env), []
    for line in proc.stdout:
        first.append(line)
        if '"train step"' in line and json.loads(line)["step"] >= stop_after:
            proc.send_signal(signal.SIGTERM)
            break
    first += proc.stdout.readlines()
    assert proc.wait(timeout=120) == CODE_BY_NAME["interrupted"], "".join(first[-20:])
    saved = [json.loads(x)["step"] for x in first if '"checkpoint mirrored"' in x]
    assert len(saved) == 1 and saved[0] >= stop_after
    assert (tmp_path / "termination-log").read_text().startswith("interrupted: stopped by SIGTERM")
    assert any('"starting fresh"' in x for x in first)
    # Left under the run's prefix by an earlier attempt (a partial upload, a stray file): not the run's.
    run_dir = tmp_path / "out" / "demo"
    for stray in ("tensorboard/events.out.tfevents.0.gone.1.0", ".adapter_model.safetensors.x.partial"):
        (run_dir / stray).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / stray).write_text("stale")

    second = subprocess.run([sys.executable, "-m", "job"], env=env, capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    resumed = [e for e in events(second) if e["event"].startswith("resumed from step")]
    assert resumed and resumed[0]["step"] == saved[0]
    after = losses(second.stdout.splitlines())
    assert min(after) == saved[0] + 1 and max(after) == int(STEPS)
    for step, loss in after.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-4, abs=1e-4), step
    got = adapter(tmp_path / "out" / "demo")
    assert got.keys() == expected_adapter.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected_adapter[name], rtol=1e-4, atol=1e-5)
    # A run that ends normally leaves no checkpoint and no `latest` behind.
    assert not (tmp_path / "out" / "demo" / "checkpoints").exists()
    manifest_describes_the_whole_run(run_dir, saved[0], expected_manifest)


def manifest_describes_the_whole_run(run_dir: Path, resumed_at: int, uninterrupted: dict) -> None:
    """Exactly the listed files; both attempts' TensorBoard files, which together cover every step once; the
    figures over both attempts."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    manifest = json.loads((run_dir / "manifest.json").read_text())
    found = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert found == set(manifest["files"]) | {"manifest.json"}
    event_files = sorted(f for f in manifest["files"] if f.startswith("tensorboard/events.out.tfevents"))
    steps, training_files = [], set()  # (the last attempt also writes its sample answers' text in a file of its own)
    for name in event_files:
        for event in EventFileLoader(str(run_dir / name)).Load():
            if any(v.tag == "train/loss" for v in event.summary.value):
                steps.append(event.step)
                training_files.add(name)
    assert len(training_files) == 2, event_files  # one per attempt
    assert sorted(steps) == list(range(1, int(STEPS) + 1))  # logged every step (FT_LOGGING_STEPS=1), none twice
    training = manifest["training"]
    assert training["steps"] == int(STEPS) and training["resumes"] == 1
    assert training["resumed_from_steps"] == [resumed_at]
    assert [a["resumed_from"] for a in training["attempts"]] == [None, resumed_at]
    assert [a["ended_at_step"] for a in training["attempts"]] == [resumed_at, int(STEPS)]
    assert all(a["seconds"] > 0 for a in training["attempts"])
    assert manifest["metrics"]["train_loss"] == pytest.approx(uninterrupted["metrics"]["train_loss"], rel=1e-4)
    assert manifest["metrics"]["eval_loss_before"] == uninterrupted["metrics"]["eval_loss_before"]
    card = (run_dir / "README.md").read_text()
    assert f"{STEPS} steps in 2 attempts, resumed from step {resumed_at}" in card


def test_kill_9_while_mirroring_resumes_from_the_previous_complete_checkpoint(tiny_model, tmp_path):
    env = resumable_env(tiny_model, tmp_path, FT_SAVE_STEPS="3", SLOW_CHECKPOINT_PUT="0.4",
                        PYTHONPATH=f"{ROOT / 'tests' / 'e2e' / 'slow_checkpoints'}:{ROOT}")
    proc, mirroring = start(env), 0
    for line in proc.stdout:
        if '"mirroring checkpoint"' in line:
            mirroring += 1
            if mirroring == 2:  # checkpoint-3 is complete, checkpoint-6 is being uploaded
                time.sleep(1.0)
                proc.kill()
                break
    proc.wait(timeout=60)
    remote = tmp_path / "out" / "demo" / "checkpoints"
    assert json.loads((remote / "latest").read_text())["step"] == 3
    assert (remote / "checkpoint-6").is_dir() and not (remote / "checkpoint-6" / "checkpoint.json").exists()

    env.pop("SLOW_CHECKPOINT_PUT")
    second = subprocess.run([sys.executable, "-m", "job"], env=env, capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    found = events(second)
    assert any(e["event"] == "skipping incomplete checkpoint" and e["step"] == 6 for e in found)
    assert [e["step"] for e in found if e["event"].startswith("resumed from step")] == [3]


def test_non_finite_loss_ends_with_the_diverged_code(tiny_model, tmp_path):
    proc = run_job(demo_env(tiny_model, FT_LEARNING_RATE="1e30", FT_LOGGING_STEPS="1", FT_MAX_STEPS="20",
                            FT_SAVE_STEPS="1"), tmp_path)
    assert proc.returncode == CODE_BY_NAME["diverged"], proc.stdout[-2000:]
    error = [e for e in events(proc) if e["level"] == "error"][0]["event"]
    assert "training diverged" in error and "FT_LEARNING_RATE" in error and "FT_MAX_GRAD_NORM" in error
    assert "FT_COMPUTE_DTYPE" not in error  # the CPU computes in fp32 already; bf16 is refused there
    steps = [e["step"] for e in events(proc) if e["event"] == "train step"]
    assert max(steps) < 20
    mirrored = [e["step"] for e in events(proc) if e["event"] == "checkpoint mirrored"]
    assert max(mirrored, default=0) < max(steps)  # the diverged state is not saved


@pytest.mark.parametrize("env, code, message", [
    ({"FT_OUTPUT_URI": "/etc/hostname/out"}, "input", "FT_OUTPUT_URI=/etc/hostname/out: not writable"),
    ({"FT_CHECKPOINT_URI": "/etc/hostname/ckpt"}, "input", "FT_CHECKPOINT_URI=/etc/hostname/ckpt: not writable"),
    ({"FT_REQUIRE_GPU": "true"}, "config", "FT_REQUIRE_GPU=true: no CUDA GPU is visible"),
    ({"FT_DATASET": "/nonexistent/data"}, "input", "FT_DATASET=/nonexistent/data: no such file or directory"),
    # Found by `check` too, not only by the run after the model is loaded (exit 2) or by a traceback (exit 1).
    ({"FT_DATASET": "/etc/hostname"}, "config", "FT_DATASET=/etc/hostname: unsupported file type (none); valid: "),
    ({"FT_WORK_DIR": "/etc/hostname/work"}, "input", "FT_WORK_DIR=/etc/hostname/work: /etc/hostname is a file"),
])
def test_preflight_failures_are_fast_and_coded(tiny_model, tmp_path, env, code, message):
    for command in ("check", "run"):
        started = time.monotonic()
        proc = run_job(demo_env(tiny_model, **env), tmp_path, command)
        # Seconds: the failure comes before any source is fetched or the model loaded. The time bound only guards
        # against a hang (the suite may share two cores with other work); on an idle machine this takes about 5 s.
        assert time.monotonic() - started < 60
        assert proc.returncode == CODE_BY_NAME[code], proc.stdout[-2000:]
        assert message in proc.stdout
        assert '"source ready"' not in proc.stdout and '"loading model"' not in proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
        assert not (tmp_path / "out").exists()  # nothing half-written at the destination


@pytest.mark.parametrize("second_signal, grace, reason", [
    (True, "25", "stopped by a second signal (SIGTERM) before the checkpoint was saved"),
    (False, "1", "the checkpoint could not be saved within FT_TERMINATION_GRACE_SECONDS=1"),
])
def test_a_save_that_cannot_finish_exits_at_once_and_says_so(tiny_model, tmp_path, second_signal, grace, reason):
    env = resumable_env(tiny_model, tmp_path, FT_TERMINATION_GRACE_SECONDS=grace, SLOW_CHECKPOINT_PUT="1",
                        PYTHONPATH=f"{ROOT / 'tests' / 'e2e' / 'slow_checkpoints'}:{ROOT}")
    proc = start(env)
    for line in proc.stdout:
        if '"train step"' in line:
            proc.send_signal(signal.SIGTERM)
            break
    for line in proc.stdout:
        if '"mirroring checkpoint"' in line:  # the save has begun and will take ~11 s
            if second_signal:
                proc.send_signal(signal.SIGTERM)
            break
    started = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == CODE_BY_NAME["interrupted"]
    assert time.monotonic() - started < 8  # well before the slow save would have finished
    assert reason in (tmp_path / "termination-log").read_text()
    assert reason in rest
