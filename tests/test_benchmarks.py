"""The measurement helpers of benchmarks/ that compute a number from a run: known answers."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'))
import plateau  # noqa: E402
import time_to_quality_table  # noqa: E402


def test_escape_step_is_the_first_step_that_stays_below_the_threshold():
    steps = [0, 10, 20, 30, 40, 50, 60]
    losses = [400., 62., 40., 63., 31., 30., 29.]  # a dip at step 20 that does not last
    assert plateau.escape_step(steps, losses, threshold=45., hold=2) == 40
    assert plateau.escape_step(steps, losses, threshold=45., hold=0) == 20
    assert plateau.escape_step(steps, losses, threshold=25., hold=0) is None
    assert plateau.escape_step(steps, losses, threshold=45., hold=3) is None  # step 40 is followed by only two


def test_relapse_step_is_the_first_lasting_return_to_the_plateau_after_the_escape():
    steps = [0, 10, 20, 30, 40, 50, 60, 70, 80]
    losses = [400., 62., 30., 29., 50., 28., 61., 62., 62.]  # left at 20; a spike at 40; back on it from 60
    assert plateau.escape_step(steps, losses, threshold=45., hold=1) == 20
    assert plateau.relapse_step(steps, losses, threshold=45., hold=1) == 60
    assert plateau.relapse_step(steps, losses, threshold=45., hold=0) == 40
    assert plateau.relapse_step(steps, losses, threshold=45., hold=3) is None  # step 60 is followed by only two
    assert plateau.relapse_step(steps, [400., 62., 61., 62.], threshold=45., hold=1) is None  # never left it
    assert plateau.relapse_step(steps[:4], [400., 62., 30., 29.], threshold=45., hold=1) is None  # stayed off


def test_a_noisy_descent_through_the_threshold_is_not_a_relapse(capsys, tmp_path):
    """Steps 40-70 of a 50-object run logged every step (seed 2, 150 s, one H200): the loss crosses 45 on its way
    down and is above it again for four steps (53-56) without going back to the plateau (~60)."""
    losses = [50.4, 48.6, 48.1, 45.3, 45.3, 44.5, 41.5, 43.7, 47.9, 41.1, 44.8, 38.6, 39.1, 47.8, 49.2, 51.2, 47.4,
              38.0, 38.2, 38.1, 43.1, 31.9, 43.7, 31.4, 39.7, 31.5, 35.2, 30.6, 32.0, 34.2, 29.4]
    steps = list(range(40, 40 + len(losses)))
    assert plateau.escape_step(steps, losses, threshold=45., hold=3) == 49
    assert plateau.relapse_step(steps, losses, threshold=45., hold=3) == 53  # one threshold for both
    assert plateau.relapse_step(steps, losses, threshold=45., hold=3, relapse_threshold=55.) is None
    # a true relapse, back to the plateau's level, still counts
    assert plateau.relapse_step(steps + [71, 72, 73, 74], losses + [61., 62., 61., 62.], threshold=45., hold=3,
                                relapse_threshold=55.) == 71
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path / 'fast_150s_seed2'
    with SummaryWriter(str(run)) as writer:
        for step, loss in zip(steps, losses):
            writer.add_scalar(plateau.LOSS_TAG, loss, step)
    plateau.main(['--read', str(run)])  # the command line's default thresholds: 45 and 55
    assert capsys.readouterr().out == ("fast_150s_seed2: left the plateau at step 49 (loss 50.4 at step 40, "
                                       "29.4 at step 70)\n")
    with pytest.raises(SystemExit):
        plateau.main(['--read', str(run), '--relapse_threshold', '40'])  # below --threshold


def test_a_variant_is_a_name_and_train_flags():
    assert plateau.parse_variant('fast=') == ('fast', [])
    assert plateau.parse_variant('rays=--rays_per_view 128 --lr "3e-4"') == ('rays', ['--rays_per_view', '128',
                                                                                   '--lr', '3e-4'])
    with pytest.raises(SystemExit, match='expected NAME=FLAGS'):
        plateau.parse_variant('--lr 1e-4')


def test_read_describes_a_finished_run_from_its_event_files(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path / 'fast_60s_seed0'
    with SummaryWriter(str(run)) as writer:
        for step, loss in zip(range(0, 90, 10), [400., 62., 30., 29., 28., 61., 62., 62., 62.]):
            writer.add_scalar(plateau.LOSS_TAG, loss, step)
    plateau.main(['--read', str(run), '--hold', '1'])
    assert capsys.readouterr().out == ("fast_60s_seed0: left the plateau at step 20, fell back onto it at step 50 "
                                       "(loss 400.0 at step 0, 62.0 at step 80)\n")
    stuck = tmp_path / 'fast_60s_seed1'
    with SummaryWriter(str(stuck)) as writer:
        for step, loss in zip(range(0, 30, 10), [400., 62., 61.]):
            writer.add_scalar(plateau.LOSS_TAG, loss, step)
    plateau.main(['--read', str(stuck), '--hold', '1'])
    assert capsys.readouterr().out == "fast_60s_seed1: never left the plateau (loss 400.0 at step 0, 61.0 at step 20)\n"
    with pytest.raises(SystemExit):
        plateau.main([])  # neither OUT_DIR and --data_root nor --read


def write_run(out, name, psnr, ssim, steps):
    """What time_to_quality.sh leaves of one run: test.py's metrics.json and the training log's last line."""
    (out / f'{name}_test').mkdir(parents=True)
    summary = {'all_views': {'psnr': psnr, 'ssim': ssim}, 'held_out_views': {'psnr': psnr, 'ssim': ssim}}
    (out / f'{name}_test' / 'metrics.json').write_text(json.dumps({'summary': summary}))
    (out / f'{name}.log').write_text(f'Done: {steps} steps in 1:00 (the --max_minutes 1 budget)\n')


def test_the_runs_record_round_trips_and_tables_them(tmp_path):
    write_run(tmp_path, '50_fast_60s_seed0', 26.0, 0.95, 4700)
    write_run(tmp_path, '50_fast_60s_seed1', 27.0, 0.96, 4800)
    write_run(tmp_path, '50_reference_300s_seed2', 26.2, 0.95, 11700)
    runs, _ = time_to_quality_table.collect(tmp_path)
    record = tmp_path / 'runs.csv'
    time_to_quality_table.write_record(runs, record)
    assert time_to_quality_table.read_record(record) == runs
    assert runs[50, 'fast', 60] == [(26.0, 0.95, 4700, 0), (27.0, 0.96, 4800, 1)]
    assert time_to_quality_table.read_record(record, objects=500) == {}
    lines = time_to_quality_table.tables(runs, {})
    assert '| 50 | fast | 60 | 2 | 4750 | 26.50 +- 0.71 | 0.955 |' in lines
    assert '| 50 | reference | 300 | 1 | 11700 | 26.20 +- 0.00 | 0.950 |' in lines


def test_a_record_with_runs_missing_steps_tables_them_as_unknown(tmp_path):
    record = tmp_path / 'runs.csv'
    record.write_text('objects,recipe,seconds,seed,psnr,ssim,steps,note\n'
                      '50,fast,300,0,30.50,,25960,one machine\n50,fast,300,1,30.70,,,another\n')
    runs = time_to_quality_table.read_record(record)
    assert runs[50, 'fast', 300] == [(30.5, None, 25960, 0), (30.7, None, None, 1)]
    # a mean over one of the two seeds would read as one over both
    assert '| 50 | fast | 300 | 2 | - | 30.60 +- 0.14 | - |' in time_to_quality_table.tables(runs, {})


def test_a_run_without_its_training_log_has_unknown_steps_not_zero(tmp_path):
    write_run(tmp_path, '50_fast_60s_seed0', 26.0, 0.95, 4700)
    write_run(tmp_path, '50_fast_60s_seed1', 27.0, 0.96, 4800)
    (tmp_path / '50_fast_60s_seed1.log').unlink()
    runs, _ = time_to_quality_table.collect(tmp_path)
    assert runs[50, 'fast', 60] == [(26.0, 0.95, 4700, 0), (27.0, 0.96, None, 1)]
    record = tmp_path / 'runs.csv'
    time_to_quality_table.write_record(runs, record)
    assert record.read_text().splitlines()[2] == '50,fast,60,1,27.0000,0.9600,'
    assert time_to_quality_table.read_record(record) == runs
    assert '| 50 | fast | 60 | 2 | - | 26.50 +- 0.71 | 0.955 |' in time_to_quality_table.tables(runs, {})


@pytest.mark.parametrize('text, error', [
    ('objects,recipe,seconds\n50,fast,60\n', 'no column psnr, seed, ssim, steps'),
    ('objects,recipe,seconds,seed,psnr,ssim,steps\n50,fast,sixty,0,26.0,,\n', 'line 2'),
])
def test_a_bad_record_names_the_file_and_what_is_wrong(tmp_path, text, error):
    record = tmp_path / 'runs.csv'
    record.write_text(text)
    with pytest.raises(SystemExit, match=error) as raised:
        time_to_quality_table.read_record(record)
    assert str(record) in str(raised.value)


def test_the_kept_record_holds_three_seeds_of_each_recipe_and_budget():
    """benchmarks/time_to_quality_runs.csv, the record behind the README's table and plots, reads back whole."""
    runs = time_to_quality_table.read_record(pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'
                                             / 'time_to_quality_runs.csv')
    assert {key: len(values) for key, values in runs.items()} == {
        (objects, recipe, seconds): 3 for objects in (50, 500) for recipe in ('reference', 'fast')
        for seconds in (60, 150, 300)}


