"""Paper claims in miniature: results CSVs -> ``results.md`` (claim tables) and plots.

    python experiments/paper_claims/analyze.py [--sd3 experiments/paper_claims/sd3_results.csv] \
        [--results logs/fmnist_studies/results.csv --ztsnr logs/fmnist_studies/results_ztsnr.csv]

``--results``: the Fashion-MNIST models' evaluations shared with vp_vs_ve and step_count (DDIM
Table 1, EDM, DPM-Solver++/UniPC, iDDPM, Lin et al. read their cells from it); ``--ztsnr``: the
zero-terminal-SNR model's. The rows used are copied to ``fmnist_results.csv`` here, which is also
the default input, so the tables regenerate from committed files alone.

Each claim is a table "claim | paper's figure | our result | holds?" followed by the FID cells
(mean +- sd over noise seeds, n = seeds). A claim "holds" when its ordering holds for the seed
means and the gap is larger than the two cells' summed standard deviations; "within noise" when
the means order as claimed but the gap is smaller than that; "no" otherwise. Where both cells
were sampled from the same noise seeds (the Fashion-MNIST claims) the verdict is taken on the
seed-paired difference instead: "yes" when its mean is above its sd. ``results.md`` is written by
this script only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SD3_ORDER = ("rf/lognorm(0.00, 1.00)", "rf/uniform", "eps/linear")


def cells(rows: Sequence[dict[str, str]]) -> dict[str, dict[int, list[float]]]:
    """``{formulation: {nfe: [fid per seed]}}``."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        out[row["formulation"]][int(float(row["nfe"]))].append(float(row["fid"]))
    return {name: dict(values) for name, values in out.items()}


FIDs = Sequence[float] | Mapping[str, float]  # one cell: FIDs, or {noise seed: FID}


sys.path.insert(0, str(HERE.parent))  # experiments/: the studies' analyze scripts import each other
from vp_vs_ve import analyze as base  # noqa: E402  (shared helpers: cells, mean ± sd, seed pairing)

paired_delta = base.paired_delta


def mean_sd(values: FIDs) -> tuple[float, float]:
    """Mean and sd of a cell's FIDs (0 sd for one)."""
    return base.mean_sd(list(values.values()) if isinstance(values, Mapping) else list(values))


def show(values: FIDs) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f} (n={len(values)})"


def verdict(better: Sequence[float], worse: Sequence[float]) -> str:
    """``yes`` / ``within noise`` / ``no`` for the claim mean(better) < mean(worse)."""
    (mean_b, sd_b), (mean_w, sd_w) = mean_sd(better), mean_sd(worse)
    if mean_b >= mean_w:
        return "no"
    return "yes" if mean_w - mean_b > sd_b + sd_w else "within noise"


def paired_verdict(better: Mapping[str, float], worse: Mapping[str, float]) -> str:
    """:func:`verdict` on the seed-paired difference when there is one (``yes``: its mean is
    above its sd), else on the two cells."""
    paired = paired_delta(better, worse)
    if paired is None:
        return verdict(list(better.values()), list(worse.values()))
    mean, sd, _ = paired
    if mean <= 0:
        return "no"
    return "yes" if mean > sd else "within noise"


Cells = dict[int, dict[str, float]]  # {nfe (or S): {noise seed: fid}}


options_of = base.options_of


