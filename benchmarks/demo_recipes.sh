#!/usr/bin/env bash
# Training recipes for the CPU demo, side by side: each variant is a real train.py run (train_configs/demo.yml
# plus the variant's flags) pinned to two cores, as on a laptop, all variants at once on a many-core machine;
# then test.py renders held-out spiral views (4 per object, 64 px) of every run.
#
#   bash benchmarks/demo_recipes.sh OUT_DIR [TRAIN_SECONDS]
#
# A run longer than TRAIN_SECONDS (default 480) is interrupted (it saves and exits); the table gives its
# steps. DEVICE=cuda runs every variant on the GPU at once (to compare quality per step, not time);
# VARIANTS_FILE=f reads the variants from f instead of the list below. Prints: variant, steps, wall seconds of training, final validation PSNR, held-out test PSNR / SSIM.
set -u
OUT=${1:?usage: demo_recipes.sh OUT_DIR [TRAIN_SECONDS]}
SECONDS_BUDGET=${2:-480}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
DATA=$OUT/data

# The demo's own dataset (16 objects, 64 px), generated once.
"$PYTHON" shepard_metzler.py --output_dir "$DATA" --num_objects 16 > "$OUT/data.log" 2>&1

# One variant per line: a name, then train.py flags added to train_configs/demo.yml's ($VARIANTS_FILE replaces
# these). Ray batches of ~2048 rays cost about what the demo's 2 x 32 x 32 pixels cost.
DEFAULT_VARIANTS=$(cat <<'LIST'
ref32
ref64 --img_sidelengths 64 --batch_size_per_img_sidelength 1 --max_steps_per_img_sidelength 700
rays8x256_lr2e-4 --img_sidelengths 64 --batch_size_per_img_sidelength 8 --rays_per_view 256 --max_steps_per_img_sidelength 1400
rays8x256_fast --img_sidelengths 64 --batch_size_per_img_sidelength 8 --rays_per_view 256 --max_steps_per_img_sidelength 1400 --lr 5e-4 --latent_lr 5e-3 --lr_warmup_steps 100 --lr_schedule cosine
rays16x128_fast --img_sidelengths 64 --batch_size_per_img_sidelength 16 --rays_per_view 128 --max_steps_per_img_sidelength 1400 --lr 5e-4 --latent_lr 5e-3 --lr_warmup_steps 100 --lr_schedule cosine
rays8x256_hot --img_sidelengths 64 --batch_size_per_img_sidelength 8 --rays_per_view 256 --max_steps_per_img_sidelength 1400 --lr 1e-3 --latent_lr 1e-2 --lr_warmup_steps 100 --lr_schedule cosine
rays8x256_fast_t10 --img_sidelengths 64 --batch_size_per_img_sidelength 8 --rays_per_view 256 --max_steps_per_img_sidelength 800 --lr 5e-4 --latent_lr 5e-3 --lr_warmup_steps 100 --lr_schedule cosine --tracing_steps 10
rays32x64_fast --img_sidelengths 64 --batch_size_per_img_sidelength 32 --rays_per_view 64 --max_steps_per_img_sidelength 1400 --lr 5e-4 --latent_lr 5e-3 --lr_warmup_steps 100 --lr_schedule cosine
LIST
)
declare -A VARIANTS=()
while read -r name args; do
  [ -n "$name" ] && [ "${name#\#}" = "$name" ] && VARIANTS[$name]=$args
done <<< "$(if [ -n "${VARIANTS_FILE:-}" ]; then cat "$VARIANTS_FILE"; else echo "$DEFAULT_VARIANTS"; fi)"
NAMES=$(printf '%s\n' "${!VARIANTS[@]}" | sort)
CORES=$(nproc)

tracing_of() { case "${VARIANTS[$1]}" in *"--tracing_steps 10"*) echo 10;; *) echo 5;; esac; }

i=0
for name in $NAMES; do
  first=$(( (2 * i) % CORES )); i=$((i + 1))
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 timeout -s INT "$SECONDS_BUDGET" taskset -c "$first,$((first + 1))" \
    "$PYTHON" train.py -c train_configs/demo.yml --data_root "$DATA/train" --val_root "$DATA/val" \
    --logging_root "$OUT/$name" --preload --device "${DEVICE:-cpu}" ${VARIANTS[$name]} > "$OUT/$name.log" 2>&1 &
done
wait

i=0
for name in $NAMES; do
  first=$(( (2 * i) % CORES )); i=$((i + 1))
  OMP_NUM_THREADS=2 taskset -c "$first,$((first + 1))" "$PYTHON" test.py --data_root "$DATA/test" \
    --checkpoint_path "$OUT/$name/checkpoints" --logging_root "$OUT/${name}_test" --img_sidelength 64 \
    --tracing_steps "$(tracing_of "$name")" --specific_observation_idcs 0,5,10,15 --batch_size 16 \
    --no_progress --overwrite --device "${DEVICE:-cpu}" > "$OUT/${name}_test.log" 2>&1 &
done
wait

printf '%-22s %6s %8s %9s %14s\n' variant steps train_s val_psnr test_psnr/ssim
for name in $NAMES; do
  "$PYTHON" - "$OUT" "$name" <<'EOF'
import json, pathlib, re, sys
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
log = (out / f'{name}.log').read_text(errors='replace')
steps = re.findall(r'iter_(\d+)\.pth', log)
done = re.search(r'Done: (\d+) steps in (\d+):(\d\d); val PSNR ([\d.]+)', log)
vals = re.findall(r'step (\d+): val PSNR ([\d.]+)', log)
train_s = int(done.group(2)) * 60 + int(done.group(3)) if done else float('nan')
val = done.group(4) if done else (vals[-1][1] + f'@{vals[-1][0]}' if vals else '-')
try:
    summary = json.loads((out / f'{name}_test' / 'metrics.json').read_text())['summary']['all_views']
    test = f"{summary['psnr']:.2f} / {summary['ssim']:.3f}"
except (OSError, KeyError, ValueError):
    test = '-'
print(f"{name:22s} {steps[-1] if steps else '-':>6s} {train_s:8.0f} {val:>9s} {test:>14s}")
EOF
done
