"""Compare train.py runs from their TensorBoard events: throughput and loss curves.

    python benchmarks/compare_runs.py OUT/1x16 OUT/2x16 OUT/1x32 OUT/1x32_seed1 \
        --speedup 2x16:1x16 --curve 2x16:1x32 --curve 1x32_seed1:1x32 [--json OUT/compare.json]

A run is a train.py ``--logging_root``; its name is the folder's name. Per run: steps logged, processes
(from the last checkpoint), images per step, median steps/s over the log intervals after ``--skip`` steps
(the first steps compile and warm up; a log interval with a validation or image step is an outlier the
median ignores), images/s and rays/s, and the last validation PSNR. ``--speedup A:B`` prints A's images/s
over B's. ``--curve A:B`` compares A's total loss with B's in ``--windows`` equal windows of steps: the
relative difference of the window means (under torchrun the logged loss is the mean over all processes,
so it is the loss of the whole batch).
"""
import argparse
import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import train  # noqa: E402
import util  # noqa: E402


def read_scalars(run):
    """{tag: (steps, values)} from the run's TensorBoard event files (in the run folder; ``events/`` in
    runs written before the event files moved there)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = pathlib.Path(run)
    events_dir = next((folder for folder in (run, run / 'events') if list(folder.glob('events.out.tfevents.*'))),
                      None)
    if events_dir is None:
        raise SystemExit(f"compare_runs.py: error: {run}: no TensorBoard event files (not a train.py run?)")
    events = EventAccumulator(str(events_dir), size_guidance={'scalars': 0}).Reload()
    scalars = {}
    for tag in events.Tags()['scalars']:
        records = events.Scalars(tag)
        scalars[tag] = (np.array([r.step for r in records]), np.array([r.value for r in records]))
    return scalars


def run_setup(run):
    """(processes, images per process per step, image side) from the run's last checkpoint."""
    checkpoints = sorted((pathlib.Path(run) / 'checkpoints').glob('*.pth'))
    if not checkpoints:
        raise SystemExit(f"compare_runs.py: error: {run}/checkpoints: no checkpoint (did the run finish?)")
    try:  # weights_only: a checkpoint planted in a run folder must not run code
        checkpoint = util.read_checkpoint(checkpoints[-1])
    except ValueError as error:
        raise SystemExit(f"compare_runs.py: error: {error}") from None
    sidelengths, batch_sizes, _ = train.schedule_from_opt(argparse.Namespace(**checkpoint['config']))
    stage = checkpoint.get('stage', 0)
    return checkpoint.get('world_size', 1), batch_sizes[stage], sidelengths[stage]


def summarize(run, skip):
    scalars = read_scalars(run)
    world_size, batch, side = run_setup(run)
    steps, rates = scalars.get('steps_per_second', (np.array([]), np.array([])))
    kept = rates[steps > skip]
    steps_per_second = float(np.median(kept)) if len(kept) else float('nan')
    images_per_step = world_size * batch
    loss_steps, losses = scalars['total_loss']
    summary = dict(run=str(run), processes=world_size, batch_per_process=batch, side=side,
                   steps=int(loss_steps.max()) + 1, steps_per_second=steps_per_second,
                   images_per_second=steps_per_second * images_per_step,
                   rays_per_second=steps_per_second * images_per_step * side * side)
    if 'val_psnr' in scalars:
        val_steps, val_psnr = scalars['val_psnr']
        summary['val_psnr'] = {int(s): float(v) for s, v in zip(val_steps, val_psnr)}
    return summary, (loss_steps, losses)


def window_means(curve, windows, end):
    steps, values = curve
    edges = np.linspace(0, end, windows + 1)
    return np.array([values[(steps >= a) & (steps < b)].mean() for a, b in zip(edges[:-1], edges[1:])]), edges


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', help='train.py logging roots')
    parser.add_argument('--skip', type=int, default=100, help='steps left out of the throughput (warm-up)')
    parser.add_argument('--speedup', action='append', default=[], help='A:B, images/s of run A over run B')
    parser.add_argument('--curve', action='append', default=[], help='A:B, total loss of run A against run B')
    parser.add_argument('--windows', type=int, default=10, help='windows of steps for --curve')
    parser.add_argument('--json', help='also write everything here')
    opt = parser.parse_args(argv)

    summaries, curves = {}, {}
    for run in opt.runs:
        name = pathlib.Path(run).name
        summaries[name], curves[name] = summarize(run, opt.skip)

    print(f"| run | processes x batch | side | steps | steps/s | images/s | Mrays/s | last val PSNR |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summaries.items():
        last_val = f"{list(s['val_psnr'].values())[-1]:.2f} dB" if s.get('val_psnr') else '-'
        print(f"| {name} | {s['processes']} x {s['batch_per_process']} | {s['side']} | {s['steps']} | "
              f"{s['steps_per_second']:.2f} | {s['images_per_second']:.1f} | {s['rays_per_second'] / 1e6:.2f} | "
              f"{last_val} |")

    result = dict(runs=summaries, speedups={}, curves={})
    for pair in opt.speedup:
        a, b = pair.split(':')
        result['speedups'][pair] = summaries[a]['images_per_second'] / summaries[b]['images_per_second']
        print(f"speed-up {a} over {b}: {result['speedups'][pair]:.3f}x (images/s)")
    for pair in opt.curve:
        a, b = pair.split(':')
        end = min(summaries[a]['steps'], summaries[b]['steps'])
        means_a, edges = window_means(curves[a], opt.windows, end)
        means_b, _ = window_means(curves[b], opt.windows, end)
        relative = (means_a - means_b) / means_b
        result['curves'][pair] = dict(window_edges=edges.tolist(), mean_a=means_a.tolist(), mean_b=means_b.tolist(),
                                      relative_difference=relative.tolist())
        print(f"total loss {a} vs {b}, windows of {edges[1] - edges[0]:.0f} steps:")
        print("  " + '  '.join(f"{x:.4g}" for x in means_a) + f"   ({a})")
        print("  " + '  '.join(f"{x:.4g}" for x in means_b) + f"   ({b})")
        print("  " + '  '.join(f"{100 * x:+.1f}%" for x in relative) +
              f"   mean |diff| {100 * np.abs(relative).mean():.2f}%, last half {100 * np.abs(relative[len(relative) // 2:]).mean():.2f}%")
    if opt.json:
        pathlib.Path(opt.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
