"""Values that cannot work are refused at install time, with a message that names the values and says what to do:
by values.schema.json for a value on its own, by a `fail` in the templates for a combination."""

from __future__ import annotations

import re

import helm_python as helm
import pytest
from chart_support import render, with_output

NFS = {"extraVolumes": [{"name": "results", "nfs": {"server": "nfs", "path": "/x"}}],
       "extraVolumeMounts": [{"name": "results", "mountPath": "/results"}]}

# (values, every fragment the message must hold)
COMBINATIONS = {
    "no destination": ({}, ["config.output_uri is required", "s3://bucket/prefix"]),
    "relative destination": (with_output(output_uri="results"), ["config.output_uri=results is a relative path"]),
    "destination on the pod's disk": (
        with_output(output_uri="/tmp/results"),
        ["config.output_uri=/tmp/results is a local path on no persistent volume", "writable persistent mounts: none"]),
    "destination on a read-only volume": (
        {**NFS, "extraVolumeMounts": [{"name": "results", "mountPath": "/results", "readOnly": True}],
         "config": {"output_uri": "/results/a"}},
        ["config.output_uri=/results/a is a local path on no persistent volume"]),
    "destination beside a volume": (
        {**NFS, "config": {"output_uri": "/results-old/a"}}, ["(writable persistent mounts: /results)"]),
    "work_dir on the read-only root": (
        with_output(work_dir="/opt/work"),
        ["config.work_dir=/opt/work is not on a writable volume", "/tmp, /cache, /cache/huggingface"]),
    "fixed run id on a schedule": (
        {**with_output(run_id="weekly"), "schedule": "@weekly"},
        ["config.run_id=weekly is fixed but schedule is set", "leave config.run_id unset"]),
    "time zone in the schedule": (
        {**with_output(), "schedule": "CRON_TZ=Europe/Paris 0 3 * * *"}, ["set cronJob.timeZone instead"]),
    "two sources of credentials": (
        {**with_output(), "credentials": {"existingSecret": "s", "create": True, "values": {"HF_TOKEN": "x"}}},
        ["credentials.existingSecret=s and credentials.create=true are both set"]),
    "a created Secret without content": (
        {**with_output(), "credentials": {"create": True}},
        ["credentials.create=true but credentials.values sets none of HF_TOKEN"]),
    "a credential the pod never reads": (
        {**with_output(), "credentials": {"create": True, "values": {"GITHUB_TOKEN": "x"}}},
        ["credentials.values.GITHUB_TOKEN is not in credentials.variables"]),
    "a setting read from the Secret": (
        {**with_output(), "credentials": {"existingSecret": "s", "variables": ["HF_TOKEN", "FT_BASE_MODEL"]}},
        ["credentials.variables lists FT_BASE_MODEL", "set them under config"]),
    "a setting in extraEnv": (
        {**with_output(), "extraEnv": [{"name": "FT_LORA_R", "value": "8"}]},
        ["extraEnv sets FT_LORA_R", "under config, by field name (lora_r)"]),
    "a credential inlined in extraEnv": (
        {**with_output(), "credentials": {"existingSecret": "s"}, "extraEnv": [{"name": "HF_TOKEN", "value": "hf_x"}]},
        ["extraEnv sets HF_TOKEN, which credentials.variables already reads from the Secret"]),
    "HF_HOME in extraEnv": (
        {**with_output(), "extraEnv": [{"name": "HF_HOME", "value": "/x"}]},
        ["extraEnv sets HF_HOME: it follows modelCache.mountPath"]),
    "cuda without a GPU": (
        {**with_output(device="cuda"), "gpu": {"count": 0}}, ["config.device=cuda but gpu.count=0"]),
    "GPUs for a CPU run": (
        {**with_output(device="cpu"), "gpu": {"count": 2}}, ["config.device=cpu but gpu.count=2", "gpu.count=0"]),
    "GPUs in resources": (
        {**with_output(), "resources": {"limits": {"nvidia.com/gpu": 2}}},
        ["resources.limits sets nvidia.com/gpu: give the number of GPUs in gpu.count"]),
    "two claims": (
        {**with_output(), "modelCache": {"existingClaim": "c", "create": True}},
        ["modelCache.existingClaim=c and modelCache.create=true are both set"]),
    "the cache on a scratch volume": (
        {**with_output(), "modelCache": {"mountPath": "/cache"}}, ["modelCache.mountPath=/cache is taken"]),
    "a volume named like the chart's": (
        {**with_output(), "extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
        ["extraVolumes has a volume named tmp"]),
    "a JobSet on a schedule": (
        {**with_output(), "schedule": "@weekly", "distributed": {"nodes": 2, "engine": "jobset"}},
        ["distributed.engine=jobset and schedule=\"@weekly\" are both set", "use distributed.engine=job"]),
    "FT_NNODES other than the nodes": (
        {**with_output(nnodes=4), "distributed": {"nodes": 2}},
        ["config.nnodes=4 but distributed.nodes=2", "leave config.nnodes unset"]),
    "FT_NNODES above 1 on one node": (
        with_output(nnodes=2), ["config.nnodes=2 but distributed.nodes=1"]),
    "a fixed node rank on several nodes": (
        {**with_output(node_rank=0), "distributed": {"nodes": 2}},
        ["config.node_rank=0 with distributed.nodes=2", "JOB_COMPLETION_INDEX"]),
    "more processes than GPUs": (
        {**with_output(nproc_per_node=8), "gpu": {"count": 4}},
        ["config.nproc_per_node=8 but gpu.count=4", "one GPU of the pod"]),
    "fewer processes than GPUs": (
        {**with_output(nproc_per_node=2), "gpu": {"count": 4}, "distributed": {"nodes": 2}},
        ["config.nproc_per_node=2 but gpu.count=4"]),
    "a global batch that does not split over the GPUs": (
        {**with_output(), "gpu": {"count": 8}},
        ["the global batch of 4 samples", "cannot be split evenly over 8 training processes",
         "raise config.gradient_accumulation_steps (or config.batch_size) to a multiple of 8"]),
    "a global batch that does not split over the nodes": (
        {**with_output(gradient_accumulation_steps=3), "gpu": {"count": 4}, "distributed": {"nodes": 2}},
        ["the global batch of 12 samples", "over 8 training processes", "gpu.count=4 x distributed.nodes=2"]),
    "a ReadWriteOnce cache on several nodes": (
        {**with_output(), "distributed": {"nodes": 2}, "modelCache": {"create": True}},
        ["modelCache.create=true with accessModes ReadWriteOnce and distributed.nodes=2", "[ReadWriteMany]"]),
    "the rendezvous address in extraEnv": (
        {**with_output(), "distributed": {"nodes": 2}, "extraEnv": [{"name": "MASTER_ADDR", "value": "10.0.0.1"}]},
        ["extraEnv sets MASTER_ADDR, which the chart sets for multi-node training"]),
    "a CronJob name too long for its pods' hostnames": (
        {**with_output(), "schedule": "@daily", "distributed": {"nodes": 2}, "fullnameOverride": "a" * 52},
        ["the CronJob's name", "is too long for 2 nodes", "<minutes since the epoch>-1, would be 65 characters",
         "at most 50 characters"]),
    "a JobSet name too long for its pods' hostnames": (
        {**with_output(), "distributed": {"nodes": 2, "engine": "jobset"}, "fullnameOverride": "a" * 52},
        ["the JobSet's name", "is too long for 2 nodes", "at most 48 characters"]),
}

# (values, the schema's location of the bad value, a fragment of the constraint)
SCHEMA = {
    "unknown setting": (with_output(lora_rank=8), "/config", "'lora_rank' not allowed"),
    "setting of the wrong type": (with_output(lora_r="sixteen"), "/config/lora_r", "got string, want null or integer"),
    "setting out of range": (with_output(lora_r=0), "/config/lora_r", "exclusiveMinimum"),
    "setting outside its choices": (with_output(quantization="q3"), "/config/quantization", "value must be one of"),
    "misspelt top-level key": ({**with_output(), "gpus": 2}, "", "'gpus' not allowed"),
    "negative GPU count": ({**with_output(), "gpu": {"count": -1}}, "/gpu/count", "minimum"),
    "exit code 0 fails the Job": ({**with_output(), "podFailurePolicy": {"failJobOnExitCodes": [0, 2]}},
                                  "/podFailurePolicy/failJobOnExitCodes/0", "minimum"),
    "relative mount path": ({**with_output(), "modelCache": {"mountPath": "cache"}}, "/modelCache/mountPath",
                            "does not match pattern"),
    "bad image digest": ({**with_output(), "image": {"digest": "latest"}}, "/image/digest", "does not match pattern"),
    "not a quantity": ({**with_output(), "scratch": {"shmSizeLimit": "lots"}}, "/scratch/shmSizeLimit",
                       "does not match pattern"),
    "invalid queue name": ({**with_output(), "kueue": {"queueName": "Team A"}}, "/kueue/queueName",
                           "does not match pattern"),
    "no nodes": ({**with_output(), "distributed": {"nodes": 0}}, "/distributed/nodes", "minimum"),
    "unknown engine": ({**with_output(), "distributed": {"engine": "mpi"}}, "/distributed/engine",
                       "value must be one of"),
    "port out of range": ({**with_output(), "distributed": {"port": 70000}}, "/distributed/port", "maximum"),
    "misspelt distributed key": ({**with_output(), "distributed": {"replicas": 2}}, "/distributed",
                                 "'replicas' not allowed"),
}


@pytest.mark.parametrize("values, fragments", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_an_impossible_combination_fails_with_a_precise_message(values, fragments):
    with pytest.raises(helm.HelmRenderError) as raised:
        render(values)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message
    # One readable line after Helm's location prefix, no Go stack.
    assert len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("values, location, fragment", SCHEMA.values(), ids=SCHEMA.keys())
def test_a_bad_value_is_refused_by_the_schema_at_its_location(values, location, fragment):
    with pytest.raises(helm.HelmValuesError) as raised:
        render(values)
    assert re.search(rf"- at '{re.escape(location)}': .*{re.escape(fragment)}", str(raised.value)), str(raised.value)


def test_the_grace_period_must_outlast_the_jobs_sigterm_budget():
    with pytest.raises(helm.HelmRenderError, match="raise terminationGracePeriodSeconds"):
        render_with_budget(45, 45)
    objs, _ = render_with_budget(30, 45)
    assert objs


def render_with_budget(budget: int, grace: int):
    """The job's SIGTERM budget (FT_TERMINATION_GRACE_SECONDS) against terminationGracePeriodSeconds."""
    from job.config import Settings

    if "termination_grace_seconds" not in Settings.model_fields:
        pytest.skip("job/config.py has no termination_grace_seconds yet (issue 3)")
    values = with_output(termination_grace_seconds=budget)
    return render({**values, "terminationGracePeriodSeconds": grace})
