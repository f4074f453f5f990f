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
# Writes OUT_DIR/time_to_quality.md (mean +- std over seeds) and OUT_DIR/time_to_quality.png (held-out PSNR
# against seconds; needs matplotlib).
#
# Environment:
#   TRAIN_FLAGS   replaces the flags both recipes add (default --fast), e.g. "--device cpu" for a trial without a GPU
#   GPUS          e.g. "0 1": the seeds are shared out over these GPUs, one training at a time on each (default:
#                 all runs one after the other on the visible device)
#   FEWSHOT=N     also fit new codes to one view (view 5) and to two views (5 and 15) of 50 objects that no model
#                 saw, N steps with the networks frozen (test.py --fit_steps), for each recipe's model of the
#                 largest budget, and report the held-out PSNR of their other views (default 0: not done)
#   WARM_COMPILE  torch.compile keeps what it compiled in a cache on disk (/tmp/torchinductor_$USER), and a run
#                 that finds it there starts training in about 20 s instead of 60-80. By default (1) each recipe
#                 first runs untimed for a moment per object count, so the timed runs measure a machine that has
#                 trained this model before, as a researcher's usually has; 0 leaves that out (then the first
#                 timed run of each recipe pays the cold compilation, and the others do not)
set -u
OUT=${1:?usage: time_to_quality.sh OUT_DIR [OBJECTS] [SECONDS] [SEEDS] [RECIPES]}
OBJECTS=${2:-50}; BUDGETS=${3:-60 150 300}; SEEDS=${4:-0}; RECIPES=${5:-reference fast}
PYTHON=${PYTHON:-python3}
FEWSHOT=${FEWSHOT:-0}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

evaluate() {  # evaluate RUN_NAME CHECKPOINT STEPS: held-out PSNR of one checkpoint, as OUT_DIR/RUN_NAME_test
  local name=$1 checkpoint=$2 steps=$3
  "$PYTHON" test.py --data_root "$data/test" --checkpoint_path "$checkpoint" --img_sidelength 64 \
      --max_num_instances 50 --save_out_first_n 0 --batch_size 64 --logging_root "$OUT/${name}_test" \
      --no_progress --overwrite > "$OUT/${name}_test.log" 2>&1
  echo "$name: $steps steps; held-out PSNR, SSIM $(cat "$OUT/${name}_test/results.txt" 2>/dev/null || echo failed)"
}

