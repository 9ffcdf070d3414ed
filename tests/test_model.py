"""Quantization and LoRA settings reach the loaded model; impossible device/dtype combinations fail early."""

from __future__ import annotations

import pytest
import torch

from job.config import Settings
from job.errors import ConfigError
from job.model import Placement, load_model, lora_config, resolve_placement


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


CPU = Placement("cpu", torch.float32)


@pytest.mark.parametrize("quantization, layer, quant_type", [
    ("nf4", "Linear4bit", "nf4"), ("fp4", "Linear4bit", "fp4"), ("int8", "Linear8bitLt", None), ("none", "Linear", None),
])
def test_quantization_modes_load_on_the_cpu(tiny_model, quantization, layer, quant_type):
    model = load_model(tiny_model, settings(quantization=quantization), CPU)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    if quant_type:
        assert q_proj.weight.quant_type == quant_type
    assert model.config.use_cache is False


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_under_fsdp_the_4bit_weights_are_bytes_that_compute_the_same(tiny_model, monkeypatch, quantization):
    """accelerate leaves non-floating 4-bit weights out of FSDP2's sharding (fsdp2_prepare_model); sharded as bf16
    words they came back changed on GPUs (bench/RESULTS.md run 13). Stored as bytes, they must compute what the
    compute-dtype storage computes."""
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process
    single = load_model(tiny_model, settings(quantization=quantization, strategy="fsdp"), CPU)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun worker of two
    ddp = load_model(tiny_model, settings(quantization=quantization, strategy="ddp"), CPU)
    fsdp = load_model(tiny_model, settings(quantization=quantization, strategy="fsdp"), CPU)
    weights = {name: [p for p in m.parameters() if type(p).__name__ == "Params4bit"]
               for name, m in (("single", single), ("ddp", ddp), ("fsdp", fsdp))}
    assert weights["fsdp"] and all(p.dtype == torch.uint8 and not p.is_floating_point() and not p.requires_grad
                                   for p in weights["fsdp"])
    assert all(p.dtype == torch.float32 for p in weights["single"] + weights["ddp"])
    with torch.no_grad():
        assert torch.equal(fsdp(input_ids=ids).logits, single(input_ids=ids).logits)


def test_double_quant_reaches_the_weights(tiny_model):
    model = load_model(tiny_model, settings(double_quant=True), CPU)
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.nested


def test_lora_settings():
    cfg = lora_config(settings(lora_r=8, lora_alpha=32, lora_dropout=0.05, use_dora=True, use_rslora=True,
                               lora_target_modules="q_proj,o_proj"))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora, cfg.use_rslora) == (8, 32, 0.05, True, True)
    assert set(cfg.target_modules) == {"q_proj", "o_proj"}


def test_default_targets_are_peft_defaults_q_and_v_on_llama(tiny_model):
    from peft import get_peft_model

    model = get_peft_model(load_model(tiny_model, settings(), CPU), lora_config(settings()))
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "v_proj"}


def test_cpu_placement_uses_fp32():
    assert resolve_placement(settings(device="cpu")) == Placement("cpu", torch.float32)


def test_bf16_with_4bit_on_the_cpu_is_refused():
    with pytest.raises(ConfigError, match="FT_COMPUTE_DTYPE=bf16"):
        resolve_placement(settings(device="cpu", compute_dtype="bf16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="FT_DEVICE=cuda: no CUDA GPU is visible"):
        resolve_placement(settings(device="cuda"))


def test_fsdp_is_fsdp2_and_refused_where_only_fsdp1_exists(monkeypatch):
    """FSDP1 would flatten the byte-stored 4-bit weights with the 16-bit ones into one parameter: FSDP2 or nothing.
    accelerate's advice to store 4-bit weights as bf16 words (what FSDP2 changed) is silenced."""
    import warnings

    from transformers import TrainingArguments

    from job.speed import SpeedPlan
    from job.train import fsdp_arguments

    plan = SpeedPlan(True, 4096, None, 2, 4, False, False, "sdpa", 2, False)
    args = fsdp_arguments(plan)
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        fsdp_arguments(plan)  # installs the filter again, after catch_warnings reset them
        warnings.warn("Found 210 non-floating frozen Params4bit. Excluding from FSDP2 sharding", UserWarning)
        warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in caught] == ["another warning"]
    monkeypatch.delattr(TrainingArguments, "_apply_legacy_fsdp_to_config")
    with pytest.raises(ConfigError, match="FT_STRATEGY=fsdp: needs a transformers release with FSDP2"):
        fsdp_arguments(plan)


def test_fsdp_keeps_the_loss_in_the_dtype_it_was_computed_in(tmp_path):
    """FSDP2 under the job's mixed precision: bf16 compute, the fp32 loss returned as fp32 (accelerate's default cast
    the loss to bf16, and FSDP's logged loss read up to 1% high: run 13)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from job.train import fsdp_mixed_precision

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            hidden = self.layer(x)
            seen.append(hidden.dtype)
            return self.head(hidden).float().pow(2).mean()  # the loss in fp32, as transformers computes it

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        seen, net, policy = [], Net(), fsdp_mixed_precision(torch.bfloat16)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(net.layer, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)
        loss = net(torch.randn(4, 8))
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32


def test_the_tokenizers_special_tokens_reach_the_config_as_one_info_event(tiny_model, capsys):
    """The Trainer aligns them at its start with a warning that read as a fault on every run whose pad token the job
    chose (SmolLM2: pad 2 -> 0); the job aligns them first and says what changed."""
    import json

    from transformers import AutoTokenizer

    from job import log
    from job.train import align_special_tokens

    log.setup("json", "info")
    model = load_model(tiny_model, settings(quantization="none"), CPU)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id + 1
    changed = align_special_tokens(model, tokenizer)
    assert changed == {"pad_token_id": ((tokenizer.pad_token_id + 1,) * 2, (tokenizer.pad_token_id,) * 2)}
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [e["event"] for e in lines if "special tokens" in e["event"] or "PAD/BOS" in e["event"]] == [
        "special tokens of the model's config set to the tokenizer's"]
    assert align_special_tokens(model, tokenizer) == {}  # aligned: nothing to say
