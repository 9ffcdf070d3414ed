"""Dataset records to token ids and labels: format detection, chat templates, completion-only masks, truncation.

Tokenization happens here, once, so that what is trained on is exactly what this module's tests check: EOS at
the end of every sample and in its labels, prompt tokens masked (-100) where the format marks a prompt (chat
answers and their end-of-turn tokens found by job/chat.py), samples cut to FT_MAX_SEQ_LENGTH and counted, records
that cannot be used (job/records.py) dropped and logged by row or stopping the run. trl's SFTTrainer receives `input_ids` and `labels` and skips its own
tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job import log
from job.chat import ChatMasker, MaskingError
from job.config import Settings
from job.errors import ConfigError, InputError, JobError, first_line
from job.fetch import DATA_BUILDERS
from job.records import answer_roles, chat_column, conversation, numbers_as_text, problem

IGNORE = -100
ROW = "__row__"  # each record's index in its split as loaded, so that errors and logs name the record
REQUIRED_COLUMNS = {
    "tokens": ["input_ids"],
    "chat": ["messages"],  # or ShareGPT's `conversations`
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
    dropped: int  # left with no token to learn from by truncation
    bad_records: int  # records that could not be used (FT_BAD_RECORDS=drop), train and eval
    train_tokens: int
    trained_tokens: int  # labels != -100


# --- loading and splitting -------------------------------------------------------------------------------------

def load_splits(cfg: Settings, path: Path):
    """The training and evaluation splits (eval may be None), with FT_MAX_SAMPLES applied."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    if path.is_dir():
        _check_data_dir(cfg, path)
    try:
        if path.is_file():
            ds = load_dataset(DATA_BUILDERS[path.suffix], data_files=str(path))
        else:
            ds = load_dataset(str(path))
    except StopIteration:  # datasets 5 on an empty JSON Lines file
        raise InputError(f"FT_DATASET={cfg.dataset}: the file is empty") from None
    except (DatasetGenerationError, ValueError, FileNotFoundError) as e:
        if bad_line := _first_bad_json_line(path):  # datasets counts rows from its 10 MB chunk's start, not the file's
            raise InputError(f"FT_DATASET={cfg.dataset}: could not be read: {bad_line}") from None
        cause = e.__cause__ or e
        raise InputError(f"FT_DATASET={cfg.dataset}: could not be read ({' '.join(str(cause).split())[:300]})") from None
    splits = list(ds)
    ds = {name: split.add_column(ROW, list(range(len(split)))) if ROW not in split.column_names else split
          for name, split in ds.items() if name in (cfg.dataset_split, cfg.eval_split)}
    if cfg.dataset_split not in ds:
        raise ConfigError([f"FT_DATASET_SPLIT={cfg.dataset_split}: no such split; the dataset has {', '.join(splits)}"])
    # FT_MAX_SAMPLES first, so that a smoke run also evaluates on a few samples.
    train, evaluation = _first(ds[cfg.dataset_split], cfg.max_samples), None
    if cfg.eval_split:
        if cfg.eval_split not in splits:
            raise ConfigError([f"FT_EVAL_SPLIT={cfg.eval_split}: no such split; the dataset has {', '.join(splits)}"])
        evaluation = _first(ds[cfg.eval_split], cfg.max_samples)
    elif cfg.eval_fraction > 0 and len(train):
        if len(train) < (needed := cfg.records_to_split):  # it trained without evaluation, or datasets raised
            raise ConfigError([f"FT_DATASET={cfg.dataset}: split {cfg.dataset_split} has {len(train)} record(s), too "
                               f"few to hold out FT_EVAL_FRACTION={cfg.eval_fraction:g} for evaluation and keep one "
                               f"for training ({needed} needed); add records, evaluate on FT_EVAL_SPLIT, or set "
                               "FT_EVAL_FRACTION=0 to train without evaluation"])
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    if len(train) == 0:
        raise InputError(f"FT_DATASET={cfg.dataset}: the training split is empty")
    return train, evaluation