fewshot() {  # fewshot RUN_NAME CHECKPOINT: one- and two-shot fitting on the unseen objects, OUT_DIR/RUN_NAME_<k>shot_test
  local name=$1 checkpoint=$2 views shots
  [ "$FEWSHOT" -gt 0 ] || return 0
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

run_seed() {  # run_seed SEED: every recipe and budget of one seed on the current device
  local seed=$1 recipe budget run name pending smaller line checkpoint when minutes steps
  for recipe in $RECIPES; do
    if [ "$recipe" = reference ]; then
      # A constant learning rate: the run for the largest budget, checkpointed as the clock passes each smaller
      # one, gives what separate runs for those budgets would (same seed, same steps up to that moment).
      run=$OUT/${objects}_reference_run_seed$seed
      pending=0
      for budget in $BUDGETS; do [ -f "$OUT/${objects}_reference_${budget}s_seed${seed}_test/metrics.json" ] || pending=1; done
      [ $pending = 0 ] && continue
      smaller=$(for budget in $BUDGETS; do [ "$budget" -lt "$largest" ] && "$PYTHON" -c "print($budget / 60)"; done | paste -sd,)
      train "$run" "$(config_of reference)" "$largest" ${smaller:+--save_at_minutes "$smaller"}
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
      continue
    fi
    for budget in $BUDGETS; do  # a schedule that follows the budget (cosine decay): one run per budget
      name=${objects}_${recipe}_${budget}s_seed$seed
      [ -f "$OUT/${name}_test/metrics.json" ] && continue
      train "$OUT/$name" "$(config_of "$recipe")" "$budget"
      evaluate "$name" "$OUT/$name/checkpoints" "$(grep -o 'Done: [0-9]* steps' "$OUT/$name.log" | tail -1 | grep -oE '[0-9]+')"
      [ "$budget" = "$largest" ] && fewshot "$name" "$OUT/$name/checkpoints"
    done
  done
}

unseen=$OUT/sm_unseen
if [ "$FEWSHOT" -gt 0 ] && [ ! -f "$unseen/dataset_info.json" ]; then
  "$PYTHON" shepard_metzler.py --output_dir "$unseen" --num_objects 50 --sidelength 64 --seed 1 > "$OUT/sm_unseen.log" 2>&1
fi
read -r -a gpus <<< "${GPUS:-}"
for objects in $OBJECTS; do
  data=$OUT/sm$objects
  [ -f "$data/dataset_info.json" ] || "$PYTHON" shepard_metzler.py --output_dir "$data" --num_objects "$objects" \
      --sidelength 64 > "$OUT/sm$objects.log" 2>&1
  if [ "${WARM_COMPILE:-1}" = 1 ]; then
    seed=0
    for recipe in $RECIPES; do  # untimed: fills the compile cache (stops at the first clock reading)
      train "$OUT/warmup_${objects}_$recipe" "$(config_of "$recipe")" 0.6
      grep -o 'Done: .*steps in [0-9:]*' "$OUT/warmup_${objects}_$recipe.log" | sed "s/^/warm-up $recipe: /"
      rm -rf "$OUT/warmup_${objects}_$recipe"
    done
  fi
  if [ ${#gpus[@]} -eq 0 ]; then
    for seed in $SEEDS; do run_seed "$seed"; done
  else  # one queue of seeds per GPU, the queues side by side
    read -r -a seeds <<< "$SEEDS"
    for g in "${!gpus[@]}"; do
      (
        export CUDA_VISIBLE_DEVICES=${gpus[g]}
        for s in "${!seeds[@]}"; do
          [ $(( s % ${#gpus[@]} )) = "$g" ] && run_seed "${seeds[s]}"
        done
      ) &
    done
    wait
  fi
done

"$PYTHON" - "$OUT" <<'PY'
import collections, json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
runs = collections.defaultdict(list)  # (objects, recipe, seconds) -> [(psnr, ssim, steps)]
shots = collections.defaultdict(list)  # (objects, recipe, seconds, k) -> [held-out psnr]
for metrics in sorted(out.glob('*_*_*s_seed*_test/metrics.json')):
    match = re.match(r'(\d+)_(\w+?)_(\d+)s_seed\d+(?:_(\d)shot)?_test$', metrics.parent.name)
    if match is None:
        continue
    objects, recipe, seconds, k = match.groups()
    summary = json.loads(metrics.read_text())['summary']
    if k is not None:
        shots[int(objects), recipe, int(seconds), int(k)].append(summary['held_out_views']['psnr'])
        continue
    log = (out / metrics.parent.name[:-len('_test')]).with_suffix('.log')
    done = re.findall(r'Done: (\d+) steps', log.read_text(errors='replace')) if log.exists() else []
    runs[int(objects), recipe, int(seconds)].append((summary['all_views']['psnr'], summary['all_views']['ssim'],
                                                     int(done[-1]) if done else 0))

def mean_std(values):
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5

lines = ['| objects | recipe | seconds | seeds | steps | held-out PSNR (dB) | SSIM |', '|---|---|---|---|---|---|---|']
for (objects, recipe, seconds), values in sorted(runs.items()):
    psnr, psnr_std = mean_std([v[0] for v in values])
    ssim, _ = mean_std([v[1] for v in values])
    steps, _ = mean_std([v[2] for v in values])
    lines.append(f'| {objects} | {recipe} | {seconds} | {len(values)} | {steps:.0f} | {psnr:.2f} +- {psnr_std:.2f} | {ssim:.3f} |')
if shots:
    lines += ['', 'Few-shot fitting of 50 unseen objects (networks frozen), held-out views:', '',
              '| objects | recipe | seconds | views fitted | seeds | held-out PSNR (dB) |', '|---|---|---|---|---|---|']
    for (objects, recipe, seconds, k), values in sorted(shots.items()):
        psnr, psnr_std = mean_std(values)
        lines.append(f'| {objects} | {recipe} | {seconds} | {k} | {len(values)} | {psnr:.2f} +- {psnr_std:.2f} |')
(out / 'time_to_quality.md').write_text('\n'.join(lines) + '\n')
print('\n'.join(lines))
try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit('(no matplotlib: no plot)')
figure, axis = plt.subplots(figsize=(6, 4))
for objects, recipe in sorted({(o, r) for o, r, _ in runs}):
    points = sorted((s, mean_std([v[0] for v in runs[objects, recipe, s]])) for o, r, s in runs
                    if (o, r) == (objects, recipe))
    axis.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points], marker='o',
                  capsize=3, label=f'{recipe}, {objects} objects')
axis.set_xlabel('wall-clock seconds (setup and compilation included)')
axis.set_ylabel('held-out PSNR (dB)')
axis.grid(alpha=0.3)
axis.legend()
figure.tight_layout()
figure.savefig(out / 'time_to_quality.png', dpi=120)
PY
