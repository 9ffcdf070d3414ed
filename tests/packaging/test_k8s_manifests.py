"""k8s/ holds the chart rendered for users without Helm; it must be what `make k8s` writes today, and valid."""

from __future__ import annotations

import pytest
import yaml
from chart_support import NEWEST_KUBERNETES, OLDEST_KUBERNETES, rk, validation_errors

MANIFESTS = sorted(rk.K8S.glob("*.yaml"))
MULTI_NODE = rk.K8S / rk.MULTI_NODE
MULTI_NODE_MANIFESTS = sorted(MULTI_NODE.glob("*.yaml"))


def test_k8s_and_the_charts_generated_values_are_current():
    stale = rk.stale(rk.chart_files()) or rk.stale(rk.k8s_files())
    assert not stale, f"stale, run `make k8s`: {[str(p.relative_to(rk.ROOT)) for p in stale]}"


def test_there_is_a_manifest_for_each_object_a_user_needs():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"Job", "CronJob", "ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount"}


def test_the_multi_node_folder_holds_what_differs_on_several_nodes():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MULTI_NODE_MANIFESTS}
    assert kinds == {"Job", "CronJob", "Service", "JobSet"}
    assert {p.name for p in MULTI_NODE.iterdir()} == {p.name for p in MULTI_NODE_MANIFESTS}
    readme = (rk.K8S / "README.md").read_text()
    assert all(f"`{rk.MULTI_NODE}/{p.name}`" in readme for p in MULTI_NODE_MANIFESTS)


@pytest.mark.parametrize("kube_version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("path", MANIFESTS + MULTI_NODE_MANIFESTS,
                         ids=[str(p.relative_to(rk.K8S)) for p in MANIFESTS + MULTI_NODE_MANIFESTS])
def test_each_manifest_is_valid_kubernetes_without_helm_traces(path, kube_version):
    text = path.read_text()
    assert text.startswith(rk.HEADER)
    (obj,) = [d for d in yaml.safe_load_all(text) if d]
    assert validation_errors(obj, kube_version) == []
    for helm_only in ("helm.sh/", "app.kubernetes.io/managed-by", "checksum/", "{{"):
        assert helm_only not in text


@pytest.mark.parametrize("folder", [rk.K8S, MULTI_NODE], ids=["k8s", rk.MULTI_NODE])
def test_the_job_and_the_cronjob_run_the_same_pod(folder):
    job = yaml.safe_load((folder / "job.yaml").read_text())
    cron = yaml.safe_load((folder / "cronjob.yaml").read_text())
    assert cron["spec"]["jobTemplate"]["spec"] == job["spec"]
    assert cron["spec"]["schedule"] == rk.PLAIN_SCHEDULE


def test_the_multi_node_manifests_run_two_nodes_that_find_each_other():
    job = yaml.safe_load((MULTI_NODE / "job.yaml").read_text())
    service = yaml.safe_load((MULTI_NODE / "service.yaml").read_text())
    jobset = yaml.safe_load((MULTI_NODE / "jobset.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    variables = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(variables["FT_NNODES"]) == 2
    assert pod["subdomain"] == service["metadata"]["name"]
    assert variables["MASTER_ADDR"] == f"$(JOB_NAME)-0.{service['metadata']['name']}"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # The JobSet runs the same pod, but for what only it knows: its name, and its own restarts.
    jobset_pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    differ = {"env"}
    assert {k: v for k, v in jobset_pod.items() if k != "containers"} == {k: v for k, v in pod.items() if k != "containers"}
    assert ({k: v for k, v in jobset_pod["containers"][0].items() if k not in differ}
            == {k: v for k, v in pod["containers"][0].items() if k not in differ})
    # The one-node objects (ConfigMap, Secret, ServiceAccount) serve both: k8s/ holds them once.
    assert not (MULTI_NODE / "configmap.yaml").exists()


def test_the_configmap_lists_every_other_setting_commented():
    text = (rk.K8S / "configmap.yaml").read_text()
    data = yaml.safe_load(text)["data"]
    for name in rk.Settings.model_fields:
        variable = rk.env_name(name)
        assert variable in data or f"  # {variable}: " in text or name == "run_id", variable
