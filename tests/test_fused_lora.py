"""FT_FUSED_LORA (job/fused_lora.py): peft's LoRA layers computed by one autograd function give peft's outputs and
gradients, with the same dropout masks; layers it cannot compute run peft's own forward; the plan takes it by default
outside the guide."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import job.fused_lora as fl
from job.fused_lora import fuse_lora, unfuse_lora


class Two(torch.nn.Module):
    """Two linear layers, the LoRA targets, with a nonlinearity between them."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q = torch.nn.Linear(32, 48, bias=bias)
        self.o = torch.nn.Linear(48, 32, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)))


@pytest.fixture
def calls(monkeypatch):
    """How many times the fused function ran."""
    count = [0]
    apply = fl.LoraLinear.apply

    def counted(*args):
        count[0] += 1
        return apply(*args)

    monkeypatch.setattr(fl.LoraLinear, "apply", counted)
    return count


def outputs_and_grads(model, x, seed=1):
    """The model's output for x and the gradients of a loss of it for x and every trainable parameter, with the
    random state (dropout's masks) set by `seed`."""
    torch.manual_seed(seed)
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return y, torch.autograd.grad(y.float().square().sum(), [x, *params])


def peft_pair(base, **lora):
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q", "o"],
                           "init_lora_weights": False, **lora})  # B != 0: the LoRA path counts
    # LoRA weights in the base's dtype, as trl keeps them for a bf16 model (peft would make them fp32)
    reference = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 2
    return reference, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, rslora, dropout, training", [
    (False, False, 0.1, True), (True, False, 0.1, True), (False, True, 0.3, True), (True, True, 0.0, True),
    (False, False, 0.1, False),
])
def test_fused_layers_compute_what_peft_computes(calls, dtype, bias, rslora, dropout, training):
    """The same outputs and gradients (input, A and B of each layer) as peft's layers, dropout's masks included: the
    fused path draws them as nn.Dropout does, so a seed gives the same ones. Sums are rounded once instead of after
    each step: equal up to rounding."""
    torch.manual_seed(0)
    reference, fused = peft_pair(Two(bias).to(dtype), use_rslora=rslora, lora_dropout=dropout)
    reference.train(training), fused.train(training)
    x = torch.randn(3, 7, 32, dtype=dtype, requires_grad=True)
    y_ref, grads_ref = outputs_and_grads(reference, x)
    y, grads = outputs_and_grads(fused, x)
    assert calls[0] == 2 and y.dtype == dtype
    if dtype == torch.float32:
        for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # bf16: no less accurate than peft against the same computation in fp32 (the same masks: the same draws)
        exact = copy.deepcopy(reference).float()
        y_32, grads_32 = outputs_and_grads(exact, x.detach().float().requires_grad_())
        for got, ours, truth in zip((y, *grads), (y_ref, *grads_ref), (y_32, *grads_32), strict=True):
            error, peft_error = (got.float() - truth).norm(), (ours.float() - truth).norm()
            assert error <= 1.5 * peft_error + 1e-3 * truth.norm(), (error, peft_error)
    assert len(grads) == 5  # x, and A and B of both layers
    if training and dropout:  # other masks give other gradients: the masks are what makes them equal
        _, other = outputs_and_grads(reference, x, seed=2)
        assert not torch.allclose(other[0], grads_ref[0], rtol=1e-3, atol=1e-3)


def test_unfuse_restores_pefts_layers(calls):
    reference, fused = peft_pair(Two(False))
    unfuse_lora(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in reference.modules()]
    outputs_and_grads(fused, torch.randn(2, 32, requires_grad=True))
    assert calls[0] == 0


