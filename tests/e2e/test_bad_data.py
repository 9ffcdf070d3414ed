"""The CLI on data it cannot use: exit code `input` (not retried), one line naming FT_DATASET and the row."""

from __future__ import annotations

import json
import shutil

from chat_templates import MISTRAL
from job.errors import CODE_BY_NAME
from test_run import demo_env, events, run_job


def test_a_template_that_rejects_every_record_ends_with_an_input_error_naming_the_row(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "mistral-style"
    shutil.copytree(tiny_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = MISTRAL  # refuses a system message
    tok.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two in words?"},
                    {"role": "assistant", "content": "Two."}]
    data.write_text("\n".join(json.dumps({"messages": conversation}) for _ in range(6)))
    proc = run_job(demo_env(model, FT_DATASET=str(data)), tmp_path)
    assert proc.returncode == CODE_BY_NAME["input"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [e["event"] for e in events(proc) if e["level"] == "error"]
    assert len(errors) == 1 and "records cannot be used, more than FT_BAD_RECORDS_MAX_FRACTION" in errors[0], errors
    assert "row 0: the chat template or tokenizer failed: Conversation roles must alternate" in errors[0]


def test_check_data_names_the_bad_row_without_loading_the_model(tiny_model, tmp_path):
    """`check --data` fails as the run would (exit `input`, the row named), before any weight is read."""
    data = tmp_path / "chat.jsonl"
    good = [{"role": "user", "content": "Two in words?"}, {"role": "assistant", "content": "Two."}]
    bad = [{"role": "user", "content": "Two in words?"}, {"role": "robot", "content": "Two."}]
    data.write_text("\n".join(json.dumps({"messages": m}) for m in [good] * 5 + [bad] + [good] * 4))
    proc = run_job(demo_env(tiny_model, FT_DATASET=str(data), FT_BAD_RECORDS="fail"), tmp_path, "check", "--data")
    assert proc.returncode == CODE_BY_NAME["input"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [e["event"] for e in events(proc) if e["level"] == "error"]
    assert len(errors) == 1 and "FT_DATASET" in errors[0] and "row 5" in errors[0], errors
    assert not any(e["event"] in ("loading model", "data check passed") for e in events(proc))


def test_a_dataset_too_small_to_hold_out_evaluation_is_a_config_error(tiny_model, tmp_path):
    """One record and FT_EVAL_FRACTION=0.1: the run trained without evaluation, without a word."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "Two in words: two."}) + "\n")
    proc = run_job(demo_env(tiny_model, FT_DATASET=str(data)), tmp_path, "check", "--data")
    assert proc.returncode == CODE_BY_NAME["config"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [e["event"] for e in events(proc) if e["level"] == "error"]
    assert errors == [f"FT_DATASET={data}: split train has 1 record(s), too few to hold out FT_EVAL_FRACTION=0.1 for "
                      "evaluation and keep one for training (2 needed); add records, evaluate on FT_EVAL_SPLIT, or "
                      "set FT_EVAL_FRACTION=0 to train without evaluation"], errors


def test_check_data_shows_what_the_loss_trains_on(tiny_model, tmp_path):
    """`check --data --show N`: the first N training samples as the model sees them, the trained tokens in [[ ]]:
    with completion-only loss the answer and the token that closes it, never the question."""
    data = tmp_path / "chat.jsonl"
    pairs = [(f"Write {n} in words.", f"Answer {n}.") for n in range(10)]
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                         "content": a}]})
                              for q, a in pairs))
    proc = run_job(demo_env(tiny_model, FT_DATASET=str(data), FT_EVAL_FRACTION="0"), tmp_path, "check", "--data",
                   "--show", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    shown = [e for e in events(proc) if e["event"] == "data sample"]
    assert len(shown) == 3
    for sample in shown:
        question, answer = next((q, a) for q, a in pairs if q in sample["text"])
        opening, closing = sample["trained_in"].split()
        trained = sample["text"].split(opening, 1)[1].split(closing, 1)[0]
        assert sample["text"].count(opening) == 1 and answer in trained and question not in trained
        assert trained.rstrip().endswith("</s>")  # the tiny model's EOS closes the answer (its Mistral-style template)
        assert 0 < sample["trained_tokens"] < sample["tokens"]


def test_check_data_counts_what_is_trained_not_the_first_token(tiny_model, tmp_path):
    """Text trains every token but the first, which nothing predicts: the sample shows `<s>` outside [[ ]] and the
    counts leave it out; --show needs --data and a count of 0 or more."""
    proc = run_job(demo_env(tiny_model, FT_EVAL_FRACTION="0", FT_MAX_SAMPLES="5"), tmp_path, "check", "--data")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sample = next(e for e in events(proc) if e["event"] == "data sample")
    opening = sample["trained_in"].split()[0]  # the text starts with `[INST]`: `⟦`, since `[[` would merge with it
    assert opening == "⟦" and sample["text"].startswith("<s>⟦[INST]") and sample["text"].endswith("⟧")
    assert sample["trained_tokens"] == sample["tokens"] - 1
    stats = next(e for e in events(proc) if e["event"] == "data check passed")
    assert stats["trained_tokens"] == stats["train_tokens"] - stats["train_samples"]
    assert not any(line.startswith(("Tokenizing", "Filtering")) for line in proc.stderr.splitlines())
    for args in (("--data", "--show", "-1"), ("--show", "3")):
        bad = run_job(demo_env(tiny_model), tmp_path, "check", *args)
        assert bad.returncode == CODE_BY_NAME["config"] and "--show: a number of samples" in bad.stdout, bad.stdout


def test_check_data_prints_samples_as_they_read_on_a_console(tiny_model, tmp_path):
    """Console logs: a sample is printed with its real line breaks under a header, not as one escaped line."""
    data = tmp_path / "lines.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"first line {n}\nsecond line {n}"}) for n in range(4)))
    proc = run_job(demo_env(tiny_model, FT_DATASET=str(data), FT_EVAL_FRACTION="0", FT_LOG_FORMAT="console"), tmp_path,
                   "check", "--data")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("--- sample 0: "))
    assert "trained (in [[ ]]) ---" in lines[header]
    assert lines[header + 1].startswith("<s>[[first line ") and lines[header + 2].startswith("second line ")
