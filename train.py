"""Train a diffusion model: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # digits 16x16, unet_tiny, linear, CPU
    python train.py scheduler=cosine sampler=dpmpp_2m sampler.num_steps=20
    python train.py -m scheduler=linear,cosine,ve     # a sweep
"""

import sys

import hydra
from omegaconf import DictConfig

from diffsweep.hydra_utils import multirun_flag_first


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from diffsweep.train import run

    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric") or "", None)


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    main()
