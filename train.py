"""Train a diffusion model: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # digits 16x16, unet_tiny, linear, CPU
    python train.py scheduler=cosine sampler=dpmpp_2m sampler.num_steps=20
    python train.py -m scheduler=linear,cosine,ve     # a sweep
    python train.py trainer=ddp trainer.devices=4     # DDP (also inside -m sweeps: each job once)

A bad value or a missing file stops it with one line per problem on stderr (``error: ...``) and
exit status 1; ``DIFFSWEEP_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback
(:mod:`diffsweep.console`).
"""

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffsweep.console import command_line, one_line_errors
from diffsweep.hydra_utils import multirun_flag_first

# configs/hydra/launcher/submitit_slurm.yaml replaces the plugin's config of that name on purpose
# (Hydra still validates it against the plugin's schema and warns that it does).
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from diffsweep.launch import run_job

    # run_job registers the job so DDP ranks > 0 rebuild this config (not re-run the sweep).
    metrics = run_job(cfg, "diffsweep.train:run")
    return metrics.get(cfg.get("optimized_metric") or "", None)


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    with command_line(config_dir=Path(__file__).parent / "configs"):
        main()
