"""Rendering the chart and looking into what it renders, for the packaging tests (no cluster, helm or docker: the
chart goes through Helm's own engine, helm-python-sdk). Also gives the tests scripts/render_k8s.py as `rk`.

Not a conftest.py: tests/conftest.py is imported by name (`from conftest import ...`) by the job's tests.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import render_k8s as rk  # noqa: E402

CHART = rk.CHART
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
# The chart's floor (Chart.yaml's kubeVersion) and the newest version kubernetes-validate knows.
OLDEST_KUBERNETES = "1.27"
NEWEST_KUBERNETES = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())
RELEASE = "ft"
NOTES = "finetune-job/templates/NOTES.txt"

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


def job_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The spec of the Job, or of the Jobs the CronJob creates."""
    workloads = by_kind(objs, "Job") + by_kind(objs, "CronJob")
    assert len(workloads) == 1, [o["kind"] for o in workloads]
    w = workloads[0]
    return w["spec"] if w["kind"] == "Job" else w["spec"]["jobTemplate"]["spec"]


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
