"""Records to tokens: every format, EOS in the labels, prompt masking, truncation counted, loaders per file type."""

from __future__ import annotations

import json
import math
import re

import pytest

from job.config import Settings
from job.data import IGNORE, Tokenize, choose_pad_token, detect_format, load_splits, tokenize_splits
from job.errors import ConfigError, InputError

from conftest import DATA


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


def trained(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE])


def test_pad_token_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_falls_back_to_unk_when_pad_is_eos(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.eos_token  # what the guide does
    choose_pad_token(tok)
    assert tok.pad_token == tok.unk_token != tok.eos_token


def test_text_keeps_one_bos_and_trains_on_every_token_including_eos(tokenizer):
    row = Tokenize(tokenizer, "text", settings())({"text": "<s>[INST] Write 7 in words. [/INST] Seven. </s>"})
    ids = row["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert row["labels"] == ids


def test_text_without_eos_gets_one(tokenizer):
    row = Tokenize(tokenizer, "text", settings())({"text": "hello there"})
    assert row["input_ids"][-1] == row["labels"][-1] == tokenizer.eos_token_id


def test_prompt_completion_masks_the_prompt(tokenizer):
    row = Tokenize(tokenizer, "prompt_completion", settings())({"prompt": "Q: opposite of hot?", "completion": " cold"})
    n_prompt = len(tokenizer("Q: opposite of hot?").input_ids)
    assert row["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert trained(tokenizer, row) == " cold</s>"
    assert row["labels"][-1] == tokenizer.eos_token_id


def test_completion_only_can_be_turned_off(tokenizer):
    row = Tokenize(tokenizer, "prompt_completion", settings(completion_only_loss=False))(
        {"prompt": "Q: opposite of hot?", "completion": " cold"})
    assert row["labels"] == row["input_ids"]


def test_chat_trains_on_every_assistant_turn_only(tokenizer):
    messages = [{"role": "user", "content": "Write 2 in words."}, {"role": "assistant", "content": "Two."},
                {"role": "user", "content": "And 3?"}, {"role": "assistant", "content": "Three."}]
    row = Tokenize(tokenizer, "chat", settings())({"messages": messages})
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert row["input_ids"] == list(full)
    assert trained(tokenizer, row) == " Two. </s> Three. </s>"


def test_conversational_prompt_completion(tokenizer):
    record = {"prompt": [{"role": "user", "content": "Plural of mouse?"}],
              "completion": [{"role": "assistant", "content": "Mice."}]}
    row = Tokenize(tokenizer, "prompt_completion", settings())(record)
    # The template's space before the answer is a token of its own here (" Mice" is no single BPE token): context.
    assert trained(tokenizer, row) == "Mice. </s>"


def test_alpaca_uses_the_chat_template_when_there_is_one(tokenizer):
    row = Tokenize(tokenizer, "alpaca", settings())({"instruction": "Mix red and blue.", "input": "", "output": "Purple."})
    assert tokenizer.decode(row["input_ids"]) == "<s>[INST] Mix red and blue. [/INST] Purple. </s>"
    assert trained(tokenizer, row) == "Purple. </s>"  # the template's space is a token of its own: context


def test_alpaca_without_chat_template_uses_the_alpaca_prompt(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    row = Tokenize(tok, "alpaca", settings())({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    text = tok.decode(row["input_ids"])
    assert "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5</s>" in text
    assert tok.decode([t for t in row["labels"] if t != IGNORE]) == "5</s>"


def test_truncation_is_applied_and_counted(tokenizer):
    from datasets import Dataset

    long = {"text": "one two three four five six seven eight nine ten " * 5}
    ds = Dataset.from_list([long, {"text": "short"}])
    train, _, stats = tokenize_splits(ds, None, tokenizer, settings(max_seq_length=16))
    assert max(len(ids) for ids in train["input_ids"]) == 16
    assert stats.truncated == 1 and stats.train_samples == 2


def test_samples_left_without_labels_by_truncation_are_dropped(tokenizer):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "a long prompt " * 20, "completion": "x"}, {"prompt": "p", "completion": "c"}])
    train, _, stats = tokenize_splits(ds, None, tokenizer, settings(max_seq_length=8))
    assert (stats.dropped, stats.train_samples, len(train)) == (1, 1, 1)


@pytest.mark.parametrize("columns, fmt", [
    (["messages"], "chat"), (["instruction", "input", "output"], "alpaca"), (["prompt", "completion"], "prompt_completion"),
    (["text", "source"], "text"),
])
def test_format_detection(columns, fmt):
    assert detect_format(columns, settings()) == fmt


def test_undetectable_format_names_the_columns():
    with pytest.raises(ConfigError, match=r"FT_DATASET_FORMAT=auto: cannot tell the format from the columns \['body'\]"):
        detect_format(["body"], settings())


def test_forced_format_missing_column():
    with pytest.raises(ConfigError, match=r"FT_DATASET_FORMAT: the chat format needs column\(s\) \['messages'\]"):
        detect_format(["text"], settings(dataset_format="chat"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_loads_and_splits_90_10(tmp_path, suffix):
    import pandas as pd

    frame = pd.read_json(DATA / "sample-text.jsonl", lines=True)
    path = tmp_path / f"data{suffix}"
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".json": lambda: path.write_text(json.dumps(frame.to_dict(orient="records"))),
     ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    train, evaluation = load_splits(settings(dataset=str(path)), path)
    assert len(train) + len(evaluation) == len(frame)
    assert len(evaluation) == math.ceil(0.1 * len(frame))  # datasets rounds the test share up
    assert set(train["text"]).isdisjoint(evaluation["text"])


@pytest.mark.parametrize("records, fraction, needed", [(1, 0.1, 2), (2, 0.9, 10)])
def test_too_few_records_to_hold_out_the_eval_fraction_are_a_config_error(tmp_path, records, fraction, needed):
    """One record trained without evaluation, silently; two at 0.9 left no training record: datasets' ValueError."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(records)))
    with pytest.raises(ConfigError, match=re.escape(
            f"FT_DATASET={path}: split train has {records} record(s), too few to hold out FT_EVAL_FRACTION={fraction} "
            f"for evaluation and keep one for training ({needed} needed); add records, evaluate on FT_EVAL_SPLIT, or "
            "set FT_EVAL_FRACTION=0 to train without evaluation")):
        load_splits(settings(dataset=str(path), eval_fraction=fraction), path)
    train, evaluation = load_splits(settings(dataset=str(path), eval_fraction=0), path)
    assert (len(train), evaluation) == (records, None)


def test_directory_with_named_splits_uses_them(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "c"}\n')
    train, evaluation = load_splits(settings(eval_split="test", dataset=str(tmp_path)), tmp_path)
    assert (train["text"], evaluation["text"]) == (["a", "b"], ["c"])


def test_unknown_split_lists_the_real_ones(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match="FT_DATASET_SPLIT=validation: no such split; the dataset has train"):
        load_splits(settings(dataset_split="validation"), tmp_path)


def test_malformed_file_is_an_input_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(InputError, match="FT_DATASET=.*could not be read"):
        load_splits(settings(dataset=str(path)), path)


@pytest.mark.parametrize("broken, why", [
    (b'{"text": "bad \\x escape"}', r"not valid JSON: Invalid \\escape \(column 15\)"),
    (b'{"text": "cut off', r"not valid JSON: Unterminated string starting at \(column 10\)"),
    (b'["a list"]', r"a JSON list, not an object"),
])
def test_a_malformed_line_past_the_first_10_mb_is_named_by_its_line_in_the_file(tmp_path, broken, why):
    """datasets reads JSON Lines in 10 MB chunks and counts the rows of a parse error from the chunk's start (row
    6799 for row 150000 of 11 MB)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "sample " + "x" * 60}).encode() + b"\n"
    with path.open("wb") as f:
        f.write(line * 150_000 + b"\n" + broken + b"\n" + line * 20_000)  # the blank line is no row
    assert path.stat().st_size > 10 << 20
    with pytest.raises(InputError, match=rf"FT_DATASET=.*big.jsonl: could not be read: line 150002 \(row 150000\) is "
                                         rf"{why}$"):
        load_splits(settings(dataset=str(path)), path)


def test_pretokenized_samples_are_taken_as_they_are(tokenizer):
    row = Tokenize(tokenizer, "tokens", settings(max_seq_length=4))({"input_ids": [5, 6, 7, 8, 9], "labels": None})
    assert row == {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "truncated": True, "bad": "", "row": 0}
    masked = Tokenize(tokenizer, "tokens", settings())({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]})
    assert masked["labels"] == [IGNORE, 6, 7]


def test_trained_tokens_are_marked_with_brackets_the_sample_does_not_hold(tokenizer):
    """check --data --show: the trained tokens inside markers that cannot be read as the sample's own text."""
    from job.data import render_trained

    def render(question, answer):
        q = tokenizer(question, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        return render_trained(tokenizer, q + a, [-100] * len(q) + a)

    text, opening, closing = render("Plain question?", " Plain answer.")
    assert (opening, closing) == ("[[", "]]") and text.count("[[") == 1 and text.endswith("]]")
    text, opening, closing = render("What is [[x]] in wiki markup?", " A link to [[x]].")
    assert (opening, closing) == ("⟦", "⟧")
    trained = text.split(opening, 1)[1].rsplit(closing, 1)[0]
    assert "[[x]]" in trained and "wiki markup" not in trained and text.count(opening) == 1
    text, opening, closing = render("Give the list as JSON:", "[1, 2]")  # brackets beside the marker would merge
    assert (opening, closing) == ("⟦", "⟧") and text.endswith("⟦[1, 2]⟧")


def test_a_byte_order_mark_is_not_taken_for_the_bad_line(tmp_path):
    """json.loads refuses a BOM; datasets reads past it: the scan named line 1 while the fault was elsewhere."""
    from job.data import _first_bad_json_line

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    assert _first_bad_json_line(path).startswith("line 3 (row 2) is not valid JSON")
