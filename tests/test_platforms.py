"""Batch services' own variables and files: SageMaker's container contract as settings, the run id every attempt of
one job shares, and AWS Batch's multi-node variables as the rendezvous."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from job import cli, distributed
from job.config import Settings, load_settings
from job.errors import ConfigError
from job.identity import resolve_run_id


@pytest.fixture
def sagemaker(monkeypatch, tmp_path):
    """A SageMaker training job's environment: its name, and a config folder with channels `train` and `model`."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "File"},
                                                            "model": {"TrainingInputMode": "File"}}))
    monkeypatch.setenv("TRAINING_JOB_NAME", "ft-2026-11-30")
    monkeypatch.setenv("SM_INPUT_CONFIG_DIR", str(config))
    monkeypatch.delenv("FT_TERMINATION_LOG")
    return config


def test_sagemaker_channels_model_dir_failure_file_and_grace_are_the_defaults(sagemaker):
    cfg = load_settings()
    assert (cfg.dataset, cfg.base_model) == ("/opt/ml/input/data/train", "/opt/ml/input/data/model")
    assert cfg.output_uri == "/opt/ml/model"
    assert str(cfg.termination_log) == "/opt/ml/output/failure" == str(cli.termination_log_path())
    assert cfg.termination_grace_seconds == 110 < 120
    assert resolve_run_id(cfg) == "ft-2026-11-30"


def test_an_empty_termination_log_is_none_not_the_platforms_failure_file(sagemaker, monkeypatch):
    """FT_TERMINATION_LOG="" turns the termination log off, on SageMaker too (it fell back to its failure file)."""
    monkeypatch.setenv("FT_TERMINATION_LOG", "")
    assert load_settings().termination_log is None and cli.termination_log_path() is None


def test_sagemaker_hyperparameters_are_settings_below_the_environment(sagemaker, monkeypatch):
    (sagemaker / "hyperparameters.json").write_text(json.dumps(
        {"lora_r": "16", "FT_LEARNING_RATE": "0.0001", "sagemaker_region": "\"us-east-1\"", "dataset": "s3://b/d/"}))
    monkeypatch.setenv("FT_LORA_R", "8")
    monkeypatch.setenv("SM_MODEL_DIR", "/elsewhere/model")
    cfg = load_settings()
    assert (cfg.lora_r, cfg.learning_rate, cfg.dataset) == (8, 1e-4, "s3://b/d/")
    assert cfg.output_uri == "/elsewhere/model"


def test_an_unknown_or_invalid_hyperparameter_is_a_config_error_naming_it(sagemaker):
    (sagemaker / "hyperparameters.json").write_text(json.dumps({"lora_rr": "16", "lora_dropout": "2"}))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.problems[0] == ("FT_LORA_RR: unknown setting in SageMaker's hyperparameters; did you mean "
                                      "FT_LORA_R?")
    assert any(p.startswith("FT_LORA_DROPOUT=2 in SageMaker's hyperparameters: ") for p in info.value.problems)
    (sagemaker / "hyperparameters.json").write_text("[1]")
    with pytest.raises(ConfigError, match="hyperparameters.json: must hold a JSON object"):
        load_settings()


def test_outside_sagemaker_its_files_are_not_read(sagemaker, monkeypatch):
    (sagemaker / "hyperparameters.json").write_text(json.dumps({"lora_r": "16"}))
    monkeypatch.delenv("TRAINING_JOB_NAME")
    cfg = load_settings()
    assert (cfg.lora_r, cfg.output_uri, cfg.dataset) == (64, "./results", Settings().dataset)


@pytest.mark.parametrize("job_var, attempt_var", [("AWS_BATCH_JOB_ID", "AWS_BATCH_JOB_ATTEMPT"),
                                                  ("BATCH_JOB_UID", "BATCH_TASK_RETRY_ATTEMPT"),
                                                  ("TRAINING_JOB_NAME", None)])
def test_every_attempt_of_one_job_is_the_same_run(monkeypatch, job_var, attempt_var):
    monkeypatch.setenv(job_var, "job-0a1b2c")
    ids = set()
    for attempt in ("1", "2", "3"):
        if attempt_var:
            monkeypatch.setenv(attempt_var, attempt)
        ids.add(resolve_run_id(Settings()))
    assert ids == {"job-0a1b2c"}


def test_sagemakers_train_argument_runs_the_job(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FT_LORA_R": "0", "FT_TERMINATION_LOG": str(tmp_path / "log")}
    done = subprocess.run([sys.executable, "-m", "job", "train"], env=env, capture_output=True, text=True,
                          cwd=cli.Path(cli.__file__).parent.parent, timeout=120)
    assert done.returncode == 2
    assert "FT_LORA_R=0: input should be greater than 0" in done.stdout + done.stderr  # the settings were read


def test_aws_batch_multi_node_variables_make_the_rendezvous(monkeypatch):
    monkeypatch.setenv("FT_NNODES", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("AWS_BATCH_JOB_MAIN_NODE_INDEX", "0")
    monkeypatch.setenv("AWS_BATCH_JOB_NODE_INDEX", "1")
    monkeypatch.setenv("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS", "10.0.1.23")
    args = distributed.torchrun_args(load_settings(), "run-x", nproc=1)
    assert args[args.index("--rdzv-endpoint") + 1] == "10.0.1.23:29500"
    assert "is_host=false" in args[args.index("--rdzv-conf") + 1]
    # The main node is told no address of its own: it hosts the rendezvous under its host name.
    monkeypatch.setenv("AWS_BATCH_JOB_NODE_INDEX", "0")
    monkeypatch.delenv("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS")
    args = distributed.torchrun_args(load_settings(), "run-x", nproc=1)
    assert args[args.index("--rdzv-endpoint") + 1] == f"{socket.gethostname()}:29500"
    assert "is_host=true" in args[args.index("--rdzv-conf") + 1]
