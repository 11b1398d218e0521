"""Int8 activations for int8 linear layers, made accurate by smoothing (``--activations int8``).

Quantizing a token's activations to int8 with one scale per token loses the many small channels
to the few large ones: the inputs of q/k/v and gate/up (RMSNorm outputs) carry a few channels
tens of times larger than the rest. Smoothing (the SmoothQuant idea) moves part of that range
into the weights, exactly: for input channel j, the norm's weight is divided by ``s_j`` and the
linear layer's column j multiplied by it, so ``W (x / s) * s = W x`` before rounding. With
``s_j = max|x_j|^a / max|W_j|^(1-a)`` both sides end up with a milder range. The activation
maxima come from a calibration pass over text the model writes itself (no evaluation data).

The layout, chosen on essay tokens 6512-6812 of the default model (the accuracy benchmark scores
tokens 512-812; ``bench_edge/bench_weights.py``): ``a = 0.7`` for q/k/v and gate/up; o_proj int8
without smoothing; down_proj float, from its int8 values, since its input (``silu(gate) * up``)
lost the most agreement in int8 (mean KL 0.0158 smoothed, 0.0098 with a scale per 32 values,
against 0.0067 float); the LM head float (int8 weights cost KL 0.011 to 0.020). Where the CPU
multiplies bfloat16 natively, down_proj and the LM head are held in bfloat16: a decode step reads
half their bytes, for KL 0.0097 against 0.0091 in float32 on the tuning span.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .bf16 import BF16Linear
from .quant import Int8Linear, QuantizedWeight, cpu_bf16_kernels, quantize

SMOOTH_ALPHA = 0.7
CALIBRATION_TOKENS = 64
# (norm before the layer, module holding it, linear layer): smoothed and given int8 activations
SMOOTHED = (("input_layernorm", "self_attn", "qkv_proj"), ("post_attention_layernorm", "mlp", "gate_up_proj"))
UNSMOOTHED_INT8 = (("self_attn", "o_proj"),)  # int8 activations as they are


def record_input_maxima(layers: nn.ModuleList, run: Callable[[], None]) -> list[dict[str, torch.Tensor]]:
    """Per layer, the largest magnitude each input channel of the SMOOTHED layers saw while
    ``run()`` ran the model: ``[{linear name: float32 [K]}]``."""
    maxima: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        for norm, _, linear in SMOOTHED:
            def seen(module, inputs, out, i=i, linear=linear):
                peak = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
                old = maxima[i].get(linear)
                maxima[i][linear] = peak if old is None else torch.maximum(old, peak)
            hooks.append(getattr(layer, norm).register_forward_hook(seen))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def _float_layer(weight: torch.Tensor, bias: torch.Tensor | None, bf16: bool) -> nn.Module:
    if bf16:
        return BF16Linear(weight, bias)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no init
    linear.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return linear


def use_int8_activations(model: nn.Module, maxima: list[dict[str, torch.Tensor]],
                         alpha: float = SMOOTH_ALPHA, bf16: bool | None = None) -> None:
    """Switch an int8 ``model`` (a LlamaForCausalLM) to the ``--activations int8`` layout, in place:
    the SMOOTHED layers smoothed and int8 x int8, UNSMOOTHED_INT8 int8 x int8, down_proj float
    from its int8 values (bfloat16 where the kernels run in bf16; ``bf16`` None: detect). Each
    weight is rebuilt one at a time. (The LM head is bfloat16 beside quantized layers on such a
    CPU, or int8 groups where that is exact: ``model/bf16.py``, ``model/qmatmul.py``.)"""
    bf16 = cpu_bf16_kernels() if bf16 is None else bf16
    for i, layer in enumerate(model.model.layers):
        for norm_name, owner_name, linear_name in SMOOTHED:
            owner, norm = getattr(layer, owner_name), getattr(layer, norm_name)
            linear = getattr(owner, linear_name)
            if not isinstance(linear, Int8Linear):
                raise TypeError(f"layer {i} {linear_name} is {type(linear).__name__}; int8 activations need int8 weights")
            w = QuantizedWeight("int8", linear.q, linear.scale).dequantize()
            x_peak = maxima[i][linear_name].clamp_min(1e-5)
            w_peak = w.abs().amax(0).clamp_min(1e-5)
            s = (x_peak.pow(alpha) / w_peak.pow(1 - alpha)).clamp_min(1e-5)
            with torch.no_grad():
                norm.weight.div_(s.to(norm.weight.dtype))
            setattr(owner, linear_name, Int8Linear(quantize(w * s[None, :], "int8"), linear.bias, activations="int8"))
        for owner_name, linear_name in UNSMOOTHED_INT8:
            getattr(getattr(layer, owner_name), linear_name).activations = "int8"
        down = layer.mlp.down_proj
        if isinstance(down, Int8Linear):  # int8 x int8 here cost the most agreement (module docstring)
            layer.mlp.down_proj = _float_layer(QuantizedWeight("int8", down.q, down.scale).dequantize(), down.bias, bf16)
