"""Sampling throughput (img/s, ms per NFE): diffsweep's samplers vs diffusers' pipelines.

At equal NFE and batch, for each config of ``train_throughput.py`` (our UNet from
``configs/model/*.yaml``; diffusers' ``UNet2DModel`` built to the same layout, so equal FLOPs):

- ``ours``: ``generate(module.denoiser, Sampler(method, num_steps), ...)`` (float64 state, the real
  path used by the sample-grid and FID callbacks);
- ``ours compiled``: the same with ``compile=True``: a compiled copy of the net, with its weights
  frozen into the graph as ``evaluate.py compile=true`` does (``--compile-mode frozen``), or read
  at run time as during training with ``module.sample_compile=true`` (``--compile-mode plain``);
  its one-off compile time (the warm-up call) is printed separately and not in img/s;
- ``ours@diffusers-net``: the same sampler over the diffusers net (isolates sampler overhead);
- ``diffusers``: ``DDIMPipeline`` (ddim) / ``DDPMPipeline`` with ``DPMSolverMultistepScheduler``
  (dpmpp_2m), ``output_type="np"``, progress bar off;
- ``diffusers compiled`` (``--compile-diffusers``): the pipeline with
  ``pipe.unet = torch.compile(pipe.unet)``, as diffusers' docs suggest for speed;
- ``net fwd``: one forward of each net at the same batch (the floor for ms/NFE).

Rounds are interleaved; medians are printed. ``--precision bf16`` runs everything under
``torch.autocast("cpu", torch.bfloat16)``.

    python experiments/benchmarks/sampling_throughput.py [--configs tiny16,tiny32] [--nfe 20]
        [--samplers ddim,dpmpp_2m] [--precision fp32,bf16] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402
    CONFIGS,
    DiffusersAdapter,
    diffusers_unet,
    load_string,
    machine_string,
    make_module,
)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def diffusers_pipeline(method: str, unet):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler

    if method == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="linear"))
    elif method == "dpmpp_2m":
        pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler(
            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2))
    else:
        raise ValueError(f"No diffusers pipeline mapped for {method!r}; use ddim or dpmpp_2m.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    from diffsweep.denoiser import Denoiser
    from diffsweep.generate import generate
    from diffsweep.samplers import Sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny16,tiny32")
    parser.add_argument("--samplers", default="ddim,dpmpp_2m")
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    parser.add_argument("--compile-mode", choices=("frozen", "plain"), default="frozen",
                        help="ours compiled: weights frozen in (evaluate.py) or read at run time "
                             "(training-time sampling)")
    parser.add_argument("--compile-diffusers", action="store_true",
                        help="also time diffusers' pipeline with a torch.compile'd UNet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine_string()}; batch {args.batch}; NFE {args.nfe}; {args.rounds} rounds; "
          f"{load_string()} at start\n")

    rows = []
    compile_seconds: dict[tuple[str, str, str, str], float] = {}
    for name in args.configs.split(","):
        _, c, r = CONFIGS[name]
        module = make_module(name).eval()
        freeze = args.compile_mode == "frozen"
        theirs = diffusers_unet(name).eval()
        compiled_theirs = torch.compile(theirs)  # one compiled module per config
        their_denoiser = Denoiser(DiffusersAdapter(theirs), module.schedule)
        x = torch.randn(args.batch, c, r, r)
        t = torch.full((args.batch,), 500.0)
        for precision in args.precision.split(","):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            for method in args.samplers.split(","):
                sampler = Sampler(method, num_steps=args.nfe)
                assert sampler.nfe == args.nfe, "use a one-NFE-per-step sampler"
                pipe = diffusers_pipeline(method, theirs)
                # Every case is timed below in this same iteration, so the closures see this
                # iteration's loop variables (B023's late binding cannot bite).
                cases = {
                    "ours": lambda: generate(module.denoiser, sampler, args.batch, (c, r, r),  # noqa: B023 - timed in this iteration
                                             generator=torch.Generator().manual_seed(0)),
                    "ours@diffusers-net": lambda: sampler(  # noqa: B023 - timed in this iteration
                        their_denoiser, module.schedule, (args.batch, c, r, r),  # noqa: B023 - timed in this iteration
                        generator=torch.Generator().manual_seed(0)),
                    "diffusers": lambda: pipe(batch_size=args.batch, num_inference_steps=args.nfe,  # noqa: B023 - timed in this iteration
                                              output_type="np",
                                              generator=torch.Generator().manual_seed(0)),
                    "fwd ours": lambda: module.net(x, t),  # noqa: B023 - timed in this iteration
                    "fwd diffusers": lambda: theirs(x, t),  # noqa: B023 - timed in this iteration
                }
                if not args.no_compile:
                    cases["ours compiled"] = lambda: generate(
                        module.denoiser, sampler, args.batch, (c, r, r),  # noqa: B023 - timed in this iteration
                        generator=torch.Generator().manual_seed(0), compile=True,
                        freeze_weights=freeze)  # noqa: B023 - timed in this iteration
                if not args.no_compile and args.compile_diffusers:
                    compiled_pipe = diffusers_pipeline(method, compiled_theirs)
                    cases["diffusers compiled"] = lambda: compiled_pipe(  # noqa: B023 - timed in this iteration
                        batch_size=args.batch, num_inference_steps=args.nfe, output_type="np",
                        generator=torch.Generator().manual_seed(0))
                times: dict[str, list[float]] = {k: [] for k in cases}
                with torch.no_grad(), autocast:
                    for key, fn in cases.items():  # warm-up (and the compiles)
                        warmup_s = _timed(fn)
                        if "compiled" in key:
                            compile_seconds[(name, precision, method, key)] = warmup_s
                    for _ in range(args.rounds):
                        for key, fn in cases.items():
                            times[key].append(_timed(fn))
                rows.append((name, precision, method, times))
                print(f"  done {name} {precision} {method}; {load_string()}", flush=True)

    med = statistics.median
    print(f"\n{load_string()} at end\n")
    print("| config | precision | sampler (NFE) | ours img/s | diffusers img/s | ours / diffusers "
          "| ours ms/NFE | diffusers ms/NFE | fwd ours / diffusers ms | ours@diffusers-net "
          "/ diffusers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, precision, method, times in rows:
        ours, theirs_t = med(times["ours"]), med(times["diffusers"])
        same_net = med(times["ours@diffusers-net"])
        ratio = med(d / o for o, d in zip(times["ours"], times["diffusers"]))
        ratio_same = med(d / o for o, d in zip(times["ours@diffusers-net"], times["diffusers"]))
        print(f"| {name} | {precision} | {method} ({args.nfe}) | {args.batch / ours:.1f} | "
              f"{args.batch / theirs_t:.1f} | {ratio:.3f} | {1e3 * ours / args.nfe:.1f} | "
              f"{1e3 * theirs_t / args.nfe:.1f} | {1e3 * med(times['fwd ours']):.1f} / "
              f"{1e3 * med(times['fwd diffusers']):.1f} | {ratio_same:.3f} "
              f"({1e3 * same_net / args.nfe:.1f} ms/NFE) |")
    compiled = [key for key in ("ours compiled", "diffusers compiled") if key in rows[0][3]]
    if compiled:
        print("\nCompiled (one-off compile = the warm-up call, not in img/s):\n")
        print("| config | precision | sampler (NFE) | " + " | ".join(
            f"{key} img/s | {key} / diffusers | {key} compile s" for key in compiled) + " |")
        print("|---|---|---|" + "---|---|---|" * len(compiled))
        for name, precision, method, times in rows:
            cells = []
            for key in compiled:
                ratio = med(d / o for o, d in zip(times[key], times["diffusers"]))
                cells.append(f"{args.batch / med(times[key]):.1f} | {ratio:.3f} | "
                             f"{compile_seconds[(name, precision, method, key)]:.0f}")
            print(f"| {name} | {precision} | {method} ({args.nfe}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
