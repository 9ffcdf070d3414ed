"""A fused LoRA path (FT_FUSED_LORA): each of peft's LoRA layers computed as one autograd function of fewer kernels.

peft computes an adapted projection y = W x + s B A dropout(x) as separate modules, each with its own kernels and
saved tensors (peft.tuners.lora.bnb.Linear4bit.forward, peft 0.19): the base product, a copy of its output (`clone`,
kept "defensively" for 4-bit layers), dropout, A, B, a multiplication by the scale s = alpha / r (or alpha / sqrt(r)
with rsLoRA) and an addition, all over [tokens, out_features] tensors; in the backward the scale, the dropout's mask
and the sum of the two input gradients are three more such passes. Here:

- forward: y = x W^T (+ bias), then y += s (dropout(x) A^T) B^T as the B product's own accumulation (torch.addmm
  with alpha = s): the only full-size pass besides the products is dropout's;
- backward: dx = g W, the scale applied to the [tokens, r] and [out, r] products (g B, g^T h), and the LoRA path's
  input gradient added into dx with the dropout mask in one pass (addcmul).

The products are the same; the sums are rounded once instead of after each step (bf16: equal within rounding). The
dropout masks are drawn as peft's nn.Dropout draws them (torch's fused native_dropout on CUDA, a float bernoulli on
the CPU), so a seed gives the same masks either way. Bases: a bf16/fp32 nn.Linear, a bitsandbytes 4-bit layer (its
weight dequantized before each product, forward and backward, as bitsandbytes' MatMul4Bit does) or one dequantized
once (job/speed.py dequantize_once). Anything else (DoRA and other LoRA variants, several active adapters,
adapter_names, merged or disabled adapters, LoRA bias, mixed dtypes as under fp16 autocast, 8-bit bases) runs peft's
own forward.

Source of the decomposition: the LoRA paper (Hu et al., 2021, eq. 3); the backward is the chain rule written out.
"""

from __future__ import annotations

import functools

import torch

from job import log


