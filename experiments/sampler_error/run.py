"""Sampler x schedule x NFE on the exact denoiser of a 2-D 8-mode Gaussian ring.

    python experiments/sampler_error/run.py            # ~2-4 min on 2 CPU cores
    python experiments/sampler_error/run.py --quick    # smoke run (fewer samples, in a temp folder)

Writes ``results.md`` and ``error_vs_nfe.png`` next to this file (see README.md); ``--quick``
writes them to ``QUICK_OUT`` instead, so a smoke run leaves the committed results alone. Both
depend on the data only: the same run writes the same files (the wall time goes to the console).

Per schedule (built from :mod:`diffsweep.schedules` with its defaults; grid from
:func:`diffsweep.grids.sigma_grid`: ``linspace`` for the discrete tables, so every NFE runs from
t = 999 to t = 0, and ``karras`` (rho = 7) on [sigma_min, sigma_max] for the continuous ones),
``NUM_SAMPLES`` starting points ``x~_T`` are drawn from the *exact* marginal at the grid's first
sigma~ (the ring convolved with N(0, sigma_max^2)), so all error comes from the sampler. Then for
every registered sampler and NFE budget in {5, 10, 20, 50, 100} (steps chosen so NFE <= budget):

(a) RMSE of the sample to the exact probability-flow ODE solution from the same ``x~_T``
    (float64 RK4, :meth:`GaussianMixture.probability_flow`), deterministic samplers only;
(b) MMD^2 to the exact ring (Gaussian kernel, bandwidth ``MMD_BANDWIDTH``; the ring-side terms
    are closed-form, see :func:`mmd_to_mixture`), all samplers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffsweep.analytic import GaussianMixture, mmd_to_mixture, rms_error  # noqa: E402
from diffsweep.grids import sigma_grid  # noqa: E402
from diffsweep.samplers import SAMPLERS  # noqa: E402
from diffsweep.schedules import (  # noqa: E402
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    NoiseSchedule,
    VESchedule,
)

HERE = Path(__file__).resolve().parent
#: Where ``--quick`` writes unless ``--out`` is given (not the committed results next to this file).
QUICK_OUT = Path(tempfile.gettempdir()) / "diffsweep_sampler_error_quick"
NFE_BUDGETS = (5, 10, 20, 50, 100)
NUM_SAMPLES = 4000
NUM_REFERENCE = 1000  # the first rows get an exact ODE solution (RMSE is over these)
MMD_BANDWIDTH = 0.2
RMSE_CLIP = 3.0  # the plot's RMSE axis stops here (heun's first steps on huge sigma~ blow up)
RING = dict(num_modes=8, radius=1.0, std=0.1)


def make_schedules() -> dict[str, tuple[NoiseSchedule, str]]:
    """name -> (schedule with its default parameters, grid spacing used)."""
    return {
        "linear": (DiscreteVPSchedule("linear"), "linspace"),
        "cosine": (DiscreteVPSchedule("squaredcos_cap_v2"), "linspace"),
        "vp_continuous": (ContinuousVPSchedule(), "karras"),
        "ve": (VESchedule(), "karras"),
        "edm": (EDMSchedule(), "karras"),
    }


@dataclass(frozen=True)
class Variant:
    """A sampler as it appears in the tables: registry name + options."""

    label: str
    name: str
    options: dict = field(default_factory=dict)


VARIANTS = [
    Variant("euler", "euler"),
    Variant("ddim", "ddim"),
    Variant("heun", "heun"),
    Variant("dpmpp_2m", "dpmpp_2m"),
    Variant("unipc (order 2)", "unipc", {"order": 2}),
    Variant("unipc (order 3)", "unipc", {"order": 3}),
    Variant("lms (order 4)", "lms", {"order": 4}),
    Variant("ddpm", "ddpm"),
    Variant("euler_ancestral", "euler_ancestral"),
    Variant("dpmpp_2m_sde", "dpmpp_2m_sde"),
]

STYLE = {  # label -> (color, marker)
    "euler": ("tab:blue", "o"), "ddim": ("tab:blue", "o"), "heun": ("tab:orange", "s"),
    "dpmpp_2m": ("tab:green", "^"), "unipc (order 2)": ("tab:red", "v"),
    "unipc (order 3)": ("tab:purple", "D"), "lms (order 4)": ("tab:brown", "P"),
    "ddpm": ("tab:gray", "x"), "euler_ancestral": ("tab:gray", "x"),
    "dpmpp_2m_sde": ("tab:olive", "*"),
}


def steps_for_budget(name: str, budget: int) -> int:
    """Largest step count whose NFE does not exceed ``budget`` (at least 1)."""
    nfe = SAMPLERS[name].nfe
    steps = budget
    while steps > 1 and nfe(steps) > budget:
        steps -= 1
    return steps


@dataclass
class Cell:
    steps: int
    nfe: int
    rmse: float | None
    mmd: float
    seconds: float
    samples: torch.Tensor


def run_schedule(mixture: GaussianMixture, schedule: NoiseSchedule, spacing: str,
                 num_samples: int, num_reference: int) -> tuple[dict, dict]:
    """All variants x budgets on one schedule:
    ({label: {budget: Cell}}, info about the schedule)."""
    references: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_and_reference(sigma_start: float) -> tuple[torch.Tensor, torch.Tensor]:
        if sigma_start not in references:
            x_start = mixture.sample(num_samples, torch.Generator().manual_seed(0),
                                     sigma=sigma_start)
            exact = mixture.probability_flow(x_start[:num_reference], sigma_start, 0.0,
                                             steps_per_unit_log_sigma=100)
            references[sigma_start] = x_start, exact
        return references[sigma_start]

    results: dict[str, dict[int, Cell]] = {}
    for variant in VARIANTS:
        if variant.name not in SAMPLERS:
            print(f"  skip {variant.label}: not registered")
            continue
        method = SAMPLERS[variant.name]
        results[variant.label] = {}
        for budget in NFE_BUDGETS:
            steps = steps_for_budget(variant.name, budget)
            sigmas = sigma_grid(schedule, steps, spacing)
            x_start, exact = start_and_reference(float(sigmas[0]))
            started = time.perf_counter()
            samples = method.fn(mixture, x_start.clone(), sigmas,
                                generator=torch.Generator().manual_seed(1), **variant.options)
            seconds = time.perf_counter() - started
            rmse = None if method.stochastic else rms_error(samples[:num_reference], exact)
            results[variant.label][budget] = Cell(steps, method.nfe(steps), rmse,
                                                  mmd_to_mixture(samples, mixture, MMD_BANDWIDTH),
                                                  seconds, samples)
    # The floor no sampler that ends with x0 = D(x, sigma_min) can beat: exact ODE down to the
    # grid's last nonzero sigma~, then that final denoising step, vs the exact ODE down to 0.
    sigmas = sigma_grid(schedule, 10, spacing)
    sigma_start, sigma_last = float(sigmas[0]), float(sigmas[-2])
    x_start, exact = start_and_reference(sigma_start)
    at_last = mixture.probability_flow(x_start[:num_reference], sigma_start, sigma_last,
                                       steps_per_unit_log_sigma=100)
    info = dict(sigma_max=sigma_start, sigma_min=sigma_last,
                final_step_floor=rms_error(mixture(at_last, sigma_last), exact))
    return results, info


def identical_to(results: dict[str, dict[int, Cell]]) -> dict[str, str]:
    """label -> earlier label whose samples are bitwise equal at every budget."""
    same = {}
    labels = list(results)
    for i, label in enumerate(labels):
        for earlier in labels[:i]:
            if earlier in same:
                continue
            if all(torch.equal(results[label][b].samples, results[earlier][b].samples)
                   for b in NFE_BUDGETS):
                same[label] = earlier
                break
    return same


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def write_markdown(path: Path, all_results: dict, infos: dict, spacings: dict,
                   mmd_floor: float, args: argparse.Namespace, reading: str) -> None:
    """``results.md``: a function of the results and settings only (no wall time, no date), so
    rerunning the study rewrites it byte for byte unless a number changed."""
    lines = [
        "# Sampler error vs NFE on an exact denoiser",
        "",
        "Generated by `python experiments/sampler_error/run.py` (do not edit by hand; "
        "see README.md).",
        "",
        f"Data: 2-D ring of {RING['num_modes']} Gaussians (radius {RING['radius']}, std "
        f"{RING['std']}), exact denoiser. {args.num_samples} samples from exact `x~_T`; "
        f"RMSE over the first {args.num_reference} against the exact probability-flow ODE "
        f"solution; MMD² (Gaussian kernel, bandwidth {MMD_BANDWIDTH}) to the exact ring — "
        f"exact samples of this size score |MMD²| ≤ {mmd_floor:.1e} (noise floor). "
        "Cells: value at the largest step count whose NFE fits the budget; heun uses 2n−1 "
        "evaluations for n steps, so its actual NFE is 5, 9, 19, 49, 99.",
        "",
    ]
    if reading:
        lines += ["## Reading", "", reading, ""]
    for schedule_name, results in all_results.items():
        info, same = infos[schedule_name], identical_to(results)
        lines += [
            f"## {schedule_name}",
            "",
            f"Grid: `sigma_grid(schedule, n, {spacings[schedule_name]!r})`, sigma~ from "
            f"{info['sigma_max']:.4g} down to {info['sigma_min']:.3g}, then 0. Final-step floor "
            f"(exact ODE to sigma~_min, then x0 = D(x, sigma~_min), vs the exact ODE to 0): "
            f"RMSE {info['final_step_floor']:.1e}.",
            "",
            "| sampler | " + " | ".join(f"NFE {b}" for b in NFE_BUDGETS) + " |",
            "|---|" + "---|" * len(NFE_BUDGETS),
        ]
        for label, row in results.items():
            note = f" (≡ {same[label]})" if label in same else ""
            nfes = [row[b].nfe for b in NFE_BUDGETS]
            if nfes != list(NFE_BUDGETS):
                note += " [NFE " + "/".join(map(str, nfes)) + "]"
            cells = [f"{fmt(row[b].rmse)} · {fmt(row[b].mmd)}" for b in NFE_BUDGETS]
            lines.append(f"| {label}{note} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: RMSE to the exact ODE solution · MMD² to the data "
                      "(– : stochastic sampler, no ODE target).", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, all_results: dict, infos: dict, mmd_floor: float) -> None:
    names = list(all_results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.0 * len(names), 7.6), sharey="row",
                             squeeze=False)
    for col, schedule_name in enumerate(names):
        results, info = all_results[schedule_name], infos[schedule_name]
        same = identical_to(results)
        top, bottom = axes[0, col], axes[1, col]
        for label, row in results.items():
            if label in same:
                continue
            color, marker = STYLE.get(label, ("black", "."))
            display = label + "".join(f" = {other}" for other, first in same.items()
                                      if first == label)
            nfes = [row[b].nfe for b in NFE_BUDGETS]
            stochastic = row[NFE_BUDGETS[0]].rmse is None
            if not stochastic:
                rmse = [row[b].rmse for b in NFE_BUDGETS]
                top.loglog(nfes, [min(v, RMSE_CLIP) for v in rmse], marker=marker, color=color,
                           label=display, ms=5)
                for nfe, value in zip(nfes, rmse):  # off-scale points: drawn at the edge, labelled
                    if value > RMSE_CLIP:
                        top.annotate(f"{value:.0e}", (nfe, RMSE_CLIP), xytext=(2, -10),
                                     textcoords="offset points", fontsize=7, color=color)
            bottom.loglog(nfes, [max(row[b].mmd, mmd_floor / 2) for b in NFE_BUDGETS],
                          marker=marker, color=color, ls="--" if stochastic else "-",
                          label=display, ms=5)
        top.axhline(info["final_step_floor"], color="k", ls=":", lw=1,
                    label="final-step floor")
        bottom.axhspan(mmd_floor / 2, mmd_floor, color="0.85", label="exact-sample noise")
        # order guides: slopes 1, 2, 4 from NFE 10 to 100
        x_guide = torch.tensor([10.0, 100.0])
        for order, y0 in ((1, 3e-1), (2, 1e-1), (4, 3e-1)):
            top.loglog(x_guide, y0 * (x_guide / 10) ** -order, color="0.6", lw=0.8)
            top.text(100, y0 * 10.0**-order, f" {order}", color="0.4", fontsize=8,
                     va="center")
        top.set_ylim(1e-5, RMSE_CLIP * 1.5)
        top.set_title(f"{schedule_name}\nσ~ {info['sigma_max']:.3g} → {info['sigma_min']:.2g}"
                      , fontsize=10)
        bottom.set_xlabel("NFE")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.25)
            ax.set_xticks(NFE_BUDGETS)
            ax.set_xticklabels([str(b) for b in NFE_BUDGETS])
    axes[0, 0].set_ylabel(f"RMSE to exact ODE solution (clipped at {RMSE_CLIP:g})")
    axes[1, 0].set_ylabel("MMD² to the data (log; floor clipped)")
    handles, labels = axes[1, 0].get_legend_handles_labels()
    top_handles, top_labels = axes[0, 0].get_legend_handles_labels()
    extra = [(h, lab) for h, lab in zip(top_handles, top_labels) if lab == "final-step floor"]
    handles += [h for h, _ in extra]
    labels += [lab for _, lab in extra]
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=9, frameon=False)
    fig.suptitle("Samplers on the exact denoiser of an 8-mode 2-D Gaussian ring: "
                 "deterministic error (top, grey guides = slopes 1, 2, 4), "
                 "distribution error (bottom, dashed = stochastic)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES)
    parser.add_argument("--num-reference", type=int, default=NUM_REFERENCE)
    parser.add_argument("--quick", action="store_true",
                        help=f"400 samples, 200 references, written to {QUICK_OUT} by default")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {HERE}; with --quick {QUICK_OUT})")
    parser.add_argument("--reading", type=Path, default=HERE / "reading.md",
                        help="hand-written interpretation pasted into results.md if present")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.num_reference = 400, 200
    if args.out is None:
        args.out = QUICK_OUT if args.quick else HERE
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and thrash on 2 cores)
    started = time.perf_counter()
    mixture = GaussianMixture.ring(**RING)
    mmd_floor = max(abs(mmd_to_mixture(mixture.sample(args.num_samples,
                                                      torch.Generator().manual_seed(seed)),
                                       mixture, MMD_BANDWIDTH)) for seed in range(10, 15))
    all_results, infos, spacings = {}, {}, {}
    for schedule_name, (schedule, spacing) in make_schedules().items():
        t0 = time.perf_counter()
        all_results[schedule_name], infos[schedule_name] = run_schedule(
            mixture, schedule, spacing, args.num_samples, args.num_reference)
        spacings[schedule_name] = spacing
        print(f"{schedule_name}: {time.perf_counter() - t0:.1f} s")
    total = time.perf_counter() - started
    reading = args.reading.read_text().strip() if args.reading.exists() else ""
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "results.md", all_results, infos, spacings, mmd_floor, args, reading)
    plot(args.out / "error_vs_nfe.png", all_results, infos, mmd_floor)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'error_vs_nfe.png'} ({total:.0f} s)")


if __name__ == "__main__":
    main()
