"""SD3 Table 1 in miniature: rf/lognorm(0, 1) vs rf/uniform vs eps/linear at equal training budget.

Esser et al. 2024 (arXiv:2403.03206, Sec. 5.1, Table 1) train the same net with each formulation
for the same budget and rank them by FID over sampling step counts: rectified flow with
logit-normal(0, 1) timesteps ranks first, ahead of rectified flow with uniform timesteps and of
eps-prediction on the linear VP schedule, and "most at few sampling steps".

Here the three nets are the time-to-quality race's (``experiments/benchmarks/time_to_quality.py``:
same 0.28M UNet, same batches, same CPU-minute budget, each recipe's final EMA weights saved as
``<race out>/<recipe>/ema_denoiser.pt``): ``rectified_flow`` (rf/lognorm(0.00, 1.00)),
``rf_uniform`` and ``ddpm`` (eps/linear, uniform eps-MSE). Each is sampled with its family's
deterministic first-order ODE sampler, the Euler step in sigma~ (Euler on the uniform-t grid for
flow = diffusers' FlowMatchEuler; DDIM for eps/linear, which is the same Euler step in sigma~ on
the DDPM grid), at ``--nfe`` steps, ``--seeds`` noise seeds, classifier-FID on ``--samples``.
Rows go to ``--results`` (one per model, NFE, seed; a rerun skips rows already there), and
``analyze.py`` turns them into the claim table and the plot.

    python experiments/benchmarks/time_to_quality.py --clock cpu --threads 1
    python experiments/benchmarks/time_to_quality.py --clock cpu --threads 1 \\
        --recipes rf_uniform,ddpm --out logs/ttq_sd3_controls
    python experiments/paper_claims/sd3_run.py \\
        --models logs/time_to_quality/rectified_flow logs/ttq_sd3_controls/rf_uniform \\
                 logs/ttq_sd3_controls/ddpm
    python experiments/paper_claims/analyze.py

Flags not listed below go to the race's argument parser (e.g. ``--data-root``, ``--real-count``,
``--classifier-samples``, ``--base-channels``): keep them as the race had them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

import time_to_quality as race  # noqa: E402  (the race's config, data and evaluator set-up)

#: how each race recipe is named in SD3's Table 1, and the sampler of its family
FORMULATIONS = {"rectified_flow": ("rf/lognorm(0.00, 1.00)", "euler"),
                "rf_uniform": ("rf/uniform", "euler"),
                "ddpm": ("eps/linear", "ddim")}
KEY = ("formulation", "sampler", "num_steps", "seed")


def load_denoiser(folder: Path):
    """The race recipe's EMA denoiser from ``<folder>/ema_denoiser.pt``."""
    from diffsweep.assembly import build_module
    from diffsweep.checkpoints import load_weights_only

    path = folder / "ema_denoiser.pt"
    if not path.is_file():
        raise SystemExit(f"--models {folder}: no ema_denoiser.pt there; run the race first.")
    payload = load_weights_only(path)  # tensors and plain containers: loading runs no code
    if payload.get("recipe") not in FORMULATIONS:
        raise SystemExit(f"--models {folder}: recipe {payload.get('recipe')!r}; allowed: "
                         f"{', '.join(FORMULATIONS)}.")
    module = build_module(payload["config"])
    module.denoiser.net.load_state_dict(payload["state_dict"])
    return payload, module.denoiser.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True,
                        help="race recipe folders holding ema_denoiser.pt")
    parser.add_argument("--nfe", default="5,10,25", help="comma-separated step counts (= NFE)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated noise seeds")
    parser.add_argument("--samples", type=int, default=2000, help="samples per FID")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--results", type=Path,
                        default=ROOT / "experiments" / "paper_claims" / "sd3_results.csv")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "logs" / "ttq_cache",
                        help="the race's FID cache (classifier and real statistics)")
    args, args.race_args = parser.parse_known_args(argv)  # the rest: the race's data/FID flags
    nfes = [int(n) for n in args.nfe.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not nfes or min(nfes) < 1:
        parser.error(f"--nfe {args.nfe}: positive integers, comma-separated")
    torch.set_num_threads(args.threads)
    from diffsweep.results import append_row, read_rows

    race_args = race.parse_args(["--samples", str(args.samples), "--cache-dir",
                                 str(args.cache_dir), "--out", str(ROOT / "logs" / "sd3_run"),
                                 *args.race_args])
    datamodule, evaluator = race.build_evaluation(race_args)
    done = {tuple(row[k] for k in KEY) for row in read_rows(args.results)}
    for folder in args.models:
        payload, denoiser = load_denoiser(folder)
        formulation, sampler = FORMULATIONS[payload["recipe"]]
        for num_steps in nfes:
            for seed in seeds:
                if (formulation, sampler, str(num_steps), str(seed)) in done:
                    continue
                evaluator.seed = seed
                started = time.perf_counter()
                pair = {"name": f"{sampler}_{num_steps}", "sampler": sampler,
                        "num_steps": num_steps}
                scores = evaluator.evaluate(denoiser, [pair], datamodule, precision="bf16")
                row = {"formulation": formulation, "recipe": payload["recipe"],
                       "train_steps": payload["steps"], "sampler": sampler,
                       "num_steps": num_steps, "nfe": scores[f"nfe/{pair['name']}"],
                       "seed": seed, "samples": args.samples,
                       "fid": f"{scores['fid/' + pair['name']]:.4f}",
                       "seconds": f"{time.perf_counter() - started:.1f}"}
                append_row(args.results, row, key=KEY)
                print(f"{formulation:24s} {sampler} {num_steps:3d} seed {seed}: "
                      f"FID {row['fid']} ({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