def _base_weight(base: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, bool] | None:
    """The base layer's weight as a `dtype` tensor (out_features, in_features) and whether it is kept (False: made for
    this use), or None where this path cannot use it: the copy dequantize_once keeps, bitsandbytes' 4-bit weight
    dequantized now, or a frozen nn.Linear's own weight."""
    dequantized = getattr(base, "dequantized", None)
    if dequantized is not None:
        return (dequantized, True) if dequantized.dtype == dtype else None
    quant_state = getattr(getattr(base, "weight", None), "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(base.weight.data, quant_state).to(dtype), False
    if type(base) is torch.nn.Linear and not base.weight.requires_grad and base.weight.dtype == dtype:
        return base.weight, True
    return None


def _supported_base(base: torch.nn.Module, dtype: torch.dtype) -> bool:
    """_base_weight would return a weight for `base` (without dequantizing anything), and its bias is frozen."""
    if base.bias is not None and base.bias.requires_grad:
        return False
    dequantized = getattr(base, "dequantized", None)
    if dequantized is not None:
        return dequantized.dtype == dtype
    if getattr(getattr(base, "weight", None), "quant_state", None) is not None:
        return True
    return type(base) is torch.nn.Linear and not base.weight.requires_grad and base.weight.dtype == dtype


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dropout(x) and its keep-mask (bool, x's shape), with the random draws of torch.nn.functional.dropout (so of
    peft's nn.Dropout): CUDA's fused native_dropout, and on the CPU a bernoulli over a float tensor (ATen's
    _dropout_impl). p = 0: x itself and no mask."""
    if p == 0:
        return x, None
    if x.is_cuda:
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    return x * noise.div_(1 - p), noise.bool()


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scale * dropout(x) A^T B^T for x (..., in) -> y (..., out), with W (out, in) frozen (the base
    layer's, recomputed in the backward by `weight()` when it is dequantized per use), A (r, in), B (out, r) and the
    bias b (out,) or None; every tensor in x's dtype. Gradients for x, A and B. `p`: LoRA dropout, 0 in eval mode."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, p: float, scale: float):
        weight, kept = _base_weight(base, x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        bias = None if base.bias is None else base.bias.to(x.dtype)
        y = torch.nn.functional.linear(flat, weight, bias)
        dropped, mask = _dropout(flat, p)
        h = dropped @ lora_a.t()  # (tokens, r)
        y.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(dropped, h, mask, lora_a, lora_b)
        ctx.base, ctx.p, ctx.scale, ctx.weight = base, p, scale, weight if kept else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        dropped, h, mask, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ lora_b).mul_(ctx.scale)  # (tokens, r): the gradient of h
        grad_b = (g.t() @ h).mul_(ctx.scale) if ctx.needs_input_grad[2] else None
        grad_a = gh.t() @ dropped if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight if ctx.weight is not None else _base_weight(ctx.base, g.dtype)[0]
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(gh, lora_a)
            else:
                grad_x.addcmul_(gh @ lora_a, mask, value=1 / (1 - ctx.p))
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, grad_a, grad_b, None, None, None


def _fusable(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[str | None, str | None]:
    """(the active adapter's name, None) where LoraLinear computes `layer`'s forward as peft would, else (None, why
    not). Under autocast (accelerate's bf16 mixed precision) only where it casts nothing: every tensor already in its
    dtype."""
    if args or kwargs:
        return None, "arguments beyond the input (adapter_names)"
    if layer.disable_adapters or layer.merged:
        return None, "adapters disabled or merged"
    if len(layer.active_adapters) != 1:
        return None, "several active adapters"
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None, "a LoRA variant (DoRA)" if name in layer.lora_A else "no LoRA weights for the active adapter"
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if lora_b.bias is not None or not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return None, "LoRA bias or another dropout module"
    device = x.device.type
    if not x.dtype == lora_a.weight.dtype == lora_b.weight.dtype or (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype):
        return None, (f"mixed dtypes (input {x.dtype}, LoRA weights {lora_a.weight.dtype}, autocast "
                      f"{torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else 'off'})")
    if not _supported_base(layer.get_base_layer(), x.dtype):
        return None, f"base layer {type(layer.get_base_layer()).__name__} in {x.dtype}"
    return name, None


_WARNED: set[str] = set()


def _warn_once(why: str) -> None:
    """A training forward that fell back to peft's layers says why, once per reason and process."""
    if why not in _WARNED:
        _WARNED.add(why)
        log.get().warning("LoRA layer computed by peft, not fused", reason=why)


@functools.cache
def _fused_class(peft_class: type) -> type:
    class Fused(peft_class):
        """peft's LoRA layer, computed by LoraLinear where it can be (job/fused_lora.py), else by peft."""

        def forward(self, x, *args, **kwargs):
            name, why = _fusable(self, x, args, kwargs)
            if name is None:
                if self.training and torch.is_grad_enabled():
                    _warn_once(why)
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
            return LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(), p,
                                    self.scaling[name])

    Fused.__name__ = Fused.__qualname__ = f"Fused{peft_class.__name__}"
    return Fused


def fuse_lora(model) -> int:
    """FT_FUSED_LORA: switch every LoRA linear layer of the peft `model` (peft.tuners.lora Linear and bitsandbytes'
    Linear4bit wrappers) to the fused forward in place; state dicts, saving and merging are unchanged. Returns how
    many layers were switched. Undo with unfuse_lora."""
    from peft.tuners.lora import Linear

    kinds: tuple[type, ...] = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds += (Linear4bit,)
    except ImportError:  # peft defines it only where bitsandbytes is installed
        pass
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    for layer in layers:
        if not hasattr(layer, "_class_before_fused"):
            layer._class_before_fused = type(layer)
            layer.__class__ = _fused_class(type(layer))
    log.get().info("LoRA layers fused", layers=len(layers))
    return len(layers)


def unfuse_lora(model) -> None:
    """Undo fuse_lora: peft's own forward again."""
    for module in model.modules():
        if hasattr(module, "_class_before_fused"):
            module.__class__ = module._class_before_fused
            del module._class_before_fused
