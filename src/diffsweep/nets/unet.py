"""A compact DDPM-style UNet (Ho et al. 2020): residual blocks, GroupNorm, sinusoidal noise
embedding, single-head self-attention at chosen resolutions, optional class conditioning.

``UNet(channel_mults=(1, 2, 2, 2), base_channels=128, num_res_blocks=2,
attention_resolutions=(16,), dropout=0.1)`` at 32x32 is the 35.7M-parameter CIFAR-10 model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with at most ``num_groups`` groups of at least 4 channels each.

    One channel per group would be instance norm, which erases the per-channel noise embedding
    that a ResBlock adds just before its second norm.
    """
    groups = math.gcd(channels, min(num_groups, max(1, channels // 4)))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def sinusoidal_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding of a (B,) float tensor -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device,
                                                            dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected embedding, GroupNorm-SiLU-dropout-conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float,
                 num_groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width)
        if x.device.type == "cpu" and height * width <= CPU_BMM_ATTENTION_MAX_TOKENS:
            h = _bmm_attention(qkv)
        else:
            q, k, v = (qkv[:, i].transpose(1, 2)[:, None] for i in range(3))  # (B, 1, HW, C)
            h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2)
        return x + self.proj(h.reshape(batch, channels, height, width))


#: On the CPU, attention over at most this many positions uses two ``bmm`` and a float32 softmax
#: (:func:`_bmm_attention`): for these short sequences it is 1.2-1.6x (float32) and 2.5-2.8x
#: (bfloat16 autocast) faster forward + backward than ``scaled_dot_product_attention``
#: (measured on a 2-core AVX-512 CPU, torch 2.14; see experiments/benchmarks/README.md). Longer
#: sequences keep SDPA, which does not materialise the (B, HW, HW) weights.
CPU_BMM_ATTENTION_MAX_TOKENS = 256


def _bmm_attention(qkv: Tensor) -> Tensor:
    """Single-head softmax attention for ``qkv`` of shape (B, 3, C, L) -> (B, C, L)."""
    q, k, v = qkv.unbind(1)
    weights = torch.bmm(q.transpose(1, 2), k * (q.shape[1] ** -0.5))  # (B, L_q, L_k)
    weights = torch.softmax(weights.float(), dim=-1).to(v.dtype)
    return torch.bmm(v, weights.transpose(1, 2))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Noise-conditional UNet: ``forward(x (B,C,H,W), c_noise (B,), class_labels (B,) | None)``.

    Args:
        in_channels / out_channels: image (or latent) channels; out defaults to in.
        resolution: input height = width; must be divisible by ``2 ** (len(channel_mults) - 1)``.
        base_channels: channels at the first level; level i has
            ``base_channels * channel_mults[i]``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes at which self-attention is applied.
        dropout: dropout inside residual blocks.
        num_groups: GroupNorm groups (reduced to a divisor of the channel count).
        num_classes: enables class conditioning with a learned embedding; label ``num_classes``
            is the "null" label used for classifier-free guidance (label dropout).
    """

    def __init__(self, in_channels: int = 1, resolution: int = 16, base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (8,), dropout: float = 0.0,
                 num_groups: int = 32, out_channels: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        factor = 2 ** (len(channel_mults) - 1)
        if resolution % factor:
            raise ValueError(
                f"resolution {resolution} is not divisible by {factor}, the UNet's total "
                f"down-sampling for channel_mults={list(channel_mults)}; choose a resolution that "
                f"is a multiple of {factor} (data.resolution=...) or fewer levels "
                f"(model.channel_mults=...).")
        self.in_channels, self.resolution = in_channels, resolution
        self.num_classes = num_classes
        emb_channels = base_channels * 4
        self.base_channels = base_channels
        self.embed = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(),
                                   nn.Linear(emb_channels, emb_channels))
        self.class_embed = (nn.Embedding(num_classes + 1, emb_channels)
                            if num_classes is not None else None)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels, size = base_channels, resolution
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(channels, base_channels * mult, emb_channels,
                                                dropout, num_groups)])
                channels = base_channels * mult
                if size in attention_resolutions:
                    block.append(AttentionBlock(channels, num_groups))
                self.down.append(block)
                skip_channels.append(channels)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(channels)]))
                skip_channels.append(channels)
                size //= 2

        self.mid = nn.ModuleList([
            ResBlock(channels, channels, emb_channels, dropout, num_groups),
            AttentionBlock(channels, num_groups),
            ResBlock(channels, channels, emb_channels, dropout, num_groups),
        ])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(channels + skip_channels.pop(),
                                                base_channels * mult, emb_channels, dropout,
                                                num_groups)])
                channels = base_channels * mult
                if size in attention_resolutions:
                    block.append(AttentionBlock(channels, num_groups))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(channels)]))
                size *= 2

        self.norm_out = _group_norm(channels, num_groups)
        self.conv_out = nn.Conv2d(channels, out_channels or in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(sinusoidal_embedding(c_noise, self.base_channels).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
            emb = emb + self.class_embed(class_labels)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
