#!/usr/bin/env bash
# FID vs number of steps for one checkpoint: the linear-schedule Fashion-MNIST model of vp_vs_ve.
# DDIM on its leading grid out to NFE 100; dpmpp_2m and heun on the karras grid to NFE 50 are
# vp_vs_ve's cells of the same model (same shared results file), so run vp_vs_ve/run.sh first.
# Usage (from the repo root):  bash experiments/step_count/run.sh [path/to/last.ckpt]
# Default checkpoint: the scheduler=linear job of the newest logs/fmnist_models multirun.
# Environment: SEEDS, NUM_SAMPLES, PRECISION, RESULTS, EVAL_ARGS (as in vp_vs_ve/run.sh).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=experiments/step_count
RESULTS=${RESULTS:-logs/fmnist_studies/results.csv}
SEEDS=${SEEDS:-0,1,2}; NUM_SAMPLES=${NUM_SAMPLES:-2000}; PRECISION=${PRECISION:-bf16}
if [[ $# -ge 1 ]]; then
  CKPT=$1
else
  CKPT=$(grep -lx -- "- scheduler=linear" "$(ls -d logs/fmnist_models/multiruns/* | sort | tail -n 1)"/*/.hydra/overrides.yaml | head -n 1)
  CKPT=$(dirname "$(dirname "$CKPT")")/checkpoints/last.ckpt
fi
[[ -f $CKPT ]] || { echo "No checkpoint $CKPT: run experiments/vp_vs_ve/run.sh first" >&2; exit 1; }
RESULTS=$(realpath -m "$RESULTS")
[[ -f $RESULTS ]] || { echo "No results file $RESULTS: run experiments/vp_vs_ve/run.sh first (its cells of this model are reused)" >&2; exit 1; }
common=(experiment=eval_sweep task_name=study_eval "ckpt_path=$CKPT" "results_file=$RESULTS"
        "metrics.fid.evaluator.num_samples=$NUM_SAMPLES" "precision=$PRECISION" "seed=$SEEDS")
# DDIM (eta 0) on the DDPM/diffusers default leading grid beyond vp_vs_ve's NFE 50.
# shellcheck disable=SC2086
python evaluate.py "${common[@]}" ${EVAL_ARGS:-} -m sampler=ddim sampler.num_steps=100
python $HERE/analyze.py "$RESULTS" --schedule linear --out-dir $HERE