def fid_cells(rows: Sequence[dict[str, str]], schedule: str, sampler: str, spacing: str,
              **options: str) -> Cells:
    """``{nfe: {seed: fid}}`` of one model (training ``schedule``) and sampler cell; ``options``
    must match the row's sampler options (e.g. ``eta="0.5"``)."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if (row.get("train_scheduler"), row["sampler"], row.get("spacing")) != (
                schedule, sampler, spacing) or row.get("sigma_rel") or row.get("fid", "") == "":
            continue
        given = options_of(row)
        if all(given.get(key) == value for key, value in options.items()):
            out[int(float(row["nfe"]))][row.get("seed", "")] = float(row["fid"])
    return dict(out)


def cell_table(columns: Sequence[int], named: Sequence[tuple[str, Cells]], axis: str = "NFE"
               ) -> list[str]:
    """Markdown rows: one per ``(name, cells)``, one column per NFE; missing cells are ``–``."""
    lines = ["| | " + " | ".join(f"{axis} {c}" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, table in named:
        lines.append(f"| {name} | " + " | ".join(show(table[c]) if c in table else "–"
                                                 for c in columns) + " |")
    return lines


CLAIM_HEADER = ["| claim | paper's figure | our result | holds? |", "|---|---|---|---|"]


def claim_line(claim: str, figure: str, better: Mapping[str, float] | None,
               worse: Mapping[str, float] | None) -> str:
    """One claim row "``better`` has the lower FID" (judged on the seed-paired difference), or
    "not run" when a cell is missing."""
    if not better or not worse:
        return f"| {claim} | {figure} | not run | – |"
    ours = f"{mean_sd(better)[0]:.2f} vs {mean_sd(worse)[0]:.2f}"
    paired = paired_delta(better, worse)
    if paired is not None:
        ours += f" (paired Δ {paired[0]:+.2f} ± {paired[1]:.2f}, n={paired[2]})"
    return f"| {claim} | {figure} | {ours} | {paired_verdict(better, worse)} |"


DDIM_ETAS = ("0.0", "0.2", "0.5", "1.0")
DDIM_STEPS = (10, 20)


def ddim_section(rows: Sequence[dict[str, str]], schedule: str = "linear") -> list[str]:
    """DDIM Table 1: FID over eta x S; claim: eta = 0 is best at small S."""
    tables = {eta: fid_cells(rows, schedule, "ddim", "leading", eta=eta) for eta in DDIM_ETAS}
    lines = ["## DDIM Table 1 in miniature (Song et al. 2021, arXiv:2010.02502)", "",
             f"The {schedule}-schedule model, DDIM on the leading grid (the paper: quadratic tau "
             "on CIFAR-10), S = steps = NFE.", "",
             *cell_table(DDIM_STEPS, [(f"eta {eta}", tables[eta]) for eta in DDIM_ETAS], "S"),
             "", *CLAIM_HEADER]
    figures = {(10, "0.2"): "eta 0: 13.36 at S = 10", (20, "1.0"): "eta 1: 18.36 at S = 20"}
    for steps in DDIM_STEPS:
        for eta in DDIM_ETAS[1:]:
            lines.append(claim_line(f"eta 0 beats eta {eta} at S = {steps}",
                                    figures.get((steps, eta), "–"), tables["0.0"].get(steps),
                                    tables[eta].get(steps)))
    return lines


def edm_section(rows: Sequence[dict[str, str]], schedules: Sequence[str] = ("linear", "cosine")
                ) -> list[str]:
    """EDM: Heun on the karras grid vs Euler (= DDIM eta 0) on the VP model's own grid."""
    lines = ["## EDM sampler in miniature (Karras et al. 2022, arXiv:2206.00364, Sec. 3)", "",
             "Heun (2nd order) on the karras grid (rho 7) against Euler on the VP model's own "
             "discrete grid (DDIM eta 0, leading: the same update as Euler in sigma~). Heun's "
             "NFE is 2 steps - 1 (5, 9, 19), set against Euler at 5, 10, 20.", ""]
    claims = list(CLAIM_HEADER)
    for schedule in schedules:
        heun = fid_cells(rows, schedule, "heun", "karras")
        euler = fid_cells(rows, schedule, "ddim", "leading", eta="0.0")
        lines += [f"{schedule}:", "", *cell_table(sorted(set(heun) | set(euler))
                                                 or [5, 9, 10, 19, 20, 49, 50],
                                                 [("heun (karras)", heun),
                                                  ("euler = ddim (leading)", euler)]), ""]
        for heun_nfe, euler_nfe in ((5, 5), (9, 10), (19, 20)):
            claims.append(claim_line(
                f"{schedule}: Heun-karras at NFE {heun_nfe} beats Euler-VP at NFE {euler_nfe}",
                "config F: FID 1.97 at 35 NFE (Heun, 18 steps)" if heun_nfe == 5 else "–",
                heun.get(heun_nfe), euler.get(euler_nfe)))
        if heun and euler:
            target_nfe = max(euler)
            target = mean_sd(euler[target_nfe])[0]
            reached = [n for n in sorted(heun) if mean_sd(heun[n])[0] <= target]
            ours = (f"Euler's FID at NFE {target_nfe} ({target:.2f}) first reached by Heun at "
                    f"NFE {reached[0]}: {target_nfe / reached[0]:.1f}x fewer" if reached else
                    f"Heun never reaches Euler's FID at NFE {target_nfe} ({target:.2f})")
            claims.append(f"| {schedule}: Heun-karras needs fewer NFE for Euler-VP's best FID | "
                          f"several-fold fewer NFE (Fig. 2) | {ours} | "
                          f"{'yes' if reached and reached[0] < target_nfe else 'no'} |")
    return lines + claims


