"""The measurement helpers of benchmarks/ that compute a number from a run: known answers."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'))
import plateau  # noqa: E402


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
