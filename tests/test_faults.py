"""Faults and hostile inputs around train.py, test.py and the benchmarks: a clear error, nothing lost, no code run.

Real processes and real faults where the machine allows them: concurrent runs on one folder, SIGKILL,
signals delivered twice, a truncated checkpoint, a corrupt image found mid-run, a full disk (a small tmpfs in
a private mount namespace) and a read-only output folder (a read-only bind mount). The mount-based tests are
skipped, with the reason, where the user may not create mount namespaces.
"""
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import train
import util
from test_train import ROOT, checkpoints, load, run_env, tiny_args, tiny_dataset  # noqa: F401 (a fixture)

sys.path.insert(0, str(ROOT / 'benchmarks'))
import compare_runs  # noqa: E402


def start_training(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_script(script, *args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_until_training(process, logging_root, timeout=120):
    """Until the run has written its TensorBoard events (it is in the loop)."""
    deadline = time.time() + timeout
    while not list(pathlib.Path(logging_root).glob('events.out.tfevents.*')):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, 'the run did not start training'
        time.sleep(0.2)


def assert_one_line_error(result, *fragments):
    """Exit code 1, no traceback, and the last stderr line holds every fragment."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


# --- 1. No code from checkpoints ---------------------------------------------------------------------

class _Planted:
    """Unpickling this runs ``os.system``-like code: here it only creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_checkpoint_runs_no_code(tiny_dataset, tmp_path):
    run = tmp_path / 'run'
    assert train.main(tiny_args(tiny_dataset, run, '--max_steps_per_img_sidelength', '2,0', '--no_validation')) == 0
    marker = tmp_path / 'code_ran'
    planted = run / 'checkpoints' / 'epoch_9999_iter_999999.pth'  # the newest by name
    torch.save({'model': {}, 'step': 5, 'config': _Planted(marker)}, planted, pickle_protocol=2)

    with pytest.raises(SystemExit, match='epoch_9999_iter_999999.pth: not a readable PyTorch checkpoint .*pickled object.*refused'):
        compare_runs.run_setup(run)
    with pytest.raises(ValueError, match='epoch_9999_iter_999999.pth'):
        util.read_checkpoint(planted)
    result = run_script('test.py', '--data_root', tiny_dataset / 'test', '--checkpoint_path', planted,
                        '--logging_root', tmp_path / 'eval', '--img_sidelength', 8, '--tracing_steps', 2,
                        '--device', 'cpu', '--no_progress')
    assert_one_line_error(result, 'epoch_9999_iter_999999.pth')
    assert not marker.exists()


def test_every_checkpoint_load_in_the_repository_refuses_code():
    """Each torch.load call in the project's Python files passes weights_only=True."""
    files = [p for p in ROOT.rglob('*.py') if '.venv' not in p.parts and 'site-packages' not in p.parts]
    calls = []
    for path in files:
        text = path.read_text()
        for match in re.finditer(r'torch\.load\(', text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # the call's text, to its closing parenthesis
                depth += {'(': 1, ')': -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.relative_to(ROOT), text[match.start():end + 1]))
    assert len(calls) >= 4  # util, compare_runs, the tests' own loads
    unsafe = [(str(path), call) for path, call in calls if 'weights_only=True' not in call]
    assert not unsafe, unsafe


# --- 2. One run per folder; changed options on resumption -----------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(tiny_dataset, tmp_path):
    args = tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '100000,1', '--no_validation')
    first = start_training(args)
    try:
        wait_until_training(first, tmp_path)
        second = run_script('train.py', *args)
        last = assert_one_line_error(second, str(tmp_path), f'in use by pid {first.pid} (train.py)',
                                     '--logging_root')
        assert 'Resuming' not in second.stdout and 'Stage' not in second.stdout, last
    finally:
        first.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        first.communicate(timeout=60)

    # A killed save leaves a temporary file; the next run removes it and trains. (The killed run's own
    # checkpoints go first: how far it got depends on the machine's speed.)
    shutil.rmtree(tmp_path / 'checkpoints', ignore_errors=True)
    util.cond_mkdir(tmp_path / 'checkpoints')
    stale = tmp_path / 'checkpoints' / 'epoch_0000_iter_000002.pth.x1y2z3.tmp'
    stale.write_bytes(b'half a checkpoint')
    result = run_script('train.py', *tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '2,0',
                                                '--no_validation'))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'Removed {stale}' in result.stdout
    assert not list((tmp_path / 'checkpoints').glob('*.tmp'))
    assert load(checkpoints(tmp_path)[-1])['step'] == 2


