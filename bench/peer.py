"""The peers for bench/run.py: issue 7's workload trained with Unsloth, or with plain transformers + peft + trl (QLoRA
nf4, r=64 alpha=16 on q,v, bf16, paged AdamW 32-bit, lr 2e-4 cosine), in its own fresh process:

    python3 bench/peer.py --engine unsloth|trl --model MODEL_DIR --data DATA.jsonl --out DIR
        [--batch-size 4 --eval-fraction 0.1 --eval-steps 25] [--gradient-checkpointing unsloth]

With --batch-size N: the guide's recipe, N samples per optimizer step, flattened padding-free (trl's padding_free,
with Liger's kernels for the trl engine), the held-out split evaluated every --eval-steps. Without: trl's bfd packing
at --pack-tokens per optimizer step (a bigger-step recipe). Writes DIR/result.json with the metrics run.py reads from
the job's manifest ({"exit": 1, "error": ...} on failure). GPU only; Unsloth (and its trl, datasets) come first on
PYTHONPATH for the unsloth engine. Offline: no network call may hang the run.

Packed attention (read in unsloth 2026.10.9, not the job's): FastLlamaModel's attention gets `packed_seq_lengths`
from Unsloth's wrap of trl's padding-free collator (utils/packing.py enable_sample_packing); with neither flash-attn
nor xformers, utils/attention_dispatch.py select_attention_backend picks SDPA, and run_attention either calls torch's
varlen_attn (only if it has enable_gqa: torch >= 2.12, so not 2.11) or `_sdpa_packed_segments`: one causal SDPA call
per run of equal-length samples, no (T, T) mask. plan.attention records the branch that actually ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "UNSLOTH_DISABLE_STATISTICS": "1",  # unsloth/models/_utils.py get_statistics: a Hub download
               "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def say(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def probe_attention(seen: set) -> str:
    """Wrap the packed branches of Unsloth's run_attention (module globals, looked up per call) to record which ran."""
    from unsloth.models import _utils as uu
    from unsloth.utils import attention_dispatch as ad

    def wrap(name, label):
        fn = getattr(ad, name, None)
        if fn is None:
            return

        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            if out is not None:
                seen.add(label)
            return out
        setattr(ad, name, wrapped)

    wrap("_torch_varlen_packed", "sdpa: torch varlen_attn")
    wrap("_sdpa_packed_segments", "sdpa: per-segment causal calls")
    wrap("build_sdpa_packed_attention_mask", "sdpa: dense block mask")
    return (f"flash_attn={getattr(uu, 'HAS_FLASH_ATTENTION', None)} xformers={getattr(ad, 'HAS_XFORMERS', None)} "
            f"torch_varlen={getattr(ad, '_TORCH_VARLEN_ATTN', None) is not None}")


