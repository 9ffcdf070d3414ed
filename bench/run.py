"""Side-by-side speed and memory benchmark (issue 7's workload) on one GPU, and on two for the scale-out variants;
every variant in a fresh process.

    python3 bench/run.py --out $OUT [--samples 1000] [--rounds 2] [--variants guide,fast,lean]

Builds a Llama-2-7b-shaped model once (random init, fp16 safetensors) and the workload's data (random token ids,
lengths lognormal(median 256, sigma 0.9) clipped to [16, 4096], numpy default_rng(0), truncated to 1024 tokens),
then runs each variant through the job's own CLI (loading path, data path, trainer) in rounds (A B C A B C ...),
after warming the GPU. Prints a table and writes results.json (kept in bench/data/; bench/chart.py draws RESULTS.md's
PNG chart from such files on the development machine, where matplotlib is; RESULTS.md's tables are written by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_PARAMS = 6.61e9  # Llama-2-7b; a LoRA step costs about 4N FLOPs per token (forward 2N, input gradients 2N)

SCALE = {"FT_PROFILE": "fast", "FT_MICRO_BATCH_TOKENS": "8192", "FT_GRADIENT_ACCUMULATION_STEPS": "2",
         "FT_ATTENTION": "varlen"}

# Each variant is the job's settings; everything else is the workload's (LoRA r=64 alpha=16 dropout=0.1 on q,v).
VARIANTS = {
    # The guide's recipe: fp16, no autocast, no packing, no checkpointing, micro-batch 4, paged AdamW 32-bit.
    "guide": {"FT_PROFILE": "guide", "FT_COMPUTE_DTYPE": "fp16", "FT_GRADIENT_CHECKPOINTING": "false",
              "FT_BATCH_SIZE": "4", "FT_GROUP_BY_LENGTH": "false"},
    # The best plain transformers + trl configuration: bf16 + trl's padding-free packing, no Liger, sdpa with its
    # block mask (FT_ATTENTION's default, auto, would pick the job's varlen kernel on the GPU).
    "trl-packed": {"FT_PROFILE": "fast", "FT_USE_LIGER": "false", "FT_MICRO_BATCH_TOKENS": "4096",
                   "FT_GRADIENT_CHECKPOINTING": "false", "FT_ATTENTION": "sdpa"},
    "fast": {"FT_PROFILE": "fast"},
    "fast-flex": {"FT_PROFILE": "fast", "FT_ATTENTION": "flex_attention"},
    # sdpa at 4096 and 8192 tokens, as measured in RESULTS.md run 2.
    "fast-4k": {"FT_PROFILE": "fast", "FT_MICRO_BATCH_TOKENS": "4096", "FT_ATTENTION": "sdpa"},
    "packed-8k": {"FT_PROFILE": "fast", "FT_USE_LIGER": "false", "FT_MICRO_BATCH_TOKENS": "8192",
                  "FT_GRADIENT_CHECKPOINTING": "false", "FT_ATTENTION": "sdpa"},
    # torch's varlen flash attention (job/attention.py): no block mask, so larger micro-batches should not cost more
    # attention per token. fast-varlen is fast-4k with the kernel; the larger ones test lifting the 4096 cap.
    "fast-varlen": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen", "FT_MICRO_BATCH_TOKENS": "4096"},
    "fast-varlen-8k": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen", "FT_MICRO_BATCH_TOKENS": "8192"},
    "fast-varlen-16k": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen", "FT_MICRO_BATCH_TOKENS": "16384"},
    "lean": {"FT_PROFILE": "lean", "FT_MAX_SEQ_LENGTH": "2048", "FT_LORA_TARGET_MODULES": "all-linear"},
    # A 24 GB-class card simulated on the H200 (bench/gpucap): the peer, and the job sizing itself to the cap.
    "trl-packed-24gb": {"FT_PROFILE": "fast", "FT_USE_LIGER": "false", "FT_MICRO_BATCH_TOKENS": "4096",
                        "FT_GRADIENT_CHECKPOINTING": "false", "FT_ATTENTION": "sdpa", "_gpu_gib": "24"},
    "fast-24gb": {"FT_PROFILE": "fast", "_gpu_gib": "24"},
    # Scale-out (issue 5), all with the same global batch of 2 x 8192 tokens per optimizer step: one GPU accumulates
    # two micro-batches, two GPUs take one each (the job halves the accumulation). "_nodes" launches that many
    # single-GPU nodes on this host, meeting over loopback through the multi-node (c10d rendezvous) path.
    "1gpu-ga2": {**SCALE, "FT_NPROC_PER_NODE": "1"},
    "ddp-2gpu": {**SCALE, "FT_NPROC_PER_NODE": "2"},
    "fsdp-2gpu": {**SCALE, "FT_NPROC_PER_NODE": "2", "FT_STRATEGY": "fsdp"},
    "2nodes-1gpu": {**SCALE, "_nodes": "2"},
}


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
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def run_variant(name: str, model: Path, data: dict[int, Path], out: Path, samples: int) -> dict:
    env = {**os.environ, "FT_BASE_MODEL": str(model), "FT_EVAL_FRACTION": "0", "FT_NUM_TRAIN_EPOCHS": "1",
           "FT_LOGGING_STEPS": "10", "FT_SAVE_MINUTES": "0", "FT_LOG_FORMAT": "json",
           "FT_OUTPUT_URI": str(out / "runs"), "FT_WORK_DIR": "/tmp/bench-work", "FT_OVERWRITE": "true",
           "FT_MAX_SEQ_LENGTH": "1024", "FT_RUN_ID": name,
           "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{ROOT}", **VARIANTS[name]}
    env["FT_DATASET"] = str(data[int(env["FT_MAX_SEQ_LENGTH"])])
    nodes = int(env.pop("_nodes", "1"))
    if gib := env.pop("_gpu_gib", None):
        env["BENCH_GPU_GIB"] = gib
        env["PYTHONPATH"] = f"{ROOT / 'bench' / 'gpucap'}:{env['PYTHONPATH']}"
    log_path = out / f"{name}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0  # the log gathers every round's run
    with open(log_path, "a") as log:
        if nodes == 1:
            code = subprocess.run([sys.executable, "-m", "job"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT).returncode
        else:  # one process per "node", each with one GPU and its own work directory
            procs = [subprocess.Popen([sys.executable, "-m", "job"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**env, "FT_NNODES": str(nodes), "FT_NODE_RANK": str(i),
                                           "FT_NPROC_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": str(i),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531",
                                           "NCCL_SOCKET_IFNAME": "lo", "FT_WORK_DIR": f"/tmp/bench-work-{i}"})
                     for i in range(nodes)]
            code = max(p.wait() for p in procs)
    if code != 0:
        return {"variant": name, "exit": code}
    manifest = json.loads((out / "runs" / name / "manifest.json").read_text())
    t, d, m = manifest["training"], manifest["data"], manifest["metrics"]
    return {"variant": name, "exit": 0, "tokens_per_s": d["trained_tokens"] / t["seconds"], "seconds": t["seconds"],
            "load_s": t["load_seconds"], "steps": t["steps"], "tokens_per_step": d["trained_tokens"] / t["steps"],
            "peak_gib": m.get("peak_gpu_mem_gib"), "reserved_gib": m.get("peak_gpu_reserved_gib"),
            "steady_tokens_per_s": steady_rate(log_path, offset),
            "processes": manifest["placement"].get("processes", 1), "strategy": manifest["placement"].get("strategy"),
            "plan": {k: t.get(k) for k in ("packing", "micro_batch_tokens", "gradient_checkpointing", "liger",
                                           "attention", "accumulation")}}


def steady_rate(log_path: Path, offset: int) -> float | None:
    """The median of the job's own tokens/s between logging steps, the first interval (warm-up) left out: what a
    longer run would approach. The epoch figure counts the warm-up, as the workload defines it."""
    with open(log_path) as f:
        f.seek(offset)
        rates = [e["tokens_per_s"] for line in f if line.startswith("{") and '"train step"' in line
                 for e in [json.loads(line)] if e.get("tokens_per_s") and e["step"] > 1]
    return statistics.median(rates) if rates else None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="guide,trl-packed,fast,lean")
    p.add_argument("--smoke", action="store_true", help="a tiny model instead of 7B: checks the script on a CPU")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = Path("/tmp/bench-smoke-model" if args.smoke else "/tmp/llama-2-7b-shape")
    build_model(model, SMOKE if args.smoke else LLAMA_2_7B)
    data = {n: Path(f"/tmp/bench-data-{n}.jsonl") for n in (1024, 2048)}
    for n, path in data.items():
        build_data(path, args.samples, n)
    tflops = gemm_tflops()
    results = []
    for round_ in range(args.rounds):
        for name in args.variants.split(","):
            r = run_variant(name, model, data, args.out, args.samples)
            r["round"] = round_
            results.append(r)
            print(json.dumps(r), flush=True)
            (args.out / "runs.json").write_text(json.dumps(results, indent=2))  # kept if the call is cut short
    summary = summarize(results, tflops)
    (args.out / "results.json").write_text(json.dumps({"gemm_tflops": tflops, "samples": args.samples,
                                                       "runs": results, "summary": summary}, indent=2))
    print_table(summary, tflops)
    return 0


def summarize(results: list[dict], tflops: float) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        ok = [r for r in results if r["variant"] == name and r["exit"] == 0]
        if not ok:
            rows.append({"variant": name, "failed": True})
            continue
        rates = [r["tokens_per_s"] for r in ok]
        med = statistics.median(rates)
        steady = [r["steady_tokens_per_s"] for r in ok if r.get("steady_tokens_per_s")]
        rows.append({"variant": name, "tokens_per_s": med, "spread": max(rates) - min(rates),
                     "steady_tokens_per_s": statistics.median(steady) if steady else None,
                     "mfu": 4 * N_PARAMS * med / (tflops * 1e12), **{k: ok[-1][k] for k in
                     ("peak_gib", "reserved_gib", "load_s", "tokens_per_step", "steps", "plan", "processes")}})
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "guide" and "tokens_per_s" in r), None)
    peer = next((r["tokens_per_s"] for r in rows if r["variant"] == "trl-packed" and "tokens_per_s" in r), None)
    one_gpu = next((r["tokens_per_s"] for r in rows if r["variant"] == "1gpu-ga2" and "tokens_per_s" in r), None)
    for r in rows:
        if "tokens_per_s" in r:
            r["x_guide"] = r["tokens_per_s"] / base if base else None
            r["x_peer"] = r["tokens_per_s"] / peer if peer else None
            # scale-out: speed-up over one GPU with the same global batch (ideal: the number of GPUs)
            r["x_1gpu"] = r["tokens_per_s"] / one_gpu if one_gpu and r.get("processes", 1) > 1 else None
    return rows


def print_table(rows: list[dict], tflops: float) -> None:
    print(f"\nbf16 GEMM {tflops:.0f} TFLOP/s\n")
    print("| variant | GPUs | tokens/s (median, spread) | steady tokens/s | x guide | x peer | x 1 GPU | "
          "peak GiB/GPU (reserved) | MFU/GPU | load s | tokens/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("failed"):
            print(f"| {r['variant']} | | failed | | | | | | | | |")
            continue
        f = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        gpus = r.get("processes", 1)
        steady = f"{r['steady_tokens_per_s']:,.0f}" if r.get("steady_tokens_per_s") else "-"
        print(f"| {r['variant']} | {gpus} | {r['tokens_per_s']:,.0f} (±{r['spread']:,.0f}) | {steady} | {f(r['x_guide'])} | "
              f"{f(r['x_peer'])} | {f(r['x_1gpu'])} | {r['peak_gib']} ({r['reserved_gib']}) | "
              f"{100 * r['mfu'] / gpus:.1f}% | {r['load_s']} | "
              f"{r['tokens_per_step']:,.0f} |")


if __name__ == "__main__":
    sys.exit(main())
