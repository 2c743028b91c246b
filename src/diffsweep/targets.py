"""What a config may instantiate: the explicit registry of ``_target_`` names.

Hydra's ``instantiate`` calls whatever a config's ``_target_`` names (any importable callable, in
any nested keyword argument, list, ``_args_`` or ``_partial_`` node). Checkpoints store their
resolved run config (``diffsweep_config``) and rebuild the model and data from it, so without a
check a shared checkpoint could run code on load. Here every config part is checked before
anything of it is instantiated (:func:`safe_instantiate`, the one way diffsweep instantiates run
config parts), against names, never against Hydra's own blocklist: the same rules hold whatever
hydra-core version is installed.

Allowed ``_target_`` values:

- :data:`MODEL_TARGETS` and :data:`DATA_TARGETS`: what builds a module (net, schedule, loss, LR
  schedule, optimizer, sampler) and a DataModule (sources, VAE). A stored config (a checkpoint's
  ``diffsweep_config``) may name only these;
- :data:`RUN_TARGETS`: trainer, strategy, plugins, callbacks, loggers, metrics and what Hydra
  itself builds (launchers, sweeper samplers, Hydra callbacks); only the current command's config
  (``configs/`` plus its overrides) may name them;
- a user's own classes, allowed anywhere: ``register_target("pkg.mod.Name")`` in Python, or the
  top-level config key ``trusted_targets: [pkg.mod.Name]`` (``python train.py
  model._target_=pkg.mod.Name trusted_targets=[pkg.mod.Name]``; evaluating that run's checkpoint
  takes the same ``trusted_targets=[pkg.mod.Name]``). ``trusted_targets`` is
  read only from the current command's composed config (:func:`command_trusted_targets`), never
  from a stored one: it is not even stored in checkpoints
  (:func:`diffsweep.assembly.stored_run_config`).

Interpolations in stored configs are refused, not neutralised: checkpoints store their config
resolved, so a ``${...}`` in one means the file was edited, and resolving it could run a resolver
(``oc.env`` reads the environment, ``diffsweep.run_dir`` creates directories). A value that must
hold a literal ``${`` cannot travel in a stored config. In the command's own config,
interpolations resolve as usual (before the check, exactly as ``instantiate`` would).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: Builds a DiffusionModule: every ``_target_`` a checkpoint's ``module`` (or the earlier layout's
#: ``model``/``scheduler``/``sampler``) may name.
MODEL_TARGETS: frozenset[str] = frozenset({
    "diffsweep.module.DiffusionModule",
    "diffsweep.denoiser.Denoiser",
    # nets
    "diffsweep.nets.unet.UNet",
    "diffsweep.nets.diffusers_unet.diffusers_unet",
    # noise schedules
    "diffsweep.schedules.DiscreteVPSchedule",
    "diffsweep.schedules.ContinuousVPSchedule",
    "diffsweep.schedules.VESchedule",
    "diffsweep.schedules.EDMSchedule",
    "diffsweep.schedules.FlowMatchingSchedule",
    "diffsweep.diffusers_bridge.load_schedule",
    # samplers
    "diffsweep.samplers.Sampler",
    # losses and their weightings
    "diffsweep.loss.DenoisingLoss",
    "diffsweep.loss.EDMWeighting",
    "diffsweep.loss.MinSNRWeighting",
    "diffsweep.loss.SigmoidWeighting",
    "diffsweep.loss.SoftMinSNRWeighting",
    "diffsweep.loss.TargetMSEWeighting",
    # LR schedules (``_partial_: true``; called with the optimizer)
    "diffsweep.lr_schedules.constant",
    "diffsweep.lr_schedules.cosine",
    "diffsweep.lr_schedules.inverse_sqrt",
    "torch.optim.lr_scheduler.ConstantLR",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
    "torch.optim.lr_scheduler.ExponentialLR",
    "torch.optim.lr_scheduler.LinearLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.OneCycleLR",
    "torch.optim.lr_scheduler.PolynomialLR",
    "torch.optim.lr_scheduler.StepLR",
    # optimizers (``_partial_: true``; called with the parameters)
    "torch.optim.Adadelta",
    "torch.optim.Adafactor",
    "torch.optim.Adagrad",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.Adamax",
    "torch.optim.ASGD",
    "torch.optim.NAdam",
    "torch.optim.RAdam",
    "torch.optim.RMSprop",
    "torch.optim.Rprop",
    "torch.optim.SGD",
})

#: Builds a DataModule: every ``_target_`` a checkpoint's ``data`` may name.
DATA_TARGETS: frozenset[str] = frozenset({
    "diffsweep.data.datamodule.ImageDataModule",
    "diffsweep.data.digits.DigitsSource",
    "diffsweep.data.folder.ImageFolderSource",
    "diffsweep.data.mnist.MNISTSource",
    "diffsweep.data.mnist.FashionMNISTSource",
    "diffsweep.data.cifar10.Cifar10Source",
    "diffsweep.data.latents.LatentSource",
    "diffsweep.data.vae.LatentVAE",
})

#: Built only from the current command's config: the trainer and what it runs with, and what
#: Hydra itself instantiates from ``hydra.*`` (launchers, the Optuna sampler, Hydra callbacks).
RUN_TARGETS: frozenset[str] = frozenset({
    "lightning.pytorch.Trainer",
    "diffsweep.launch.HydraDDPStrategy",
    "diffsweep.checkpoints.AtomicCheckpointIO",
    # callbacks
    "diffsweep.callbacks.ema.EMA",
    "diffsweep.callbacks.fid.FIDCallback",
    "diffsweep.callbacks.posthoc_ema.PostHocEMA",
    "diffsweep.callbacks.preemption.Preemption",
    "diffsweep.callbacks.samples.SampleGrid",
    "diffsweep.console.StepProgressBar",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    # loggers (Lightning's own: what earlier configs named)
    "diffsweep.loggers.ResumableCSVLogger",
    "diffsweep.loggers.ResumableTensorBoardLogger",
    "diffsweep.loggers.wandb_logger",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.WandbLogger",
    # metrics
    "diffsweep.metrics.evaluator.FIDEvaluator",
    "diffsweep.metrics.extractors.classifier.ClassifierFeatureExtractor.build",
    "diffsweep.metrics.extractors.inception.InceptionFeatureExtractor.build",
    "diffsweep.metrics.extractors.tiny.TinyFeatureExtractor.build",
    # instantiated by Hydra from hydra.* / sweeper configs
    "diffsweep.loggers.ResultsSummary",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "optuna.samplers.TPESampler",
})

#: Every built-in name.
REGISTERED_TARGETS: frozenset[str] = MODEL_TARGETS | DATA_TARGETS | RUN_TARGETS

#: The top-level config key of the command's own trusted targets.
TRUSTED_KEY = "trusted_targets"

_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_user_targets: set[str] = set()


class UntrustedConfigError(ValueError):
    """A config would run code diffsweep does not vouch for; one line naming the key path, the
    value and how to allow it (raised before anything of the config is instantiated)."""


class UntrustedTargetError(UntrustedConfigError):
    """A ``_target_`` that is not registered (or not allowed where it stands)."""


class StoredInterpolationError(UntrustedConfigError):
    """A stored config holds an interpolation (``${...}``): resolving it could run a resolver."""


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _DOTTED_NAME.match(name):
        raise ValueError(f"{what}={name!r} is not allowed: give the dotted import path of a class "
                         f"or function, e.g. mypackage.nets.MyNet.")
    return name


def register_target(name: str) -> None:
    """Allow ``name`` (``"pkg.mod.Name"``, the exact ``_target_`` string) in every config of this
    process, stored ones included; for a user's own net, schedule, callback, ... class."""
    _user_targets.add(_check_name(name, "register_target"))


