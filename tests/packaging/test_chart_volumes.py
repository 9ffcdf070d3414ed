"""The pod the chart renders can write where the image writes: /tmp and /cache are volumes that UID 10001 owns a way
into under the restricted Pod Security Standard (no root, no capabilities, read-only root filesystem)."""

from __future__ import annotations

import pytest
from chart_support import CI_FILES, ci_values, container, pod_spec, render

WRITABLE = ("/tmp", "/cache")


@pytest.fixture(scope="module", params=CI_FILES, ids=[p.name for p in CI_FILES])
def objs(request):
    return render(ci_values(request.param.name))[0]


def writers(objs) -> tuple[int, set[int]]:
    """The container's UID and the GIDs it writes with: its group and the pod's fsGroup and supplementalGroups."""
    pod_ctx = pod_spec(objs).get("securityContext", {})
    ctx = {**pod_ctx, **container(objs).get("securityContext", {})}
    groups = {ctx.get("runAsGroup"), pod_ctx.get("fsGroup"), *pod_ctx.get("supplementalGroups", [])} - {None}
    return ctx["runAsUser"], groups


def test_the_job_runs_as_the_images_user_with_the_volumes_group(objs):
    uid, groups = writers(objs)
    assert uid == 10001
    # fsGroup is what makes a volume the pod's: Kubernetes gives it to the volume's files (an emptyDir is created
    # group-writable with the setgid bit), so the job's UID writes there whatever the node's defaults.
    assert pod_spec(objs)["securityContext"].get("fsGroup") == 10001 and 10001 in groups


@pytest.mark.parametrize("path", WRITABLE)
def test_tmp_and_cache_are_writable_volumes_not_the_read_only_root(objs, path):
    mounts = {m["mountPath"]: m for m in container(objs)["volumeMounts"]}
    assert path in mounts, f"{path} is not a volume: with readOnlyRootFilesystem the job cannot write there"
    mount = mounts[path]
    assert not mount.get("readOnly") and not mount.get("subPath") and not mount.get("subPathExpr")
    (volume,) = [v for v in pod_spec(objs)["volumes"] if v["name"] == mount["name"]]
    # emptyDir (or a claim) honours fsGroup; a hostPath, configMap or secret would not be writable for UID 10001.
    assert {"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(volume), volume
    assert container(objs)["securityContext"]["readOnlyRootFilesystem"] is True
