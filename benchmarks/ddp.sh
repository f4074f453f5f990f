#!/usr/bin/env bash
# Multi-GPU training with torchrun (DistributedDataParallel): throughput against one GPU, loss curves, and a
# checkpoint of the multi-GPU run evaluated by test.py on one GPU. Cars-size model on a generated
# Shepard-Metzler set.
#   bash benchmarks/ddp.sh OUT_DIR [GPUS=2] [BATCH_PER_GPU=16] [STEPS=1000] [train.py flags, e.g. --fast]
# Environment: SIDE (128), OBJECTS (500), TIMING_STEPS (STEPS/2), DEVICE (cuda; cpu runs a gloo smoke test).
# Runs, each a real train.py run with TensorBoard events in OUT_DIR/<run>:
#   1xB            one GPU, batch B, through torchrun --nproc_per_node=1 (TIMING_STEPS steps)
#   GxB            G GPUs, batch B each: its throughput against 1xB
#   1x(G*B)        one GPU, the same total batch: the loss curve GxB should follow
#   1x(G*B)_seed1  the same with another seed, beside it on the second GPU: the size of "noise"
set -euo pipefail
out=${1:?output folder}; gpus=${2:-2}; batch=${3:-16}; steps=${4:-1000}; shift $(( $# < 4 ? $# : 4 ))
side=${SIDE:-128}; objects=${OBJECTS:-500}; timing_steps=${TIMING_STEPS:-$(( steps / 2 ))}
device=${DEVICE:-cuda}
here=$(cd "$(dirname "$0")/.." && pwd)
data=$out/sm$side
mkdir -p "$out"
[ -d "$data/train" ] || python "$here/shepard_metzler.py" --output_dir "$data" --num_objects "$objects" \
    --sidelength "$side" >/dev/null
common=(--data_root "$data/train" --val_root "$data/val" --img_sidelengths "$side" --device "$device"
        --steps_til_val 250 --steps_til_ckpt 100000 --steps_til_image 100000 --steps_til_log 10
        --max_num_instances_val 4 --max_num_observations_val 4 --num_workers 6 "$@")

train() {  # train() NAME GPU_LIST NPROC BATCH STEPS SEED
    local name=$1 visible=$2 nproc=$3 b=$4 n=$5 seed=$6 start
    start=$(date +%s)
    CUDA_VISIBLE_DEVICES=$visible python -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
        "$here/train.py" "${common[@]}" --batch_size_per_img_sidelength "$b" --max_steps_per_img_sidelength "$n" \
        --seed "$seed" --logging_root "$out/$name" >"$out/$name.log" 2>&1
    echo "$name: $n steps on $nproc process(es), batch $b each: $(( $(date +%s) - start )) s wall"
}

all=$(seq -s, 0 $(( gpus - 1 )))
train "1x$batch" 0 1 "$batch" "$timing_steps" 0
train "${gpus}x$batch" "$all" "$gpus" "$batch" "$steps" 0
big=$(( gpus * batch ))
train "1x$big" 0 1 "$big" "$steps" 0 &
train "1x${big}_seed1" "$(( 1 % gpus ))" 1 "$big" "$steps" 1 &
wait

# The multi-GPU checkpoint in the single-process test.py: held-out spiral views of 10 training objects.
CUDA_VISIBLE_DEVICES=0 python "$here/test.py" --data_root "$data/test" --checkpoint_path "$out/${gpus}x$batch/checkpoints" \
    --img_sidelength "$side" --max_num_instances 10 --save_out_first_n 2 --device "$device" \
    --logging_root "$out/${gpus}x${batch}_test" --no_progress >"$out/${gpus}x${batch}_test.log" 2>&1
echo "test.py on the ${gpus}-GPU checkpoint (held-out views of 10 objects): PSNR, SSIM = $(cat "$out/${gpus}x${batch}_test/results.txt")"

python "$here/benchmarks/compare_runs.py" "$out/1x$batch" "$out/${gpus}x$batch" "$out/1x$big" "$out/1x${big}_seed1" \
    --speedup "${gpus}x$batch:1x$batch" --curve "${gpus}x$batch:1x$big" --curve "1x${big}_seed1:1x$big" \
    --skip $(( timing_steps / 3 )) --json "$out/compare.json"
