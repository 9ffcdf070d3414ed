"""Dataset records to token ids and labels: format detection, chat templates, completion-only masks, truncation.

Tokenization happens here, once, so that what is trained on is exactly what this module's tests check: EOS at
the end of every sample and in its labels, prompt tokens masked (-100) where the format marks a prompt, samples
cut to FT_MAX_SEQ_LENGTH and counted. trl's SFTTrainer receives `input_ids` and `labels` and skips its own
tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job import log
from job.config import Settings
from job.errors import ConfigError, InputError
from job.fetch import DATA_BUILDERS

IGNORE = -100
REQUIRED_COLUMNS = {
    "tokens": ["input_ids"],
    "chat": ["messages"],
    "alpaca": ["instruction", "output"],
    "prompt_completion": ["prompt", "completion"],
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass
class DataStats:
    format: str
    train_samples: int
    eval_samples: int
    truncated: int
    dropped: int
    train_tokens: int
    trained_tokens: int  # labels != -100


# --- loading and splitting -------------------------------------------------------------------------------------

def load_splits(cfg: Settings, path: Path):
    """The training and evaluation splits (eval may be None), with FT_MAX_SAMPLES applied."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        if path.is_file():
            ds = load_dataset(DATA_BUILDERS[path.suffix], data_files=str(path))
        else:
            ds = load_dataset(str(path))
    except (DatasetGenerationError, ValueError, FileNotFoundError) as e:
        cause = e.__cause__ or e
        raise InputError(f"FT_DATASET={cfg.dataset}: could not be read ({' '.join(str(cause).split())[:300]})") from None
    splits = list(ds)
    if cfg.dataset_split not in ds:
        raise ConfigError([f"FT_DATASET_SPLIT={cfg.dataset_split}: no such split; the dataset has {', '.join(splits)}"])
    # FT_MAX_SAMPLES first, so that a smoke run also evaluates on a few samples.
    train, evaluation = _first(ds[cfg.dataset_split], cfg.max_samples), None
    if cfg.eval_split:
        if cfg.eval_split not in ds:
            raise ConfigError([f"FT_EVAL_SPLIT={cfg.eval_split}: no such split; the dataset has {', '.join(splits)}"])
        evaluation = _first(ds[cfg.eval_split], cfg.max_samples)
    elif cfg.eval_fraction > 0 and len(train) > 1:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    if len(train) == 0:
        raise InputError(f"FT_DATASET={cfg.dataset}: the training split is empty")
    return train, evaluation


def _first(ds, n: int | None):
    return ds.select(range(min(n, len(ds)))) if n else ds


# --- format detection ------------------------------------------------------------------------------------------

def detect_format(columns: list[str], cfg: Settings) -> str:
    fmt = cfg.dataset_format
    if fmt == "auto":
        fmt = next((f for f, cols in REQUIRED_COLUMNS.items() if all(c in columns for c in cols)), None)
        fmt = fmt or ("text" if cfg.text_field in columns else None)
        if fmt is None:
            raise ConfigError([
                f"FT_DATASET_FORMAT=auto: cannot tell the format from the columns {columns}; expected `messages` "
                f"(chat), `instruction`+`output` (alpaca), `prompt`+`completion`, or FT_TEXT_FIELD={cfg.text_field}"
            ])
        return fmt
    required = REQUIRED_COLUMNS.get(fmt, [cfg.text_field])
    missing = [c for c in required if c not in columns]
    if missing:
        setting = "FT_TEXT_FIELD" if fmt == "text" else "FT_DATASET_FORMAT"
        raise ConfigError([f"{setting}: the {fmt} format needs column(s) {missing}; the dataset has {columns}"])
    return fmt


# --- tokenization ----------------------------------------------------------------------------------------------