def _first_bad_json_line(path: Path) -> str | None:
    """Where the first JSON Lines file under `path` (a .jsonl file, or a directory's, in name order) first fails to
    parse, as "line N (row R) is why": R counted from 0 as rows are everywhere, blank lines not counted; the file
    named when `path` is a directory. None when every line parses. Read line by line, only on the error path:
    datasets reports a row counted from the start of the 10 MB chunk it was reading."""
    import json

    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
    for file in files:
        if file.suffix != ".jsonl":
            continue
        row = 0
        with file.open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():  # blank lines are skipped, not rows
                    continue
                try:  # bytes that are not UTF-8 do not stop datasets either; a byte-order mark is not JSON's
                    text = line.rstrip(b"\r\n").decode("utf-8-sig" if number == 1 else "utf-8", "replace")
                    record, why = json.loads(text), None
                except json.JSONDecodeError as e:
                    why = f"not valid JSON: {e.msg} (column {e.colno})"
                else:
                    if not isinstance(record, dict):
                        why = f"a JSON {type(record).__name__}, not an object"
                if why:
                    where = f"{file.relative_to(path)} " if file != path else ""
                    return f"{where}line {number} (row {row}) is {why}"
                row += 1
    return None


def _check_data_dir(cfg: Settings, path: Path) -> None:
    """A dataset directory holds data files of one type: datasets reads the most common type and skips the others
    without a word. Raises InputError naming FT_DATASET when it mixes .jsonl, .csv and .parquet files, or holds none
    of the types read (.jsonl, .json, .csv, .parquet; .json alone may be metadata, so it does not count as a mix)."""
    found = {p.suffix for p in path.rglob("*") if p.is_file() and p.suffix in DATA_BUILDERS}
    if not found:
        raise InputError(f"FT_DATASET={cfg.dataset}: no .jsonl, .json, .csv or .parquet file in {path}")
    if len(mixed := sorted(found - {".json"})) > 1:
        raise InputError(f"FT_DATASET={cfg.dataset}: mixes {', '.join(mixed)} files; datasets would read one type "
                         "and skip the others: keep one type per dataset")


def _first(ds, n: int | None):
    return ds.select(range(min(n, len(ds)))) if n else ds


# --- format detection ------------------------------------------------------------------------------------------

def detect_format(columns: list[str], cfg: Settings) -> str:
    """The format of records with these columns: FT_DATASET_FORMAT, or detected from the columns when `auto`.
    Raises ConfigError naming the columns when it cannot tell, or when a set format's columns are missing."""
    fmt = cfg.dataset_format
    columns = [c for c in columns if c != ROW]
    if "conversations" in columns and "messages" not in columns:  # ShareGPT: chat
        columns = [*columns, "messages"]
    if fmt == "auto":
        fmt = next((f for f, cols in REQUIRED_COLUMNS.items() if all(c in columns for c in cols)), None)
        fmt = fmt or ("text" if cfg.text_field in columns else None)
        if fmt is None:
            raise ConfigError([
                f"FT_DATASET_FORMAT=auto: cannot tell the format from the columns {columns}; expected `messages` "
                f"or `conversations` (chat), `instruction`+`output` (alpaca), `prompt`+`completion`, or "
                f"FT_TEXT_FIELD={cfg.text_field}"
            ])
        return fmt
    required = REQUIRED_COLUMNS.get(fmt, [cfg.text_field])
    missing = [c for c in required if c not in columns]
    if missing:
        setting = "FT_TEXT_FIELD" if fmt == "text" else "FT_DATASET_FORMAT"
        raise ConfigError([f"{setting}: the {fmt} format needs column(s) {missing}; the dataset has {columns}"])
    return fmt


# --- tokenization ----------------------------------------------------------------------------------------------

def format_setting(cfg: Settings, fmt: str) -> str:
    """How errors name the format: as set, or as detected from the columns."""
    return f"FT_DATASET_FORMAT={fmt}" if cfg.dataset_format == fmt else f"FT_DATASET_FORMAT=auto (detected {fmt})"


