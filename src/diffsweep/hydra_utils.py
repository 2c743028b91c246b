"""Hydra-side glue: printing the composed config, building lists of callbacks and loggers."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffsweep.targets import TargetPolicy, safe_instantiate

log = logging.getLogger(__name__)


def _exact_div(numerator: Any, denominator: Any) -> int:
    numerator, denominator = int(numerator), int(denominator)
    if denominator <= 0 or numerator % denominator:
        raise ValueError(f"${{diffsweep.div:{numerator},{denominator}}}: {numerator} is not a "
                         f"positive multiple of {denominator}.")
    return numerator // denominator


def _absolute_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def register_resolvers() -> None:
    """Register diffsweep's resolvers (idempotent; runs when this module is imported):

    - ``${diffsweep.div:a,b}``: exact integer division (latent resolution = image resolution /
      the VAE's down-sampling);
    - ``${diffsweep.abspath:path}``: ``path`` made absolute against the launch directory (works
      before a multirun starts, where ``${hydra:runtime.cwd}`` is not yet set);
    - ``${diffsweep.run_dir:runs_dir,new_name,resume,signature}``: the run directory, reusing an
      unfinished run of the same command (see :mod:`diffsweep.resume`).
    """
    from diffsweep.resume import resumable_run_dir

    if not OmegaConf.has_resolver("diffsweep.div"):
        OmegaConf.register_new_resolver("diffsweep.div", _exact_div)
    if not OmegaConf.has_resolver("diffsweep.abspath"):
        OmegaConf.register_new_resolver("diffsweep.abspath", _absolute_path)
    if not OmegaConf.has_resolver("diffsweep.run_dir"):
        OmegaConf.register_new_resolver("diffsweep.run_dir", resumable_run_dir, use_cache=True)


register_resolvers()

PRINT_ORDER = ("data", "model", "scheduler", "sampler", "module", "trainer", "callbacks",
               "metrics", "logger", "paths", "seed", "ckpt_path")


def full_config_tree(cfg: DictConfig, order: Sequence[str] = PRINT_ORDER) -> rich.tree.Tree:
    """The composed config as a rich tree, one branch per top-level key (``order`` first)."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        value = cfg[key]
        text = (OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig)
                else str(value))
        branch.add(rich.syntax.Syntax(text, "yaml"))
    return tree


def short_config_tree(cfg: DictConfig, full_tree_path: str | Path | None = None) -> rich.tree.Tree:
    """A few lines: the config-group choices, the command-line overrides and the run directory
    (outside Hydra: the top-level scalar keys)."""
    from rich.text import Text

    title = "CONFIG" + (f" (full tree: {full_tree_path})" if full_tree_path else "")
    tree = rich.tree.Tree(Text(title), style="dim", guide_style="dim")
    choices = {group: choice for group, choice in hydra_choices().items()
               if choice not in ("None", "null")}
    if choices:
        tree.add(Text("choices: " + " ".join(f"{group}={choice}"
                                              for group, choice in sorted(choices.items()))))
        overrides = hydra_overrides()
        if overrides:
            tree.add(Text("overrides: " + " ".join(overrides)))
    else:
        scalars = [f"{key}={cfg[key]}" for key in cfg
                   if key != "hydra" and not OmegaConf.is_config(cfg[key])]
        tree.add(Text("settings: " + " ".join(scalars)))
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None,
                                  throw_on_resolution_failure=False)
    if output_dir:
        tree.add(Text(f"run dir: {output_dir}"))
    return tree


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None,
                      order: Sequence[str] = PRINT_ORDER, style: str = "short") -> None:
    """Save the full composed config tree as text to ``save_to`` and print it ``full``, ``short``
    (:func:`short_config_tree`: choices, overrides, run dir) or not at all (``none``)."""
    if style not in ("short", "full", "none"):
        raise ValueError(f"console.config_tree must be short, full or none; got {style!r}.")
    tree = full_config_tree(cfg, order)
    if save_to is not None:
        from diffsweep.files import atomic_writer

        with atomic_writer(save_to, "w") as handle:
            rich.print(tree, file=handle)
    if style == "full":
        rich.print(tree)
    elif style == "short":
        rich.print(short_config_tree(cfg, save_to))


