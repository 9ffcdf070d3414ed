"""Records that cannot be used: one test per kind; dropped and counted by row, or failing, never trained as they are."""

from __future__ import annotations

import json

import pytest

from job.config import Settings
from job.data import Tokenize, load_splits, load_tokenizer, tokenize_splits
from job.errors import EXIT_CODES, ConfigError, InputError

from chat_templates import family_tokenizer

QA = [{"role": "user", "content": "Write 2 in words."}, {"role": "assistant", "content": "Two."}]


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), "dataset": "data.jsonl", **kw})


def reason(tokenizer, fmt: str, record: dict, **kw) -> str:
    row = Tokenize(tokenizer, fmt, settings(**kw))(record)
    assert row["bad"] == "" or (row["input_ids"], row["labels"]) == ([], [])  # a bad record trains nothing
    return row["bad"]


@pytest.mark.parametrize("fmt, record, expected", [
    ("text", {"text": None}, "`text` is null"),
    ("text", {"text": True}, "`text` is of type bool, not text"),
    ("text", {"text": {"a": 1}}, "`text` is of type dict, not text"),
    ("alpaca", {"instruction": "True?", "output": False}, "`output` is of type bool, not text"),
    ("chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": True}]},
     "turn 1 (assistant): content is of type bool, not text"),
    ("text", {"text": "   "}, "`text` is empty"),
    ("prompt_completion", {"prompt": "Q?", "completion": None}, "`completion` is null"),
    ("prompt_completion", {"prompt": None, "completion": "A"}, "`prompt` is null"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}, "both be text or both"),
    ("alpaca", {"instruction": "Add.", "input": None, "output": None}, "`output` is null"),
    ("alpaca", {"instruction": ["Add."], "output": "5"}, "`instruction` is of type list, not text"),
    ("tokens", {"input_ids": [], "labels": None}, "`input_ids` is not a non-empty list"),
    ("tokens", {"input_ids": [5, 6], "labels": [5]}, "`labels` is not a list as long as `input_ids` (2)"),
    ("tokens", {"input_ids": [5, 999999, 6]}, "`input_ids` holds 999999, outside the tokenizer's vocabulary (0 to "),
    ("tokens", {"input_ids": [5, -1]}, "`input_ids` holds -1, outside the tokenizer's vocabulary"),
    ("chat", {"messages": None}, "`messages` has no turns"),
    ("chat", {"messages": ["hi"]}, "turn 0 is of type str, not an object"),
    ("chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
     "turn 1 (assistant) has no content (null)"),
    ("chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     "turn 1 (assistant) is an empty answer"),
    ("chat", {"messages": [{"content": "Hi"}]}, "turn 0 has no role"),
])
def test_each_kind_of_bad_record_is_named(tokenizer, fmt, record, expected):
    assert expected in reason(tokenizer, fmt, record)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_numeric_answers_are_taken_as_their_text(tmp_path, tokenizer, suffix):
    """datasets reads a CSV column of numbers as int64, and JSON has numbers: `12` trains as "12" (and 7.0, from a
    column that holds a 2.5, as "7")."""
    path = tmp_path / f"sums{suffix}"
    rows = [{"instruction": f"Add {i} and 7.", "input": "", "output": i + 7} for i in range(40)]
    if suffix == ".csv":
        path.write_text("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in rows))
    else:
        rows[1]["output"], rows[2]["input"] = 2.5, 0
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = settings(dataset=str(path), eval_fraction=0, bad_records="fail")
    train, _ = load_splits(cfg, path)
    train_tok, _, stats = tokenize_splits(train, None, tokenizer, cfg)
    assert (stats.bad_records, stats.train_samples) == (0, 40)
    answers = [tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True).strip()
               for labels in train_tok["labels"][:3]]
    assert answers == (["7", "2.5", "9"] if suffix == ".jsonl" else ["7", "8", "9"])  # 7.0 from a column of floats
    if suffix == ".jsonl":
        assert "0" in tokenizer.decode(train_tok["input_ids"][2])  # an `input` of 0 is kept, not taken as empty


def test_a_numeric_chat_turn_is_taken_as_its_text(tokenizer):
    assert reason(tokenizer, "chat", {"messages": [QA[0], {"role": "assistant", "content": 2}]}) == ""


def test_an_empty_file_is_an_input_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match=r"FT_DATASET=data.jsonl: the file is empty"):
        load_splits(settings(), tmp_path / "empty.jsonl")


def test_a_null_answer_is_not_trained_as_an_empty_one(tokenizer):
    assert reason(tokenizer, "prompt_completion", {"prompt": "Q: 2+2?", "completion": None})
    assert reason(tokenizer, "chat", {"messages": [QA[0], {"role": "assistant", "content": None}]})


