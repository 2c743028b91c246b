"""Loggers for W&B, TensorBoard and CSV that survive resumes, and logging that works the same
for all three (images, evaluation rows, final hyperparameters).

Resumes: rerunning a killed command reuses its run directory (:mod:`diffsweep.resume`). The W&B
run id is kept in ``<run dir>/wandb/run_id``, so the rerun continues the same W&B run
(``resume="allow"``); ``metrics.csv`` is appended to; TensorBoard adds an event file beside the
old ones. Every logger here writes a (step, metric) pair once: it drops the pairs an earlier
attempt already wrote (read back from ``metrics.csv``, the W&B transaction logs
``run-<id>.wandb`` and the event files) and those this attempt already wrote at its latest step.

The history follows the checkpoints (:class:`CheckpointedHistory`, added to every training run):
whatever was logged up to a checkpoint is on disk before the checkpoint is written, and the run
resumed from it logs again what came after it (``metrics.csv`` drops those rows first). So after a
kill at any moment, or a full disk, and a rerun, each logged (step, metric) is present once.

Names: a W&B run's ``group`` is its sweep (the sweep directory's name) or, outside a sweep, its run
directory's name; its ``name`` is the sweep's overrides of this job (``scheduler=cosine``);
``job_type`` is ``train`` or ``eval``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import netrc
import os
import secrets
import socket
import string
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
_said_offline = False
#: Config groups whose choice becomes a W&B tag (``scheduler:cosine``).
TAGGED_GROUPS = ("data", "model", "scheduler", "sampler", "experiment")


#: Seconds the W&B server gets to accept a connection, and again to answer the API-key check.
WANDB_CHECK_TIMEOUT_S = 3.0


class WandbLoginError(RuntimeError):
    """``logger.wandb.mode=online`` cannot work: no API key, the server rejects it, or the server
    cannot be reached."""


def wandb_base_url() -> str:
    """The W&B server: ``WANDB_BASE_URL`` or https://api.wandb.ai."""
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def wandb_api_key() -> tuple[str, str] | None:
    """(API key, where it came from): ``WANDB_API_KEY``, else the ``~/.netrc`` (``$NETRC``) entry
    of the server's host (what ``wandb login`` writes) or of any wandb host;
    None if there is none."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"], "WANDB_API_KEY"
    netrc_path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(netrc_path).hosts if Path(netrc_path).exists() else {}
    except (netrc.NetrcParseError, OSError):
        hosts = {}
    url = urlparse(wandb_base_url())
    for host in [url.netloc, url.hostname or "", *sorted(h for h in hosts if "wandb" in h)]:
        if host in hosts and hosts[host][2]:
            return hosts[host][2], f"{netrc_path} (machine {host})"
    return None


def wandb_api_key_configured() -> bool:
    """True if a W&B API key is set (``WANDB_API_KEY`` or ``~/.netrc``, see
    :func:`wandb_api_key`)."""
    return wandb_api_key() is not None


def check_wandb_api_key(key: str, timeout: float | None = None) -> tuple[str, str]:
    """Ask the W&B server whether it accepts ``key`` (a GraphQL ``viewer`` query, as ``wandb
    login`` does), within ``timeout`` seconds per step (None: ``WANDB_CHECK_TIMEOUT_S``).
    Returns (verdict, detail): ``ok``, ``rejected`` (HTTP 401/403, or no user for the key) or
    ``unreachable`` (no TCP connection, no answer in time, or not a W&B server)."""
    timeout = WANDB_CHECK_TIMEOUT_S if timeout is None else timeout
    base = wandb_base_url()
    if not wandb_server_reachable(timeout=timeout):
        return "unreachable", f"no connection to {base} within {timeout:g} s"
    token = base64.b64encode(f"api:{key}".encode()).decode()
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": "query Viewer { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode() or "{}")
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return "rejected", f"{base} answered HTTP {error.code} {error.reason}"
        return "unreachable", f"{base} answered HTTP {error.code} {error.reason}"
    except (OSError, ValueError) as error:  # timeouts, resets, bad JSON
        return "unreachable", f"no usable answer from {base} within {timeout:g} s ({error})"
    viewer = (answer.get("data") or {}).get("viewer") if isinstance(answer, dict) else None
    if not viewer:
        return "rejected", f"{base} knows no user for this key"
    return "ok", f"{base} accepted the key"


def wandb_server_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL`` or api.wandb.ai) accepts a TCP connection."""
    url = urlparse(wandb_base_url())
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
            "W&B: %s, logging offline to %s/wandb; upload later with "
            "`wandb sync %s/wandb/offline-run-*`.", reason, save_dir, save_dir)


