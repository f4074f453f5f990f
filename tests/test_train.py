"""train.py end to end on tiny generated datasets (8 px, 2 marching steps, 8-d codes), on the CPU.

Configs parse with the real parser; an interrupted run resumes to the same parameters as an
uninterrupted one; reference checkpoints load through --checkpoint_path; few-shot fitting trains only the
codes; SIGTERM saves and exits 143; a non-finite loss stops without a bad checkpoint; bad inputs fail
before training; torchrun with two gloo processes trains and only rank 0 writes.
"""
import glob
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import kernels
import shepard_metzler
import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / 'train_configs').glob('*.yml'))


@pytest.fixture(scope='module')
def tiny_dataset(tmp_path_factory):
    """3 Shepard-Metzler objects: train 4 views, val 2 objects x 2 views, test 3 views, 8 x 8 px."""
    root = tmp_path_factory.mktemp('sm')
    shepard_metzler.generate_dataset(str(root), num_objects=3, num_train_views=4, num_val_views=2,
                                     num_val_objects=2, num_test_views=3, sidelength=8, workers=1)
    return root


def tiny_args(dataset, logging_root, *extra):
    return ['--data_root', str(dataset / 'train'), '--val_root', str(dataset / 'val'),
            '--logging_root', str(logging_root), '--img_sidelengths', '8,6',
            '--batch_size_per_img_sidelength', '2,3', '--max_steps_per_img_sidelength', '4,4',
            '--tracing_steps', '2', '--embedding_size', '8', '--steps_til_val', '3', '--steps_til_ckpt', '100',
            '--steps_til_log', '2', '--steps_til_image', '5', '--device', 'cpu', '--seed', '3', *extra]


def checkpoints(logging_root):
    return sorted(pathlib.Path(logging_root, 'checkpoints').glob('*.pth'))


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)  # a checkpoint never needs pickled code


def assert_same_state(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


# --- Configs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('config', CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_configs_parse(config):
    opt = train.get_parser().parse_args(['-c', str(config)])
    sidelengths, batch_sizes, max_steps = train.schedule_from_opt(opt)
    assert len(sidelengths) == len(batch_sizes) == len(max_steps) >= 1
    assert opt.data_root


def test_paper_schedules():
    def parsed(name):
        return train.get_parser().parse_args(['-c', str(ROOT / 'train_configs' / name)])
    assert train.schedule_from_opt(parsed('cars.yml')) == ([64, 128], [64, 16], [5000, 170000])
    assert train.schedule_from_opt(parsed('chairs.yml')) == ([64, 128], [64, 16], [20000, 554000])
    assert train.schedule_from_opt(parsed('shepard_metzler.yml')) == ([64], [48], [352000])
    for name, views in (('cars_one_shot.yml', '64'), ('cars_two_shot.yml', '64,104')):
        opt = parsed(name)
        assert train.schedule_from_opt(opt) == ([128], [8], [100000])
        assert opt.overwrite_embeddings and opt.freeze_networks and opt.no_validation
        assert opt.specific_observation_idcs == views and opt.checkpoint_path


def test_config_syntax_as_the_reference(tmp_path):
    """Empty values are unset, `checkpoint:` reaches --checkpoint_path, `True` sets a switch."""
    config = tmp_path / 'c.yml'
    config.write_text("data_root: /d\nval_root:   # no validation set\ncheckpoint: /ckpt\n"
                      "freeze_networks: True\nimg_sidelengths: '64,128'\n")
    opt = train.get_parser().parse_args(['-c', str(config)])
    assert opt.val_root is None and opt.checkpoint_path == '/ckpt' and opt.freeze_networks
    assert opt.img_sidelengths == '64,128' and opt.lr == 5e-5 and opt.embedding_size == 256
    config.write_text("data_root: /d\ncheckpoint:\n")
    assert train.get_parser().parse_args(['-c', str(config)]).checkpoint_path is None


def test_stage_of_counts_across_stages():
    assert [train.stage_of(s, [4, 4]) for s in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 1]


# --- Training, resuming, summaries -------------------------------------------------------------------

def test_interrupted_and_resumed_equals_uninterrupted(tiny_dataset, tmp_path, monkeypatch):
    full = tmp_path / 'full'
    assert train.main(tiny_args(tiny_dataset, full)) == 0
    (final,) = checkpoints(full)
    reference = load(final)
    assert reference['step'] == 8 and reference['stage'] == 1 and set(reference) >= {'model', 'optimizer'}

    # A real SIGTERM in the middle of the first stage's epoch (during step 2): the step finishes,
    # a checkpoint is written and the run exits 143.
    real_step, calls = train.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, 'train_step', step_then_signal)
    interrupted = tmp_path / 'interrupted'
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_dataset, interrupted))
    assert exit_info.value.code == 143
    (saved,) = checkpoints(interrupted)
    assert load(saved)['step'] == 3 and load(saved)['epoch_step'] == 3
    monkeypatch.setattr(train, 'train_step', real_step)

    # The same command again resumes automatically: same data order, RNG, Adam state.
    assert train.main(tiny_args(tiny_dataset, interrupted)) == 0
    resumed = load(checkpoints(interrupted)[-1])
    assert resumed['step'] == 8 and resumed['epoch'] == reference['epoch']
    assert_same_state(resumed['model'], reference['model'])
    for a, b in zip(resumed['optimizer']['state'].values(), reference['optimizer']['state'].values()):
        assert_same_state(a, b)

    # The TensorBoard events are readable by tensorboard: scalars every step, validation, images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(full), size_guidance={'scalars': 0, 'images': 0}).Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars('total_loss')] == list(range(8))
    for name in train.SCALAR_NAMES:
        assert name in tags['scalars']
    assert [e.step for e in events.Scalars('val_psnr')] == [0, 3, 6, 8]  # and the final model's
    assert {'val_dist_loss', 'val_ssim'} <= set(tags['scalars'])
    rates = events.Scalars('steps_per_second')  # from the second log step on (steps_til_log 2)
    assert [e.step for e in rates] == [4, 6, 8] and all(e.value > 0 for e in rates)
    assert {'Output_vs_gt', 'pred_depth', 'normals', 'error', 'raymarch_progress'} <= set(tags['images'])
    assert (full / 'params.txt').read_text().count('\n') == len(vars(train.get_parser().parse_args(
        tiny_args(tiny_dataset, full))))
    assert 'SRNsModel' in (full / 'model.txt').read_text()


