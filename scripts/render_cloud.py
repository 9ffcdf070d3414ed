"""Regenerate the batch-service definitions in deploy/ from the job and the chart's values (`make cloud`).

    python scripts/render_cloud.py           # write them
    python scripts/render_cloud.py --check   # exit 1 and name the stale files instead (the tests do the same)

Generated, each the request body of the service's own API, with REPLACE_ME placeholders:
- deploy/aws-batch/job-definition.json: AWS Batch RegisterJobDefinition, one node (`aws batch register-job-definition
  --cli-input-json file://...`), and deploy/aws-batch/job-definition-multi-node.json, a multi-node parallel job;
- deploy/gcp-batch/job.json: a Google Cloud Batch Job (`gcloud batch jobs submit --config ...`);
- deploy/sagemaker/training-job.json: SageMaker CreateTrainingJob, bring your own container
  (`aws sagemaker create-training-job --cli-input-json file://...`).

Their sources: the FT_* names and defaults of job/config.py, the retriable exit codes of job/errors.py (which codes
retry and which end the job), SageMaker's container contract in job/platforms.py, and the chart's values (GPUs, CPU,
memory, /dev/shm, retries, the settings of the plain manifests), so that a change to any of them shows here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from render_k8s import CHART, PLAIN_VALUES, VALUES, env_value, load_values, report_stale, write_stale  # noqa: E402

from job import platforms  # noqa: E402
from job.config import Settings, env_name  # noqa: E402
from job.errors import EXIT_CODES  # noqa: E402

DEPLOY = ROOT / "deploy"
AWS_BATCH = DEPLOY / "aws-batch" / "job-definition.json"
AWS_BATCH_MULTI_NODE = DEPLOY / "aws-batch" / "job-definition-multi-node.json"
GCP_BATCH = DEPLOY / "gcp-batch" / "job.json"
SAGEMAKER = DEPLOY / "sagemaker" / "training-job.json"
NAME = "finetune-job"
ACCOUNT, REGION = "123456789012", "us-east-1"  # AWS
PROJECT, GCP_REGION = "REPLACE_ME-project", "us-central1"  # Google Cloud
MULTI_NODES = 2
MAX_RUN_SECONDS = 86_400  # one attempt's limit: a run that takes longer is stopped (and may be retried)
# Seconds from SIGTERM to SIGKILL: the ECS agent's ECS_CONTAINER_STOP_TIMEOUT (30 s unless the compute environment's
# AMI changes it), a Google Cloud Batch VM's preemption notice (30 s), SageMaker's StopTrainingJob (120 s).
STOP_SECONDS = {"aws-batch": 30, "gcp-batch": 30, "sagemaker": platforms.SAGEMAKER_STOP_SECONDS}
GRACE_SECONDS = {"aws-batch": 25, "gcp-batch": 25, "sagemaker": platforms.SAGEMAKER_GRACE_SECONDS}
# AWS Batch's status reason for a job whose instance went away (a spot reclaim): "Host EC2 (instance i-...) terminated."
AWS_HOST_GONE = "Host EC2*"
SECRET_VARIABLES = ("HF_TOKEN",)  # credentials by reference; AWS and GCS access come from the job's role
HYPERPARAMETERS = ("lora_r", "learning_rate", "num_train_epochs")  # shown as SageMaker hyperparameters


def final_codes() -> list[int]:
    """Exit codes after which a retry would fail the same way (job/errors.py)."""
    return [e.code for e in EXIT_CODES if e.code and not e.retriable]


def chart() -> dict[str, Any]:
    """The chart's values.yaml, parsed."""
    return load_values(VALUES)


def settings_env(**extra: Any) -> dict[str, str]:
    """FT_* variables: the plain manifests' settings (k8s/configmap.yaml), FT_REQUIRE_GPU, then `extra`; each name
    checked against job/config.py."""
    config = {**(load_values(PLAIN_VALUES).get("config") or {}), "require_gpu": True, **extra}
    unknown = [k for k in config if k not in Settings.model_fields]
    if unknown:
        raise SystemExit(f"not settings of job/config.py: {unknown}")
    return {env_name(k): env_value(v) for k, v in config.items() if v is not None}


