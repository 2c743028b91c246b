"""Post-hoc EMA results CSV(s) -> markdown table and plot of FID against sigma_rel per sampler.

    python experiments/posthoc_ema/analyze.py experiments/posthoc_ema/results.csv \
        --out-dir experiments/posthoc_ema

Rows of ``evaluate.py`` with a ``sigma_rel`` are post-hoc EMA profiles; rows without one are the
checkpoint's own (default warmup) EMA, shown as the ``default EMA`` column and as a dashed line.
Table: one row per (training schedule, sampler (spacing), NFE), one column per sigma_rel; rows
repeated with other noise seeds are averaged (mean ± sd, n). The ``best`` column names the
sigma_rel of lowest mean FID and its difference to the default EMA together with the two cells'
seed sd: a difference inside about 2 sd is noise. Plot: one panel per (sampler, NFE), FID against
sigma_rel (log-x), one line per training schedule with ±1 sd bars.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT = "default EMA"
Key = tuple[str, str, int]  # (schedule, sampler (spacing), nfe)
SCHEDULE_ORDER = ("linear", "cosine", "scaled_linear", "vp_continuous", "ve", "edm", "flow")


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, str]]:
    """All rows with a FID from the given results CSVs (a missing file raises)."""
    rows: list[dict[str, str]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No results file {path}; run experiments/posthoc_ema/run.sh "
                                    f"first.")
        with open(path, newline="") as handle:
            rows.extend(r for r in csv.DictReader(handle) if r.get("fid", "") not in ("", None))
    return rows


def _schedule_rank(name: str) -> tuple[int, str]:
    return (SCHEDULE_ORDER.index(name) if name in SCHEDULE_ORDER else len(SCHEDULE_ORDER), name)


def _key(row: dict[str, str]) -> Key:
    """``(schedule, "sampler (spacing)", nfe)`` of one results row."""
    sampler = row["sampler"] + (f" ({row['spacing']})" if row.get("spacing") else "")
    return (row.get("train_scheduler") or "?", sampler, int(float(row["nfe"])))


def _key_order(key: Key) -> tuple:
    """Table order: schedules as in SCHEDULE_ORDER, then sampler, then NFE."""
    return (_schedule_rank(key[0]), key[1:])


def group(rows: Sequence[dict[str, str]]) -> dict[Key, dict[float | str, list[float]]]:
    """``{(schedule, sampler (spacing), nfe): {sigma_rel | "default EMA": [fid per seed]}}``."""
    out: dict[Key, dict[float | str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = _key(r)
        sigma_rel = r.get("sigma_rel") or ""
        out[key][float(sigma_rel) if sigma_rel else DEFAULT].append(float(r["fid"]))
    return {k: dict(out[k]) for k in sorted(out, key=_key_order)}


def paired_deltas(rows: Sequence[dict[str, str]]) -> dict[Key, dict[float, list[float]]]:
    """``{key: {sigma_rel: [FID(profile) - FID(default EMA) per noise seed both have]}}``."""
    by_seed: dict[Key, dict[float | str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = _key(r)
        sigma_rel = float(r["sigma_rel"]) if r.get("sigma_rel") else DEFAULT
        by_seed[key][sigma_rel][r.get("seed", "")] = float(r["fid"])
    out: dict[Key, dict[float, list[float]]] = {}
    for key, cells in by_seed.items():
        default = cells.get(DEFAULT, {})
        deltas = {s: [fids[seed] - default[seed] for seed in sorted(fids) if seed in default]
                  for s, fids in cells.items() if s != DEFAULT}
        deltas = {s: d for s, d in deltas.items() if d}
        if deltas:
            out[key] = dict(sorted(deltas.items()))
    return {k: out[k] for k in sorted(out, key=_key_order)}


def paired_table(deltas: dict[Key, dict[float, list[float]]]) -> str:
    """Rows: schedule x sampler x NFE; columns: mean ± sd (n) of the per-seed differences."""
    sigma_rels = sorted({s for cells in deltas.values() for s in cells})
    lines = ["| schedule | sampler | NFE | " + " | ".join(f"σ_rel {s:g}" for s in sigma_rels)
             + " |", "|---|---|---:|" + "---:|" * len(sigma_rels)]
    for (schedule, sampler, nfe), cells in deltas.items():
        row = [_cell(cells.get(s), signed=True) for s in sigma_rels]
        lines.append(f"| {schedule} | {sampler} | {nfe} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _sigma_rels(groups: dict[Key, dict[float | str, list[float]]]) -> list[float]:
    return sorted({s for cells in groups.values() for s in cells if s != DEFAULT})


def _cell(values: list[float] | None, signed: bool = False) -> str:
    """``mean ± sd (n=...)`` of a cell's values (the mean alone for one value, – for none)."""
    if not values:
        return "–"
    mean = f"{statistics.fmean(values):{'+' if signed else ''}.2f}"
    if len(values) == 1:
        return mean
    return f"{mean} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def best_sigma_rel(groups: dict[Key, dict[float | str, list[float]]]
                   ) -> dict[Key, tuple[float, float]]:
    """``{key: (sigma_rel of the lowest mean FID, that mean)}`` over the post-hoc cells."""
    best = {}
    for key, cells in groups.items():
        profiles = {s: statistics.fmean(v) for s, v in cells.items() if s != DEFAULT}
        if profiles:
            sigma_rel = min(profiles, key=profiles.get)
            best[key] = (sigma_rel, profiles[sigma_rel])
    return best