def to_plain(obj: Any) -> Any:
    """OmegaConf containers, mappings and sequences -> plain python (dict, list, scalars)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(key): to_plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(value) for value in obj]
    return obj


def instantiate_dict(cfg: DictConfig | None, what: str, *,
                     policy: TargetPolicy | None = None, **kwargs: Any) -> list[Any]:
    """Instantiate every entry of a name -> config mapping that has a ``_target_`` (None skipped),
    each by :func:`diffsweep.targets.safe_instantiate` under ``policy`` (default: the command's
    config without trusted_targets; :meth:`~diffsweep.targets.TargetPolicy.command` adds them)."""
    policy = policy or TargetPolicy()
    objects: list[Any] = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a mapping of name -> config.")
    for name, entry in cfg.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.debug("Instantiating %s <%s>", what, entry._target_)
            objects.append(safe_instantiate(entry, policy=policy, config_key=f"{what}.{name}",
                                            **kwargs))
        elif entry is not None:
            raise ValueError(f"{what} entry {name!r} has no _target_.")
    return objects


def run_config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers, without Hydra's own ``hydra`` node."""
    return {key: (OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value)
                  else value)
            for key, value in cfg.items() if key != "hydra"}


def hydra_choices() -> dict[str, str]:
    """The config-group choices of the running Hydra job (``{"scheduler": "cosine", ...}``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {str(group): str(choice) for group, choice in choices.items()
            if not str(group).startswith("hydra")}


def multirun_flag_first(argv: list[str]) -> list[str]:
    """Move ``-m``/``--multirun`` before the overrides.

    Hydra's argparse cannot take overrides on both sides of the flag
    (``python evaluate.py ckpt_path=x -m sampler=a,b`` fails with "unrecognized arguments").
    """
    flags = [arg for arg in argv[1:] if arg in ("-m", "--multirun")]
    rest = [arg for arg in argv[1:] if arg not in ("-m", "--multirun")]
    return [argv[0], *flags, *rest]


def hydra_overrides() -> list[str]:
    """The running job's command-line overrides (``["scheduler=cosine", ...]``), or [] outside
    Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = OmegaConf.select(HydraConfig.get(), "overrides.task", default=None,
                                 throw_on_missing=False)
    return [str(item) for item in (overrides or [])]


def hydra_signature() -> str:
    """The running job's ``override_dirname`` (its command-line overrides), or '' outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return str(OmegaConf.select(HydraConfig.get(), "job.override_dirname", default="",
                                throw_on_missing=False) or "")


def unknown_group_choices(overrides: Sequence[str], config_dir: str | Path) -> list[str]:
    """One line per command-line override that picks a config-group option ``config_dir`` does
    not have (``scheduler=cosinus``; each value of a ``a,b`` sweep), naming the group, the value
    and the options there are; [] when all exist.

    Only groups that are folders of ``config_dir`` are checked; Hydra's own groups (``hydra/*``,
    whose options plugins add), deletions, null and non-list sweeps (``range``, ``glob``) are left
    to Hydra, and nothing is checked when the command adds a config search path
    (``hydra.searchpath``). Overrides Hydra cannot parse are left to Hydra too.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    config_dir = Path(config_dir)
    if any(str(item).lstrip("+~").startswith("hydra.searchpath") for item in overrides):
        return []
    try:
        parsed = OverridesParser.create().parse_overrides([str(item) for item in overrides])
    except HydraException:
        return []
    problems = []
    for override in parsed:
        group = override.key_or_group
        folder = config_dir / group
        if override.is_delete() or group.startswith("hydra") or not folder.is_dir():
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep):
            values = list(value.list)
        elif override.is_sweep_override():
            continue
        else:
            values = [value]
        options = sorted(path.stem for path in folder.glob("*.yaml"))
        for choice in values:
            if isinstance(choice, str) and choice not in options:
                problems.append(f"{group}={choice} is not an option of the {group} group; choose "
                                f"{', '.join(options)} (configs/{group}/).")
    return problems
