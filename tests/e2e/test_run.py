"""The real CLI as a subprocess, on the tiny model and the sample data, configured only by environment variables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, ROOT
from job.errors import CODE_BY_NAME

HF_SECRET = "hf_SECRETsecretSECRETsecret1234567"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"


def run_job(env: dict[str, str], tmp: Path, *args: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ["PATH"], "HOME": str(tmp), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
        "FT_WORK_DIR": str(tmp / "work"), "FT_OUTPUT_URI": str(tmp / "out"), "FT_LOG_FORMAT": "json",
        "FT_TERMINATION_LOG": str(tmp / "termination-log"), "OMP_NUM_THREADS": "2",
    }
    return subprocess.run([sys.executable, "-m", "job", *args], env={**base, **env}, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def events(proc: subprocess.CompletedProcess) -> list[dict]:
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def interrupt_at(env: dict[str, str], marker: str, timeout: float = 120) -> int:
    """Run the CLI, send SIGTERM at the first log line containing `marker`, and return its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    return proc.wait(timeout=timeout)


def demo_env(model: Path, **extra: str) -> dict[str, str]:
    env = dict(line.split("=", 1) for line in (ROOT / "examples" / "tiny.env").read_text().splitlines()
               if line and not line.startswith("#"))
    env.update(FT_BASE_MODEL=str(model), FT_DATASET=str(DATA / "sample-text.jsonl"), FT_RUN_ID="demo")
    env.pop("FT_WORK_DIR"), env.pop("FT_OUTPUT_URI")
    return {**env, **extra}


