"""The soak: a run interrupted by SIGTERM or kill -9 at a random moment, started again until an attempt that nobody
interrupted ends with 0, then compared with an uninterrupted run of the same recipe. tests/e2e/test_soak.py runs a
few trials (pytest -m slow); bench/soak.py runs many and prints a table.

A moment is a phase of the run, found by the log line that starts it (its n-th occurrence), and a delay after that
line, drawn uniformly from the time the phase took in the uninterrupted run: so every moment of a phase is as
likely, however short the phase (a clean-up of 0.1 s, a training of 1 s). "start-up" and "anytime" count from the
start of the process. Each trial's moments come from a seed that is printed, so a failure can be replayed.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLOW = ROOT / "tests" / "e2e" / "slow_checkpoints"  # sitecustomize.py: slower uploads and deletions, wider phases
INTERRUPTED = 7  # job.errors.EXIT_CODES["interrupted"] (tests/e2e/test_soak.py checks they agree)
SIGNALS = {"sigterm": signal.SIGTERM, "kill": signal.SIGKILL}
# What an attempt may end with. SIGTERM: 7, or 0 once the manifest is written (the run's outcome is decided) or when
# the signal came after the run had ended; kill -9: -9, or 0 likewise. Never 1 (a bug) or any other code.
ALLOWED = {"sigterm": {0, INTERRUPTED}, "kill": {0, -signal.SIGKILL}, None: {0}}

# The recipe: 12 steps, a checkpoint every 3 (mirrored next to the results), TensorBoard copied there every 0.5 s.
RECIPE = {"FT_MAX_STEPS": "12", "FT_SAVE_STEPS": "3", "FT_SAVE_MINUTES": "0", "FT_LOGGING_STEPS": "1",
          "FT_EVAL_STEPS": "6", "FT_TB_SYNC_SECONDS": "0.5", "FT_OVERWRITE": "false"}
# Seconds per uploaded or deleted file (SLOW): wide enough phases for a signal to land inside them.
SLOWDOWN = {"SLOW_CHECKPOINT_PUT": "0.02", "SLOW_RESULT_PUT": "0.05", "SLOW_CHECKPOINT_DELETE": "0.02"}

# phase: (the log line that starts it, the one that ends it; None: the process's start / its exit)
PHASES = {
    "start-up": (None, "training started"),
    "training": ("training started", "publishing"),  # evaluations and the quality report included
    "mirroring": ("mirroring checkpoint", "checkpoint mirrored"),
    "publishing": ("publishing", "published"),
    "clean-up": ("published", None),
    "anytime": (None, None),
}
# Before the interpreter has run a line of Python no handler can exist (the process dies of SIGTERM, -15): moments
# counted from the start begin here.
EARLIEST = 0.1


@dataclass
class Moment:
    """When a signal lands: `delay` seconds after the `occurrence`-th (from 1) log line `anchor` (None: the start)."""

    how: str  # "sigterm" or "kill"
    phase: str
    anchor: str | None
    occurrence: int
    delay: float

    def __str__(self) -> str:
        where = "start" if self.anchor is None else f"'{self.anchor}' #{self.occurrence}"
        return f"{self.how} in {self.phase} ({where} + {self.delay:.3f} s)"


@dataclass
class Attempt:
    """One start of the job: its exit code, the log lines with their seconds since the start, whether a signal was
    sent (and when)."""

    code: int
    seconds: float
    lines: list[tuple[float, str]]
    moment: Moment | None = None
    signalled_at: float | None = None

    def events(self) -> list[tuple[float, dict]]:
        found = []
        for t, line in self.lines:
            if line.startswith("{"):
                try:
                    found.append((t, json.loads(line)))
                except json.JSONDecodeError:  # a line cut short by kill -9
                    pass
        return found

    def names(self) -> list[str]:
        return [e["event"] for _, e in self.events()]

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def start_job(env: dict[str, str], moment: Moment | None = None, timeout: float = 600) -> Attempt:
    """Run `python -m job` with `env` and send `moment`'s signal at its moment (not at all when it ended first)."""
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    started, lines, sent = time.monotonic(), [], []

    def fire():
        if proc.poll() is None:
            proc.send_signal(SIGNALS[moment.how])
            sent.append(time.monotonic() - started)

    timer = None
    if moment is not None and moment.anchor is None:
        timer = threading.Timer(moment.delay, fire)
        timer.start()
    seen = 0
    for line in proc.stdout:
        lines.append((time.monotonic() - started, line))
        if timer is None and moment is not None and event_name(line) == moment.anchor:
            seen += 1
            if seen == moment.occurrence:
                timer = threading.Timer(moment.delay, fire)
                timer.start()
    code = proc.wait(timeout=timeout)
    if timer is not None:
        timer.cancel()
        timer.join()
    return Attempt(code, time.monotonic() - started, lines, moment, sent[0] if sent else None)