class Tokenize:
    """One record to `input_ids` and `labels`, for `Dataset.map`."""

    def __init__(self, tokenizer, fmt: str, cfg: Settings):
        self.tok, self.fmt, self.cfg = tokenizer, fmt, cfg
        self.eos = tokenizer.eos_token_id
        # Tokenizers that prepend BOS themselves (Llama's) would double a literal "<s>" at the start of a text.
        probe = tokenizer("a").input_ids
        self.strip_bos = tokenizer.bos_token if probe and probe[0] == tokenizer.bos_token_id else None

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        pieces = self.pieces(record)
        ids = [t for piece, _ in pieces for t in piece]
        trainable = [train or not self.cfg.completion_only_loss for piece, train in pieces for _ in piece]
        truncated = len(ids) > self.cfg.max_seq_length
        ids, trainable = ids[: self.cfg.max_seq_length], trainable[: self.cfg.max_seq_length]
        labels = [t if train else IGNORE for t, train in zip(ids, trainable)]
        return {"input_ids": ids, "labels": labels, "truncated": truncated}

    def pieces(self, record: dict[str, Any]) -> list[tuple[list[int], bool]]:
        """The sample as (token ids, trained on) pieces, EOS last (pre-tokenized samples are taken as they are)."""
        if self.fmt == "tokens":
            labels = record.get("labels") or record["input_ids"]
            return [([t], label != IGNORE) for t, label in zip(record["input_ids"], labels)]
        if self.fmt == "text":
            text = record[self.cfg.text_field]
            if self.strip_bos and text.startswith(self.strip_bos):
                text = text[len(self.strip_bos):].lstrip()
            return [(self._with_eos(self.tok(text).input_ids), True)]
        if self.fmt == "chat":
            return self._chat(record["messages"])
        if self.fmt == "alpaca":
            record = self._alpaca_to_prompt_completion(record)
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion
            return self._chat(prompt + completion, first_trained=len(prompt))
        return [
            (self.tok(prompt).input_ids, False),
            (self._with_eos(self.tok(completion, add_special_tokens=False).input_ids), True),
        ]

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos else [*ids, self.eos]

    def _alpaca_to_prompt_completion(self, record: dict[str, Any]) -> dict[str, Any]:
        instruction, context = record["instruction"], (record.get("input") or "").strip()
        if self.tok.chat_template:
            user = f"{instruction}\n\n{context}" if context else instruction
            return {"prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": record["output"]}]}
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if context else "",
            instruction=instruction, input=f"### Input:\n{context}\n\n" if context else "",
        )
        return {"prompt": prompt, "completion": record["output"]}

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        return list(self.tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        ))

    def _chat(self, messages: list[dict], first_trained: int = 0) -> list[tuple[list[int], bool]]:
        """Assistant turns (from `first_trained` on) are trained; everything else is context. The spans come from
        rendering growing prefixes of the conversation, so any chat template works without special markers."""
        if not self.tok.chat_template:
            raise ConfigError(["FT_DATASET_FORMAT=chat: the tokenizer has no chat template; use the text format"])
        pieces, done = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < first_trained:
                continue
            before = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1])
            if before[: len(done)] != done or upto[: len(before)] != before:
                # The template rewrites earlier turns (e.g. drops reasoning): fall back to training on all of it.
                return [(self._with_eos(self._render(messages)), True)]
            pieces += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        full = self._render(messages)
        if full[: len(done)] != done:
            return [(self._with_eos(full), True)]
        rest = full[len(done):]
        if self.eos not in [t for piece, train in pieces if train for t in piece] and self.eos not in rest:
            rest = [*rest, self.eos]  # a template that closes assistant turns without EOS
        if rest:
            pieces.append((rest, not pieces))
        return pieces


def tokenize_splits(train, evaluation, tokenizer, cfg: Settings):
    """Tokenize both splits; return them with their statistics, logged once."""
    fmt = detect_format(list(train.column_names), cfg)
    fn = Tokenize(tokenizer, fmt, cfg)

    def run(ds, name):
        out = ds.map(fn, remove_columns=ds.column_names, desc=f"Tokenizing {name}")
        truncated = sum(out["truncated"])
        kept = out.filter(lambda r: any(label != IGNORE for label in r["labels"]), desc=f"Filtering {name}")
        return kept.remove_columns("truncated"), truncated, len(out) - len(kept)

    train_tok, truncated, dropped = run(train, "train")
    eval_tok = None
    if evaluation is not None and len(evaluation):
        eval_tok, eval_truncated, eval_dropped = run(evaluation, "eval")
        truncated, dropped = truncated + eval_truncated, dropped + eval_dropped
        eval_tok = eval_tok if len(eval_tok) else None  # every eval sample dropped: no evaluation
    if len(train_tok) == 0:
        raise InputError(f"FT_DATASET={cfg.dataset}: no training sample has a token to learn from after truncation")
    lengths = [len(ids) for ids in train_tok["input_ids"]]
    stats = DataStats(
        format=fmt, train_samples=len(train_tok), eval_samples=len(eval_tok) if eval_tok is not None else 0,
        truncated=truncated, dropped=dropped, train_tokens=sum(lengths),
        trained_tokens=sum(sum(1 for x in labels if x != IGNORE) for labels in train_tok["labels"]),
    )
    log.get().info(
        "dataset ready", **vars(stats), max_seq_length=cfg.max_seq_length, longest=max(lengths),
        **({"warning": f"{truncated} samples longer than FT_MAX_SEQ_LENGTH were truncated"} if truncated else {}),
    )
    return train_tok, eval_tok, stats


# --- tokenizer -------------------------------------------------------------------------------------------------

def load_tokenizer(path: Path, cfg: Settings):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    tok.padding_side = "right"
    choose_pad_token(tok)
    return tok


def choose_pad_token(tok) -> None:
    """A pad token distinct from EOS. The guide's pad=eos lets a collator that masks pad ids also mask every EOS
    label, and the model then never learns to stop."""
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return
    candidates = [tok.unk_token] + [t for t in tok.all_special_tokens if "pad" in t.lower()]
    for token in candidates:
        if token is not None and token != tok.eos_token:
            tok.pad_token = token
            return
    # No spare token: keep EOS for padding. Our labels mask padding by position, not by id, so EOS is still learned.
    tok.pad_token = tok.eos_token
    log.get().warning("no pad token distinct from EOS; padding with EOS (EOS labels are kept, padding is masked)")