@pytest.fixture(scope="module")
def demo(tiny_model, tmp_path_factory):
    """One full run of the embedded default, with credentials in the environment that must not leak."""
    tmp = tmp_path_factory.mktemp("demo")
    proc = run_job(demo_env(tiny_model, HF_TOKEN=HF_SECRET, AWS_SECRET_ACCESS_KEY=AWS_SECRET), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, tmp / "out" / "demo", proc


def test_learning_happened(demo):
    _, run_dir, proc = demo
    metrics = json.loads((run_dir / "manifest.json").read_text())["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5, metrics
    finished = [e for e in events(proc) if e["event"] == "run finished"][0]
    assert finished["eval_loss_after"] == pytest.approx(metrics["eval_loss_after"], abs=1e-3)
    # the loss before training is the Trainer's evaluation at step 0, inside train(), computed as every later one is
    # (a GPU run's evaluate() before train() ran without Liger's kernels and read 1% low: bench/RESULTS.md run 16)
    first = [e for e in events(proc) if e["event"] == "eval"][0]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(metrics["eval_loss_before"], abs=1e-4)


def test_log_is_json_lines_with_progress_events(demo):
    _, _, proc = demo
    steps = [e for e in events(proc) if e["event"] == "train step"]
    assert len(steps) >= 5
    for e in steps:
        assert {"step", "epoch", "loss", "learning_rate", "tokens_per_s", "eta_s"} <= e.keys()
        assert e["tokens_per_s"] > 0
    assert all(line.startswith("{") for line in proc.stdout.splitlines() if line.strip())


def test_peft_loads_the_adapter_onto_the_base_model_and_it_generates(demo, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = demo
    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt = tok("[INST] Write 12 in words. [/INST]", return_tensors="pt")
    with torch.no_grad():
        before = base(**prompt).logits
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        after = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not torch.allclose(before, after, atol=1e-3)  # the adapter changes the model
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (64, 16, 0.1)


def test_tensorboard_reader_parses_the_logs(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = demo
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(tags), tags
    losses = [s.value for s in acc.Scalars("train/loss")]
    assert len(losses) >= 5 and losses[-1] < losses[0]


def test_manifest_is_complete_and_checksums_match(demo):
    from job.fetch import file_sha256

    _, run_dir, _ = demo
    manifest = json.loads((run_dir / "manifest.json").read_text())
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer/tokenizer.json",
            "README.md"} <= on_disk
    for rel, entry in manifest["files"].items():
        assert file_sha256(run_dir / rel) == entry["sha256"], rel
    assert manifest["dataset"]["revision"].startswith("sha256:")
    assert manifest["config"]["lora_r"] == 64
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= manifest["versions"].keys()
    assert manifest["placement"] == {"device": "cpu", "dtype": "fp32", "gpu": None, "processes": 1, "strategy": None}


def test_model_card_describes_the_run(demo):
    _, run_dir, _ = demo
    card = (run_dir / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "nf4" in card and "r=64, alpha=16" in card
    # adapter/README.md: the same card instead of peft's placeholder, its links and snippet pointing from there
    adapter_card = (run_dir / "adapter" / "README.md").read_text()
    assert adapter_card.startswith("---\n") and "r=64, alpha=16" in adapter_card
    # (the base model is a local path here: loaded from it, then the adapter onto it)
    assert 'PeftModel.from_pretrained(base, ".")' in adapter_card and 'from_pretrained("../tokenizer")' in adapter_card
    assert "](loss.png)" in card and "](../loss.png)" in adapter_card and "`../manifest.json`" in adapter_card


def test_secrets_reach_no_output(demo):
    tmp, run_dir, proc = demo
    texts = [proc.stdout, proc.stderr] + [p.read_bytes().decode("latin-1") for p in run_dir.rglob("*") if p.is_file()]
    for text in texts:
        assert HF_SECRET not in text and AWS_SECRET not in text


def test_success_writes_no_termination_log(demo):
    tmp, _, _ = demo
    assert not (tmp / "termination-log").exists()


def test_a_completed_run_is_not_overwritten(demo, tiny_model):
    """The same run again (a retried Job) finds it complete and ends at once; other training settings under its run
    id are a configuration error. Neither touches the published run."""
    tmp, run_dir, _ = demo
    before = (run_dir / "manifest.json").stat().st_mtime_ns
    proc = run_job(demo_env(tiny_model, FT_OVERWRITE="false"), tmp)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "run already complete: nothing to train" in proc.stdout and "training started" not in proc.stdout
    proc = run_job(demo_env(tiny_model, FT_OVERWRITE="false", FT_LEARNING_RATE="0.001"), tmp)
    assert proc.returncode == CODE_BY_NAME["config"]
    assert "FT_RUN_ID=demo: a completed run with other training settings (FT_LEARNING_RATE: " in proc.stdout
    assert "0.001 now) already exists" in proc.stdout
    # FT_EXPORT is not a training setting, but a merged model the run was published without is not there to find
    proc = run_job(demo_env(tiny_model, FT_OVERWRITE="false", FT_EXPORT="merged"), tmp)
    assert proc.returncode == CODE_BY_NAME["config"], proc.stdout[-2000:]
    assert "FT_EXPORT=merged: the completed run at" in proc.stdout and "without a merged model" in proc.stdout
    assert (run_dir / "manifest.json").stat().st_mtime_ns == before


def test_overwrite_replaces_a_completed_run_and_leaves_none_of_its_files(demo, tiny_model):
    tmp, run_dir, _ = demo
    stale = run_dir / "tensorboard" / "events.out.tfevents.stale"
    stale.write_text("from an earlier run")
    proc = run_job(demo_env(tiny_model, FT_OVERWRITE="true", FT_MAX_STEPS="2"), tmp)
    assert proc.returncode == 0, proc.stdout[-2000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 2
    assert not stale.exists()
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}


def hub_cache(hf_home: Path, repo_type: str, repo_id: str, files: list[Path]) -> str:
    """Lay `files` out as huggingface_hub's cache holds a downloaded repo at `main`; return the commit."""
    import hashlib
    import shutil

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(f, snapshot)
    return commit


def test_hub_sources_and_chat_format_run_end_to_end(tiny_model, tmp_path):
    """Model and dataset by Hub id, served from HF_HOME's cache (offline, as on a node with a warm cache volume):
    the real snapshot_download path, and the commits recorded in the manifest."""
    model_commit = hub_cache(tmp_path / "hf", "model", "acme/tiny-llama", list(tiny_model.iterdir()))
    data_commit = hub_cache(tmp_path / "hf", "dataset", "acme/chat-sample", [DATA / "sample-chat.jsonl"])
    proc = run_job(demo_env(tiny_model, FT_BASE_MODEL="acme/tiny-llama", FT_DATASET="hf://datasets/acme/chat-sample",
                            FT_MAX_STEPS="6", FT_EVAL_STEPS="3", FT_LOGGING_STEPS="3"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = json.loads((tmp_path / "out" / "demo" / "manifest.json").read_text())
    assert (manifest["model"]["revision"], manifest["dataset"]["revision"]) == (model_commit, data_commit)
    assert manifest["data"]["format"] == "chat"
    assert manifest["data"]["trained_tokens"] < manifest["data"]["train_tokens"]  # prompts masked
    assert manifest["training"]["steps"] == 6


def test_hub_revision_not_available_is_an_input_error(tiny_model, tmp_path):
    hub_cache(tmp_path / "hf", "model", "acme/tiny-llama", list(tiny_model.iterdir()))
    proc = run_job(demo_env(tiny_model, FT_BASE_MODEL="acme/tiny-llama", FT_MODEL_REVISION="v2"), tmp_path)
    assert proc.returncode == CODE_BY_NAME["input"]
    assert "FT_BASE_MODEL=acme/tiny-llama: not in the local cache" in proc.stdout


@pytest.mark.parametrize("env, code, message", [
    ({"FT_BASE_MODEL": "/nonexistent/model"}, "input", "FT_BASE_MODEL=/nonexistent/model: no such file or directory"),
    ({"FT_DATASET": "/nonexistent/data.jsonl"}, "input", "FT_DATASET=/nonexistent/data.jsonl: no such file"),
    ({"FT_DATASET": "pyproject.toml"}, "config", "FT_DATASET=pyproject.toml: unsupported file type .toml"),
    ({"FT_BASE_MODEL": "some-org/some-model"}, "input", "FT_BASE_MODEL=some-org/some-model: not in the local cache"),
    ({"FT_OUTPUT_URI": "gs://bucket/prefix"}, "config", "FT_OUTPUT_URI=gs://bucket/prefix: gs:// is not supported"),
    ({"FT_DATASET_FORMAT": "chat"}, "config", "FT_DATASET_FORMAT: the chat format needs column(s) ['messages']"),
    ({"FT_COMPUTE_DTYPE": "bf16"}, "config", "FT_COMPUTE_DTYPE=bf16: quantized layers compute in fp32 on the CPU"),
    # no sample can train at one token: was exit 3 ("no training sample has a token to learn from") after the data
    ({"FT_MAX_SEQ_LENGTH": "1"}, "config", "FT_MAX_SEQ_LENGTH=1: input should be greater than or equal to 2"),
    # trained without evaluation, silently
    ({"FT_MAX_SAMPLES": "1"}, "config", "FT_MAX_SAMPLES=1: too few records to hold out FT_EVAL_FRACTION=0.1"),
])
def test_bad_input_exit_code_and_one_line_reason(tiny_model, tmp_path, env, code, message):
    proc = run_job(demo_env(tiny_model, **env), tmp_path)
    assert proc.returncode == CODE_BY_NAME[code], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [e for e in events(proc) if e["level"] == "error"]
    assert len(errors) == 1 and message in errors[0]["event"], errors
    assert (tmp_path / "termination-log").read_text().startswith(f"{code}: ")
    assert not (tmp_path / "out" / "demo").exists()


def test_model_without_safetensors_is_refused(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    proc = run_job(demo_env(model), tmp_path)
    assert proc.returncode == CODE_BY_NAME["input"]
    assert "no *.safetensors weights" in proc.stdout


def test_check_command_validates_without_training(tiny_model, tmp_path):
    ok = run_job(demo_env(tiny_model), tmp_path, "check")
    assert ok.returncode == 0, ok.stdout
    missing = run_job(demo_env(tiny_model, FT_DATASET="/nonexistent.jsonl"), tmp_path, "check")
    assert missing.returncode == CODE_BY_NAME["input"]
    assert "FT_DATASET=/nonexistent.jsonl: no such file" in missing.stdout
    assert not (tmp_path / "work").exists()


def test_sigterm_stops_the_run_with_the_interrupted_code(tiny_model, tmp_path):
    env = {**os.environ, "FT_WORK_DIR": str(tmp_path / "work"), "FT_OUTPUT_URI": str(tmp_path / "out"),
           "FT_LOG_FORMAT": "json", "FT_TERMINATION_LOG": str(tmp_path / "termination-log"), "HF_HUB_OFFLINE": "1",
           **demo_env(tiny_model, FT_LOGGING_STEPS="1")}
    assert interrupt_at(env, '"train step"', timeout=60) == CODE_BY_NAME["interrupted"]
    assert (tmp_path / "termination-log").read_text().startswith("interrupted: stopped by SIGTERM")
    assert not (tmp_path / "out" / "demo" / "manifest.json").exists()


def test_a_console_run_logs_each_step_once_in_its_format(tiny_model, tmp_path):
    """transformers' progress bar also wrote every log as a raw dict (`{'loss': '6.333', ...}`) beside the job's
    `train step` events."""
    proc = run_job(demo_env(tiny_model, FT_LOG_FORMAT="console", FT_MAX_STEPS="3", FT_LOGGING_STEPS="1",
                            FT_SAMPLE_COUNT="0"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert out.count("train step") == 3 and "{'loss'" not in out and "'eval_loss'" not in out, out[-3000:]
