"""The chart and the job agree: every FT_ variable the chart can emit is a setting the job accepts (with the value
meant), every setting of job/config.py has a documented value in the chart, and the podFailurePolicy is the job's
exit-code table."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from chart_support import CHART, CI_FILES, ci_values, container, env, job_spec, one, render, rk, with_output

from job.config import Settings, env_name, load_settings
from job.errors import EXIT_CODES

FIELDS = Settings.model_fields
ENV_NAMES = {env_name(f) for f in FIELDS}


# The pod labels the run id may come from (the downward API): the Job's name, or the JobSet's.
RUN_NAME_LABELS = ("metadata.labels['batch.kubernetes.io/job-name']", "metadata.labels['jobset.sigs.k8s.io/jobset-name']")


def emitted_settings(objs) -> dict[str, str]:
    """The FT_ variables the pod gets, as the job would see them (the run id as the downward API gives it)."""
    variables = dict(one(objs, "ConfigMap")["data"])
    for name, entry in env(objs).items():
        if not name.startswith("FT_"):
            continue
        if name == "FT_RUN_ID":
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] in RUN_NAME_LABELS
            variables[name] = "ft-finetune-job-29383920"  # a Job's name, as the CronJob controller makes them
        else:
            variables[name] = entry["value"]  # FT_NNODES, from distributed.nodes
    return variables


def job_reads(monkeypatch, variables: dict[str, str]) -> Settings:
    for name in [n for n in os.environ if n.startswith("FT_")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def every_default() -> dict:
    """A value for every setting: its default, made explicit (None means unset, which the chart never emits)."""
    return {name: rk.plain(f.default) for name, f in FIELDS.items() if f.default is not None}


@pytest.mark.parametrize("values_file", CI_FILES, ids=[p.name for p in CI_FILES])
def test_every_variable_the_chart_emits_is_accepted_by_the_job(values_file, monkeypatch):
    values = ci_values(values_file.name)
    objs, _ = render(values)
    variables = emitted_settings(objs)
    assert set(variables) <= ENV_NAMES
    assert set(container(objs).get("envFrom", [])[0]) == {"configMapRef"}
    settings = job_reads(monkeypatch, variables)
    for name, value in values.get("config", {}).items():
        assert getattr(settings, name) == type(getattr(settings, name))(value), name


def test_every_setting_set_explicitly_reaches_the_job_unchanged(monkeypatch):
    objs, _ = render(with_output(**{**every_default(), "output_uri": "s3://b/p"}))
    variables = emitted_settings(objs)
    assert set(variables) == {env_name(n) for n in every_default()} | {"FT_RUN_ID"}
    settings = job_reads(monkeypatch, variables)
    for name, value in every_default().items():
        if name != "output_uri":
            assert getattr(settings, name) == FIELDS[name].default, name


@pytest.mark.parametrize("field, value, text", [
    ("max_steps", 1_000_000, "1000000"),  # Go's %v would write 1e+06, which is no integer to the job
    ("learning_rate", 0.0002, "0.0002"),
    ("learning_rate", 1e-5, "0.00001"),
    ("num_train_epochs", 3, "3"),
    ("packing", True, "true"),
    ("gradient_checkpointing", False, "false"),
    ("lora_target_modules", "q_proj,v_proj", "q_proj,v_proj"),
    ("model_revision", "0123abc", "0123abc"),
])
def test_a_value_reaches_the_job_as_written(field, value, text, monkeypatch):
    objs, _ = render(with_output(**{field: value}))
    variables = emitted_settings(objs)
    assert variables[env_name(field)] == text
    assert getattr(job_reads(monkeypatch, variables), field) == value


def test_sample_prompts_may_be_a_list_in_the_values(monkeypatch):
    """A YAML list, as a user writes it (the schema refused it: `got array, want string`), reaches the job as the
    JSON list FT_SAMPLE_PROMPTS takes."""
    prompts = ["Hi", "Capitalize: kiwi", "Ünïcode"]
    objs, _ = render(with_output(sample_prompts=prompts))
    variables = emitted_settings(objs)
    assert job_reads(monkeypatch, variables).sample_prompt_list == prompts


@pytest.mark.parametrize("empty", [None, ""])
def test_an_empty_value_keeps_the_jobs_default(empty):
    objs, _ = render(with_output(model_revision=empty, base_model=empty))
    assert set(one(objs, "ConfigMap")["data"]) == {"FT_OUTPUT_URI"}


def config_section() -> list[str]:
    lines = (CHART / "values.yaml").read_text().splitlines()
    start = lines.index("config:")
    return lines[start + 1:]


def test_every_setting_has_a_documented_value_in_the_chart():
    section = config_section()
    set_keys = set(yaml.safe_load((CHART / "values.yaml").read_text())["config"])
    commented = {m.group(1): i for i, line in enumerate(section) if (m := re.match(r"^  # ([a-z_][a-z0-9_]*): ", line))}
    documented = set_keys | set(commented)
    missing = set(FIELDS) - documented
    assert not missing, f"settings of job/config.py without a value in values.yaml (run `make k8s`): {sorted(missing)}"
    unknown = documented - set(FIELDS)
    assert not unknown, f"values.yaml documents settings the job does not have: {sorted(unknown)}"
    for name, i in commented.items():
        assert section[i - 1].startswith("  # ") and env_name(name) in "".join(section[max(0, i - 4):i]), name


def test_the_schema_checks_exactly_the_settings():
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())["properties"]["config"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(FIELDS)
    for name, prop in schema["properties"].items():
        assert FIELDS[name].description and FIELDS[name].description.split(".")[0] in prop["description"]


def test_the_pod_failure_policy_is_the_exit_code_table():
    final = sorted(e.code for e in EXIT_CODES if e.code != 0 and not e.retriable)
    retriable = {e.code for e in EXIT_CODES if e.retriable}
    assert yaml.safe_load((CHART / "values.yaml").read_text())["podFailurePolicy"]["failJobOnExitCodes"] == final
    objs, _ = render(with_output())
    rules = job_spec(objs)["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail_job) == 1 and fail_job[0]["onExitCodes"]["operator"] == "In"
    assert sorted(fail_job[0]["onExitCodes"]["values"]) == final
    assert not retriable & set(fail_job[0]["onExitCodes"]["values"])
    assert fail_job[0]["onExitCodes"]["containerName"] == container(objs)["name"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]


def test_the_grace_period_outlasts_the_jobs_default_sigterm_budget():
    grace = yaml.safe_load((CHART / "values.yaml").read_text())["terminationGracePeriodSeconds"]
    field = FIELDS.get("termination_grace_seconds")
    budget = field.default if field else 25  # issue 3's default until config.py has the setting
    assert grace == 45 and grace >= budget + 15
