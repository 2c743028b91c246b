"""Evaluate a trained checkpoint: ``python evaluate.py ckpt_path=... [sampler=...] [metrics=...]``.

A sweep over samplers and step counts, one results row per job::

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt \
        -m sampler=ddim,dpmpp_2m,heun sampler.num_steps=5,10,20,50
"""

import sys

import hydra
from omegaconf import DictConfig

from diffsweep.hydra_utils import multirun_flag_first


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from diffsweep.evaluate import run

    return run(cfg).get("fid")


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    main()
