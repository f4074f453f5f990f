#!/usr/bin/env bash
# Same quality: train the exact and the fast path for the same steps on a generated Shepard-Metzler set, with
# several seeds each, then compare the PSNR of held-out views (the test split's spiral views of the first 50
# training objects, rendered in fp32).
#   [FIRST_SEED=0] [PATHS="exact fast"] bash benchmarks/quality.sh OUT_DIR STEPS [BATCH=16] [OBJECTS=200] [SEEDS=1]
# Runs seeds FIRST_SEED .. FIRST_SEED+SEEDS-1 side by side, spread over the GPUs (this script measures quality,
# not speed), then summarises every run found in OUT_DIR, so seeds run in separate calls add up.
# PATHS: which of exact (fp32), fast (--fast) and fused (--fast --kernels triton) to train; the summary compares
# the first with each other one found in OUT_DIR.
set -euo pipefail
out=${1:?output folder}; steps=${2:-2000}; batch=${3:-16}; objects=${4:-200}; seeds=${5:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
data=$out/sm
[ -d "$data/train" ] || python "$here/shepard_metzler.py" --output_dir "$data" --num_objects "$objects" \
    --sidelength 64 >/dev/null
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
common=(--data_root "$data/train" --val_root "$data/val" --img_sidelengths 64
        --batch_size_per_img_sidelength "$batch" --max_steps_per_img_sidelength "$steps" --lr 1e-4
        --steps_til_val 500 --steps_til_ckpt 100000 --steps_til_image 100000 --num_workers 4)

one_run() {  # one_run PATH SEED
    local path=$1 seed=$2 flag=() start run
    [ "$path" = fast ] && flag=(--fast)
    [ "$path" = fused ] && flag=(--fast --kernels triton)
    run=$out/${path}_seed$seed
    start=$(date +%s)
    python "$here/train.py" "${common[@]}" "${flag[@]}" --seed "$seed" --logging_root "$run" >"$run.log" 2>&1
    local trained=$(( $(date +%s) - start ))
    python "$here/test.py" --data_root "$data/test" --checkpoint_path "$run/checkpoints" --img_sidelength 64 \
        --max_num_instances 50 --save_out_first_n 0 --logging_root "${run}_test" --no_progress >"${run}_test.log" 2>&1
    echo "$path seed $seed: $steps steps in $trained s; $(grep -E 'val PSNR' "$run.log" | tr '\r' '\n' | \
        grep -oE 'step [0-9]+: val PSNR [0-9.]+' | tr '\n' ';') held-out PSNR, SSIM: $(cat "${run}_test/results.txt")"
}

# Every run at once, seed s on GPU s mod (number of GPUs): both paths share each GPU alike.
first=${FIRST_SEED:-0}
for seed in $(seq "$first" $(( first + seeds - 1 ))); do
    for path in ${PATHS:-exact fast}; do
        (export CUDA_VISIBLE_DEVICES=$(( seed % (gpus > 0 ? gpus : 1) )); one_run "$path" "$seed") &
    done
done
wait

python - "$out" ${PATHS:-exact fast} <<'EOF'
import pathlib, re, statistics, sys
out = pathlib.Path(sys.argv[1])
means = {}
for path in ('exact', 'fast', 'fused'):
    runs = sorted((int(re.search(r'seed(\d+)_test$', f.parent.name)[1]), float(f.read_text().split(',')[0]))
                  for f in out.glob(f'{path}_seed*_test/results.txt'))
    if not runs:
        continue
    psnr = [p for _, p in runs]
    means[path] = statistics.mean(psnr)
    spread = f" +- {statistics.stdev(psnr):.2f} (std over {len(psnr)} seeds)" if len(psnr) > 1 else ''
    print(f"{path}: held-out PSNR {means[path]:.2f} dB{spread}; " + ', '.join(f'seed {s}: {p:.2f}' for s, p in runs))
first = sys.argv[2]
for path in means:
    if path != first and first in means:
        print(f"gap {first} - {path}: {means[first] - means[path]:+.2f} dB")
EOF
