"""Chat masks with the real chat templates of eight model families: exactly each answer and its end token trained."""

from __future__ import annotations

import pytest

from job.config import Settings
from job.data import Tokenize, tokenize_splits
from job.errors import InputError

from chat_templates import CHATML_SKIP_EMPTY, FAMILIES, PHI3_SKIP_EMPTY, family_tokenizer, trained_runs

CONVERSATION = [
    {"role": "user", "content": "Write 2 in words."}, {"role": "assistant", "content": "Two."},
    {"role": "user", "content": "And 3, please?"}, {"role": "assistant", "content": "Three, of course."},
    {"role": "user", "content": "Four?"}, {"role": "assistant", "content": "Four."},
]


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


def squeeze(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_model):
    return request.param, family_tokenizer(tiny_model, request.param)


def test_each_answer_and_its_end_token_are_trained_and_nothing_else(family):
    name, tok = family
    row = Tokenize(tok, "chat", settings())({"messages": CONVERSATION})
    end = FAMILIES[name].end
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = trained_runs(tok, row["labels"])
    # Template whitespace between an answer and its end token (Llama-2's " </s>") is trained with it.
    assert [squeeze(r) for r in runs] == [squeeze(a + end) for a in answers], runs
    assert all(r.rstrip().endswith(end) for r in runs)
    assert row["input_ids"] == list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))


def test_qwen3_renders_its_last_answer_with_a_think_block_and_the_masks_still_hold(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen3")
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.count("<think>") == 1  # earlier answers are rendered differently from the last
    runs = trained_runs(tok, Tokenize(tok, "chat", settings())({"messages": CONVERSATION})["labels"])
    assert runs == ["Two.<|im_end|>", "Three, of course.<|im_end|>", "Four.<|im_end|>"]


def test_qwen2_base_trains_im_end_though_its_eos_is_endoftext(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen2")
    assert tok.eos_token == "<|endoftext|>"
    row = Tokenize(tok, "chat", settings())({"messages": CONVERSATION})
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for label in row["labels"] if label == im_end) == 3


@pytest.mark.parametrize("answering", ["model", "gpt", "bot"])
def test_other_names_of_the_answering_role_are_trained_like_assistant(tiny_model, answering):
    tok = family_tokenizer(tiny_model, "gemma")
    messages = [{**m, "role": answering if m["role"] == "assistant" else m["role"]} for m in CONVERSATION]
    row = Tokenize(tok, "chat", settings())({"messages": messages})
    assert trained_runs(tok, row["labels"]) == ["Two.<end_of_turn>", "Three, of course.<end_of_turn>",
                                                "Four.<end_of_turn>"]


def test_sharegpt_conversations_are_chat(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen2")
    turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONVERSATION]
    row = Tokenize(tok, "chat", settings())({"conversations": turns})
    assert trained_runs(tok, row["labels"]) == ["Two.<|im_end|>", "Three, of course.<|im_end|>", "Four.<|im_end|>"]
    assert "<|im_start|>user\nWrite 2 in words." in tok.decode(row["input_ids"])


def test_answer_roles_setting_chooses_the_trained_turns(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen2")
    messages = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."},
                {"role": "user", "content": "Bye"}, {"role": "critic", "content": "Fine."}]
    row = Tokenize(tok, "chat", settings(answer_roles="critic"))({"messages": messages})
    assert trained_runs(tok, row["labels"]) == ["Fine.<|im_end|>"]


def test_ambiguous_or_missing_answering_role_is_a_bad_record_not_a_fully_trained_one(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen2")
    ambiguous = [{"role": "user", "content": "Hi"}, {"role": "gpt", "content": "A."}, {"role": "bot", "content": "B."}]
    row = Tokenize(tok, "chat", settings())({"messages": ambiguous})
    assert "ambiguous: bot, gpt" in row["bad"] and row["labels"] == []
    nobody = [{"role": "user", "content": "Hi"}, {"role": "x", "content": "B"}]
    row = Tokenize(tok, "chat", settings())({"messages": nobody})
    assert "no answering turn" in row["bad"] and "FT_ANSWER_ROLES=assistant" in row["bad"]


def test_a_template_that_hides_the_answers_stops_the_run_naming_the_setting_that_trains_on_everything(tiny_model):
    from datasets import Dataset

    tok = family_tokenizer(tiny_model, "qwen2")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}ANSWER{{ eos_token }}"
                         "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    row = Tokenize(tok, "chat", settings())({"messages": CONVERSATION})
    assert row["labels"] == [] and "cannot tell which tokens" in row["bad"]  # never trained on its prompts
    with pytest.raises(InputError, match=r"2 of 2 records cannot be used.*FT_COMPLETION_ONLY_LOSS=false trains on"):
        tokenize_splits(Dataset.from_list([{"messages": CONVERSATION}] * 2), None, tok, settings())
    everything = Tokenize(tok, "chat", settings(completion_only_loss=False))({"messages": CONVERSATION})
    assert everything["labels"] == everything["input_ids"]


def test_a_template_without_end_tokens_gets_eos_trained_after_every_answer(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen2")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fn = Tokenize(tok, "chat", settings())
    row = fn({"messages": CONVERSATION})
    assert [squeeze(r) for r in trained_runs(tok, row["labels"])] == [
        "Two.<|endoftext|>", "Three,ofcourse.<|endoftext|>", "Four.<|endoftext|>"]
    assert fn.masker.eos_inserted


def test_a_tokenizer_without_character_offsets_gets_the_same_spans_from_token_lists(tiny_model, monkeypatch):
    tok = family_tokenizer(tiny_model, "qwen3")
    by_chars = Tokenize(tok, "chat", settings())({"messages": CONVERSATION})
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))  # as a sentencepiece-only tokenizer
    by_tokens = Tokenize(tok, "chat", settings())({"messages": CONVERSATION})
    assert by_tokens == by_chars


