"""Regenerate what the Helm chart derives from the job, and the plain manifests in k8s/ rendered from the chart.

    python scripts/render_k8s.py           # write the generated files (`make k8s`)
    python scripts/render_k8s.py --check   # exit 1 and name the stale files instead (the tests do the same)

Generated: the `config` block of helm/finetune-job/values.yaml (one documented key per field of job/config.py),
the `config` properties of values.schema.json (from the same fields' JSON schema), and k8s/*.yaml (the chart rendered
with helm/finetune-job/ci/plain-manifests-values.yaml through Helm's own engine, helm-python-sdk), with
k8s/multi-node/*.yaml (the same values on two nodes: the Indexed Job, CronJob and Service, and the JobSet).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from job.config import Settings, env_name  # noqa: E402

CHART = ROOT / "helm" / "finetune-job"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
PLAIN_VALUES = CHART / "ci" / "plain-manifests-values.yaml"
K8S = ROOT / "k8s"
RELEASE = "finetune-job"
PLAIN_SCHEDULE = "0 3 * * 0"
MULTI_NODE = "multi-node"
# The plain values on two nodes. The model cache is an emptyDir per pod: k8s/pvc.yaml's claim is ReadWriteOnce, which
# pods on two nodes cannot share.
PLAIN_MULTI_NODE = {"distributed": {"nodes": 2}, "modelCache": {"create": False}}
BEGIN = "  # >>> generated from job/config.py by scripts/render_k8s.py"
END = "  # <<< generated"
# JSON-schema keywords of a field kept in values.schema.json: the constraints and the description, so that Helm
# rejects at install time what the job would reject at start-up.
SCHEMA_KEYWORDS = ("type", "anyOf", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                   "pattern", "minLength", "maxLength", "items", "description", "default")
# Labels and annotations that only make sense in a Helm release (checksums serve `helm upgrade`).
HELM_ONLY = ("helm.sh/chart", "app.kubernetes.io/managed-by", "helm.sh/resource-policy", "checksum/")
# What the chart adds to a setting's meaning, appended to its description in values.yaml.
CHART_NOTES = {
    "run_id": "Chart: when unset, the run id is the Job's name (kept by retries; each scheduled run has its own); "
              "a fixed one is refused with a schedule.",
    "device": "Chart: must agree with gpu.count.",
    "work_dir": "Chart: must lie on a writable volume (/tmp, /cache, the model cache or extraVolumeMounts).",
    "termination_log": "Chart: the container's terminationMessagePath follows it.",
}
FILE_OF_KIND = {"Job": "job.yaml", "CronJob": "cronjob.yaml", "ConfigMap": "configmap.yaml",
                "Secret": "secret.example.yaml", "PersistentVolumeClaim": "pvc.yaml", "ServiceAccount": "serviceaccount.yaml",
                "Service": "service.yaml", "JobSet": "jobset.yaml"}
# What k8s/multi-node/ holds; the other objects are k8s/'s own.
MULTI_NODE_KINDS = ("Job", "CronJob", "Service", "JobSet")
HEADER = "# Generated from helm/finetune-job by `make k8s` (scripts/render_k8s.py): do not edit by hand.\n"


# --- the chart's config values, from job/config.py -------------------------------------------------------------------

def plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _field_schema(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        schema = {**defs[schema["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in schema.items() if k != "$ref"}}
    out = {k: v for k, v in schema.items() if k in SCHEMA_KEYWORDS}
    if "anyOf" in out:
        out["anyOf"] = [_field_schema(s, defs) for s in out["anyOf"]]
    return out


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """The field's schema, also accepting null: a null value keeps the job's default (and overrides another file's)."""
    if "anyOf" in prop:
        if {"type": "null"} not in prop["anyOf"]:
            prop["anyOf"].append({"type": "null"})
    elif "type" in prop:
        prop["type"] = [prop["type"], "null"]
    if "enum" in prop:
        prop["enum"] = [*prop["enum"], None]
    return prop


def config_schema() -> dict[str, Any]:
    """values.schema.json's `config` properties: each field's JSON schema, its variable named in the description."""
    full = Settings.model_json_schema()
    defs = full.get("$defs", {})
    props = {}
    for name, schema in full["properties"].items():
        prop = _nullable(_field_schema(schema, defs))
        prop["description"] = f"{prop.get('description', '').rstrip()} [{env_name(name)}]".strip()
        if "default" in prop:
            prop["default"] = plain(prop["default"])
        props[name] = prop
    return props


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(plain(value), default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


def config_block(explicit: set[str]) -> list[str]:
    """One documented, commented key per setting, with the job's default; settings the chart sets itself are left
    to the hand-written lines above the block."""
    lines = [BEGIN]
    for name, field in Settings.model_fields.items():
        if name in explicit:
            continue
        doc = " ".join(filter(None, ["--", field.description, CHART_NOTES.get(name), f"[{env_name(name)}]"]))
        lines += textwrap.wrap(doc, width=118, initial_indent="  # ", subsequent_indent="  #   ")
        lines.append(f"  # {name}: {_yaml_scalar(field.default)}")
    lines.append(END)
    return lines


def values_yaml(text: str) -> str:
    """values.yaml with its generated block rewritten."""
    lines = text.splitlines()
    try:
        begin, end = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise SystemExit(f"{VALUES}: the markers {BEGIN.strip()!r} and {END.strip()!r} are missing") from None
    explicit = set((yaml.safe_load(text).get("config") or {}))
    return "\n".join(lines[:begin] + config_block(explicit) + lines[end + 1:]) + "\n"


def schema_json(text: str) -> str:
    schema = json.loads(text)
    schema["properties"]["config"]["properties"] = config_schema()
    return json.dumps(schema, indent=2) + "\n"


# --- rendering ---------------------------------------------------------------------------------------------------

def render(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = "default") -> dict[str, str]:
    """The chart's templates rendered by Helm's engine; template path -> text (NOTES.txt included)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a rendering, in template order."""
    docs = []
    for path in sorted(rendered):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(rendered[path]) if d]
    return docs


def load_values(path: Path | str) -> dict[str, Any]:
    """A values file (like `helm -f`), for render(values): a mapping, {} when empty."""
    return yaml.safe_load(Path(path).read_text()) or {}


def _strip_helm(obj: Any) -> Any:
    """The object without Helm's own labels and annotations (and without a mapping they leave empty)."""
    if isinstance(obj, list):
        return [_strip_helm(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        value = _strip_helm(value)
        if key.startswith(HELM_ONLY) or (key in ("labels", "annotations") and value == {}):
            continue
        out[key] = value
    return out


def _dump(obj: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(_strip_helm(obj), sort_keys=False, width=120)


def _multi_node_objects(values: dict[str, Any], shared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects of k8s/multi-node/: the Indexed Job, its CronJob and Service, and the JobSet. The objects they
    share with one node (ConfigMap, Secret, ServiceAccount) must be k8s/'s, which the README tells to apply."""
    values = {**values, **PLAIN_MULTI_NODE}
    variants = [objects(render(values)), objects(render({**values, "schedule": PLAIN_SCHEDULE})),
                objects(render({**values, "distributed": {**values["distributed"], "engine": "jobset"}}))]
    for obj in (o for objs in variants for o in objs if o["kind"] not in MULTI_NODE_KINDS):
        if obj not in shared:
            raise SystemExit(f"{MULTI_NODE}: its {obj['kind']} differs from k8s/{FILE_OF_KIND[obj['kind']]}")
    found = {}
    for obj in (o for objs in variants for o in objs if o["kind"] in MULTI_NODE_KINDS):
        found.setdefault(obj["kind"], obj)
    return list(found.values())


def k8s_manifests() -> dict[str, str]:
    """k8s/ file name (multi-node/ ones with their folder) -> content: the chart rendered for a one-off Job and for a
    CronJob, one object per file, and the same on two nodes."""
    values = load_values(PLAIN_VALUES)
    as_job = objects(render(values))
    as_cron = objects(render({**values, "schedule": PLAIN_SCHEDULE}))
    files = {}
    for obj in as_job + [o for o in as_cron if o["kind"] == "CronJob"]:
        files[FILE_OF_KIND[obj["kind"]]] = _dump(obj)
    files["configmap.yaml"] += _unset_settings(next(o for o in as_job if o["kind"] == "ConfigMap")["data"])
    multi_node = {f"{MULTI_NODE}/{FILE_OF_KIND[o['kind']]}": _dump(o) for o in _multi_node_objects(values, as_job)}
    files["README.md"] = _readme(sorted(files), sorted(multi_node))
    return {**files, **multi_node}


def env_value(value: Any) -> str:
    """A setting's value as its FT_ variable holds it: the chart's rule (envValue in _helpers.tpl)."""
    return value if isinstance(value, str) else json.dumps(plain(value))


def _unset_settings(data: dict[str, str]) -> str:
    """The settings the ConfigMap leaves to the job's defaults, as commented lines to uncomment and edit."""
    lines = ["  # The other settings, with the job's defaults (`finetune-job env` explains each).",
             "  # FT_RUN_ID is set in the Job itself: the Job's name, so that a retry resumes the same run."]
    for name, field in Settings.model_fields.items():
        if env_name(name) in data or name == "run_id":
            continue
        if field.default is None:
            lines.append(f'  # {env_name(name)}: ""  # unset by default')
        else:
            lines.append(f"  # {env_name(name)}: {json.dumps(env_value(field.default))}")
    return "\n".join(lines) + "\n"


def _readme(files: list[str], multi_node: list[str]) -> str:
    return textwrap.dedent(f"""\
        # Plain manifests

        Generated from the Helm chart in `helm/finetune-job` by `make k8s` (values:
        `helm/finetune-job/ci/plain-manifests-values.yaml`); a test fails when they drift from the chart. In this
        repository they are never edited by hand: change the chart or its values and run `make k8s`. To use them,
        copy this folder and edit your copy.

        Files: {', '.join(f'`{f}`' for f in files)}.

        1. Edit `configmap.yaml`: the job's settings, one `FT_*` variable each (`finetune-job env` lists them all);
           `FT_OUTPUT_URI` is where the adapter lands, in `<FT_OUTPUT_URI>/<run id>/`, the run id being the Job's name.
        2. Put your credentials in `secret.example.yaml` (or create the Secret `finetune-job-credentials` yourself;
           its keys are optional: delete the ones you do not use, such as the AWS keys under IRSA; the job refuses a
           key left at `REPLACE_ME`), and set the image in `job.yaml` / `cronjob.yaml`.
        3. `kubectl apply -f serviceaccount.yaml -f configmap.yaml -f secret.example.yaml -f pvc.yaml`, then
           `kubectl apply -f job.yaml` for one run or `kubectl apply -f cronjob.yaml` for a schedule.
        4. `kubectl logs -f job/finetune-job` follows the run. A Job is immutable: delete it before applying it again.

        ## Several nodes

        `{MULTI_NODE}/` holds the same run on two nodes (the chart's `distributed.nodes: 2`), each pod with its own
        model cache (an emptyDir: `pvc.yaml`'s claim is ReadWriteOnce, which two nodes cannot share; mount a
        ReadWriteMany claim instead if you have one): {', '.join(f'`{f}`' for f in multi_node)}. It uses this
        folder's `serviceaccount.yaml`, `configmap.yaml` and `secret.example.yaml` (step 3 without `pvc.yaml`), then:

        - `kubectl apply -f {MULTI_NODE}/service.yaml -f {MULTI_NODE}/job.yaml`: an Indexed Job of two pods and the
          headless Service that names them in DNS (`cronjob.yaml` instead of `job.yaml` for a schedule). Node 0 hosts
          the rendezvous at `MASTER_ADDR`; a pod's node rank is its completion index. One failed pod makes the other
          stop (exit code 8) and both are started again from the last checkpoint, up to `backoffLimit` pod failures
          (3 restarts of the pair).
        - or `kubectl apply -f {MULTI_NODE}/jobset.yaml`, where the JobSet controller is installed: a JobSet that
          creates its own headless Service and restarts both pods on any failure, at most `failurePolicy.maxRestarts`
          times.

        To change the number of nodes, change `completions`, `parallelism`, `FT_NNODES` and `backoffLimit` (3 per
        node) together, or render the chart with another `distributed.nodes`.
        """)


def chart_files() -> dict[Path, str]:
    return {VALUES: values_yaml(VALUES.read_text()), SCHEMA: schema_json(SCHEMA.read_text())}


def k8s_files() -> dict[Path, str]:
    return {K8S / name: text for name, text in k8s_manifests().items()}


def stale(files: dict[Path, str]) -> list[Path]:
    """Files whose content on disk differs from `files`, and files in k8s/ that are not generated any more."""
    out = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if any(p.is_relative_to(K8S) for p in files):
        out += [p for p in sorted(K8S.rglob("*")) if p.is_file() and p not in files]
    return out


def report_stale(old: list[Path], target: str) -> int:
    """Name the stale files on stderr; 1 when there are any, else 0 (the --check exit code)."""
    for p in old:
        print(f"stale: {p.relative_to(ROOT)}", file=sys.stderr)
    if old:
        print(f"run `make {target}` to regenerate", file=sys.stderr)
    return 1 if old else 0


def write_stale(current: dict[Path, str], old: list[Path]) -> None:
    """Write the stale files of `current`; delete the stale ones it does not hold any more."""
    for p in old:
        if p in current:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(current[p])
        else:
            p.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if there are any")
    args = parser.parse_args(argv)
    if args.check:
        # k8s/ is rendered from the chart on disk, so it is only worth comparing once the chart is current.
        return report_stale(stale(chart_files()) or stale(k8s_files()), "k8s")
    for files in (chart_files, k8s_files):  # in this order: the rendering reads the chart's new values and schema
        current = files()
        write_stale(current, stale(current))
    return 0


if __name__ == "__main__":
    sys.exit(main())
