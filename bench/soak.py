"""The long soak (issue 15): the tiny model's run, interrupted by SIGTERM or kill -9 at random moments of the whole
run, started again until it ends 0, and checked against an uninterrupted run: exit codes only 0, 7 or -9 and no
traceback; the published run exactly its manifest's files; no checkpoint left; the adapter the uninterrupted run's
(within 1e-6); a published manifest never changed. On a CPU; tests/e2e/soak.py does the work and
tests/e2e/test_soak.py runs a few trials of it in the suite.

Each trial has its own seed (printed, and in the JSON), which decides everything about it: the signal, the phase
(start-up, training, a checkpoint being mirrored, publishing, the clean-up after the manifest, or any moment from
the start), the moment in it, whether the restart is interrupted again, and the destination (a local folder, or S3
on loopback: moto's server). Replay trials with `--seeds`.

    python bench/soak.py --minutes 10 --json soak.json
    python bench/soak.py --seeds 4711,4712        # replay two trials
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests"), str(ROOT)]

import soak  # noqa: E402  (tests/e2e/soak.py)

DATA = ROOT / "examples" / "data" / "sample-text.jsonl"
HOW = list(soak.SIGNALS)
PHASES = list(soak.PHASES)


def build_model(out: Path) -> Path:
    """The test suite's tiny model (tests/conftest.py): 2 layers, hidden size 128."""
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), str(out), "--force",
                    "--hidden", "128", "--layers", "2"], check=True, capture_output=True)
    return out


def start_s3(model: Path):
    """moto's S3 on loopback with the model and the data where soak.s3_env expects them."""
    from servers import S3Server

    server = S3Server()
    client = server.client()
    for bucket in ("models", "data", "results"):
        client.create_bucket(Bucket=bucket)
    for path in model.iterdir():
        client.upload_file(str(path), "models", f"tiny/{path.name}")
    client.upload_file(str(DATA), "data", "text/sample.jsonl")
    return server


def plan(seed: int, times: dict, again: float, s3_share: float) -> tuple[list[soak.Moment], str]:
    """A trial's moments (one per interrupted attempt) and destination, all from `seed`."""
    rng = random.Random(seed)
    moments = [soak.draw(rng, rng.choice(HOW), rng.choice(PHASES), times)]
    while rng.random() < again and len(moments) < 3:  # the restart is interrupted too
        moments.append(soak.draw(rng, rng.choice(HOW), rng.choice(PHASES), times))
    return moments, "s3" if rng.random() < s3_share else "local"


def run_trial(seed: int, args, model: Path, work: Path, expected: dict, server) -> dict:
    moments, dest = plan(seed, expected["times"], args.again, args.s3_share if server else 0.0)
    tmp = work / f"trial-{seed}"
    env = soak.local_env(model, DATA, tmp, base_env(tmp))
    if dest == "s3":
        env = soak.s3_env(env, server.env(), f"soak-{seed}")
        view = soak.S3Run(server.client(), "results", f"soak/soak-{seed}")
    else:
        view = soak.LocalRun(tmp / "out" / "soak")
    result = soak.trial(env, moments, view, expected, max_attempts=args.max_attempts)
    return {"seed": seed, "dest": dest, "phases": [m.phase for m in moments], "how": [m.how for m in moments],
            **result.as_dict()}


def base_env(tmp: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(tmp)}


def table(rows: list[dict]) -> str:
    lines = ["| seed | dest | moments | exit codes | adapter | s | result |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        adapter = "n/a" if r["max_diff"] is None else ("identical" if r["identical"] else f"{r['max_diff']:.2g}")
        result = "ok" if not r["problems"] else "; ".join(r["problems"])[:300]
        sent = r["signalled_at"] + [None] * (len(r["moments"]) - len(r["signalled_at"]))
        moments = [m if at is not None else f"({m}: not reached)" for m, at in zip(r["moments"], sent)]
        lines.append(f"| {r['seed']} | {r['dest']} | {'; '.join(moments)} | {' '.join(map(str, r['codes']))} "
                     f"| {adapter} | {r['seconds']:.0f} | {result} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    # The signals that landed (a moment drawn for a restart that ended before it, or never reached its phase, did not).
    by_moment = collections.Counter(f"{h} in {p}" for r in rows
                                    for h, p, sent in zip(r["how"], r["phases"], r["signalled_at"]) if sent is not None)
    codes = collections.Counter(str(c) for r in rows for c in r["codes"])
    return {"trials": len(rows), "failed": sum(1 for r in rows if r["problems"]),
            "identical_adapters": sum(1 for r in rows if r["identical"]),
            "max_adapter_diff": max((r["max_diff"] or 0.0 for r in rows), default=0.0),
            "attempts": sum(len(r["codes"]) for r in rows), "exit_codes": dict(sorted(codes.items())),
            "signals": dict(sorted(by_moment.items())),
            "retrained_after_publishing": sum(1 for r in rows if r["retrained_after_publishing"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="start no trial after this (default 10)")
    parser.add_argument("--trials", type=int, default=0, help="at most this many trials (0: until --minutes)")
    parser.add_argument("--seed", type=int, default=None, help="first trial's seed (default: random, printed)")
    parser.add_argument("--seeds", default="", help="replay exactly these trials (comma-separated seeds)")
    parser.add_argument("--again", type=float, default=0.25, help="chance that a restart is interrupted too")
    parser.add_argument("--s3-share", type=float, default=0.25, help="share of trials publishing to S3 on loopback")
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the trials and the summary here")
    args = parser.parse_args()
    first = args.seed if args.seed is not None else random.randrange(10**6)
    seeds = [int(s) for s in args.seeds.split(",") if s] or None
    began, rows = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model")
        expected = soak.baseline(soak.local_env(model, DATA, work / "baseline", base_env(work / "baseline")),
                                 soak.LocalRun(work / "baseline" / "out" / "soak"))
        print(f"uninterrupted run: {expected['seconds']:.1f} s, {expected['steps']} steps; first seed {first}",
              flush=True)
        server = start_s3(model) if args.s3_share > 0 else None
        for i in range(len(seeds) if seeds else 10**9):
            if not seeds and ((args.trials and i >= args.trials) or time.monotonic() - began > args.minutes * 60):
                break
            row = run_trial(seeds[i] if seeds else first + i, args, model, work, expected, server)
            rows.append(row)
            print(f"trial {row['seed']} ({row['dest']}): {'; '.join(row['moments'])} -> exits {row['codes']}, "
                  f"{'ok' if not row['problems'] else row['problems']}", flush=True)
        if server:
            server.stop()
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "first_seed": first, "minutes": round((time.monotonic() - began) / 60, 1),
              "uninterrupted_seconds": round(expected["seconds"], 2), "summary": summary(rows), "trials": rows}
    print(table(rows))
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
