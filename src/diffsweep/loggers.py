"""Logger construction and image logging that works the same for W&B, TensorBoard and CSV."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
_said_offline = False
#: Config groups whose choice becomes a W&B tag (``scheduler:cosine``).
TAGGED_GROUPS = ("data", "model", "scheduler", "sampler", "experiment")


def wandb_api_key_configured() -> bool:
    """True if a W&B API key is set (env var, ``~/.netrc`` or the wandb settings file)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        netrc_path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
        hosts = netrc.netrc(netrc_path).hosts if Path(netrc_path).exists() else {}
    except (netrc.NetrcParseError, OSError):
        hosts = {}
    return any("wandb" in host for host in hosts)


def wandb_server_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL`` or api.wandb.ai) accepts a TCP connection."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def _say_offline_once(reason: str, save_dir: str) -> None:
    global _said_offline
    if not _said_offline:
        _said_offline = True
        rank_zero_only(log.warning)(
            "W&B: %s, logging offline to %s/wandb; upload later with `wandb sync <run dir>`.",
            reason, save_dir)


def wandb_logger(mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """A ``WandbLogger`` that never blocks or fails a run without a network.

    Args:
        mode: ``online``, ``offline``, ``disabled`` or ``auto``: online if an API key is configured
            and the server answers within 3 s, else offline (said once, with the command to sync
            later).
        **kwargs: passed to ``WandbLogger`` (project, group, job_type, tags, save_dir, ...).
    """
    save_dir = str(kwargs.get("save_dir", "."))
    if mode == "auto":
        if not wandb_api_key_configured():
            mode = "offline"
            _say_offline_once("no API key configured (WANDB_API_KEY or `wandb login`)", save_dir)
        elif not wandb_server_reachable():
            mode = "offline"
            _say_offline_once("API key found but the server is unreachable", save_dir)
        else:
            mode = "online"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode must be auto, online, offline or disabled; got {mode!r}.")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    from diffsweep.hydra_utils import hydra_choices

    choices = hydra_choices()
    kwargs["tags"] = list(kwargs.get("tags") or []) + [
        f"{group}:{choices[group]}" for group in TAGGED_GROUPS if group in choices]

    settings = wandb.Settings(init_timeout=60, silent=True)
    return WandbLogger(mode=mode, offline=(mode == "offline"), settings=settings, **kwargs)


@rank_zero_only
def log_image(loggers: list[Logger], key: str, path: str | Path, step: int) -> None:
    """Log the PNG at ``path`` to every logger that can show images (CSV loggers get its path)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
        elif isinstance(logger, CSVLogger):
            logger.log_hyperparams({f"{key}_latest": str(path)})
