#!/usr/bin/env bash
# Post-hoc EMA: train two Fashion-MNIST models (linear = the default schedule, cosine) with
# ema=posthoc, then evaluate each with its default EMA and with post-hoc EMA profiles over sigma_rel.
# Usage (from the repo root):  bash experiments/posthoc_ema/run.sh [existing multirun dir to skip training]
# Environment: DATA_ROOT (Fashion-MNIST idx files; default ../shared/data/fashion-mnist when it
# exists, else data.root's default with download), SIGMA_RELS, SEEDS, NUM_SAMPLES, DDIM, RESULTS,
# TRAIN_ARGS (extra train.py overrides, e.g. "trainer=gpu").
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # 1 thread: much faster than 2 on a contended 2-core box
HERE=experiments/posthoc_ema
RESULTS=${RESULTS:-logs/posthoc_ema/results.csv}
SIGMA_RELS=${SIGMA_RELS:-0.03,0.05,0.08,0.12,0.2}
SEEDS=${SEEDS:-0,1,2}
NUM_SAMPLES=${NUM_SAMPLES:-2000}   # FID samples per cell: 2000 -> floor 0.26 (500 -> 1.70, too coarse to rank)
DDIM=${DDIM:-0}                    # 1: also ddim 25 steps, one seed (does the best length depend on the sampler?)
if [[ -z ${DATA_ROOT:-} && -d ../shared/data/fashion-mnist ]]; then DATA_ROOT=$PWD/../shared/data/fashion-mnist; fi
data=()
[[ -n ${DATA_ROOT:-} ]] && data=("data.root=$DATA_ROOT")

if [[ $# -ge 1 ]]; then
  SWEEP=$1
else
  # shellcheck disable=SC2086
  python train.py -m experiment=posthoc_ema scheduler=linear,cosine "${data[@]}" '~callbacks.progress_bar' ${TRAIN_ARGS:-}
  SWEEP=$(ls -d logs/posthoc_ema/multiruns/* | sort | tail -n 1)
fi
mkdir -p "$(dirname "$RESULTS")"
[[ -f $RESULTS ]] && mv "$RESULTS" "$RESULTS.$(date +%s).bak"   # start a fresh shared results file

for job in "$SWEEP"/*/; do
  ckpt=$job/checkpoints/last.ckpt
  echo "== $ckpt"
  common=(experiment=eval_sweep task_name=posthoc_ema_eval "ckpt_path=$ckpt" "results_file=$PWD/$RESULTS"
          "metrics.fid.evaluator.num_samples=$NUM_SAMPLES")  # data: the run's own
  # The main sampler, with noise seeds to measure FID's seed noise: the default EMA, then the profiles.
  python evaluate.py "${common[@]}" -m sampler=dpmpp_2m sampler.spacing=karras sampler.num_steps=20 "seed=$SEEDS"
  python evaluate.py "${common[@]}" -m sampler=dpmpp_2m sampler.spacing=karras sampler.num_steps=20 "seed=$SEEDS" "ema.sigma_rel=$SIGMA_RELS"
  if [[ $DDIM == 1 ]]; then   # a second sampler, one seed: does the best length depend on the sampler?
    python evaluate.py "${common[@]}" -m sampler=ddim sampler.num_steps=25
    python evaluate.py "${common[@]}" -m sampler=ddim sampler.num_steps=25 "ema.sigma_rel=$SIGMA_RELS"
  fi
done
cp "$RESULTS" $HERE/results.csv
python $HERE/analyze.py $HERE/results.csv --out-dir $HERE
