#!/usr/bin/env bash
# Quality against wall-clock time: the reference recipe and the fast recipe (train_configs/shepard_metzler*.yml,
# both with --fast) each trained for a budget of seconds (--max_minutes: setup and compilation included) on the
# same generated Shepard-Metzler set, then test.py on the test split's spiral views of the first 50 training
# objects (held-out novel views, 1000 images at 64 px).
#
#   bash benchmarks/time_to_quality.sh OUT_DIR ["OBJECTS..."] ["SECONDS..."] ["SEEDS..."] ["RECIPES..."]
#   e.g. GPUS="0 1" FEWSHOT=1000 bash benchmarks/time_to_quality.sh /tmp/ttq "50 500" "60 150 300" "0 1 2"
#
# Every finished run is kept (OUT_DIR/<objects>_<recipe>_<seconds>s_seed<seed>): calling again with other
# budgets or seeds adds to the table. The reference recipe (a constant learning rate) trains once per seed, for
# the largest budget, and the smaller budgets are read off checkpoints written as the clock passes them
# (train.py --save_at_minutes); the fast recipe's decay follows its budget, so it trains once per budget.
# GPU time per object count and seed, for budgets 60, 150 and 300 s: 300 + 510 s of training, plus evaluation.
# Writes OUT_DIR/time_to_quality.md (mean +- std over seeds), OUT_DIR/time_to_quality_runs.csv (one row a run,
# to add to benchmarks/time_to_quality_runs.csv) and OUT_DIR/time_to_quality.png (held-out PSNR
# against seconds; needs matplotlib), and prints for each training run the step at which its loss left the plateau
# at the start, and fell back onto it if it did (benchmarks/plateau.py --read).
#
# Environment:
#   TRAIN_FLAGS   replaces the flags both recipes add (default --fast), e.g. "--device cpu" for a trial without a GPU
#   GPUS          e.g. "0 1": the runs are shared out over these GPUs, one training at a time on each, each GPU
#                 taking the next run not yet taken, longest first (default: all runs one after the other on the
#                 visible device)
#   FEWSHOT=N     also fit new codes to one view (view 5) and to two views (5 and 15) of 50 objects that no model
#                 saw, N steps with the networks frozen (test.py --fit_steps), for each recipe's model of the
#                 largest budget, and report the held-out PSNR of their other views (default 0: not done)
#   FEWSHOT_SEEDS the seeds whose models are fitted so (default: the first of SEEDS)
#   WARM_COMPILE  torch.compile keeps what it compiled in a cache on disk (/tmp/torchinductor_$USER), and a run
#                 that finds it there starts training in about 15 s instead of 80. By default (1) each recipe
#                 first runs untimed for a moment per object count, so the timed runs measure a machine that has
#                 trained this model before, as a researcher's usually has; 0 leaves that out (then the first
#                 timed run of each recipe pays the cold compilation, and the others do not). With GPUS the
#                 recipes warm up side by side.
#   BYTECODE_CACHE  a Python that cannot keep compiled bytecode (PYTHONDONTWRITEBYTECODE set, or torch installed
#                 read-only, as in many containers) compiles PyTorch's modules again in every process: importing
#                 torch, dynamo and inductor took 13.0 s that way against 3.6 s with a cache (one H200 host), time that
#                 a researcher's own install does not spend. By default (1) such a Python gets a bytecode cache
#                 in OUT_DIR/.pycache (PYTHONPYCACHEPREFIX), which the warm-up fills; 0 leaves Python as it is
#   TIME_LIMIT    seconds: take no run that would not end (its budget, plus 20 s for each evaluation, about
#                 twice what one takes, plus four minutes for few-shot fitting) this long after the start; the
#                 runs left out are listed, and a later call with the same arguments does them (default: no limit)
set -u
start_time=$(date +%s)
OUT=${1:?usage: time_to_quality.sh OUT_DIR [OBJECTS] [SECONDS] [SEEDS] [RECIPES]}
OBJECTS=${2:-50}; BUDGETS=${3:-60 150 300}; SEEDS=${4:-0}; RECIPES=${5:-reference fast}
PYTHON=${PYTHON:-python3}
FEWSHOT=${FEWSHOT:-0}
read -r -a seed_list <<< "$SEEDS"
FEWSHOT_SEEDS=${FEWSHOT_SEEDS:-${seed_list[0]}}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

evaluate() {  # evaluate RUN_NAME CHECKPOINT STEPS: held-out PSNR of one checkpoint, as OUT_DIR/RUN_NAME_test
  local name=$1 checkpoint=$2 steps=$3
  "$PYTHON" test.py --data_root "$data/test" --checkpoint_path "$checkpoint" --img_sidelength 64 \
      --max_num_instances 50 --save_out_first_n 0 --batch_size 64 --logging_root "$OUT/${name}_test" \
      --no_progress --overwrite > "$OUT/${name}_test.log" 2>&1
  echo "$name: $steps steps; held-out PSNR, SSIM $(cat "$OUT/${name}_test/results.txt" 2>/dev/null || echo failed)"
}

