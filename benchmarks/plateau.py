"""How long training sits on the plateau at its start: the step at which each run's image loss leaves it.

A freshly initialised SRN renders every ray in the background colour; the scaled image loss (``200 * MSE``,
TensorBoard's ``scaled_distortion_loss``) then stays near its starting value until dark outputs for the objects'
pixels appear, after which it falls by about half within a few dozen steps. How long that takes varies from run
to run (benchmarks/NOTES.md, "Quality per minute, round 5"), and in a one-minute budget it decides the result.
This script trains short runs of each variant and reports, per run, the first logged step at which the loss is
below ``--threshold`` and stays below it for the next ``--hold`` logged steps, and the step at which it fell back
onto the plateau if it did (the loss at or above ``--relapse_threshold``, nearer the plateau, for as long; a
learning rate too high for the model does this). The two thresholds differ so that a loss that crosses the first
one noisily on its way down (logged every step, it can sit within a few units of 45 for a dozen steps) does not
read as a relapse.

    python benchmarks/plateau.py OUT_DIR --data_root sm500/train --runs 4 --steps 1500 \\
        --variant fast= --variant "no_warmup=--lr_warmup_steps 0" --variant "rays128=--rays_per_view 128 \\
        --batch_size_per_img_sidelength 512"

Each variant is ``NAME=FLAGS``: train.py flags added after ``-c CONFIG --fast`` (``--train_flags`` replaces
``--fast``, e.g. ``--device cpu`` for a trial without a GPU). Run k of every variant uses ``--seed k``. Runs are kept
in OUT_DIR/NAME_seedK (a run that finished there before is read, not trained again); the table goes to
stdout and OUT_DIR/plateau.json. ``--read RUN_DIR ...`` trains nothing and prints the same for runs that exist
(benchmarks/time_to_quality.sh does this for each of its runs).
"""
import argparse
import json
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.compare_runs import read_scalars  # noqa: E402

LOSS_TAG = 'scaled_distortion_loss'


def _first_lasting(steps, condition, hold, after=None):
    """The first step (after ``after``, if given) at which ``condition`` holds there and for the next ``hold``
    logged steps; None if there is none."""
    for i in range(len(condition) - hold):
        if (after is None or steps[i] > after) and condition[i:i + hold + 1].all():
            return int(steps[i])
    return None


def escape_step(steps, losses, threshold, hold):
    """The first step whose loss and the next ``hold`` logged losses are all below ``threshold``; None if none."""
    return _first_lasting(steps, np.asarray(losses) < threshold, hold)


def relapse_step(steps, losses, threshold, hold, relapse_threshold=None):
    """After the escape (below ``threshold``), the first step whose loss and the next ``hold`` logged losses are
    all back at or above ``relapse_threshold`` (default: ``threshold``), the run fallen back onto the plateau; None
    if it never did, or never left it."""
    escaped = escape_step(steps, losses, threshold, hold)
    if escaped is None:
        return None
    level = threshold if relapse_threshold is None else relapse_threshold
    return _first_lasting(steps, np.asarray(losses) >= level, hold, after=escaped)


def describe(steps, losses, escape, relapse):
    """One run's escape and relapse steps in words, with its first and last logged loss."""
    fell_back = f", fell back onto it at step {relapse}" if relapse is not None else ''
    left = f"left the plateau at step {escape}{fell_back}" if escape is not None else "never left the plateau"
    return f"{left} (loss {losses[0]:.1f} at step {steps[0]}, {losses[-1]:.1f} at step {steps[-1]})"


def parse_variant(text):
    name, sep, flags = text.partition('=')
    if not sep or not name or '/' in name:
        raise SystemExit(f"plateau.py: error: --variant {text!r}: expected NAME=FLAGS (NAME without '/')")
    return name, shlex.split(flags)