def test_start_step_beyond_first_stage_goes_to_its_stage(tiny_dataset, tmp_path, capsys):
    assert train.main(tiny_args(tiny_dataset, tmp_path, '--start_step', '5', '--no_validation',
                                '--num_workers', '1')) == 0
    final = load(checkpoints(tmp_path)[-1])
    assert final['step'] == 8 and final['stage'] == 1
    assert 'Stage 1: 6 px' in capsys.readouterr().out


def test_exact_path_forbids_tf32(tiny_dataset, tmp_path):
    # PyTorch allows TF32 in cuDNN convolutions by default; the exact path must not (the U-Net renderer's parity).
    # torch.backends' flags are properties of module-like objects, not plain attributes: set and restore them
    # by hand (pytest's monkeypatch tries to delete them on teardown).
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert train.main(tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '2,0',
                                    '--no_validation')) == 0
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_bf16_autocast_switch(tiny_dataset, tmp_path):
    args = tiny_args(tiny_dataset, tmp_path, '--amp', 'bf16', '--max_steps_per_img_sidelength', '2,0')
    assert train.main(args) == 0
    final = load(checkpoints(tmp_path)[-1])
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all()
               for value in final['model'].values() if value.is_floating_point())


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the copy through pinned memory needs a CUDA GPU"))])
def test_scalar_queue_reads_one_interval_late(device):
    queue = train.ScalarQueue(reduce=lambda values: 2 * values)
    for step in range(3):
        queue.push(torch.full((2,), float(step), device=device), step)
    assert queue.flush() == []  # the window just queued is not waited for
    for step in range(3, 5):
        queue.push(torch.full((2,), float(step), device=device), step)
    ((values, steps, _),) = queue.flush()  # the window before it
    assert steps == [0, 1, 2] and values.device.type == 'cpu'
    assert values.tolist() == [[0., 0.], [2., 2.], [4., 4.]]  # reduced
    assert queue.flush() == []
    ((values, steps, _),) = queue.flush(wait=True)  # everything pushed
    assert steps == [3, 4] and values.tolist() == [[6., 6.], [8., 8.]]
    assert queue.flush(wait=True) == []


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the device's clock needs a CUDA GPU"))])
def test_scalar_queue_times_each_window_where_it_ran(device):
    """Two windows read at once (a checkpoint, the end of a run) each get the time their own steps took, not
    the moment they were read: steps_per_second has no spike at checkpoints."""
    queue = train.ScalarQueue(reduce=lambda values: values)

    def window(seconds, steps):
        for step in steps:
            if device == 'cuda':
                torch.cuda._sleep(int(seconds / len(steps) * 2.5e9))  # cycles: at least that long below 2.5 GHz
            else:
                time.sleep(seconds / len(steps))
            queue.push(torch.zeros(2, device=device), step)

    window(0.05, [0])
    assert queue.flush() == []
    window(0.2, [1, 2])
    ((_, steps, seconds),) = queue.flush()
    assert steps == [0] and seconds is None  # nothing before it to time it against
    window(0.4, [3, 4])
    (_, steps_b, seconds_b), (_, steps_c, seconds_c) = queue.flush(wait=True)
    assert (steps_b, steps_c) == ([1, 2], [3, 4])
    assert 0.2 <= seconds_b < 0.2 + 2 and 0.4 <= seconds_c < 0.4 + 2