plateau() {  # plateau RUN_DIR: when the run left the plateau at its start (benchmarks/plateau.py), one line
  "$PYTHON" benchmarks/plateau.py --read "$1" 2> "$1_plateau.log" ||
      echo "$(basename "$1"): no scaled_distortion_loss read (see $(basename "$1")_plateau.log)"
}

fitted_seed() { [ "$FEWSHOT" -gt 0 ] && [[ " $FEWSHOT_SEEDS " == *" $1 "* ]]; }  # fitted_seed SEED: FEWSHOT fits its models

fewshot() {  # fewshot RUN_NAME CHECKPOINT: one- and two-shot fitting on the unseen objects, OUT_DIR/RUN_NAME_<k>shot_test
  local name=$1 checkpoint=$2 views shots
  fitted_seed "$seed" || return 0
  for views in 5 5,15; do
    shots=$(( $(echo "$views" | tr -cd , | wc -c) + 1 ))
    "$PYTHON" test.py --data_root "$unseen/test" --checkpoint_path "$checkpoint" --img_sidelength 64 \
        --fit_observation_idcs "$views" --fit_steps "$FEWSHOT" --save_out_first_n 0 --batch_size 64 \
        --logging_root "$OUT/${name}_${shots}shot_test" --no_progress --overwrite \
        > "$OUT/${name}_${shots}shot_test.log" 2>&1
    echo "$name, ${shots}-shot ($FEWSHOT fitting steps): held-out PSNR $("$PYTHON" -c "import json, sys
print('%.2f' % json.load(open(sys.argv[1]))['summary']['held_out_views']['psnr'])" \
        "$OUT/${name}_${shots}shot_test/metrics.json" 2>/dev/null || echo failed)"
  done
}

train() {  # train RUN_DIR CONFIG SECONDS [FLAGS...]
  local run=$1 config=$2 budget=$3; shift 3
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$PYTHON" train.py -c "$config" ${TRAIN_FLAGS---fast} --data_root "$data/train" --val_root "$data/val" \
      --logging_root "$run" --seed "$seed" --max_minutes "$("$PYTHON" -c "print($budget / 60)")" \
      --max_steps_per_img_sidelength 1000000 --no_validation --steps_til_ckpt 1000000 \
      --steps_til_image 1000000 "$@" > "$run.log" 2>&1
}

config_of() { [ "$1" = fast ] && echo train_configs/shepard_metzler_fast.yml || echo train_configs/shepard_metzler.yml; }

largest=$(printf '%s\n' $BUDGETS | sort -n | tail -1)

