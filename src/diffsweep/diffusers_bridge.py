"""Bring your own model: a diffusers ``UNet2DModel`` + scheduler config as a diffsweep denoiser.

:func:`load_pretrained` turns a diffusers folder into a :class:`PretrainedModel` whose
``denoiser`` samples with every diffsweep sampler through :func:`diffsweep.generate.generate`:

- a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``), or
- a ``UNet2DModel`` folder (``config.json`` + weights) with a scheduler config: the ``scheduler``
  argument (a ``scheduler_config.json`` or a folder holding one), else ``scheduler_config.json``
  beside the UNet's config, else ``scheduler/scheduler_config.json`` in the folder.

Two families of scheduler configs define a model here:

- Discrete VP (DDPM tables, :data:`VP_SCHEDULERS`): the schedule is rebuilt as a
  :class:`~diffsweep.schedules.DiscreteVPSchedule` (``beta_schedule``/``beta_start``/``beta_end``/
  ``num_train_timesteps``/``rescale_betas_zero_snr``, or ``trained_betas``) and checked against the
  diffusers scheduler's own ``alphas_cumprod`` (equal bit for bit). ``prediction_type`` (epsilon |
  sample | v_prediction) becomes the denoiser's. Our ``c_noise`` is the training index ``n``
  (fractional between table entries), exactly the timestep diffusers' schedulers pass, and
  ``c_in x~`` is exactly ``x_t``.
- Flow matching (:data:`FLOW_SCHEDULERS`, ``FlowMatchEulerDiscreteScheduler``): a
  :class:`~diffsweep.schedules.FlowMatchingSchedule` with ``num_train_timesteps`` and ``shift``, or,
  with ``use_dynamic_shifting``, the resolution-dependent shift of ``base_shift``/``max_shift``/
  ``base_image_seq_len``/``max_image_seq_len``/``time_shift_type`` at ``image_seq_len`` tokens
  (not in the config: diffusers' pipelines compute ``mu`` per image size; pass it, or it is read
  from ``diffsweep.json`` of a diffsweep export). The prediction type is ``velocity``: diffusers'
  step is ``x + (sigma_next - sigma) * model_output``, i.e. the net predicts ``eps - x0``. The UNet
  is told ``c_noise = N s``, diffusers' ``timestep = sigmas * num_train_timesteps``, and fed
  ``c_in x~ = (1 - s) x~ = x_t``, diffusers' sample (both equal to float32 rounding:
  tests/test_diffusers_bridge_flow.py). The grid check: our ``uniform_t`` grid equals
  ``set_timesteps``' sigmas to two float32 ulps; ``sampler.spacing=auto`` is that grid.

The net is :class:`~diffsweep.nets.diffusers_unet.DiffusersUNet` in both families.

Sampler-side keys of a VP scheduler config do not define the model and are not used by the
denoiser: ``timestep_spacing`` and ``steps_offset`` become the defaults of
:meth:`PretrainedModel.adapt_sampler`, and so do ``clip_sample`` / ``clip_sample_range`` /
``thresholding`` / ``dynamic_thresholding_ratio`` / ``sample_max_value`` for the ``ddim`` and
``ddpm`` samplers (which apply them as diffusers does); ``set_alpha_to_one`` / ``variance_type``
and the solver options are reported in ``info``. What has no meaning here is refused with a
one-line ValueError naming the key, its value and what is allowed: EDM and VE schedulers, flow
maps and consistency-distilled flow models (:data:`REFUSED_SCHEDULERS`), flow options that change
the model or its grid (:data:`FLOW_REFUSED_OPTIONS`: inverted sigmas, Karras / exponential / beta
flow sigmas, stochastic sampling, ``shift_terminal``), VP configs with ``use_flow_sigmas``, unknown
``beta_schedule``, continuous timesteps, learned-variance outputs, text-conditional UNets.

Loading executes no code: configs are JSON, weights are safetensors or ``.bin`` files read with
``torch.load(weights_only=True)`` (a pickle that would run code is refused). Nor does it read
weights from outside the model folder: every shard a ``*.index.json`` names must resolve
(symlinks followed) inside the folder holding the index (:func:`check_index_entry`; a Hugging
Face hub cache snapshot's links into its repository's ``blobs/`` excepted). The other files read
are at fixed names in the folder (``model_index.json``, ``unet/config.json``,
``scheduler/scheduler_config.json``, ``diffsweep.json``); no JSON value is used as a path.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsweep.denoiser import Denoiser
from diffsweep.files import file_sha256, stable_hash
from diffsweep.grids import sigma_grid
from diffsweep.nets.diffusers_unet import DiffusersUNet, require_diffusers
from diffsweep.samplers import Sampler
from diffsweep.schedules import (
    BETA_SCHEDULES,
    DiscreteVPSchedule,
    FlowMatchingSchedule,
    NoiseSchedule,
)

log = logging.getLogger(__name__)

PathLike = str | Path

#: Schedulers over diffusers' discrete VP tables (betas -> alphas_cumprod over training indices).
VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "SASolverScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)
#: Flow-matching schedulers: ``x_t = (1 - s) x0 + s eps`` with diffusers' shifted ``sigmas`` s, the
#: net predicting the velocity ``eps - x0`` (a :class:`~diffsweep.schedules.FlowMatchingSchedule`).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: The flow scheduler diffsweep exports (its config holds every key of the schedule).
FLOW_EXPORT_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
#: Refused scheduler families, by class-name prefix, with the reason given.
REFUSED_SCHEDULERS = {
    "FlowMatchLCM": "a consistency-distilled (LCM) flow model predicts the endpoint of a "
                    "multi-step consistency sampler, not a probability-flow velocity",
    "FlowMap": "a flow map net is told two times (a jump from s to s'), not a flow-matching "
               "velocity field",
    "EDM": "EDM schedulers (continuous sigma, EDM preconditioning) are not supported yet",
    "ScoreSdeVe": "VE (score SDE) schedulers are not supported yet",
    "KarrasVe": "VE (Karras) schedulers are not supported yet",
}
#: Flow scheduler options with no meaning here: key -> (the one allowed value, why).
FLOW_REFUSED_OPTIONS: dict[str, tuple[Any, str]] = {
    "invert_sigmas": (False, "Mochi's inverted schedule tells the net 1 - s"),
    "use_karras_sigmas": (False, "a sampling grid diffusers builds in s; diffsweep's grids are "
                                 "sampler.spacing (uniform_t is FlowMatchEuler's)"),
    "use_exponential_sigmas": (False, "a sampling grid diffusers builds in s; diffsweep's grids "
                                      "are sampler.spacing (uniform_t is FlowMatchEuler's)"),
    "use_beta_sigmas": (False, "a sampling grid diffusers builds in s; diffsweep's grids are "
                               "sampler.spacing (uniform_t is FlowMatchEuler's)"),
    "stochastic_sampling": (False, "re-noising x0 fully at every step is no diffsweep sampler"),
    "shift_terminal": (None, "LTX-Video's grid stretched to end at shift_terminal has no "
                             "diffsweep spacing"),
}
#: diffusers' name of the flow prediction (DPM-Solver/UniPC configs); diffsweep's is ``velocity``.
FLOW_PREDICTION_TYPES = ("flow_prediction",)
#: Dynamic-shifting keys of a flow config (diffusers' ``calculate_shift`` line and map).
DYNAMIC_SHIFT_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
#: diffusers' prediction types of VP schedulers (diffsweep's ``velocity`` is flow matching's).
VP_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
#: Schedulers whose ``linspace`` grid is fractional (float ``linspace(0, N - 1, n)``, unrounded):
#: diffsweep's ``linspace_frac``; DDIM-type schedulers round it (diffsweep's ``linspace``).
FRACTIONAL_LINSPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                       "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                       "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler")
UNET_CLASS = "UNet2DModel"
#: Weight files of a diffusers model folder, in the order they are looked for.
WEIGHT_FILES = ("diffusion_pytorch_model{variant}.safetensors",
                "diffusion_pytorch_model{variant}.safetensors.index.json",
                "diffusion_pytorch_model{variant}.bin",
                "diffusion_pytorch_model{variant}.bin.index.json")
#: diffsweep's own notes beside an exported UNet (null label, provenance); diffusers ignores it.
METADATA_FILE = "diffsweep.json"


# --------------------------------------------------------------------------- schedule


class TrainedBetasVPSchedule(DiscreteVPSchedule):
    """A :class:`DiscreteVPSchedule` over an explicit beta table (diffusers' ``trained_betas``).

    The table is taken in float32 and ``alphas_cumprod = cumprod(1 - betas)`` computed in float32,
    as diffusers does, then held in float64; ``rescale_betas_zero_snr`` as in the parent.
    """

    def __init__(self, trained_betas: Sequence[float],
                 rescale_betas_zero_snr: bool = False) -> None:
        betas = torch.tensor(list(trained_betas), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"trained_betas must be a list of at least 2 floats, got shape "
                             f"{tuple(betas.shape)}.")
        if not bool(((betas >= 0) & (betas < 1)).all()):
            raise ValueError("trained_betas must lie in [0, 1).")
        self.beta_schedule = "trained_betas"
        self.beta_start = self.beta_end = None  # not a linear table: the betas are given
        self.trained_betas = [float(beta) for beta in trained_betas]
        self._set_betas(betas, rescale_betas_zero_snr)

    def __repr__(self) -> str:
        return (f"TrainedBetasVPSchedule(N={self.num_train_timesteps}, "
                f"zero_snr={self.rescale_betas_zero_snr})")


def _refusal(class_name: str) -> str | None:
    for prefix, reason in REFUSED_SCHEDULERS.items():
        if class_name.startswith(prefix):
            return reason
    if class_name not in VP_SCHEDULERS + FLOW_SCHEDULERS:
        return "it has no discrete VP (DDPM-table) or flow-matching meaning"
    return None


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config names a flow-matching scheduler (:data:`FLOW_SCHEDULERS`)."""
    return config.get("_class_name", "DDPMScheduler") in FLOW_SCHEDULERS


def _json_value(value: Any) -> str:
    """A config value as the JSON it came from (``true``, ``null``, ``3.0``, ``'name'``)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value)


def check_scheduler_config(config: Mapping[str, Any]) -> None:
    """Raise a one-line ValueError for anything neither a discrete VP schedule nor a flow-matching
    schedule can express (module docstring)."""
    class_name = config.get("_class_name", "DDPMScheduler")
    reason = _refusal(class_name)
    if reason:
        raise ValueError(f"scheduler _class_name={class_name!r} is refused: {reason}; allowed: "
                         f"{', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}.")
    if class_name in FLOW_SCHEDULERS:
        check_flow_scheduler_config(config)
        return
    if config.get("use_flow_sigmas"):
        raise ValueError(f"scheduler use_flow_sigmas=true is refused: flow matching is read from "
                         f"a FlowMatchEulerDiscreteScheduler config, not from {class_name}'s "
                         f"flow_shift and grid (import the model with that config, shift = "
                         f"flow_shift); allowed: false.")
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if trained is None and schedule not in BETA_SCHEDULES:
        raise ValueError(f"scheduler beta_schedule={schedule!r} is refused; allowed: "
                         f"{', '.join(BETA_SCHEDULES)} (or a trained_betas list).")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTION_TYPES:
        hint = (" (a flow model: use a FlowMatchEulerDiscreteScheduler config)"
                if prediction in FLOW_PREDICTION_TYPES else "")
        raise ValueError(f"scheduler prediction_type={prediction!r} is refused{hint}; allowed: "
                         f"{', '.join(VP_PREDICTION_TYPES)}.")
    timestep_type = config.get("timestep_type", "discrete")
    if timestep_type != "discrete":
        raise ValueError(f"scheduler timestep_type={timestep_type!r} is refused: the UNet is "
                         f"told continuous noise levels, not training indices; allowed: discrete.")
    variance = config.get("variance_type")
    if variance in ("learned", "learned_range"):
        raise ValueError(f"scheduler variance_type={variance!r} is refused: a learned-variance "
                         f"net outputs extra channels diffsweep does not use; allowed: "
                         f"fixed_small, fixed_large (or none).")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"scheduler timestep_spacing={spacing!r} is refused; allowed: "
                         f"{', '.join(TIMESTEP_SPACINGS)}.")
    steps = config.get("num_train_timesteps", 1000)
    if trained is not None and len(trained) != steps:
        raise ValueError(f"scheduler trained_betas has {len(trained)} entries but "
                         f"num_train_timesteps={steps}; they must be equal.")


def check_flow_scheduler_config(config: Mapping[str, Any]) -> None:
    """Raise a one-line ValueError for a flow scheduler config diffsweep cannot express: the
    options of :data:`FLOW_REFUSED_OPTIONS`, a prediction type other than the velocity, a
    non-positive shift, dynamic shifting without its line."""
    class_name = config.get("_class_name")
    for key, (allowed, why) in FLOW_REFUSED_OPTIONS.items():
        value = config.get(key, allowed)
        if value != allowed:
            raise ValueError(f"scheduler {key}={_json_value(value)} is refused: {why}; allowed: "
                             f"{_json_value(allowed)}.")
    prediction = config.get("prediction_type", FLOW_PREDICTION_TYPES[0])
    if prediction not in FLOW_PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={prediction!r} is refused: {class_name} steps "
                         f"x + (sigma_next - sigma) * model_output, so its net predicts the "
                         f"velocity eps - x0; allowed: {', '.join(FLOW_PREDICTION_TYPES)} (or no "
                         f"prediction_type key).")
    shift = config.get("shift", 1.0)
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise ValueError(f"scheduler shift={_json_value(shift)} is refused; allowed: a number > 0 "
                         f"(1.0 = no shift, SD3: 3.0).")
    if config.get("use_dynamic_shifting"):
        for key in DYNAMIC_SHIFT_KEYS:
            if key in config and config[key] is None:
                raise ValueError(f"scheduler {key}=null is refused with use_dynamic_shifting=true: "
                                 f"the shift is a line through (base_image_seq_len, base_shift) "
                                 f"and (max_image_seq_len, max_shift); allowed: a number.")


def flow_schedule_from_config(config: Mapping[str, Any],
                              image_seq_len: int | None = None) -> FlowMatchingSchedule:
    """The :class:`FlowMatchingSchedule` of a flow scheduler config (see
    :func:`check_flow_scheduler_config`); ``image_seq_len`` (latent tokens per image) is needed
    with ``use_dynamic_shifting`` and ignored otherwise. diffusers ignores ``shift`` when shifting
    dynamically (Flux configs hold ``shift: 3.0`` beside it), and so does this."""
    check_flow_scheduler_config(config)
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if not config.get("use_dynamic_shifting"):
        return FlowMatchingSchedule(num_train_timesteps=num_train_timesteps,
                                    shift=float(config.get("shift", 1.0)))
    if image_seq_len is None:
        raise ValueError("scheduler use_dynamic_shifting=true needs image_seq_len (diffusers' "
                         "pipelines pass mu = calculate_shift(image_seq_len) to set_timesteps; the "
                         "config does not hold it): pass image_seq_len=<latent tokens per image> "
                         "to load_pretrained; allowed: a positive integer.")
    defaults = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096}
    line = {key: config.get(key, default) for key, default in defaults.items()}
    return FlowMatchingSchedule(num_train_timesteps=num_train_timesteps,
                                use_dynamic_shifting=True, image_seq_len=image_seq_len,
                                base_image_seq_len=int(line["base_image_seq_len"]),
                                max_image_seq_len=int(line["max_image_seq_len"]),
                                base_shift=float(line["base_shift"]),
                                max_shift=float(line["max_shift"]),
                                time_shift_type=config.get("time_shift_type", "exponential"))


def flow_mu(schedule: FlowMatchingSchedule) -> float | None:
    """diffusers' ``mu`` for ``set_timesteps(..., mu=mu)`` of a dynamically shifted schedule
    (``log k`` for the exponential map, ``k`` for the linear one); None for a static shift."""
    if not schedule.use_dynamic_shifting:
        return None
    return math.log(schedule.shift) if schedule.time_shift_type == "exponential" else schedule.shift


#: Step counts at which a flow config's grid is compared with diffusers' ``set_timesteps``.
FLOW_CHECK_STEPS = (1, 2, 10, 50)
#: Two float32 ulps of diffusers' sigmas (just below 1) and timesteps (just below N), per unit of N.
FLOW_SIGMA_ATOL = 1.2e-7
FLOW_TIMESTEP_ATOL_PER_N = 1.3e-7


def flow_grids_equal(schedule: FlowMatchingSchedule, config: Mapping[str, Any],
                     steps: Sequence[int] = FLOW_CHECK_STEPS) -> bool:
    """Whether our ``uniform_t`` grid equals diffusers' ``FlowMatchEulerDiscreteScheduler``
    ``set_timesteps`` (same config, ``mu`` from the schedule) in noise levels ``s`` and timesteps
    ``c_noise``, to two float32 ulps (diffusers holds both in float32), for ``steps`` step
    counts."""
    diffusers = require_diffusers()
    keys = {key: value for key, value in config.items() if not key.startswith("_")}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(keys)
    scale = schedule.c_noise_scale
    for num_steps in steps:
        scheduler.set_timesteps(num_steps, mu=flow_mu(schedule))
        sigmas = sigma_grid(schedule, num_steps, "uniform_t")
        levels = (sigmas / (1 + sigmas)).to(torch.float32)
        timesteps = schedule.c_noise(schedule.t_of_sigma(sigmas[:-1])).to(torch.float32)
        theirs_levels = torch.as_tensor(scheduler.sigmas, dtype=torch.float32)
        theirs_timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float32)
        if levels.shape != theirs_levels.shape or timesteps.shape != theirs_timesteps.shape:
            return False
        if float((levels - theirs_levels).abs().max()) > FLOW_SIGMA_ATOL:
            return False
        if float((timesteps - theirs_timesteps).abs().max()) > FLOW_TIMESTEP_ATOL_PER_N * scale:
            return False
    return True


def flow_scheduler_config(schedule: FlowMatchingSchedule,
                          class_name: str = FLOW_EXPORT_SCHEDULER) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config that reproduces ``schedule`` (the inverse of
    :func:`flow_schedule_from_config`): ``num_train_timesteps``, ``shift`` or the dynamic shift's
    line and map, and every refused option at its allowed value. ``t_min``/``t_max`` (diffsweep's
    sampling range) and the training ``density`` are not model keys in diffusers and are not
    written (diffusers' grid runs from s = 1 to its ``sigma_min``, our default range). Checked
    by rebuilding diffusers' scheduler from it (:func:`flow_grids_equal`)."""
    if class_name != FLOW_EXPORT_SCHEDULER:
        raise ValueError(f"class_name={class_name!r} for a flow-matching schedule; allowed: "
                         f"{FLOW_EXPORT_SCHEDULER}.")
    config: dict[str, Any] = {
        "_class_name": class_name,
        "num_train_timesteps": int(round(schedule.c_noise_scale)),
        "shift": 1.0 if schedule.use_dynamic_shifting else float(schedule.shift),
        "use_dynamic_shifting": bool(schedule.use_dynamic_shifting),
        "base_shift": float(schedule.base_shift), "max_shift": float(schedule.max_shift),
        "base_image_seq_len": int(schedule.base_image_seq_len),
        "max_image_seq_len": int(schedule.max_image_seq_len),
        "time_shift_type": schedule.time_shift_type,
        **{key: allowed for key, (allowed, _) in FLOW_REFUSED_OPTIONS.items()},
    }
    default_range = flow_schedule_from_config(config, schedule.image_seq_len)
    if not flow_grids_equal(default_range, config):
        raise ValueError(f"The {class_name} config {config} does not reproduce {schedule!r}'s "
                         f"grid; please report this (diffusers {require_diffusers().__version__}).")
    return config


def schedule_from_config(config: Mapping[str, Any],
                         image_seq_len: int | None = None) -> NoiseSchedule:
    """The diffsweep schedule of a diffusers scheduler config (see :func:`check_scheduler_config`):
    a :class:`FlowMatchingSchedule` for :data:`FLOW_SCHEDULERS` (``image_seq_len`` for dynamic
    shifting), else a :class:`DiscreteVPSchedule`."""
    check_scheduler_config(config)
    if is_flow_config(config):
        return flow_schedule_from_config(config, image_seq_len)
    rescale = bool(config.get("rescale_betas_zero_snr", False))
    if config.get("trained_betas") is not None:
        return TrainedBetasVPSchedule(config["trained_betas"], rescale_betas_zero_snr=rescale)
    return DiscreteVPSchedule(beta_schedule=config.get("beta_schedule", "linear"),
                              num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                              beta_start=float(config.get("beta_start", 1e-4)),
                              beta_end=float(config.get("beta_end", 0.02)),
                              rescale_betas_zero_snr=rescale)


def _diffusers_scheduler(config: Mapping[str, Any]) -> Any:
    """diffusers' own scheduler for ``config`` (its defaults filled in), built from the config
    alone (diffusers' classes; nothing from the folder runs)."""
    diffusers = require_diffusers()
    class_name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"scheduler _class_name={class_name!r} is not in the installed diffusers "
                         f"{diffusers.__version__}; allowed: "
                         f"{', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}.")
    return cls.from_config(dict(config))