def wandb_logger(mode: str = "auto", *, name: str | None = None, group: str | None = None,
                 flush_interval_s: float = 2.0, **kwargs: Any) -> WandbLogger:
    """A ``WandbLogger`` that never blocks or fails a run without a network.

    The API key is checked with the server first (:func:`check_wandb_api_key`, at most
    2 x ``WANDB_CHECK_TIMEOUT_S`` seconds), so a bad key or a dead server never stalls
    ``wandb.init``.

    Args:
        mode: ``online``, ``offline``, ``disabled`` or ``auto``: online if an API key is configured
            and the server accepts it, else offline (said once, with the command to sync later).
            ``online`` raises :class:`WandbLoginError` at once when there is no key, the server
            rejects it or cannot be reached.
        name: run name (None: :func:`run_names`, the sweep's overrides of this job).
        group: run group (None: :func:`run_names`, the sweep directory's or run directory's name).
        flush_interval_s: seconds between writes of the local transaction log
            (``run-<id>.wandb``): at most this much history is lost when the run is killed.
        **kwargs: passed to ``WandbLogger`` (project, job_type, tags, save_dir, resume, ...).

    The run id is read from ``<save_dir>/wandb/run_id`` (written on first use), so rerunning a
    killed run continues the same W&B run; the returned :class:`ResumableWandbLogger` skips what
    the earlier attempts already logged.
    """
    save_dir = str(kwargs.get("save_dir", "."))
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(
            f"logger.wandb.mode must be auto, online, offline or disabled; got {mode!r}.")
    if mode in ("auto", "online"):
        mode = _resolve_online_mode(mode, save_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    from diffsweep.hydra_utils import hydra_choices

    choices = hydra_choices()
    kwargs["tags"] = list(kwargs.get("tags") or []) + [
        f"{group}:{choices[group]}" for group in TAGGED_GROUPS
        if choices.get(group) not in (None, "None", "null")]

    names = run_names(save_dir)
    kwargs["name"] = name or names.name
    kwargs["group"] = group or names.group
    kwargs.setdefault("resume", "allow")
    kwargs["id"] = kwargs.get("id") or wandb_run_id(save_dir)
    flush = ({"x_transaction_log_flush_interval": float(flush_interval_s)}
             if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {})
             else {})  # an older wandb without the setting flushes on its own schedule
    settings = wandb.Settings(init_timeout=60, silent=True, **flush)
    logger = ResumableWandbLogger(mode=mode, offline=(mode == "offline"), settings=settings,
                                  **kwargs)
    logger._wandb_init.pop("anonymous", None)  # wandb warns that the setting has no effect
    return logger


def _resolve_online_mode(mode: str, save_dir: str) -> str:
    """``online`` if the key works; else ``offline`` (mode auto, said once) or WandbLoginError."""
    found = wandb_api_key()
    if found is None:
        verdict, source = "no_key", ""
        detail = "no API key configured (WANDB_API_KEY or `wandb login`)"
    else:
        key, source = found
        verdict, detail = check_wandb_api_key(key)
    if verdict == "ok":
        return "online"
    if mode == "auto":
        reason = {"no_key": detail,
                  "unreachable": f"API key found but the server is unreachable ({detail})",
                  "rejected": f"the server rejected the API key from {source} ({detail})"}[verdict]
        _say_offline_once(reason, save_dir)
        return "offline"
    fix = {"no_key": "set WANDB_API_KEY or run `wandb login`",
           "unreachable": "check WANDB_BASE_URL and the network",
           "rejected": f"fix the key in {source} "
                       "(`wandb login --relogin` or WANDB_API_KEY)"}[verdict]
    what = {"no_key": "no API key is configured",
            "unreachable": f"the server is unreachable ({detail})",
            "rejected": f"the server rejected the API key from {source} ({detail})"}[verdict]
    raise WandbLoginError(f"logger.wandb.mode=online is not possible: {what}; {fix}, or use "
                          f"logger.wandb.mode=auto (offline when the key or server fails) or "
                          f"offline.")


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


# ------------------------------------------------------------------------------------ run names
@dataclass(frozen=True)
class RunNames:
    """How a run appears in W&B: ``group`` (its sweep) and ``name`` (what the sweep varies)."""

    group: str
    name: str


