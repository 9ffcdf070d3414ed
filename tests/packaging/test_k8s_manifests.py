"""k8s/ holds the chart rendered for users without Helm; it must be what `make k8s` writes today, and valid."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from chart_support import NEWEST_KUBERNETES, OLDEST_KUBERNETES, rk

MANIFESTS = sorted(rk.K8S.glob("*.yaml"))


def test_k8s_and_the_charts_generated_values_are_current():
    stale = rk.stale(rk.chart_files()) or rk.stale(rk.k8s_files())
    assert not stale, f"stale, run `make k8s`: {[str(p.relative_to(rk.ROOT)) for p in stale]}"


def test_there_is_a_manifest_for_each_object_a_user_needs():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"Job", "CronJob", "ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount"}


@pytest.mark.parametrize("kube_version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_each_manifest_is_valid_kubernetes_without_helm_traces(path, kube_version):
    text = path.read_text()
    assert text.startswith(rk.HEADER)
    (obj,) = [d for d in yaml.safe_load_all(text) if d]
    kubernetes_validate.validate(obj, kube_version, strict=True)
    for helm_only in ("helm.sh/", "app.kubernetes.io/managed-by", "checksum/", "{{"):
        assert helm_only not in text


def test_the_job_and_the_cronjob_run_the_same_pod():
    job = yaml.safe_load((rk.K8S / "job.yaml").read_text())
    cron = yaml.safe_load((rk.K8S / "cronjob.yaml").read_text())
    assert cron["spec"]["jobTemplate"]["spec"] == job["spec"]
    assert cron["spec"]["schedule"] == rk.PLAIN_SCHEDULE


def test_the_configmap_lists_every_other_setting_commented():
    text = (rk.K8S / "configmap.yaml").read_text()
    data = yaml.safe_load(text)["data"]
    for name in rk.Settings.model_fields:
        variable = rk.env_name(name)
        assert variable in data or f"  # {variable}: " in text or name == "run_id", variable
