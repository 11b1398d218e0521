"""Rotary position embeddings with the scalings Llama-family checkpoints use.

Shape letters: B batch, T tokens, H query heads, G KV heads, D head dim.

cos/sin are computed per step from the positions (not from a table sized to the context), so a
128k-token context costs nothing up front; the math is float32 as in the reference models.
"""

from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [D/2] float32, attention scaling applied to cos and sin)."""
    dim = head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = 1.0
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        inv_freq = _llama3(inv_freq, rope, max_position_embeddings)
    elif rope.kind == "yarn":
        inv_freq, scale = _yarn(rope, dim, max_position_embeddings)
    if rope.freq_factors is not None:
        factors = torch.tensor(rope.freq_factors, dtype=torch.float32)
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}")
        inv_freq = inv_freq / factors
    return inv_freq, scale


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig, max_pos: int) -> torch.Tensor:
    # Long wavelengths (beyond the original context) are interpolated by `factor`, short ones
    # kept, and the band between blended smoothly: Llama 3.1's published scheme.
    old_ctx = rope.original_max_position_embeddings or max_pos
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    # YaRN: interpolate low frequencies, extrapolate high ones, ramp between the dimensions that
    # complete beta_fast and beta_slow rotations over the original context.
    old_ctx = rope.original_max_position_embeddings or max_pos
    factor = rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(old_ctx / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the dimension is extrapolated (high frequency)
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Computes cos/sin for given positions; applied to q and k by :func:`apply_rotary`.

    Example::

        rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, device)
        cos, sin = rope(positions)          # positions [B, T] int64 -> [B, T, D] each
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int, device: torch.device):
        inv_freq, self.attention_scaling = inverse_frequencies(rope, head_dim, max_position_embeddings)
        self.inv_freq = inv_freq.to(device)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, D] by cos/sin [B, T, D] (half-split layout, as HF checkpoints)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
