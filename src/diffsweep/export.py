"""Export a trained model as a diffusers pipeline folder.

``python -m diffsweep.export ckpt_path=<ckpt> out=<folder> [weights=ema|raw]
[pipeline=ddim|ddpm|flow] [overwrite=false]`` writes::

    <out>/model_index.json                       DDIMPipeline (or DDPMPipeline), written last
    <out>/unet/config.json                       UNet2DModel config
    <out>/unet/diffusion_pytorch_model.safetensors   EMA weights by default
    <out>/unet/diffsweep.json                    null label, provenance (diffusers ignores it)
    <out>/scheduler/scheduler_config.json        DDIMScheduler / DDPMScheduler /
                                                 FlowMatchEulerDiscreteScheduler config

so that ``DiffusionPipeline.from_pretrained(out)`` samples what diffsweep samples: the same DDIM
trajectory (flow: the same Euler trajectory) from the same noise, up to float rounding. A folder
without ``model_index.json`` is an unfinished export.

Settings are checked before the checkpoint is read, each refusal one line naming the key, the
value and what is allowed: ``weights`` ema|raw, ``pipeline`` ddim|ddpm|flow, ``overwrite`` a
boolean (true/false, 1/0, yes/no in any case; ``overwrite=banana`` is refused, not true), ``out``
a new or empty folder, or with ``overwrite=true`` one holding an earlier export and nothing else
(:data:`EXPORT_ENTRIES`), whose files are replaced.

Nets:

- ``model=diffusers_unet`` (:class:`~diffsweep.nets.diffusers_unet.DiffusersUNet`) is a
  ``UNet2DModel`` already and exports as is;
- ``nets/unet.py``'s :class:`~diffsweep.nets.unet.UNet` has an exact ``UNet2DModel``
  equivalent (:func:`unet2d_config`): ``DownBlock2D``/``AttnDownBlock2D`` per level by attention
  resolution, single-head attention (``attention_head_dim=None``, scale ``C^-1/2``), positional
  time embedding with ``flip_sin_to_cos=False, freq_shift=0`` ([sin, cos], frequencies
  ``10000^(-i/half)``), a Linear-SiLU-Linear embedding MLP of ``4 * base_channels``, ResNet blocks
  without output scaling (``output_scale_factor=1``), stride-2 conv down- and nearest + conv
  up-sampling, ``norm_eps=1e-6``, class embedding with ``num_classes + 1`` rows. The one thing
  UNet2DModel cannot vary is the GroupNorm group count: it uses one ``norm_num_groups`` for every
  layer, while ours caps groups at ``channels // 4`` per layer, so a net whose layers end up with
  different group counts (``unet_small``: 16 and 32) is refused with the layers named; train
  with ``model=diffusers_unet`` to export it.

Schedules: discrete VP schedules export as their named ``beta_schedule`` (or ``trained_betas``),
checked bit for bit against the scheduler diffusers rebuilds. ``vp_continuous`` exports as the
``trained_betas`` table of ``alpha(t)`` at ``t = n / (N - 1)``, where its net is told exactly
``c_noise = n``: the same model on diffusers' integer timesteps (betas rounded to float32; at
``t = 0``, where sigma = 0 and diffusers' DDIM would divide 0 by 0, ``beta_0 = 2**-24``).
VE and EDM schedules are refused: diffusers has no pipeline that feeds a ``UNet2DModel`` their
``c_in`` scaling and ``log(sigma) / 4`` noise conditioning.
Prediction types: ``epsilon``, ``sample``, ``v_prediction`` (diffusers' names) on VP schedules.

Flow matching (``scheduler=flow|flow_sd3|flow_flux``, ``prediction_type=velocity``) exports with a
``FlowMatchEulerDiscreteScheduler`` config (``num_train_timesteps``, ``shift``, or the dynamic
shift's ``base_shift``/``max_shift``/``base_image_seq_len``/``max_image_seq_len``/
``time_shift_type``): its step ``x + (sigma_next - sigma) * unet(x, t).sample`` is our Euler (=
DDIM) step with the net predicting ``eps - x0``, told ``t = 1000 s`` and fed ``x_t``. diffusers
has no unconditional ``UNet2DModel`` flow pipeline; ``model_index.json`` names
``DDPMPipeline`` with the flow scheduler, whose loop (``randn`` -> ``set_timesteps(n)`` ->
``step(unet(x, t).sample, t, x)`` for each ``t`` -> ``x / 2 + 0.5`` clamped) is exactly the flow
Euler loop, so ``DiffusionPipeline.from_pretrained(out)(num_inference_steps=n)`` samples it
(a static shift; DDPMPipeline cannot pass ``mu``, so a dynamically shifted model is sampled with
the loop and ``set_timesteps(n, mu=...)``, ``mu`` being written to ``unet/diffsweep.json``;
docs/FLOW.md has the loop). ``pipeline=ddim`` (the default) or ``pipeline=flow`` selects this
for a flow schedule (DDIM with eta = 0 is that Euler step); ``pipeline=ddpm`` is refused (the
flow scheduler's ``stochastic_sampling`` re-noises fully, not DDPM's posterior), and so are the
prediction types ``epsilon``, ``sample`` and ``v_prediction`` on a flow schedule (the flow
scheduler's step takes a velocity). ``t_min``/``t_max``/``density`` are sampling and training
choices diffusers' config has no keys for: the export samples diffusers' grid (s from 1), which
is diffsweep's default range, and ``unet/diffsweep.json`` keeps the full schedule for provenance.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from diffsweep.denoiser import Denoiser
from diffsweep.diffusers_bridge import (
    FLOW_EXPORT_SCHEDULER,
    METADATA_FILE,
    VP_PREDICTION_TYPES,
    WEIGHT_FILES,
    TrainedBetasVPSchedule,
    flow_mu,
    flow_scheduler_config,
    scheduler_config,
)
from diffsweep.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffsweep.nets.diffusers_unet import DiffusersUNet, block_types, require_diffusers
from diffsweep.nets.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample
from diffsweep.schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    FlowMatchingSchedule,
    NoiseSchedule,
)

log = logging.getLogger(__name__)

PathLike = str | Path

#: ``pipeline=`` choice -> (pipeline class, scheduler class). ``flow``: DDPMPipeline's loop with the
#: flow scheduler is the flow Euler loop (module docstring); ``ddim`` means it on a flow schedule.
PIPELINES = {"ddim": ("DDIMPipeline", "DDIMScheduler"), "ddpm": ("DDPMPipeline", "DDPMScheduler"),
             "flow": ("DDPMPipeline", FLOW_EXPORT_SCHEDULER)}
#: The pipelines each family exports with.
VP_PIPELINES, FLOW_PIPELINES = ("ddim", "ddpm"), ("ddim", "flow")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: ``python -m diffsweep.export`` keys and their defaults (None: required).
CLI_KEYS: dict[str, Any] = {"ckpt_path": None, "out": None, "weights": "ema", "pipeline": "ddim",
                            "overwrite": False}
#: ``weights=`` choices: the EMA or the raw (trained) weights of a checkpoint.
WEIGHTS = ("ema", "raw")
#: What a boolean setting such as ``overwrite`` accepts (besides a bool), case-insensitively: the
#: words Hydra-style ``key=value`` overrides give.
FLAG_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
#: The entries of an export folder (:func:`export_pipeline`): ``overwrite=true`` replaces a folder
#: holding these only, never one with other files.
EXPORT_ENTRIES = ("model_index.json", "unet", "scheduler")


class ExportError(ValueError):
    """The model has no exact diffusers equivalent; the message says why and what to do."""


# --------------------------------------------------------------------------- nets/unet.py


def _levels(net: UNet) -> list[dict[str, Any]]:
    """Per level of the down path: output channels, residual blocks, whether they attend."""
    levels: list[dict[str, Any]] = [{"channels": None, "blocks": 0, "attention": []}]
    for block in net.down:
        if isinstance(block[0], Downsample):
            levels.append({"channels": None, "blocks": 0, "attention": []})
            continue
        level = levels[-1]
        level["channels"] = block[0].conv1.out_channels
        level["blocks"] += 1
        level["attention"].append(len(block) > 1)
    return levels


def unet2d_config(net: UNet) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments that compute exactly what ``net`` computes.

    Raises :class:`ExportError` naming the layers when the GroupNorm group counts differ between
    layers (UNet2DModel has one ``norm_num_groups``) or the dropout differs between blocks.
    """
    norms = {name: module for name, module in net.named_modules()
             if isinstance(module, nn.GroupNorm)}
    groups = {module.num_groups for module in norms.values()}
    if len(groups) != 1:
        by_groups: dict[int, list[str]] = {}
        for name, module in norms.items():
            by_groups.setdefault(module.num_groups, []).append(f"{name}({module.num_channels})")
        detail = "; ".join(f"{g} groups: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for g, names in sorted(by_groups.items()))
        base = net.base_channels
        fitting = max(g for g in range(1, max(1, base // 4) + 1) if base % g == 0)
        raise ExportError(
            f"No exact UNet2DModel equivalent: this UNet's GroupNorms use {sorted(groups)} groups "
            f"(nets/unet.py caps groups at channels // 4 per layer; {detail}), but UNet2DModel "
            f"uses one norm_num_groups for every layer. Train with model=diffusers_unet, or with "
            f"model.num_groups={fitting} (a divisor of base_channels={base} and <= "
            f"base_channels // 4: one count everywhere), to export.")
    eps = {module.eps for module in norms.values()}
    dropouts = {module.dropout.p for module in net.modules() if isinstance(module, ResBlock)}
    if len(eps) != 1 or len(dropouts) != 1:
        raise ExportError(f"No exact UNet2DModel equivalent: GroupNorm eps {sorted(eps)} / "
                          f"dropout {sorted(dropouts)} differ between layers.")
    levels = _levels(net)
    counts = {level["blocks"] for level in levels}
    mixed = [i for i, level in enumerate(levels) if len(set(level["attention"])) > 1]
    if len(counts) != 1 or mixed:
        raise ExportError("No exact UNet2DModel equivalent: levels have different numbers of "
                          "residual blocks or attention on only some blocks of a level.")
    attention_sizes = [net.resolution // 2**i for i, level in enumerate(levels)
                       if level["attention"][0]]
    down, up = block_types(net.resolution, len(levels), attention_sizes)
    return dict(
        sample_size=net.resolution, in_channels=net.in_channels,
        out_channels=net.conv_out.out_channels, center_input_sample=False,
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=0,
        down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2D",
        block_out_channels=tuple(level["channels"] for level in levels),
        layers_per_block=counts.pop(), mid_block_scale_factor=1, downsample_padding=1,
        downsample_type="conv", upsample_type="conv", dropout=dropouts.pop(), act_fn="silu",
        attention_head_dim=None, norm_num_groups=groups.pop(), norm_eps=eps.pop(),
        resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
        num_class_embeds=None if net.num_classes is None else net.num_classes + 1)


def _copy_resblock(state: dict[str, Tensor], ours: ResBlock, prefix: str) -> None:
    for our_name, their_name in (("norm1", "norm1"), ("conv1", "conv1"),
                                 ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
                                 ("conv2", "conv2"), ("skip", "conv_shortcut")):
        module = getattr(ours, our_name)
        if isinstance(module, nn.Identity):
            continue
        state[f"{prefix}.{their_name}.weight"] = module.weight
        state[f"{prefix}.{their_name}.bias"] = module.bias


def _copy_attention(state: dict[str, Tensor], ours: AttentionBlock, prefix: str) -> None:
    channels = ours.proj.out_channels
    state[f"{prefix}.group_norm.weight"] = ours.norm.weight
    state[f"{prefix}.group_norm.bias"] = ours.norm.bias
    weight, bias = ours.qkv.weight[:, :, 0, 0], ours.qkv.bias
    for index, name in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(index * channels, (index + 1) * channels)
        state[f"{prefix}.{name}.weight"] = weight[rows]
        state[f"{prefix}.{name}.bias"] = bias[rows]
    state[f"{prefix}.to_out.0.weight"] = ours.proj.weight[:, :, 0, 0]
    state[f"{prefix}.to_out.0.bias"] = ours.proj.bias


def _copy_block(state: dict[str, Tensor], block: nn.ModuleList, prefix: str, index: int) -> None:
    _copy_resblock(state, block[0], f"{prefix}.resnets.{index}")
    if len(block) > 1:
        _copy_attention(state, block[1], f"{prefix}.attentions.{index}")


def unet2d_state_dict(net: UNet) -> dict[str, Tensor]:
    """``net``'s weights under UNet2DModel's parameter names (see :func:`unet2d_config`)."""
    state: dict[str, Tensor] = {
        "conv_in.weight": net.conv_in.weight, "conv_in.bias": net.conv_in.bias,
        "time_embedding.linear_1.weight": net.embed[0].weight,
        "time_embedding.linear_1.bias": net.embed[0].bias,
        "time_embedding.linear_2.weight": net.embed[2].weight,
        "time_embedding.linear_2.bias": net.embed[2].bias,
        "conv_norm_out.weight": net.norm_out.weight, "conv_norm_out.bias": net.norm_out.bias,
        "conv_out.weight": net.conv_out.weight, "conv_out.bias": net.conv_out.bias,
    }
    if net.class_embed is not None:
        state["class_embedding.weight"] = net.class_embed.weight
    _copy_levels(state, net.down, "down_blocks", Downsample, "downsamplers")
    _copy_resblock(state, net.mid[0], "mid_block.resnets.0")
    _copy_attention(state, net.mid[1], "mid_block.attentions.0")
    _copy_resblock(state, net.mid[2], "mid_block.resnets.1")
    _copy_levels(state, net.up, "up_blocks", Upsample, "upsamplers")
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _copy_levels(state: dict[str, Tensor], blocks: nn.ModuleList, prefix: str,
                 resample: type, resample_name: str) -> None:
    """One path of the UNet (down or up): residual blocks numbered within each level, the level
    ending at its resampling block."""
    level, index = 0, 0
    for block in blocks:
        if isinstance(block[0], resample):
            state[f"{prefix}.{level}.{resample_name}.0.conv.weight"] = block[0].conv.weight
            state[f"{prefix}.{level}.{resample_name}.0.conv.bias"] = block[0].conv.bias
            level, index = level + 1, 0
            continue
        _copy_block(state, block, f"{prefix}.{level}", index)
        index += 1


def convert_unet(net: UNet) -> DiffusersUNet:
    """The exact ``UNet2DModel`` equivalent of ``net``, behind diffsweep's net interface."""
    diffusers = require_diffusers()
    unet = diffusers.UNet2DModel(**unet2d_config(net))
    state = unet2d_state_dict(net)
    missing = sorted(set(unet.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(unet.state_dict()))
    if missing or unexpected:  # a layout this converter does not know: never export half a net
        raise ExportError(f"UNet conversion incomplete: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}.")
    unet.load_state_dict(state, strict=True)
    unet.to(next(net.parameters()).device).eval()
    return DiffusersUNet(unet, net.num_classes, net.num_classes)


def diffusers_net(net: nn.Module) -> DiffusersUNet:
    """``net`` as a :class:`DiffusersUNet` (as is, or converted from nets/unet.py's UNet)."""
    net = getattr(net, "_orig_mod", net)
    if isinstance(net, DiffusersUNet):
        return net
    if isinstance(net, UNet):
        return convert_unet(net)
    raise ExportError(f"Cannot export a {type(net).__name__} net; exportable nets: "
                      f"diffsweep.nets.unet.UNet (model=unet_*) and DiffusersUNet "
                      f"(model=diffusers_unet).")


# --------------------------------------------------------------------------- schedules


#: beta_0 of an exported continuous VP table: t = 0 has sigma = 0 (beta_0 = 0), which diffusers'
#: DDIM cannot hold (its variance at the last step would be 0 / 0); 2**-24 is the smallest beta
#: whose 1 - beta differs from 1 in float32 (sigma~ = 2.4e-4 there).
MIN_BETA = 2.0**-24


def continuous_vp_betas(schedule: ContinuousVPSchedule) -> list[float]:
    """The beta table of ``schedule`` at ``t_n = n / (N - 1)``, where its net is told
    ``c_noise = n``: ``beta_n = 1 - alpha(t_n)^2 / alpha(t_{n-1})^2`` and ``beta_0 = 2**-24``
    (:data:`MIN_BETA`; exactly ``alpha(0) = 1``, which diffusers cannot hold)."""
    steps = int(round(schedule.c_noise_scale)) + 1
    t = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    alphas_cumprod = schedule.alpha(t) ** 2
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    first = max(float(1 - alphas_cumprod[0]), MIN_BETA)
    return [first] + betas.tolist()


def export_scheduler_config(schedule: NoiseSchedule, prediction_type: str, class_name: str,
                            beta_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The diffusers scheduler config of ``schedule`` (module docstring); ExportError for VE/EDM,
    the ``velocity`` prediction on a VP schedule and any other on a flow schedule.

    A :class:`FlowMatchingSchedule` exports as :data:`FLOW_EXPORT_SCHEDULER` (``class_name``
    must name it) with ``prediction_type='velocity'``.
    """
    if isinstance(schedule, FlowMatchingSchedule):
        if prediction_type != "velocity":
            raise ExportError(f"Cannot export prediction_type={prediction_type!r} on a "
                              f"FlowMatchingSchedule: {FLOW_EXPORT_SCHEDULER} steps x + "
                              f"(sigma_next - sigma) * model_output, so the net must predict the "
                              f"velocity eps - x0; allowed: velocity.")
        if class_name != FLOW_EXPORT_SCHEDULER:
            raise ExportError(f"Cannot export a FlowMatchingSchedule as a {class_name}; allowed: "
                              f"{FLOW_EXPORT_SCHEDULER}.")
        return flow_scheduler_config(schedule, class_name)
    if prediction_type not in VP_PREDICTION_TYPES:
        raise ExportError(f"Cannot export prediction_type={prediction_type!r}: diffusers' VP "
                          f"schedulers take {', '.join(VP_PREDICTION_TYPES)} (velocity exports "
                          f"with a flow schedule, scheduler=flow|flow_sd3|flow_flux).")
    if isinstance(schedule, DiscreteVPSchedule):
        return scheduler_config(schedule, prediction_type, class_name, beta_range)
    if isinstance(schedule, ContinuousVPSchedule):
        table = TrainedBetasVPSchedule(continuous_vp_betas(schedule))
        return scheduler_config(table, prediction_type, class_name)
    raise ExportError(
        f"Cannot export a {type(schedule).__name__}: diffusers' DDIM/DDPM pipelines feed a "
        f"UNet2DModel x_t and a training index of a VP table, which this schedule is not (VE/EDM "
        f"nets are fed x / sqrt(sigma^2 + sigma_data^2) and log(sigma) / 4; diffusers' EDM "
        f"schedulers parametrise the output differently). Train with a VP schedule "
        f"(scheduler=linear|scaled_linear|cosine|vp_continuous) or a flow schedule "
        f"(scheduler=flow|flow_sd3|flow_flux) to export.")


# --------------------------------------------------------------------------- writing


def parse_flag(key: str, value: Any) -> bool:
    """``value`` of the boolean setting ``key`` as a bool: a bool, 0/1, or one of the words of
    :data:`FLAG_WORDS` (any case); anything else is a one-line ValueError naming the key, the
    value and what is allowed (``overwrite=banana`` is not true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[value.strip().lower()]
    raise ValueError(f"{key}={value!r} is not allowed; allowed: true or false (also 1/0, yes/no, "
                     f"any case).")


def check_choice_setting(key: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else a one-line ValueError naming the key."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}.")
    return value


def _foreign_entries(out: Path) -> list[str]:
    """The entries of ``out`` that no export holds (:data:`EXPORT_ENTRIES`; unfinished writes'
    hidden ``.partial`` files aside)."""
    return sorted(entry.name for entry in out.iterdir()
                  if entry.name not in EXPORT_ENTRIES
                  and not (entry.name.startswith(".") and entry.name.endswith(".partial")))


def check_out_folder(out: PathLike, overwrite: bool) -> None:
    """Refuse (one line, before any work) an ``out`` that an export may not be written to: a file
    (or a symlink to one), a non-empty folder without ``overwrite``, or with ``overwrite`` a folder
    holding anything but an earlier export (:data:`EXPORT_ENTRIES`): overwrite replaces an
    export, never other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file; pass a folder (new, empty, or an earlier "
                              f"export with overwrite=true).")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"out={out} is not empty; pass overwrite=true to replace the "
                              f"export there, or another folder.")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise FileExistsError(f"out={out} holds files that are not part of an export ({shown}); "
                              f"overwrite=true replaces only an earlier export "
                              f"({', '.join(EXPORT_ENTRIES)}); pass an empty or new folder.")


def _prepare_folder(out: Path, overwrite: bool) -> None:
    check_out_folder(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        (out / "model_index.json").unlink(missing_ok=True)  # unfinished until written again
        for pattern in WEIGHT_FILES:
            (out / "unet" / pattern.format(variant="")).unlink(missing_ok=True)


def export_pipeline(denoiser: Denoiser, image_shape: Sequence[int], out: PathLike, *,
                    pipeline: str = "ddim", beta_range: tuple[float, float] | None = None,
                    metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``denoiser`` (net + schedule + prediction type) as a diffusers pipeline folder.

    Args:
        denoiser: its net must be exportable (:func:`diffusers_net`), its schedule VP
            (:func:`export_scheduler_config`); nothing is written otherwise.
        image_shape: ``(C, H, W)``: the UNet's ``in_channels`` and ``sample_size``.
        out: the folder (created; must be empty unless ``overwrite``).
        pipeline: ``ddim`` (DDIMPipeline + DDIMScheduler) or ``ddpm`` (DDPMPipeline +
            DDPMScheduler, ``fixed_small`` variance) for a VP schedule; ``ddim`` or ``flow``
            (DDPMPipeline + FlowMatchEulerDiscreteScheduler) for a flow schedule.
        beta_range: ``(beta_start, beta_end)`` of a named discrete schedule, when known.
        metadata: extra provenance for ``unet/diffsweep.json`` (source checkpoint, weights).
        overwrite: replace an earlier export in ``out`` (:func:`check_out_folder`; a bool or
            a word of :func:`parse_flag`, checked first).

    Returns the folder. Files are written atomically, ``model_index.json`` last.
    """
    overwrite = parse_flag("overwrite", overwrite)
    check_out_folder(out, overwrite)
    pipeline = _pipeline_for(denoiser.schedule, pipeline)
    pipeline_class, scheduler_class = PIPELINES[pipeline]
    channels, height, width = (int(size) for size in image_shape)
    scheduler_kwargs = export_scheduler_config(denoiser.schedule, denoiser.prediction_type,
                                               scheduler_class, beta_range)
    net = diffusers_net(denoiser.net)
    diffusers = require_diffusers()
    scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_kwargs)
    unet_config = json.loads(net.unet.to_json_string())
    if unet_config["in_channels"] != channels:
        raise ExportError(f"image_shape has {channels} channels but the UNet takes "
                          f"{unet_config['in_channels']}.")
    unet_config["sample_size"] = height if height == width else [height, width]
    if net.num_classes is not None:
        log.warning("The net is class-conditional: %s passes no class labels, so call the UNet "
                    "with class_labels yourself (null label %s) or sample it with "
                    "diffsweep.diffusers_bridge.load_pretrained.", pipeline_class, net.null_label)
    out = Path(out)
    _prepare_folder(out, overwrite)
    from safetensors.torch import save as safetensors_bytes

    state = {name: tensor.detach().cpu().contiguous()
             for name, tensor in net.unet.state_dict().items()}
    atomic_write_bytes(out / "unet" / WEIGHTS_NAME,
                       safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write_text(out / "unet" / "config.json", json.dumps(unet_config, indent=2) + "\n")
    atomic_write_json(out / "unet" / METADATA_FILE, {
        "format": 1, "num_classes": net.num_classes, "null_label": net.null_label,
        "schedule": repr(denoiser.schedule), "prediction_type": denoiser.prediction_type,
        **_flow_metadata(denoiser.schedule), **dict(metadata or {})})
    atomic_write_text(out / "scheduler" / "scheduler_config.json", scheduler.to_json_string())
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", "UNet2DModel"]}
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")
    log.info("Exported a %s to %s.", pipeline_class, out)
    return out


def _pipeline_for(schedule: NoiseSchedule, pipeline: str) -> str:
    """The :data:`PIPELINES` key ``pipeline`` means for ``schedule``: ``flow`` for ``ddim`` or
    ``flow`` on a flow schedule; ValueError for a choice the schedule's family has no use for."""
    check_choice_setting("pipeline", pipeline, tuple(PIPELINES))
    if isinstance(schedule, FlowMatchingSchedule):
        if pipeline not in FLOW_PIPELINES:
            raise ExportError(f"pipeline={pipeline!r} has no flow-matching equivalent in "
                              f"diffusers ({FLOW_EXPORT_SCHEDULER}'s stochastic_sampling re-noises "
                              f"fully, not DDPM's posterior); allowed for a FlowMatchingSchedule: "
                              f"{', '.join(FLOW_PIPELINES)} (the Euler = DDIM step).")
        return "flow"
    if pipeline not in VP_PIPELINES:
        raise ExportError(f"pipeline={pipeline!r} needs a flow-matching schedule "
                          f"(scheduler=flow|flow_sd3|flow_flux), not a {type(schedule).__name__}; "
                          f"allowed: {', '.join(VP_PIPELINES)}.")
    return pipeline


def _flow_metadata(schedule: NoiseSchedule) -> dict[str, Any]:
    """What diffusers' flow config leaves to the pipeline: ``image_seq_len`` and ``mu`` of a
    dynamically shifted schedule (``set_timesteps(n, mu=mu)``; read back by load_pretrained)."""
    if not isinstance(schedule, FlowMatchingSchedule) or not schedule.use_dynamic_shifting:
        return {}
    log.warning("Dynamic shifting: DDPMPipeline calls set_timesteps without mu; sample the export "
                "with the loop of docs/FLOW.md and set_timesteps(n, mu=%r).", flow_mu(schedule))
    return {"image_seq_len": schedule.image_seq_len, "mu": flow_mu(schedule)}


def _beta_range_from_config(config: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """``(beta_start, beta_end)`` of a stored run config's schedule, if it names them."""
    if not config:
        return None
    schedule = config.get("scheduler") or (
        ((config.get("module") or {}).get("denoiser") or {}).get("schedule"))
    if not schedule or "beta_start" not in schedule or "beta_end" not in schedule:
        return None
    return float(schedule["beta_start"]), float(schedule["beta_end"])


def export_checkpoint(ckpt_path: PathLike, out: PathLike, weights: str = "ema",
                      pipeline: str = "ddim", overwrite: bool = False) -> Path:
    """Export a ``train.py`` checkpoint (``weights``: ``ema`` or ``raw``) with
    :func:`export_pipeline`. Every setting (the checkpoint file, ``weights``, ``pipeline``,
    ``overwrite``, the ``out`` folder) is checked before the checkpoint is read."""
    from diffsweep.checkpoints import load_module

    check_choice_setting("weights", weights, WEIGHTS)
    check_choice_setting("pipeline", pipeline, tuple(PIPELINES))
    overwrite = parse_flag("overwrite", overwrite)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file; pass a checkpoint written "
                                f"by train.py (e.g. <run>/checkpoints/last.ckpt).")
    check_out_folder(out, overwrite)
    module = load_module(ckpt_path, weights)
    config = getattr(module, "config", None)
    return export_pipeline(module.denoiser, module.image_shape, out, pipeline=pipeline,
                           beta_range=_beta_range_from_config(config),
                           metadata={"source": str(Path(ckpt_path).resolve()),
                                     "weights": weights},
                           overwrite=overwrite)


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments -> the :data:`CLI_KEYS` settings (``overwrite`` a bool, paths as
    strings); a one-line ValueError for unknown keys, missing required ones, malformed arguments
    and values outside a setting's choices (``weights``, ``pipeline``, ``overwrite``)."""
    malformed = [arg for arg in argv if "=" not in arg]
    if malformed:
        raise ValueError(f"Arguments must be key=value, got {malformed[0]!r}; keys: "
                         f"{', '.join(CLI_KEYS)}.")
    given = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    unknown = sorted(set(given) - set(CLI_KEYS))
    if unknown:
        raise ValueError(f"Unknown argument {unknown[0]!r}; keys: {', '.join(CLI_KEYS)}.")
    settings = {**CLI_KEYS, **given}
    missing = [key for key, default in CLI_KEYS.items() if default is None and
               settings[key] in (None, "")]
    if missing:
        raise ValueError(f"Missing {missing[0]}=...; usage: python -m diffsweep.export "
                         f"ckpt_path=<ckpt> out=<folder> [weights=ema|raw] "
                         f"[pipeline=ddim|ddpm|flow] [overwrite=false].")
    for key in ("ckpt_path", "out"):
        if isinstance(settings[key], (dict, list)):
            raise ValueError(f"{key}={settings[key]!r} is not allowed; allowed: a path.")
        settings[key] = str(settings[key])
    check_choice_setting("weights", settings["weights"], WEIGHTS)
    check_choice_setting("pipeline", settings["pipeline"], tuple(PIPELINES))
    settings["overwrite"] = parse_flag("overwrite", settings["overwrite"])
    return settings


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m diffsweep.export ckpt_path=... out=... [weights=ema|raw] ...``."""
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    return export_checkpoint(settings["ckpt_path"], settings["out"], weights=settings["weights"],
                             pipeline=settings["pipeline"], overwrite=settings["overwrite"])


__all__ = ["EXPORT_ENTRIES", "ExportError", "FLAG_WORDS", "FLOW_PIPELINES", "PIPELINES",
           "VP_PIPELINES", "WEIGHTS", "check_choice_setting", "check_out_folder",
           "continuous_vp_betas", "convert_unet", "diffusers_net", "export_checkpoint",
           "export_pipeline", "export_scheduler_config", "main", "parse_args", "parse_flag",
           "unet2d_config", "unet2d_state_dict"]


if __name__ == "__main__":
    from diffsweep.console import command_line

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with command_line():  # a user error: "error: <message>" on stderr, exit status 1
        print(main())
