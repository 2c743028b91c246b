"""Bring your own model: a diffusers ``UNet2DModel`` + scheduler config as a diffsweep denoiser.

:func:`load_pretrained` turns a diffusers folder into a :class:`PretrainedModel` whose
``denoiser`` samples with every diffsweep sampler through :func:`diffsweep.generate.generate`:

- a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``), or
- a ``UNet2DModel`` folder (``config.json`` + weights) with a scheduler config: the ``scheduler``
  argument (a ``scheduler_config.json`` or a folder holding one), else ``scheduler_config.json``
  beside the UNet's config, else ``scheduler/scheduler_config.json`` in the folder.

The schedule is rebuilt from the scheduler config as a :class:`~diffsweep.schedules.DiscreteVPSchedule`
(``beta_schedule``/``beta_start``/``beta_end``/``num_train_timesteps``/``rescale_betas_zero_snr``,
or ``trained_betas``) and checked against the diffusers scheduler's own ``alphas_cumprod`` (equal
bit for bit). ``prediction_type`` (epsilon | sample | v_prediction) becomes the denoiser's. The
net is :class:`~diffsweep.nets.diffusers_unet.DiffusersUNet`: our ``c_noise`` for a discrete VP
schedule is the training index ``n`` (fractional between table entries), exactly the timestep
diffusers' schedulers pass, and ``c_in x~`` is exactly ``x_t``.

Sampler-side keys of the scheduler config do not define the model and are not used by the
denoiser: ``timestep_spacing`` and ``steps_offset`` become the defaults of
:meth:`PretrainedModel.adapt_sampler`, and so do ``clip_sample`` / ``clip_sample_range`` /
``thresholding`` / ``dynamic_thresholding_ratio`` / ``sample_max_value`` for the ``ddim`` and
``ddpm`` samplers (which apply them as diffusers does); ``set_alpha_to_one`` / ``variance_type``
and the solver options are reported in ``info``. What has no discrete-VP meaning is refused with
a one-line ValueError naming the key, its value and what is allowed: flow-matching, EDM and VE
schedulers, unknown ``beta_schedule``, continuous timesteps, learned-variance outputs,
text-conditional UNets.

Loading executes no code: configs are JSON, weights are safetensors or ``.bin`` files read with
``torch.load(weights_only=True)`` (a pickle that would run code is refused).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from diffsweep.denoiser import Denoiser
from diffsweep.files import file_sha256, stable_hash
from diffsweep.nets.diffusers_unet import DiffusersUNet, require_diffusers
from diffsweep.samplers import Sampler
from diffsweep.schedules import BETA_SCHEDULES, DiscreteVPSchedule

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
#: Refused scheduler families, by class-name prefix, with the reason given.
REFUSED_SCHEDULERS = {
    "FlowMatch": "flow matching (rectified flow) is not supported yet",
    "FlowMap": "flow matching (rectified flow) is not supported yet",
    "EDM": "EDM schedulers (continuous sigma, EDM preconditioning) are not supported yet",
    "ScoreSdeVe": "VE (score SDE) schedulers are not supported yet",
    "KarrasVe": "VE (Karras) schedulers are not supported yet",
}
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

    def __init__(self, trained_betas: Sequence[float], rescale_betas_zero_snr: bool = False) -> None:
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
    if class_name not in VP_SCHEDULERS:
        return "it has no discrete VP (DDPM-table) meaning"
    return None


def check_scheduler_config(config: Mapping[str, Any]) -> None:
    """Raise a one-line ValueError for anything a discrete VP schedule cannot express."""
    class_name = config.get("_class_name", "DDPMScheduler")
    reason = _refusal(class_name)
    if reason:
        raise ValueError(f"scheduler _class_name={class_name!r} is refused: {reason}; allowed: "
                         f"{', '.join(VP_SCHEDULERS)}.")
    if config.get("use_flow_sigmas"):
        raise ValueError("scheduler use_flow_sigmas=true is refused: flow matching is not "
                         "supported yet; allowed: false.")
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if trained is None and schedule not in BETA_SCHEDULES:
        raise ValueError(f"scheduler beta_schedule={schedule!r} is refused; allowed: "
                         f"{', '.join(BETA_SCHEDULES)} (or a trained_betas list).")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={prediction!r} is refused; allowed: "
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


def schedule_from_config(config: Mapping[str, Any]) -> DiscreteVPSchedule:
    """The diffsweep schedule of a diffusers scheduler config (see :func:`check_scheduler_config`)."""
    check_scheduler_config(config)
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
                         f"{diffusers.__version__}; allowed: {', '.join(VP_SCHEDULERS)}.")
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
    as ``trained_betas``; ``clip_sample=False`` (exported samples are unclipped, as diffsweep samples by default).

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


def weight_files(model_dir: PathLike, variant: str | None = None) -> list[Path]:
    """The weight files of a diffusers model folder (one file, or the shards an index lists)."""
    model_dir = Path(model_dir)
    suffix = f".{variant}" if variant else ""
    for pattern in WEIGHT_FILES:
        candidate = model_dir / pattern.format(variant=suffix)
        if not candidate.is_file():
            continue
        if candidate.name.endswith(".index.json"):
            index = read_json(candidate, "Weight index")
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise ValueError(f"Weight index {candidate} has no weight_map.")
            return [model_dir / shard for shard in shards]
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
    :func:`read_weights_file` (copied into float32 parameters), diffsweep's null label from ``diffsweep.json``
    when the folder was written by :mod:`diffsweep.export`.
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
    metadata_path = model_dir / METADATA_FILE
    metadata = read_json(metadata_path, "diffsweep metadata") if metadata_path.is_file() else {}
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


def resolve_scheduler_config(path: PathLike) -> tuple[dict[str, Any], DiscreteVPSchedule]:
    """A scheduler config file -> (the config with diffusers' defaults for its class filled in,
    the schedule), refused before anything is built if it is not expressible, and checked
    against diffusers' own ``alphas_cumprod`` (RuntimeError if they ever differ)."""
    raw = read_json(path, "Scheduler config")
    check_scheduler_config(raw)
    reference = _diffusers_scheduler(raw)
    full = dict(reference.config)
    full["_class_name"] = raw.get("_class_name", "DDPMScheduler")
    schedule = schedule_from_config(full)
    if not tables_equal(schedule, reference):
        raise RuntimeError(f"The schedule rebuilt from {path} differs from diffusers' "
                           f"{type(reference).__name__}.alphas_cumprod; please report this "
                           f"(diffusers {require_diffusers().__version__}).")
    return full, schedule