def registered_targets() -> frozenset[str]:
    """The built-in names plus those :func:`register_target` added."""
    return REGISTERED_TARGETS | frozenset(_user_targets)


def command_trusted_targets(cfg: Mapping[str, Any] | DictConfig | None) -> frozenset[str]:
    """``trusted_targets`` of the current command's composed config (a list of dotted names, or
    one name); pass only the command's own config, never a stored one."""
    if cfg is None:
        return frozenset()
    value = cfg.get(TRUSTED_KEY) if isinstance(cfg, (Mapping, DictConfig)) else None
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{TRUSTED_KEY}={value!r} is not allowed: give a list of dotted names, "
                         f"e.g. {TRUSTED_KEY}=[mypackage.nets.MyNet].")
    return frozenset(_check_name(name, TRUSTED_KEY) for name in value)


@dataclass(frozen=True)
class TargetPolicy:
    """Where a config comes from, hence what it may instantiate.

    Attributes:
        source: how errors name the config's origin (``"the command's config"``,
            ``"checkpoint runs/x/last.ckpt"``).
        stored: written by an earlier run (a checkpoint's ``diffsweep_config``): only
            :data:`MODEL_TARGETS`, :data:`DATA_TARGETS` and the user's registered/trusted names,
            and no interpolations. Otherwise every registered name.
        trusted: the current command's ``trusted_targets`` (:func:`command_trusted_targets`).
    """

    source: str = "the command's config"
    stored: bool = False
    trusted: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def command(cls, cfg: Mapping[str, Any] | DictConfig | None,
                source: str = "the command's config") -> TargetPolicy:
        """The policy of the current command's composed config ``cfg`` (its trusted_targets)."""
        return cls(source=source, trusted=command_trusted_targets(cfg))

    def for_stored(self, source: str) -> TargetPolicy:
        """The policy of a config stored in ``source`` (a checkpoint), loaded by this command:
        strict, with this command's trusted names."""
        return TargetPolicy(source=source, stored=True, trusted=self.trusted)

    def allowed(self) -> frozenset[str]:
        """The ``_target_`` names this policy admits."""
        base = MODEL_TARGETS | DATA_TARGETS if self.stored else REGISTERED_TARGETS
        return base | frozenset(_user_targets) | self.trusted


