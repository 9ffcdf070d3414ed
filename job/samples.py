"""Greedy answers to a few prompts, from the base model (the adapter disabled) and from the trained adapter.

The prompts are FT_SAMPLE_PROMPTS, each rendered as one user turn by the tokenizer's chat template with the
generation prompt (as a server would render it), or else the first FT_SAMPLE_COUNT evaluation samples, cut where
their first trained token begins: for chat data that is exactly the conversation up to the answer as the chat
template renders it for training (job/chat.py found that span), for prompt/completion and alpaca the prompt. A
sample whose every token is trained (the text format) is cut in half, and the model continues it. The evaluation
sample's trained part is the reference answer.

A generation has stopped when it produced one of the tokenizer's end-of-turn tokens (EOS, `<|im_end|>`,
`<|eot_id|>`..., as job/chat.py tells them) within FT_SAMPLE_MAX_NEW_TOKENS. The prompts go through `generate` in
left-padded batches; with LoRA's B matrices initialised to zero, the disabled adapter is the model before training.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from job import distributed, log
from job.chat import ChatMasker
from job.config import Settings
from job.speed import eager

IGNORE = -100
SHOWN_PROMPT_CHARS = 200  # a prompt is shown by its end: the system prompt and template text are the same in each
BATCH = 8


@dataclass
class Prompt:
    """One prompt: its token ids, how it is shown, and the reference answer (evaluation samples only)."""

    ids: list[int]
    shown: str
    reference: str | None = None


def eval_prompts(eval_ds, tokenizer, count: int) -> list[Prompt]:
    """The first `count` samples of the tokenized evaluation split (`input_ids`, `labels`), each cut before its
    first trained token (or in half when every token is trained), with the trained part as the reference."""
    prompts = []
    stops = ChatMasker(tokenizer).end_ids
    for sample in eval_ds.select(range(min(count, len(eval_ds)))) if eval_ds is not None else []:
        ids, labels = list(sample["input_ids"]), list(sample["labels"])
        cut = next((k for k, label in enumerate(labels) if label != IGNORE), len(ids))
        if cut in (0, 1) or cut >= len(ids):  # every token trained (BOS aside): continue the first half
            cut = max(1, len(ids) // 2)
        end = cut
        while end < len(ids) and labels[end] != IGNORE and ids[end] not in stops:
            end += 1
        prompts.append(Prompt(ids[:cut], _shown(tokenizer.decode(ids[:cut], skip_special_tokens=True)),
                              tokenizer.decode(ids[cut:end], skip_special_tokens=True).strip()))
    return prompts


def user_prompts(texts: list[str], tokenizer) -> list[Prompt]:
    """FT_SAMPLE_PROMPTS, each as one user turn through the chat template with its generation prompt; the plain
    text (BOS as the tokenizer adds it) for a tokenizer without a chat template."""
    prompts = []
    for text in texts:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        else:
            ids = tokenizer(text).input_ids
        prompts.append(Prompt(list(ids), text))
    return prompts


def _shown(text: str) -> str:
    text = text.strip()
    return text if len(text) <= SHOWN_PROMPT_CHARS else "…" + text[-SHOWN_PROMPT_CHARS:]


def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, stop_ids: set[int]) -> list[dict]:
    """Greedy continuations of `prompts`, in left-padded batches of up to BATCH: per prompt the text up to the first
    end token (special tokens dropped), whether an end token came within `max_new_tokens`, and the tokens spent."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), BATCH):
        part = prompts[start:start + BATCH]
        width = max(len(p.ids) for p in part)
        ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in part], device=device)
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in part], device=device)
        with torch.no_grad(), eager():  # FT_COMPILE's layers would recompile for every KV-cache shape
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, temperature=None, top_p=None, top_k=None,
                                       eos_token_id=sorted(stop_ids), pad_token_id=pad, use_cache=True)
        for row in generated[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in stop_ids), None)
            text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            out.append({"text": text, "stopped": end is not None, "tokens": len(row) if end is None else end + 1})
    return out


@contextlib.contextmanager
def generation_mode(model):
    """The model in eval mode, with an attention implementation that takes a KV cache: the job's `varlen` attention
    (job/attention.py) computes padding-free training rows and refuses a cache, so generation uses sdpa."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = getattr(base.config, "_attn_implementation", None)
    was_training = model.training
    swap = attn == "varlen" and hasattr(base, "set_attn_implementation")
    if swap:
        base.set_attn_implementation("sdpa")
    model.eval()
    try:
        yield
    finally:
        if swap:
            base.set_attn_implementation(attn)
        model.train(was_training)


def sample_generations(cfg: Settings, model, tokenizer, eval_ds) -> dict[str, Any] | None:
    """Before and after answers to the sample prompts, with the share of each that stopped; None when there are no
    prompts (FT_SAMPLE_COUNT=0 and no FT_SAMPLE_PROMPTS, or no evaluation split: logged as a warning naming the
    settings that would give prompts). `model` is the trained PeftModel."""
    texts = cfg.sample_prompt_list
    prompts = user_prompts(texts, tokenizer) if texts else eval_prompts(eval_ds, tokenizer, cfg.sample_count)
    if not prompts:
        if cfg.sample_count > 0 and not texts and distributed.is_main():  # asked for, nowhere to take them from
            log.get().warning(
                "sample answers skipped: no held-out evaluation samples to take prompts from and no FT_SAMPLE_PROMPTS, "
                "so the quality check cannot tell whether answers stop; set FT_SAMPLE_PROMPTS, or hold out evaluation "
                "samples with FT_EVAL_FRACTION > 0 or FT_EVAL_SPLIT",
                eval_fraction=cfg.eval_fraction, eval_split=cfg.eval_split, sample_count=cfg.sample_count)
        return None
    stops = ChatMasker(tokenizer).end_ids
    start = time.monotonic()
    with generation_mode(model):
        with model.disable_adapter():
            before = generate(model, tokenizer, prompts, cfg.sample_max_new_tokens, stops)
        after = generate(model, tokenizer, prompts, cfg.sample_max_new_tokens, stops)
    samples = [{"prompt": p.shown, **({"reference": p.reference} if p.reference is not None else {}),
                "before": b["text"], "after": a["text"], "stopped_before": b["stopped"], "stopped_after": a["stopped"]}
               for p, b, a in zip(prompts, before, after)]
    return {
        "source": "FT_SAMPLE_PROMPTS" if texts else "evaluation samples",
        "max_new_tokens": cfg.sample_max_new_tokens,
        "stopped_before": round(sum(b["stopped"] for b in before) / len(prompts), 4),
        "stopped_after": round(sum(a["stopped"] for a in after) / len(prompts), 4),
        "seconds": round(time.monotonic() - start, 2),
        "samples": samples,
    }