def event_name(line: str) -> str | None:
    """The event of a JSON log line (None: another line, or one cut short by kill -9)."""
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line).get("event")
    except json.JSONDecodeError:
        return None


def timeline(run: Attempt) -> dict[str, list[float]]:
    """When each log line came in the uninterrupted run, in seconds since its start; "exit" when it ended."""
    found: dict[str, list[float]] = {"exit": [run.seconds]}
    for t, e in run.events():
        found.setdefault(e["event"], []).append(t)
    return found


def draw(rng: random.Random, how: str, phase: str, times: dict[str, list[float]]) -> Moment:
    """A moment of `phase`, uniform over the time it took in the uninterrupted run (`times`: timeline())."""
    anchor, end = PHASES[phase]
    occurrence = rng.randint(1, len(times[anchor])) if anchor else 1
    begin = times[anchor][occurrence - 1] if anchor else 0.0
    finish = min((t for t in times[end or "exit"] if t > begin), default=times["exit"][0])
    low = EARLIEST if anchor is None else 0.0
    return Moment(how, phase, anchor, occurrence, round(rng.uniform(low, max(low, finish - begin)), 4))


@dataclass
class Result:
    """What a trial did and what was wrong with it (`problems` empty: it held)."""

    moments: list[str]
    codes: list[int]
    signalled_at: list[float | None]
    trained_steps: list[int]  # optimizer steps each attempt trained
    seconds: float
    max_diff: float | None = None
    identical: bool = False
    retrained_after_publishing: bool = False
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def trial(env: dict[str, str], moments: list[Moment], view, expected: dict, max_attempts: int = 5) -> Result:
    """Start the job with `moments[i]` for its i-th attempt (none after them) until an attempt that was not
    interrupted ends 0; check every exit code, the published run (`view`: LocalRun or S3Run) against `expected`
    (baseline()) and that a published manifest never changes."""
    began, attempts, problems, manifest = time.monotonic(), [], [], None
    retrained = False
    for i in range(max_attempts):
        moment = moments[i] if i < len(moments) else None
        run = start_job(env, moment)
        attempts.append(run)
        how = moment.how if moment and run.signalled_at is not None else None
        if run.code not in ALLOWED[how]:
            problems.append(f"attempt {i + 1} ({moment or 'no signal'}) exited {run.code}: {tail(run)}")
        if "Traceback" in run.text():
            problems.append(f"attempt {i + 1} ({moment or 'no signal'}) printed a traceback: {tail(run, 'Traceback')}")
        published = view.files().get("manifest.json")
        if manifest is not None:
            retrained |= "training started" in run.names()
            if published != manifest:
                problems.append(f"attempt {i + 1} changed the published manifest")
        manifest = manifest or published
        if run.code == 0 and how is None:
            break
    else:
        problems.append(f"no attempt of {max_attempts} ended 0 without a signal")
    result = Result([str(m) for m in moments], [a.code for a in attempts], [a.signalled_at for a in attempts],
                    [a.names().count("train step") for a in attempts], round(time.monotonic() - began, 2),
                    retrained_after_publishing=retrained, problems=problems)
    if retrained:
        problems.append("an attempt trained again after the run was published")
    check_published(view.files(), expected, result)
    return result


def tail(run: Attempt, start: str | None = None, chars: int = 1500) -> str:
    text = run.text()
    at = text.find(start) if start else -1
    return text[at:at + chars] if at >= 0 else text[-chars:]