def _target_name(value: Any) -> str | None:
    """The dotted name Hydra would import for a ``_target_`` value (None: not a name)."""
    if isinstance(value, str):
        return value
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if callable(value) and module and qualname:
        return f"{module}.{qualname}"
    return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any, bool]]:
    """``(key path, value, is_target)`` for every ``_target_`` and every string below ``node``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            child = _join(path, key)
            if key == "_target_":
                yield child, value, True
            else:
                yield from _walk(value, child)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node, False


def _plain(config: Any, resolve: bool) -> Any:
    """``config`` as plain containers; OmegaConf nodes resolved as ``instantiate`` would (the
    command's config) or left unresolved (a stored config, so that ``${`` stays visible)."""
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=resolve)
    if isinstance(config, Mapping):
        return {key: _plain(value, resolve) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [_plain(value, resolve) for value in config]
    return config


def _how_to_allow(name: str) -> str:
    return (f"if you trust that code, add {TRUSTED_KEY}=[{name}] to this command (or call "
            f"diffsweep.targets.register_target({name!r}) before loading)")


def check_targets(config: Any, source: str | TargetPolicy, *, key: str = "") -> None:
    """Raise :class:`UntrustedConfigError` (one line) unless every ``_target_`` in ``config``
    (dicts and lists at any depth, ``_args_`` and ``_partial_`` nodes included) is allowed by the
    policy, and, for a stored config, no string holds an interpolation.

    Args:
        config: a config part (DictConfig, ListConfig, dict, list).
        source: a :class:`TargetPolicy`, or the name of a command config's origin (the command
            policy without trusted_targets).
        key: the key path of ``config`` in its run config (``module``), for the error.
    """
    policy = source if isinstance(source, TargetPolicy) else TargetPolicy(source=source)
    allowed = policy.allowed()
    for path, value, is_target in _walk(_plain(config, resolve=not policy.stored), key):
        if not is_target:
            if policy.stored and "${" in value:
                raise StoredInterpolationError(
                    f"{policy.source}: {path}={value!r} is an interpolation; stored run configs "
                    f"are written resolved, so this one was edited, and resolving it could run "
                    f"a resolver (oc.env, diffsweep.run_dir, ...): refused. Use a checkpoint as "
                    f"train.py wrote it.")
            continue
        name = _target_name(value)
        if name is None:
            raise UntrustedTargetError(f"{policy.source}: {path}={value!r} is not allowed: a "
                                       f"_target_ is the dotted name of a class or function.")
        if name in allowed:
            continue
        if policy.stored and name in REGISTERED_TARGETS:
            raise UntrustedTargetError(
                f"{policy.source}: {path}={name!r} is not allowed in a stored run config: a "
                f"checkpoint rebuilds only its module and data (model and data classes); "
                f"{_how_to_allow(name)}.")
        raise UntrustedTargetError(
            f"{policy.source}: {path}={name!r} is not a registered target (diffsweep "
            f"instantiates only the classes and functions its configs name, "
            f"diffsweep.targets); {_how_to_allow(name)}.")


def safe_instantiate(config: Any, *args: Any, policy: TargetPolicy, config_key: str = "",
                     **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(config, *args, **kwargs)`` after :func:`check_targets` of
    ``config`` and of the mapping/list ``kwargs`` (which Hydra merges into it).

    Args:
        policy: where ``config`` comes from (:meth:`TargetPolicy.command` of the composed
            config, or ``.for_stored(<checkpoint>)``).
        config_key: the key path of ``config`` in its run config, for errors (``data``).
    """
    from hydra.utils import instantiate

    check_targets(config, policy, key=config_key)
    for name, value in kwargs.items():
        if isinstance(value, (Mapping, list, tuple, DictConfig, ListConfig)):
            check_targets(value, policy, key=_join(config_key, name))
    return instantiate(config, *args, **kwargs)


__all__ = ["DATA_TARGETS", "MODEL_TARGETS", "REGISTERED_TARGETS", "RUN_TARGETS",
           "StoredInterpolationError", "TRUSTED_KEY", "TargetPolicy", "UntrustedConfigError",
           "UntrustedTargetError", "check_targets", "command_trusted_targets", "register_target",
           "registered_targets", "safe_instantiate"]
