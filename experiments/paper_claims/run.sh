#!/usr/bin/env bash
# Paper claims in miniature on the Fashion-MNIST models of vp_vs_ve (run experiments/vp_vs_ve/run.sh
# first: its cells of these models, in the same shared results file, are reused here), plus one more
# model for Lin et al. 2023: the linear schedule rescaled to zero terminal SNR, same recipe.
# Usage (from the repo root):
#   bash experiments/paper_claims/run.sh [LINEAR_RUN_DIR [ZTSNR_RUN_DIR]]
# Default LINEAR_RUN_DIR (and COSINE_RUN_DIR, environment): the scheduler=linear (cosine) job of the
# newest logs/fmnist_models multirun; without ZTSNR_RUN_DIR the zero-terminal-SNR model is trained
# first (~10 min on one core).
# Environment: DATA_ROOT, SEEDS, NUM_SAMPLES, PRECISION, RESULTS, EVAL_ARGS, TRAIN_ARGS (as in
# vp_vs_ve/run.sh), ZTSNR_RESULTS, CLAIMS (which evaluations to run, default "ddim solvers iddpm
# trailing ztsnr"; e.g. two shells with a part each use both cores).
# SD3 Table 1 has its own pipeline (sd3_run.py, see README.md).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=experiments/paper_claims
RESULTS=${RESULTS:-logs/fmnist_studies/results.csv}
ZTSNR_RESULTS=${ZTSNR_RESULTS:-logs/fmnist_studies/results_ztsnr.csv}
CLAIMS=${CLAIMS:-ddim solvers iddpm trailing ztsnr}
SEEDS=${SEEDS:-0,1,2}; NUM_SAMPLES=${NUM_SAMPLES:-2000}; PRECISION=${PRECISION:-bf16}
if [[ -z ${DATA_ROOT:-} && -d ../shared/data/fashion-mnist ]]; then DATA_ROOT=$PWD/../shared/data/fashion-mnist; fi
data=()
[[ -n ${DATA_ROOT:-} ]] && data=("data.root=$DATA_ROOT")
RESULTS=$(realpath -m "$RESULTS"); ZTSNR_RESULTS=$(realpath -m "$ZTSNR_RESULTS")
[[ -f $RESULTS ]] || { echo "No results file $RESULTS: run experiments/vp_vs_ve/run.sh first (its cells are reused)" >&2; exit 1; }

job_of() {  # job_of SCHEDULER: that job of the newest logs/fmnist_models multirun
  dirname "$(dirname "$(grep -lx -- "- scheduler=$1" "$(ls -d logs/fmnist_models/multiruns/* | sort | tail -n 1)"/*/.hydra/overrides.yaml | head -n 1)")"
}
LINEAR=${1:-$(job_of linear)}
if [[ $# -ge 2 ]]; then
  ZTSNR=$2
elif [[ " $CLAIMS " != *" ztsnr "* ]]; then
  ZTSNR=
else
  # shellcheck disable=SC2086
  python train.py -m experiment=posthoc_ema task_name=fmnist_ztsnr scheduler=linear \
    scheduler.rescale_betas_zero_snr=true "${data[@]}" '~callbacks.progress_bar' ${TRAIN_ARGS:-}
  ZTSNR=$(ls -d logs/fmnist_ztsnr/multiruns/* | sort | tail -n 1)/0
fi
eval_on() {  # eval_on RUN_DIR RESULTS_FILE overrides...: one evaluate.py multirun, seed outermost
  local run=$1 results=$2
  shift 2
  # shellcheck disable=SC2086
  python evaluate.py experiment=eval_sweep task_name=study_eval "ckpt_path=$run/checkpoints/last.ckpt" \
    "results_file=$results" "metrics.fid.evaluator.num_samples=$NUM_SAMPLES" "precision=$PRECISION" \
    ${EVAL_ARGS:-} -m "seed=$SEEDS" "$@"
}
# DDIM Table 1 (Song et al. 2021): eta x S on the leading grid (eta 0 is vp_vs_ve's ddim row);
# S 10 and 20 only (CPU budget: the small S where the paper's claim is made).
claim() { [[ " $CLAIMS " == *" $1 "* ]]; }
claim ddim && eval_on "$LINEAR" "$RESULTS" sampler=ddim sampler.eta=0.2,0.5,1.0 sampler.num_steps=10,20
# DPM-Solver++(2M) and UniPC against DDIM on the same (leading) grid at 10 and 20 NFE.
claim solvers && eval_on "$LINEAR" "$RESULTS" sampler=dpmpp_2m,unipc sampler.spacing=leading sampler.num_steps=10,20
# iDDPM (cosine vs linear at few steps) and Lin et al.: the cosine model on the trailing grid
# (its leading-grid DDIM cells are vp_vs_ve's).
claim iddpm && eval_on "${COSINE_RUN_DIR:-$(job_of cosine)}" "$RESULTS" sampler=ddim sampler.spacing=trailing sampler.num_steps=5,10,20
# Lin et al. 2023: trailing spacing on the ordinary model, and the zero-terminal-SNR model (trailing).
claim trailing && eval_on "$LINEAR" "$RESULTS" sampler=ddim sampler.spacing=trailing sampler.num_steps=5,10,20
claim ztsnr && eval_on "$ZTSNR" "$ZTSNR_RESULTS" sampler=ddim sampler.spacing=trailing sampler.num_steps=5,10,20
# EDM (Heun + karras vs Euler = DDIM on the VP grid) and iDDPM's leading-grid cells are vp_vs_ve's.
python $HERE/analyze.py --results "$RESULTS" --ztsnr "$ZTSNR_RESULTS" --out-dir $HERE