def test_resuming_with_changed_options_says_what_changed(tiny_dataset, tmp_path, capsys):
    common = ('--no_validation', '--steps_til_ckpt', '2')
    assert train.main(tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '2,0', *common)) == 0
    capsys.readouterr()
    assert train.main(tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '4,0', '--lr', '1e-3',
                                *common)) == 0
    err = capsys.readouterr().err
    assert 'resuming with changed options' in err
    assert '--lr 5e-05 -> 0.001' in err and '--max_steps_per_img_sidelength 2,0 -> 4,0' in err
    final = load(checkpoints(tmp_path)[-1])
    assert final['step'] == 4 and final['optimizer']['param_groups'][0]['lr'] == 1e-3  # the new value applies

    with pytest.raises(SystemExit, match=r'trained with --embedding_size 8, not 16.*another --logging_root'):
        train.main(tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '6,0', '--embedding_size',
                             '16', *common))
    with pytest.raises(SystemExit, match=r'trained on 3 instances, but --data_root .* now gives 2'):
        train.main(tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '6,0',
                             '--max_num_instances_train', '2', *common))
    assert load(checkpoints(tmp_path)[-1])['step'] == 4  # nothing was written by the refused runs


# --- 4. A corrupt image found mid-run ---------------------------------------------------------------

