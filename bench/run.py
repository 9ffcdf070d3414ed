"""Side-by-side speed and memory benchmark (issue 7's workload) on one GPU, and on two for the scale-out variants;
every variant in a fresh process.

    python3 bench/run.py --out $OUT [--samples 1000] [--rounds 2] [--variants guide,trl-packed,unsloth,fast,lean]
                         [--gpus 0,1,2,3]

Builds a Llama-2-7b-shaped model once (random init, fp16 safetensors) and the workload's data (random token ids,
lengths lognormal(median 256, sigma 0.9) clipped to [16, 4096], numpy default_rng(0), truncated to 1024 tokens),
then runs each variant through the job's own CLI (loading path, data path, trainer) in rounds (A B C, then C B A),
after warming the GPU. The runs are spread over the GPUs (`--gpus`), each starting as soon as as many GPUs as it needs
are free, so that a round's variants and the two rounds of one variant run on different GPUs of the same host. Prints
a table and writes results.json (kept in bench/data/), and, where matplotlib is (the GPU machine has it), the run's
RESULTS.md table and results.png chart; `bench/chart.py --markdown bench/RESULTS.md` puts the tables of several
such files into bench/RESULTS.md and redraws its chart.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import chart  # noqa: E402 -- bench/chart.py: the table RESULTS.md holds (matplotlib only when drawing)
N_PARAMS = 6.61e9  # Llama-2-7b; a LoRA step costs about 4N FLOPs per token (forward 2N, input gradients 2N)

def packed(tokens: int) -> dict[str, str]:
    """FT_PACKING's bigger steps: one packed row of up to `tokens` tokens per optimizer step (what FT_MICRO_BATCH_TOKENS
    meant before the recipe was made invariant; runs 1-8 in RESULTS.md measured these)."""
    return {"FT_PACKING": "true", "FT_PACKING_LENGTH": str(tokens), "FT_BATCH_SIZE": "1"}


# The guide's recipe, which every variant of the main table trains: 4 samples per optimizer step in a random order
# (the peers have no group_by_length over the global batch), 10% held out and evaluated every 25 steps.
RECIPE = {"FT_BATCH_SIZE": "4", "FT_EVAL_FRACTION": "0.1", "FT_EVAL_STEPS": "25", "FT_GROUP_BY_LENGTH": "false"}
SCALE = {"FT_PROFILE": "fast", **packed(8192), "FT_GRADIENT_ACCUMULATION_STEPS": "2", "FT_ATTENTION": "varlen"}

# Each variant is the job's settings; everything else is the workload's (LoRA r=64 alpha=16 dropout=0.1 on q,v).
VARIANTS = {
    # --- at the guide's recipe (issue 12): the main table ---
    # The guide's computation: fp16, no autocast, padded micro-batches of 4, sdpa, no checkpointing, paged AdamW.
    "guide": {**RECIPE, "FT_PROFILE": "guide", "FT_COMPUTE_DTYPE": "fp16", "FT_GRADIENT_CHECKPOINTING": "false",
              "FT_ATTENTION": "sdpa"},
    # Plain transformers + peft + trl (bench/peer.py): padding_free with Liger's kernels at batch 4, bf16, sdpa.
    "trl-pf": {**RECIPE, "_runner": "trl"},
    # Unsloth (bench/peer.py, on its own packages) at batch 4, padding-free.
    "unsloth-b4": {**RECIPE, "_runner": "unsloth", "_batch": "4"},
    "fast": {**RECIPE, "FT_PROFILE": "fast"},  # the job's default
    "lean-b4": {**RECIPE, "FT_PROFILE": "lean"},
    # issue 17's lean target: all-linear r64, 2048-token samples, the guide's 4 samples per step, under 10 GiB
    "lean-b4-2k": {**RECIPE, "FT_PROFILE": "lean", "FT_MAX_SEQ_LENGTH": "2048", "FT_LORA_TARGET_MODULES": "all-linear"},
    # Issue 17's candidates at the guide's recipe: torch's fused AdamW instead of bitsandbytes' paged one, and a profile
    # of steady small steps (steps 21-30).
    "fast-fused": {**RECIPE, "FT_PROFILE": "fast", "FT_OPTIM": "adamw_torch_fused"},
    "fast-noliger": {**RECIPE, "FT_PROFILE": "fast", "FT_USE_LIGER": "false"},
    # the 4-bit weights dequantized before every product, as before FT_DEQUANTIZE_ONCE (on by default in `fast`)
    "fast-nodq": {**RECIPE, "FT_PROFILE": "fast", "FT_DEQUANTIZE_ONCE": "false"},
    # the default without CUDA graphs of its small steps (FT_CUDA_GRAPHS, on by default in `fast` since issue 17)
    "fast-nographs": {**RECIPE, "FT_PROFILE": "fast", "FT_CUDA_GRAPHS": "false"},
    # regional torch.compile of the decoder layers (FT_COMPILE; its compile time is inside the epoch's wall time)
    "fast-compile": {**RECIPE, "FT_PROFILE": "fast", "FT_COMPILE": "true"},
    # Run 17: a warm cache still compiled for 42 s, 3 s of it in dynamo's phase timers, with 32 Triton kernels sent to
    # inductor's subprocess pool. Compiled in this process (no pool to start), a warm Triton cache loads directly.
    "fast-compile-1thread": {**RECIPE, "FT_PROFILE": "fast", "FT_COMPILE": "true", "TORCHINDUCTOR_COMPILE_THREADS": "1"},
    "profile-b4": {**RECIPE, "FT_PROFILE": "fast", "_runner": "profile", "_skip": "20",
                   "_steps": "10", "FT_MAX_STEPS": "40"},
    "profile-b4-fused": {**RECIPE, "FT_PROFILE": "fast", "FT_OPTIM": "adamw_torch_fused", "_runner": "profile",
                         "_skip": "20", "_steps": "10", "FT_MAX_STEPS": "40"},
    # Profiles of steady steps between evaluations (27-36) of the default, and with each batch copied to the GPU
    # blocking, as before the twelfth session (bench/profile_step.py --blocking-copies).
    "profile-steady": {**RECIPE, "FT_PROFILE": "fast", "_runner": "profile", "_skip": "26", "_steps": "10",
                       "FT_MAX_STEPS": "40"},
    "profile-steady-blocking": {**RECIPE, "FT_PROFILE": "fast", "_runner": "profile", "_skip": "26", "_steps": "10",
                                "FT_MAX_STEPS": "40", "_blocking": "1"},
    # --- the explicit bigger-step setting (FT_PACKING): other recipes, fewer optimizer steps ---
    "packed-16k": {"FT_PROFILE": "fast", **packed(16384)},  # what the `fast` default trained before issue 12
    "trl-packed": {**packed(4096), "FT_USE_LIGER": "false", "FT_GRADIENT_CHECKPOINTING": "false",
                   "FT_ATTENTION": "sdpa"},
    # Unsloth with trl's packing at 4096 tokens per step.
    "unsloth": {"_runner": "unsloth", "FT_MICRO_BATCH_TOKENS": "4096"},
    # A torch profiler trace of a few steady steps of `fast` (bench/profile_step.py): where the time goes.
    "profile-fast": {"FT_PROFILE": "fast", "_runner": "profile"},
    "fast-flex": {"FT_PROFILE": "fast", **packed(4096), "FT_ATTENTION": "flex_attention"},
    "fast-4k": {"FT_PROFILE": "fast", **packed(4096), "FT_ATTENTION": "sdpa"},
    "packed-8k": {"FT_PROFILE": "fast", "FT_USE_LIGER": "false", **packed(8192), "FT_GRADIENT_CHECKPOINTING": "false",
                  "FT_ATTENTION": "sdpa"},
    "fast-varlen": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen", **packed(4096)},
    "fast-varlen-8k": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen", **packed(8192)},
    "fast-varlen-16k": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen", **packed(16384)},
    "lean": {"FT_PROFILE": "lean", "FT_MAX_SEQ_LENGTH": "2048", "FT_LORA_TARGET_MODULES": "all-linear",
             **packed(8192)},
    # A 24 GB-class card simulated on the H200 (bench/gpucap): the job sizing itself to the cap, and the peers set up
    # to fit it (at 4096 tokens without checkpointing both peak at ~24.5 GiB and run out of memory): trl at 2048
    # tokens, Unsloth with its own offloaded gradient checkpointing at 4096, or at 2048 without.
    "trl-packed-24gb": {**packed(2048), "FT_USE_LIGER": "false", "FT_GRADIENT_CHECKPOINTING": "false",
                        "FT_ATTENTION": "sdpa", "_gpu_gib": "24"},
    "unsloth-24gb": {"_runner": "unsloth", "FT_MICRO_BATCH_TOKENS": "4096", "_unsloth_gc": "unsloth", "_gpu_gib": "24"},
    "unsloth-24gb-2k": {"_runner": "unsloth", "FT_MICRO_BATCH_TOKENS": "2048", "_gpu_gib": "24"},
    "fast-24gb": {"FT_PROFILE": "fast", **packed(16384), "_gpu_gib": "24"},
    "fast-24gb-b4": {**RECIPE, "FT_PROFILE": "fast", "_gpu_gib": "24"},
    # the alternative the 24 GiB plan does not take: 2048-token micro-batches (most steps hold ~1,320 tokens: one
    # micro-batch) without checkpointing, so without room for the dequantized copy
    "fast-24gb-b4-2k": {**RECIPE, "FT_PROFILE": "fast", "FT_MICRO_BATCH_TOKENS": "2048",
                        "FT_GRADIENT_CHECKPOINTING": "false", "_gpu_gib": "24"},
    # Scale-out (issue 5), all with the same global batch of 2 packed rows of 8192 tokens per optimizer step: one GPU
    # computes them one after the other, two GPUs take one each. "_nodes" launches that many single-GPU nodes on this
    # host, meeting over loopback through the multi-node (c10d rendezvous) path.
    "1gpu-ga2": {**SCALE, "FT_NPROC_PER_NODE": "1"},
    "ddp-2gpu": {**SCALE, "FT_NPROC_PER_NODE": "2"},
    "fsdp-2gpu": {**SCALE, "FT_NPROC_PER_NODE": "2", "FT_STRATEGY": "fsdp"},
    # FSDP with an eval set (evaluated before and after) and a checkpoint every 5 steps: the paths a timing run skips.
    "fsdp-2gpu-eval": {**SCALE, "FT_NPROC_PER_NODE": "2", "FT_STRATEGY": "fsdp", "FT_EVAL_FRACTION": "0.1",
                       "FT_EVAL_STEPS": "10", "FT_SAVE_STEPS": "5"},
    "2nodes-1gpu": {**SCALE, "_nodes": "2"},
}
# Scale-out at the recipe (issue 19): the same global batch - the guide's 4 samples per optimizer step, and an explicit
# 16 - on one GPU, on two processes of one node (DDP, FSDP2) and on two single-GPU nodes over loopback. Each process
# computes its half of every step (job/speed.py); `1gpu-bN` is the reference its x_1gpu divides by.
for _b in (4, 16):
    _step = {**RECIPE, "FT_PROFILE": "fast", "FT_BATCH_SIZE": str(_b)}
    VARIANTS |= {f"1gpu-b{_b}": _step, f"ddp-b{_b}": {**_step, "FT_NPROC_PER_NODE": "2"},
                 f"fsdp-b{_b}": {**_step, "FT_NPROC_PER_NODE": "2", "FT_STRATEGY": "fsdp"},
                 f"2nodes-b{_b}": {**_step, "_nodes": "2"}}


def one_gpu_reference(name: str) -> str | None:
    """The one-GPU variant a scale-out variant is compared with (same global batch, same settings otherwise, the
    same "-d0"), or None where there is none."""
    base, d0 = (name[:-3], "-d0") if name.endswith("-d0") else (name, "")
    if base in ("ddp-2gpu", "fsdp-2gpu", "fsdp-2gpu-eval", "2nodes-1gpu"):  # the packed 8192-token scale-out
        return "1gpu-ga2" + d0
    suffix = base.split("-", 1)[-1]
    return f"1gpu-{suffix}{d0}" if f"1gpu-{suffix}" in VARIANTS else None


def build_model(path: Path, shape: dict) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    # Give the memory back: the runs size their micro-batch and the dequantized copy from the GPU's free memory, and
    # run 13 found ~26 GiB of GPU 0 still held by this process's cache (109 GiB free instead of 135).
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # The data is token ids already; the tokenizer only has to name the special tokens.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<t{i}>": i for i in range(3, shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(path)


LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32)
SMOKE = dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)


def build_data(path: Path, samples: int, max_len: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(256), 0.9, 1000), 16, 4096).astype(int)
    with open(path, "w") as f:
        for n in lengths[:samples]:
            ids = rng.integers(3, 32000, int(n)).tolist()[:max_len]
            f.write(json.dumps({"input_ids": ids}) + "\n")


def gemm_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del a
    torch.cuda.empty_cache()  # as build_model: the runs plan from the free memory
    return 2 * 8192**3 * 10 / seconds / 1e12


PEERS = ("trl-packed", "unsloth", "trl-pf")  # "x peer" divides by the fastest of these of the same recipe class


def variant_env(name: str) -> dict[str, str]:
    """A variant's settings; a "-d0" suffix is the same variant with LoRA dropout 0 (Unsloth's fast path needs it)."""
    if name.endswith("-d0"):
        return {**VARIANTS[name[:-3]], "FT_LORA_DROPOUT": "0"}
    return dict(VARIANTS[name])


def gpus_needed(name: str) -> int:
    env = variant_env(name)
    # 1gpu-ga2 sees two GPUs and asks for one process: the job pins itself to the first (a user's 2-GPU node).
    return 2 if name == "1gpu-ga2" else max(int(env.get("FT_NPROC_PER_NODE", "1")), int(env.get("_nodes", "1")))


def run_variant(name: str, round_: int, gpus: list[int], model: Path, data: dict[int, Path], out: Path,
                timeout: float = 900) -> dict:
    """One run of a variant in fresh processes on the given GPUs; its own run id, work directory and log. A run that
    outlasts `timeout` seconds is killed (exit 124)."""
    run_id = f"{name}-r{round_}"
    env = {**os.environ, "FT_BASE_MODEL": str(model), "FT_EVAL_FRACTION": "0", "FT_NUM_TRAIN_EPOCHS": "1",
           "FT_LOGGING_STEPS": "10", "FT_SAVE_MINUTES": "0", "FT_LOG_FORMAT": "json",
           "FT_OUTPUT_URI": str(out / "runs"), "FT_WORK_DIR": f"/tmp/bench-work/{run_id}", "FT_OVERWRITE": "true",
           "FT_MAX_SEQ_LENGTH": "1024", "FT_RUN_ID": run_id, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
           "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{ROOT}", **variant_env(name)}
    env["FT_DATASET"] = str(data[int(env["FT_MAX_SEQ_LENGTH"])])
    nodes = int(env.pop("_nodes", "1"))
    runner, unsloth_gc, batch = env.pop("_runner", "job"), env.pop("_unsloth_gc", "none"), env.pop("_batch", "0")
    profile_window = ["--skip", env.pop("_skip", "4"), "--steps", env.pop("_steps", "3"),
                      *(["--blocking-copies"] if env.pop("_blocking", "") else [])]
    if gib := env.pop("_gpu_gib", None):
        env["BENCH_GPU_GIB"] = gib
        env["PYTHONPATH"] = f"{ROOT / 'bench' / 'gpucap'}:{env['PYTHONPATH']}"
    log_path = out / f"{run_id}.log"
    row = {"variant": name, "round": round_, "gpus": gpus, "settings": variant_env(name)}
    with open(log_path, "w") as log:
        deadline = time.monotonic() + timeout

        def run(cmd: list[str], **extra) -> Waiter:
            return Waiter(subprocess.Popen(cmd, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                           start_new_session=True), deadline)

        started = time.monotonic()
        if runner in ("unsloth", "trl"):  # the peers (bench/peer.py); Unsloth on its own packages (bench/README.md)
            if runner == "unsloth":
                env["PYTHONPATH"] = f"{os.environ.get('BENCH_UNSLOTH_SITE', '/tmp/site-unsloth')}:{env['PYTHONPATH']}"
                env["UNSLOTH_COMPILE_LOCATION"] = f"/tmp/unsloth_compiled_cache/{run_id}"  # runs side by side
            else:
                batch = env.get("FT_BATCH_SIZE", "4")
            result = out / "peer" / run_id
            code = run([sys.executable, "bench/peer.py", "--engine", runner, "--model", str(model),
                        "--data", env["FT_DATASET"], "--out", str(result), "--dropout", env.get("FT_LORA_DROPOUT", "0.1"),
                        "--pack-tokens", env.get("FT_MICRO_BATCH_TOKENS", "4096"), "--batch-size", batch,
                        "--eval-fraction", env.get("FT_EVAL_FRACTION", "0"), "--eval-steps", env.get("FT_EVAL_STEPS", "25"),
                        "--gradient-checkpointing", unsloth_gc]).wait()
            written = result / "result.json"  # its error too, when it failed
            return {**row, **(json.loads(written.read_text()) if written.exists() else {}), "exit": code,
                    "e2e_s": round(time.monotonic() - started, 1)}
        if runner == "profile":  # torch profiler over a few steady steps of the job (bench/profile_step.py)
            code = run([sys.executable, "bench/profile_step.py", "--out", str(out / "profile" / run_id),
                        *profile_window]).wait()
            return {**row, "exit": code, "profile": True}
        if nodes == 1:
            code = run([sys.executable, "-m", "job"]).wait()
        else:  # one launch per "node", each with one GPU and its own work directory, meeting over loopback
            procs = [run([sys.executable, "-m", "job"], FT_NNODES=str(nodes), FT_NODE_RANK=str(i),
                         FT_NPROC_PER_NODE="1", CUDA_VISIBLE_DEVICES=str(gpu), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(29500 + 7 * gpus[0] + round_), NCCL_SOCKET_IFNAME="lo",
                         FT_WORK_DIR=f"/tmp/bench-work/{run_id}-{i}") for i, gpu in enumerate(gpus[:nodes])]
            codes = [p.wait() for p in procs]
            code = next((c for c in codes if c != 0), 0)
    e2e = round(time.monotonic() - started, 1)  # start to published, model load and evaluations included
    if code != 0:
        return {**row, "exit": code}
    manifest = json.loads((out / "runs" / run_id / "manifest.json").read_text())
    t, d, m = manifest["training"], manifest["data"], manifest["metrics"]
    return {**row, "exit": 0, "tokens_per_s": d["trained_tokens"] / t["seconds"], "seconds": t["seconds"], "e2e_s": e2e,
            "load_s": t["load_seconds"], "steps": t["steps"], "tokens_per_step": d["trained_tokens"] / t["steps"],
            "peak_gib": m.get("peak_gpu_mem_gib"), "reserved_gib": m.get("peak_gpu_reserved_gib"),
            "steady_tokens_per_s": steady_rate(log_path),
            "eval_loss": [m.get("eval_loss_before"), m.get("eval_loss_after")] if "eval_loss_after" in m else None,
            "processes": manifest["placement"].get("processes", 1), "strategy": manifest["placement"].get("strategy"),
            "plan": {k: t.get(k) for k in ("padding_free", "micro_batch_tokens", "micro_batch_size", "gradient_checkpointing",
                                           "liger", "attention", "global_batch", "steps_per_epoch",
                                           "dequantize_once")}}


class Waiter:
    """A process whose wait ends at a deadline: past it, the process and every process it started are killed (torchrun
    starts its workers in sessions of their own, out of the launcher's process group) and the exit is 124. The GPUs
    are free again when wait() returns."""

    def __init__(self, proc: subprocess.Popen, deadline: float):
        self.proc, self.deadline = proc, deadline

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            tree = [self.proc.pid, *descendants(self.proc.pid)]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            for _ in range(100):  # orphans are reaped by init: wait until they are gone
                if not any(Path(f"/proc/{pid}").exists() for pid in tree[1:]):
                    break
                time.sleep(0.1)
            return 124


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def steady_rate(log_path: Path) -> float | None:
    """The median of the job's own tokens/s between logging steps, the first interval (warm-up) left out: what a
    longer run would approach. The epoch figure counts the warm-up, as the workload defines it."""
    with open(log_path) as f:
        rates = [e["tokens_per_s"] for line in f if line.startswith("{") and '"train step"' in line
                 for e in [json.loads(line)] if e.get("tokens_per_s") and e["step"] > 1]
    return statistics.median(rates) if rates else None


def schedule(tasks: list[tuple[str, int]], gpus: list[int], run, start_by: float = float("inf"),
             done=lambda row: None) -> list[dict]:
    """Run `tasks` (variant, round) in order on a pool of GPUs, each as soon as as many GPUs as it needs are free
    (first come, first served: a two-GPU task waits for two rather than being overtaken). `run(name, round, gpus)`
    returns the task's result row (a task that raises gets a row with exit -1), which `done(row)` also gets as soon as
    the task ends; rows come back in the order the tasks finished. Tasks that could not start before `start_by`
    (time.monotonic()) are skipped (exit "skipped"), so that a time-limited call still writes results."""
    free, results, cond = list(gpus), [], threading.Condition()

    def work(name: str, round_: int, mine: list[int]) -> None:
        try:
            row = run(name, round_, mine)
        except Exception as e:  # a broken variant must not stop the others
            row = {"variant": name, "round": round_, "gpus": mine, "exit": -1, "error": repr(e)}
        done(row)
        with cond:
            results.append(row)
            free.extend(mine)
            cond.notify_all()

    threads = []
    for name, round_ in tasks:
        need = min(gpus_needed(name), len(gpus))
        with cond:
            left = None if start_by == float("inf") else max(0.0, start_by - time.monotonic())
            if not cond.wait_for(lambda: len(free) >= need, timeout=left) or time.monotonic() >= start_by:
                results.append({"variant": name, "round": round_, "exit": "skipped"})
                continue
            mine = [free.pop(0) for _ in range(need)]
        threads.append(threading.Thread(target=work, args=(name, round_, mine)))
        threads[-1].start()
    for t in threads:
        t.join()
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="guide,trl-pf,unsloth-b4,fast")
    p.add_argument("--once", default="", help="more variants, not in --variants, run in the first round only")
    p.add_argument("--gpus", default=None, help="GPU ids to spread the runs over (default: every visible GPU)")
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds: start no run after this much, and kill any run still going at it")
    p.add_argument("--smoke", action="store_true", help="a tiny model instead of 7B: checks the script on a CPU")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = Path("/tmp/bench-smoke-model" if args.smoke else "/tmp/llama-2-7b-shape")
    build_model(model, SMOKE if args.smoke else LLAMA_2_7B)
    data = {n: Path(f"/tmp/bench-data-{n}.jsonl") for n in (1024, 2048)}
    for n, path in data.items():
        build_data(path, args.samples, n)
    tflops = gemm_tflops()
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(range(max(1, visible_gpus())))
    names, once = args.variants.split(","), [n for n in args.once.split(",") if n]
    if unknown := [n for n in names + once if n.removesuffix("-d0") not in VARIANTS]:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)} (each also with -d0)")
    if len(set(names + once)) < len(names + once):  # one run id per variant and round
        p.error("a variant is named twice in --variants and --once")
    if too_big := [n for n in names + once if gpus_needed(n) > len(gpus)]:
        p.error(f"{too_big} need {max(map(gpus_needed, too_big))} GPUs; --gpus has {len(gpus)}")
    # Runs side by side share the host's cores (torchrun's workers get their share from the job's launcher).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(gpus))))
    # Rounds interleaved (A B C A B C), the second in reverse order so that no variant always follows the same one.
    tasks = [(n, r) for r in range(args.rounds) for n in (names if r % 2 == 0 else names[::-1])]
    tasks[len(names):len(names)] = [(n, 0) for n in once]
    progress = []

    end = time.monotonic() + args.budget
    # A run that starts early may last until the budget's end; a late one must leave time for the rest of the call.

    def run(name: str, round_: int, mine: list[int]) -> dict:
        return run_variant(name, round_, mine, model, data, args.out, timeout=min(900, end - time.monotonic()))

    lock = threading.Lock()

    def record(row: dict) -> None:
        with lock:
            progress.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "runs.json").write_text(json.dumps(progress, indent=2))  # kept if the call is cut short

    results = schedule(tasks, gpus, run, start_by=end - 60, done=record)
    summary = summarize(results, tflops)
    (args.out / "results.json").write_text(json.dumps({"gemm_tflops": tflops, "samples": args.samples, "gpus": gpus,
                                                       "command": " ".join(["bench/run.py", *sys.argv[1:]]),
                                                       "runs": results, "summary": summary}, indent=2))
    print_table(summary, tflops)
    report(args.out)
    return 0


def report(out: Path) -> None:
    """RESULTS.md and results.png for this run in `out` (bench/chart.py --markdown merges them into bench/RESULTS.md),
    where matplotlib is installed (the GPU machine has it)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("no matplotlib here: draw the chart with bench/chart.py", flush=True)
        return
    (out / "RESULTS.md").write_text(f"# Results of {out.name}\n\n{chart.BEGIN}\n{chart.END}\n")
    chart.main([str(out / "results.json"), "--out", str(out / "results.png"), "--markdown", str(out / "RESULTS.md")])


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def comparison_class(name: str) -> tuple[bool, bool, bool, bool]:
    """Variants compare only with peers of the same recipe (the guide's 4 samples per step, or the bigger packed
    steps), memory cap and dropout; `lean` (packed, 2048-token samples, all-linear) compares with none."""
    env = variant_env(name)
    recipe = all(env.get(k) == v for k, v in RECIPE.items())
    return "-24gb" in name, name.endswith("-d0"), name == "lean" or name.startswith("lean-8k"), recipe


def summarize(results: list[dict], tflops: float) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        ok = [r for r in results if r["variant"] == name and r["exit"] == 0 and "tokens_per_s" in r]
        if not ok:
            mine = [r for r in results if r["variant"] == name]
            if not any(r.get("profile") for r in mine):
                cut = all(r["exit"] in (124, "skipped") for r in mine)  # by the time budget, not by the variant
                rows.append({"variant": name, "failed": True, "why": "cut by the time budget" if cut else
                             "failed (exit " + ", ".join(str(r["exit"]) for r in mine) + ")"})
            continue
        rates = [r["tokens_per_s"] for r in ok]
        med = statistics.median(rates)
        steady = [r["steady_tokens_per_s"] for r in ok if r.get("steady_tokens_per_s")]
        rows.append({"variant": name, "tokens_per_s": med, "spread": max(rates) - min(rates), "runs": len(ok),
                     "steady_tokens_per_s": statistics.median(steady) if steady else None,
                     "mfu": 4 * N_PARAMS * med / (tflops * 1e12),
                     **{k: max(r.get(k) or 0 for r in ok) for k in ("peak_gib", "reserved_gib")},
                     **{k: statistics.median(r[k] for r in ok) if all(r.get(k) for r in ok) else None
                        for k in ("seconds", "e2e_s")},
                     **{k: ok[-1].get(k) for k in ("load_s", "tokens_per_step", "steps", "plan", "eval_loss")},
                     "processes": ok[-1].get("processes", 1)})
    rate = {r["variant"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        peers = [rate[v] for v in rate if v.startswith(PEERS) and comparison_class(v) == comparison_class(r["variant"])]
        single = r.get("processes", 1) == 1  # several GPUs compare with one GPU (x_1gpu), not with a peer
        same = comparison_class(r["variant"]) == comparison_class("guide")
        r["x_guide"] = r["tokens_per_s"] / rate["guide"] if "guide" in rate and single and same else None
        r["x_peer"] = r["tokens_per_s"] / max(peers) if peers and single else None
        # scale-out: speed-up over one GPU with the same global batch (ideal: the number of GPUs)
        one = rate.get(one_gpu_reference(r["variant"]) or "")
        r["x_1gpu"] = r["tokens_per_s"] / one if one and r.get("processes", 1) > 1 else None
        r["scaling"] = r["x_1gpu"] / r["processes"] if r["x_1gpu"] else None  # efficiency: 1.0 is linear
    return rows


def print_table(rows: list[dict], tflops: float) -> None:
    print(f"\nbf16 GEMM {tflops:.0f} TFLOP/s\n")
    print("\n".join(chart.table_lines(rows)))


if __name__ == "__main__":
    sys.exit(main())
