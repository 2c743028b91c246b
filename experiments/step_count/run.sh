#!/usr/bin/env bash
# FID vs number of steps (NFE 5 ... 1000) for one checkpoint: the linear-schedule model of vp_vs_ve.
# Usage (from the repo root):  bash experiments/step_count/run.sh [path/to/last.ckpt]
# Default checkpoint: job 0 (scheduler=linear) of the newest vp_vs_ve multirun.
# Wall time on a shared 2-core CPU: ~10 min.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=experiments/step_count
RESULTS=${RESULTS:-logs/step_count/results.csv}
CKPT=${1:-$(ls -d logs/vp_vs_ve/multiruns/* | sort | tail -n 1)/0/checkpoints/last.ckpt}
[[ -f $CKPT ]] || { echo "No checkpoint $CKPT: run experiments/vp_vs_ve/run.sh (or train.py experiment=step_count) first" >&2; exit 1; }
[[ -f $RESULTS ]] && mv "$RESULTS" "$RESULTS.$(date +%s).bak"
common=(experiment=eval_sweep task_name=step_count "ckpt_path=$CKPT" "results_file=$PWD/$RESULTS")

# DDIM (eta 0) with the DDPM/diffusers default leading spacing, NFE 5 ... 1000 (1000 = every training index).
python evaluate.py "${common[@]}" -m sampler=ddim sampler.num_steps=5,10,20,50,100,200,500,1000
# A 2nd-order multistep solver on the karras grid, to where it has clearly converged.
python evaluate.py "${common[@]}" -m sampler=dpmpp_2m sampler.spacing=karras sampler.num_steps=5,10,20,50,100,200
# Noise level of FID at this sample count: the converged sampler again with 4 more noise seeds.
python evaluate.py "${common[@]}" -m sampler=dpmpp_2m sampler.spacing=karras sampler.num_steps=50 seed=1,2,3,4

cp "$RESULTS" $HERE/results.csv
python $HERE/analyze.py $HERE/results.csv --out-dir $HERE
