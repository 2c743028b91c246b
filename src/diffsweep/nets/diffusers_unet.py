"""diffusers' ``UNet2DModel`` as a diffsweep net: ``forward(x_in, c_noise, class_labels=None)``.

:class:`DiffusersUNet` wraps a ``UNet2DModel`` (trained here, imported by
:mod:`diffsweep.diffusers_bridge`, or exported by :mod:`diffsweep.export`); :func:`diffusers_unet`
builds one from config keys (``model=diffusers_unet``) or from a pretrained folder to fine-tune.

What the UNet is told. ``c_noise`` goes in unchanged as the UNet's ``timestep`` (float32, (B,)):

- discrete VP schedules (linear, scaled_linear, cosine): ``c_noise = n``, the training index,
  exactly the integer diffusers' DDPM/DDIM/DPM-Solver pipelines pass (grids between table entries
  give the fractional index, as diffusers' Euler-type schedulers do);
- ``vp_continuous``: ``c_noise = 999 t``, on the same scale as the index;
- flow matching (``FlowMatchingSchedule``): ``c_noise = N s`` (``N = num_train_timesteps``), the
  ``timestep = sigmas * num_train_timesteps`` that ``FlowMatchEulerDiscreteScheduler`` gives the
  UNet, and the input ``c_in x~ = (1 - s) x~`` is its sample ``x_t`` (both equal to float32
  rounding, one ulp of the timestep: tests/test_diffusers_bridge_flow.py); fractional, so a
  ``learned`` (table) time embedding refuses it;
- ``ve`` / ``edm``: ``c_noise = log(sigma) / 4`` (about -1.5 .. 1.1), not an index. The UNet's
  sinusoidal time embedding (``time_embedding_type="positional"``) accepts any float, so these
  train as they do with EDM's own nets (which embed the same c_noise); such a net only means
  something to diffsweep's denoiser, and :mod:`diffsweep.export` refuses to write it as a
  diffusers pipeline.

Class conditioning: ``num_classes`` real classes and one extra embedding row, the null label
``num_classes`` used for label dropout and classifier-free guidance (``num_class_embeds =
num_classes + 1``). A UNet trained elsewhere with ``num_class_embeds = K`` and no null row is
wrapped with ``num_classes = K, null_label = None``: it needs labels in 0..K-1 on every call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Down/up block types built from ``attention_resolutions`` (the ones :mod:`diffsweep.export`
#: writes too).
PLAIN_BLOCKS = ("DownBlock2D", "UpBlock2D")
ATTENTION_BLOCKS = ("AttnDownBlock2D", "AttnUpBlock2D")


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as error:  # pragma: no cover - diffusers is a dev dependency
        raise ImportError("model=diffusers_unet and the diffusers bridge need diffusers: "
                          "pip install -e '.[latent]' (or pip install diffusers safetensors).") \
            from error
    return diffusers


class DiffusersUNet(nn.Module):
    """A ``UNet2DModel`` behind diffsweep's net interface.

    Args:
        unet: the ``diffusers.UNet2DModel``; a submodule, so its weights are ``unet.*``.
        num_classes: real classes of a class-conditional UNet (``class_embed_type=None`` with
            ``num_class_embeds``), else None.
        null_label: the label of the unconditional branch (label dropout, CFG): ``num_classes``
            for nets trained by diffsweep (one extra embedding row), None when the UNet has none.

    ``forward(x_in (B, C, H, W), c_noise (B,), class_labels (B,) | None) -> (B, C_out, H, W)``:
    ``unet(x_in, timestep=c_noise, class_labels).sample``. Without labels a class-conditional net
    is given its null label.
    """

    def __init__(self, unet: nn.Module, num_classes: int | None = None,
                 null_label: int | None = None) -> None:
        super().__init__()
        config = unet.config
        if config.class_embed_type is not None:
            raise ValueError(f"UNet2DModel class_embed_type={config.class_embed_type!r} is not "
                             f"supported (it embeds labels as timesteps or vectors); allowed: null "
                             f"with num_class_embeds (a learned label embedding).")
        embeds = config.num_class_embeds
        if (num_classes is None) != (embeds is None):
            raise ValueError(f"num_classes={num_classes} does not fit the UNet's "
                             f"num_class_embeds={embeds}; pass num_classes for a class-conditional "
                             f"UNet only.")
        if num_classes is not None:
            rows = num_classes + (0 if null_label is None else 1)
            if rows != embeds or (null_label is not None and null_label != num_classes):
                raise ValueError(f"num_classes={num_classes}, null_label={null_label} need "
                                 f"num_class_embeds={rows}, but the UNet has {embeds}; diffsweep's "
                                 f"convention is num_class_embeds = num_classes + 1 with null "
                                 f"label num_classes.")
        self.unet = unet
        self.num_classes = num_classes
        self.null_label = null_label
        self.in_channels = int(config.in_channels)
        self._learned_time = config.time_embedding_type == "learned"

    def _labels(self, class_labels: Tensor | None, x: Tensor) -> Tensor | None:
        if self.num_classes is None:
            return class_labels
        if class_labels is None:
            if self.null_label is None:
                raise ValueError(f"This UNet has no null label (num_class_embeds="
                                 f"{self.num_classes}): pass class_labels in "
                                 f"0..{self.num_classes - 1};"
                                 f" unconditional sampling and classifier-free guidance need a net "
                                 f"trained with label dropout (diffsweep's model.num_classes).")
            return torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
        if self.null_label is None and bool((class_labels >= self.num_classes).any()):
            raise ValueError(f"class label {int(class_labels.max())} given to a UNet with "
                             f"{self.num_classes} classes and no null label (labels 0.."
                             f"{self.num_classes - 1}).")
        return class_labels

    def _timestep(self, c_noise: Tensor) -> Tensor:
        if not self._learned_time:
            return c_noise
        if not bool((c_noise == c_noise.round()).all()):
            raise ValueError("This UNet has a learned (table) time embedding that takes integer "
                             "timesteps, but the sampler asked for fractional ones; use a discrete "
                             "spacing (sampler.spacing=leading|trailing|linspace).")
        return c_noise.round().long()

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        labels = self._labels(class_labels, x)
        return self.unet(x, self._timestep(c_noise), class_labels=labels, return_dict=False)[0]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, null_label={self.null_label}"


def block_types(resolution: int, num_levels: int,
                attention_resolutions: Sequence[int]) -> tuple[list[str], list[str]]:
    """Down and up block types: attention blocks at the levels whose feature-map size is in
    ``attention_resolutions`` (level i has size ``resolution / 2**i``)."""
    sizes = [resolution // 2**level for level in range(num_levels)]
    down = [ATTENTION_BLOCKS[0] if size in attention_resolutions else PLAIN_BLOCKS[0]
            for size in sizes]
    up = [ATTENTION_BLOCKS[1] if size in attention_resolutions else PLAIN_BLOCKS[1]
          for size in reversed(sizes)]
    return down, up


def _check_architecture(resolution: int, block_out_channels: Sequence[int], norm_num_groups: int,
                        attention_head_dim: int | None, down: Sequence[str],
                        up: Sequence[str]) -> None:
    factor = 2 ** (len(block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"model.resolution={resolution} is not divisible by {factor}, the UNet's "
                         f"total down-sampling for {len(block_out_channels)} levels; choose a "
                         f"multiple of {factor} (data.resolution=...) or fewer "
                         f"model.block_out_channels.")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"model.norm_num_groups={norm_num_groups} must divide every "
                         f"model.block_out_channels entry; {bad} are not multiples.")
    if len(down) != len(block_out_channels) or len(up) != len(block_out_channels):
        raise ValueError(f"model.down_block_types and model.up_block_types need one entry per "
                         f"model.block_out_channels level ({len(block_out_channels)}), got "
                         f"{len(down)} and {len(up)}.")
    if attention_head_dim is not None:
        bad = [c for c in block_out_channels if c % attention_head_dim]
        if bad:
            raise ValueError(f"model.attention_head_dim={attention_head_dim} must divide the "
                             f"channels of attention levels; {bad} are not multiples (null: one "
                             f"head per layer).")


def diffusers_unet(in_channels: int = 1, resolution: int = 16, out_channels: int | None = None,
                   block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                   attention_resolutions: Sequence[int] = (8,),
                   down_block_types: Sequence[str] | None = None,
                   up_block_types: Sequence[str] | None = None,
                   attention_head_dim: int | None = None, norm_num_groups: int = 8,
                   norm_eps: float = 1e-6, dropout: float = 0.0, flip_sin_to_cos: bool = True,
                   freq_shift: int = 0, num_classes: int | None = None,
                   pretrained: str | None = None) -> DiffusersUNet:
    """A trainable ``UNet2DModel`` net (``configs/model/diffusers_unet.yaml``).

    Args mirror ``UNet2DModel``'s (``resolution`` is its ``sample_size``); ``down_block_types`` /
    ``up_block_types`` default to ``DownBlock2D``/``AttnDownBlock2D`` (and the up versions) per
    level from ``attention_resolutions``. ``attention_head_dim=None``: single-head attention
    (head dim = channels). ``num_classes``: class-conditional with a null label
    (``num_class_embeds = num_classes + 1``).

    ``pretrained``: a diffusers pipeline folder (its ``unet/``) or a UNet2DModel folder to
    fine-tune; its config and weights replace every architecture argument (``in_channels`` must
    match the data; a different ``resolution`` only logs a warning, the UNet is convolutional).
    Weights are read without executing code (safetensors, or ``weights_only`` torch.load).
    """
    if pretrained is not None:
        return _pretrained_net(pretrained, in_channels, resolution, num_classes)
    diffusers = require_diffusers()
    levels = len(block_out_channels)
    default_down, default_up = block_types(resolution, levels, attention_resolutions)
    down = list(down_block_types) if down_block_types is not None else default_down
    up = list(up_block_types) if up_block_types is not None else default_up
    _check_architecture(resolution, block_out_channels, norm_num_groups, attention_head_dim,
                        down, up)
    unet = diffusers.UNet2DModel(
        sample_size=resolution, in_channels=in_channels,
        out_channels=out_channels or in_channels, time_embedding_type="positional",
        flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, down_block_types=tuple(down),
        up_block_types=tuple(up), block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, dropout=dropout, act_fn="silu",
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        norm_eps=norm_eps, class_embed_type=None,
        num_class_embeds=None if num_classes is None else num_classes + 1)
    return DiffusersUNet(unet, num_classes, None if num_classes is None else num_classes)


def _pretrained_net(folder: str | Path, in_channels: int, resolution: int,
                    num_classes: int | None) -> DiffusersUNet:
    from diffsweep.diffusers_bridge import load_net

    net = load_net(folder)
    if net.in_channels != in_channels:
        raise ValueError(f"model.pretrained={folder} has in_channels={net.in_channels} but the "
                         f"data has {in_channels} channels (data.channels); fine-tune it on data "
                         f"with {net.in_channels} channels.")
    if num_classes is not None and num_classes != net.num_classes:
        raise ValueError(f"model.num_classes={num_classes} but model.pretrained={folder} has "
                         f"num_classes={net.num_classes}; leave model.num_classes null (it is "
                         f"read from the folder).")
    sample_size = net.unet.config.sample_size
    if sample_size is not None and sample_size != resolution:
        log.warning("model.pretrained=%s was trained at sample_size=%s, fine-tuning at %s.",
                    folder, sample_size, resolution)
    return net


__all__ = ["DiffusersUNet", "block_types", "diffusers_unet", "require_diffusers"]