def test_a_template_that_rejects_a_system_message_drops_the_record_with_its_message(tiny_model):
    tok = family_tokenizer(tiny_model, "mistral")
    record = {"messages": [{"role": "system", "content": "Be brief."}, *QA]}
    assert "Conversation roles must alternate" in reason(tok, "chat", record)
    with pytest.raises(InputError, match=r"FT_DATASET=data.jsonl row 0: the chat template or tokenizer failed: "
                                         r"Conversation roles must alternate.*FT_BAD_RECORDS=fail"):
        Tokenize(tok, "chat", settings(bad_records="fail"))(record)


def test_dropped_records_are_counted_by_row_and_the_rest_train(tokenizer):
    from datasets import Dataset

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}"} for i in range(40)]
    rows[17]["completion"] = None
    train, _, stats = tokenize_splits(Dataset.from_list(rows), None, tokenizer, settings())
    assert (stats.bad_records, stats.train_samples, len(train)) == (1, 39, 39)


def test_too_many_bad_records_stop_the_run_with_their_rows(tokenizer):
    from datasets import Dataset

    rows = [{"text": "fine"}, {"text": None}, {"text": "fine"}, {"text": None}]
    with pytest.raises(InputError, match=r"2 of 4 records cannot be used, more than FT_BAD_RECORDS_MAX_FRACTION=0.05 "
                                         r"of them \(row 1: `text` is null\)"):
        tokenize_splits(Dataset.from_list(rows), None, tokenizer, settings())
    _, _, stats = tokenize_splits(Dataset.from_list(rows), None, tokenizer, settings(bad_records_max_fraction=0.5))
    assert (stats.bad_records, stats.train_samples) == (2, 2)


def test_bad_rows_are_listed_in_row_order(tokenizer):
    """Shuffled by the eval split, records come in another order than the file's: the reasons still go by row."""
    from datasets import Dataset

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}", "__row__": i} for i in range(30)]
    rows[7]["completion"], rows[12]["prompt"], rows[20]["completion"] = None, None, " "
    order = [20, *range(13, 20), 12, *range(8, 12), 7, *range(7), *range(21, 30)]
    with pytest.raises(InputError, match=r"\(row 7: `completion` is null; row 12: `prompt` is null; "
                                         r"row 20: `completion` is empty\)"):
        tokenize_splits(Dataset.from_list([rows[i] for i in order]), None, tokenizer, settings())


def test_rows_are_named_as_in_the_file_after_the_eval_split_shuffles_them(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    rows = [{"text": f"sample {i}"} for i in range(30)]
    rows[23]["text"] = None
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = settings(dataset=str(path), bad_records="fail")
    train, evaluation = load_splits(cfg, path)
    with pytest.raises(InputError, match=r"row 23: `text` is null"):
        tokenize_splits(train, evaluation, tokenizer, cfg)


def test_an_eval_split_left_empty_is_reported_not_skipped_silently(tokenizer, capsys):
    from datasets import Dataset

    train = Dataset.from_list([{"prompt": "Q?", "completion": "A"}] * 4)
    evaluation = Dataset.from_list([{"prompt": "a long prompt " * 30, "completion": "x"}])
    _, eval_tok, stats = tokenize_splits(train, evaluation, tokenizer, settings(max_seq_length=8))
    assert eval_tok is None and stats.eval_samples == 0
    assert "every eval sample was dropped" in capsys.readouterr().out


def test_a_tokenizer_without_eos_is_refused_before_training(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.eos_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"FT_BASE_MODEL=org/model: the tokenizer has no EOS token"):
        load_tokenizer(tmp_path, settings(base_model="org/model"))


def test_a_detected_format_is_named_as_detected(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"FT_DATASET_FORMAT=auto \(detected chat\): the tokenizer .* has no chat"):
        Tokenize(tok, "chat", settings())
    with pytest.raises(ConfigError, match=r"FT_DATASET_FORMAT=chat: the tokenizer"):
        Tokenize(tok, "chat", settings(dataset_format="chat"))


def test_input_errors_are_not_retried():
    assert next(e for e in EXIT_CODES if e.name == "input").retriable is False


def test_answer_roles_must_name_a_role(monkeypatch):
    from job.config import load_settings

    monkeypatch.setenv("FT_ANSWER_ROLES", " , ")
    with pytest.raises(ConfigError, match=r"FT_ANSWER_ROLES= , : must name at least one role"):
        load_settings()
    monkeypatch.setenv("FT_ANSWER_ROLES", " gpt , bot ")
    assert load_settings().answer_roles == "gpt,bot"


def test_a_directory_that_mixes_data_file_types_is_refused(tmp_path):
    """datasets reads the most common type of a directory and silently skips the rest (20 of 60 rows read)."""
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "mix" / "b.csv").write_text("text\ntwo\n")
    with pytest.raises(InputError, match=r"FT_DATASET=data.jsonl: mixes .csv, .jsonl files"):
        load_splits(settings(), tmp_path / "mix")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("not data\n")
    with pytest.raises(InputError, match=r"no .jsonl, .json, .csv or .parquet file in"):
        load_splits(settings(), tmp_path / "notes")