class Tokenize:
    """One record to `input_ids` and `labels`, for `Dataset.map(..., with_indices=True)`; a record that cannot be
    used comes back with a reason in `bad` (FT_BAD_RECORDS=drop) or raises InputError (`fail`)."""

    def __init__(self, tokenizer, fmt: str, cfg: Settings):
        require_eos(tokenizer, cfg)
        self.tok, self.fmt, self.cfg = tokenizer, fmt, cfg
        self.eos = tokenizer.eos_token_id
        self.roles = answer_roles(cfg.answer_roles)
        self.masker = ChatMasker(tokenizer)
        if fmt == "chat" and not tokenizer.chat_template:
            raise ConfigError([f"{format_setting(cfg, fmt)}: the tokenizer of FT_BASE_MODEL={cfg.base_model} has no "
                               "chat template; use the text or prompt_completion format"])
        # Tokenizers that prepend BOS themselves (Llama's) would double a literal "<s>" at the start of a text.
        probe = tokenizer("a").input_ids
        self.strip_bos = tokenizer.bos_token if probe and probe[0] == tokenizer.bos_token_id else None

    def __call__(self, record: dict[str, Any], index: int = 0) -> dict[str, Any]:
        row = record.get(ROW, index)
        where = f"FT_DATASET={self.cfg.dataset} row {row}"
        try:
            reason, pieces = self.pieces(record)
        except MaskingError as e:  # a bad record; when the template hides every answer, too many of them stop the run
            reason, pieces = str(e), []
        except JobError:  # ConfigError: holds for every record
            raise
        except Exception as e:  # a template or tokenizer that rejects this record (jinja's raise_exception too)
            reason, pieces = f"the chat template or tokenizer failed: {first_line(e)}", []
        if reason and self.cfg.bad_records == "fail":
            raise InputError(f"{where}: {reason} (FT_BAD_RECORDS=fail; `drop` skips such records and counts them)")
        ids = [t for piece, _ in pieces for t in piece]
        trainable = [train or not self.cfg.completion_only_loss for piece, train in pieces for _ in piece]
        truncated = len(ids) > self.cfg.max_seq_length
        ids, trainable = ids[: self.cfg.max_seq_length], trainable[: self.cfg.max_seq_length]
        labels = [t if train else IGNORE for t, train in zip(ids, trainable)]
        return {"input_ids": ids, "labels": labels, "truncated": truncated, "bad": reason or "", "row": row}

    def pieces(self, record: dict[str, Any]) -> tuple[str | None, list[tuple[list[int], bool]]]:
        """Why the record cannot be used (or None), and the sample as (token ids, trained on) pieces, EOS (or the
        template's end-of-turn token) closing each trained part; pre-tokenized samples are taken as they are."""
        if self.fmt == "chat":
            column = chat_column(record)
            messages, answers, reason = conversation(record.get(column), self.roles)
            return (f"`{column}` {reason}", []) if reason else (None, self._chat(messages, answers))
        record = numbers_as_text(record, self.fmt, self.cfg.text_field)
        reason = problem(record, self.fmt, self.cfg.text_field)
        if reason:
            return reason, []
        if self.fmt == "tokens":
            vocab = len(self.tok)
            if (outside := next((t for t in record["input_ids"] if not 0 <= t < vocab), None)) is not None:
                return f"`input_ids` holds {outside}, outside the tokenizer's vocabulary (0 to {vocab - 1})", []
            labels = record.get("labels") or record["input_ids"]
            return None, [([t], label != IGNORE) for t, label in zip(record["input_ids"], labels)]
        if self.fmt == "text":
            text = record[self.cfg.text_field]
            if self.strip_bos and text.startswith(self.strip_bos):
                text = text[len(self.strip_bos):].lstrip()
            return None, [(self._with_eos(self.tok(text).input_ids), True)]
        if self.fmt == "alpaca":
            record = self._alpaca_to_prompt_completion(record)
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion: the completion's answers are trained
            messages, answers, reason = conversation(prompt + completion, self.roles)
            if reason:
                return f"`prompt` + `completion` {reason}", []
            answers = [i for i in answers if i >= len(prompt)]
            if not answers:
                return f"`completion` has no answering turn (FT_ANSWER_ROLES={self.cfg.answer_roles})", []
            return None, self._chat(messages, answers)
        return None, [
            (self.tok(prompt).input_ids, False),
            (self._with_eos(self.tok(completion, add_special_tokens=False).input_ids), True),
        ]

    def _with_eos(self, ids: list[int]) -> list[int]:
        """`ids` closed by EOS: as they are when EOS ends them, or is followed only by whitespace (ChatML templates
        end a conversation with "<|im_end|>\n"); else with EOS appended."""
        for t in reversed(ids[-4:]):
            if t == self.eos:
                return ids
            if self.tok.decode([t]).strip():
                break
        return [*ids, self.eos]

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

    def _chat(self, messages: list[dict], answers: list[int]) -> list[tuple[list[int], bool]]:
        if not self.tok.chat_template:
            raise ConfigError([f"{format_setting(self.cfg, self.fmt)}: conversational records need a chat template; "
                               f"the tokenizer of FT_BASE_MODEL={self.cfg.base_model} has none"])
        if not self.cfg.completion_only_loss:
            return [(self._with_eos(self.masker.render(messages)), True)]
        return self.masker.pieces(messages, answers)