def markdown_table(groups: dict[Key, dict[float | str, list[float]]]) -> str:
    """Rows: schedule x sampler x NFE; columns: default EMA, every sigma_rel, best."""
    sigma_rels = _sigma_rels(groups)
    best = best_sigma_rel(groups)
    lines = ["| schedule | sampler | NFE | default EMA | "
             + " | ".join(f"σ_rel {s:g}" for s in sigma_rels) + " | best σ_rel (Δ vs default) |",
             "|---|---|---:|---:|" + "---:|" * len(sigma_rels) + "---|"]
    for key, cells in groups.items():
        schedule, sampler, nfe = key
        row = [_cell(cells.get(DEFAULT))] + [_cell(cells.get(s)) for s in sigma_rels]
        if key in best:
            sigma_rel, mean = best[key]
            text = f"{sigma_rel:g}"
            if DEFAULT in cells:
                default = cells[DEFAULT]
                delta = mean - statistics.fmean(default)
                sds = [_sd(cells[sigma_rel]), _sd(default)]
                noise = ("" if any(math.isnan(s) for s in sds)
                         else f", seed sd {sds[0]:.2f} / {sds[1]:.2f}")
                text += f" ({delta:+.2f}{noise})"
            row.append(text)
        else:
            row.append("–")
        lines.append(f"| {schedule} | {sampler} | {nfe} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: dict[Key, dict[float | str, list[float]]], path: str | Path,
         title: str = "") -> Path:
    """FID against sigma_rel, one panel per (sampler, NFE), one line per schedule; the default
    EMA as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    panels = sorted({key[1:] for key in groups})
    schedules = sorted({key[0] for key in groups}, key=_schedule_rank)
    colors = {schedule: f"C{i % 10}" for i, schedule in enumerate(schedules)}
    sigma_rels = _sigma_rels(groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, (sampler, nfe) in zip(axes[0], panels):
        for (schedule, key_sampler, key_nfe), cells in groups.items():
            if (key_sampler, key_nfe) != (sampler, nfe):
                continue
            xs = sorted(s for s in cells if s != DEFAULT)
            means = [statistics.fmean(cells[s]) for s in xs]
            errors = [0.0 if len(cells[s]) < 2 else statistics.stdev(cells[s]) for s in xs]
            if xs:
                ax.errorbar(xs, means, yerr=errors, marker="o", ms=3.5, capsize=2,
                            color=colors[schedule], label=f"{schedule}: post-hoc EMA")
            if DEFAULT in cells:
                ax.axhline(statistics.fmean(cells[DEFAULT]), color=colors[schedule], ls="--",
                           lw=1, label=f"{schedule}: default EMA")
        ax.set_xscale("log")
        if sigma_rels:
            ax.xaxis.set_major_locator(FixedLocator(sigma_rels))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{sampler}, NFE {nfe}", fontsize=9)
        ax.set_xlabel("σ_rel (EMA length relative to training)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FID")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(rows: Sequence[dict[str, str]]) -> str:
    """One line naming what the rows were made with."""
    def values(key: str) -> str:
        return ",".join(sorted({r.get(key, "") for r in rows if r.get(key, "")})) or "?"
    return (f"{len(rows)} evaluations; training steps {values('step')}; FID samples "
            f"{values('fid_samples')}; extractor {values('fid_extractor')}; noise seeds "
            f"{values('seed')}.")


def main(argv: Sequence[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", default=[str(here / "results.csv")],
                        help="results CSVs written by evaluate.py (default: results.csv here)")
    parser.add_argument("--out-dir", default=str(here), help="where results.md and the PNG go")
    parser.add_argument("--title", default="Post-hoc EMA: FID against the EMA length σ_rel")
    args = parser.parse_args(argv)

    rows = load_rows(args.results)
    groups = group(rows)
    out = Path(args.out_dir)
    png = plot(groups, out / "fid_vs_sigma_rel.png", title=args.title)
    text = (f"# {args.title}\n\nGenerated by `analyze.py` from "
            f"{', '.join(Path(p).name for p in args.results)}: {describe(rows)}\n\n"
            "Lower is better. `default EMA` is the checkpoint's own warmup EMA "
            "(callbacks.ema); σ_rel columns are post-hoc EMA profiles reconstructed from the "
            "same run's snapshots. Cells with several noise seeds show mean ± sd.\n\n"
            + markdown_table(groups))
    deltas = paired_deltas(rows)
    if deltas:
        text += ("\nPaired by noise seed: FID(profile) − FID(default EMA) for the same seed, "
                 "mean ± sd over seeds (negative = the profile is better). The pairing removes "
                 "the sample noise the two cells share.\n\n" + paired_table(deltas))
    text += f"\n![FID vs sigma_rel]({png.name})\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