def solver_section(rows: Sequence[dict[str, str]], schedule: str = "linear") -> list[str]:
    """DPM-Solver++(2M) and UniPC against DDIM at 10 and 20 NFE on the same grid."""
    ddim = fid_cells(rows, schedule, "ddim", "leading", eta="0.0")
    dpmpp = fid_cells(rows, schedule, "dpmpp_2m", "leading")
    unipc = fid_cells(rows, schedule, "unipc", "leading")
    karras = fid_cells(rows, schedule, "dpmpp_2m", "karras")
    lines = ["## DPM-Solver++(2M) and UniPC vs DDIM (Lu et al. 2022, arXiv:2211.01095; "
             "Zhao et al. 2023, arXiv:2302.04867)", "",
             f"The {schedule}-schedule model; all three on the same leading grid "
             "(dpmpp_2m on the karras grid for reference).", "",
             *cell_table((10, 20), [("ddim (leading)", ddim), ("dpmpp_2m (leading)", dpmpp),
                                    ("unipc (leading)", unipc), ("dpmpp_2m (karras)", karras)]),
             "", *CLAIM_HEADER]
    figures = {("dpmpp_2m", 10): "DPM-Solver 4.70 at 10 NFE (DDIM: 13.36 at S = 10)",
               ("dpmpp_2m", 20): "DPM-Solver 2.87 at 20 NFE",
               ("unipc", 10): "UniPC 3.87 at 10 NFE", ("unipc", 20): "–"}
    for name, table in (("dpmpp_2m", dpmpp), ("unipc", unipc)):
        for nfe in (10, 20):
            lines.append(claim_line(f"{name} beats ddim at NFE {nfe}", figures[(name, nfe)],
                                    table.get(nfe), ddim.get(nfe)))
    return lines


def iddpm_section(rows: Sequence[dict[str, str]]) -> list[str]:
    """iDDPM: the cosine schedule beats the linear one at few sampling steps, on the leading grid
    and on the trailing one (which, like iDDPM's strided sampling, starts at the last index)."""
    grids = {spacing: (fid_cells(rows, "cosine", "ddim", spacing, eta="0.0"),
                       fid_cells(rows, "linear", "ddim", spacing, eta="0.0"))
             for spacing in ("leading", "trailing")}
    nfes = sorted({n for pair in grids.values() for cells in pair for n in cells}) or [5, 10, 20]
    lines = ["## iDDPM: cosine vs linear schedule (Nichol & Dhariwal 2021, arXiv:2102.09672)", "",
             "Two models that differ only in the training schedule, both sampled with DDIM "
             "(eta 0) on the leading grid (diffusers' default: with few steps it starts below "
             "the last training index) and on the trailing grid (starts at the last index, as "
             "iDDPM's strided sampling does).", "",
             *cell_table(nfes, [(f"{schedule}, {spacing}", grids[spacing][index])
                                for spacing in grids
                                for index, schedule in enumerate(("cosine", "linear"))]),
             "", *CLAIM_HEADER]
    figure = ("an ADM-style cosine CIFAR-10 model loses little to respacing: 2.99 at 1000 "
              "steps, 3.38 at 100 (DDPM-IP issue 20)")
    for spacing, (cosine, linear) in grids.items():
        for nfe in nfes:
            if nfe in cosine or nfe in linear:
                lines.append(claim_line(f"cosine beats linear at NFE {nfe} ({spacing})",
                                        figure if nfe == nfes[0] else "–", cosine.get(nfe),
                                        linear.get(nfe)))
    return lines