def tables_equal(schedule: DiscreteVPSchedule, scheduler: Any) -> bool:
    """Whether our ``alphas_cumprod`` equals the diffusers scheduler's (float32) bit for bit; with
    zero terminal SNR some schedulers store 2**-24 for the last entry, which is not compared. A
    scheduler without the table (none of :data:`VP_SCHEDULERS`) counts as equal."""
    theirs = getattr(scheduler, "alphas_cumprod", None)
    if theirs is None:
        return True
    ours = schedule.alphas_cumprod.to(torch.float32)
    theirs = torch.as_tensor(theirs, dtype=torch.float32)
    if schedule.rescale_betas_zero_snr:
        ours, theirs = ours[:-1], theirs[:-1]
    return ours.shape == theirs.shape and torch.equal(ours, theirs)


def scheduler_config(schedule: DiscreteVPSchedule, prediction_type: str,
                     class_name: str = "DDIMScheduler",
                     beta_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The diffusers scheduler config that reproduces ``schedule`` (the inverse of
    :func:`schedule_from_config`): named beta schedules as such, :class:`TrainedBetasVPSchedule`
    as ``trained_betas``; ``clip_sample=False`` (exported samples are unclipped, as diffsweep
    samples by default).

    ``beta_range``: the ``(beta_start, beta_end)`` the schedule was built with (a
    DiscreteVPSchedule does not keep them); when None they are read from the schedule's
    ``beta_start``/``beta_end`` attributes or recovered from its table. The result is checked by
    rebuilding diffusers' scheduler from it: its ``alphas_cumprod`` must equal ours bit for bit.
    """
    if prediction_type not in VP_PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} has no diffusers VP scheduler "
                         f"equivalent; allowed: {', '.join(VP_PREDICTION_TYPES)}.")
    config: dict[str, Any] = {
        "_class_name": class_name,
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
        "clip_sample": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    if isinstance(schedule, TrainedBetasVPSchedule):
        config.update(beta_schedule="linear", trained_betas=list(schedule.trained_betas))
    else:
        beta_start, beta_end = _beta_range(schedule, beta_range)
        config.update(beta_schedule=schedule.beta_schedule, beta_start=beta_start,
                      beta_end=beta_end, trained_betas=None)
    if class_name == "DDIMScheduler":
        config["set_alpha_to_one"] = True
    elif class_name == "DDPMScheduler":
        config["variance_type"] = "fixed_small"
    if not tables_equal(schedule, _diffusers_scheduler(config)):
        raise ValueError(f"The {class_name} config {_schedule_keys(config)} does not reproduce "
                         f"{schedule!r}'s table; pass the beta_range the schedule was built with.")
    return config


def _beta_range(schedule: DiscreteVPSchedule,
                beta_range: tuple[float, float] | None) -> tuple[float, float]:
    """``(beta_start, beta_end)`` of a named schedule: given, stored on it, or the shortest
    decimals whose table equals the schedule's (without zero terminal SNR)."""
    if beta_range is not None:
        return float(beta_range[0]), float(beta_range[1])
    start, end = getattr(schedule, "beta_start", None), getattr(schedule, "beta_end", None)
    if start is not None and end is not None:
        return float(start), float(end)
    if schedule.beta_schedule == "squaredcos_cap_v2":
        return 1e-4, 0.02  # not used by the cosine table
    if not schedule.rescale_betas_zero_snr:
        first, last = float(schedule.betas[0]), float(schedule.betas[-1])
        for digits in range(1, 10):
            start, end = float(f"{first:.{digits}g}"), float(f"{last:.{digits}g}")
            rebuilt = DiscreteVPSchedule(schedule.beta_schedule, schedule.num_train_timesteps,
                                         start, end)
            if torch.equal(rebuilt.betas, schedule.betas):
                return start, end
    raise ValueError(f"Cannot recover beta_start/beta_end of {schedule!r}; pass "
                     f"beta_range=(beta_start, beta_end) (the scheduler config's values).")


# --------------------------------------------------------------------------- files


def read_json(path: PathLike, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, with errors naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}).") from error
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(value).__name__}.")
    return value


