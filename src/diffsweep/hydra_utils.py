"""Hydra-side glue: printing the composed config, building lists of callbacks and loggers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import rich
import rich.syntax
import rich.tree
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PRINT_ORDER = ("data", "model", "scheduler", "sampler", "module", "trainer", "callbacks",
               "metrics", "logger", "paths", "seed", "ckpt_path")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None,
                      order: Sequence[str] = PRINT_ORDER) -> None:
    """Print the composed config as a rich tree (one branch per group) and save it as text."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        value = cfg[key]
        text = (OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig)
                else str(value))
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        path = Path(save_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            rich.print(tree, file=handle)


def instantiate_dict(cfg: DictConfig | None, what: str, **kwargs: Any) -> list[Any]:
    """Instantiate every entry of a name -> config mapping that has a ``_target_`` (None skipped)."""
    objects: list[Any] = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a mapping of name -> config.")
    for name, entry in cfg.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.debug("Instantiating %s <%s>", what, entry._target_)
            objects.append(instantiate(entry, **kwargs))
        elif entry is not None:
            raise ValueError(f"{what} entry {name!r} has no _target_.")
    return objects


def run_config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers, without Hydra's own ``hydra`` node."""
    return {key: (OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value)
                  else value)
            for key, value in cfg.items() if key != "hydra"}