def test_a_corrupt_image_found_mid_run_stops_in_one_line_and_keeps_the_state(tiny_dataset, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_dataset / 'train', data)
    image = sorted((data / sorted(os.listdir(data))[1] / 'rgb').iterdir())[2]
    content = image.read_bytes()
    image.write_bytes(content[:len(content) // 2])  # the header is intact: the dataset opens
    logging_root = tmp_path / 'logs'
    args = tiny_args(tiny_dataset, logging_root, '--data_root', data, '--max_steps_per_img_sidelength', '8,0',
                     '--max_num_observations_train', '-1',
                     '--no_validation', '--num_workers', '1')
    result = run_script('train.py', *args)
    last = assert_one_line_error(result, str(image), 'training step', 'to resume from')
    step = int(re.search(r'training step (\d+)', last).group(1))
    (saved,) = checkpoints(logging_root)
    assert load(saved)['step'] == step and str(saved) in last


def test_a_corrupt_image_stops_rays_on_device_in_one_line_before_training(tiny_dataset, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_dataset / 'train', data)
    image = sorted((data / sorted(os.listdir(data))[2] / 'rgb').iterdir())[1]
    image.write_bytes(image.read_bytes()[:60])  # the header is intact: the dataset opens
    logging_root = tmp_path / 'logs'
    args = tiny_args(tiny_dataset, logging_root, '--data_root', data, '--max_steps_per_img_sidelength', '8,0',
                     '--rays_per_view', '10', '--rays_on_device', '--no_validation', '--num_workers', '1')
    result = run_script('train.py', *args)
    assert_one_line_error(result, str(image), 'reading the training views for --rays_on_device at step 0')
    assert checkpoints(logging_root) == []


# --- 5. A full disk, a read-only output folder ------------------------------------------------------------

def in_mount_namespace(script):
    """Run a shell script in a private mount namespace; skip when this user may not create one."""
    probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True) if shutil.which('unshare') else None
    if probe is None or probe.returncode != 0:
        pytest.skip('needs `unshare -m` (root or user namespaces) to mount a small or read-only file system')
    return subprocess.run(['unshare', '-m', 'sh', '-c', script], cwd=ROOT, env=run_env(), capture_output=True,
                          text=True, timeout=300)


def test_a_full_disk_stops_in_one_line_with_the_last_checkpoint_intact(tiny_dataset, tmp_path):
    logging_root = tmp_path / 'small_disk'
    logging_root.mkdir()
    # One checkpoint of this model (with Adam's state) takes ~26 MB: the second one does not fit beside it.
    args = ' '.join(map(str, tiny_args(tiny_dataset, logging_root, '--max_steps_per_img_sidelength', '6,0',
                                       '--steps_til_ckpt', '2', '--no_validation')))
    result = in_mount_namespace(f"mount -t tmpfs -o size=40m tmpfs {logging_root} && "
                                f"{sys.executable} train.py {args}; code=$?; ls -a {logging_root}/checkpoints; "
                                f"cp -r {logging_root}/checkpoints {tmp_path}/kept; exit $code")
    if 'mount:' in result.stderr:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
    last = assert_one_line_error(result, 'could not write the checkpoint', 'No space left on device',
                                 'epoch_0000_iter_000004.pth', 'newest intact checkpoint is')
    assert 'epoch_0000_iter_000002.pth' in last
    assert '.tmp' not in result.stdout  # the listing of the folder: no temporary file left behind
    assert load(tmp_path / 'kept' / 'epoch_0000_iter_000002.pth')['step'] == 2


def test_test_py_into_a_read_only_folder_is_one_line_and_writes_nothing(tiny_dataset, tmp_path):
    run = tmp_path / 'run'
    assert train.main(tiny_args(tiny_dataset, run, '--max_steps_per_img_sidelength', '1,0', '--no_validation')) == 0
    read_only = tmp_path / 'read_only'
    read_only.mkdir()
    args = (f"--data_root {tiny_dataset / 'train'} --checkpoint_path {run / 'checkpoints'} --img_sidelength 8 "
            f"--tracing_steps 2 --device cpu --no_progress --logging_root {read_only / 'eval'}")
    result = in_mount_namespace(f"mount --bind {read_only} {read_only} && "
                                f"mount -o remount,ro,bind {read_only} && {sys.executable} test.py {args}")
    if 'mount:' in result.stderr:
        pytest.skip(f'cannot make a read-only bind mount here: {result.stderr.strip()}')
    assert_one_line_error(result, str(read_only / 'eval'), 'cannot write the results here',
                          'Read-only file system')
    assert not list(read_only.iterdir())


def test_a_failed_test_py_writes_nothing(tiny_dataset, tmp_path):
    result = run_script('test.py', '--data_root', tiny_dataset / 'test', '--checkpoint_path', tmp_path / 'nope.pth',
                        '--logging_root', tmp_path / 'eval', '--device', 'cpu')
    assert_one_line_error(result, 'nope.pth', 'checkpoint not found')
    assert not (tmp_path / 'eval').exists()  # no params.txt, no folder


# --- 7. Signals ---------------------------------------------------------------------------------------------

def test_an_interrupt_delivered_twice_still_saves(tiny_dataset, tmp_path):
    # GNU `timeout -s INT` and some schedulers signal the process, then its group: one interrupt, twice.
    args = tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '100000,1', '--no_validation',
                     '--num_workers', '1')
    process = start_training(args, start_new_session=True)
    wait_until_training(process, tmp_path)
    os.kill(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert 'Interrupted (SIGINT): saved' in stdout and 'Traceback' not in stderr
    (saved,) = checkpoints(tmp_path)
    assert load(saved)['step'] >= 1


def test_a_deliberate_second_ctrl_c_stops_at_once():
    flag = train.SignalFlag()
    flag.handle(signal.SIGINT, None)
    flag.handle(signal.SIGINT, None)  # the same interrupt, delivered again
    assert flag.signum == signal.SIGINT
    flag.received_at -= 2.0  # two seconds later: the user means it
    with pytest.raises(KeyboardInterrupt):
        flag.handle(signal.SIGINT, None)


# --- 8. An unreadable newest checkpoint -------------------------------------------------------------------

def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tiny_dataset, tmp_path):
    common = ('--no_validation', '--steps_til_ckpt', '2')
    assert train.main(tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '4,0', *common)) == 0
    newest = checkpoints(tmp_path)[-1]
    assert newest.name == 'epoch_0000_iter_000004.pth'
    content = newest.read_bytes()
    newest.write_bytes(content[:len(content) // 3])

    result = run_script('train.py', *tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '6,0',
                                                *common))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'warning: {newest} cannot be read, renamed to {newest.name}.corrupt' in result.stderr
    assert 'Resuming from' in result.stdout and 'iter_000002.pth at step 2' in result.stdout
    assert (newest.parent / (newest.name + '.corrupt')).read_bytes() == content[:len(content) // 3]  # kept
    assert load(checkpoints(tmp_path)[-1])['step'] == 6


# --- Reference naming of checkpoints (issue: first contact) -------------------------------------------------

def test_checkpoint_names_count_epochs_as_the_reference(tiny_dataset, tmp_path, capsys):
    # 3 x 4 = 12 observations (views repeat to 50 per object unless -1) in batches of 12: one batch per epoch. After 15 steps the reference writes
    # epoch_0014_iter_000015.pth: the epoch that ends with the run is not counted.
    assert train.main(tiny_args(tiny_dataset, tmp_path, '--batch_size_per_img_sidelength', '12,12',
                                '--max_num_observations_train', '-1',
                                '--max_steps_per_img_sidelength', '15,0', '--steps_til_val', '100')) == 0
    assert [p.name for p in checkpoints(tmp_path)] == ['epoch_0014_iter_000015.pth']
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r'Done: 15 steps in \d+:\d\d; val PSNR \d+\.\d\d dB, SSIM \d\.\d{3}; final checkpoint', closing)


# --- The other command lines: one line, no traceback ------------------------------------------------------

def test_dataset_generators_report_bad_paths_in_one_line(tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_script('shepard_metzler.py', '--output_dir', tmp_path / 'a_file' / 'sm', '--num_objects', 2)
    assert_one_line_error(result, 'shepard_metzler.py: error:', str(tmp_path / 'a_file'))
    result = run_script('render_meshes.py', '--mesh_dir', tmp_path / 'no_meshes', '--output_dir', tmp_path / 'out')
    assert_one_line_error(result, 'render_meshes.py: error:', str(tmp_path / 'no_meshes'), 'not found')


def test_test_py_failing_to_write_mid_run_names_the_folder(tiny_dataset, tmp_path, monkeypatch):
    import test as srn_test
    run = tmp_path / 'run'
    assert train.main(tiny_args(tiny_dataset, run, '--max_steps_per_img_sidelength', '1,0', '--no_validation')) == 0

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')  # as a PNG encoder reports it: no file name

    monkeypatch.setattr(srn_test.data_util, 'write_image', full_disk)
    with pytest.raises(OSError, match=rf"{tmp_path / 'eval'}: writing the results failed \(No space left on device\)"):
        srn_test.main(['--data_root', str(tiny_dataset / 'train'), '--checkpoint_path', str(run / 'checkpoints'),
                       '--logging_root', str(tmp_path / 'eval'), '--img_sidelength', '8', '--tracing_steps', '2',
                       '--device', 'cpu', '--no_progress'])


def test_a_diverged_models_images_convert_without_warnings():
    """NaN and infinities in a rendered image or depth map (a diverged run's TensorBoard images, test.py's
    outputs) convert quietly: NaN colour black, infinities the end of the range they lie past, and
    non-finite foreground depths black, left out of the depth range of the finite ones."""
    nan, inf = float('nan'), float('inf')
    rgb = torch.tensor([[[nan, inf, -inf], [0., 1., -1.]]])  # (1, 2, 3)
    depth = np.array([[1., nan], [inf, 3.]])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        image = util.to_uint8_image(rgb)
        preview = util.colorize_depth(depth, np.ones((2, 2), dtype=bool), colorbar=False)
    np.testing.assert_array_equal(image, [[[0, 255, 0], [128, 255, 0]]])
    assert (preview[0, 1] == 0).all() and (preview[1, 0] == 0).all()
    finite = util.colorize_depth(np.array([[1., 5.], [5., 3.]]), np.array([[1, 0], [0, 1]], dtype=bool),
                                 colorbar=False)
    np.testing.assert_array_equal(preview[0, 0], finite[0, 0])  # the near end of the finite depths' range
    np.testing.assert_array_equal(preview[1, 1], finite[1, 1])  # the far end
    grid = train.image_grid(torch.tensor([nan, inf, -inf, 0.5, 2.]).reshape(5, 1, 1, 1))  # TensorBoard's images
    torch.testing.assert_close(grid, torch.tensor([[[0., 1., 0., 0.5, 1.]]]))
