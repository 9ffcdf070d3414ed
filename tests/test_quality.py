"""The quality report's parts on real components: prompts cut from the job's own tokenized chat samples, greedy
generation on the tiny model, the check's verdicts, curves from real event files, vLLM's loader rules on peft's
own adapter files."""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from job.config import Settings, load_settings
from job.errors import CODE_BY_NAME, ConfigError, QualityError
from job.export import vllm_problems
from job.quality import draw_curves, enforce, problems, scalars
from job.samples import eval_prompts, generate, sample_generations, user_prompts


def chat_eval(tokenizer, n: int = 3):
    from datasets import Dataset

    from job.data import tokenize_splits

    rows = [json.loads(line) for line in (DATA / "sample-chat.jsonl").read_text().splitlines()[:n]]
    cfg = Settings(dataset=str(DATA / "sample-chat.jsonl"), max_seq_length=128)
    ds, _, _ = tokenize_splits(Dataset.from_list(rows), None, tokenizer, cfg)
    return rows, ds


def test_eval_prompts_are_the_chat_template_up_to_the_answer(tokenizer):
    rows, ds = chat_eval(tokenizer)
    prompts = eval_prompts(ds, tokenizer, 2)
    assert len(prompts) == 2
    for row, prompt in zip(rows, prompts):
        user, answer = row["messages"]
        rendered = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tokenizer.decode(prompt.ids).strip() == tokenizer.decode(rendered).strip()
        assert prompt.reference == answer["content"]


def test_no_held_out_samples_and_no_sample_prompts_say_why_answers_are_skipped(tokenizer, capsys):
    """FT_EVAL_FRACTION=0 leaves no evaluation sample to prompt with: no answers, and no stop check, said once."""
    cfg = Settings(dataset=str(DATA / "sample-chat.jsonl"), eval_fraction=0)
    assert sample_generations(cfg, None, tokenizer, None) is None
    out = capsys.readouterr().out
    assert out.count("sample answers skipped") == 1
    assert "no held-out evaluation samples" in out and "no FT_SAMPLE_PROMPTS" in out
    assert "set FT_SAMPLE_PROMPTS, or hold out evaluation samples with FT_EVAL_FRACTION > 0 or FT_EVAL_SPLIT" in out
    assert sample_generations(Settings(eval_fraction=0, sample_count=0), None, tokenizer, None) is None
    assert "sample answers skipped" not in capsys.readouterr().out  # none asked for: nothing to say


def test_user_prompts_go_through_the_chat_template(tokenizer):
    [prompt] = user_prompts(["Write 12 in words."], tokenizer)
    assert tokenizer.decode(prompt.ids).startswith("<s>[INST] Write 12 in words. [/INST]")


def test_generation_counts_a_stop_only_at_an_end_token(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = user_prompts(["Write 12 in words.", "What is the opposite of cold?"], tokenizer)
    out = generate(model, tokenizer, prompts, 8, {tokenizer.eos_token_id})
    assert len(out) == 2 and all(o["tokens"] <= 8 for o in out)
    # Every token an end token: each answer stops at once, with nothing before it.
    every = set(range(len(tokenizer)))
    assert all(o["stopped"] and o["tokens"] == 1 and o["text"] == "" for o in generate(model, tokenizer, prompts, 8, every))


def report(before=2.0, after=1.0, stopped_after=1.0):
    return {"eval_loss_before": before, "eval_loss_after": after}, {"stopped_after": stopped_after,
                                                                    "samples": [{}, {}, {}, {}]}


def test_a_run_that_learned_and_stops_has_no_problem():
    assert problems(*report(), Settings()) == []


def test_eval_loss_that_did_not_fall_is_a_problem_saying_what_to_change():
    [problem] = problems(*report(before=1.0, after=1.0), Settings())
    assert problem.startswith("eval loss did not fall (1.0000 before, 1.0000 after)") and "FT_LEARNING_RATE" in problem


def test_answers_that_do_not_stop_are_a_problem_naming_the_budget():
    [problem] = problems(*report(stopped_after=0.25), Settings(sample_max_new_tokens=32))
    assert problem.startswith("1 of 4 sample answers") and "FT_SAMPLE_MAX_NEW_TOKENS=32" in problem


def test_fail_turns_problems_into_exit_code_9_and_warn_does_not():
    enforce(Settings(quality_check="warn"), {"problems": ["x"]})
    enforce(Settings(quality_check="fail"), {"problems": []})
    with pytest.raises(QualityError) as e:
        enforce(Settings(quality_check="fail"), {"problems": ["eval loss did not fall"]})
    assert e.value.exit_code == CODE_BY_NAME["quality"] == 9 and "FT_QUALITY_CHECK=fail" in e.value.reason


@pytest.mark.parametrize("value", ["Write 12 in words.", "[]", '["ok", ""]', "[1]", "{}"])
def test_sample_prompts_must_be_a_json_list_of_strings(monkeypatch, value):
    monkeypatch.setenv("FT_SAMPLE_PROMPTS", value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert e.value.problems[0].startswith(f"FT_SAMPLE_PROMPTS={value}: must be a JSON list of non-empty strings")


def test_sample_prompts_parse(monkeypatch):
    monkeypatch.setenv("FT_SAMPLE_PROMPTS", '["a?", "b?"]')
    assert load_settings().sample_prompt_list == ["a?", "b?"]


def test_curves_are_drawn_from_the_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path)) as w:
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            w.add_scalar("train/loss", loss, step * 10)
        w.add_scalar("eval/loss", 2.5, 20)
    series = scalars(tmp_path)
    assert series["train/loss"] == [(0, 3.0), (10, 2.0), (20, 1.5)] and series["eval/loss"] == [(20, 2.5)]
    assert draw_curves(series, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not draw_curves({}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


@pytest.fixture
def adapter(tiny_model, tmp_path):
    """peft's own adapter files for the tiny model, as the job's LoRA settings make them; `extra` LoraConfig kwargs."""
    def make(**extra):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        out = tmp_path / f"adapter-{len(extra)}-{'-'.join(extra)}"
        config = LoraConfig(**{"r": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **extra})
        get_peft_model(model, config).save_pretrained(out)
        return out
    return make


def test_the_jobs_adapter_has_nothing_vllm_rejects(adapter):
    path = adapter()
    config = json.loads((path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], list) and not config["modules_to_save"]
    assert vllm_problems(path) == []


def test_what_vllm_rejects_is_found(adapter):
    assert any("modules_to_save" in p for p in vllm_problems(adapter(modules_to_save=["embed_tokens"])))
    assert any("DoRA" in p for p in vllm_problems(adapter(use_dora=True)))
    assert any("lm_head" in p for p in vllm_problems(adapter(target_modules=["q_proj", "lm_head"])))