def read_weights_file(path: PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``.bin`` file, executing no code.

    ``.bin`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers
    only; a pickle that names any other callable (one whose unpickling would run code) is refused
    with a ValueError.
    """
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Weights {path} could not be read as safetensors ({error}).") \
                from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any refusal or corruption: do not fall back
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise ValueError(f"Refusing to load {path}: unpickling it would execute code (it "
                             f"references objects other than tensors); diffsweep reads .bin "
                             f"weights with torch.load(weights_only=True) only. Convert a "
                             f"trusted copy to safetensors.") from error
        raise ValueError(f"Weights {path} could not be read ({error}).") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Weights {path} hold a {type(state).__name__}, not a state dict "
                         f"(names -> tensors).")
    return dict(state)


def _hub_blobs(model_dir: Path) -> Path | None:
    """The ``blobs/`` folder of a Hugging Face hub cache repository when ``model_dir`` (resolved)
    lies in one of its snapshots (``.../models--<org>--<name>/snapshots/<revision>/...``), whose
    files are symlinks into that folder; else None."""
    parts = model_dir.parts
    for index in range(len(parts) - 2, 0, -1):
        if parts[index] == "snapshots" and parts[index - 1].startswith("models--"):
            return Path(*parts[:index]) / "blobs"
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_index_entry(index_path: Path, entry: Any, model_dir: Path) -> Path:
    """The file an index's ``weight_map`` entry names, refused (one line naming the index, the
    entry and the folder) unless it is a relative file name that resolves (symlinks followed) to
    a file inside ``model_dir``: never ``../x``, an absolute path, or a symlink leading out
    (a Hugging Face hub cache snapshot's symlinks into its own ``blobs/`` are allowed)."""
    folder = model_dir.resolve()
    allowed = f"a weight file inside {folder}"
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"Weight index {index_path} names the weight file {entry!r}, which is "
                         f"no file name; allowed: {allowed}.")
    if Path(entry).is_absolute():
        raise ValueError(f"Weight index {index_path} names the weight file {entry!r}, an "
                         f"absolute path (entries name files relative to the model folder "
                         f"{folder}); allowed: {allowed}.")
    named = folder / entry
    resolved = named.resolve()
    blobs = _hub_blobs(folder)
    hub_blob = (blobs is not None and _inside(resolved, blobs)
                and _inside(named.parent.resolve(), folder))  # a snapshot's link to its blob
    if not (_inside(resolved, folder) or hub_blob):
        raise ValueError(f"Weight index {index_path} names the weight file {entry!r}, which "
                         f"resolves to {resolved}, outside the model folder {folder}; allowed: "
                         f"{allowed}.")
    return model_dir / entry


def weight_files(model_dir: PathLike, variant: str | None = None) -> list[Path]:
    """The weight files of a diffusers model folder (one file, or the shards an index lists,
    each checked to lie inside the folder: :func:`check_index_entry`)."""
    model_dir = Path(model_dir)
    suffix = f".{variant}" if variant else ""
    for pattern in WEIGHT_FILES:
        candidate = model_dir / pattern.format(variant=suffix)
        if not candidate.is_file():
            continue
        if candidate.name.endswith(".index.json"):
            index = read_json(candidate, "Weight index")
            weight_map = index.get("weight_map") or {}
            if not isinstance(weight_map, Mapping) or not weight_map:
                raise ValueError(f"Weight index {candidate} has no weight_map (a JSON object of "
                                 f"parameter names -> weight files).")
            shards = {check_index_entry(candidate, entry, model_dir)
                      for entry in weight_map.values()}
            return sorted(shards)
        return [candidate]
    names = ", ".join(pattern.format(variant=suffix) for pattern in WEIGHT_FILES)
    raise FileNotFoundError(f"No weights in {model_dir}: expected one of {names}.")


def _unet_dir(folder: Path) -> Path:
    if (folder / "model_index.json").is_file():
        return folder / "unet"
    return folder


def load_net(folder: PathLike, variant: str | None = None) -> DiffusersUNet:
    """The :class:`DiffusersUNet` of a pipeline folder (its ``unet/``) or a UNet2DModel folder.

    Config from ``config.json`` (``_class_name`` must be UNet2DModel), weights as in
    :func:`read_weights_file` (copied into float32 parameters), diffsweep's null label from
    ``diffsweep.json`` when the folder was written by :mod:`diffsweep.export`.
    """
    diffusers = require_diffusers()
    model_dir = _unet_dir(Path(folder))
    config = read_unet_config(model_dir)
    unet = diffusers.UNet2DModel.from_config(config)
    state: dict[str, Tensor] = {}
    for path in weight_files(model_dir, variant):
        state.update(read_weights_file(path))
    fix_keys = getattr(unet, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:  # deprecated attention names (query/key/value/proj_attn)
        state = fix_keys(state) or state
    missing, unexpected = _key_differences(unet.state_dict(), state)
    if missing or unexpected:
        raise ValueError(f"Weights in {model_dir} do not fit its config.json: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
                         f"unexpected (e.g. {unexpected[:3]}).")
    unet.load_state_dict(state, strict=True)  # copies (and casts) into float32 parameters
    unet.eval()
    metadata = _metadata(model_dir)
    embeds = config.get("num_class_embeds")
    if embeds is None:
        return DiffusersUNet(unet)
    null_label = metadata.get("null_label")
    num_classes = int(embeds) - 1 if null_label is not None else int(embeds)
    return DiffusersUNet(unet, num_classes, null_label)


def read_unet_config(model_dir: PathLike) -> dict[str, Any]:
    """A UNet folder's ``config.json``, refused (one line) unless it is a UNet2DModel whose output
    has its input's channels (eps / x0 / v; not a learned variance)."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json", "UNet config")
    class_name = config.get("_class_name")
    if class_name != UNET_CLASS:
        raise ValueError(f"unet _class_name={class_name!r} in {model_dir / 'config.json'} is "
                         f"refused; allowed: {UNET_CLASS} (text- or image-conditional UNets and "
                         f"transformers are not supported).")
    if config.get("out_channels", 3) != config.get("in_channels", 3):
        raise ValueError(f"unet out_channels={config.get('out_channels')} differs from "
                         f"in_channels={config.get('in_channels')} in {model_dir}: a learned-"
                         f"variance output is refused; allowed: out_channels = in_channels.")
    return config


def _key_differences(expected: Mapping[str, Tensor],
                     given: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _scheduler_config_path(folder: Path, scheduler: PathLike | None) -> Path:
    if scheduler is not None:
        scheduler = Path(scheduler)
        return scheduler / "scheduler_config.json" if scheduler.is_dir() else scheduler
    candidates = [folder / "scheduler" / "scheduler_config.json"] if (
        folder / "model_index.json").is_file() else [
        folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"No scheduler config for {folder}: looked for "
                            f"{', '.join(str(c) for c in candidates)}; pass scheduler=<path to "
                            f"scheduler_config.json>.")


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained={folder} is not a folder; pass a diffusers pipeline "
                                f"folder (model_index.json, unet/, scheduler/) or a UNet2DModel "
                                f"folder (config.json + weights).")
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json", "Pipeline index")
        components = {key: value for key, value in index.items() if not key.startswith("_")}
        if "unet" not in components:
            raise ValueError(f"pipeline {folder} ({index.get('_class_name')}) has no unet "
                             f"component (components: {', '.join(sorted(components))}); allowed: "
                             f"pipelines of a {UNET_CLASS} and a scheduler.")
        extra = sorted(set(components) - {"unet", "scheduler"})
        if extra:
            raise ValueError(f"pipeline {folder} ({index.get('_class_name')}) has components "
                             f"{', '.join(extra)} besides unet and scheduler (latent or text "
                             f"conditioning); allowed: unconditional pixel-space pipelines "
                             f"(DDPMPipeline, DDIMPipeline, PNDMPipeline).")
    elif not (folder / "config.json").is_file():
        raise FileNotFoundError(f"pretrained={folder} holds neither model_index.json (a "
                                f"pipeline) nor config.json (a {UNET_CLASS}).")


def resolve_scheduler_config(path: PathLike, image_seq_len: int | None = None
                             ) -> tuple[dict[str, Any], NoiseSchedule]:
    """A scheduler config file -> (the config with diffusers' defaults for its class filled in,
    the schedule), refused before anything is built if it is not expressible, and checked
    against diffusers' own scheduler (RuntimeError if they ever differ): the ``alphas_cumprod``
    table of a VP scheduler, the ``set_timesteps`` grid of a flow scheduler
    (:func:`flow_grids_equal`). ``image_seq_len``: latent tokens per image for a flow config with
    ``use_dynamic_shifting`` (ignored otherwise)."""
    raw = read_json(path, "Scheduler config")
    check_scheduler_config(raw)
    if is_flow_config(raw) and raw.get("use_dynamic_shifting") and image_seq_len is None:
        flow_schedule_from_config(raw, None)  # the one-line refusal, before diffusers is built
    reference = _diffusers_scheduler(raw)
    full = dict(reference.config)
    full["_class_name"] = raw.get("_class_name", "DDPMScheduler")
    schedule = schedule_from_config(full, image_seq_len)
    if isinstance(schedule, FlowMatchingSchedule):
        if not flow_grids_equal(schedule, full):
            raise RuntimeError(f"The schedule rebuilt from {path} differs from diffusers' "
                               f"FlowMatchEulerDiscreteScheduler.set_timesteps; please report "
                               f"this (diffusers {require_diffusers().__version__}).")
        return full, schedule
    if not tables_equal(schedule, reference):
        raise RuntimeError(f"The schedule rebuilt from {path} differs from diffusers' "
                           f"{type(reference).__name__}.alphas_cumprod; please report this "
                           f"(diffusers {require_diffusers().__version__}).")
    return full, schedule


def load_schedule(folder: PathLike, scheduler: PathLike | None = None,
                  image_seq_len: int | None = None) -> NoiseSchedule:
    """The schedule of a pretrained folder, e.g. as the ``scheduler`` config of a fine-tuning run
    (``_target_: diffsweep.diffusers_bridge.load_schedule``, ``folder: ${model.pretrained}``).
    ``image_seq_len`` as in :func:`load_pretrained`."""
    folder = Path(folder).expanduser()
    if image_seq_len is None:
        image_seq_len = _metadata(_unet_dir(folder)).get("image_seq_len")
    return resolve_scheduler_config(_scheduler_config_path(folder, scheduler), image_seq_len)[1]


def _metadata(model_dir: Path) -> dict[str, Any]:
    """diffsweep's notes beside an exported UNet (:data:`METADATA_FILE`), {} for other folders."""
    path = model_dir / METADATA_FILE
    return read_json(path, "diffsweep metadata") if path.is_file() else {}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class PretrainedModel:
    """A pretrained diffusers model as diffsweep sees it.

    Attributes:
        denoiser: :class:`~diffsweep.denoiser.Denoiser` over a :class:`DiffusersUNet`, the
            schedule and the prediction type (on the CPU, eval mode; ``.to(device)`` it).
        image_shape: ``(C, H, W)`` of one sample (``in_channels``, ``sample_size``).
        info: flat values for results rows and loggers: ``source``, ``unet_class``,
            ``scheduler_class``, ``prediction_type``, ``num_train_timesteps``, then for a VP
            scheduler ``beta_schedule``, ``beta_start``, ``beta_end``, ``rescale_betas_zero_snr``,
            ``timestep_spacing``, ``steps_offset``, the x0 clipping keys of :data:`CLIP_KEYS`
            (applied by ``adapt_sampler``), for a flow scheduler ``shift`` (the shift applied),
            ``use_dynamic_shifting``, ``image_seq_len``, ``base_shift``, ``max_shift``,
            ``base_image_seq_len``, ``max_image_seq_len``, ``time_shift_type``; then
            ``num_classes``, ``parameters``, ``weights`` (file names), ``weights_sha256``,
            ``fingerprint`` (a stable hash of the schedule config and weights).
    """

    denoiser: Denoiser
    image_shape: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)

    def row_fields(self) -> dict[str, Any]:
        """:attr:`info` for a results row: ``pretrained`` (the folder) and ``pretrained_<key>``."""
        return {("pretrained" if key == "source" else f"pretrained_{key}"): value
                for key, value in self.info.items()}

    def adapt_sampler(self, sampler: Sampler) -> Sampler:
        """``sampler`` on the scheduler config's grid when its spacing is ``auto``: the config's
        ``timestep_spacing`` and, for ``leading``, its ``steps_offset``; for a flow scheduler
        ``uniform_t`` (FlowMatchEuler's ``set_timesteps`` grid); any other sampler is returned
        unchanged.

        ``leading``/``trailing`` are the same integer indices in every diffusers scheduler;
        ``linspace`` is rounded for DDIM-type schedulers (diffsweep's ``linspace``) and fractional
        for the Euler family (``linspace_frac``). (DPM-Solver, UniPC and DEIS build ``leading``
        and ``linspace`` from ``num_steps + 1`` points; diffsweep's grids are DDIM's there.)
        """
        if sampler.spacing != "auto":
            return sampler
        if isinstance(self.denoiser.schedule, FlowMatchingSchedule):
            return Sampler(sampler.method_name, sampler.num_steps, "uniform_t", sampler.rho,
                           sampler.steps_offset, **sampler.options)
        spacing = self.info["timestep_spacing"]
        if spacing == "linspace" and self.info["scheduler_class"] in FRACTIONAL_LINSPACE:
            spacing = "linspace_frac"
        offset = self.info["steps_offset"] if spacing == "leading" else sampler.steps_offset
        options = dict(sampler.options)
        if sampler.method_name in CLIPPING_SAMPLERS:
            options.update({key: self.info[key] for key in CLIP_KEYS})
        return Sampler(sampler.method_name, sampler.num_steps, spacing, sampler.rho, offset,
                       **options)


#: The scheduler config's x0 clipping keys and diffusers' defaults; ``ddim`` and ``ddpm`` take them.
CLIP_KEYS: dict[str, Any] = {"clip_sample": False, "clip_sample_range": 1.0, "thresholding": False,
                             "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
CLIPPING_SAMPLERS = ("ddim", "ddpm")


def load_pretrained(folder: PathLike, scheduler: PathLike | None = None,
                    variant: str | None = None,
                    image_seq_len: int | None = None) -> PretrainedModel:
    """A diffusers pipeline or UNet2DModel folder as a :class:`PretrainedModel` (module docstring).

    Args:
        folder: pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or UNet2DModel
            folder (``config.json`` + weights).
        scheduler: a ``scheduler_config.json`` (or a folder holding one) to use instead of the
            folder's.
        variant: weights variant (``fp16`` reads ``diffusion_pytorch_model.fp16.safetensors``);
            weights are cast to float32.
        image_seq_len: latent tokens per image for a flow scheduler with ``use_dynamic_shifting``
            (diffusers' ``mu = calculate_shift(image_seq_len)``); default: the ``image_seq_len``
            of ``diffsweep.json`` (a diffsweep export), else refused. Ignored otherwise.

    Raises FileNotFoundError for missing files and ValueError (one line: key, value, allowed) for
    what diffsweep cannot express, before any weights are read.
    """
    folder = Path(folder).expanduser().resolve()
    _check_folder(folder)
    config_path = _scheduler_config_path(folder, scheduler)
    model_dir = _unet_dir(folder)
    if image_seq_len is None:
        image_seq_len = _metadata(model_dir).get("image_seq_len")
    full, schedule = resolve_scheduler_config(config_path, image_seq_len)
    shape = _image_shape(read_unet_config(model_dir), model_dir)
    files = weight_files(model_dir, variant)
    net = load_net(folder, variant)
    flow = isinstance(schedule, FlowMatchingSchedule)
    prediction_type = "velocity" if flow else full.get("prediction_type", "epsilon")
    denoiser = Denoiser(net, schedule, prediction_type).eval()
    weights_sha256 = stable_hash([file_sha256(path) for path in files])
    info = {
        "source": str(folder),
        "unet_class": UNET_CLASS,
        "scheduler_class": full["_class_name"],
        "prediction_type": prediction_type,
        **(_flow_info(schedule) if flow else _vp_info(full, schedule)),
        "num_classes": net.num_classes,
        "parameters": sum(p.numel() for p in net.parameters()),
        "weights": ";".join(path.name for path in files),
        "weights_sha256": weights_sha256,
        "fingerprint": stable_hash({"schedule": _schedule_keys(full, schedule),
                                    "weights": weights_sha256, "shape": list(shape)}, 16),
    }
    return PretrainedModel(denoiser, shape, info)


def _vp_info(full: Mapping[str, Any], schedule: DiscreteVPSchedule) -> dict[str, Any]:
    trained = full.get("trained_betas") is not None
    return {
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": schedule.beta_schedule,
        "beta_start": None if trained else full.get("beta_start"),
        "beta_end": None if trained else full.get("beta_end"),
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
        "timestep_spacing": full.get("timestep_spacing", "leading"),
        "steps_offset": int(full.get("steps_offset", 0) or 0),
        **{key: type(default)(full.get(key, default)) for key, default in CLIP_KEYS.items()},
    }


def _flow_info(schedule: FlowMatchingSchedule) -> dict[str, Any]:
    return {
        "num_train_timesteps": int(round(schedule.c_noise_scale)),
        "shift": schedule.shift,
        "use_dynamic_shifting": bool(schedule.use_dynamic_shifting),
        "image_seq_len": schedule.image_seq_len,
        "base_shift": schedule.base_shift, "max_shift": schedule.max_shift,
        "base_image_seq_len": schedule.base_image_seq_len,
        "max_image_seq_len": schedule.max_image_seq_len,
        "time_shift_type": schedule.time_shift_type,
    }


def _schedule_keys(config: Mapping[str, Any],
                   schedule: NoiseSchedule | None = None) -> dict[str, Any]:
    """The keys of a scheduler config that define the model (the fingerprint's schedule part)."""
    if is_flow_config(config):
        keys = ("num_train_timesteps", "shift", "use_dynamic_shifting", *DYNAMIC_SHIFT_KEYS,
                "time_shift_type")
        found = {key: config.get(key) for key in keys}
        if isinstance(schedule, FlowMatchingSchedule) and schedule.use_dynamic_shifting:
            found["image_seq_len"] = schedule.image_seq_len
        return found
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
            "prediction_type", "rescale_betas_zero_snr")
    return {key: config.get(key) for key in keys}


def _image_shape(unet_config: Mapping[str, Any], model_dir: Path) -> tuple[int, int, int]:
    size = unet_config.get("sample_size")
    channels = int(unet_config.get("in_channels", 3))
    if size is None:
        raise ValueError(f"unet sample_size=None in {model_dir / 'config.json'}: the image size "
                         f"is unknown; allowed: an int or [height, width].")
    if isinstance(size, int):
        return channels, size, size
    if isinstance(size, Iterable):
        height, width = (int(v) for v in size)
        return channels, height, width
    raise ValueError(f"unet sample_size={size!r} in {model_dir}; allowed: an int or "
                     f"[height, width].")


def is_pretrained_folder(path: PathLike) -> bool:
    """Whether ``path`` looks like a folder :func:`load_pretrained` reads."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file()
                              or (path / "config.json").is_file())


__all__ = ["FLOW_EXPORT_SCHEDULER", "FLOW_REFUSED_OPTIONS", "FLOW_SCHEDULERS", "METADATA_FILE",
           "PretrainedModel", "REFUSED_SCHEDULERS", "TrainedBetasVPSchedule", "VP_SCHEDULERS",
           "check_flow_scheduler_config", "check_index_entry", "check_scheduler_config",
           "flow_grids_equal", "flow_mu", "flow_schedule_from_config", "flow_scheduler_config",
           "is_flow_config",
           "is_pretrained_folder", "load_net", "load_pretrained", "load_schedule", "read_json",
           "read_unet_config", "read_weights_file", "resolve_scheduler_config",
           "schedule_from_config", "scheduler_config", "tables_equal", "weight_files"]