def test_the_table_takes_a_run_folder_or_a_record(tmp_path):
    write_run(tmp_path, '50_fast_60s_seed0', 26.0, 0.95, 4700)
    time_to_quality_table.main([str(tmp_path)])
    assert (tmp_path / 'time_to_quality_runs.csv').read_text().splitlines() == [
        'objects,recipe,seconds,seed,psnr,ssim,steps', '50,fast,60,0,26.0000,0.9500,4700']
    for argv in ([], [str(tmp_path), '--record', str(tmp_path / 'time_to_quality_runs.csv')],
                 [str(tmp_path), '--plot', str(tmp_path / 'p.png')], ['--record', str(tmp_path / 'none.csv')]):
        with pytest.raises(SystemExit):
            time_to_quality_table.main(argv)


def test_the_composed_lstm_cell_is_pytorchs_cell():
    """bench.py's ComposedLSTMCell (variants fast_lstm, fused_lstm) computes nn.LSTMCell's function on the same
    parameters: three steps from no state, outputs and every gradient, float32."""
    import torch
    import bench
    import custom_layers
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(32, 16)
    custom_layers.lstm_forget_gate_init(cell)
    composed = bench.ComposedLSTMCell(cell)
    xs = torch.randn(3, 50, 32, requires_grad=True)

    def run(module):
        state, outputs = None, []
        for x in xs:
            state = module(x, state)
            outputs += list(state)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, [xs, *cell.parameters()])
        return outputs, grads
    (ours, our_grads), (theirs, their_grads) = run(composed), run(cell)
    for value, expected in zip([*ours, *our_grads], [*theirs, *their_grads]):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
