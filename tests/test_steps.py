"""StepTrainer's own loss path: the same loss and metrics as trl's, one forward per micro-batch, no host sync."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def trainer(tiny_model, tokenizer, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job.steps import StepCollator, StepTrainer

    torch.manual_seed(0)
    rows = [list(range(5, 5 + n)) for n in (9, 17, 6, 12)]
    ds = Dataset.from_dict({"input_ids": rows, "labels": [[-100] * 3 + r[3:] for r in rows]})
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                     dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    t = StepTrainer(model=model, args=args, data_collator=collate, train_dataset=ds, processing_class=tokenizer,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    t.step_collator = StepCollator(collate, max_tokens=24)  # the four samples in three micro-batches
    t.batch = t.step_collator([ds[i] for i in range(4)])
    return t


def test_a_step_runs_one_forward_per_micro_batch_and_reads_nothing_back(trainer, monkeypatch):
    """trl 1.16 recomputes the logits with a second forward when compute_loss is asked for outputs, and reads its
    metrics back with .item() per micro-batch: a small step must do neither."""
    forwards = []
    trainer.model.register_forward_hook(lambda *a: forwards.append(1))
    synced = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: synced.append(1) or item(self))
    trainer.model.train()
    trainer.training_step(trainer.model, trainer.batch)
    assert len(trainer.batch["micro_batches"]) == 3
    assert len(forwards) == 3
    assert synced == []


def test_loss_and_metrics_equal_trls(trainer):
    """The plain path computes trl's loss (sum over trained tokens / the step's count), and logs trl's entropy and
    token accuracy as per-token means, with the same input-token count."""
    from trl import SFTTrainer

    from job.steps import trained_tokens

    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(trainer.batch["micro_batches"][1])
    count = trained_tokens(batch) + 7  # as if the step had other micro-batches
    ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    theirs = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=count)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    expected = {k: v[-1] for k, v in trainer._metrics["train"].items()}  # trl's, appended by its compute_loss
    for key in ("entropy", "mean_token_accuracy"):
        trainer._metrics["train"][key].clear()
    logged = {}
    trainer.callback_handler.on_log = lambda args, state, control, logs: logged.update(logs) or control
    trainer.log({"loss": ours.item()})
    assert logged["entropy"] == pytest.approx(expected["entropy"], rel=1e-5)
    assert logged["mean_token_accuracy"] == pytest.approx(expected["mean_token_accuracy"], rel=1e-6)
    assert logged["num_tokens"] == 2 * expected["num_tokens"]  # counted once by trl, once by us


@pytest.mark.parametrize("optim, profile, device, fsdp, expected", [
    ("paged_adamw_32bit", "fast", "cuda", False, "adamw_torch_fused"),  # one update, the faster code
    ("paged_adamw_32bit", "guide", "cuda", False, "paged_adamw_32bit"),  # the guide's computation, as it was
    ("paged_adamw_32bit", "fast", "cpu", False, "adamw_torch"),
    ("adamw_torch", "lean", "cuda", False, "adamw_torch_fused"),
    ("paged_adamw_8bit", "fast", "cuda", False, "paged_adamw_8bit"),  # 8-bit states: another update, kept
    ("paged_adamw_8bit", "fast", "cpu", False, "adamw_torch"),
    ("paged_adamw_8bit", "fast", "cuda", True, "adamw_torch_fused"),
    ("adafactor", "fast", "cuda", False, "adafactor"),
])
def test_the_optimizer_implementation_is_the_plans_choice_the_update_is_not(optim, profile, device, fsdp, expected):
    from job.config import Settings
    from job.model import Placement
    from job.train import effective_optim

    cfg = Settings.model_construct(optim=optim, profile=profile)
    assert effective_optim(cfg, Placement(device, torch.bfloat16), fsdp) == expected


@pytest.mark.parametrize("optim, device, fsdp", [
    ("lion_8bit", "cpu", False), ("paged_lion_32bit", "cpu", False), ("paged_lion_8bit", "cuda", True),
    ("lion_32bit", "cuda", True),
])
def test_lion_is_refused_where_adamw_would_stand_in(optim, device, fsdp):
    """bitsandbytes' AdamW falls back to torch's AdamW on the CPU and under FSDP (the same rule); its Lion would
    silently become AdamW, another update rule: a ConfigError naming FT_OPTIM instead (preflight, before downloads)."""
    from job.config import Settings
    from job.errors import ConfigError
    from job.model import Placement
    from job.train import effective_optim

    cfg = Settings.model_construct(optim=optim, profile="fast")
    with pytest.raises(ConfigError, match=f"FT_OPTIM={optim}: bitsandbytes' .*Lion"):
        effective_optim(cfg, Placement(device, torch.bfloat16), fsdp)
    assert effective_optim(cfg, Placement("cuda", torch.bfloat16), False) == optim  # one GPU: as asked


@pytest.mark.parametrize("padding_free", [True, False])
def test_evaluation_fill_ups_carry_no_loss(padding_free):
    # Under several processes the evaluation set is filled up to a multiple of processes x batch size (issue 19):
    # the fill-ups must add no trained token in either collation, and the real samples keep theirs.
    from datasets import Dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job.steps import fill_to_multiple, trained_tokens

    rows = [{"input_ids": [5, 6, 7, 8][: 2 + i % 3], "completion_mask": [0, 1, 1, 1][: 2 + i % 3]} for i in range(5)]
    filled = fill_to_multiple(Dataset.from_list(rows), 4)
    assert len(filled) == 8 and filled[5:] == {"input_ids": [[5]] * 3, "completion_mask": [[0]] * 3}
    assert fill_to_multiple(filled, 4) is filled
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    assert trained_tokens(collate(list(filled)[5:])) == 0
    assert trained_tokens(collate(list(filled))) == trained_tokens(collate(rows)) > 0