def check_published(files: dict[str, bytes], expected: dict, result: Result) -> None:
    """The run's folder holds exactly its manifest's files with their checksums, no checkpoint, the number of
    steps of the uninterrupted run and its adapter (within 1e-6, or bit for bit)."""
    import torch
    from safetensors.torch import load

    problems = result.problems
    if "manifest.json" not in files:
        problems.append("nothing published: no manifest.json")
        return
    manifest = json.loads(files["manifest.json"])
    left = sorted(k for k in files if k.startswith("checkpoints/"))
    if left:
        problems.append(f"checkpoints left: {left[:4]}{' ...' if len(left) > 4 else ''}")
    extra = set(files) - set(manifest["files"]) - {"manifest.json"} - set(left)
    missing = set(manifest["files"]) - set(files)
    if extra or missing:
        problems.append(f"published files differ from the manifest: extra {sorted(extra)}, missing {sorted(missing)}")
    bad = [k for k, e in manifest["files"].items()
           if k in files and hashlib.sha256(files[k]).hexdigest() != e["sha256"]]
    if bad:
        problems.append(f"checksums do not match the manifest: {bad}")
    if manifest["training"]["steps"] != expected["steps"]:
        problems.append(f"{manifest['training']['steps']} steps published, {expected['steps']} expected")
    adapter = files.get("adapter/adapter_model.safetensors")
    if adapter is None:
        problems.append("no adapter published")
        return
    got, want = load(adapter), expected["adapter"]
    if got.keys() != want.keys():
        problems.append("the adapter's tensors are not the uninterrupted run's")
        return
    result.max_diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    result.identical = all(torch.equal(got[k], want[k]) for k in want)
    if result.max_diff > 1e-6:
        problems.append(f"the adapter differs from the uninterrupted run's by up to {result.max_diff:.3g}")


def baseline(env: dict[str, str], view) -> dict:
    """Train once without a signal: the adapter, steps and timeline that every trial is compared with."""
    from safetensors.torch import load

    run = start_job(env)
    if run.code != 0:
        raise RuntimeError(f"the uninterrupted run exited {run.code}: {tail(run)}")
    files = view.files()
    manifest = json.loads(files["manifest.json"])
    return {"adapter": load(files["adapter/adapter_model.safetensors"]), "steps": manifest["training"]["steps"],
            "times": timeline(run), "seconds": run.seconds}


class LocalRun:
    """The published run in a local folder: every file under it, by its path relative to the run."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def files(self) -> dict[str, bytes]:
        if not self.run_dir.is_dir():
            return {}
        return {p.relative_to(self.run_dir).as_posix(): p.read_bytes() for p in self.run_dir.rglob("*") if p.is_file()}


class S3Run:
    """The published run under an S3 prefix, read with an independent boto3 client."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix.rstrip("/") + "/"

    def files(self) -> dict[str, bytes]:
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                body = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                found[obj["Key"].removeprefix(self.prefix)] = body
        return found


def local_env(model: Path, data: Path, tmp: Path, base: dict[str, str]) -> dict[str, str]:
    """The job's environment for a run of RECIPE on `model` and `data` into `tmp`/out (run id "soak"), slowed by
    SLOWDOWN. `base`: the variables to keep from the caller (PATH, HOME, ...)."""
    return {**base, "HOME": str(tmp), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
            "PYTHONPATH": f"{SLOW}:{ROOT}", "FT_LOG_FORMAT": "json", "FT_TERMINATION_LOG": str(tmp / "termination-log"),
            "FT_BASE_MODEL": str(model), "FT_DATASET": str(data), "FT_WORK_DIR": str(tmp / "work"),
            "FT_OUTPUT_URI": str(tmp / "out"), "FT_RUN_ID": "soak", **demo_recipe(), **RECIPE, **SLOWDOWN}


def s3_env(local: dict[str, str], s3: dict[str, str], run_id: str) -> dict[str, str]:
    """`local`'s run with the model at s3://models/tiny/, the data at s3://data/text/sample.jsonl and the results
    under s3://results/soak/`run_id` (`s3`: the server's AWS_* variables)."""
    return {**local, **s3, "FT_BASE_MODEL": "s3://models/tiny/", "FT_DATASET": "s3://data/text/sample.jsonl",
            "FT_OUTPUT_URI": "s3://results/soak", "FT_RUN_ID": run_id}


def demo_recipe() -> dict[str, str]:
    """examples/tiny.env's training settings (the embedded default), without its paths."""
    env = dict(line.split("=", 1) for line in (ROOT / "examples" / "tiny.env").read_text().splitlines()
               if line and not line.startswith("#"))
    return {k: v for k, v in env.items() if k not in ("FT_BASE_MODEL", "FT_DATASET", "FT_WORK_DIR", "FT_OUTPUT_URI")}
