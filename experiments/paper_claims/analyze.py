"""Paper claims in miniature: results CSVs -> ``results.md`` (claim tables) and plots.

    python experiments/paper_claims/analyze.py [--sd3 experiments/paper_claims/sd3_results.csv]

Each claim is a table "claim | paper's figure | our result | holds?" followed by the FID cells
(mean +- sd over noise seeds, n = seeds). A claim "holds" when its ordering holds for the seed
means and the gap is larger than the two cells' summed standard deviations; "within noise" when
the means order as claimed but the gap is smaller than that; "no" otherwise. ``results.md`` is
written by this script only.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
SD3_ORDER = ("rf/lognorm(0.00, 1.00)", "rf/uniform", "eps/linear")


def cells(rows: Sequence[dict[str, str]]) -> dict[str, dict[int, list[float]]]:
    """``{formulation: {nfe: [fid per seed]}}``."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        out[row["formulation"]][int(float(row["nfe"]))].append(float(row["fid"]))
    return {name: dict(values) for name, values in out.items()}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def show(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f} (n={len(values)})"


def verdict(better: Sequence[float], worse: Sequence[float]) -> str:
    """``yes`` / ``within noise`` / ``no`` for the claim mean(better) < mean(worse)."""
    (mean_b, sd_b), (mean_w, sd_w) = mean_sd(better), mean_sd(worse)
    if mean_b >= mean_w:
        return "no"
    return "yes" if mean_w - mean_b > sd_b + sd_w else "within noise"


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
    lines.append(f"| the lead is largest at few steps | \"most at few sampling steps\" | lead over "
                 f"the best rival: " + ", ".join(f"{gaps[n]:+.2f} at {n}" for n in nfes) +
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
    from diffsweep.results import read_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd3", type=Path, default=HERE / "sd3_results.csv")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    rows = read_rows(args.sd3)
    lines = ["# Paper claims in miniature (generated by analyze.py; do not edit)", "",
             *sd3_section(rows), ""]
    atomic_write_text(args.out_dir / "results.md", "\n".join(lines))
    if rows:
        plot_sd3(rows, args.out_dir / "sd3_fid_vs_nfe.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