def train_run(run, config, data_root, steps, seed, train_flags, flags):
    """Train one run into ``run`` unless it finished there before (a checkpoint); its log goes to ``run``.log."""
    if list(run.glob('checkpoints/*.pth')):
        return
    shutil.rmtree(run, ignore_errors=True)  # a run killed before its end: its event files would mix with the new
    command = [sys.executable, str(ROOT / 'train.py'), '-c', config, *train_flags, '--data_root', data_root,
               '--logging_root', str(run), '--seed', str(seed), '--max_steps_per_img_sidelength', str(steps),
               '--no_validation', '--steps_til_ckpt', '1000000', '--steps_til_image', '1000000',
               '--steps_til_log', '10', *flags]
    with open(f"{run}.log", 'w') as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode != 0:
            raise SystemExit(f"plateau.py: error: {run}: train.py failed; see {run}.log")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', nargs='?')
    parser.add_argument('--data_root')
    parser.add_argument('--read', nargs='+', default=None, metavar='RUN_DIR',
                        help='train nothing: one line per finished train.py run (its event files) instead')
    parser.add_argument('--config', default='train_configs/shepard_metzler_fast.yml')
    parser.add_argument('--train_flags', default='--fast', help="flags before each variant's (default --fast)")
    parser.add_argument('--variant', action='append', default=None, metavar='NAME=FLAGS',
                        help='a variant to run (repeatable; default: "fast=", the config as it is)')
    parser.add_argument('--runs', type=int, default=3, help='runs per variant, seeds 0 .. runs-1')
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--threshold', type=float, default=45.,
                        help='scaled image loss below which the plateau counts as left (it sits near 62 on '
                             'Shepard-Metzler at 64 px, and falls to ~31 just after)')
    parser.add_argument('--relapse_threshold', type=float, default=55.,
                        help='scaled image loss at or above which a run that left the plateau counts as back on '
                             'it (nearer the plateau than --threshold)')
    parser.add_argument('--hold', type=int, default=3, help='logged steps the loss must stay past a threshold')
    args = parser.parse_args(argv)
    if args.relapse_threshold < args.threshold:
        parser.error(f'--relapse_threshold {args.relapse_threshold:g} is below --threshold {args.threshold:g}')
    if args.read:
        for run in args.read:
            steps, losses = read_scalars(run)[LOSS_TAG]
            escape = escape_step(steps, losses, args.threshold, args.hold)
            relapse = relapse_step(steps, losses, args.threshold, args.hold, args.relapse_threshold)
            print(f"{pathlib.Path(run).name}: {describe(steps, losses, escape, relapse)}", flush=True)
        return
    if args.out_dir is None or args.data_root is None:
        parser.error('OUT_DIR and --data_root are needed (or --read RUN_DIR ...)')
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(text) for text in (args.variant or ['fast='])]

    results = {}
    for name, flags in variants:
        escapes, relapses = [], []
        for seed in range(args.runs):
            run = out / f"{name}_seed{seed}"
            train_run(run, args.config, args.data_root, args.steps, seed, shlex.split(args.train_flags), flags)
            steps, losses = read_scalars(run)[LOSS_TAG]
            escapes.append(escape_step(steps, losses, args.threshold, args.hold))
            relapses.append(relapse_step(steps, losses, args.threshold, args.hold, args.relapse_threshold))
            print(f"{name} seed {seed}: {describe(steps, losses, escapes[-1], relapses[-1])}", flush=True)
        left = [step for step in escapes if step is not None]
        results[name] = {'flags': flags, 'escape_steps': escapes, 'relapse_steps': relapses,
                         'median': statistics.median(left) if len(left) == len(escapes) else None}

    print("\n| variant | flags | runs | left the plateau at step (per seed) | median | fell back onto it at step |"
          "\n|---|---|---|---|---|---|")
    for name, result in results.items():
        shown = ', '.join('never' if step is None else str(step) for step in result['escape_steps'])
        median = result['median'] if result['median'] is not None else f"> {args.steps} in some"
        fell_back = ', '.join('-' if step is None else str(step) for step in result['relapse_steps'])
        print(f"| {name} | `{' '.join(result['flags'])}` | {len(result['escape_steps'])} | {shown} | {median} "
              f"| {fell_back} |")
    (out / 'plateau.json').write_text(json.dumps({'threshold': args.threshold,
                                                  'relapse_threshold': args.relapse_threshold, 'hold': args.hold,
                                                  'steps': args.steps, 'variants': results}, indent=1))


if __name__ == '__main__':
    main()
