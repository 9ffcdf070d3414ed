"""Every common model family, as a tiny local model with its own family's chat template (tests/families.py):
attention chosen per model and exact on packed input, LoRA targets resolved from the model's own modules, and a few
training steps on chat records with default settings whose adapter peft loads back and whose samples train exactly
each answer and its end-of-turn token."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import chat_templates
import families
from job import attention, cli, data, pipeline
from job.config import Settings
from job.errors import ConfigError
from job.model import Placement, adaptable_modules, choose_attention, load_model, meta_model, resolve_targets
from job.signals import Stopper

CPU = Placement("cpu", torch.float32)
GPU = Placement("cuda", torch.bfloat16, "a GPU")
LENGTHS = (13, 5, 20)  # packed samples: two exceed the 8-token window, one Phi-3's 16
SOFTCAPPED = {"gemma2"}
TARGETS = {"phi3": ["qkv_proj"], "gpt_neox": ["query_key_value"]}  # peft has no default for phi3


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


@pytest.fixture(scope="session")
def family_tokenizer():
    """family -> the tiny BPE in its family's chat template (families.chat_tokenizer), each made once per session."""
    base, made = families.tokenizer(), {}

    def get(family: str):
        if family not in made:
            made[family] = families.chat_tokenizer(family, base)
        return made[family]
    return get


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, family_tokenizer):
    """family -> the folder of its tiny model and chat tokenizer, each built once per session on first use."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = families.build(family, tmp_path_factory.mktemp(family), family_tokenizer(family))
        return built[family]
    return get


@pytest.mark.parametrize("family", families.FAMILIES)
def test_attention_is_chosen_per_model(family, family_tokenizer, monkeypatch):
    config = families.config(family, family_tokenizer(family))
    fallback = "eager" if family in SOFTCAPPED else "sdpa"
    assert choose_attention(settings(), CPU, config)[0] == fallback
    monkeypatch.setattr(attention, "kernel_available", lambda dtype: True)
    name, why = choose_attention(settings(), GPU, config)
    assert name == (fallback if family in SOFTCAPPED else "varlen"), why
    if family in SOFTCAPPED:
        assert "soft-capping" in why
        with pytest.raises(ConfigError, match="FT_ATTENTION=varlen: Gemma2ForCausalLM cannot use it .logit soft-cap"):
            choose_attention(settings(attention="varlen"), GPU, config)
        with pytest.raises(ConfigError, match="FT_ATTENTION=sdpa: Gemma2ForCausalLM does not support sdpa"):
            choose_attention(settings(attention="sdpa"), CPU, config)


def test_dropout_and_sinks_fall_back(family_tokenizer, monkeypatch):
    from transformers import GptOssConfig

    monkeypatch.setattr(attention, "kernel_available", lambda dtype: True)
    dropout = families.config("llama", family_tokenizer("llama"))
    dropout.attention_dropout = 0.1
    assert choose_attention(settings(), GPU, dropout) == ("sdpa", "LlamaForCausalLM needs what varlen cannot compute: "
                                                                  "attention dropout (0.1)")
    sinks = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, num_local_experts=2, vocab_size=64)
    name, why = choose_attention(settings(), GPU, sinks)
    assert name == "eager" and why.endswith("attention sinks (s_aux)")  # gpt-oss has no sdpa in transformers


def packed_batch(vocab: int) -> dict:
    """Samples flattened into one row, position_ids restarting at 0, as trl's padding-free collator makes them."""
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(4, vocab, (n,), generator=g).tolist()} for n in LENGTHS]
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(samples)


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_packed_logits_match_eager_and_each_sample_alone(family, family_model, family_tokenizer):
    path = family_model(family)
    chosen = ["eager"] if family in SOFTCAPPED else ["sdpa", "varlen"]  # CPU default; what a GPU takes
    models = {name: load_model(path, settings(attention=name, quantization="none"), CPU).eval()
              for name in ["eager", *chosen]}
    batch = packed_batch(len(family_tokenizer(family)))
    eager = logits(models["eager"], batch)
    alone = torch.cat([logits(models["eager"], {"input_ids": ids[None]})
                       for ids in batch["input_ids"][0].split(list(LENGTHS))])
    torch.testing.assert_close(eager, alone, rtol=1e-4, atol=1e-4)
    for name in chosen:
        assert models[name].config._attn_implementation == name
        torch.testing.assert_close(logits(models[name], batch), eager, rtol=1e-4, atol=1e-4, msg=name)


