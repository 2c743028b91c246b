"""Evaluate a trained checkpoint: ``python evaluate.py ckpt_path=... [sampler=...] [metrics=...]``.

A sweep over samplers and step counts, one results row per job::

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt \
        -m sampler=ddim,dpmpp_2m,heun sampler.num_steps=5,10,20,50

A bad value or a missing file stops it with one line per problem on stderr (``error: ...``) and
exit status 1; ``DIFFSWEEP_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback
(:mod:`diffsweep.console`).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffsweep.console import command_line, one_line_errors
from diffsweep.hydra_utils import multirun_flag_first


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from diffsweep.evaluate import run

    return run(cfg).get("fid")


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    with command_line(config_dir=Path(__file__).parent / "configs"):
        main()