run_job() {  # run_job SEED RECIPE SECONDS: one training run and its evaluations, on the current device
  local seed=$1 recipe=$2 budget=$3 run name smaller line checkpoint when minutes steps
  if [ "$recipe" = reference ]; then
    # A constant learning rate: the run for the largest budget, checkpointed as the clock passes each smaller
    # one, gives what separate runs for those budgets would (same seed, same steps up to that moment).
    run=$OUT/${objects}_reference_run_seed$seed
    smaller=$(for budget in $BUDGETS; do [ "$budget" -lt "$largest" ] && "$PYTHON" -c "print($budget / 60)"; done | paste -sd,)
    train "$run" "$(config_of reference)" "$largest" ${smaller:+--save_at_minutes "$smaller"}
    plateau "$run"
    for budget in $BUDGETS; do
      if [ "$budget" = "$largest" ]; then
        line=$(grep -o 'Done: [0-9]* steps.*final checkpoint .*' "$run.log" | tail -1)
        checkpoint=${line##*final checkpoint } when="the end"
      else
        minutes=$("$PYTHON" -c "print(f'{$budget / 60:g}')")
        line=$(grep -o -- "--save_at_minutes $minutes: .* at step [0-9]*, [0-9.]* min" "$run.log" | tail -1)
        checkpoint=$(echo "$line" | sed -E 's/^--save_at_minutes [^:]*: (.*) at step [0-9]*, .*$/\1/')
        when=${line##*, }
      fi
      steps=$(echo "$line" | grep -oE '(at step|Done:) [0-9]+' | grep -oE '[0-9]+$')
      echo "Done: $steps steps (the ${budget}-s point of $(basename "$run"), saved at $when)" \
          > "$OUT/${objects}_reference_${budget}s_seed$seed.log"
      evaluate "${objects}_reference_${budget}s_seed$seed" "${checkpoint:-$run/missing}" "$steps"
      [ "$budget" = "$largest" ] && fewshot "${objects}_reference_${budget}s_seed$seed" "${checkpoint:-$run/missing}"
    done
    return
  fi
  # A schedule that follows the budget (cosine decay): one run per budget.
  name=${objects}_${recipe}_${budget}s_seed$seed
  train "$OUT/$name" "$(config_of "$recipe")" "$budget"
  plateau "$OUT/$name"
  evaluate "$name" "$OUT/$name/checkpoints" "$(grep -o 'Done: [0-9]* steps' "$OUT/$name.log" | tail -1 | grep -oE '[0-9]+')"
  [ "$budget" = "$largest" ] && fewshot "$name" "$OUT/$name/checkpoints"
}

done_already() {  # done_already SEED RECIPE SECONDS: every evaluation of that run is on disk
  local seed=$1 recipe=$2 budget=$3 b
  if [ "$recipe" = reference ]; then
    for b in $BUDGETS; do [ -f "$OUT/${objects}_reference_${b}s_seed${seed}_test/metrics.json" ] || return 1; done
    return 0
  fi
  [ -f "$OUT/${objects}_${recipe}_${budget}s_seed${seed}_test/metrics.json" ]
}

run_queue() {  # run_queue: take the runs of the job list one by one; a run is taken by creating its claim folder
  local job claim fitting evaluations
  for job in "${jobs[@]}"; do
    # shellcheck disable=SC2086
    set -- $job
    done_already "$2" "$3" "$1" && continue
    claim=$OUT/.claims/${objects}_$2_$3_$1
    fitting=0 evaluations=1
    [ "$1" = "$largest" ] && fitted_seed "$2" && fitting=240
    [ "$3" = reference ] && evaluations=$(wc -w <<< "$BUDGETS")
    if [ -n "${TIME_LIMIT:-}" ] && (( $(date +%s) + $1 + 20 * evaluations + fitting > start_time + TIME_LIMIT )); then
      mkdir "$claim" 2>/dev/null && echo "left for a later call (TIME_LIMIT): $job"
      continue
    fi
    mkdir "$claim" 2>/dev/null || continue
    run_job "$2" "$3" "$1"
  done
}

warm_up() {  # warm_up WORKER: untimed runs of this worker's share of the recipes fill the compile cache
  local r
  [ "${WARM_COMPILE:-1}" = 1 ] || return 0
  seed=0
  for r in "${!recipe_list[@]}"; do  # each stops at its first clock reading, just after compiling
    [ $(( r % ${#workers[@]} )) = "$1" ] || continue
    recipe=${recipe_list[r]}
    train "$OUT/warmup_${objects}_$recipe" "$(config_of "$recipe")" 0.1
    grep -o 'Done: .*steps in [0-9:]*' "$OUT/warmup_${objects}_$recipe.log" | sed "s/^/warm-up $recipe: /"
    rm -rf "$OUT/warmup_${objects}_$recipe"
  done
}

on_workers() {  # on_workers FUNCTION: FUNCTION WORKER once per worker, side by side, each seeing its GPU alone
  local w
  for w in "${!workers[@]}"; do
    (
      [ -n "${workers[w]}" ] && export CUDA_VISIBLE_DEVICES=${workers[w]}
      "$1" "$w"
    ) &
  done
  wait
}

# no bytecode of torch's own, and none can be written: a cache of our own (BYTECODE_CACHE above)
if [ "${BYTECODE_CACHE:-1}" = 1 ] && ! "$PYTHON" -c "
import importlib.util, os, sys
init = importlib.util.find_spec('torch').origin
writable = os.access(os.path.dirname(init), os.W_OK) and not os.environ.get('PYTHONDONTWRITEBYTECODE')
sys.exit(not (writable or os.path.exists(importlib.util.cache_from_source(init))))"; then
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$(cd "$OUT" && pwd)/.pycache}
  echo "bytecode cache: $PYTHONPYCACHEPREFIX (this Python cannot keep torch's compiled modules)"
fi
unseen=$OUT/sm_unseen
if [ "$FEWSHOT" -gt 0 ] && [ ! -f "$unseen/dataset_info.json" ]; then
  "$PYTHON" shepard_metzler.py --output_dir "$unseen" --num_objects 50 --sidelength 64 --seed 1 > "$OUT/sm_unseen.log" 2>&1
fi
read -r -a gpus <<< "${GPUS:-}"
for objects in $OBJECTS; do
  data=$OUT/sm$objects
  [ -f "$data/dataset_info.json" ] || "$PYTHON" shepard_metzler.py --output_dir "$data" --num_objects "$objects" \
      --sidelength 64 > "$OUT/sm$objects.log" 2>&1
  # The job list, longest first: "SECONDS SEED RECIPE" (the reference recipe: one run of the largest budget).
  mapfile -t jobs < <(for seed in $SEEDS; do for recipe in $RECIPES; do
      if [ "$recipe" = reference ]; then echo "$largest $seed reference"
      else for budget in $BUDGETS; do echo "$budget $seed $recipe"; done; fi
    done; done | sort -s -k1,1nr)
  rm -rf "$OUT/.claims" && mkdir -p "$OUT/.claims"
  read -r -a recipe_list <<< "$RECIPES"
  workers=("${gpus[@]:-}")
  on_workers warm_up
  on_workers run_queue
done

"$PYTHON" benchmarks/time_to_quality_table.py "$OUT"