def test_the_window_is_transformers_sliding_window():
    from transformers.masking_utils import sliding_window_causal_mask_function

    assert attention.window(True, None) == attention.CAUSAL == (-1, 0)
    assert attention.window(False, None) == (-1, -1)
    assert attention.window(True, 8) == (7, 0)
    n, w = 20, 8
    visible = sliding_window_causal_mask_function(w)
    want_mask = visible(torch.tensor(0), torch.tensor(0), torch.arange(n)[:, None], torch.arange(n)[None])
    assert want_mask.shape == (n, n) and want_mask.sum() < n * (n + 1) // 2  # causal, minus what the window hides
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 2, 16, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            attn_mask=want_mask).transpose(0, 1)
    cu = torch.tensor([0, n], dtype=torch.int32)
    torch.testing.assert_close(attention.reference_varlen_attn(q, k, v, cu, cu, None, attention.window(True, w)), want)
    assert not torch.allclose(attention.reference_varlen_attn(q, k, v, cu, cu, None), want)  # the window matters


def test_the_kernel_gets_each_layers_window(family_model, family_tokenizer, monkeypatch):
    """Qwen2 windows layer 1 only; the kernel (a stand-in with its signature here) gets (7, 0) there, (-1, 0) else."""
    windows = []

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        windows.append(window_size)
        return attention.reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, scale, window_size)

    model = load_model(family_model("qwen2"), settings(attention="varlen", quantization="none"), CPU).eval()
    monkeypatch.setattr(attention, "use_kernel", lambda query: True)
    monkeypatch.setattr(attention, "varlen_attn", varlen_attn)
    logits(model, packed_batch(len(family_tokenizer("qwen2"))))
    assert windows == [(-1, 0), (families.WINDOW - 1, 0)]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_auto_targets_every_family(family, family_tokenizer):
    model = meta_model(families.config(family, family_tokenizer(family)))
    targets, why = resolve_targets(settings(), model)
    assert targets == TARGETS.get(family, ["q_proj", "v_proj"]), why


def test_target_groups_and_mistakes(family_tokenizer):
    phi3 = meta_model(families.config("phi3", family_tokenizer("phi3")))
    assert resolve_targets(settings(lora_target_modules="attention,mlp"), phi3)[0] == [
        "o_proj", "qkv_proj", "down_proj", "gate_up_proj"]
    assert resolve_targets(settings(lora_target_modules="qkv_proj,mlp.down_proj"), phi3)[0] == [
        "qkv_proj", "mlp.down_proj"]
    with pytest.raises(ConfigError, match=r"FT_LORA_TARGET_MODULES=q_proj,v_proj: Phi3ForCausalLM has no linear module "
                                          r"named 'q_proj'; valid: .*down_proj, gate_up_proj, o_proj, qkv_proj$"):
        resolve_targets(settings(lora_target_modules="q_proj,v_proj"), phi3)
    neox = meta_model(families.config("gpt_neox", family_tokenizer("gpt_neox")))
    for model in (phi3, neox):  # the LM head by its name in the family (GPT-NeoX's was embed_out before transformers 5)
        head = next(name for name, kind in adaptable_modules(model).items() if kind == "output")
        with pytest.raises(ConfigError, match=f"'{head}' is the LM head"):
            resolve_targets(settings(lora_target_modules=head), model)
        # the embeddings: peft would save the whole matrix in the adapter, and vLLM does not load it
        embeddings = next(name for name, kind in adaptable_modules(model).items() if kind == "embedding")
        with pytest.raises(ConfigError, match=f"'{embeddings.rsplit('.', 1)[-1]}' is an embedding layer"):
            resolve_targets(settings(lora_target_modules=embeddings.rsplit(".", 1)[-1]), model)