def test_non_finite_loss_stops_without_a_bad_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    real_losses, calls = train.srns.compute_losses, []

    def poisoned(*args, **kwargs):
        losses = real_losses(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # step 3
            losses['total_loss'] = losses['total_loss'] * float('nan')
        return losses

    monkeypatch.setattr(train.srns, 'compute_losses', poisoned)
    with pytest.raises(SystemExit, match=r'non-finite loss at step 3 .*total_loss nan'):
        train.main(tiny_args(tiny_dataset, tmp_path, '--steps_til_ckpt', '2', '--no_validation'))
    assert [p.name for p in checkpoints(tmp_path)] == ['epoch_0000_iter_000002.pth']
    # Without a checkpoint due, the scalars read one log interval late still stop it, naming the same step.
    calls.clear()
    with pytest.raises(SystemExit, match=r'non-finite loss at step 3 .*total_loss nan'):
        train.main(tiny_args(tiny_dataset, tmp_path / 'late', '--steps_til_ckpt', '1000', '--no_validation'))
    assert checkpoints(tmp_path / 'late') == []


# --- Loading checkpoints, few-shot fitting ---------------------------------------------------------

def test_reference_checkpoint_via_checkpoint_path(tiny_dataset, tmp_path, reference_fixtures):
    """The reference's {'model'} checkpoint (3 codes of size 8) loads, with and without its codes."""
    path = reference_fixtures / 'hypernet' / 'checkpoint.pth'
    stored = torch.load(path, map_location='cpu', weights_only=True)['model']
    common = ['--embedding_size', '8', '--tracing_steps', '10', '--lr', '0', '--no_validation',
              '--max_steps_per_img_sidelength', '1,0', '--checkpoint_path', str(path)]

    assert train.main(tiny_args(tiny_dataset, tmp_path / 'keep', *common)) == 0
    assert_same_state(load(checkpoints(tmp_path / 'keep')[-1])['model'], stored)  # lr 0: weights as loaded

    args = tiny_args(tiny_dataset, tmp_path / 'new', *common, '--max_num_instances_train', '2',
                     '--overwrite_embeddings')
    assert train.main(args) == 0
    model = load(checkpoints(tmp_path / 'new')[-1])['model']
    assert model['latent_codes.weight'].shape == (2, 8)
    assert_same_state({k: v for k, v in model.items() if k != 'latent_codes.weight'},
                      {k: v for k, v in stored.items() if k != 'latent_codes.weight'})

    with pytest.raises(SystemExit, match='--overwrite_embeddings'):  # 2 instances, 3 stored codes
        train.main(tiny_args(tiny_dataset, tmp_path / 'bad', *common, '--max_num_instances_train', '2'))
    assert not checkpoints(tmp_path / 'bad')


def test_few_shot_fits_only_the_codes(tiny_dataset, tmp_path):
    trained = tmp_path / 'trained'
    assert train.main(tiny_args(tiny_dataset, trained, '--no_validation')) == 0
    networks = load(checkpoints(trained)[-1])['model']

    few_shot = tmp_path / 'few_shot'
    args = tiny_args(tiny_dataset, few_shot, '--no_validation', '--checkpoint_path', str(trained / 'checkpoints'),
                     '--overwrite_embeddings', '--freeze_networks', '--specific_observation_idcs', '0,2',
                     '--max_steps_per_img_sidelength', '3,0', '--lr', '1e-2')
    args[1] = str(tiny_dataset / 'test')
    assert train.main(args) == 0
    fitted = load(checkpoints(few_shot)[-1])['model']
    assert fitted['latent_codes.weight'].shape == (3, 8)
    frozen = {k: v for k, v in networks.items() if k != 'latent_codes.weight'}
    assert all(torch.equal(fitted[key], value) for key, value in frozen.items())
    assert not torch.allclose(fitted['latent_codes.weight'], networks['latent_codes.weight'][:3])


# --- Errors before training ---------------------------------------------------------------------------

def test_clear_errors_before_training(tiny_dataset, tmp_path):
    def fails(match, *extra, logging_root=tmp_path / 'logs'):
        with pytest.raises(SystemExit, match=match):
            train.main(tiny_args(tiny_dataset, logging_root, *extra))
        assert not checkpoints(logging_root)

    fails(r'--data_root .*missing.*folder not found', '--data_root', str(tmp_path / 'missing'))
    (tmp_path / 'empty').mkdir()
    fails(r'--val_root .*empty.*empty, no instance folders', '--val_root', str(tmp_path / 'empty'))
    fails(r'same length.*\(2\).*\(1\)', '--batch_size_per_img_sidelength', '4')
    fails('do not fill one batch', '--batch_size_per_img_sidelength', '2,1000')
    (tmp_path / 'a_file').write_text('')
    fails('not writable', logging_root=tmp_path / 'a_file' / 'logs')
    fails(r'checkpoint not found', '--checkpoint_path', str(tmp_path / 'nope.pth'))
    fails(r'--tracing_grad_steps must be between 0 \(every step\) and --tracing_steps \(2\), got 3',
          '--tracing_grad_steps', '3')
    fails(r'--kernels triton: .*mixed-precision path; add --fast or --amp bf16', '--kernels', 'triton')
    if not (torch.cuda.is_available() and kernels.available()):
        fails(r'--kernels triton: the fused kernels need Triton and a CUDA device of compute capability 8\.0 or '
              r'later \(device cpu',
              '--kernels', 'triton', '--amp', 'bf16', '--device', 'cpu')
    with pytest.raises(SystemExit):  # argparse: --data_root is required
        train.main(['--logging_root', str(tmp_path)])


# --- Subprocesses: a real SIGTERM, torchrun ---------------------------------------------------------

def _reduce_scalars_worker(rank, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    # 2 buffered steps per rank; the value encodes (rank, step, column).
    values = torch.tensor([[100.0 * rank + 10 * k + i for i in range(len(train.SCALAR_NAMES))] for k in range(2)])
    reduced = train.reduce_scalars(values, 2)
    if rank == 0:
        torch.save(reduced, out_file)
    dist.destroy_process_group()


def test_logged_scalars_are_reduced_over_ranks(tmp_path):
    # Under torchrun rank 0 logs the loss of the whole batch (mean over ranks) and the extremes over ranks.
    torch.multiprocessing.spawn(_reduce_scalars_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'out.pt')),
                                nprocs=2)
    reduced = torch.load(tmp_path / 'out.pt', weights_only=True)
    for i, how in enumerate(train.SCALAR_REDUCTIONS):
        expected = {'mean': 50.0, 'min': 0.0, 'max': 100.0}[how] + 10 * torch.arange(2.0) + i
        torch.testing.assert_close(reduced[:, i], expected, msg=train.SCALAR_NAMES[i])
    assert [train.SCALAR_REDUCTIONS[train.SCALAR_NAMES.index(name)] for name in
            ('total_loss', 'out_min', 'trgt_max', 'latent_reg_loss')] == ['mean', 'min', 'max', 'mean']