def test_4bit_and_dequantized_bases(tiny_model, calls):
    """A tiny Llama quantized to nf4 as the job loads it, with LoRA on every linear layer: the fused layers give
    peft's loss and gradients over the 4-bit weights (dequantized before each product, forward and backward) and over
    the copy dequantize_once keeps."""
    from test_speed import settings

    from job.model import Placement, load_model
    from job.speed import dequantize_once

    model = load_model(tiny_model, settings(quantization="nf4"), Placement("cpu", torch.float32))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    ids = torch.randint(3, 500, (2, 24))

    def loss_and_grads():
        torch.manual_seed(3)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        params = [p for p in model.parameters() if p.requires_grad]
        return loss.detach(), torch.autograd.grad(loss, [embeds, *params])

    loss_ref, grads_ref = loss_and_grads()
    layers = fuse_lora(model)
    assert layers == 7 * 2  # 7 projections per layer, 2 layers
    for dequantize in (False, True):
        if dequantize:
            dequantize_once(model, torch.float32)
        before = calls[0]
        loss, grads = loss_and_grads()
        assert calls[0] - before == layers
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_layers_it_cannot_compute_run_pefts_forward(calls):
    """DoRA, a second active adapter, merged or disabled adapters, adapter_names and an autocast that would cast:
    peft's own forward, so peft's own results."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, requires_grad=True)

    reference, fused = peft_pair(Two(False), use_dora=True)
    torch.testing.assert_close(outputs_and_grads(fused, x)[0], outputs_and_grads(reference, x)[0])
    assert calls[0] == 0

    reference, fused = peft_pair(Two(False))
    for model in (reference, fused):
        torch.manual_seed(4)
        model.add_adapter("other", LoraConfig(r=4, target_modules=["q"], init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(outputs_and_grads(fused, x)[0], outputs_and_grads(reference, x)[0])
    assert calls[0] == 0

    reference, fused = peft_pair(Two(False))
    with fused.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(fused(x), reference(x))
    fused.eval(), reference.eval()
    torch.testing.assert_close(fused(x, adapter_names=["default"] * 4), reference(x, adapter_names=["default"] * 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 LoRA weights under bf16 autocast: peft casts
        torch.testing.assert_close(fused(x), reference(x))
    assert calls[0] == 0
    fused.merge_adapter(), reference.merge_adapter()
    torch.testing.assert_close(fused(x), reference(x))
    assert calls[0] == 0
    fused.unmerge_adapter()
    fused(x)
    assert calls[0] == 2  # unmerged again: fused


def test_the_plan_fuses_outside_the_guide(monkeypatch):
    from test_speed import settings

    from job.config import load_settings
    from job.errors import ConfigError
    from job.speed import fused_lora

    assert fused_lora(settings(profile="fast")) and fused_lora(settings(profile="lean"))
    assert not fused_lora(settings(profile="guide"))
    assert fused_lora(settings(profile="guide", fused_lora=True))
    assert not fused_lora(settings(profile="fast", use_dora=True))
    assert not fused_lora(settings(profile="fast", compile=True))
    assert not fused_lora(settings(profile="fast", fused_lora=False))
    for key, message in (("FT_USE_DORA", ("FT_FUSED_LORA=true with FT_USE_DORA=true: the fused path computes plain "
                                         "LoRA")),
                         ("FT_COMPILE", "FT_FUSED_LORA=true with FT_COMPILE=true: torch.compile fuses")):
        with monkeypatch.context() as m:
            m.setenv("FT_FUSED_LORA", "true")
            m.setenv(key, "true")
            with pytest.raises(ConfigError, match=message):
                load_settings()


def test_a_training_forward_that_falls_back_says_why_once(capsys, monkeypatch):
    """fp32 LoRA weights under bf16 inputs (as peft leaves them by default): peft's forward, and one warning naming
    the mixed dtypes however many layers and steps fall back."""
    import json

    from job import log

    log.setup("json", "info")
    monkeypatch.setattr(fl, "_WARNED", set())
    torch.manual_seed(0)
    model = get_peft_model(Two(False).to(torch.bfloat16), LoraConfig(r=8, target_modules=["q", "o"]))
    fuse_lora(model)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    for _ in range(2):
        model(x).float().sum().backward()
    warnings = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                if line.startswith("{") and "not fused" in line]
    assert len(warnings) == 1 and "mixed dtypes (input torch.bfloat16, LoRA weights torch.float32" in \
        warnings[0]["reason"]