@pytest.fixture
def signals_restored():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("family, env, message", [
    ("phi3", {"FT_LORA_TARGET_MODULES": "q_proj"}, "Phi3ForCausalLM has no linear module named 'q_proj'"),
    ("phi3", {"FT_LORA_TARGET_MODULES": "lm_head"}, "'lm_head' is the LM head"),
    ("phi3", {"FT_LORA_R": "100000"}, "FT_LORA_R=100000: above the rank an update of"),
    ("gemma2", {"FT_ATTENTION": "varlen"}, "Gemma2ForCausalLM cannot use it"),
])
def test_check_refuses_what_the_model_cannot_take(family, env, message, family_model, tmp_path, monkeypatch, capsys,
                                                 signals_restored):
    """`finetune-job check` reads config.json alone: these fail before any weight is read (exit 2)."""
    model = family_model(family)
    for key, value in {"FT_BASE_MODEL": str(model), "FT_DATASET": str(families.ROOT / "examples" / "data" /
                       "sample-text.jsonl"), "FT_OUTPUT_URI": str(tmp_path / "out"), **env}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["check"]) == 2
    assert message in capsys.readouterr().out


SAMPLE_CHAT = families.ROOT / "examples" / "data" / "sample-chat.jsonl"
# Added to the sample's single-answer records (none of which has a system message): two answers in one
# conversation, and a system message, which Mistral's and Gemma's templates refuse (raise_exception).
TWO_ANSWERS = [{"role": "user", "content": "Write 12 in words."}, {"role": "assistant", "content": "Twelve."},
               {"role": "user", "content": "And 13?"}, {"role": "assistant", "content": "Thirteen."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer in words."}, {"role": "user", "content": "Write 14."},
               {"role": "assistant", "content": "Fourteen."}]
REFUSES_SYSTEM = {"mistral", "gemma2", "gemma3"}


def assert_trains_exactly_the_answers(tok, samples, messages: list[dict], end: str) -> None:
    """The one sample of `samples` (the job's tokenized ones) that renders `messages` trains each assistant answer
    followed by the end token `end` and nothing else; template whitespace may surround the end token."""
    question = messages[-2]["content"]
    found = [s for s in samples if question in tok.decode(s["input_ids"])]
    assert len(found) == 1, f"{len(found)} samples hold {question!r}"
    sample = found[0]
    assert sample["input_ids"] == list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = [run.strip() for run in chat_templates.trained_runs(tok, sample["labels"])]
    assert len(runs) == len(answers), runs
    for run, answer in zip(runs, answers):
        assert run.startswith(answer) and run[len(answer):].strip() == end, (run, answer, end)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_trains_on_chat_data_with_default_settings(family, family_model, tmp_path, monkeypatch):
    """Each family with its own chat template: a few steps on chat records lower the eval loss, peft loads the
    adapter, and the job's tokenized samples train exactly each answer and its end-of-turn token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = family_model(family)
    records = [json.loads(line) for line in SAMPLE_CHAT.read_text().splitlines()[:30]]
    records += [{"messages": TWO_ANSWERS}, {"messages": WITH_SYSTEM}]
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    for key, value in {"FT_BASE_MODEL": str(path), "FT_DATASET": str(dataset), "FT_OUTPUT_URI": str(tmp_path / "out"),
                       "FT_WORK_DIR": str(tmp_path / "work"), "FT_RUN_ID": "r", "FT_MAX_STEPS": "3"}.items():
        monkeypatch.setenv(key, value)
    cfg = Settings()
    summary = pipeline.run(cfg, console=False, stopper=Stopper(30))
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    base = AutoModelForCausalLM.from_pretrained(path)
    adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "r" / "adapter")
    lora_b = {n: p for n, p in adapted.named_parameters() if "lora_B" in n}
    assert {n.split(".lora_B")[0].rsplit(".", 1)[-1] for n in lora_b} == set(TARGETS.get(family, ["q_proj", "v_proj"]))
    assert all(p.abs().sum() > 0 for p in lora_b.values())  # trained away from peft's zero initialisation

    # The run's samples again, through the job's own data path; the manifest's data facts show they are the same.
    tok = data.load_tokenizer(path, cfg)
    train, evaluation, stats = data.tokenize_splits(*data.load_splits(cfg, dataset), tok, cfg)
    manifest = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())
    assert manifest["data"] == vars(stats)
    assert stats.format == "chat" and stats.bad_records == int(family in REFUSES_SYSTEM), stats
    samples = [*train, *evaluation]
    end = chat_templates.FAMILIES[families.CHAT_TEMPLATE[family]].end
    assert_trains_exactly_the_answers(tok, samples, records[0]["messages"], end)
    assert_trains_exactly_the_answers(tok, samples, TWO_ANSWERS, end)
    if family not in REFUSES_SYSTEM:
        assert_trains_exactly_the_answers(tok, samples, WITH_SYSTEM, end)