def lin_section(rows: Sequence[dict[str, str]], ztsnr_rows: Sequence[dict[str, str]]
                ) -> list[str]:
    """Lin et al. 2023: trailing spacing (on the linear and the cosine model), and zero terminal
    SNR (with trailing) at few steps."""
    grids = {schedule: {spacing: fid_cells(rows, schedule, "ddim", spacing, eta="0.0")
                        for spacing in ("leading", "trailing")}
             for schedule in ("linear", "cosine")}
    ztsnr = fid_cells(ztsnr_rows, "linear", "ddim", "trailing", eta="0.0")
    nfes = sorted(set(grids["linear"]["trailing"]) | set(grids["cosine"]["trailing"])
                  | set(ztsnr)) or [5, 10, 20]
    lines = ["## Lin et al. 2023, \"Common Diffusion Noise Schedules and Sample Steps are Flawed\" "
             "(arXiv:2305.08891)", "",
             "DDIM (eta 0) with the leading and the trailing grid on the linear- and the cosine-"
             "schedule models, and the linear recipe trained with the betas rescaled to zero "
             "terminal SNR (`scheduler.rescale_betas_zero_snr=true`, v-prediction as the paper "
             "requires) on the trailing grid.", "",
             *cell_table(nfes, [*((f"{schedule}, {spacing}", cells)
                                  for schedule, by_spacing in grids.items()
                                  for spacing, cells in by_spacing.items()),
                                ("linear, zero terminal SNR, trailing", ztsnr)]),
             "", *CLAIM_HEADER]
    for schedule, by_spacing in grids.items():
        for nfe in nfes:
            if nfe in by_spacing["trailing"]:
                lines.append(claim_line(f"{schedule}: trailing beats leading at NFE {nfe}",
                                        "qualitative (Sec. 3.3)", by_spacing["trailing"].get(nfe),
                                        by_spacing["leading"].get(nfe)))
    for nfe in nfes:
        lines.append(claim_line(f"zero terminal SNR beats the ordinary linear model (both "
                                f"trailing) at NFE {nfe}", "qualitative (Sec. 3.1, Fig. 3)",
                                ztsnr.get(nfe), grids["linear"]["trailing"].get(nfe)))
    return lines