def tokenize_splits(train, evaluation, tokenizer, cfg: Settings):
    """Tokenize both splits (datasets.Dataset; evaluation may be None); return them as `input_ids` and `labels`
    per sample, with their DataStats, logged once. Records that cannot be used are dropped and logged by row
    (FT_BAD_RECORDS=drop), or stop the run (`fail`); more than FT_BAD_RECORDS_MAX_FRACTION of them stops it too.
    Raises InputError (FT_DATASET, the row) and ConfigError (a format the tokenizer cannot render)."""
    fmt = detect_format(list(train.column_names), cfg)
    fn = Tokenize(tokenizer, fmt, cfg)
    bad: dict[str, list[int]] = {}
    train_tok, truncated, dropped, total = _tokenize(train, "train", fn, bad)
    eval_tok = None
    if evaluation is not None and len(evaluation):
        eval_tok, eval_truncated, eval_dropped, eval_total = _tokenize(evaluation, "eval", fn, bad)
        truncated, dropped, total = truncated + eval_truncated, dropped + eval_dropped, total + eval_total
        if not len(eval_tok):
            log.get().warning("no evaluation: every eval sample was dropped (records that cannot be used, or left "
                              "with no token to learn from by FT_MAX_SEQ_LENGTH)", eval_records=eval_total)
            eval_tok = None
    n_bad = _check_bad_records(bad, total, cfg)
    if len(train_tok) == 0:
        raise InputError(f"FT_DATASET={cfg.dataset}: no training sample has a token to learn from after truncation to "
                         f"FT_MAX_SEQ_LENGTH={cfg.max_seq_length} tokens ({dropped} left without one); raise it, or "
                         "check that the answers are not masked out")
    lengths = [len(ids) for ids in train_tok["input_ids"]]
    stats = DataStats(
        format=fmt, train_samples=len(train_tok), eval_samples=len(eval_tok) if eval_tok is not None else 0,
        truncated=truncated, dropped=dropped, bad_records=n_bad, train_tokens=sum(lengths),
        trained_tokens=sum(trained_count(labels) for labels in train_tok["labels"]),
    )
    problems = [f"{truncated} samples longer than FT_MAX_SEQ_LENGTH were truncated"] if truncated else []
    if dropped:
        problems.append(f"{dropped} samples had no token left to learn from and were dropped")
    notes = {"warning": "; ".join(problems)} if problems else {}
    if fn.masker.eos_inserted:
        log.get().warning("the chat template closes answers without an end-of-turn token; EOS was inserted after "
                          "each answer and trained, so that the model learns where an answer stops")
    log.get().info("dataset ready", **vars(stats), max_seq_length=cfg.max_seq_length, longest=max(lengths), **notes)
    return train_tok, eval_tok, stats


