"""bench/run.py's bookkeeping: how runs share the GPUs and how the table's ratios are taken. (The runs themselves
need the GPU machine; `bench/run.py --smoke` checks them on a CPU.)"""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_share_the_gpus_without_overlap_and_two_gpu_runs_get_two(bench):
    busy, lock, seen = set(), threading.Lock(), []

    def run(name, round_, gpus):
        with lock:
            assert not busy & set(gpus), f"{name} got a busy GPU"
            busy.update(gpus)
            seen.append((name, round_, tuple(gpus)))
        time.sleep(0.05)
        with lock:
            busy.difference_update(gpus)
        return {"variant": name, "round": round_, "exit": 0}

    tasks = [("fast", 0), ("ddp-2gpu", 0), ("guide", 0), ("2nodes-1gpu", 0), ("fast", 1), ("lean", 1)]
    results = bench.schedule(tasks, [0, 1, 2], run)
    assert sorted((r["variant"], r["round"]) for r in results) == sorted(tasks)
    gpus = {(name, round_): g for name, round_, g in seen}
    assert len(set(gpus["ddp-2gpu", 0])) == len(set(gpus["2nodes-1gpu", 0])) == 2
    assert all(len(g) == 1 for (name, _), g in gpus.items() if name in ("fast", "guide", "lean"))
    # first come, first served: the two-GPU run started before the runs queued after it
    order = [(name, round_) for name, round_, _ in seen]
    assert order.index(("ddp-2gpu", 0)) < order.index(("guide", 0))


def test_a_failing_run_is_a_row_and_runs_past_the_start_deadline_are_skipped(bench):
    def run(name, round_, gpus):
        time.sleep(0.3)
        if name == "fast-varlen":
            raise RuntimeError("no such variant")
        return {"variant": name, "round": round_, "exit": 0}

    # fast-varlen takes GPU 0; ddp-2gpu waits for two until the deadline; lean then finds GPU 1 free, but too late
    results = bench.schedule([("fast-varlen", 0), ("ddp-2gpu", 0), ("lean", 0)], [0, 1], run,
                             start_by=time.monotonic() + 0.15)
    by = {r["variant"]: r for r in results}
    assert by["fast-varlen"]["exit"] == -1 and "no such variant" in by["fast-varlen"]["error"]
    assert by["ddp-2gpu"]["exit"] == by["lean"]["exit"] == "skipped"


def test_a_run_past_its_deadline_is_killed_with_every_process_it_started(bench, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pids = tmp_path / "pids"
    # A launcher whose worker leaves its process group, as torchrun's workers do.
    script = ("import os, subprocess, sys, time\n"
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{w.pid}}')\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    started = time.monotonic()
    while not pids.exists() or not pids.read_text():
        time.sleep(0.05)
    launcher, worker = map(int, pids.read_text().split())
    assert bench.descendants(launcher) == [worker]
    assert bench.Waiter(proc, deadline=started + 1.5).wait() == 124
    assert time.monotonic() - started < 20
    assert not Path(f"/proc/{worker}").exists() and not Path(f"/proc/{launcher}").exists()


def test_gpus_needed_and_dropout_zero_variants(bench):
    assert bench.gpus_needed("fast") == bench.gpus_needed("unsloth-24gb") == 1
    assert bench.gpus_needed("ddp-2gpu") == bench.gpus_needed("2nodes-1gpu") == bench.gpus_needed("1gpu-ga2") == 2
    assert bench.variant_env("fast-d0") == {**bench.VARIANTS["fast"], "FT_LORA_DROPOUT": "0"}
    assert "FT_LORA_DROPOUT" not in bench.variant_env("fast")


def test_ratios_compare_like_with_like(bench):
    def runs(name, *rates, processes=1):
        return [{"variant": name, "round": i, "exit": 0, "tokens_per_s": r, "processes": processes, "peak_gib": 1.0,
                 "reserved_gib": 2.0, "load_s": 3.0, "tokens_per_step": 4096, "steps": 10} for i, r in enumerate(rates)]

    results = (runs("guide", 3000, 3200) + runs("trl-pf", 3300, 3500) + runs("unsloth-b4", 3900, 4100)
               + runs("fast", 4400, 4600) + runs("packed-16k", 15000, 16000) + runs("trl-packed", 7000, 8000)
               + runs("unsloth", 9000, 9400) + runs("trl-packed-24gb", 6000) + runs("unsloth-24gb", 5000)
               + runs("unsloth-24gb-2k", 6500) + runs("fast-24gb", 12000) + runs("unsloth-d0", 10000)
               + runs("fast-varlen-16k-d0", 16000) + runs("1gpu-ga2", 16000) + runs("ddp-2gpu", 30000, processes=2)
               + runs("fast-24gb-b4", 4000)
               + [{"variant": "lean", "round": 0, "exit": 1}, {"variant": "lean", "round": 1, "exit": 124}]
               + [{"variant": "fsdp-2gpu", "round": 0, "exit": 124}, {"variant": "fsdp-2gpu", "round": 1,
                                                                       "exit": "skipped"}])
    rows = {r["variant"]: r for r in bench.summarize(results, tflops=790)}
    assert rows["fast"]["tokens_per_s"] == 4500 and rows["fast"]["spread"] == 200 and rows["fast"]["runs"] == 2
    # At the guide's recipe, against the guide and the fastest peer of the same recipe (Unsloth at batch 4) only.
    assert rows["fast"]["x_peer"] == pytest.approx(4500 / 4000)
    assert rows["fast"]["x_guide"] == pytest.approx(4500 / 3100)
    # The bigger packed steps are another recipe: against the packed peers, never against the guide.
    assert rows["packed-16k"]["x_peer"] == pytest.approx(15500 / 9200) and rows["packed-16k"]["x_guide"] is None
    assert rows["fast-24gb"]["x_peer"] == pytest.approx(12000 / 6500)  # against the capped peers only
    assert rows["fast-24gb-b4"]["x_peer"] is None  # no capped peer at the guide's recipe in this run
    assert rows["fast-varlen-16k-d0"]["x_peer"] == pytest.approx(16000 / 10000)
    assert rows["ddp-2gpu"]["x_1gpu"] == pytest.approx(30000 / 16000) and rows["fast"]["x_1gpu"] is None
    assert rows["ddp-2gpu"]["x_peer"] is None and rows["ddp-2gpu"]["x_guide"] is None  # two GPUs against one: no
    assert rows["lean"] == {"variant": "lean", "failed": True, "why": "failed (exit 1, 124)"}
    assert rows["fsdp-2gpu"]["why"] == "cut by the time budget"
    assert rows["fast"]["mfu"] == pytest.approx(4 * bench.N_PARAMS * 4500 / 790e12)