def sd3_section(rows: Sequence[dict[str, str]]) -> list[str]:
    table = cells(rows)
    missing = [name for name in SD3_ORDER if name not in table]
    if missing:
        return ["## SD3 Table 1 (Esser et al. 2024)", "",
                f"Not run yet: no rows for {', '.join(missing)} (see sd3_run.py)."]
    nfes = sorted(set.intersection(*(set(table[name]) for name in SD3_ORDER)))
    steps = {row["formulation"]: row.get("train_steps", "?") for row in rows}
    lines = ["## SD3 Table 1 in miniature (Esser et al. 2024, arXiv:2403.03206, Sec. 5.1)", "",
             "Same 0.28M UNet, same batches and CPU-minute budget (the time-to-quality race's "
             "recipes `rectified_flow`, `rf_uniform`, `ddpm`; training steps: " +
             ", ".join(f"{name} {steps[name]}" for name in SD3_ORDER) + "). Euler in sigma~ "
             "(flow: uniform-t grid; eps/linear: DDIM), classifier-FID (not Inception), "
             f"{rows[0].get('samples', '?')} samples per cell.", "",
             "| NFE | " + " | ".join(SD3_ORDER) + " |", "|---|" + "---|" * len(SD3_ORDER)]
    for nfe in nfes:
        lines.append(f"| {nfe} | " + " | ".join(show(table[name][nfe]) for name in SD3_ORDER)
                     + " |")
    lines += ["", "| claim | paper's figure | our result | holds? |", "|---|---|---|---|"]
    lognorm = table[SD3_ORDER[0]]
    for rival in SD3_ORDER[1:]:
        for nfe in nfes:
            ours = f"{mean_sd(lognorm[nfe])[0]:.2f} vs {mean_sd(table[rival][nfe])[0]:.2f}"
            lines.append(f"| rf/lognorm(0.00, 1.00) beats {rival} at {nfe} steps | ranked first "
                         f"in Table 1 (all step counts) | {ours} | "
                         f"{verdict(lognorm[nfe], table[rival][nfe])} |")
    gaps = {nfe: min(mean_sd(table[rival][nfe])[0] for rival in SD3_ORDER[1:])
            - mean_sd(lognorm[nfe])[0] for nfe in nfes}
    fewest = nfes[0]
    largest = max(gaps, key=lambda nfe: gaps[nfe])
    lines.append("| the lead is largest at few steps | \"most at few sampling steps\" | lead over "
                 "the best rival: " + ", ".join(f"{gaps[n]:+.2f} at {n}" for n in nfes) +
                 f" | {'yes' if largest == fewest else 'no'} |")
    return lines


def plot_sd3(rows: Sequence[dict[str, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(rows)
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for name in SD3_ORDER:
        if name not in table:
            continue
        nfes = sorted(table[name])
        stats = [mean_sd(table[name][n]) for n in nfes]
        axis.errorbar(nfes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                      capsize=3, label=name)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("NFE (Euler steps)")
    axis.set_ylabel("classifier-FID (mean ± sd over seeds)")
    axis.set_title("SD3 Table 1 in miniature (Fashion-MNIST 32x32)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    from diffsweep.files import atomic_write_text
    from diffsweep.results import read_rows, write_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd3", type=Path, default=HERE / "sd3_results.csv")
    parser.add_argument("--results", type=Path, default=HERE / "fmnist_results.csv",
                        help="the Fashion-MNIST models' evaluations (shared with vp_vs_ve)")
    parser.add_argument("--ztsnr", type=Path, default=None,
                        help="the zero-terminal-SNR model's evaluations (default: in --results)")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    rows = read_rows(args.sd3)
    study = read_rows(args.results)
    ztsnr = [dict(row, model="zero_terminal_snr") for row in read_rows(args.ztsnr)] \
        if args.ztsnr else [row for row in study if row.get("model") == "zero_terminal_snr"]
    study = [row for row in study if row.get("model") != "zero_terminal_snr"]
    used = [row for row in study if row["sampler"] in ("ddim", "heun", "dpmpp_2m", "unipc")]
    if used or ztsnr:
        write_rows(args.out_dir / "fmnist_results.csv", used + ztsnr)
    lines = ["# Paper claims in miniature (generated by analyze.py; do not edit)", "",
             "Fashion-MNIST 32x32 models of vp_vs_ve (0.28M UNet, 2000 steps, the default "
             "recipe); classifier-FID (NOT Inception FID) on "
             f"{','.join(sorted({r.get('fid_samples', '?') for r in used})) or '?'} samples per "
             "cell, mean ± sd over noise seeds (n = seeds). Claims compare cells sampled from the "
             "same noise seeds, so each is judged on the seed-paired difference (worse - "
             "better, mean ± sd): it holds (yes) when that mean is above its sd, is within "
             "noise when it is positive but smaller, and does not hold (no) otherwise.", "",
             *ddim_section(study), "", *edm_section(study), "", *solver_section(study), "",
             *iddpm_section(study), "", *lin_section(study, ztsnr), "",
             *sd3_section(rows), ""]
    atomic_write_text(args.out_dir / "results.md", "\n".join(lines))
    if rows:
        plot_sd3(rows, args.out_dir / "sd3_fid_vs_nfe.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
