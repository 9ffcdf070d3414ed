"""The chart, rendered by Helm's own engine for every values file under helm/finetune-job/ci/, linted, and validated
against the Kubernetes OpenAPI schemas of the oldest and newest versions it supports."""

from __future__ import annotations

import hashlib

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from job.errors import EXIT_CODES
from chart_support import (
    CHART, CI_FILES, NEWEST_KUBERNETES, OLDEST_KUBERNETES, RELEASE, by_kind, ci_values, container, env, job_spec,
    mounts, one, pod_spec, render, render_files, validation_errors, with_output,
)

CI_IDS = [p.name for p in CI_FILES]
FINAL_CODES = [e.code for e in EXIT_CODES if e.code and not e.retriable]  # 2, 3, 4, 5, 9, 20
DEFAULT_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
KINDS = {"Job", "CronJob", "JobSet", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount"}


@pytest.fixture(scope="module", params=CI_FILES, ids=CI_IDS)
def rendered(request):
    return render(ci_values(request.param.name))


def test_the_ci_folder_covers_the_cases_of_the_issue():
    assert {"job", "cronjob", "existing-secret", "created-secret", "pvc", "irsa", "kueue", "multi-gpu", "multi-node",
            "multi-node-cronjob", "jobset"} <= {p.name.removesuffix("-values.yaml") for p in CI_FILES}


def test_the_chart_floor_is_the_oldest_version_tested():
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == f">={OLDEST_KUBERNETES}.0-0"
    assert OLDEST_KUBERNETES in {kubernetes_validate.utils.major_minor(v)
                                 for v in kubernetes_validate.utils.all_versions()}


@pytest.mark.parametrize("kube_version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("values_file", CI_FILES, ids=CI_IDS)
def test_lint_strict_finds_nothing(values_file, kube_version):
    report = helm.lint(CHART, ci_values(values_file.name), strict=True, kube_version=f"v{kube_version}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


@pytest.mark.parametrize("kube_version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_every_object_is_valid_kubernetes(rendered, kube_version):
    objs, _ = rendered
    assert objs and {o["kind"] for o in objs} <= KINDS
    for obj in objs:
        errors = validation_errors(obj, kube_version)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']} on Kubernetes {kube_version}: {errors}"


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    objs, _ = rendered
    pod = pod_spec(objs)
    pod_ctx = pod.get("securityContext", {})
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert pod_ctx.get("runAsNonRoot") is True and pod_ctx.get("runAsUser", 1) != 0
    for c in pod["containers"] + pod.get("initContainers", []):
        ctx = c.get("securityContext", {})
        assert ctx.get("allowPrivilegeEscalation") is False, c["name"]
        assert ctx.get("privileged") is not True
        assert "ALL" in ctx.get("capabilities", {}).get("drop", [])
        assert set(ctx.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost")
        assert ctx.get("readOnlyRootFilesystem") is True
    allowed = {"name", "emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected", "downwardAPI", "csi",
               "ephemeral"}
    assert all(set(v) <= allowed for v in pod["volumes"]), pod["volumes"]
    # With a read-only root, the image's writable places must be volumes.
    assert {"/tmp", "/cache", "/dev/shm"} <= set(mounts(objs))


def test_every_object_has_the_standard_labels(rendered):
    objs, _ = rendered
    pods = [job_spec(objs)["template"]]
    for obj in objs + pods:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "finetune-job"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] and labels["helm.sh/chart"] == "finetune-job-0.1.0"


def test_settings_reach_the_container_through_a_configmap(rendered):
    objs, _ = rendered
    config_map = one(objs, "ConfigMap")
    assert container(objs)["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    # Only what the chart derives: the run id (the Job's name) and, on several nodes, FT_NNODES (distributed.nodes).
    assert {name for name in env(objs) if name.startswith("FT_")} <= {"FT_RUN_ID", "FT_NNODES"}


def test_the_job_is_default_and_a_schedule_makes_a_cronjob():
    objs, notes = render(ci_values("job-values.yaml"))
    assert len(by_kind(objs, "Job")) == 1 and not by_kind(objs, "CronJob")
    values = ci_values("cronjob-values.yaml")
    objs, notes = render(values)
    cron = one(objs, "CronJob")
    assert not by_kind(objs, "Job")
    spec = cron["spec"]
    assert spec["schedule"] == values["schedule"] and spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == values["cronJob"]["timeZone"]
    for key in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        assert spec[key] == values["cronJob"][key]
    assert "create job --from=cronjob/ft-finetune-job" in notes


def test_each_run_gets_the_run_id_of_its_job_unless_one_is_fixed():
    for values_file in ("job-values.yaml", "cronjob-values.yaml"):
        objs, _ = render(ci_values(values_file))
        ref = env(objs)["FT_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert ref == "metadata.labels['batch.kubernetes.io/job-name']"
        assert "FT_RUN_ID" not in one(objs, "ConfigMap")["data"]
    objs, notes = render(with_output(run_id="exp-42"))
    assert "FT_RUN_ID" not in env(objs) and one(objs, "ConfigMap")["data"]["FT_RUN_ID"] == "exp-42"
    assert "s3://bucket/prefix/exp-42/" in notes


def test_notes_tell_how_to_follow_the_logs_and_where_the_adapter_lands():
    objs, notes = render(ci_values("job-values.yaml"))
    name = one(objs, "Job")["metadata"]["name"]
    assert f"kubectl -n ml logs -f job/{name}" in notes
    assert f"s3://ml-artifacts/finetune-job/{name}/" in notes
    assert f"Exit codes {', '.join(map(str, FINAL_CODES))} fail the Job at once" in notes


def test_a_change_of_settings_changes_the_pod_template():
    def checksum(values):
        objs, _ = render(values)
        return job_spec(objs)["template"]["metadata"]["annotations"]["checksum/config"]

    base = with_output()
    assert checksum(base) == checksum(base)
    assert checksum(base) != checksum(with_output(lora_r=8))
    config_map = render_files(base)["finetune-job/templates/configmap.yaml"]
    assert checksum(base) == hashlib.sha256(config_map.encode()).hexdigest()


def test_credentials_come_from_the_secret_only():
    for values_file in ("created-secret-values.yaml", "existing-secret-values.yaml"):
        values = ci_values(values_file)
        objs, _ = render(values)
        secrets = by_kind(objs, "Secret")
        name = values["credentials"].get("existingSecret") or secrets[0]["metadata"]["name"]
        given = values["credentials"].get("values", {})
        refs = {n: e["valueFrom"]["secretKeyRef"] for n, e in env(objs).items()
                if "secretKeyRef" in e.get("valueFrom", {})}
        assert set(refs) == set(given or DEFAULT_VALUES["credentials"]["variables"])
        assert all(r == {"name": name, "key": n, "optional": True} for n, r in refs.items())
        text = yaml.safe_dump([o for o in objs if o["kind"] != "Secret"])
        assert not any(secret in text for secret in given.values())
        if given:
            assert secrets[0]["stringData"] == given
        else:
            assert not secrets
    objs, _ = render(ci_values("job-values.yaml"))
    assert not by_kind(objs, "Secret") and not any("secretKeyRef" in e.get("valueFrom", {}) for e in env(objs).values())


@pytest.mark.parametrize("values_file", ["irsa-values.yaml", "gke-workload-identity-values.yaml"])
def test_the_service_account_carries_the_cloud_identity(values_file):
    values = ci_values(values_file)
    objs, _ = render(values)
    account = one(objs, "ServiceAccount")
    assert account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    assert pod_spec(objs)["serviceAccountName"] == account["metadata"]["name"]
    assert pod_spec(objs)["automountServiceAccountToken"] is False


def test_gpus_and_scheduling_knobs_reach_the_pod():
    values = ci_values("multi-gpu-values.yaml")
    objs, _ = render(values)
    pod, c = pod_spec(objs), container(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["resources"]["requests"] == values["resources"]["requests"]
    for key in ("nodeSelector", "tolerations", "affinity", "runtimeClassName", "priorityClassName",
                "terminationGracePeriodSeconds", "imagePullSecrets"):
        assert pod[key] == values[key], key
    assert c["image"] == f"ghcr.io/example/finetune-job@{values['image']['digest']}"
    assert mounts(objs)["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert job_spec(objs)["template"]["metadata"]["labels"]["team"] == "ml-platform"
    objs, _ = render(ci_values("cpu-values.yaml"))
    assert "nvidia.com/gpu" not in container(objs)["resources"].get("limits", {})


def test_the_model_cache_is_mounted_at_hf_home():
    values = ci_values("pvc-values.yaml")
    objs, _ = render(values)
    claim = one(objs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    hf_home = env(objs)["HF_HOME"]["value"]
    claim_name = claim["metadata"]["name"]
    assert mounts(objs)[hf_home] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim_name}}
    assert mounts(objs)["/results"]["persistentVolumeClaim"] == {"claimName": "team-results"}
    # compiled kernels persist beside the models, so the next run loads them instead of compiling again
    assert env(objs)["TORCHINDUCTOR_CACHE_DIR"]["value"] == f"{hf_home}/torchinductor"
    assert env(objs)["TRITON_CACHE_DIR"]["value"] == f"{hf_home}/triton"

    objs, _ = render(ci_values("existing-claim-values.yaml"))
    assert not by_kind(objs, "PersistentVolumeClaim")
    assert mounts(objs)["/cache/hf"]["persistentVolumeClaim"] == {"claimName": "shared-hf-cache"}
    assert env(objs)["HF_HOME"]["value"] == "/cache/hf"

    objs, _ = render(ci_values("job-values.yaml"))
    assert "emptyDir" in mounts(objs)[env(objs)["HF_HOME"]["value"]]
    assert "TORCHINDUCTOR_CACHE_DIR" not in env(objs)  # the image's /cache/torchinductor, gone with the pod


def test_kueue_queues_the_job_and_the_cronjobs_jobs():
    values = ci_values("kueue-values.yaml")
    objs, notes = render(values)
    job = one(objs, "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 86400
    assert "LocalQueue team-a-gpus" in notes
    objs, _ = render({**values, "schedule": "@daily"})
    template = one(objs, "CronJob")["spec"]["jobTemplate"]
    assert template["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert template["spec"]["suspend"] is True
    objs, _ = render(ci_values("job-values.yaml"))
    assert "kueue.x-k8s.io/queue-name" not in one(objs, "Job")["metadata"]["labels"]
    assert "suspend" not in one(objs, "Job")["spec"]


def test_the_job_ends_cleanly():
    objs, _ = render(with_output(termination_log="/run/reason"))
    spec, c = job_spec(objs), container(objs)
    assert spec["backoffLimit"] == 3 and spec["ttlSecondsAfterFinished"] == 604800
    assert "activeDeadlineSeconds" not in spec
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/run/reason"
    objs, _ = render(with_output())
    assert container(objs)["terminationMessagePath"] == "/dev/termination-log"


def test_notes_warn_when_a_hub_destination_leaves_checkpoints_on_no_persistent_volume():
    """Checkpoints are not pushed to the Hub: without config.checkpoint_uri they stay in the work directory, which a
    retried pod does not get back (the job warns too, at run time, where nobody installing the chart looks)."""
    warning = "a retried pod trains again from step 0"
    _, notes = render(with_output(output_uri="hf://acme/adapter"))
    assert warning in notes and "config.checkpoint_uri" in notes
    _, notes = render(with_output(output_uri="hf://acme/adapter", checkpoint_uri="s3://bucket/ckpt"))
    assert warning not in notes
    _, notes = render(with_output())  # an S3 destination keeps its checkpoints beside the adapter
    assert warning not in notes
