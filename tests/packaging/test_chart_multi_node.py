"""Several nodes training one model: the Indexed Job (or the CronJob's Indexed Jobs) and its headless Service, or the
JobSet; every pod finds node 0's rendezvous by DNS, knows how many nodes there are, and names the same run; a failed
pod restarts the group, a final exit code stops it."""

from __future__ import annotations

import copy
import re

import helm_python as helm
import pytest
from job.errors import EXIT_CODES
from chart_support import (
    CHART, JOBSET_CRD, by_kind, ci_values, container, env, job_spec, jobset_errors, one, pod_spec, render, rk,
    with_output, workload,
)

# How the CronJob controller names a scheduled run's Job (minutes since the epoch).
SCHEDULED_JOB = "ft-finetune-job-29383920"
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def expand(value: str, defined: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of an env value, from the variables defined before it (others stay as written)."""
    return re.sub(r"\$\((\w+)\)", lambda m: defined.get(m.group(1), m.group(0)), value)


def pod_env(objs, job_name: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the pods of the Job `job_name` see it: downward-API labels resolved (the Job
    controller labels its pods with the Job's name, the JobSet controller with the JobSet's) and $(VAR) expanded
    in order, as the kubelet does."""
    labels = {"batch.kubernetes.io/job-name": job_name, **(labels or {})}
    seen: dict[str, str] = {}
    for entry in container(objs)["env"]:
        if "value" in entry:
            seen[entry["name"]] = expand(entry["value"], seen)
        elif "fieldRef" in entry.get("valueFrom", {}):
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", entry["valueFrom"]["fieldRef"]["fieldPath"])
            seen[entry["name"]] = labels[label.group(1)]
    return seen


def hostname(job_name: str, index: int) -> str:
    """The hostname the Job controller gives pod `index` of an Indexed Job."""
    return f"{job_name}-{index}"


def rendezvous_port(objs) -> int:
    """The container's rendezvous port; the headless Service, where the chart renders one, publishes it."""
    (port,) = container(objs)["ports"]
    assert port["name"] == "rendezvous" and port["protocol"] == "TCP"
    for service in by_kind(objs, "Service"):
        assert service["spec"]["ports"] == [{"name": "rendezvous", "port": port["containerPort"],
                                             "targetPort": "rendezvous", "protocol": "TCP"}]
    return port["containerPort"]


@pytest.mark.parametrize("values_file, job_name", [("multi-node-values.yaml", "ft-finetune-job"),
                                                    ("multi-node-cronjob-values.yaml", SCHEDULED_JOB)])
def test_several_nodes_make_an_indexed_job_whose_pods_find_pod_0(values_file, job_name):
    values = ci_values(values_file)
    nodes = values["distributed"]["nodes"]
    objs, _ = render(values)
    spec, pod = job_spec(objs), pod_spec(objs)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert pod["restartPolicy"] == "Never"
    if workload(objs)["kind"] == "Job":
        assert workload(objs)["metadata"]["name"] == job_name
    variables = pod_env(objs, job_name)
    assert variables["FT_NNODES"] == str(spec["completions"])
    assert variables["FT_RUN_ID"] == job_name  # the same on every pod of the Job
    # Node 0 (index 0) hosts the rendezvous: MASTER_ADDR is its DNS name in the Service's subdomain.
    service = one(objs, "Service")
    assert pod["subdomain"] == service["metadata"]["name"]
    assert variables["MASTER_ADDR"] == f"{hostname(job_name, 0)}.{service['metadata']['name']}"
    assert variables["MASTER_PORT"] == str(rendezvous_port(objs)) == str(values["distributed"].get("port", 29500))
    assert all(DNS_LABEL.match(hostname(job_name, i)) and len(hostname(job_name, i)) <= 63 for i in range(nodes))
    # The rank is the completion index, which Kubernetes sets; nothing in the chart fixes it.
    assert "FT_NODE_RANK" not in variables and "FT_NODE_RANK" not in one(objs, "ConfigMap")["data"]


def test_the_scheduled_job_is_the_one_off_job():
    values = ci_values("multi-node-cronjob-values.yaml")
    cron, _ = render(values)
    job, _ = render({**values, "schedule": ""})
    assert job_spec(cron) == job_spec(job)
    assert one(cron, "Service") == one(job, "Service")


def test_one_node_is_a_plain_job():
    objs, _ = render(ci_values("multi-gpu-values.yaml"))
    spec, pod = job_spec(objs), pod_spec(objs)
    assert not {"completionMode", "completions", "parallelism"} & set(spec)
    assert spec["backoffLimit"] == 3
    assert "subdomain" not in pod and "ports" not in container(objs)
    assert not {"FT_NNODES", "MASTER_ADDR", "MASTER_PORT", "JOB_NAME"} & set(env(objs))
    assert not by_kind(objs, "Service") and not by_kind(objs, "JobSet")


def test_the_headless_service_selects_this_releases_training_pods_only():
    values = ci_values("multi-node-values.yaml")
    objs, _ = render(values)
    service = one(objs, "Service")
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    assert DNS_LABEL.match(service["metadata"]["name"]) and len(service["metadata"]["name"]) <= 63
    selector = spec["selector"].items()
    assert selector <= job_spec(objs)["template"]["metadata"]["labels"].items()
    # The pods of another release of the chart in the namespace, and this release's other objects, are not selected.
    other = rk.objects(rk.render(values, name="other", namespace="ml"))
    assert not selector <= job_spec(other)["template"]["metadata"]["labels"].items()
    assert one(other, "Service")["metadata"]["name"] != service["metadata"]["name"]
    assert {"app.kubernetes.io/instance", "app.kubernetes.io/component"} <= dict(selector).keys()


def test_a_failure_restarts_the_whole_group_and_a_final_code_stops_it():
    values = ci_values("multi-node-values.yaml")
    objs, _ = render(values)
    spec = job_spec(objs)
    single, _ = render({**values, "distributed": {"nodes": 1}, "modelCache": {"create": False}})
    # One failure ends every pod of the group (the survivors with exit code 8): the budget is per node.
    assert spec["backoffLimit"] == 3 * values["distributed"]["nodes"]
    assert job_spec(single)["backoffLimit"] == 3
    # Final exit codes fail the Job at once and disruptions do not count, as on one node.
    assert spec["podFailurePolicy"] == job_spec(single)["podFailurePolicy"]
    # Kubernetes 1.27 has no backoffLimitPerIndex; the chart relies on none of the newer Job fields.
    assert not {"backoffLimitPerIndex", "maxFailedIndexes", "podReplacementPolicy", "successPolicy"} & set(spec)


def test_the_jobset_runs_the_same_pods_and_restarts_them_together():
    values = ci_values("jobset-values.yaml")
    nodes = values["distributed"]["nodes"]
    objs, notes = render(values)
    jobset = one(objs, "JobSet")
    assert not by_kind(objs, "Job") and not by_kind(objs, "CronJob")
    assert not by_kind(objs, "Service")  # the JobSet controller creates it for network.enableDNSHostnames
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 1
    spec, pod = job_spec(objs), pod_spec(objs)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    # Any failed pod fails the Job; the JobSet recreates every pod, at most job.backoffLimit times...
    assert spec["backoffLimit"] == 0
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == values["job"]["backoffLimit"]
    # ...except when the Job failed on a final exit code (its podFailurePolicy) or its deadline.
    assert policy["rules"] == [
        {"name": "FinalExitCode", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
        {"name": "DeadlineExceeded", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]}]
    fail_job = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_job[0]["onExitCodes"]["values"] == [e.code for e in EXIT_CODES if e.code and not e.retriable]
    assert spec["activeDeadlineSeconds"] == values["job"]["activeDeadlineSeconds"]
    # The JobSet is what Kueue suspends and what the TTL deletes.
    assert jobset["spec"]["suspend"] is True and "suspend" not in spec
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 604800 and "ttlSecondsAfterFinished" not in spec
    # Pod i of Job 0 of the replicatedJob is `<jobset>-<replicatedJob>-0-<i>.<subdomain>`.
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True and pod["subdomain"] == network["subdomain"]
    name = jobset["metadata"]["name"]
    job_name = f"{name}-{replicated['name']}-0"
    variables = pod_env(objs, job_name, {"jobset.sigs.k8s.io/jobset-name": name})
    assert variables["MASTER_ADDR"] == f"{hostname(job_name, 0)}.{network['subdomain']}"
    assert variables["FT_NNODES"] == str(nodes) and variables["MASTER_PORT"] == str(rendezvous_port(objs))
    # The run id is the JobSet's name: the same on every node, and kept when the JobSet recreates its Job.
    assert variables["FT_RUN_ID"] == name
    assert f"jobset.sigs.k8s.io/jobset-name={name}" in notes and f"jobset/{name}" in notes


def test_the_jobset_meets_its_crd_and_the_crd_check_can_fail():
    jobset = one(render(ci_values("jobset-values.yaml"))[0], "JobSet")
    assert jobset_errors(jobset) == []
    broken = [
        ("failurePolicy", "rules", 0, "action", "Restart"),
        ("failurePolicy", "maxRestarts", "3"),
        ("network", "enableDnsHostnames", True),
        ("replicatedJobs", 0, "template", "spec", "backOffLimit", 0),
    ]
    for *path, key, value in broken:
        obj = copy.deepcopy(jobset)
        target = obj["spec"]
        for step in path:
            target = target[step]
        target[key] = value
        assert jobset_errors(obj), f"spec.{'.'.join(map(str, path + [key]))}={value!r} passed the CRD's schema"
    del obj["spec"]["replicatedJobs"][0]["name"]
    assert any("'name' is a required property" in e for e in jobset_errors(obj))


def test_the_vendored_crd_says_where_it_comes_from():
    commit = re.search(r"at commit\s+(?:#\s*)?([0-9a-f]{40})", JOBSET_CRD.read_text()).group(1)
    readme = (JOBSET_CRD.parent / "README.md").read_text()
    assert commit in readme and "kubernetes-sigs/jobset" in readme
    assert "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml" in readme


@pytest.mark.parametrize("engine, schedule", [("job", "@daily"), ("jobset", "")])
def test_the_longest_name_the_pod_hostnames_allow_renders(engine, schedule):
    """The chart refuses a name one character too long for the last pod's hostname, and renders the one below."""
    values = {**with_output(gradient_accumulation_steps=3), "schedule": schedule,  # 12 samples per step: one each
              "distributed": {"nodes": 12, "engine": engine}}
    with pytest.raises(helm.HelmRenderError, match=r"set fullnameOverride to at most (\d+) characters") as raised:
        render({**values, "fullnameOverride": "x" * 52})
    longest = int(re.search(r"at most (\d+) characters", str(raised.value)).group(1))
    with pytest.raises(helm.HelmRenderError, match="too long for 12 nodes"):
        render({**values, "fullnameOverride": "x" * (longest + 1)})
    objs, _ = render({**values, "fullnameOverride": "x" * longest})
    assert workload(objs)["metadata"]["name"] == "x" * longest
    job_name = "x" * longest + ("-node-0" if engine == "jobset" else "-29383920")
    assert len(hostname(job_name, 11)) <= 63


def test_a_one_off_jobs_hostnames_always_fit():
    objs, _ = render({**with_output(batch_size=1, gradient_accumulation_steps=99), "distributed": {"nodes": 99},
                      "fullnameOverride": "x" * 52})
    assert len(hostname(workload(objs)["metadata"]["name"], 98)) <= 63


def test_the_chart_readme_explains_the_failure_policy():
    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Multi-node"):]
    for fragment in ("exit code 8", "backoffLimit", "maxRestarts", "checkpoint", "backoffLimitPerIndex",
                     "publishNotReadyAddresses", "JobSet"):
        assert fragment in section, fragment
