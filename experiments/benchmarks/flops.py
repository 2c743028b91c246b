"""Achieved GFLOP/s of a training step against this machine's measured matmul / conv ceilings.

Ceilings (best of ``--repeats`` after a warm-up, at ``--threads`` threads):

- a large square matmul (``--matmul-size``, fp32 and bf16) and a large 1x1 convolution (a GEMM
  through oneDNN, which runs all the UNet's convolutions);
- the UNet's own 3x3 convolutions (forward, batch 64): every distinct (C_in, C_out, H) of the
  config's conv layers is timed (fastest and slowest printed).

The ceiling per dtype is the maximum of all of these.

Training-step FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv,
attention; forward + backward; elementwise ops, norms and the optimizer are not counted, so the
achieved figure is a lower bound on the arithmetic done). The step is the bare loop of
``train_throughput.py`` (loss, backward, clip, AdamW, EMA lerp) in fp32 and under bf16 autocast,
timed by process CPU time with one thread, by wall time with more.

    python experiments/benchmarks/flops.py [--configs tiny16,tiny32] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_of  # noqa: E402
from train_throughput import (  # noqa: E402
    CONFIGS,
    forward_flops,
    load_string,
    machine_string,
    our_unet,
    time_bare,
)


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_of(lambda: a @ b, repeats) / 1e9


def conv1x1_gflops(dtype: torch.dtype, repeats: int) -> float:
    x = torch.randn(64, 1024, 8, 8, dtype=dtype)
    weight = torch.randn(1024, 1024, 1, 1, dtype=dtype)
    with torch.no_grad():
        seconds = best_of(lambda: F.conv2d(x, weight), repeats)
    return 2 * 64 * 8 * 8 * 1024 * 1024 / seconds / 1e9


def conv_shapes(net: nn.Module, image_shape: tuple[int, int, int], batch: int):
    """Distinct (C_in, C_out, H, W, stride) of the net's 3x3 convs, with how often they run."""
    shapes: dict[tuple, int] = {}

    def hook(conv, inputs, _):
        if conv.kernel_size == (3, 3):
            key = (conv.in_channels, conv.out_channels, *inputs[0].shape[2:], conv.stride[0])
            shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.randn(batch, *image_shape), torch.rand(batch) * 999)
    for handle in handles:
        handle.remove()
    return shapes


def conv_gflops(shape, batch: int, dtype: torch.dtype, repeats: int) -> float:
    c_in, c_out, h, w, stride = shape
    x = torch.randn(batch, c_in, h, w, dtype=dtype)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=dtype)
    bias = torch.randn(c_out, dtype=dtype)
    with torch.no_grad():
        seconds = best_of(lambda: F.conv2d(x, weight, bias, stride, 1), repeats)
    h_out, w_out = (h + stride - 1) // stride, (w + stride - 1) // stride
    return 2 * batch * c_out * h_out * w_out * c_in * 9 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny16,tiny32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine_string()}; {load_string()} at start\n")

    mm = {dt: matmul_gflops(args.matmul_size, getattr(torch, dt), args.repeats)
          for dt in ("float32", "bfloat16")}
    # A big 1x1 convolution is a GEMM run by oneDNN (the library behind every UNet conv); torch's
    # fp32 ``@`` goes to MKL/BLAS, which may not use AVX-512 on every CPU.
    gemm = {dt: conv1x1_gflops(getattr(torch, dt), args.repeats) for dt in ("float32", "bfloat16")}
    print("| ceiling | fp32 GFLOP/s | bf16 GFLOP/s |\n|---|---|---|")
    print(f"| matmul {args.matmul_size}^3 (torch @) | {mm['float32']:.1f} | {mm['bfloat16']:.1f} |")
    print(f"| 1x1 conv = GEMM 4096x1024x1024 (oneDNN) | {gemm['float32']:.1f} | "
          f"{gemm['bfloat16']:.1f} |")
    ceiling = {dt: max(mm[dt], gemm[dt]) for dt in mm}

    conv_best: dict[str, dict[str, float]] = {}
    for name in args.configs.split(","):
        _, c, r = CONFIGS[name]
        shapes = conv_shapes(our_unet(name), (c, r, r), args.batch)
        best = {}
        for dt in ("float32", "bfloat16"):
            rates = {s: conv_gflops(s, args.batch, getattr(torch, dt), args.repeats)
                     for s in shapes}
            top = max(rates, key=rates.get)
            best[dt] = rates[top]
            print(f"| {name} best 3x3 conv (Cin {top[0]}, Cout {top[1]}, {top[2]}x{top[3]}, "
                  f"stride {top[4]}) [{dt}] | " + (f"{rates[top]:.1f} | |" if dt == "float32"
                                                   else f"| {rates[top]:.1f} |"))
            worst = min(rates, key=rates.get)
            print(f"| {name} worst 3x3 conv (Cin {worst[0]}, Cout {worst[1]}, {worst[2]}x"
                  f"{worst[3]}, stride {worst[4]}) [{dt}] | "
                  + (f"{rates[worst]:.1f} | |" if dt == "float32" else f"| {rates[worst]:.1f} |"))
        conv_best[name] = best
    for dt in ceiling:
        ceiling[dt] = max([ceiling[dt]] + [best[dt] for best in conv_best.values()])
    print(f"| **ceiling used (max of the above)** | {ceiling['float32']:.1f} | "
          f"{ceiling['bfloat16']:.1f} |")

    print("\n| config | precision | GFLOP / step (fwd+bwd) | step ms | achieved GFLOP/s | "
          "% fp32 ceiling | % same-dtype ceiling |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        _, c, r = CONFIGS[name]
        flops = forward_flops(our_unet(name), (args.batch, c, r, r), train=True)
        for precision, dt in (("fp32", "float32"), ("bf16", "bfloat16")):
            # one thread: process CPU time per step (the work, without other jobs' time slices);
            # several threads: wall time (CPU time would add the threads up)
            clock = 1 if args.threads == 1 else 0
            seconds = statistics.median(
                time_bare(name, args.batch, args.steps, 2, precision)[clock]
                for _ in range(args.rounds))
            rate = flops / seconds / 1e9
            print(f"| {name} | {precision} | {flops / 1e9:.1f} | {1e3 * seconds:.1f} | "
                  f"{rate:.1f} | {100 * rate / ceiling['float32']:.0f} % | "
                  f"{100 * rate / ceiling[dt]:.0f} % |", flush=True)
    print(f"\n{load_string()} at end")


if __name__ == "__main__":
    main()
