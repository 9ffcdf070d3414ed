"""Rendering the chart and looking into what it renders, for the packaging tests (no cluster, helm or docker: the
chart goes through Helm's own engine, helm-python-sdk). Also gives the tests scripts/render_k8s.py as `rk`.

Not a conftest.py: tests/conftest.py is imported by name (`from conftest import ...`) by the job's tests.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import render_k8s as rk  # noqa: E402

CHART = rk.CHART
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
# The chart's floor (Chart.yaml's kubeVersion) and the newest version kubernetes-validate knows.
OLDEST_KUBERNETES = "1.27"
NEWEST_KUBERNETES = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())
RELEASE = "ft"
NOTES = "finetune-job/templates/NOTES.txt"
JOBSET_CRD = Path(__file__).resolve().parent / "schemas" / "jobset.x-k8s.io_jobsets.yaml"
WORKLOADS = ("Job", "CronJob", "JobSet")

helm.disable_logging()


def ci_values(name: str) -> dict[str, Any]:
    return rk.load_values(CHART / "ci" / name)


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text."""
    return rk.render(values, name=RELEASE, namespace="ml")


def render(values: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """The objects the chart renders for these values, and its NOTES.txt."""
    rendered = render_files(values)
    return rk.objects(rendered), rendered.get(NOTES, "")


def with_output(values: dict[str, Any] | None = None, **config: Any) -> dict[str, Any]:
    """Values that name a destination (the chart requires one), plus these settings."""
    values = dict(values or {})
    values["config"] = {"output_uri": "s3://bucket/prefix", **values.get("config", {}), **config}
    return values


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def workload(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one object that runs the pods: the Job, the CronJob or the JobSet."""
    found = [o for o in objs if o["kind"] in WORKLOADS]
    assert len(found) == 1, [o["kind"] for o in found]
    return found[0]


def job_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The spec of the Job, of the Jobs the CronJob creates, or of the JobSet's one Job."""
    w = workload(objs)
    if w["kind"] == "CronJob":
        return w["spec"]["jobTemplate"]["spec"]
    if w["kind"] == "JobSet":
        (replicated,) = w["spec"]["replicatedJobs"]
        return replicated["template"]["spec"]
    return w["spec"]


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return job_spec(objs)["template"]["spec"]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objs)["containers"]
    assert len(containers) == 1
    return containers[0]


def env(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The container's env entries by name."""
    return {e["name"]: e for e in container(objs).get("env", [])}


def mounts(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod's volumes by the path they are mounted at."""
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container(objs)["volumeMounts"]}


# --- validation against the Kubernetes schemas, and the JobSet CRD's ------------------------------------------------

def _strict(schema: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as a JSON schema that refuses the fields a structural schema would prune."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def jobset_schema() -> dict[str, Any]:
    """The JSON schema of a jobset.x-k8s.io/v1alpha2 JobSet, from the vendored CRD (schemas/README.md)."""
    crd = yaml.safe_load(JOBSET_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    return _strict(version["schema"]["openAPIV3Schema"])


def jobset_errors(obj: dict[str, Any]) -> list[str]:
    """What the JobSet CRD's schema finds wrong with a JobSet, one 'path: message' each."""
    validator = jsonschema.Draft7Validator(jobset_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def jobset_job(obj: dict[str, Any]) -> dict[str, Any]:
    """The JobSet's Job template as the batch/v1 Job the JobSet controller creates from it."""
    (replicated,) = obj["spec"]["replicatedJobs"]
    name = f"{obj['metadata']['name']}-{replicated['name']}-0"
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {**replicated["template"].get("metadata", {}), "name": name}, "spec": replicated["template"]["spec"]}


def validation_errors(obj: dict[str, Any], kube_version: str) -> list[str]:
    """What the OpenAPI schema of Kubernetes `kube_version` finds wrong with the object; a JobSet goes through the
    JobSet CRD's schema, and its Job (pod spec included) through Kubernetes' own."""
    if obj["kind"] == "JobSet":
        return jobset_errors(obj) + validation_errors(jobset_job(obj), kube_version)
    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []
