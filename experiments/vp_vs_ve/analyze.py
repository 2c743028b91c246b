"""Results CSV(s) written by ``evaluate.py`` -> markdown FID table + FID-vs-NFE plot per schedule.

    python experiments/vp_vs_ve/analyze.py experiments/vp_vs_ve/results.csv \
        --budgets 5,10,20,50 --out-dir experiments/vp_vs_ve

Table: one row per (training schedule, sampler, spacing), one column per NFE budget; a cell is the
FID of the run with the largest NFE within the budget (and above the previous budget), with the
actual NFE in brackets when it differs (heun spends 2n - 1 evaluations, so 9 sits in the 10 column).
Rows repeated with different noise seeds are averaged (the number of seeds is then given as ``n=``).
Plot: one panel per schedule, one line per sampler, log-x NFE, log-y FID,
error bars = sd over seeds.
Trend: per (schedule, sampler, spacing), FID at its fewest NFE against FID at its most, with a
verdict (falls / within noise / rises): on the seed-paired difference (same noise seed in both
cells) when there are >= 2 shared seeds, significant when its mean exceeds its sd; else the gap of
the means against the two cells' summed sd.
``--select sampler:spacing[:k=v;...],...`` keeps only those cells (the given sampler options must
match; the checkpoint's own EMA, no post-hoc profile), and the rows used are written to
``<out-dir>/results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

Key = tuple[str, str, str]  # (schedule, sampler, spacing)

SCHEDULE_ORDER = ("linear", "cosine", "scaled_linear", "vp_continuous", "ve", "edm", "flow",
                  "flow_sd3", "flow_flux")
SAMPLER_ORDER = ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde",
                 "lms", "unipc")


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, str]]:
    """All rows with a FID from the given results CSVs (missing files raise FileNotFoundError)."""
    rows: list[dict[str, str]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No results file {path}; run the study's run.sh first.")
        with open(path, newline="") as handle:
            rows.extend(r for r in csv.DictReader(handle) if r.get("fid", "") not in ("", None))
    return rows


def _schedule_rank(name: str) -> tuple[int, str]:
    return (SCHEDULE_ORDER.index(name) if name in SCHEDULE_ORDER else len(SCHEDULE_ORDER), name)


def group_by_seed(rows: Sequence[dict[str, str]]) -> dict[Key, dict[int, dict[str, float]]]:
    """``{(schedule, sampler, spacing): {nfe: {noise seed: fid}}}`` (a repeated row: the last)."""
    out: dict[Key, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for index, r in enumerate(rows):
        key = (r.get("train_scheduler") or "?", r["sampler"], r.get("spacing") or "")
        seed = r.get("seed") if r.get("seed") not in (None, "") else f"row{index}"
        out[key][int(float(r["nfe"]))][seed] = float(r["fid"])
    return {k: dict(v) for k, v in sorted(out.items(), key=lambda kv: (_schedule_rank(kv[0][0]),
                                                                         kv[0][1:]))}


def group(rows: Sequence[dict[str, str]]) -> dict[Key, dict[int, list[float]]]:
    """``{(schedule, sampler, spacing): {nfe: [fid per seed]}}``."""
    return {key: {nfe: list(fids.values()) for nfe, fids in by_nfe.items()}
            for key, by_nfe in group_by_seed(rows).items()}


Cell = tuple[str, str, "str | None"]  # (sampler, spacing, required options "k=v;..." or None)


def options_of(row: Mapping[str, str]) -> dict[str, str]:
    """A row's ``options`` column (``"eta=0.2;clip_sample=False;..."``) as a dict."""
    return dict(item.split("=", 1) for item in (row.get("options") or "").split(";") if "=" in item)


def select(rows: Sequence[dict[str, str]], cells: Iterable[Cell]) -> list[dict[str, str]]:
    """The rows of the given ``(sampler, spacing, options)`` cells made with the checkpoint's own
    EMA (no post-hoc profile): a study's part of a shared results file. ``options`` (``"k=v;..."``)
    must all appear in the row's sampler options; None matches any."""
    wanted = [(sampler, spacing, None if options is None else options_of({"options": options}))
              for sampler, spacing, options in cells]
    def matches(r: dict[str, str]) -> bool:
        given = options_of(r)
        return any((r["sampler"], r.get("spacing") or "") == (sampler, spacing)
                   and (required is None or all(given.get(k) == v for k, v in required.items()))
                   for sampler, spacing, required in wanted)
    return [r for r in rows if matches(r) and not r.get("sigma_rel")
            and r.get("weights", "ema") in ("", "ema")]


def parse_cells(text: str) -> list[Cell]:
    """``"ddim:leading:eta=0.0,heun:karras"`` -> ``[("ddim", "leading", "eta=0.0"),
    ("heun", "karras", None)]`` (options: ``k=v`` pairs joined by ``;``, as in the CSV's
    ``options`` column; omitted: any)."""
    cells: list[Cell] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        sampler, _, rest = item.partition(":")
        spacing, has_options, options = rest.partition(":")
        if not sampler or not spacing:
            raise ValueError(f"--select item {item!r} is not sampler:spacing[:options] "
                             "(e.g. dpmpp_2m:karras,ddim:leading:eta=0.0)")
        cells.append((sampler, spacing, options if has_options else None))
    return cells


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {sd:.2f} (n={len(values)})"


def paired_delta(first: Mapping[str, float], second: Mapping[str, float]
                 ) -> tuple[float, float, int] | None:
    """Mean and sd over the shared noise seeds of ``second - first`` and their number (None
    below 2). Same seed = same initial noise, so FID's seed-to-seed noise largely cancels."""
    seeds = sorted(set(first) & set(second))
    if len(seeds) < 2:
        return None
    deltas = [second[seed] - first[seed] for seed in seeds]
    return statistics.fmean(deltas), statistics.stdev(deltas), len(seeds)


def trend(first: Sequence[float] | Mapping[str, float],
          last: Sequence[float] | Mapping[str, float]) -> str:
    """``falls`` / ``within noise`` / ``rises``: FID from ``first`` (fewest NFE) to ``last``.
    Given ``{seed: fid}`` with >= 2 shared seeds: significant when the seed-paired difference's
    mean exceeds its sd; otherwise when the gap of the means exceeds the two cells' summed sd."""
    paired = (paired_delta(first, last)
              if isinstance(first, Mapping) and isinstance(last, Mapping) else None)
    if paired is not None:
        mean, sd, _ = paired
        if abs(mean) <= sd:
            return "within noise"
        return "falls" if mean < 0 else "rises"
    first = list(first.values()) if isinstance(first, Mapping) else first
    last = list(last.values()) if isinstance(last, Mapping) else last
    (mean_f, sd_f), (mean_l, sd_l) = mean_sd(first), mean_sd(last)
    if abs(mean_l - mean_f) <= sd_f + sd_l:
        return "within noise"
    return "falls" if mean_l < mean_f else "rises"


TREND_NOTE = ("Paired Δ: FID(most NFE) − FID(fewest NFE) per noise seed (same seed = same initial "
              "noise), mean ± sd; significant when |mean| exceeds its sd.\n\n")


