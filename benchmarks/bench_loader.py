"""Loader throughput of dataio.SceneClassDataset (SPEC section 5), in images per second.

Measures, for each side length and with / without ``preload``, how many observations per second a
shuffled DataLoader (``samples_per_instance=1``, as every script uses) delivers, plus the time to build
the dataset. Without --data_root it first writes a 128-px Shepard-Metzler dataset to a temporary folder.

    python benchmarks/bench_loader.py --num_workers 2
    python benchmarks/bench_loader.py --data_root /data/cars_train --sides 64,128 --num_batches 50

Measured (16-core host, batch 64, 1000 generated 128-px views; images/s):
    num_workers           side 64: plain / preload    side 128: plain / preload
    0 (1 core)                   1755 / 2940                 1326 / 2265
    2 (3 cores)                  1762 / 3443                 1354 / 1885
    8 (16 cores)                 3452 / 4580                 2437 / 3024
At 128 px the (N, 2) int64 uv and (N, 3) float32 rgb of each sample (29 MB a batch) crossing from the
workers dominate; decoding is what preload removes.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataio  # noqa: E402
import shepard_metzler  # noqa: E402


def measure(root, side, preload, num_workers, batch_size, num_batches, max_num_instances):
    start = time.perf_counter()
    dataset = dataio.SceneClassDataset(root, img_sidelength=side, max_num_instances=max_num_instances,
                                       samples_per_instance=1, preload=preload)
    build_s = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, collate_fn=dataset.collate_fn,
                                         persistent_workers=False)
    images, timed_from = 0, None
    while True:  # warm-up batch (worker start-up) excluded, then num_batches timed
        for observations, _ in loader:
            if timed_from is None:
                timed_from = time.perf_counter()
                continue
            images += observations["rgb"].shape[0]
            if images >= num_batches * batch_size:
                break
        if images >= num_batches * batch_size:
            break
    return images / (time.perf_counter() - timed_from), build_s, len(dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=None, help="an SRN-format class folder (default: generate one)")
    parser.add_argument("--sides", default="64,128")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_batches", type=int, default=30)
    parser.add_argument("--max_num_instances", type=int, default=-1)
    parser.add_argument("--num_objects", type=int, default=20, help="objects to generate without --data_root")
    opt = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = opt.data_root
        if root is None:
            start = time.perf_counter()
            info = shepard_metzler.generate_dataset(os.path.join(tmp, "sm"), opt.num_objects, sidelength=128,
                                                    num_test_views=0, num_val_objects=0,
                                                    workers=max(opt.num_workers, 1))
            root = info["splits"]["train"]
            print(f"generated {opt.num_objects} objects x 50 views at 128 px in {time.perf_counter() - start:.1f} s")
        print(f"data_root={root} num_workers={opt.num_workers} batch_size={opt.batch_size} "
              f"threads={torch.get_num_threads()}")
        print(f"{'side':>5} {'preload':>8} {'images/s':>10} {'build s':>8} {'views':>6}")
        for side in [int(s) for s in opt.sides.split(",")]:
            for preload in (False, True):
                rate, build_s, length = measure(root, side, preload, opt.num_workers, opt.batch_size,
                                                opt.num_batches, opt.max_num_instances)
                print(f"{side:>5} {str(preload):>8} {rate:>10.0f} {build_s:>8.2f} {length:>6}")


if __name__ == "__main__":
    main()
