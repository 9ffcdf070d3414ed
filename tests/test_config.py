"""Settings: the guide's defaults, precedence, and every bad input reported at once with its variable named."""

from __future__ import annotations

import subprocess
import sys

import re

import pytest

from job.config import Settings, load_settings
from job.errors import CODE_BY_NAME, ConfigError


def problems(monkeypatch, **env) -> list[str]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    return info.value.problems


def test_defaults_are_the_guides():
    cfg = load_settings()
    assert (cfg.base_model, cfg.dataset) == ("NousResearch/Llama-2-7b-chat-hf", "mlabonne/guanaco-llama2-1k")
    assert (cfg.quantization, cfg.double_quant, cfg.eval_fraction) == ("nf4", False, 0.1)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 16, 0.1)
    assert (cfg.num_train_epochs, cfg.batch_size, cfg.gradient_accumulation_steps) == (1, 4, 1)
    assert (cfg.optim, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm) == ("paged_adamw_32bit", 2e-4, 0.001, 0.3)
    assert (cfg.warmup_ratio, cfg.lr_scheduler_type, cfg.logging_steps, cfg.eval_steps) == (0.03, "cosine", 25, 25)
    assert cfg.trust_remote_code is False
    assert cfg.target_modules is None  # peft's per-architecture default: q_proj, v_proj on Llama, as in the guide


def test_environment_overrides_yaml_file_which_overrides_defaults(monkeypatch, tmp_path):
    f = tmp_path / "settings.yaml"
    f.write_text("lora_r: 16\nFT_LEARNING_RATE: 0.001\nlora_target_modules: all-linear\n")
    monkeypatch.setenv("FT_CONFIG_FILE", str(f))
    monkeypatch.setenv("FT_LORA_R", "8")
    cfg = load_settings()
    assert cfg.lora_r == 8
    assert cfg.learning_rate == 0.001
    assert cfg.target_modules == "all-linear"


def test_target_module_list(monkeypatch):
    monkeypatch.setenv("FT_LORA_TARGET_MODULES", " q_proj, k_proj ,v_proj")
    assert load_settings().target_modules == ["q_proj", "k_proj", "v_proj"]


def test_every_problem_is_reported_together_one_line_each(monkeypatch):
    found = problems(monkeypatch, FT_LORA_R="abc", FT_QUANTIZATION="nf3", FT_EVAL_FRACTION="1.5",
                     FT_OPTIM="adam", FT_LORA_RANK="4")
    assert len(found) == 5
    by_var = {line.split("=")[0].split(":")[0]: line for line in found}
    assert "integer" in by_var["FT_LORA_R"]
    assert "'nf4', 'fp4', 'int8' or 'none'" in by_var["FT_QUANTIZATION"]
    assert "less than 1" in by_var["FT_EVAL_FRACTION"]
    assert "paged_adamw_32bit" in by_var["FT_OPTIM"]
    assert "did you mean FT_LORA_R?" in by_var["FT_LORA_RANK"]
    assert all("\n" not in line for line in found)


def test_sample_prompts_may_be_a_list_in_the_yaml_file(monkeypatch, tmp_path):
    f = tmp_path / "settings.yaml"
    f.write_text('sample_prompts: ["Hi", "Capitalize: kiwi"]\n')
    monkeypatch.setenv("FT_CONFIG_FILE", str(f))
    assert load_settings().sample_prompt_list == ["Hi", "Capitalize: kiwi"]
    f.write_text("sample_prompts: 5\n")
    (line,) = problems(monkeypatch)
    assert line == f'FT_SAMPLE_PROMPTS=5 in FT_CONFIG_FILE={f}: must be a JSON list of non-empty strings, e.g. ["Write 12 in words."]'


