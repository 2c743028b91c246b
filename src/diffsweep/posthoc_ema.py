"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Section 3 and Appendix C.2): choose the EMA length after training.

**Power-function EMA.** After ``t`` optimizer steps the average of the weights ``theta_1..theta_t``
has the profile ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]``, with ``theta_i``
standing for the interval ``(i - 1, i]``. It is tracked by ``ema <- beta ema + (1 - beta) theta``
with ``beta_t = (1 - 1/t)^(gamma + 1)`` (:func:`power_function_beta`; ``beta_1 = 0``: the first
update is a copy). The discrete weights are then exactly the profile integrated over each step,
``w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1)`` (:func:`discrete_profile`), so the
reconstruction below is exact in its model. ``t`` is Lightning's ``global_step`` after the
update, the time unit of EDM2's code (``t_delta / t_next`` with images as the unit is the same
ratio).

**Relative width.** ``sigma_rel`` is the profile's standard deviation over its length,
``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))`` (:func:`gamma_to_sigma_rel`); the
inverse solves that cubic for its largest real root (the paper's Algorithm 2,
:func:`sigma_rel_to_gamma`). A power function reaches at most :data:`SIGMA_REL_MAX` ~= 0.3003 (at
``gamma = (sqrt(5) - 3) / 2``); 0.05 and 0.10 are ``gamma`` 16.97 and 6.94.

**Reconstruction.** Snapshots of two (or more) such EMAs taken every N steps span other profiles:
the least-squares combination ``x = A^-1 b`` of the snapshots' profiles closest in L2 to the
target profile (``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``, closed form in
:func:`profile_inner_product`; Algorithm 3), normalised to sum to 1 as EDM2's
``solve_posthoc_coefficients`` does (an affine combination: a weight constant over training is
reproduced, not scaled by ``sum(x)``). The weights of the reconstructed EMA are
``sum_i x_i snapshot_i`` (:func:`reconstruct`).

**Snapshots** are safetensors files ``<run dir>/posthoc_ema/step_<step:08d>.safetensors``, one per
step, holding every tracked profile's averaged parameters under ``"<sigma_rel>/<parameter name>"``
(module ``state_dict`` names) and the step, sigma_rels and gammas in the header. Their cost is
:func:`snapshot_bytes` x :func:`snapshot_count`. :func:`load_profile` turns a checkpoint of a run
trained with ``ema=posthoc`` into the state dict of any ``sigma_rel``.

Conventions vs ``ema-pytorch`` 0.8 (``PostHocEMA``): the same cubic, inner product and solve
(without the normalisation); its ``KarrasEMA`` starts with ``beta = (1 - 1/2)^(gamma+1)`` on a copy
and files a snapshot after ``n`` updates under step ``n``, i.e. its profile is that of ``t = n + 1``
here; its ``sigma_rel_to_gamma`` returns the real part of a complex root for ``sigma_rel`` above
:data:`SIGMA_REL_MAX` instead of an error.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsweep.files import atomic_write_bytes, remove_stale_partials

log = logging.getLogger(__name__)

#: ``gamma`` of the widest power-function profile: the root of ``gamma^2 + 3 gamma + 1``.
GAMMA_OF_SIGMA_REL_MAX = (math.sqrt(5.0) - 3.0) / 2.0
#: The largest relative width a power-function EMA profile has (~0.30028).
SIGMA_REL_MAX = math.sqrt((GAMMA_OF_SIGMA_REL_MAX + 1)
                          / ((GAMMA_OF_SIGMA_REL_MAX + 2) ** 2 * (GAMMA_OF_SIGMA_REL_MAX + 3)))
#: Folder of the snapshots inside a run directory.
SNAPSHOT_DIR = "posthoc_ema"
#: ``format`` entry of a snapshot file's header.
SNAPSHOT_FORMAT = "diffsweep.posthoc_ema.v1"
#: Snapshot dtypes (config ``dtype``) and their bytes per element.
SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SNAPSHOT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


# --------------------------------------------------------------------------------------------
# sigma_rel <-> gamma, the per-step beta, profiles