def trend_table(rows: Sequence[dict[str, str]]) -> str:
    """One line per (schedule, sampler, spacing): FID at its fewest and at its most NFE."""
    lines = ["| schedule | sampler | spacing | fewest NFE | FID | most NFE | FID | paired Δ | "
             "FID from fewest to most NFE |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for (schedule, sampler, spacing), by_nfe in group_by_seed(rows).items():
        low, high = min(by_nfe), max(by_nfe)
        if low == high:
            continue
        paired = paired_delta(by_nfe[low], by_nfe[high])
        delta = "–" if paired is None else f"{paired[0]:+.2f} ± {paired[1]:.2f}"
        lines.append(f"| {schedule} | {sampler} | {spacing} | {low} | "
                     f"{_cell(list(by_nfe[low].values()))} | {high} | "
                     f"{_cell(list(by_nfe[high].values()))} | {delta} | "
                     f"{trend(by_nfe[low], by_nfe[high])} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict[str, str]], budgets: Sequence[int] | None = None) -> str:
    """Rows: schedule x sampler (spacing); columns: NFE budgets; values: FID."""
    groups = group(rows)
    if budgets is None:
        budgets = sorted({nfe for by_nfe in groups.values() for nfe in by_nfe})
    budgets = sorted(budgets)
    lines = ["| schedule | sampler | spacing | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
             "|---|---|---|" + "---:|" * len(budgets)]
    for (schedule, sampler, spacing), by_nfe in groups.items():
        cells, lower = [], 0
        for budget in budgets:
            inside = [n for n in by_nfe if lower < n <= budget]
            lower = budget
            if not inside:
                cells.append("–")
                continue
            nfe = max(inside)
            text = _cell(by_nfe[nfe])
            cells.append(text if nfe == budget else f"{text} ({nfe})")
        lines.append(f"| {schedule} | {sampler} | {spacing} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, str]], path: str | Path, title: str = "",
         floor: tuple[float, float] | None = None) -> Path:
    """FID vs NFE, one panel per schedule (log-x, log-y);
    ``floor=(mean, std)`` draws a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    groups = group(rows)
    schedules = sorted({k[0] for k in groups}, key=_schedule_rank)
    styles = sorted({k[1:] for k in groups},
                    key=lambda k: (SAMPLER_ORDER.index(k[0]) if k[0] in SAMPLER_ORDER else 99, k))
    colors = {style: f"C{i % 10}" for i, style in enumerate(styles)}  # same colour in every panel
    all_nfe = sorted({n for by_nfe in groups.values() for n in by_nfe})
    fig, axes = plt.subplots(1, len(schedules), figsize=(4.2 * len(schedules), 3.6),
                             squeeze=False, sharey=True)
    for ax, schedule in zip(axes[0], schedules):
        for (sched, sampler, spacing), by_nfe in groups.items():
            if sched != schedule:
                continue
            nfes = sorted(by_nfe)
            stats = [mean_sd(by_nfe[n]) for n in nfes]
            ax.errorbar(nfes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        ms=3.5, capsize=2.5, color=colors[(sampler, spacing)],
                        label=f"{sampler} ({spacing})")
        if floor is not None:
            mean, std = floor
            ax.axhspan(max(mean - 2 * std, 1e-3), mean + 2 * std, color="grey", alpha=0.25,
                       label="seed noise (±2 sd)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
                 if all_nfe[0] <= n <= all_nfe[-1]]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"trained with {schedule}")
        ax.set_xlabel("NFE (denoiser evaluations)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("classifier-FID, mean ± sd over seeds")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(rows: Sequence[dict[str, str]]) -> str:
    """One line naming what the rows were made with (checkpoints' steps, samples, extractor,
    sampling precision) and what they cost (the jobs' summed wall time)."""
    def values(key: str) -> str:
        return ",".join(sorted({r.get(key, "") for r in rows if r.get(key, "")})) or "?"
    seconds = sum(float(r["wall_time_s"]) for r in rows if r.get("wall_time_s"))
    return (f"{len(rows)} evaluations; training steps {values('step')}; FID samples "
            f"{values('fid_samples')}; extractor {values('fid_extractor')}; noise seeds "
            f"{values('seed')}; sampling precision {values('precision')}; evaluation wall time "
            f"{seconds / 3600:.1f} process-hours (summed over jobs).")


def main(argv: Sequence[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", default=[str(here / "results.csv")],
                        help="results CSVs written by evaluate.py (default: results.csv here)")
    parser.add_argument("--budgets", default="",
                        help="comma-separated NFE columns (default: every NFE seen)")
    parser.add_argument("--out-dir", default=str(here), help="where results.md and the PNG go")
    parser.add_argument("--title",
                        default="VP (linear, cosine) vs VE vs EDM: classifier-FID vs NFE")
    parser.add_argument("--select", default="",
                        help="sampler:spacing[:k=v;...] cells to keep, comma-separated (default: "
                             "every row); "
                             "the rows kept are written to <out-dir>/results.csv")
    args = parser.parse_args(argv)

    rows = load_rows(args.results)
    cells = parse_cells(args.select)
    out = Path(args.out_dir)
    if cells:
        from diffsweep.results import write_rows

        rows = select(rows, cells)
        write_rows(out / "results.csv", rows)
    budgets = [int(b) for b in args.budgets.split(",") if b] or None
    png = plot(rows, out / "fid_vs_nfe.png", title=args.title)
    text = (f"# {args.title}\n\nGenerated by `analyze.py` from "
            f"{', '.join(Path(p).name for p in args.results)}: {describe(rows)}\n\n"
            "Classifier-FID (lower is better) is NOT comparable to published Inception FID. "
            "Cells: mean ± sd over noise seeds (n = seeds).\n\n"
            + markdown_table(rows, budgets)
            + "\n## Does FID fall with NFE?\n\n" + TREND_NOTE
            + trend_table(rows) + f"\n![FID vs NFE]({png.name})\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
