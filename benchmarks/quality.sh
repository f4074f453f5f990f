#!/usr/bin/env bash
# Same quality: train the exact and the fast path for the same steps on a generated Shepard-Metzler set,
# then compare the PSNR of held-out views (the test split's spiral views of the training objects).
#   bash benchmarks/quality.sh OUT_DIR STEPS [BATCH] [OBJECTS]
set -euo pipefail
out=${1:?output folder}; steps=${2:-2000}; batch=${3:-16}; objects=${4:-200}
data=$out/sm
python shepard_metzler.py --output_dir "$data" --num_objects "$objects" --sidelength 64 >/dev/null
common=(--data_root "$data/train" --val_root "$data/val" --img_sidelengths 64
        --batch_size_per_img_sidelength "$batch" --max_steps_per_img_sidelength "$steps" --lr 1e-4
        --steps_til_val 500 --steps_til_ckpt 100000 --steps_til_image 1000 --num_workers 8 --seed 0)
for path in exact fast; do
    flag=(); [ "$path" = fast ] && flag=(--fast)
    start=$(date +%s)
    python train.py "${common[@]}" "${flag[@]}" --logging_root "$out/$path" 2>&1 | grep -E "val PSNR|Done" || true
    echo "$path: $steps steps in $(( $(date +%s) - start )) s"
    python test.py --data_root "$data/test" --checkpoint_path "$out/$path/checkpoints" --img_sidelength 64 \
        --max_num_instances 50 --save_out_first_n 0 --logging_root "$out/${path}_test" --no_progress >/dev/null
    echo "$path held-out (test split, 50 objects x spiral views): $(cat "$out/${path}_test/results.txt")"
done