def test_unknown_key_in_yaml_file_is_named_with_the_file(monkeypatch, tmp_path):
    f = tmp_path / "settings.yaml"
    f.write_text("learning_rat: 0.1\n")
    (line,) = problems(monkeypatch, FT_CONFIG_FILE=str(f))
    assert line.startswith("FT_LEARNING_RAT: unknown setting in FT_CONFIG_FILE=")
    assert "did you mean FT_LEARNING_RATE?" in line


@pytest.mark.parametrize("name, expected", [
    ("ft_lora_r", "ft_lora_r: unknown setting; setting names are upper-case: FT_LORA_R"),
    ("FT_lora_r", "FT_lora_r: unknown setting; setting names are upper-case: FT_LORA_R"),
    ("ft_lora_rank", "ft_lora_rank: unknown setting; did you mean FT_LORA_R?"),
])
def test_a_setting_name_in_another_case_is_refused_not_silently_read(monkeypatch, name, expected):
    # pydantic-settings alone would read ft_lora_r as FT_LORA_R and ignore a misspelt ft_lora_rank.
    assert problems(monkeypatch, **{name: "8"}) == [expected]


@pytest.mark.parametrize("name, own", [("FT_HF_TOKEN", "HF_TOKEN"), ("FT_AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")])
def test_a_library_variable_given_as_a_setting_points_to_its_own_name(monkeypatch, name, own):
    (line,) = problems(monkeypatch, **{name: "s3cr3t-value"})
    assert line == f"{name}: unknown setting; {own} is not an FT_* setting: set {own} itself in the environment, " \
                   "where its library reads it"


def test_hf_token_in_the_yaml_file_points_to_the_environment_variable(monkeypatch, tmp_path):
    f = tmp_path / "settings.yaml"
    f.write_text("hf_token: hf_abcdefghijklmnopqrstuvwxyz0123\n")
    (line,) = problems(monkeypatch, FT_CONFIG_FILE=str(f))
    assert "set HF_TOKEN itself in the environment" in line and "hf_abcdef" not in line