def mebibytes(quantity: str) -> int:
    """A Kubernetes memory quantity (64Gi, 8Gi, 512Mi) in MiB."""
    units = {"Gi": 1024, "Mi": 1, "Ti": 1024 * 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def image(registry: str) -> str:
    """The image in `registry`, tagged with the chart's appVersion (kept equal to the package's version)."""
    version = load_values(CHART / "Chart.yaml")["appVersion"]
    return f"{registry}/{NAME}:{version}"


ECR = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"


# --- AWS Batch -------------------------------------------------------------------------------------------------------

def aws_retry_strategy() -> dict[str, Any]:
    """Retry a spot reclaim and the retriable exit codes, end the job on the final ones. evaluateOnExit holds at most
    5 rules, the first that matches decides, a failure no rule matches is retried, and onExitCode is a pattern that
    may end with `*`. So: one EXIT rule per final code, a final code's rule becoming "N*" where that also ends the
    final codes beginning with its digits (2* for 2 and 20) and no retriable code or kill by signal (128 + n) begins
    with them; the rest falls through to a retry (a spot reclaim, which has no exit code, and a kill by signal, 137,
    too), with the reclaim named first where a rule is left for it."""
    spot = [{"onStatusReason": AWS_HOST_GONE, "action": "RETRY"}]
    finals = sorted(final_codes())
    keep_retrying = [str(e.code) for e in EXIT_CODES if e.code and e.retriable] + [str(128 + n) for n in range(1, 65)]
    patterns: dict[int, list[int]] = {}
    for code in finals:
        head = next((h for h in patterns if str(code).startswith(str(h))
                     and not any(r.startswith(str(h)) for r in keep_retrying)), None)
        patterns.setdefault(code, []) if head is None else patterns[head].append(code)
    if len(patterns) > 5:
        raise SystemExit(f"AWS Batch takes at most 5 evaluateOnExit rules: too few for the final exit codes {finals}; "
                         "give a new final code the digits of an existing one (job/errors.py)")
    rules = [{"onExitCode": f"{code}*" if more else str(code), "action": "EXIT"} for code, more in patterns.items()]
    rules = spot[:5 - len(rules)] + rules
    return {"attempts": chart()["job"]["backoffLimit"] + 1, "evaluateOnExit": rules}


def aws_container(**env: Any) -> dict[str, Any]:
    """containerProperties: the image, GPUs, CPU and memory and /dev/shm of the chart's values, the settings, HF_TOKEN
    from Secrets Manager, a job role for S3 and an execution role that may read the secret."""
    values = chart()
    environment = settings_env(termination_grace_seconds=GRACE_SECONDS["aws-batch"], **env)
    return {
        "image": image(ECR),
        "command": ["run"],
        "jobRoleArn": f"arn:aws:iam::{ACCOUNT}:role/REPLACE_ME-{NAME}-job",
        "executionRoleArn": f"arn:aws:iam::{ACCOUNT}:role/REPLACE_ME-{NAME}-execution",
        "resourceRequirements": [
            {"type": "GPU", "value": str(values["gpu"]["count"])},
            {"type": "VCPU", "value": str(values["resources"]["requests"]["cpu"])},
            {"type": "MEMORY", "value": str(mebibytes(values["resources"]["limits"]["memory"]))},
        ],
        "linuxParameters": {"sharedMemorySize": mebibytes(values["scratch"]["shmSizeLimit"]),
                            "initProcessEnabled": True},
        "environment": [{"name": k, "value": v} for k, v in sorted(environment.items())],
        "secrets": [{"name": var, "valueFrom": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:REPLACE_ME-{var.lower()}"}
                    for var in SECRET_VARIABLES],
        "logConfiguration": {"logDriver": "awslogs"},
    }


def aws_batch() -> dict[str, Any]:
    """RegisterJobDefinition for one node."""
    return {
        "jobDefinitionName": NAME,
        "type": "container",
        "platformCapabilities": ["EC2"],
        "containerProperties": aws_container(),
        "retryStrategy": aws_retry_strategy(),
        "timeout": {"attemptDurationSeconds": MAX_RUN_SECONDS},
        "propagateTags": True,
        "tags": {"app": NAME},
    }


def aws_batch_multi_node() -> dict[str, Any]:
    """RegisterJobDefinition of a multi-node parallel job: every node runs the same container with FT_NNODES; the node
    rank is AWS_BATCH_JOB_NODE_INDEX, node 0 is the main node and hosts the rendezvous (job.distributed)."""
    return {
        "jobDefinitionName": f"{NAME}-multi-node",
        "type": "multinode",
        "platformCapabilities": ["EC2"],
        "nodeProperties": {
            "numNodes": MULTI_NODES,
            "mainNode": 0,
            "nodeRangeProperties": [{"targetNodes": "0:", "container": aws_container(nnodes=MULTI_NODES)}],
        },
        "retryStrategy": aws_retry_strategy(),
        "timeout": {"attemptDurationSeconds": MAX_RUN_SECONDS},
        "propagateTags": True,
        "tags": {"app": NAME},
    }


# --- Google Cloud Batch ----------------------------------------------------------------------------------------------

GCS_MOUNT = "/mnt/disks/results"  # the results bucket, mounted by Cloud Storage FUSE: FT_OUTPUT_URI and checkpoints


def gcp_batch() -> dict[str, Any]:
    """A Cloud Batch Job of one task: an L4 spot VM with drivers, the container with the chart's /dev/shm, settings as
    variables and HF_TOKEN from Secret Manager, results in a Cloud Storage bucket mounted at GCS_MOUNT. The run id is
    BATCH_JOB_UID, which the retries of the task share. lifecyclePolicies: FAIL_TASK on the final exit codes; any
    other failure (retriable codes, a preempted VM's 50001) is retried up to maxRetryCount."""
    values = chart()
    env = settings_env(output_uri=GCS_MOUNT, termination_grace_seconds=GRACE_SECONDS["gcp-batch"])
    container = {
        "imageUri": image(f"{GCP_REGION}-docker.pkg.dev/{PROJECT}/{NAME}"),
        "commands": ["run"],
        "options": f"--shm-size={mebibytes(values['scratch']['shmSizeLimit'])}m",
        "volumes": [f"{GCS_MOUNT}:{GCS_MOUNT}:rw"],
    }
    task = {
        "runnables": [{"container": container, "environment": {
            "variables": env,
            "secretVariables": {var: f"projects/{PROJECT}/secrets/REPLACE_ME-{var.lower().replace('_', '-')}/versions/latest"
                                for var in SECRET_VARIABLES}}}],
        "volumes": [{"gcs": {"remotePath": "REPLACE_ME-bucket/finetune-job"}, "mountPath": GCS_MOUNT}],
        "computeResource": {"cpuMilli": str(int(values["resources"]["requests"]["cpu"]) * 1000),
                            "memoryMib": str(mebibytes(values["resources"]["limits"]["memory"]))},
        "maxRetryCount": values["job"]["backoffLimit"],
        "maxRunDuration": f"{MAX_RUN_SECONDS}s",
        "lifecyclePolicies": [{"action": "FAIL_TASK", "actionCondition": {"exitCodes": final_codes()}}],
    }
    gpus = values["gpu"]["count"]
    return {
        "taskGroups": [{"taskCount": "1", "parallelism": "1", "taskSpec": task}],
        "allocationPolicy": {
            "instances": [{"installGpuDrivers": True, "policy": {
                "machineType": "g2-standard-32", "provisioningModel": "SPOT",
                "accelerators": [{"type": "nvidia-l4", "count": str(gpus)}],
                "bootDisk": {"sizeGb": "200"}}}],
            "serviceAccount": {"email": f"REPLACE_ME-{NAME}@{PROJECT}.iam.gserviceaccount.com"},
        },
        "labels": {"app": NAME},
        "logsPolicy": {"destination": "CLOUD_LOGGING"},
    }


# --- SageMaker -------------------------------------------------------------------------------------------------------

SAGEMAKER_CHECKPOINTS = "/opt/ml/checkpoints"  # synced to CheckpointConfig.S3Uri, and back on a spot restart


def _channel(name: str, prefix: str) -> dict[str, Any]:
    """A File-mode input channel copying the S3 `prefix` to /opt/ml/input/data/<name>."""
    return {"ChannelName": name, "InputMode": "File", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": prefix, "S3DataDistributionType": "FullyReplicated"}}}


def sagemaker() -> dict[str, Any]:
    """CreateTrainingJob with the image (started with `train`, which the CLI runs as `run`): the channels `train` and
    `model` become FT_DATASET and FT_BASE_MODEL, /opt/ml/model FT_OUTPUT_URI, and the grace, failure file and run id
    (TRAINING_JOB_NAME) follow SageMaker's contract (job/platforms.py); checkpoints go to /opt/ml/checkpoints, which
    managed spot training syncs to S3 and restores on a restart. Hyperparameters are settings too."""
    values = chart()
    bucket = f"s3://REPLACE_ME-bucket/{NAME}"
    env = settings_env(checkpoint_uri=SAGEMAKER_CHECKPOINTS)
    env.pop(env_name("output_uri"))  # /opt/ml/model, uploaded by SageMaker (job.platforms)
    defaults = {k: Settings.model_fields[k].default for k in HYPERPARAMETERS}
    return {
        "TrainingJobName": f"{NAME}-REPLACE-ME-1",
        "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/REPLACE_ME-{NAME}-sagemaker",
        "AlgorithmSpecification": {
            "TrainingImage": image(ECR), "TrainingInputMode": "File",
            "MetricDefinitions": [{"Name": "train:loss", "Regex": r'"loss": ([0-9.eE+-]+)'},
                                  {"Name": "eval:loss", "Regex": r'"eval_loss": ([0-9.eE+-]+)'}]},
        "HyperParameters": {k: env_value(v) for k, v in defaults.items()},
        "Environment": env,
        "InputDataConfig": [_channel("train", f"{bucket}/data/"), _channel("model", f"{bucket}/models/llama-2-7b/")],
        "OutputDataConfig": {"S3OutputPath": f"{bucket}/sagemaker-output/"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": values["gpu"]["count"],
                           "VolumeSizeInGB": 200},
        "EnableManagedSpotTraining": True,
        "CheckpointConfig": {"S3Uri": f"{bucket}/sagemaker-checkpoints/", "LocalPath": SAGEMAKER_CHECKPOINTS},
        "StoppingCondition": {"MaxRuntimeInSeconds": MAX_RUN_SECONDS, "MaxWaitTimeInSeconds": 2 * MAX_RUN_SECONDS},
        "RetryStrategy": {"MaximumRetryAttempts": values["job"]["backoffLimit"]},
        "Tags": [{"Key": "app", "Value": NAME}],
    }


# --- files -----------------------------------------------------------------------------------------------------------

def definitions() -> dict[Path, str]:
    """deploy/ file -> its JSON text."""
    made = {AWS_BATCH: aws_batch(), AWS_BATCH_MULTI_NODE: aws_batch_multi_node(), GCP_BATCH: gcp_batch(),
            SAGEMAKER: sagemaker()}
    return {path: json.dumps(body, indent=2) + "\n" for path, body in made.items()}


def stale(files: dict[Path, str]) -> list[Path]:
    """Files whose content on disk differs from `files`, and .json files in deploy/ not generated any more."""
    out = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    return out + [p for p in sorted(DEPLOY.rglob("*.json")) if p not in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if there are any")
    args = parser.parse_args(argv)
    files = definitions()
    if args.check:
        return report_stale(stale(files), "cloud")
    write_stale(files, stale(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