def _tokenize(ds, name: str, fn: Tokenize, bad: dict[str, list[int]]):
    """One split tokenized: the usable samples, how many were truncated, how many were left without a trained
    token, and how many records there were; the reasons of unusable records are added to `bad` with their rows."""
    from datasets import Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int64")), "labels": Sequence(Value("int64")),
                         "truncated": Value("bool"), "bad": Value("string"), "row": Value("int64")})
    # Never from datasets' cache: the tokenizer's side notes (an EOS inserted after answers) must be seen every run.
    out = ds.map(fn, with_indices=True, remove_columns=ds.column_names, features=features, desc=f"Tokenizing {name}",
                 load_from_cache_file=False)
    for reason, row in zip(out["bad"], out["row"]):
        if reason:
            bad.setdefault(reason, []).append(row)
    usable = out.filter(lambda r: not r["bad"], desc=f"Dropping unusable {name} records")
    kept = usable.filter(lambda r: trained_count(r["labels"]) > 0, desc=f"Filtering {name}")
    return kept.remove_columns(["truncated", "bad", "row"]), sum(usable["truncated"]), len(usable) - len(kept), len(out)


def _check_bad_records(bad: dict[str, list[int]], total: int, cfg: Settings) -> int:
    """Log the records that could not be used, by reason and row; raise InputError when they are more than
    FT_BAD_RECORDS_MAX_FRACTION of all records. Returns their number."""
    n = sum(len(rows) for rows in bad.values())
    if not n:
        return 0
    by_row = sorted(bad.items(), key=lambda item: min(item[1]))  # reasons in the order of their first rows
    examples = "; ".join(f"row {min(rows)}: {reason}" for reason, rows in by_row[:3])
    if n > cfg.bad_records_max_fraction * total:
        raise InputError(f"FT_DATASET={cfg.dataset}: {n} of {total} records cannot be used, more than "
                         f"FT_BAD_RECORDS_MAX_FRACTION={cfg.bad_records_max_fraction} of them ({examples})")
    log.get().warning("records dropped", bad_records=n, records=total,
                      reasons={reason: sorted(rows)[:10] for reason, rows in by_row[:10]})
    return n


def trained_count(labels: list[int]) -> int:
    """Tokens of one sample its loss trains on: labels other than -100, the first left out (nothing predicts it; as
    job.steps.trained_tokens counts a batch)."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def render_trained(tokenizer, input_ids: list[int], labels: list[int]) -> tuple[str, str, str]:
    """A tokenized sample as text, the tokens its loss trains on wrapped in markers (with completion-only loss: the
    answers and the token that closes each). Returns (text, opening marker, closing marker): `[[` and `]]`, or where
    the sample's own text holds those or a trained run begins with `[` or ends with `]`, `⟦ ⟧` or longer runs of
    either, so that a marker never reads as data. Each run
    of trained or untrained tokens is decoded on its own, special tokens kept; `labels` is aligned with `input_ids`
    (-100: not trained). The first token is never marked: nothing predicts it (job.steps.trained_tokens)."""
    labels = [IGNORE, *labels[1:]]
    runs, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE) != (labels[start] == IGNORE):
            runs.append((tokenizer.decode(input_ids[start:i], skip_special_tokens=False), labels[start] != IGNORE))
            start = i
    plain = "".join(text for text, _ in runs)

    def clear(opening: str, closing: str) -> bool:  # no marker in the text, none merging with a bracket beside it
        return opening not in plain and closing not in plain and not any(
            trained and (text.startswith(opening[0]) or text.endswith(closing[0])) for text, trained in runs)

    opening, closing = next(pair for width in range(1, len(plain) + 3) for pair in
                            (("[" * (width + 1), "]" * (width + 1)), ("⟦" * width, "⟧" * width)) if clear(*pair))
    return "".join(f"{opening}{text}{closing}" if trained else text for text, trained in runs), opening, closing


# --- tokenizer -------------------------------------------------------------------------------------------------

def load_tokenizer(path: Path, cfg: Settings):
    """The model's tokenizer from `path`, padding on the right with a pad token distinct from EOS. Raises
    InputError naming FT_BASE_MODEL when it has no EOS token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    require_eos(tok, cfg)
    tok.padding_side = "right"
    choose_pad_token(tok)
    return tok


def require_eos(tok, cfg: Settings) -> None:
    """Raise InputError when the tokenizer has no EOS token: nothing could teach the model where a sample ends."""
    if tok.eos_token_id is None:
        raise InputError(f"FT_BASE_MODEL={cfg.base_model}: the tokenizer has no EOS token (`eos_token` in its "
                         "tokenizer_config.json), so the model could not learn where an answer ends; use a model "
                         "whose tokenizer names one")


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