def _parse_overrides(overrides: Iterable[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


@lru_cache(maxsize=32)
def _sweep_override_keys(multirun_yaml: str, modified: float) -> frozenset[str]:
    """Keys of the sweep overrides (``scheduler=a,b``) on a multirun's command line."""
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.select(OmegaConf.load(multirun_yaml), "hydra.overrides.task",
                                default=None) or []
        return frozenset(override.get_key_element().lstrip("+~")
                         for override in _parse_overrides(task) if override.is_sweep_override())
    except Exception as error:  # noqa: BLE001 - an unreadable file names nothing
        log.debug("Cannot read the sweep overrides from %s: %s", multirun_yaml, error)
        return frozenset()


def sweep_dir_of(hydra_cfg: Any) -> Path:
    """The sweep directory of a multirun job: its output directory less ``hydra.sweep.subdir``."""
    from omegaconf import OmegaConf

    output_dir = Path(str(hydra_cfg.runtime.output_dir))
    subdir = OmegaConf.select(hydra_cfg, "sweep.subdir", default=None,
                              throw_on_resolution_failure=False)
    parts = Path(str(subdir)).parts if subdir not in (None, "") else ()
    if parts and output_dir.parts[-len(parts):] == parts:
        return output_dir.parents[len(parts) - 1]
    return Path(str(hydra_cfg.sweep.dir))


def swept_keys(hydra_cfg: Any) -> set[str]:
    """The keys a multirun varies: its command line's sweep overrides (``scheduler=a,b``, read
    back from ``<sweep dir>/multirun.yaml``) and the sweeper's search space
    (``hydra.sweeper.params``, e.g. Optuna's)."""
    from omegaconf import OmegaConf

    keys: set[str] = set()
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None,
                              throw_on_resolution_failure=False)
    if params:
        keys |= {str(key) for key in params}
    path = sweep_dir_of(hydra_cfg) / "multirun.yaml"
    if path.is_file():
        keys |= _sweep_override_keys(str(path), path.stat().st_mtime)
    return keys


def run_names(output_dir: str | Path | None = None) -> RunNames:
    """W&B group and name of the running Hydra job.

    In a multirun the group is the sweep directory's name and the name the job's overrides of the
    swept keys (``scheduler=cosine,sampler.num_steps=20``; all of its overrides when none is
    known). A single run is its own group; its name is its overrides, or its directory's name.
    Outside Hydra both are ``output_dir``'s name.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        folder = Path(output_dir or ".").resolve().name
        return RunNames(folder, folder)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(str(OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None)
                       or output_dir or "."))
    dirname = str(OmegaConf.select(hydra_cfg, "job.override_dirname", default="",
                                   throw_on_resolution_failure=False) or "")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        keys = swept_keys(hydra_cfg)
        overrides = OmegaConf.select(hydra_cfg, "overrides.task", default=None) or []
        swept = [override.input_line for override in _parse_overrides(overrides)
                 if override.get_key_element().lstrip("+~") in keys]
        return RunNames(sweep_dir_of(hydra_cfg).name, ",".join(swept) or dirname or run_dir.name)
    return RunNames(run_dir.name, dirname or run_dir.name)


# ------------------------------------------------------------------------------- W&B resumes
#: ``<save_dir>/wandb/<this file>`` holds the run's W&B id.
WANDB_RUN_ID_FILE = "run_id"


def wandb_run_id(save_dir: str | Path) -> str:
    """The W&B id of the run logging to ``save_dir``: read from ``<save_dir>/wandb/run_id``, or
    a new id written there (by rank 0), so a rerun in the same directory continues the run."""
    from diffsweep.files import atomic_write_text

    path = Path(save_dir) / "wandb" / WANDB_RUN_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if getattr(rank_zero_only, "rank", 0) == 0:
        atomic_write_text(path, run_id + "\n")
    return run_id


_LOG_BLOCK = 32768       # wandb's transaction log: leveldb-log blocks...
_LOG_HEADER = 7          # ...of records with a 7-byte header (crc32, length, type)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_LOG_MAGIC = struct.pack("<H", 0xBEE1)  # after ":W&B" in the file header (then a version byte)


def wandb_records(path: str | Path) -> Iterator[Any]:
    """The records (``wandb.proto.wandb_internal_pb2.Record``) of a W&B transaction log
    ``run-<id>.wandb``, in order. A file cut short by a kill yields its complete records."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < _LOG_HEADER or data[:4] != b":W&B" or data[4:6] != _LOG_MAGIC:
        return  # not a W&B transaction log (or not even its header)
    offset, pending = _LOG_HEADER, b""
    while True:
        left = _LOG_BLOCK - offset % _LOG_BLOCK
        if left < _LOG_HEADER:
            offset += left
        if offset + _LOG_HEADER > len(data):
            return
        checksum, length, kind = struct.unpack("<IHB", data[offset:offset + _LOG_HEADER])
        chunk = data[offset + _LOG_HEADER:offset + _LOG_HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return
        offset += _LOG_HEADER + length
        if kind == _FIRST:
            pending = chunk
            continue
        if kind == _MIDDLE:
            pending += chunk
            continue
        payload = pending + chunk if kind == _LAST else chunk
        pending = b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def wandb_history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows (``{key: value}``, values JSON-decoded) of a W&B transaction log."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wandb_transaction_logs(save_dir: str | Path, run_id: str) -> list[Path]:
    """The transaction logs ``run-<id>.wandb`` of every attempt of W&B run ``run_id`` under
    ``<save_dir>/wandb/`` (``offline-run-<time>-<id>[-<n>]`` or ``run-...``), oldest first."""
    paths = [path for path in (Path(save_dir) / "wandb").glob(f"*/run-{run_id}.wandb")
             if not path.parent.is_symlink()]  # not latest-run
    return sorted(paths, key=lambda path: (path.stat().st_mtime, path.parent.name))


def wandb_logged_steps(save_dir: str | Path, run_id: str) -> dict[int, set[str]]:
    """``{trainer/global_step: {metric keys}}`` in the transaction logs of earlier attempts of
    W&B run ``run_id`` under ``<save_dir>/wandb/``."""
    logged: dict[int, set[str]] = {}
    for path in wandb_transaction_logs(save_dir, run_id):
        for row in wandb_history(path):
            step = row.get("trainer/global_step")
            if isinstance(step, (int, float)):
                keys = logged.setdefault(int(step), set())
                for key in row:
                    if key.endswith("/_type"):  # media (images, tables): logged under their key
                        keys.add(key[:-len("/_type")])
                    elif not key.startswith("_") and key != "trainer/global_step":
                        keys.add(key)
    return logged


#: Keys Lightning adds to every log call (not a measurement: never a reason to write a row).
BOOKKEEPING_KEYS = frozenset({"epoch"})


class _SkipLoggedBefore:
    """Mixin for a Lightning logger: ``log_metrics`` drops the (step, key) pairs an earlier
    attempt of the run wrote (``self._logged_before``; keys as written, with the prefix) and those
    this attempt wrote at its latest step (:class:`CheckpointedHistory` logs a step's training
    metrics before a checkpoint, Lightning logs them again after it). A call left with
    bookkeeping keys only (``epoch``) writes nothing.

    :meth:`persist` makes what was logged durable; :meth:`drop_history_after` forgets the steps
    after a checkpoint (where the logger can)."""

    _logged_before: dict[int, set[str]]
    _latest_step: int | None = None
    _latest_keys: frozenset[str] | set[str] = frozenset()

    def _full_key(self, key: str) -> str:
        prefix = getattr(self, "_prefix", "") or ""
        return f"{prefix}{getattr(self, 'LOGGER_JOIN_CHAR', '-')}{key}" if prefix else key

    def _not_logged_before(self, metrics: Mapping[str, Any], step: int | None) -> dict[str, Any]:
        if step is None:
            return dict(metrics)
        logged_before = getattr(self, "_logged_before", None) or {}
        done = logged_before.get(int(step), set())
        if int(step) == self._latest_step:
            done = done | self._latest_keys
        fresh = {key: value for key, value in metrics.items()
                 if key in BOOKKEEPING_KEYS or self._full_key(key) not in done}
        return fresh if any(key not in BOOKKEEPING_KEYS for key in fresh) else {}

    def _remember(self, metrics: Mapping[str, Any], step: int | None) -> None:
        """Record what this attempt wrote at ``step`` (only its latest step is kept)."""
        if step is None:
            return
        if int(step) != self._latest_step:
            self._latest_step, self._latest_keys = int(step), set()
        self._latest_keys.update(self._full_key(key) for key in metrics)

    def persist(self) -> None:
        """Write what was logged so far to this logger's files (Lightning's ``save``)."""
        self.save()  # type: ignore[attr-defined]

    def drop_history_after(self, step: int) -> None:
        """A run resumes from a checkpoint whose latest logged step is ``step`` (-1: from scratch):
        the steps after it are logged again. Loggers that can rewrite their history drop them;
        the others keep them and skip the repeats."""


#: ``<save_dir>/wandb/<this, with the run id>``: the scalars logged up to the latest checkpoint.
WANDB_JOURNAL_FILE = "history-{run_id}.jsonl"


def _journal_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The plain numbers among logged values (media and text are not journaled)."""
    return {str(key): value if isinstance(value, int) else float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class ResumableWandbLogger(_SkipLoggedBefore, WandbLogger):
    """``WandbLogger`` that continues its W&B run across reruns (build it with
    :func:`wandb_logger`): metrics an earlier attempt of the same id logged at a step are not
    logged again.

    W&B's service writes its transaction log ``run-<id>.wandb`` on its own schedule
    (``flush_interval_s``), and a killed run's service dies with what it had not written. So the
    scalars logged up to a checkpoint are also appended, fsynced, to a journal
    (``wandb/history-<id>.jsonl``) before the checkpoint is written (:meth:`persist`); a resumed
    run logs again, from the journal, those of its checkpoint's steps that no transaction log
    holds (:meth:`drop_history_after`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        run_id, save_dir = self._wandb_init.get("id"), self._wandb_init.get("dir")
        self._logged_before = (wandb_logged_steps(save_dir, run_id)
                               if run_id and save_dir else {})
        self._journal = (Path(save_dir) / "wandb" / WANDB_JOURNAL_FILE.format(run_id=run_id)
                         if run_id and save_dir else None)
        self._unjournaled: list[str] = []

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        metrics = self._not_logged_before(metrics, step)
        if metrics:
            super().log_metrics(metrics, step)
            self._remember(metrics, step)
            scalars = _journal_scalars(metrics)
            if step is not None and scalars:
                self._unjournaled.append(json.dumps({"step": int(step), "metrics": scalars}))

    @rank_zero_only
    def persist(self) -> None:
        """Append the scalars logged since the last call to the journal, fsynced."""
        from diffsweep.files import append_text

        self.save()
        if self._journal is not None and self._unjournaled:
            append_text(self._journal, "".join(line + "\n" for line in self._unjournaled),
                        sync=True)
        self._unjournaled = []

    def journal(self) -> dict[int, dict[str, float]]:
        """``{step: {key: value}}`` in the journal (lines cut short by a kill are skipped)."""
        logged: dict[int, dict[str, float]] = {}
        if self._journal is None or not self._journal.is_file():
            return logged
        for line in self._journal.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                logged.setdefault(int(record["step"]), {}).update(record["metrics"])
            except (ValueError, KeyError, TypeError):
                continue
        return logged

    @rank_zero_only
    def drop_history_after(self, step: int) -> None:
        """W&B keeps the steps after ``step``; those through it that the journal holds and no
        transaction log does (written by W&B's service too late for a kill) are logged now."""
        missing = 0
        for logged_step, values in sorted(self.journal().items()):
            if logged_step > step:
                continue
            done = self._logged_before.get(logged_step, set())
            lost = {key: value for key, value in values.items()
                    if key not in BOOKKEEPING_KEYS and self._full_key(key) not in done}
            if not lost:
                continue
            lost.update({key: values[key] for key in BOOKKEEPING_KEYS if key in values})
            WandbLogger.log_metrics(self, lost, logged_step)
            self._logged_before.setdefault(logged_step, set()).update(
                self._full_key(key) for key in lost)
            missing += 1
        self._latest_step, self._latest_keys = None, frozenset()
        if missing:
            log.info("W&B: logged again %d step(s) through step %d that the killed attempt's "
                     "transaction log lacks (from %s).", missing, step, self._journal)


# --------------------------------------------------------------------------------------- CSV
def csv_row_step(row: Mapping[str, Any]) -> int | None:
    """The ``step`` of a ``metrics.csv`` row (None when it has none or it is not a number)."""
    value = row.get("step")
    if value is None or value == "":
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _through(row: Mapping[str, Any], step: int) -> bool:
    """Whether a row's step is known and at most ``step``."""
    found = csv_row_step(row)
    return found is not None and found <= step


def csv_logged_steps(rows: Iterable[Mapping[str, str]]) -> dict[int, set[str]]:
    """``{step: {keys with a value}}`` of ``metrics.csv`` rows."""
    logged: dict[int, set[str]] = {}
    for row in rows:
        step = csv_row_step(row)
        if step is None:
            continue
        logged.setdefault(step, set()).update(
            key for key, value in row.items()
            if key not in ("step", None) and value not in ("", None))
    return logged


def _appending_writer_class() -> type:
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingCSVWriter(ExperimentWriter):
        """Lightning's CSV writer, except that it keeps an existing ``metrics.csv``: its rows and
        header are read back (a last line cut short by a kill is dropped), new rows are appended,
        and a header change rewrites the file atomically. A write that fails (a full disk:
        :class:`~diffsweep.files.DiskFullError`, one line) leaves the file as it was and keeps the
        rows buffered for the next :meth:`save`."""

        def __init__(self, log_dir: str) -> None:
            super().__init__(log_dir)
            self.logged_before = self._read_existing()

        def _check_log_dir_exists(self) -> None:
            """Keep what an earlier attempt wrote (Lightning deletes ``metrics.csv`` here)."""

        def _read_existing(self) -> dict[int, set[str]]:
            from diffsweep.files import atomic_write_text

            path = Path(self.metrics_file_path)
            if not path.is_file():
                return {}
            text = path.read_text()
            if text and not text.endswith("\n"):  # killed mid-append: drop the partial line
                text = text[:text.rfind("\n") + 1]
                atomic_write_text(path, text)
            reader = csv.DictReader(io.StringIO(text))
            rows = list(reader)
            self.metrics_keys = [key for key in (reader.fieldnames or [])]
            return csv_logged_steps(rows)

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            with open(self.metrics_file_path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            self._rewrite(fieldnames, rows)

        def _rewrite(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
            from diffsweep.files import atomic_write_text

            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.metrics_file_path, buffer.getvalue())

        def save(self) -> None:
            """Append the buffered rows, whole or not at all
            (:func:`~diffsweep.files.append_text`; a new column first rewrites the file
            atomically). On an error the rows stay buffered."""
            from diffsweep.files import append_text

            if not self.metrics:
                return
            path = Path(self.metrics_file_path)
            header = list(self.metrics_keys)  # the columns of the file on disk
            new_keys = self._record_new_keys()
            existed = path.is_file()
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
            if not existed:
                writer.writeheader()
            writer.writerows(self.metrics)
            try:
                if new_keys and existed:
                    self._rewrite_with_new_header(self.metrics_keys)
                    header = list(self.metrics_keys)
                append_text(path, buffer.getvalue())
            except OSError:
                self.metrics_keys = header
                raise
            self.metrics = []

        def drop_rows_after(self, step: int) -> int:
            """Remove the rows of steps after ``step`` (written and buffered; the file is
            rewritten atomically); returns how many written rows went."""
            self.metrics = [row for row in self.metrics if _through(row, step)]
            path = Path(self.metrics_file_path)
            if not path.is_file():
                self.logged_before = {}
                return 0
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                rows = list(reader)
                fieldnames = list(reader.fieldnames or self.metrics_keys)
            kept = [row for row in rows if _through(row, step)]
            if len(kept) < len(rows):
                self._rewrite(fieldnames, kept)
            self.logged_before = csv_logged_steps(kept)
            return len(rows) - len(kept)

    return AppendingCSVWriter


class ResumableCSVLogger(_SkipLoggedBefore, CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives reruns: appended to; a (step, metric) already
    in the file is not written again. Rows are written every ``flush_logs_every_n_steps`` log
    calls and, fsynced, before every checkpoint (:class:`CheckpointedHistory`), so a resumed run
    finds every step up to its checkpoint; the rows after it are dropped when the run resumes
    (they are logged again). A full disk raises :class:`~diffsweep.files.DiskFullError` (one line)
    with the file as it was and the rows kept in memory."""

    def __init__(self, save_dir: str | Path, name: str | None = "csv",
                 version: int | str | None = "", prefix: str = "",
                 flush_logs_every_n_steps: int = 1) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _appending_writer_class()(log_dir=self.log_dir)
            self._logged_before = self._experiment.logged_before
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        _ = self.experiment  # reads the earlier attempts' rows
        metrics = self._not_logged_before(metrics, step)
        if metrics:
            super().log_metrics(metrics, step)
            self._remember(metrics, step)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()

    @rank_zero_only
    def persist(self) -> None:
        """Write the buffered rows and fsync ``metrics.csv``."""
        from diffsweep.files import fsync_file

        self.save()
        path = Path(self.experiment.metrics_file_path)
        if path.is_file():
            fsync_file(path)

    @rank_zero_only
    def drop_history_after(self, step: int) -> None:
        """Remove the rows of steps after ``step`` from ``metrics.csv`` (they are logged again)."""
        dropped = self.experiment.drop_rows_after(step)
        self._logged_before = self.experiment.logged_before
        self._latest_step, self._latest_keys = None, frozenset()
        if dropped:
            log.info("%s: dropped %d row(s) after step %d, logged after the checkpoint this run "
                     "resumes from (the resumed run logs them again).",
                     self.experiment.metrics_file_path, dropped, step)


# ------------------------------------------------------------------------------- TensorBoard
def tensorboard_logged_steps(log_dir: str | Path) -> dict[int, set[str]]:
    """``{step: {scalar and image tags}}`` in the event files under ``log_dir``."""
    if not any(Path(log_dir).glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0,
                                                                "tensors": 0})
    accumulator.Reload()
    logged: dict[int, set[str]] = {}
    tags = accumulator.Tags()
    for tag in tags.get("scalars", []):
        for event in accumulator.Scalars(tag):
            logged.setdefault(int(event.step), set()).add(tag)
    for tag in tags.get("images", []):
        for event in accumulator.Images(tag):
            logged.setdefault(int(event.step), set()).add(tag)
    return logged


class ResumableTensorBoardLogger(_SkipLoggedBefore, TensorBoardLogger):
    """``TensorBoardLogger`` for reruns in the same directory: scalars an earlier attempt wrote at
    a step (read from its event files) are not written again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_before = (tensorboard_logged_steps(self.log_dir)
                               if getattr(rank_zero_only, "rank", 0) == 0 else {})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        metrics = self._not_logged_before(metrics, step)
        if metrics:
            super().log_metrics(metrics, step)
            self._remember(metrics, step)

    @rank_zero_only
    def persist(self) -> None:
        """Flush the event file and fsync the event files."""
        from diffsweep.files import fsync_file

        self.save()
        for path in Path(self.log_dir).glob("events.out.tfevents.*"):
            fsync_file(path)


# ------------------------------------------------------------------ history and checkpoints
#: Checkpoint entry written by :class:`CheckpointedHistory`: the latest logging step the
#: checkpoint covers and whether the validation of its step had yet to run.
HISTORY_CHECKPOINT_KEY = "diffsweep_history"


def _training_metrics_pending(trainer: Any) -> bool:
    """Whether the trainer is inside ``on_train_batch_end``: the step's training metrics are not
    logged yet (Lightning logs them after the hook) and its validation has not run."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.total
    return bool(trainer.training and progress.processed > progress.completed)


def _log_step_metrics_now(trainer: Any) -> None:
    """Log the current step's training metrics to the resumable loggers now, as Lightning's
    logger connector would after ``on_train_batch_end`` (its own call then writes nothing new)."""
    from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

    connector = trainer._logger_connector
    loop = trainer.fit_loop.epoch_loop
    if loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return
    if trainer._results is None or connector._first_loop_iter is None:
        return
    if not (connector.should_update_logs or trainer.fast_dev_run):
        return
    metrics = convert_tensors_to_scalars(dict(connector.metrics["log"]))
    if not metrics:
        return
    step = metrics.pop("step", None)
    if step is None:
        metrics.setdefault("epoch", trainer.current_epoch)
        step = loop._batches_that_stepped
    for logger in trainer.loggers:
        if isinstance(logger, _SkipLoggedBefore):
            logger.log_metrics(metrics, step=int(step))


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning validates at the end of the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    if loop._skip_next_val:
        return False
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def _checkpoint_log_step(checkpoint: Mapping[str, Any]) -> int | None:
    """The latest logging step a checkpoint covers (None: unknown)."""
    record = checkpoint.get(HISTORY_CHECKPOINT_KEY)
    if isinstance(record, Mapping) and record.get("log_step") is not None:
        return int(record["log_step"])
    loops = checkpoint.get("loops") or {}
    state = (loops.get("fit_loop") or {}).get("epoch_loop.state_dict") or {}
    found = state.get("_batches_that_stepped")
    return int(found) if found is not None else None


class CheckpointedHistory(Callback):
    """Keep the logged history (``metrics.csv``, TensorBoard, W&B) in step with the checkpoints,
    so that a run killed at any moment (or stopped by a full disk) and rerun holds every logged
    (step, metric) exactly once.

    Invariant: everything logged up to a checkpoint is on disk (written and fsynced) before the
    checkpoint is written; everything logged after it is logged again by the run resumed from it.

    - Before any checkpoint is written (``on_save_checkpoint``: periodic, preemption and manual
      saves alike), the step's training metrics are logged (Lightning logs them only after
      ``on_train_batch_end``, where checkpoints are saved) and every logger is saved; the
      resumable ones fsync their files. A failure there (a full disk:
      :class:`~diffsweep.files.DiskFullError`) fails the checkpoint write, so the previous
      checkpoint stays the resume point.
    - The checkpoint records its latest logging step and whether the validation of its step
      (which Lightning runs after ``on_train_batch_end``) was still to run.
    - When a resumed run starts training, ``metrics.csv`` keeps the rows through that step and
      drops the later ones (a run that starts from scratch drops all): they were logged with
      weights that were lost, and are logged again. W&B and TensorBoard keep theirs and skip the
      repeats. Then a validation still to run at the checkpoint's step runs (Lightning's restart
      would skip it): its metrics and sample grid are logged once, at the step the uninterrupted
      run logs them, before the first training step.
    """

    def __init__(self) -> None:
        self._restored = False
        self._restored_log_step: int | None = None
        self._restored_epoch: int | None = None
        self._validation_pending = False

    def on_save_checkpoint(self, trainer: Any, pl_module: Any,
                           checkpoint: dict[str, Any]) -> None:
        in_batch_end = _training_metrics_pending(trainer)
        if in_batch_end:
            _log_step_metrics_now(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, _SkipLoggedBefore):
                logger.persist()
            else:
                logger.save()
        checkpoint[HISTORY_CHECKPOINT_KEY] = {
            "log_step": int(trainer.fit_loop.epoch_loop._batches_that_stepped),
            "validation_pending": bool(in_batch_end and _validation_follows(trainer))}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any,
                           checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(HISTORY_CHECKPOINT_KEY)
        self._restored = True
        self._restored_log_step = _checkpoint_log_step(checkpoint)
        self._validation_pending = bool(isinstance(record, Mapping)
                                        and record.get("validation_pending"))
        epoch = checkpoint.get("epoch")
        self._restored_epoch = int(epoch) if epoch is not None else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._restored or self._restored_log_step is not None:
            keep_through = self._restored_log_step if self._restored else -1
            for logger in trainer.loggers:
                if isinstance(logger, _SkipLoggedBefore):
                    logger.drop_history_after(keep_through)
        if self._validation_pending:
            self._validation_pending = False
            self._validate(trainer, self._restored_epoch)

    @staticmethod
    def _validate(trainer: Any, epoch: int | None) -> None:
        """Run the validation of the restored step, as Lightning's training epoch loop does after
        a training batch (``on_advance_end``), in the checkpoint's ``epoch`` (a checkpoint of an
        epoch's last batch restores into the next epoch)."""
        if trainer.is_global_zero:
            log.info("Validating step %d, which the checkpoint this run resumes from was saved "
                     "before.", trainer.global_step)
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
        epoch_progress = trainer.fit_loop.epoch_progress.current
        restored_epoch = epoch_progress.completed
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        trainer.validating = True
        val_loop.restarting = False  # a whole validation, not the rest of an interrupted one
        if epoch is not None:
            epoch_progress.completed = epoch  # trainer.current_epoch, logged with the metrics
        try:
            val_loop.run()
        finally:
            epoch_progress.completed = restored_epoch
            trainer.training = True
            connector._first_loop_iter = first_loop_iter


# ------------------------------------------------------------------------ end of a run / eval
def _finite_scalars(values: Mapping[str, Any]) -> dict[str, float]:
    scalars = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # tensors, numpy scalars
            except (TypeError, ValueError):
                continue
        if value == value and abs(float(value)) != float("inf"):
            scalars[str(key)] = float(value)
    return scalars


def tensorboard_hparams(logger: TensorBoardLogger, params: Mapping[str, Any],
                        metrics: Mapping[str, Any], step: int) -> dict[str, float]:
    """Write the run's hyperparameters (flattened) with its final metrics to TensorBoard's HPARAMS
    tab. The metrics are logged as ``final/<key>`` at ``step`` (Lightning's own call logs them at
    step 0 under the live series' names); returns them."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from torch.utils.tensorboard.summary import hparams

    final = {f"final/{key}": value for key, value in _finite_scalars(metrics).items()}
    flat = logger._sanitize_params(_flatten_dict(_convert_params(dict(params))))
    flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flat.items()}
    experiment, start, end = hparams(flat, final)
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)
    TensorBoardLogger.log_metrics(logger, final, step)  # the scalars the HPARAMS tab reads
    return final


def finish_loggers(loggers: Iterable[Logger], params: Mapping[str, Any] | None,
                   metrics: Mapping[str, Any], step: int) -> None:
    """End of a run: TensorBoard gets the hyperparameters with the final ``metrics``
    (:func:`tensorboard_hparams`), every logger is saved, and the W&B run is finished (the next
    job of a sweep starts its own)."""
    finished_wandb = False
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger) and getattr(rank_zero_only, "rank", 0) == 0:
            tensorboard_hparams(logger, params or {}, metrics, step)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            finished_wandb = True
    if finished_wandb:
        import wandb

        wandb.finish()


def typed_value(text: Any) -> Any:
    """A results-file cell as a number or bool when it reads as one (``""`` -> None)."""
    if not isinstance(text, str):
        return text
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def typed_table(rows: list[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, data) of results rows, each column of one type: numbers (int, or float when any
    cell has a fraction), bools or strings; empty cells are None."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    typed = {column: [typed_value(row.get(column, "")) for row in rows] for column in columns}
    for column, values in typed.items():
        present = [value for value in values if value is not None]
        if all(isinstance(value, bool) for value in present):
            continue
        if all(isinstance(value, (int, float)) and not isinstance(value, bool)
               for value in present):
            if any(isinstance(value, float) for value in present):
                typed[column] = [None if value is None else float(value) for value in values]
            continue
        typed[column] = [None if value is None else str(rows[index].get(column, ""))
                         for index, value in enumerate(values)]
    return columns, [[typed[column][index] for column in columns] for index in range(len(rows))]


def log_evaluation(loggers: Iterable[Logger], row: Mapping[str, Any], config: Mapping[str, Any],
                   grid_path: str | Path | None, step: int) -> dict[str, float]:
    """One evaluation job: its config (``config``, with the checkpoint's training config inside),
    the row's numbers as metrics at the checkpoint's ``step``, the sample grid, and TensorBoard
    hyperparameters with those metrics; finishes the loggers. Returns the logged metrics."""
    loggers = list(loggers)
    numbers = {key: value for key, value in row.items()
               if not isinstance(value, bool) and key not in ("step", "seed")}
    metrics = _finite_scalars(numbers)
    for logger in loggers:
        logger.log_hyperparams(dict(config))
        if not isinstance(logger, TensorBoardLogger):  # TensorBoard: final/<key> with the hparams
            logger.log_metrics(metrics, step=step)
    if grid_path is not None:
        log_image(loggers, "samples", grid_path, step)
    finish_loggers(loggers, config, metrics, step)
    return metrics


def _hydra_callback_base() -> type:
    from hydra.experimental.callback import Callback

    return Callback


class ResultsSummary(_hydra_callback_base()):
    """Hydra callback (``hydra.callbacks``) of ``evaluate.py``: when a sweep ends, one W&B run
    (``name=summary``, ``job_type=eval``, group = the sweep) logs the sweep's whole results file as
    one typed table ``results`` (:func:`typed_table`). Nothing happens without a ``logger.wandb``
    entry; a single evaluation (no sweep) has only its own run.

    Args:
        table: the W&B table's key.
    """

    def __init__(self, table: str = "results") -> None:
        self.table = table

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from diffsweep.results import read_rows

        wandb_cfg = OmegaConf.select(config, "logger.wandb", default=None,
                                     throw_on_resolution_failure=False)
        if not wandb_cfg:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        # the default results_file names the job dir (unresolvable here): <sweep dir>/results.csv
        results_file = OmegaConf.select(config, "results_file", default=None,
                                        throw_on_resolution_failure=False)
        rows = read_rows(results_file or sweep_dir / "results.csv")
        if not rows:
            return

        def select(key: str, default: Any) -> Any:
            return OmegaConf.select(wandb_cfg, key, default=default,
                                    throw_on_resolution_failure=False)

        logger = wandb_logger(mode=select("mode", "auto"), name="summary", group=sweep_dir.name,
                              project=select("project", "diffsweep"), save_dir=str(sweep_dir),
                              job_type="eval", tags=list(select("tags", None) or []))
        columns, data = typed_table(rows)
        logger.log_table(key=self.table, columns=columns, data=data)
        logger.experiment.summary["num_jobs"] = len(rows)
        import wandb

        wandb.finish()
