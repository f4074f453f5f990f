"""The tables and the plot of benchmarks/time_to_quality.sh, from the runs it left in OUT_DIR, or from a record.

    python benchmarks/time_to_quality_table.py OUT_DIR
    python benchmarks/time_to_quality_table.py --record RUNS.csv [--objects 50] [--plot PLOT.png]

Reads every OUT_DIR/<objects>_<recipe>_<seconds>s_seed<seed>_test/metrics.json (and the few-shot ones,
..._<k>shot_test), writes OUT_DIR/time_to_quality.md (mean +- sample std over seeds), OUT_DIR/time_to_quality.png
(held-out PSNR against seconds; needs matplotlib) and OUT_DIR/time_to_quality_runs.csv (one row a run), and prints
the tables. With --record it reads such rows instead (from runs of several calls or machines, kept in one file
such as benchmarks/time_to_quality_runs.csv, where a column ``note`` may say where each came from and ``steps``
and ``ssim`` may be empty), prints the table and draws the plot of the runs with that many objects.
"""
import argparse
import collections
import csv
import json
import pathlib
import re

RUN = re.compile(r'(\d+)_(\w+?)_(\d+)s_seed(\d+)(?:_(\d)shot)?_test$')


def collect(out):
    """({(objects, recipe, seconds): [(psnr, ssim, steps or None, seed)]}, {(objects, recipe, seconds, k): [held-out
    psnr]}); a run whose training log is missing, or never finished, has steps None (unknown), not 0."""
    runs, shots = collections.defaultdict(list), collections.defaultdict(list)
    for metrics in sorted(out.glob('*_*_*s_seed*_test/metrics.json')):
        match = RUN.match(metrics.parent.name)
        if match is None:
            continue
        objects, recipe, seconds, seed, k = match.groups()
        summary = json.loads(metrics.read_text())['summary']
        if k is not None:
            shots[int(objects), recipe, int(seconds), int(k)].append(summary['held_out_views']['psnr'])
            continue
        log = out / (metrics.parent.name[:-len('_test')] + '.log')
        done = re.findall(r'Done: (\d+) steps', log.read_text(errors='replace')) if log.exists() else []
        runs[int(objects), recipe, int(seconds)].append(
            (summary['all_views']['psnr'], summary['all_views']['ssim'], int(done[-1]) if done else None, int(seed)))
    return runs, shots


FIELDS = ['objects', 'recipe', 'seconds', 'seed', 'psnr', 'ssim', 'steps']


def write_record(runs, path):
    """One CSV row a run (the columns FIELDS), for --record."""
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for (objects, recipe, seconds), values in sorted(runs.items()):
            for psnr, ssim, steps, seed in sorted(values, key=lambda v: v[3]):
                writer.writerow([objects, recipe, seconds, seed, f'{psnr:.4f}', f'{ssim:.4f}',
                                 '' if steps is None else steps])


def read_record(path, objects=None):
    """{(objects, recipe, seconds): [(psnr, ssim or None, steps or None, seed)]} from a record's rows, with the
    file and line in the error for a row that is not one."""
    runs = collections.defaultdict(list)
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        missing = set(FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: no column {', '.join(sorted(missing))} (expected {', '.join(FIELDS)})")
        for row in reader:
            try:
                key = int(row['objects']), row['recipe'], int(row['seconds'])
                value = (float(row['psnr']), float(row['ssim']) if row['ssim'] else None,
                         int(row['steps']) if row['steps'] else None, int(row['seed']))
            except (TypeError, ValueError) as error:
                raise SystemExit(f"{path}, line {reader.line_num}: {error}") from None
            if objects is None or key[0] == objects:
                runs[key].append(value)
    return runs


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def tables(runs, shots):
    lines = ['| objects | recipe | seconds | seeds | steps | held-out PSNR (dB) | SSIM |',
             '|---|---|---|---|---|---|---|']
    for (objects, recipe, seconds), values in sorted(runs.items()):
        psnr, psnr_std = mean_std([v[0] for v in values])
        ssims = [v[1] for v in values if v[1] is not None]
        steps = [v[2] for v in values if v[2] is not None]
        # a mean over some of the seeds would read as one over all of them: '-' unless every run has it
        ssim = f'{mean_std(ssims)[0]:.3f}' if len(ssims) == len(values) else '-'
        steps = f'{mean_std(steps)[0]:.0f}' if len(steps) == len(values) else '-'
        lines.append(f'| {objects} | {recipe} | {seconds} | {len(values)} | {steps} | {psnr:.2f} +- {psnr_std:.2f} '
                     f'| {ssim} |')
    if shots:
        lines += ['', 'Few-shot fitting of 50 unseen objects (networks frozen), held-out views:', '',
                  '| objects | recipe | seconds | views fitted | seeds | held-out PSNR (dB) |', '|---|---|---|---|---|---|']
        for (objects, recipe, seconds, k), values in sorted(shots.items()):
            psnr, psnr_std = mean_std(values)
            lines.append(f'| {objects} | {recipe} | {seconds} | {k} | {len(values)} | {psnr:.2f} +- {psnr_std:.2f} |')
    return lines


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('(no matplotlib: no plot)')
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for objects, recipe in sorted({(o, r) for o, r, _ in runs}):
        seconds = sorted(s for o, r, s in runs if (o, r) == (objects, recipe))
        stats = [mean_std([v[0] for v in runs[objects, recipe, s]]) for s in seconds]
        axis.errorbar(seconds, [m for m, _ in stats], yerr=[s for _, s in stats], marker='o', capsize=3,
                      label=f'{recipe} recipe, {objects} objects')
    axis.set_xlabel('wall-clock seconds (setup and compilation included)')
    axis.set_ylabel('held-out PSNR (dB)')
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', nargs='?', type=pathlib.Path, help="time_to_quality.sh's OUT_DIR")
    parser.add_argument('--record', type=pathlib.Path, help='a CSV of runs (the columns of time_to_quality_runs.csv)')
    parser.add_argument('--objects', type=int, help='with --record: only the runs with this many objects')
    parser.add_argument('--plot', type=pathlib.Path, help='with --record: where to draw the plot')
    args = parser.parse_args(argv)
    if (args.out_dir is None) == (args.record is None):
        parser.error('give either OUT_DIR or --record (one of them)')
    if args.record is None and (args.objects is not None or args.plot is not None):
        parser.error('--objects and --plot go with --record (OUT_DIR gets its own plot)')
    if args.record is not None:
        if not args.record.is_file():
            parser.error(f'--record {args.record}: no such file')
        runs = read_record(args.record, args.objects)
        if not runs:
            raise SystemExit(f"{args.record}: no runs" + (f" with {args.objects} objects" if args.objects else ''))
        print('\n'.join(tables(runs, {})))
        if args.plot:
            plot(runs, args.plot)
        return
    runs, shots = collect(args.out_dir)
    lines = tables(runs, shots)
    (args.out_dir / 'time_to_quality.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    write_record(runs, args.out_dir / 'time_to_quality_runs.csv')
    plot(runs, args.out_dir / 'time_to_quality.png')


if __name__ == '__main__':
    main()