def test_end_of_turn_tokens_are_told_from_header_tokens(tiny_model):
    from job.chat import ChatMasker

    tok = family_tokenizer(tiny_model, "llama3")
    ends = set(tok.convert_ids_to_tokens(sorted(ChatMasker(tok).end_ids)))
    assert ends == {"<|eot_id|>", "<|end_of_text|>"}


def test_the_inserted_eos_warning_is_not_lost_to_datasets_cache(tiny_model, tmp_path, capsys, caplog):
    """A second run on the same file tokenizes again (datasets would replay the first run's cached map, and the
    tokenizer's note that it inserted EOS would be lost)."""
    import json

    from datasets import load_dataset

    from job import log

    log.setup("json")
    tok = family_tokenizer(tiny_model, "qwen2")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(4)))
    for _ in range(2):
        ds = load_dataset("json", data_files=str(data), cache_dir=str(tmp_path / "cache"))["train"]
        tokenize_splits(ds, None, tok, settings())
        assert "EOS was inserted after each answer" in capsys.readouterr().out + caplog.text
        caplog.clear()


# Answers whose edges equal the template text next to them: "<" begins the end token that follows an answer
# (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>, <|end|>), and "assistant\n" ends ChatML's header before it.
EDGY = [
    {"role": "user", "content": "Make it bold."}, {"role": "assistant", "content": "<b>bold</b>"},
    {"role": "user", "content": "And yours?"}, {"role": "assistant", "content": "<3 from your assistant\n"},
    {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Two."},
]
TRIMMING = ("gemma", "llama3", "llama3_generation")  # templates that trim answers; Llama-2's spaces its end token


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "llama2"])
def test_answers_that_begin_or_end_like_the_template_text_next_to_them_are_trained_whole(tiny_model, name):
    tok = family_tokenizer(tiny_model, name)
    row = Tokenize(tok, "chat", settings())({"messages": EDGY})
    answers = [m["content"].strip() if name in TRIMMING else m["content"] for m in EDGY if m["role"] == "assistant"]
    assert trained_runs(tok, row["labels"]) == [a + FAMILIES[name].end for a in answers]


def test_llama2_trains_answers_that_begin_like_its_end_token_whole(tiny_model):
    tok = family_tokenizer(tiny_model, "llama2")
    runs = trained_runs(tok, Tokenize(tok, "chat", settings())({"messages": EDGY})["labels"])
    assert [r.strip() for r in runs] == ["<b>bold</b> </s>", "<3 from your assistant </s>", "Two. </s>"]


@pytest.mark.parametrize("template, end", [(CHATML_SKIP_EMPTY, "<|im_end|>"), (PHI3_SKIP_EMPTY, "<|end|>")])
@pytest.mark.parametrize("messages", [CONVERSATION, EDGY], ids=["plain", "edgy"])
def test_a_template_that_skips_empty_messages_trains_exactly_each_answer_and_its_end_token(
        tiny_model, monkeypatch, template, end, messages):
    tok = family_tokenizer(tiny_model, "qwen2" if end == "<|im_end|>" else "phi3")
    tok.chat_template = template
    fn = Tokenize(tok, "chat", settings())
    row = fn({"messages": messages})
    assert trained_runs(tok, row["labels"]) == [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert not fn.masker.eos_inserted
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))  # token lists give the same spans
    assert Tokenize(tok, "chat", settings())({"messages": messages}) == row


def test_a_conversation_holding_the_sentinel_text_gets_another_sentinel(tiny_model):
    from job.chat import _sentinels

    tok = family_tokenizer(tiny_model, "qwen2")
    taken = _sentinels("")
    messages = [{"role": "user", "content": f"Say {taken[0]}."}, {"role": "assistant", "content": taken[1]}]
    assert not set(_sentinels(str(messages))) & set(taken)
    row = Tokenize(tok, "chat", settings())({"messages": messages})
    assert trained_runs(tok, row["labels"]) == [taken[1] + "<|im_end|>"]


def test_a_template_that_renders_an_answer_twice_is_a_bad_record_naming_the_setting(tiny_model):
    tok = family_tokenizer(tiny_model, "qwen2")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% if m['role'] == 'assistant' %}(echo: {{ m['content'] }})\n{% endif %}{% endfor %}")
    row = Tokenize(tok, "chat", settings())({"messages": CONVERSATION})
    assert row["labels"] == [] and "cannot tell which tokens" in row["bad"]
    assert "FT_COMPLETION_ONLY_LOSS=false" in row["bad"]


@pytest.mark.parametrize("family", ["qwen3", "llama3_generation", "gemma"])
def test_training_on_everything_closes_with_one_eos(tiny_model, family):
    """FT_COMPLETION_ONLY_LOSS=false: a template that ends the conversation with EOS and a newline (Qwen3's ChatML)
    gets no second EOS; one that ends without EOS gets it appended once."""
    tok = family_tokenizer(tiny_model, family)
    row = Tokenize(tok, "chat", settings(completion_only_loss=False))({"messages": CONVERSATION})
    assert row["labels"] == row["input_ids"]
    assert row["input_ids"].count(tok.eos_token_id) == max(1, tok.apply_chat_template(
        CONVERSATION, tokenize=False).count(tok.eos_token))
    tail = tok.decode(row["input_ids"][-3:])
    assert tok.eos_token in tail and not tail.endswith(tok.eos_token * 2)
