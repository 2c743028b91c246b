#!/usr/bin/env bash
# VP (linear, cosine) vs VE vs EDM: four Fashion-MNIST 32x32 models (same net, recipe, steps and seed;
# only the schedule differs), each evaluated with the deterministic samplers on the grids they are made
# for, NFE 5..50, classifier-FID on NUM_SAMPLES samples x noise SEEDS.
# Usage (from the repo root; from elsewhere, logs/ and data go under the current directory):
#   bash experiments/vp_vs_ve/run.sh                 # train the four models, then evaluate them
#   bash experiments/vp_vs_ve/run.sh RUN_DIR...      # evaluate these trained run dirs (no training); two
#                                                    # shells with half the dirs each use both cores
#   MODE=digits bash experiments/vp_vs_ve/run.sh     # quick mode: digits 16x16, 600 steps, 500 samples,
#                                                    # one seed (~15 min on 2 cores; results under logs/)
# Environment: DATA_ROOT (Fashion-MNIST idx files; default ../shared/data/fashion-mnist when it exists,
# else data.root's default with download), SEEDS, NUM_SAMPLES, PRECISION, RESULTS, TRAIN_ARGS (extra
# train.py overrides), EVAL_ARGS (extra evaluate.py overrides, e.g. "metrics=fid device=cuda"),
# SAMPLERS (the sampler families to evaluate, default "dpmpp_2m heun ddim"; e.g. to finish a split run).
# The results file is shared with step_count and paper_claims (same models): never reset here, and a
# rerun replaces its rows (rows are keyed), so running the three studies never samples a cell twice.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # 1 thread per process: oversubscribing 2 cores is ~10x slower
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/experiments/vp_vs_ve
MODE=${MODE:-fashion}
if [[ $MODE == digits ]]; then
  RESULTS=${RESULTS:-logs/vp_vs_ve_digits/results.csv}
  SEEDS=${SEEDS:-0}; NUM_SAMPLES=${NUM_SAMPLES:-500}
  TRAIN=(experiment=vp_vs_ve scheduler=linear,cosine,ve,edm)
  MODELS=logs/vp_vs_ve/multiruns
  OUT=$(dirname "$RESULTS")
else
  RESULTS=${RESULTS:-logs/fmnist_studies/results.csv}
  SEEDS=${SEEDS:-0,1,2}; NUM_SAMPLES=${NUM_SAMPLES:-2000}
  if [[ -z ${DATA_ROOT:-} && -d $REPO/../shared/data/fashion-mnist ]]; then DATA_ROOT=$REPO/../shared/data/fashion-mnist; fi
  TRAIN=(experiment=posthoc_ema task_name=fmnist_models scheduler=linear,cosine,ve,edm)
  [[ -n ${DATA_ROOT:-} ]] && TRAIN+=("data.root=$DATA_ROOT")
  MODELS=logs/fmnist_models/multiruns
  OUT=$HERE
fi
RESULTS=$(realpath -m "$RESULTS")
SAMPLERS=${SAMPLERS:-dpmpp_2m heun ddim}
PRECISION=${PRECISION:-bf16}   # net autocast while sampling (sampler state float64): 2x faster than 32 on AVX-512 BF16 CPUs

if [[ $# -ge 1 ]]; then
  JOBS=("$@")
else
  # shellcheck disable=SC2086
  python "$REPO/train.py" -m "${TRAIN[@]}" '~callbacks.progress_bar' ${TRAIN_ARGS:-}
  JOBS=("$(ls -d $MODELS/* | sort | tail -n 1)"/*/)
fi
mkdir -p "$(dirname "$RESULTS")"

for job in "${JOBS[@]}"; do
  ckpt=$job/checkpoints/last.ckpt
  schedule=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['hydra']['runtime']['choices']['scheduler'])" "$job/.hydra/hydra.yaml")
  echo "== $schedule: $ckpt"
  # seed first: the sweep finishes every NFE at seed 0 before it starts seed 1
  common=(experiment=eval_sweep task_name=study_eval "ckpt_path=$ckpt" "results_file=$RESULTS"
          "metrics.fid.evaluator.num_samples=$NUM_SAMPLES" "precision=$PRECISION" "seed=$SEEDS")
  # shellcheck disable=SC2206
  common+=(${EVAL_ARGS:-})
  # The karras grid (rho 7, the schedule's own sigma~ range) for every schedule: apples to apples.
  if [[ " $SAMPLERS " == *" dpmpp_2m "* ]]; then
    python "$REPO/evaluate.py" "${common[@]}" -m sampler=dpmpp_2m sampler.spacing=karras sampler.num_steps=5,10,20,50
  fi
  if [[ " $SAMPLERS " == *" heun "* ]]; then   # NFE 5, 9, 19 (2 steps - 1): the CPU budget stops at 19
    python "$REPO/evaluate.py" "${common[@]}" -m sampler=heun sampler.spacing=karras sampler.num_steps=3,5,10
  fi
  # DDIM on its own discrete (leading) grid: VP only (VE/EDM have no training table to index)
  if [[ " $SAMPLERS " == *" ddim "* && ( $schedule == linear || $schedule == cosine ) ]]; then
    python "$REPO/evaluate.py" "${common[@]}" -m sampler=ddim sampler.num_steps=5,10,20,50
  fi
done
python "$HERE/analyze.py" "$RESULTS" --budgets 5,10,20,50 --select ddim:leading:eta=0.0,dpmpp_2m:karras,heun:karras --out-dir "$OUT"