def check_sigma_rel(sigma_rel: Any, key: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or a ValueError naming ``key``, the value and the allowed range
    ``0 < sigma_rel <= SIGMA_REL_MAX``."""
    allowed = (f"a relative EMA width 0 < {key} <= {SIGMA_REL_MAX:.4f} (the widest power-function "
               f"profile), e.g. 0.05, 0.10")
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float, np.integer,
                                                                  np.floating)):
        raise ValueError(f"{key}={sigma_rel!r} is not a number; expected {allowed}.")
    value = float(sigma_rel)
    if not (0.0 < value <= SIGMA_REL_MAX):  # also refuses nan
        raise ValueError(f"{key}={sigma_rel!r} is out of range; expected {allowed}.")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the profile ``tau^gamma`` on ``[0, 1]`` (``gamma > -1``)."""
    gamma = float(gamma)
    if not gamma > -1.0:
        raise ValueError(f"gamma={gamma!r} is out of range; a power-function EMA needs gamma > -1.")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function profile of relative width ``sigma_rel``.

    The largest real root of ``gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2`` (Algorithm 2);
    ``sigma_rel`` outside ``(0, SIGMA_REL_MAX]`` raises ValueError (there the cubic's only real
    root is below -1: no power-function profile is that wide).
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    inverse_square = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    # at the widest profile the root is double: np.roots may give it a tiny imaginary part
    real = roots.real[np.abs(roots.imag) <= 1e-6 * np.maximum(1.0, np.abs(roots))]
    gamma = float(real.max()) if real.size else GAMMA_OF_SIGMA_REL_MAX
    return max(gamma, GAMMA_OF_SIGMA_REL_MAX)


def power_function_beta(gamma: float, step: int, step_delta: int = 1) -> float:
    """Decay of the power-function EMA for the update that brings it to ``step`` optimizer steps,
    ``step_delta`` steps after the previous update: ``(1 - step_delta / step)^(gamma + 1)``; 0 for
    the first update (``step == step_delta``: a copy)."""
    if step < 1 or not 1 <= step_delta <= step:
        raise ValueError(f"power_function_beta needs step >= step_delta >= 1; got step={step}, "
                         f"step_delta={step_delta}.")
    return (1.0 - step_delta / step) ** (gamma + 1.0)


def discrete_profile(gamma: float, step: int, length: int | None = None) -> Tensor:
    """Weights of ``theta_1..theta_length`` (float64, zero after ``step``) in the power-function EMA
    after ``step`` steps: ``(i^(gamma+1) - (i-1)^(gamma+1)) / step^(gamma+1)``; they sum to 1."""
    length = step if length is None else length
    index = torch.arange(1, length + 1, dtype=torch.float64)
    exponent = gamma + 1.0
    weights = ((index / step) ** exponent - ((index - 1) / step) ** exponent)
    return torch.where(index <= step, weights, torch.zeros((), dtype=torch.float64))


def profile_inner_product(step_a: Tensor, gamma_a: Tensor, step_b: Tensor,
                          gamma_b: Tensor) -> Tensor:
    """``<p_a, p_b>`` of power-function profiles (broadcasting, float64): for ``t_a < t_b``,
    ``(g_a+1)(g_b+1) / (g_a+g_b+1) (t_a/t_b)^g_b / t_b``, else with the roles swapped (the paper's
    ``p_dot_p``)."""
    step_a, gamma_a, step_b, gamma_b = (torch.as_tensor(value, dtype=torch.float64)
                                        for value in (step_a, gamma_a, step_b, gamma_b))
    ratio = step_a / step_b
    exponent = torch.where(step_a < step_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent
    return numerator / ((gamma_a + gamma_b + 1) * torch.maximum(step_a, step_b))


def solve_weights(steps: Sequence[float] | Tensor, gammas: Sequence[float] | Tensor,
                  target_step: float, target_gamma: float, normalize: bool = True) -> Tensor:
    """Least-squares coefficients (float64, shape ``(n,)``) of the ``n`` snapshot profiles
    ``(steps[i], gammas[i])`` whose combination is closest in L2 to the target profile; with
    ``normalize`` scaled to sum to 1 (EDM2), without it the paper's Algorithm 3 (ema-pytorch)."""
    steps = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    gammas = torch.as_tensor(gammas, dtype=torch.float64).reshape(-1)
    if steps.numel() == 0 or steps.shape != gammas.shape:
        raise ValueError(f"solve_weights needs one gamma per snapshot step and at least one "
                         f"snapshot; got {steps.numel()} steps and {gammas.numel()} gammas.")
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = profile_inner_product(steps, gammas,
                                   torch.tensor(float(target_step), dtype=torch.float64),
                                   torch.tensor(float(target_gamma), dtype=torch.float64))
    weights = torch.linalg.solve(gram, target)
    return weights / weights.sum() if normalize else weights


def profile_error(steps: Sequence[float] | Tensor, gammas: Sequence[float] | Tensor,
                  weights: Tensor, target_step: float, target_gamma: float) -> float:
    """Relative L2 distance ``||p_target - sum_i w_i p_i|| / ||p_target||`` of a reconstructed
    profile (closed form from the inner products)."""
    steps = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    gammas = torch.as_tensor(gammas, dtype=torch.float64).reshape(-1)
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    target_step_t = torch.tensor(float(target_step), dtype=torch.float64)
    target_gamma_t = torch.tensor(float(target_gamma), dtype=torch.float64)
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    cross = profile_inner_product(steps, gammas, target_step_t, target_gamma_t)
    norm = profile_inner_product(target_step_t, target_gamma_t, target_step_t, target_gamma_t)
    squared = norm - 2 * weights @ cross + weights @ gram @ weights
    return float(torch.sqrt(torch.clamp(squared, min=0.0) / norm))


@torch.no_grad()
def update_power_ema(averages: list[Tensor], current: list[Tensor], beta: float) -> None:
    """``average <- beta average + (1 - beta) current`` in place, one fused ``_foreach_lerp_``
    (``beta = 0`` copies exactly); ``current`` must match ``averages`` in device and dtype."""
    if averages:
        torch._foreach_lerp_(averages, current, 1.0 - beta)


# --------------------------------------------------------------------------------------------
# snapshot budget


def snapshot_count(max_steps: int, every_n_steps: int) -> int:
    """Snapshot files of a run of ``max_steps`` steps: one every ``every_n_steps`` and one at the
    last step when it is not a multiple (``ceil(max_steps / every_n_steps)``)."""
    return -(-int(max_steps) // int(every_n_steps)) if max_steps > 0 else 0


def snapshot_bytes(num_parameters: int, num_profiles: int = 2, dtype: str = "float32",
                   header_bytes: int = 0) -> int:
    """Bytes of one snapshot file: ``num_parameters x num_profiles x bytes per element`` (+ the
    safetensors header, about 100-150 bytes per tensor and profile; pass it to include it)."""
    return int(num_parameters) * int(num_profiles) * _dtype(dtype).itemsize + int(header_bytes)


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a snapshot dtype; choose one of "
                         f"{', '.join(SNAPSHOT_DTYPES)}.")
    return SNAPSHOT_DTYPES[dtype]


# --------------------------------------------------------------------------------------------
# snapshot files


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: the averaged parameters of every profile after ``step`` steps."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]


def snapshot_path(directory: str | Path, step: int) -> Path:
    """The file of the snapshot after ``step`` optimizer steps."""
    return Path(directory) / f"step_{int(step):08d}.safetensors"


def _profile_key(sigma_rel: float) -> str:
    return repr(float(sigma_rel))


def write_snapshot(directory: str | Path, step: int,
                   averages: Mapping[float, Mapping[str, Tensor]],
                   dtype: str = "float32") -> Path:
    """Write ``{sigma_rel: {parameter name: averaged tensor}}`` after ``step`` steps atomically
    (:func:`diffsweep.files.atomic_write_bytes`); returns the file."""
    from safetensors.torch import save

    torch_dtype = _dtype(dtype)
    sigma_rels = [check_sigma_rel(sigma_rel, "sigma_rels") for sigma_rel in averages]
    tensors = {f"{_profile_key(sigma_rel)}/{name}":
               tensor.detach().to("cpu", torch_dtype if tensor.is_floating_point()
                                  else tensor.dtype).contiguous()
               for sigma_rel, named in zip(sigma_rels, averages.values())
               for name, tensor in named.items()}
    metadata = {"format": SNAPSHOT_FORMAT, "step": str(int(step)),
                "sigma_rels": json.dumps(sigma_rels),
                "gammas": json.dumps([sigma_rel_to_gamma(s) for s in sigma_rels]),
                "dtype": dtype}
    path = snapshot_path(directory, step)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_snapshot_info(path: str | Path) -> Snapshot:
    """The header of a snapshot file (no tensor is read); ValueError for a file that is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - any read failure means a bad file
        raise ValueError(f"Post-hoc EMA snapshot {path} could not be read ({error}); delete it "
                         f"or retrain.") from error
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a diffsweep post-hoc EMA snapshot (format "
                         f"{metadata.get('format')!r}, expected {SNAPSHOT_FORMAT!r}).")
    return Snapshot(path, int(metadata["step"]), tuple(json.loads(metadata["sigma_rels"])),
                    tuple(json.loads(metadata["gammas"])))


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots in ``directory``, by step (none: empty list)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [read_snapshot_info(path) for path in directory.iterdir()
             if _SNAPSHOT_NAME.match(path.name)]
    return sorted(found, key=lambda snapshot: snapshot.step)


def drop_snapshots_after(directory: str | Path, step: int) -> list[Path]:
    """Delete the snapshots after ``step`` (written by a run that was killed after its last
    checkpoint, or by another run in this folder) and leftover partial files; returns the
    deleted snapshot files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    dropped = []
    for path in sorted(directory.iterdir()):
        match = _SNAPSHOT_NAME.match(path.name)
        if match and int(match.group(1)) > step:
            path.unlink(missing_ok=True)
            dropped.append(path)
    remove_stale_partials(directory, recursive=False)  # atomic_writer's partials of killed writes
    return dropped


# --------------------------------------------------------------------------------------------
# reconstruction


@dataclass(frozen=True)
class Reconstruction:
    """The weights of a reconstructed profile and how they were made."""

    state: dict[str, Tensor]
    sigma_rel: float
    gamma: float
    step: int
    sources: tuple[tuple[int, float], ...]   # (step, sigma_rel) of every snapshot profile used
    coefficients: Tensor                      # float64, one per source
    profile_error: float                      # relative L2 error of the reconstructed profile


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None,
                source_sigma_rels: Sequence[float] | None = None,
                normalize: bool = True) -> Reconstruction:
    """The EMA of relative width ``sigma_rel`` after ``step`` steps (default: the last snapshot's)
    as the least-squares combination of the snapshot profiles at steps ``<= step`` (all tracked
    profiles, or those in ``source_sigma_rels``). A snapshot must exist at ``step``. Tensors are
    accumulated in float64 and returned in float32 (integer tensors: the last snapshot's)."""
    from safetensors import safe_open

    sigma_rel = check_sigma_rel(sigma_rel)
    gamma = sigma_rel_to_gamma(sigma_rel)
    if not snapshots:
        raise ValueError("No post-hoc EMA snapshots to reconstruct from.")
    available = sorted({snapshot.step for snapshot in snapshots})
    step = available[-1] if step is None else int(step)
    if step not in available:
        before = [s for s in available if s < step][-3:]
        after = [s for s in available if s > step][:3]
        raise ValueError(f"No post-hoc EMA snapshot at step {step}; snapshots exist at steps "
                         f"{available[0]}..{available[-1]} (nearest: {before + after}). Use a "
                         f"checkpoint (or step=) at a snapshot step.")
    wanted = None if source_sigma_rels is None else [check_sigma_rel(s, "source_sigma_rels")
                                                      for s in source_sigma_rels]
    sources: list[tuple[Snapshot, int, float]] = []  # (file, profile index, gamma)
    for snapshot in snapshots:
        if snapshot.step > step:
            continue
        for index, (tracked, tracked_gamma) in enumerate(zip(snapshot.sigma_rels,
                                                              snapshot.gammas)):
            if wanted is None or any(math.isclose(tracked, s, rel_tol=1e-9) for s in wanted):
                sources.append((snapshot, index, tracked_gamma))
    if not sources:
        raise ValueError(f"None of the snapshots up to step {step} tracks "
                         f"source_sigma_rels={list(source_sigma_rels or [])}.")
    source_steps = [float(snapshot.step) for snapshot, _, _ in sources]
    source_gammas = [source_gamma for _, _, source_gamma in sources]
    coefficients = solve_weights(source_steps, source_gammas, step, gamma, normalize=normalize)
    error = profile_error(source_steps, source_gammas, coefficients, step, gamma)

    accumulated: dict[str, Tensor] = {}
    names: list[str] | None = None
    for (snapshot, index, _), coefficient in zip(sources, coefficients.tolist()):
        prefix = f"{_profile_key(snapshot.sigma_rels[index])}/"
        with safe_open(str(snapshot.path), framework="pt") as handle:
            keys = [key for key in handle.keys() if key.startswith(prefix)]
            profile_names = sorted(key[len(prefix):] for key in keys)
            if names is None:
                names = profile_names
            elif profile_names != names:
                raise ValueError(f"{snapshot.path} holds other parameters than the other "
                                 f"snapshots ({len(profile_names)} vs {len(names)}); the folder "
                                 f"mixes runs of different models.")
            for name in names:
                tensor = handle.get_tensor(prefix + name)
                if not tensor.is_floating_point():
                    accumulated[name] = tensor
                    continue
                term = tensor.to(torch.float64) * coefficient
                if name in accumulated:
                    accumulated[name] += term
                else:
                    accumulated[name] = term
    state = {name: value.to(torch.float32) if value.is_floating_point() else value
             for name, value in accumulated.items()}
    return Reconstruction(state, sigma_rel, gamma, step,
                          tuple((snapshot.step, snapshot.sigma_rels[index])
                                for snapshot, index, _ in sources), coefficients, error)


def snapshot_dir_for(ckpt_path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> Path:
    """The snapshot folder of a checkpoint's run: ``<run dir>/posthoc_ema`` beside the checkpoint
    (``<run dir>/checkpoints/x.ckpt`` or ``<run dir>/x.ckpt``), else the one the run's stored
    config names; FileNotFoundError when none exists."""
    ckpt_path = Path(ckpt_path).resolve()
    candidates = [ckpt_path.parent.parent / SNAPSHOT_DIR, ckpt_path.parent / SNAPSHOT_DIR]
    stored = ((checkpoint or {}).get("diffsweep_config") or {}).get("callbacks") or {}
    configured = (stored.get("posthoc_ema") or {}).get("output_dir")
    if configured:
        candidates.append(Path(configured) / SNAPSHOT_DIR)
    for candidate in candidates:
        if list_snapshots(candidate):
            return candidate
    raise FileNotFoundError(
        f"No post-hoc EMA snapshots for {ckpt_path}: looked in "
        f"{', '.join(str(c) for c in dict.fromkeys(candidates))}. ema.sigma_rel needs a run "
        f"trained with ema=posthoc (snapshots in <run dir>/{SNAPSHOT_DIR}/).")


def load_profile(ckpt_path: str | Path, sigma_rel: float, step: int | None = None, *,
                 snapshot_dir: str | Path | None = None,
                 checkpoint: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """The module ``state_dict`` of a checkpoint with its EMA parameters replaced by the
    ``sigma_rel`` profile reconstructed from the run's snapshots at ``step`` (default: the
    checkpoint's ``global_step``); the other entries are the checkpoint's ``state_dict``.

    ``snapshot_dir`` defaults to :func:`snapshot_dir_for`; ``checkpoint`` (the already loaded
    dict) saves a second read. A bad ``sigma_rel`` raises before any file is read.
    """
    from diffsweep.checkpoints import read_checkpoint, strip_compile_prefix

    sigma_rel = check_sigma_rel(sigma_rel, "ema.sigma_rel")
    checkpoint = read_checkpoint(ckpt_path) if checkpoint is None else checkpoint
    directory = Path(snapshot_dir) if snapshot_dir is not None else snapshot_dir_for(
        ckpt_path, checkpoint)
    snapshots = list_snapshots(directory)
    if not snapshots:
        raise FileNotFoundError(f"No post-hoc EMA snapshots in {directory}; train with "
                                f"ema=posthoc.")
    step = int(checkpoint.get("global_step", snapshots[-1].step)) if step is None else int(step)
    result = reconstruct(snapshots, sigma_rel, step)
    state = strip_compile_prefix(dict(checkpoint["state_dict"]))
    for name, value in result.state.items():
        if name not in state or state[name].shape != value.shape:
            raise ValueError(f"Snapshot parameter {name!r} ({tuple(value.shape)}) does not match "
                             f"the checkpoint {ckpt_path} (" + (
                                 f"{tuple(state[name].shape)}" if name in state else "missing")
                             + f"); {directory} belongs to another run.")
        state[name] = value.to(state[name].dtype)
    sources = sorted({s for _, s in result.sources})
    log.info("Post-hoc EMA sigma_rel=%.4g (gamma=%.3f) at step %d from %d snapshot profiles "
             "(sigma_rels %s, steps %d..%d): profile L2 error %.2f%%", sigma_rel, result.gamma,
             step, len(result.sources), sources, min(s for s, _ in result.sources),
             max(s for s, _ in result.sources), 100 * result.profile_error)
    return state


__all__ = ["GAMMA_OF_SIGMA_REL_MAX", "Reconstruction", "SIGMA_REL_MAX", "SNAPSHOT_DIR",
           "SNAPSHOT_DTYPES", "SNAPSHOT_FORMAT", "Snapshot", "check_sigma_rel",
           "discrete_profile", "drop_snapshots_after", "gamma_to_sigma_rel", "list_snapshots",
           "load_profile", "power_function_beta", "profile_error", "profile_inner_product",
           "read_snapshot_info", "reconstruct", "sigma_rel_to_gamma", "snapshot_bytes",
           "snapshot_count", "snapshot_dir_for", "snapshot_path", "solve_weights",
           "update_power_ema", "write_snapshot"]
