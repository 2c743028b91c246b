"""Grids with repeated sigma~ values: zero-length steps are skipped, except UniPC's final one.

A repeated value ``(s, s)`` is a step of length 0. Euler/DDIM/Heun would spend a network call to
stay put, and DPM-Solver++ (2M, 2M SDE), UniPC and LMS divide by the step length (a
ZeroDivisionError or NaN before). The contract tested here: a grid with repeats samples bitwise
as the grid with the repeats removed, with the same network calls and the same noise draws; a
grid of one repeated value is the identity with no network call. The one exception: a grid that
ends in a repeated value ``s > 0`` (diffusers' ``final_sigmas_type="sigma_min"``) makes UniPC
evaluate the net at ``s`` and correct its last step, once, as diffusers does
(tests/test_samplers_conformance.py compares every sampler with diffusers on such grids).
``nfe_on`` counts the calls made on every grid. Grids that increase, hold a negative or
non-finite value, or are not 1-D are refused before any network call.
"""

from __future__ import annotations

import pytest
import torch

from diffsweep.analytic import GaussianMixture
from diffsweep.grids import check_sigma_grid, sigma_grid
from diffsweep.samplers import SAMPLERS
from diffsweep.schedules import EDMSchedule

pytestmark = pytest.mark.usefixtures("single_thread")

MIXTURE = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]),
                          torch.tensor([0.25, 0.5]))
BASE = sigma_grid(EDMSchedule(sigma_min=0.01, sigma_max=20.0), 8, "karras")  # 9 values, last 0

#: (sampler, options): every registered sampler with its defaults, plus the options that change
#: its step (churn, SDE noise, a higher order, x0 clipping).
CASES = [(name, {}) for name in sorted(SAMPLERS)] + [
    ("heun", {"s_churn": 2.0}),
    ("dpmpp_2m_sde", {"eta": 0.5}),
    ("unipc", {"order": 3}),
    ("lms", {"order": 2}),
    ("ddim", {"eta": 0.5, "clip_sample": True, "clip_sample_range": 0.8}),
    ("ddpm", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in CASES]


class CountingDenoiser:
    """The mixture's exact denoiser, counting its calls and the sigmas it was called at."""

    def __init__(self) -> None:
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.sigmas.append(float(sigma))
        return MIXTURE(x, sigma)


def _start() -> torch.Tensor:
    return 20.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)