@pytest.mark.parametrize("content, expected", [
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [b\n", "not readable YAML"),
])
def test_bad_yaml_file(monkeypatch, tmp_path, content, expected):
    f = tmp_path / "settings.yaml"
    f.write_text(content)
    (line,) = problems(monkeypatch, FT_CONFIG_FILE=str(f))
    assert expected in line


def test_missing_yaml_file(monkeypatch, tmp_path):
    (line,) = problems(monkeypatch, FT_CONFIG_FILE=str(tmp_path / "nope.yaml"))
    assert line.endswith("file not found")


def test_a_bad_value_from_the_yaml_file_names_the_file(monkeypatch, tmp_path):
    f = tmp_path / "settings.yaml"
    f.write_text("lora_r: -3\nlearning_rate: 0.001\n")
    monkeypatch.setenv("FT_LEARNING_RATE", "abc")  # the environment's value is reported as the environment's
    found = problems(monkeypatch, FT_CONFIG_FILE=str(f))
    assert f"FT_LORA_R=-3 in FT_CONFIG_FILE={f}: input should be greater than 0" in found
    assert any(line.startswith("FT_LEARNING_RATE=abc: ") for line in found), found


@pytest.mark.parametrize("log_format, console", [("console", True), ("json", False)])
def test_config_errors_are_logged_in_the_format_asked_for(tmp_path, log_format, console):
    """The settings that name the format are not validated yet when a configuration error is logged."""
    env = {"PATH": "/usr/bin:/bin", "FT_LORA_R": "-1", "FT_LOG_FORMAT": log_format,
           "FT_TERMINATION_LOG": str(tmp_path / "term")}
    proc = subprocess.run([sys.executable, "-m", "job", "check"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    (line,) = [x for x in (proc.stdout + proc.stderr).splitlines() if "FT_LORA_R=-1" in x]
    assert line.startswith("{") is not console, line
    assert ("[error" in line) is console, line


def test_cli_reports_config_errors_without_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FT_LORA_R": "-1", "FT_BATCHSIZE": "2",
           "FT_TERMINATION_LOG": str(tmp_path / "term")}
    proc = subprocess.run([sys.executable, "-m", "job", "run"], env=env, capture_output=True, text=True)
    assert proc.returncode == CODE_BY_NAME["config"] == 2
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "FT_LORA_R=-1: input should be greater than 0" in out
    assert "FT_BATCHSIZE: unknown setting; did you mean FT_BATCH_SIZE?" in out
    assert (tmp_path / "term").read_text().startswith("config: ")


def test_an_empty_termination_log_writes_none(tmp_path):
    """FT_TERMINATION_LOG="" means no termination log: it was Path("") in the settings (`config` showed ".") while the
    failure path fell back to /dev/termination-log (or SageMaker's failure file)."""
    from conftest import ROOT

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "FT_LORA_R": "-1", "FT_TERMINATION_LOG": ""}
    proc = subprocess.run([sys.executable, "-m", "job", "run"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
    del env["FT_LORA_R"]
    proc = subprocess.run([sys.executable, "-m", "job", "config"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and '"termination_log": null' in proc.stdout, proc.stdout + proc.stderr


def test_a_termination_log_set_in_the_yaml_file_gets_the_reason(tmp_path):
    """The failure path reads FT_TERMINATION_LOG from the environment (the settings may be what failed); a valid
    setting from FT_CONFIG_FILE was validated and then ignored."""
    from conftest import ROOT

    f = tmp_path / "settings.yaml"
    f.write_text(f"termination_log: {tmp_path / 'reason'}\ndataset: {tmp_path / 'missing.jsonl'}\n"
                 f"output_uri: {tmp_path / 'out'}\nbase_model: {tmp_path / 'no-model'}\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "FT_CONFIG_FILE": str(f)}
    proc = subprocess.run([sys.executable, "-m", "job", "check"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode in (2, 3), proc.stdout + proc.stderr  # a missing model or dataset, found by `check`
    assert (tmp_path / "reason").read_text().split(":")[0] in ("config", "input"), proc.stdout + proc.stderr


def test_config_command_prints_effective_settings_with_secrets_redacted(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FT_LORA_R": "8", "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz0123",
           "FT_DATASET": "acme/hf_abcdefghijklmnopqrstuvwxyz0123"}
    proc = subprocess.run([sys.executable, "-m", "job", "config"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"lora_r": 8' in proc.stdout and '"dataset": "acme/***"' in proc.stdout
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in proc.stdout
    # A refused setting is quoted in the error, redacted too.
    env["FT_BASE_MODEL"] = "https://user:hunter22@example.com/model hf_abcdefghijklmnopqrstuvwxyz0123"
    proc = subprocess.run([sys.executable, "-m", "job", "config"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "FT_BASE_MODEL=https://***@example.com/model ***: https:// is not" in proc.stderr
    assert "hunter22" not in proc.stdout + proc.stderr and "hf_abcdefghijklmnopqrstuvwxyz0123" not in proc.stderr


@pytest.mark.parametrize("env", [{"FT_EVAL_FRACTION": "0"}, {"FT_EVAL_SPLIT": "test"}, {"FT_EVAL_FRACTION": "0.5"}])
def test_one_or_two_samples_are_a_valid_smoke_run_where_they_leave_a_training_record(monkeypatch, env):
    monkeypatch.setenv("FT_MAX_SAMPLES", "2" if env.get("FT_EVAL_FRACTION") == "0.5" else "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    load_settings()


@pytest.mark.parametrize("env", [{"FT_STRATEGY": "ddp", "FT_NPROC_PER_NODE": "2"}, {"FT_STRATEGY": "fsdp"},
                                 {"FT_STRATEGY": "fsdp", "FT_NPROC_PER_NODE": "2", "FT_EVAL_FRACTION": "0.1"}])
def test_a_failing_quality_check_with_prompts_alone_is_valid_where_they_are_answered(monkeypatch, env):
    """The prompts are answered with DDP and in one process; under FSDP an eval loss is something to check."""
    for key, value in {"FT_QUALITY_CHECK": "fail", "FT_EVAL_FRACTION": "0", "FT_SAMPLE_PROMPTS": '["Hi?"]',
                       **env}.items():
        monkeypatch.setenv(key, value)
    load_settings()


def test_every_setting_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description and field.description.endswith((".", ")")), name


@pytest.mark.parametrize("setting, value, expected", [
    ("FT_OUTPUT_URI", "ftp://host/x", "ftp:// is not supported; use a local path, s3://bucket/prefix or hf://org/name"),
    ("FT_OUTPUT_URI", "gs://bucket/x", "gs:// is not supported"),
    ("FT_OUTPUT_URI", "az:/container/x", "az:// is not supported"),
    ("FT_OUTPUT_URI", "S3://bucket/x", "write it as s3://bucket/prefix"),
    ("FT_OUTPUT_URI", "s3:/bucket/x", "write it as s3://bucket/prefix"),
    ("FT_OUTPUT_URI", "s3://", "an S3 URI names a bucket"),
    ("FT_OUTPUT_URI", "hf://org/name/sub", "a Hub destination is a model repository"),
    ("FT_OUTPUT_URI", "file://fileserver/share", "a file: URI names a path on this machine"),
    ("FT_CHECKPOINT_URI", "https://example.com/ckpt", "https:// is not supported; use a local path or s3://bucket"),
    ("FT_CHECKPOINT_URI", "hf://org/name", "checkpoints are not kept on the Hub"),
    ("FT_DATASET", "gs://bucket/data.jsonl", "gs:// is not supported; use a local path, s3://bucket/prefix or a "
                                             "Hugging Face Hub id"),
    ("FT_BASE_MODEL", "ftp://host/model", "ftp:// is not supported"),
])
def test_a_uri_of_an_unknown_scheme_is_a_config_error_naming_the_setting(monkeypatch, setting, value, expected):
    (line,) = problems(monkeypatch, **{setting: value})
    assert line.startswith(f"{setting}={value}: ") and expected in line, line


@pytest.mark.parametrize("value", ["results", "./results", "/data/out", "rel:dir/x", "C:\\out", "C:/out", "d:out",
                                   "file:///data/out", "file:/data/out", "file://localhost/data/out",
                                   "s3://bucket/prefix", "hf://org/name"])
def test_local_paths_and_known_schemes_are_accepted(monkeypatch, value):
    monkeypatch.setenv("FT_OUTPUT_URI", value)
    assert load_settings().output_uri == value


def test_a_file_uri_is_the_local_path_it_names(tmp_path):
    from job.storage import LocalStorage, is_local, open_destination

    dest = open_destination(f"file://{tmp_path}/my%20run")
    assert isinstance(dest, LocalStorage) and dest.root == tmp_path / "my run" and is_local("file:/x")
    assert not is_local("ftp://host/x")


@pytest.mark.parametrize("env, message", [
    ({"FT_OUTPUT_URI": "s3:bucket/x"}, "FT_OUTPUT_URI=s3:bucket/x: write it as s3://bucket/prefix"),
    ({"FT_OUTPUT_URI": " s3://bucket/x"}, "FT_OUTPUT_URI= s3://bucket/x: has leading or trailing whitespace"),
    ({"FT_OUTPUT_URI": ""}, "FT_OUTPUT_URI=: empty"),
    # was Path(""), the current directory: downloads and checkpoints landed (and were cleaned up) where the job started
    ({"FT_WORK_DIR": ""}, "FT_WORK_DIR=: empty; give a local directory for scratch space, or leave it unset for "
                          "/tmp/finetune-job"),
    ({"FT_ANSWER_ROLES": "assistant,user"}, "FT_ANSWER_ROLES=assistant,user: user asks, it does not answer"),
    ({"FT_PACKING": "true", "FT_PADDING_FREE": "false"}, "FT_PACKING=true with FT_PADDING_FREE=false"),
    ({"FT_BATCH_SIZE": "3", "FT_NPROC_PER_NODE": "2"}, "cannot be split evenly over 2 processes"),
    # each of these failed with a traceback after the model had loaded (exit 1, retried)
    ({"FT_NUM_TRAIN_EPOCHS": "inf"}, "FT_NUM_TRAIN_EPOCHS=inf: input should be a finite number"),
    ({"FT_TB_SYNC_SECONDS": "inf"}, "FT_TB_SYNC_SECONDS=inf: input should be a finite number"),
    ({"FT_LEARNING_RATE": "inf"}, "FT_LEARNING_RATE=inf: input should be a finite number"),
    ({"FT_SEED": "-1"}, "FT_SEED=-1: input should be greater than or equal to 0"),
    # was a data error (exit 3) after the tokenizer and the data were downloaded: no sample had a token to learn from
    ({"FT_MAX_SEQ_LENGTH": "1"}, "FT_MAX_SEQ_LENGTH=1: input should be greater than or equal to 2"),
    ({"FT_SEED": "99999999999"}, "FT_SEED=99999999999: input should be less than 4294967296"),
    ({"FT_LR_SCHEDULER_TYPE": "cosine_with_min_lr"}, "FT_LR_SCHEDULER_TYPE=cosine_with_min_lr: must be one of"),
    ({"FT_LR_SCHEDULER_TYPE": "warmup_stable_decay"}, "FT_LR_SCHEDULER_TYPE=warmup_stable_decay: must be one of"),
    ({"FT_QUALITY_CHECK": "fail", "FT_EVAL_FRACTION": "0"}, "FT_QUALITY_CHECK=fail: nothing to check"),
    # FSDP skips the sample answers (job.quality): the prompts alone checked nothing
    ({"FT_QUALITY_CHECK": "fail", "FT_EVAL_FRACTION": "0", "FT_SAMPLE_PROMPTS": '["Two in words?"]',
      "FT_STRATEGY": "fsdp", "FT_NPROC_PER_NODE": "2"},
     "FT_QUALITY_CHECK=fail: nothing to check with FT_EVAL_FRACTION=0 and no FT_EVAL_SPLIT (no eval loss), and "
     "FT_SAMPLE_PROMPTS are not answered while FSDP shards the model (FT_STRATEGY=fsdp with several processes); hold "
     "out data, or use FT_STRATEGY=ddp"),
    # settings that would do nothing
    ({"FT_PROFILE": "guide", "FT_MICRO_BATCH_TOKENS": "4096"}, "FT_MICRO_BATCH_TOKENS=4096: sizes padding-free"),
    ({"FT_PADDING_FREE": "false", "FT_MICRO_BATCH_TOKENS": "4096"}, "and this run pads them"),
    ({"FT_PACKING_LENGTH": "4096"}, "FT_PACKING_LENGTH=4096: only with FT_PACKING=true"),
    ({"FT_EVAL_SPLIT": "train"}, "FT_EVAL_SPLIT=train: the split it trains on"),
    # trained without evaluation (one record), or failed with datasets' traceback (exit 1) when no training record stayed
    ({"FT_MAX_SAMPLES": "1"}, "FT_MAX_SAMPLES=1: too few records to hold out FT_EVAL_FRACTION=0.1 for evaluation and "
                              "keep one for training; use FT_MAX_SAMPLES=2 or more, or FT_EVAL_FRACTION=0 to train "
                              "without evaluation"),
    ({"FT_MAX_SAMPLES": "9", "FT_EVAL_FRACTION": "0.9"}, "use FT_MAX_SAMPLES=10 or more"),
])
def test_mistakes_found_before_anything_runs(monkeypatch, env, message):
    from job.config import load_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings()