def run_env():
    """The environment of a train.py/test.py subprocess: the project first on the path, then whatever the caller's
    PYTHONPATH already held (packages installed there must stay importable)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS='1')


def test_subprocesses_keep_the_callers_pythonpath(monkeypatch, tmp_path):
    # Run from a folder that is neither, so the project (util) and the caller's module import only through the path.
    callers, elsewhere = tmp_path / 'callers', tmp_path / 'elsewhere'
    callers.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv('PYTHONPATH', str(callers))
    (callers / 'only_on_the_callers_path.py').write_text('VALUE = 7\n')
    result = subprocess.run([sys.executable, '-c', 'import only_on_the_callers_path, util; '
                             'print(only_on_the_callers_path.VALUE)'], cwd=elsewhere, env=run_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '7'


@pytest.mark.parametrize('to_group', [False, True], ids=['process', 'process_group_with_workers'])
def test_sigterm_saves_and_the_same_command_resumes(tiny_dataset, tmp_path, to_group):
    # Ctrl-C in a terminal and `timeout` signal the whole process group, DataLoader workers included:
    # the run must still save its checkpoint.
    extra = ('--num_workers', '1') if to_group else ()
    args = tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '100000,1', '--no_validation', *extra)
    process = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], cwd=ROOT, env=run_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=to_group)
    deadline = time.time() + 120
    while not list(tmp_path.glob('events.out.tfevents.*')) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps
    if to_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert 'Interrupted (SIGTERM)' in stdout
    (saved,) = checkpoints(tmp_path)
    step = load(saved)['step']
    assert step >= 1

    resumed = subprocess.run([sys.executable, str(ROOT / 'train.py'), *tiny_args(
        tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', f'{step + 2},0', '--no_validation')],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f'Resuming from {saved} at step {step}' in resumed.stdout
    assert load(checkpoints(tmp_path)[-1])['step'] == step + 2


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(args):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--nnodes=1',
               '--master_addr=127.0.0.1', f'--master_port={free_port()}', str(ROOT / 'train.py'), *args]
    try:
        return subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as hung:  # say where it hung: what both ranks had printed by then
        pytest.fail(f'torchrun did not finish in {hung.timeout} s\n{failure(hung)}')


def failure(result):
    """What a failed torchrun said: its exit status, and the ends of its output and of its errors."""
    text = lambda out: out.decode(errors='replace') if isinstance(out, bytes) else (out or '')
    status = getattr(result, 'returncode', 'none (killed)')
    return f'exit status {status}\nstdout: {text(result.stdout)[-2000:]}\nstderr: {text(result.stderr)[-3000:]}'


def test_torchrun_two_processes_gloo(tiny_dataset, tmp_path):
    trained = tmp_path / 'ddp'
    result = torchrun(tiny_args(tiny_dataset, trained, '--batch_size_per_img_sidelength', '2,2',
                                '--max_steps_per_img_sidelength', '2,1', '--steps_til_ckpt', '2'))
    assert result.returncode == 0, failure(result)
    assert result.stdout.count('Done: 3 steps') == 1  # rank 0 alone reports
    assert len(glob.glob(str(trained / 'events.out.tfevents.*'))) == 1  # ... and writes one event file
    # 3 batches per epoch and process: neither stage completes an epoch (the reference's naming)
    assert [p.name for p in checkpoints(trained)] == ['epoch_0000_iter_000002.pth', 'epoch_0000_iter_000003.pth']
    final = load(checkpoints(trained)[-1])
    assert final['world_size'] == 2 and len(final['rng_states']) == 2

    # Few-shot fitting under DDP: frozen networks, only the codes get gradients.
    few_shot = tmp_path / 'ddp_few_shot'
    args = tiny_args(tiny_dataset, few_shot, '--no_validation', '--checkpoint_path', str(trained / 'checkpoints'),
                     '--overwrite_embeddings', '--freeze_networks', '--specific_observation_idcs', '0,1',
                     '--batch_size_per_img_sidelength', '2,2', '--max_steps_per_img_sidelength', '2,0')
    args[1] = str(tiny_dataset / 'test')
    result = torchrun(args)
    assert result.returncode == 0, failure(result)
    fitted = load(checkpoints(few_shot)[-1])['model']
    assert all(torch.equal(fitted[key], value) for key, value in final['model'].items()
               if key != 'latent_codes.weight')
    assert fitted['latent_codes.weight'].shape == (3, 8)


# --- The training recipe beyond the reference -------------------------------------------------------------

def test_learning_rate_factor_known_answers():
    factor = train.learning_rate_factor
    assert [factor(s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]  # the reference: constant
    assert [factor(s, 100, warmup_steps=4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert factor(0, 100, schedule='cosine', min_ratio=0.1) == 1.0
    assert abs(factor(50, 100, schedule='cosine', min_ratio=0.1) - 0.55) < 1e-12
    assert abs(factor(100, 100, schedule='cosine', min_ratio=0.1) - 0.1) < 1e-12
    assert abs(factor(1, 100, warmup_steps=4, schedule='cosine', min_ratio=0.0)
               - 0.5 * 0.5 * (1 + math.cos(math.pi / 100))) < 1e-12


def test_random_rays_are_a_deterministic_subset_of_the_view(tiny_dataset):
    import dataio
    base = dataio.SceneClassDataset(str(tiny_dataset / 'train'), img_sidelength=8, samples_per_instance=1)
    rays = dataio.RandomRays(base, rays_per_view=10, seed=5)
    (observation,), (truth,) = rays[3]
    (whole,), _ = base[3]
    assert observation['uv'].shape == (10, 2) and truth['rgb'].shape == (10, 3)
    pixels = observation['uv'][:, 1] * 8 + observation['uv'][:, 0]  # row-major index of each ray
    assert len(set(pixels.tolist())) == 10 and (pixels.diff() > 0).all()
    torch.testing.assert_close(truth['rgb'], whole['rgb'][pixels], rtol=0, atol=0)
    torch.testing.assert_close(observation['pose'], whole['pose'])
    again = rays[3][0][0]['uv']
    next_epoch = rays[3 + len(base)][0][0]['uv']  # the same view, one epoch later
    assert torch.equal(again, observation['uv']) and not torch.equal(next_epoch, observation['uv'])


def test_device_rays_are_a_deterministic_subset_of_the_views(tiny_dataset):
    import dataio
    base = dataio.SceneClassDataset(str(tiny_dataset / 'train'), img_sidelength=8, samples_per_instance=1)
    rays = dataio.DeviceRays(base, rays_per_view=10, device='cpu', seed=5)
    rays.set_img_sidelength(8)
    keys = torch.tensor([3, 7 + len(base), 0])  # views 3, 7, 0
    observations, truth = rays.batch(keys, first_key=3)
    assert observations['uv'].shape == (3, 10, 2) and truth['rgb'].shape == (3, 10, 3)
    for row, view in enumerate((3, 7, 0)):
        (whole,), _ = base[view]
        pixels = observations['uv'][row, :, 1] * 8 + observations['uv'][row, :, 0]  # row-major index of each ray
        assert len(set(pixels.tolist())) == 10 and (pixels.diff() > 0).all()
        # float16 storage: within half a unit of its last place on [-1, 1]
        torch.testing.assert_close(truth['rgb'][row], whole['rgb'][pixels], rtol=0, atol=2 ** -11)
        for key in ('pose', 'intrinsics', 'instance_idx', 'param'):
            torch.testing.assert_close(observations[key][row], whole[key], rtol=0, atol=0)
    assert truth['rgb'] is observations['rgb']
    assert torch.equal(rays.batch(keys, first_key=3)[0]['uv'], observations['uv'])  # same keys, same rays
    assert not torch.equal(rays.batch(keys + len(base), first_key=3 + len(base))[0]['uv'], observations['uv'])

    batches = list(rays.batches([5, 1, 2, 9, 4], batch_size=2))  # the partial last group is dropped
    assert len(batches) == 2 and batches[1][0]['instance_idx'].tolist() == [base.get_instance_idx(2)[0],
                                                                          base.get_instance_idx(9)[0]]
    rays.set_img_sidelength(6)  # a new stage: rebuilt at the new side length, every pixel when N >= 36
    rays.rays_per_view = 40
    observations, truth = rays.batch(torch.tensor([1]), first_key=1)
    (whole,), _ = base[1]
    assert torch.equal(observations['uv'][0], whole['uv'])
    torch.testing.assert_close(truth['rgb'][0], whole['rgb'], rtol=0, atol=2 ** -11)


def test_device_memory_check_refuses_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (10 * 2 ** 30, 80 * 2 ** 30))
    train.check_device_memory(torch.device('cuda'), 4 * 2 ** 30, 'views')  # under half of what is free
    with pytest.raises(train.SetupError, match=r'views need 6.0 GiB on cuda, which has 10.0 of 80.0 GiB free'):
        train.check_device_memory(torch.device('cuda'), 6 * 2 ** 30, 'views')
    train.check_device_memory(torch.device('cpu'), 2 ** 50, 'views')  # host memory is not checked


@pytest.mark.parametrize('sampler', ['loader', 'device'])
def test_recipe_trains_and_resumes_exactly(tiny_dataset, tmp_path, monkeypatch, sampler):
    recipe = ('--rays_per_view', '12', '--latent_lr', '1e-3', '--lr_warmup_steps', '3', '--lr_schedule', 'cosine',
              '--lr', '2e-4', '--batch_size_per_img_sidelength', '4,3', '--num_workers', '1', '--steps_til_image', '3',
              '--tracing_grad_steps', '1', *(('--rays_on_device',) if sampler == 'device' else ()))
    full = tmp_path / 'full'
    assert train.main(tiny_args(tiny_dataset, full, *recipe)) == 0
    reference = load(checkpoints(full)[-1])
    groups = reference['optimizer']['param_groups']
    assert [g['base_lr'] for g in groups] == [2e-4, 1e-3]  # the latent table has its own rate
    assert abs(groups[0]['lr'] - 2e-4 * train.learning_rate_factor(7, 8, 3, 'cosine', 0.1)) < 1e-12

    real_step, calls = train.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in the second stage
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, 'train_step', step_then_signal)
    interrupted = tmp_path / 'interrupted'
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_dataset, interrupted, *recipe))
    monkeypatch.setattr(train, 'train_step', real_step)
    assert train.main(tiny_args(tiny_dataset, interrupted, *recipe)) == 0
    resumed = load(checkpoints(interrupted)[-1])
    assert resumed['step'] == 8
    assert_same_state(resumed['model'], reference['model'])

    if sampler == 'device':
        with pytest.raises(SystemExit, match='--rays_on_device draws random rays: it needs --rays_per_view'):
            train.main(tiny_args(tiny_dataset, tmp_path / 'no_rays', '--rays_on_device'))
        return
    with pytest.raises(SystemExit, match='--rays_per_view: the U-Net renderer'):
        train.main(tiny_args(tiny_dataset, tmp_path / 'unet', '--rays_per_view', '8', '--use_unet_renderer',
                             '--img_sidelengths', '128,128'))
    with pytest.raises(SystemExit, match='a separate rate for the codes cannot be added'):
        train.main(tiny_args(tiny_dataset, full, *recipe[:2], '--max_steps_per_img_sidelength', '4,6'))


def test_a_schedule_that_jumps_up_on_resuming_is_ramped(tiny_dataset, tmp_path, capsys):
    recipe = ('--img_sidelengths', '8', '--batch_size_per_img_sidelength', '2', '--lr_schedule', 'cosine',
              '--lr_warmup_steps', '2', '--lr', '1e-3', '--no_validation', '--steps_til_ckpt', '1')
    assert train.main(tiny_args(tiny_dataset, tmp_path, *recipe, '--max_steps_per_img_sidelength', '8')) == 0
    last = load(checkpoints(tmp_path)[-1])
    assert last['lr_factor'] == train.learning_rate_factor(7, 8, 2, 'cosine', 0.1)  # what step 7 trained with
    # four times as many steps: the decay is back near its start, 6.5x the rate of step 7, reached over 2 steps
    assert train.main(tiny_args(tiny_dataset, tmp_path, *recipe, '--max_steps_per_img_sidelength', '32')) == 0
    assert 'now asks for 6.5x the rate this run last trained with: ramping up to it over 2 steps' in \
        capsys.readouterr().out
    factors = {int(path.stem[-6:]): load(path)['lr_factor'] for path in checkpoints(tmp_path)}
    start, target = last['lr_factor'], train.learning_rate_factor(8, 32, 2, 'cosine', 0.1)
    assert abs(factors[9] - (start + (target - start) / 2)) < 1e-12  # step 8: half way
    for step in (9, 10, 20):  # then the schedule itself
        assert factors[step + 1] == train.learning_rate_factor(step, 32, 2, 'cosine', 0.1)
    state = load(checkpoints(tmp_path)[-1])
    assert state['optimizer']['param_groups'][0]['lr'] == 1e-3 * factors[32]


def test_save_at_minutes_writes_a_checkpoint_as_the_clock_passes_each(tiny_dataset, tmp_path, capsys):
    args = tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '6,0', '--no_validation',
                     '--save_at_minutes', '0.00001,0.00002,1000')
    assert train.main(args) == 0
    steps = [load(path)['step'] for path in checkpoints(tmp_path)]
    assert steps == [2, 6]  # both early minutes passed by the first log step: one checkpoint; then the final one
    assert load(checkpoints(tmp_path)[0])['elapsed_seconds'] >= 0.0012
    out = capsys.readouterr().out
    assert '--save_at_minutes 1e-05: ' in out and '--save_at_minutes 2e-05: ' in out and 'at step 2' in out
    # A time the clock passes only at the run's last step (--max_minutes): the final checkpoint serves it, and
    # its line names that checkpoint (scripts read the checkpoint of each time off these lines).
    end = tmp_path / 'end'
    assert train.main(tiny_args(tiny_dataset, end, '--max_steps_per_img_sidelength', '100000,0', '--no_validation',
                                '--max_minutes', '0.00002', '--save_at_minutes', '0.00001')) == 0
    final = checkpoints(end)
    assert len(final) == 1
    out = capsys.readouterr().out
    assert f'--save_at_minutes 1e-05: {final[0]} at step {load(final[0])["step"]}, ' in out
    for bad in ('0,1', 'soon'):
        with pytest.raises(SystemExit, match='--save_at_minutes: expected'):
            train.main(tiny_args(tiny_dataset, tmp_path / bad, '--save_at_minutes', bad))


def test_max_minutes_stops_with_a_final_checkpoint_and_the_decay_follows_the_clock(tiny_dataset, tmp_path, capsys):
    args = tiny_args(tiny_dataset, tmp_path, '--max_steps_per_img_sidelength', '100000,0', '--max_minutes', '0.0001',
                     '--lr_schedule', 'cosine', '--lr_min_ratio', '0.25', '--no_validation')
    assert train.main(args) == 0
    (final,) = checkpoints(tmp_path)
    state = load(final)
    assert state['step'] == 2  # the first log step (--steps_til_log 2) after the budget of 6 ms
    assert state['elapsed_seconds'] >= 0.006
    assert '(the --max_minutes 0.0001 budget)' in capsys.readouterr().out
    # the budget is spent: the decay has reached its end whatever the step count says
    assert train.learning_rate_factor(2, 100000, 0, 'cosine', 0.25, time_fraction=5.0) == 0.25
    assert abs(state['optimizer']['param_groups'][0]['lr'] - 5e-5 * train.learning_rate_factor(
        1, 100000, 0, 'cosine', 0.25)) < 1e-15  # step 1 ran before the first clock reading

    # Resumed with a budget the clock has all but spent: the decay goes on from the checkpoint's clock (it used to
    # restart from step count alone, i.e. at the peak, until the first log step)
    minutes = state['elapsed_seconds'] / 60 * 1.0001
    args[args.index('--max_minutes') + 1] = repr(minutes)
    assert train.main(args) == 0
    state = load(checkpoints(tmp_path)[-1])
    assert state['step'] == 4
    factor = train.learning_rate_factor(3, 100000, 0, 'cosine', 0.25, time_fraction=1 / 1.0001)
    assert factor < 0.2501 and abs(state['optimizer']['param_groups'][0]['lr'] - 5e-5 * factor) < 1e-15