def load_schedule(folder: PathLike, scheduler: PathLike | None = None) -> DiscreteVPSchedule:
    """The schedule of a pretrained folder, e.g. as the ``scheduler`` config of a fine-tuning run
    (``_target_: diffsweep.diffusers_bridge.load_schedule``, ``folder: ${model.pretrained}``)."""
    folder = Path(folder).expanduser()
    return resolve_scheduler_config(_scheduler_config_path(folder, scheduler))[1]


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class PretrainedModel:
    """A pretrained diffusers model as diffsweep sees it.

    Attributes:
        denoiser: :class:`~diffsweep.denoiser.Denoiser` over a :class:`DiffusersUNet`, the
            schedule and the prediction type (on the CPU, eval mode; ``.to(device)`` it).
        image_shape: ``(C, H, W)`` of one sample (``in_channels``, ``sample_size``).
        info: flat values for results rows and loggers: ``source``, ``scheduler_class``,
            ``prediction_type``, ``num_train_timesteps``, ``beta_schedule``, ``beta_start``,
            ``beta_end``, ``rescale_betas_zero_snr``, ``timestep_spacing``, ``steps_offset``,
            the x0 clipping keys of :data:`CLIP_KEYS` (applied by ``adapt_sampler``),
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
        ``timestep_spacing`` and, for ``leading``, its ``steps_offset``; any other sampler is
        returned unchanged.

        ``leading``/``trailing`` are the same integer indices in every diffusers scheduler;
        ``linspace`` is rounded for DDIM-type schedulers (diffsweep's ``linspace``) and fractional
        for the Euler family (``linspace_frac``). (DPM-Solver, UniPC and DEIS build ``leading``
        and ``linspace`` from ``num_steps + 1`` points; diffsweep's grids are DDIM's there.)
        """
        if sampler.spacing != "auto":
            return sampler
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
                    variant: str | None = None) -> PretrainedModel:
    """A diffusers pipeline or UNet2DModel folder as a :class:`PretrainedModel` (module docstring).

    Args:
        folder: pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or UNet2DModel
            folder (``config.json`` + weights).
        scheduler: a ``scheduler_config.json`` (or a folder holding one) to use instead of the
            folder's.
        variant: weights variant (``fp16`` reads ``diffusion_pytorch_model.fp16.safetensors``);
            weights are cast to float32.

    Raises FileNotFoundError for missing files and ValueError (one line: key, value, allowed) for
    what diffsweep cannot express, before any weights are read.
    """
    folder = Path(folder).expanduser().resolve()
    _check_folder(folder)
    config_path = _scheduler_config_path(folder, scheduler)
    full, schedule = resolve_scheduler_config(config_path)
    model_dir = _unet_dir(folder)
    shape = _image_shape(read_unet_config(model_dir), model_dir)
    files = weight_files(model_dir, variant)
    net = load_net(folder, variant)
    prediction_type = full.get("prediction_type", "epsilon")
    denoiser = Denoiser(net, schedule, prediction_type).eval()
    weights_sha256 = stable_hash([file_sha256(path) for path in files])
    info = {
        "source": str(folder),
        "unet_class": UNET_CLASS,
        "scheduler_class": full["_class_name"],
        "prediction_type": prediction_type,
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": schedule.beta_schedule,
        "beta_start": None if full.get("trained_betas") is not None else full.get("beta_start"),
        "beta_end": None if full.get("trained_betas") is not None else full.get("beta_end"),
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
        "timestep_spacing": full.get("timestep_spacing", "leading"),
        "steps_offset": int(full.get("steps_offset", 0) or 0),
        **{key: type(default)(full.get(key, default)) for key, default in CLIP_KEYS.items()},
        "num_classes": net.num_classes,
        "parameters": sum(p.numel() for p in net.parameters()),
        "weights": ";".join(path.name for path in files),
        "weights_sha256": weights_sha256,
        "fingerprint": stable_hash({"schedule": _schedule_keys(full), "weights": weights_sha256,
                                    "shape": list(shape)}, 16),
    }
    return PretrainedModel(denoiser, shape, info)


def _schedule_keys(config: Mapping[str, Any]) -> dict[str, Any]:
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


__all__ = ["METADATA_FILE", "PretrainedModel", "TrainedBetasVPSchedule", "VP_SCHEDULERS",
           "check_scheduler_config", "is_pretrained_folder", "load_net", "load_pretrained",
           "load_schedule", "read_json", "read_unet_config", "resolve_scheduler_config", "read_weights_file", "schedule_from_config",
           "scheduler_config", "tables_equal", "weight_files"]

