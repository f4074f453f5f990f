"""The tables and the plot of benchmarks/time_to_quality.sh, from the runs it left in OUT_DIR.

    python benchmarks/time_to_quality_table.py OUT_DIR

Reads every OUT_DIR/<objects>_<recipe>_<seconds>s_seed<seed>_test/metrics.json (and the few-shot ones,
..._<k>shot_test), writes OUT_DIR/time_to_quality.md (mean +- sample std over seeds) and
OUT_DIR/time_to_quality.png (held-out PSNR against seconds; needs matplotlib), and prints the tables.
"""
import collections
import json
import pathlib
import re
import sys

RUN = re.compile(r'(\d+)_(\w+?)_(\d+)s_seed(\d+)(?:_(\d)shot)?_test$')


def collect(out):
    """({(objects, recipe, seconds): [(psnr, ssim, steps)]}, {(objects, recipe, seconds, k): [held-out psnr]})."""
    runs, shots = collections.defaultdict(list), collections.defaultdict(list)
    for metrics in sorted(out.glob('*_*_*s_seed*_test/metrics.json')):
        match = RUN.match(metrics.parent.name)
        if match is None:
            continue
        objects, recipe, seconds, _, k = match.groups()
        summary = json.loads(metrics.read_text())['summary']
        if k is not None:
            shots[int(objects), recipe, int(seconds), int(k)].append(summary['held_out_views']['psnr'])
            continue
        log = out / (metrics.parent.name[:-len('_test')] + '.log')
        done = re.findall(r'Done: (\d+) steps', log.read_text(errors='replace')) if log.exists() else []
        runs[int(objects), recipe, int(seconds)].append(
            (summary['all_views']['psnr'], summary['all_views']['ssim'], int(done[-1]) if done else 0))
    return runs, shots


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def tables(runs, shots):
    lines = ['| objects | recipe | seconds | seeds | steps | held-out PSNR (dB) | SSIM |',
             '|---|---|---|---|---|---|---|']
    for (objects, recipe, seconds), values in sorted(runs.items()):
        psnr, psnr_std = mean_std([v[0] for v in values])
        ssim, _ = mean_std([v[1] for v in values])
        steps, _ = mean_std([v[2] for v in values])
        lines.append(f'| {objects} | {recipe} | {seconds} | {len(values)} | {steps:.0f} | {psnr:.2f} +- {psnr_std:.2f} '
                     f'| {ssim:.3f} |')
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


def main(out):
    runs, shots = collect(out)
    lines = tables(runs, shots)
    (out / 'time_to_quality.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot(runs, out / 'time_to_quality.png')


if __name__ == '__main__':
    main(pathlib.Path(sys.argv[1]))