def load_plain(args):
    """transformers + bitsandbytes + peft, as the trl documentation sets QLoRA up (sdpa: no flash-attn here)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(Path(args.model).resolve()), quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=args.dropout, target_modules=["q_proj", "v_proj"],
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), AutoTokenizer.from_pretrained(args.model)


def main(args) -> dict:
    import torch
    if args.engine == "unsloth":
        say("importing unsloth")
        import unsloth  # noqa: F401 -- first: it patches transformers, trl and peft on import
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer  # Unsloth's generated UnslothSFTTrainer / UnslothSFTConfig after the import

    say(f"engine {args.engine}, torch {torch.__version__}, SFTTrainer={SFTTrainer.__name__}")
    seen: set = set()
    backends = probe_attention(seen) if args.engine == "unsloth" else "sdpa"
    say(f"attention backends: {backends}")
    gc = False if args.gradient_checkpointing == "none" else "unsloth"

    torch.cuda.synchronize()
    start = time.perf_counter()
    if args.engine == "trl":
        model, tokenizer = load_plain(args)
    else:
        model, tokenizer = load_unsloth(args, gc)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    say(f"load {load_s:.1f}s, {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated")
    return train(args, model, tokenizer, load_s, gc, seen, backends, Dataset, SFTConfig, SFTTrainer, TrainerCallback)


def load_unsloth(args, gc):
    import torch
    from unsloth import FastLanguageModel

    # max_seq_length bounds the packed rows: the generated trainer sets max_length = min(model.max_seq_length, ours).
    # Above the config's max_position_embeddings (4096) Unsloth would switch on RoPE scaling.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(Path(args.model).resolve()), max_seq_length=args.pack_tokens, dtype=torch.bfloat16,
        load_in_4bit=True,  # nf4 + double quant, bf16 compute: Unsloth's fixed BitsAndBytesConfig (llama.py)
        fix_tokenizer=False,  # the data is token ids; the tokenizer only names pad/bos/eos
        use_gradient_checkpointing=gc, random_state=0)
    say("model loaded; adding LoRA")
    model = FastLanguageModel.get_peft_model(
        model, r=64, lora_alpha=16, lora_dropout=args.dropout, target_modules=["q_proj", "v_proj"], bias="none",
        use_gradient_checkpointing=gc, random_state=0)
    return model, tokenizer


def train(args, model, tokenizer, load_s, gc, seen, backends, Dataset, SFTConfig, SFTTrainer, TrainerCallback) -> dict:
    import torch

    with open(args.data) as f:
        rows = [{"input_ids": json.loads(line)["input_ids"][:args.max_seq_length]} for line in f if line.strip()]
    evaluation = None
    if args.eval_fraction:  # the job's split: datasets' train_test_split with the job's default seed (42)
        parts = Dataset.from_list(rows).train_test_split(test_size=args.eval_fraction, seed=42)
        rows, evaluation = parts["train"].to_list(), parts["test"]
    trained_tokens = sum(len(r["input_ids"]) for r in rows)
    say(f"{len(rows)} samples, {trained_tokens} tokens, eval {len(evaluation) if evaluation else 0}")
    recipe = ({"per_device_train_batch_size": args.batch_size, "per_device_eval_batch_size": args.batch_size,
               "packing": False, "padding_free": True, "max_length": None,
               "use_liger_kernel": args.engine == "trl"} if args.batch_size else
              {"per_device_train_batch_size": 1, "packing": True, "packing_strategy": "bfd", "padding_free": True,
               "max_length": args.pack_tokens})
    config = SFTConfig(
        output_dir=str(Path(args.out) / "trainer"), num_train_epochs=1,
        gradient_accumulation_steps=1, learning_rate=2e-4, weight_decay=0.001,
        lr_scheduler_type="cosine", warmup_steps=0.03,  # transformers 5: a fraction below 1 is a ratio (job/train.py)
        max_grad_norm=0.3, optim="paged_adamw_32bit", bf16=True, fp16=False, seed=0, data_seed=0,
        logging_steps=args.logging_steps, logging_first_step=True, save_strategy="no",
        eval_strategy="steps" if evaluation else "no", eval_steps=args.eval_steps,
        report_to="none", completion_only_loss=False, **recipe,
        # Off: explicit, else trl's default (True) re-enables HF checkpointing. "unsloth": trl's default, as in
        # Unsloth's notebooks; the model's flag from get_peft_model decides (unsloth/models/_gc_config_default.py).
        **({} if gc else {"gradient_checkpointing": False}))
    # No data_collator: Unsloth's SFTTrainer wrapper (unsloth/trainer.py) turns packing off for a custom collator.
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), eval_dataset=evaluation,
                         processing_class=tokenizer)
    packed = trainer.train_dataset
    packing = "seq_lengths" in packed.column_names
    say(f"train dataset: {len(packed)} rows, columns {packed.column_names}, packing={packing}, "
        f"max_length={trainer.args.max_length}, padding_free={getattr(trainer.args, 'padding_free', None)}")
    if not packing and not args.batch_size:
        say("WARNING: the dataset was not packed; the numbers below are for unpacked micro-batches")

    # Count what each micro-batch holds, in the order the trainer consumes them (one per step with accumulation 1),
    # around the collator Unsloth wrapped (it adds packed_seq_lengths and masks sample boundaries).
    collator, step_tokens, label_tokens, marks = trainer.data_collator, [], [0], []
    inner = getattr(collator, "torch_call", collator)

    def counted(examples, *a, **kw):
        batch = inner(examples, *a, **kw)
        step_tokens.append(int(batch["input_ids"].numel()))
        if "labels" in batch:
            label_tokens[0] += int((batch["labels"] != -100).sum())
        if len(step_tokens) == 1:
            say(f"first batch: {({k: tuple(v.shape) for k, v in batch.items() if hasattr(v, 'shape')})}")
        return batch
    if hasattr(collator, "torch_call"):
        collator.torch_call = counted
    else:
        trainer.data_collator = counted

    class Clock(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                marks.append((state.global_step, time.perf_counter()))
                say(f"step {state.global_step}/{state.max_steps} loss {logs['loss']}")
    trainer.add_callback(Clock())

    say("training")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    steps = trainer.state.global_step
    say(f"trained {steps} steps in {seconds:.1f}s; collated {sum(step_tokens)} tokens in {len(step_tokens)} batches")

    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    rates, prev = [], (0, t0)
    for step, t in marks:
        if step > 1 and step > prev[0]:  # the first interval (warm-up) is left out, as in run.py's steady_rate
            rates.append(sum(step_tokens[prev[0]:step]) / max(t - prev[1], 1e-9))
        prev = (step, t)
    return {"exit": 0, "tokens_per_s": trained_tokens / seconds, "seconds": seconds, "load_s": load_s,
            "steps": steps, "tokens_per_step": trained_tokens / max(steps, 1), "trained_tokens": trained_tokens,
            "collated_tokens": sum(step_tokens), "label_tokens": label_tokens[0],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "steady_tokens_per_s": statistics.median(rates) if rates else None,
            "eval_loss": [None, evals[-1]] if evals else None,
            "plan": {"engine": args.engine, "packing": packing, "packed_rows": len(packed),
                     "batch_size": args.batch_size or None, "micro_batch_tokens": None if args.batch_size else
                     args.pack_tokens, "gradient_checkpointing": args.gradient_checkpointing,
                     "attention": ", ".join(sorted(seen)) or f"{backends}", "dropout": args.dropout}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["unsloth", "trl"], default="unsloth")
    p.add_argument("--batch-size", type=int, default=0, help="samples per step, padding-free; 0: packing")
    p.add_argument("--eval-fraction", type=float, default=0.0)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--pack-tokens", type=int, default=4096)
    p.add_argument("--max-seq-length", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", choices=["none", "unsloth"], default="none")
    p.add_argument("--logging-steps", type=int, default=10)
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    try:
        result = main(a)
    except BaseException as e:  # noqa: BLE001 -- any failure must still leave a result.json
        traceback.print_exc()
        result = {"exit": 1, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    (Path(a.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {Path(a.out) / 'result.json'}: exit {result['exit']}")
    sys.exit(result["exit"])