def _run(name: str, options: dict, sigmas: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    denoiser = CountingDenoiser()
    out = SAMPLERS[name].fn(denoiser, _start(), sigmas, generator=torch.Generator().manual_seed(1),
                            **options)
    return out, denoiser.sigmas


def _with_repeats(grid: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """``grid`` with ``grid[i]`` written twice for each i in ``positions``."""
    values = grid.tolist()
    out = []
    for i, value in enumerate(values):
        out += [value] * (1 + positions.count(i))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("positions", [[4], [0], [8], [0, 3, 3, 7, 8]],
                         ids=["middle", "first", "final-zero", "several"])
def test_repeated_sigma_samples_as_the_grid_without_it(name, options, positions):
    repeated = _with_repeats(BASE, positions)
    assert len(repeated) == len(BASE) + len(positions)
    expected, expected_calls = _run(name, options, BASE)
    got, calls = _run(name, options, repeated)
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected)
    assert calls == expected_calls  # same network calls, none spent on a zero-length step
    assert float((got - _start()).abs().max()) > 1.0  # it did sample


#: A grid that stops short of 0: 8 values ending at sigma~ = 0.01 (diffusers' sigma_min grids).
POSITIVE_END = BASE[:-1]


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_repeated_final_positive_sigma_is_skipped_except_by_unipc(name, options):
    """Every sampler but UniPC: bitwise the grid without the repeat. UniPC: one more call, at the
    repeated sigma, whose corrector changes the result (tests/test_sampler_order.py: it completes
    the last step's order)."""
    assert float(POSITIVE_END[-1]) > 0
    expected, expected_calls = _run(name, options, POSITIVE_END)
    got, calls = _run(name, options, _with_repeats(POSITIVE_END, [7]))
    assert torch.isfinite(got).all()
    if name == "unipc":
        assert calls == expected_calls + [float(POSITIVE_END[-1])]
        assert float((got - expected).abs().max()) > 1e-4
    else:
        assert torch.equal(got, expected) and calls == expected_calls


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("positions", [[7, 7], [0, 3, 7], [2, 2, 7, 7, 7]],
                         ids=["twice", "mid-and-final", "several"])
def test_unipc_final_corrector_is_applied_once(order, positions):
    """Mid-grid repeats change nothing and further repeats of the final value call nothing: the
    result and the calls are those of one final repeat."""
    expected, expected_calls = _run("unipc", {"order": order}, _with_repeats(POSITIVE_END, [7]))
    got, calls = _run("unipc", {"order": order}, _with_repeats(POSITIVE_END, positions))
    assert torch.equal(got, expected) and calls == expected_calls


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("grid", [BASE, _with_repeats(BASE, [0, 3, 3, 7, 8]), POSITIVE_END,
                                  _with_repeats(POSITIVE_END, [2, 7]),
                                  torch.tensor([3.0, 3.0], dtype=torch.float64)],
                         ids=["base", "repeats", "positive-end", "positive-end-repeats",
                              "zero-length"])
def test_nfe_on_counts_the_calls_made(name, options, grid):
    _, calls = _run(name, options, grid)
    assert SAMPLERS[name].nfe_on(grid, options) == len(calls)


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("grid", [[3.0, 3.0], [3.0, 3.0, 3.0], [0.0, 0.0]])
def test_zero_length_grid_is_the_identity(name, options, grid):
    """Euler, DDIM, Heun and all others: a step from s to s changes nothing, calls nothing."""
    x, denoiser = _start(), CountingDenoiser()
    out = SAMPLERS[name].fn(denoiser, x.clone(), torch.tensor(grid, dtype=torch.float64),
                            generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(out, x)
    assert denoiser.sigmas == []


@pytest.mark.parametrize("name", ["euler", "ddim", "heun"])
def test_zero_length_step_mid_grid_is_a_no_op(name):
    """Stopping at sigma~ = s (a partial grid): one more step from s to s leaves the state as is."""
    partial = BASE[:5]
    expected, expected_calls = _run(name, {}, partial)
    got, calls = _run(name, {}, torch.cat([partial, partial[-1:]]))
    assert torch.equal(got, expected) and calls == expected_calls


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_increasing_grid_is_refused_before_any_network_call(name):
    denoiser = CountingDenoiser()
    grid = torch.tensor([5.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"non-increasing.*sigmas\[1\] = 1.0 < sigmas\[2\] = 2.0"):
        SAMPLERS[name].fn(denoiser, _start(), grid)
    assert denoiser.sigmas == []


@pytest.mark.parametrize("grid,message", [
    (torch.tensor([5.0, -1.0]), r"finite values >= 0; sigmas\[1\] = -1.0"),
    (torch.tensor([float("nan"), 0.0]), r"finite values >= 0; sigmas\[0\] = nan"),
    (torch.tensor([float("inf"), 0.0]), r"finite values >= 0; sigmas\[0\] = inf"),
    (torch.ones(2, 2), r"1-D tensor.*\(2, 2\)"),
    (torch.tensor([]), r"1-D tensor of at least one value"),
    ([1.0, 0.0], r"1-D tensor.*list"),
])
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(ValueError, match=message):
        check_sigma_grid(grid)


def test_grids_with_repeats_pass_the_check():
    check_sigma_grid(torch.tensor([3.0, 3.0, 1.0, 0.0, 0.0]))
    check_sigma_grid(BASE)
