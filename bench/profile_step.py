"""Where one training step's time goes: the job itself, run through its own CLI, with torch.profiler attached to a few
steady-state optimizer steps.

    FT_...=... python3 bench/profile_step.py --out DIR [--steps 3] [--skip 4]

The job is configured by the FT_* environment as for `python -m job` (bench/run.py's run_variant sets it); this
script only wraps job.train.build_trainer so that the trainer gets a callback. On global rank 0 of a single-process
run (a torchrun launch starts workers that never import this file) the callback times steps 2..skip unprofiled, then
profiles optimizer steps skip+1..skip+steps (from the end of step skip to the end of step skip+steps: each step's
logging and next-batch fetch included, the device synchronized at both ends) and writes:

    DIR/profile.json   per-category device-kernel ms per step and %, wall ms per step, GPU-idle %, top 25 kernels
    DIR/profile.txt    the same as a small table
    DIR/trace.json.gz  the Chrome trace (chrome://tracing, ui.perfetto.dev), only if under 15 MB gzipped

Categories come from kernel names (CATEGORIES, first match wins); the top kernels list shows the mapping to check.
Without CUDA it profiles the CPU (self CPU time of aten ops instead of kernels): a smoke check of the script only.
Exits with the job's exit code.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Kernel name -> category, first match wins (case-insensitive); order matters: cutlass fmha is attention, not GEMM.
CATEGORIES = {
    "communication": r"nccl",
    "memcpy/memset": r"memcpy|memset",
    "dequantize": r"kdequantize|dequant",  # bitsandbytes kDequantizeBlockwise<bf16, ..., NF4>
    "attention": r"flash|fmha|attention|varlen|sdpa|_efficient_attention",
    "optimizer": r"adam|multi_tensor|koptimizer|kpreconditionoptimizer",  # also foreach grad-norm (clipping)
    "gemm": r"gemm|cutlass|xmma|nvjet|cublas|matmul|s16816|^aten::(mm|addmm|bmm)$",
    "liger/triton": r"^_|triton|liger|rms_norm|rope|swiglu|cross_entropy",
}
PATTERNS = {name: re.compile(p, re.IGNORECASE) for name, p in CATEGORIES.items()}
TRACE_LIMIT = 15 * 2**20


def category(name: str) -> str:
    return next((c for c, p in PATTERNS.items() if p.search(name)), "other")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ProfileCallback(TrainerCallback):
    def __init__(self, out: Path, steps: int, skip: int):
        self.out, self.steps, self.skip = out, steps, skip
        self.prof, self.done, self.marks = None, False, {}

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step in (1, self.skip) and self.prof is None and not self.done:
            sync()
            self.marks[step] = time.perf_counter()
        if step == self.skip and self.prof is None and not self.done:
            cuda = torch.cuda.is_available()
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            self.prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
            self.prof.start()
            sync()
            self.start, self.first = time.perf_counter(), step + 1
        elif self.prof is not None and step >= self.skip + self.steps:
            self.finish(step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None:  # training ended inside the window: summarize the steps it had
            self.finish(state.global_step)

    def finish(self, step: int) -> None:
        sync()
        wall = time.perf_counter() - self.start
        self.prof.stop()
        n = step - self.first + 1
        base = (self.marks[self.skip] - self.marks[1]) / (self.skip - 1) if self.skip > 1 and 1 in self.marks else None
        summary = summarize(self.prof, wall, n, self.first)
        summary["unprofiled_wall_ms_per_step"] = base and round(1e3 * base, 2)
        summary["trace"] = export_trace(self.prof, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "profile.json").write_text(json.dumps(summary, indent=2))
        (self.out / "profile.txt").write_text(table(summary))
        print(table(summary), file=sys.stderr, flush=True)
        self.prof, self.done = None, True


def summarize(prof, wall_s: float, n: int, first: int) -> dict:
    cuda = torch.cuda.is_available()

    def kernel(e) -> bool:  # kernels, memcpys, memsets: device-side events, not the GPU ranges of record_function
        return e.device_type != torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False)

    if cuda:  # (CPU ops' own device time would count their kernels a second time)
        rows = [(e.key, e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total,
                 e.count) for e in prof.key_averages() if kernel(e)]
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if kernel(e))
        busy, end = 0.0, float("-inf")  # the union of kernel intervals: overlapping streams count once
        for s, e in spans:
            busy += max(0.0, e - max(s, end))
            end = max(end, e)
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
        busy = sum(t for _, t, _ in rows)
    rows = [(k, t / 1e3 / n, c / n) for k, t, c in rows if t > 0]  # ms and calls per step
    total, wall = sum(t for _, t, _ in rows), 1e3 * wall_s / n
    cats = {c: 0.0 for c in [*CATEGORIES, "other"]}
    for k, t, _ in rows:
        cats[category(k)] += t
    top = sorted(rows, key=lambda r: -r[1])[:25]
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": n, "first_step": first,
        "wall_ms_per_step": round(wall, 2), "kernel_ms_per_step": round(total, 2),
        "busy_ms_per_step": round(busy / 1e3 / n, 2), "idle_pct": round(100 * (1 - busy / 1e3 / n / wall), 1),
        "categories": {c: {"ms_per_step": round(t, 2), "pct_of_kernels": round(100 * t / total, 1) if total else 0,
                           "pct_of_wall": round(100 * t / wall, 1)} for c, t in cats.items()},
        "top_kernels": [{"name": k[:200], "category": category(k), "ms_per_step": round(t, 3),
                         "calls_per_step": round(c, 1), "pct_of_kernels": round(100 * t / total, 1)}
                        for k, t, c in top],
        "patterns": CATEGORIES,
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith("FT_") and not re.search("TOKEN|SECRET|KEY|PASSWORD|URI", k)},
    }


def export_trace(prof, out: Path) -> str:
    raw = Path(f"/tmp/profile-trace-{os.getpid()}.json")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as f, gzip.open(out / "trace.json.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    raw.unlink()
    size = (out / "trace.json.gz").stat().st_size
    if size > TRACE_LIMIT:
        (out / "trace.json.gz").unlink()
        return f"skipped: {size / 2**20:.0f} MB gzipped (over {TRACE_LIMIT // 2**20} MB); profile fewer --steps"
    return f"trace.json.gz ({size / 2**20:.1f} MB)"


def table(s: dict) -> str:
    lines = [(f"{s['device']}: steps {s['first_step']}..{s['first_step'] + s['steps'] - 1}, "
              f"wall {s['wall_ms_per_step']} ms/step (unprofiled {s.get('unprofiled_wall_ms_per_step')}), "
              f"kernels {s['kernel_ms_per_step']} ms, busy {s['busy_ms_per_step']} ms, idle {s['idle_pct']}%"),
             f"{'category':<16}{'ms/step':>10}{'% kernels':>11}{'% wall':>8}"]
    lines += [f"{c:<16}{v['ms_per_step']:>10.2f}{v['pct_of_kernels']:>11.1f}{v['pct_of_wall']:>8.1f}"
              for c, v in s["categories"].items()]
    lines += ["", f"{'ms/step':>9}{'calls':>7}  {'category':<14}kernel"]
    lines += [f"{k['ms_per_step']:>9.3f}{k['calls_per_step']:>7.0f}  {k['category']:<14}{k['name'][:100]}"
              for k in s["top_kernels"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps to profile")
    p.add_argument("--skip", type=int, default=4, help="steps before the profiled ones (warm-up), at least 1")
    p.add_argument("--blocking-copies", action="store_true",
                   help="copy each batch to the GPU with non_blocking=False, as the job did before the twelfth session")
    args = p.parse_args()
    if args.steps < 1 or args.skip < 1:
        p.error("--steps and --skip must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)

    from job import cli, train

    build = train.build_trainer
    callback = ProfileCallback(args.out, args.steps, args.skip)

    def build_trainer(*a, **kw):
        trainer = build(*a, **kw)
        trainer.add_callback(callback)
        if args.blocking_copies:
            trainer.accelerator.dataloader_config.non_blocking = False
        return trainer

    train.build_trainer = build_trainer
    code = cli.main([])  # `python -m job`: the run command, configured by the environment
    if not callback.done:
        print(f"profile_step: no profile written (the job ran fewer than {args.skip + 1} optimizer steps, "
              "failed, or launched workers)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
