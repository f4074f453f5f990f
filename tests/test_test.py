"""test.py end to end on a tiny generated dataset and a briefly trained model.

Checks the reference outputs (renderings, gt_comparisons, results.txt) and ours (per-image metrics, depth,
point clouds, videos) against values computed independently here: the model is rendered again in this
file (with init_depth_std 0, so rendering is deterministic) and PSNR/SSIM are recomputed with numpy and
scikit-image directly.
"""
import csv
import glob
import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import data_util
import geometry
import srns
import util
import test as srn_test

SIDE = 16
NUM_VIEWS = 4
LATENT = 8


def _render_sphere(cam2world, f, side, radius, color):
    """Analytic ray-traced sphere at the origin on a white background: (side, side, 3) uint8."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing='ij')
    dirs_cam = np.stack(((cols - side / 2) / f, (rows - side / 2) / f, np.ones_like(cols, dtype=float)), -1)
    dirs = dirs_cam @ cam2world[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origin = cam2world[:3, 3]
    b = dirs @ origin
    disc = b ** 2 - (origin @ origin - radius ** 2)
    hit = disc > 0
    t = -b - np.sqrt(np.maximum(disc, 0))
    normals = (origin + t[..., None] * dirs) / radius
    shade = 0.4 + 0.6 * np.clip(normals @ np.array([0.3, -0.5, 0.8]), 0, 1)
    image = np.ones((side, side, 3))
    image[hit] = (np.asarray(color) * shade[..., None])[hit]
    return np.round(image * 255).astype(np.uint8)


def make_dataset(root, num_instances=2, num_views=NUM_VIEWS, side=SIDE, seed=0):
    """SRN-format folders with spheres seen from cameras on a sphere of radius 1.5 (z up)."""
    rng = np.random.default_rng(seed)
    f = side * 1.2
    for i in range(num_instances):
        inst = os.path.join(root, f'object_{i:02d}')
        os.makedirs(os.path.join(inst, 'rgb'))
        os.makedirs(os.path.join(inst, 'pose'))
        data_util.write_intrinsics(os.path.join(inst, 'intrinsics.txt'), f, side / 2, side / 2, side, side)
        color = [(0.8, 0.2, 0.1), (0.1, 0.3, 0.8), (0.2, 0.7, 0.2)][i % 3]
        positions = geometry.sphere_positions(num_views, 1.5, rng, upper_hemisphere=True)
        for v, position in enumerate(positions):
            cam2world = geometry.look_at(position)
            data_util.write_pose(os.path.join(inst, 'pose', f'{v:06d}.txt'), cam2world)
            iio.imwrite(os.path.join(inst, 'rgb', f'{v:06d}.png'),
                        _render_sphere(cam2world, f, side, 0.4 + 0.1 * i, color))
    return root


def train_tiny(data_root, checkpoint_path, steps=10, num_instances=2):
    """A short plain training loop (not train.py, which other tests cover), then a checkpoint."""
    import dataio
    torch.manual_seed(0)
    dataset = dataio.SceneClassDataset(data_root, img_sidelength=SIDE, samples_per_instance=1)
    model = srns.SRNsModel(num_instances=num_instances, latent_dim=LATENT, tracing_steps=3)
    # march 0.35 per step from the start, so the few-step model's surfaces lie in front of the camera near
    # the spheres (depth ~1.1) and its depth maps and point clouds are not degenerate
    with torch.no_grad():
        model.ray_marcher.out_layer.weight.mul_(0.1)
        model.ray_marcher.out_layer.bias.fill_(0.35)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), shuffle=True,
                                         collate_fn=dataset.collate_fn)
    for _ in range(steps):
        for model_input, ground_truth in loader:
            prediction = model(model_input)
            losses = srns.compute_losses(model, model_input, prediction, ground_truth['rgb'])
            optimizer.zero_grad()
            losses['total_loss'].backward()
            optimizer.step()
    util.save_checkpoint(checkpoint_path, model, optimizer)
    return checkpoint_path


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: on a shared two-core machine, spinning thread pools were three times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('srn_eval')
    data_root = make_dataset(str(root / 'data'))
    checkpoint = train_tiny(data_root, str(root / 'run' / 'checkpoints' / 'epoch_0000_iter_000015.pth'))
    return {'root': root, 'data_root': data_root, 'checkpoint': checkpoint}


def base_args(trained, logging_root, *extra):
    return ['--data_root', trained['data_root'], '--checkpoint_path', trained['checkpoint'],
            '--logging_root', str(logging_root), '--img_sidelength', str(SIDE), '--tracing_steps', '3',
            '--device', 'cpu', '--no_progress', *extra]


@pytest.fixture(scope='module')
def full_run(trained):
    out = trained['root'] / 'eval'
    summary = srn_test.main(base_args(trained, out, '--batch_size', '3', '--init_depth_std', '0',
                                      '--fit_observation_idcs', '0', '--save_depth', '--save_normals',
                                      '--point_cloud', '--foreground', 'target', '--turntable', '4',
                                      '--interpolate', '0,1', '--interpolation_frames', '5'))
    return out, summary


def independent_render(trained):
    """Render every view in one batch with our own loop: (model inputs, rgb, depth, target), instance-view order."""
    model = srns.SRNsModel(num_instances=2, latent_dim=LATENT, tracing_steps=3, init_depth_std=0.)
    util.load_checkpoint(trained['checkpoint'], model)
    model.eval()
    inputs, targets = [], []
    for i, inst in enumerate(sorted(glob.glob(os.path.join(trained['data_root'], '*', '')))):
        intrinsics = torch.from_numpy(data_util.parse_intrinsics(os.path.join(inst, 'intrinsics.txt'), SIDE))
        for v in range(NUM_VIEWS):
            inputs.append({'instance_idx': torch.tensor(float(i)), 'intrinsics': intrinsics,
                           'pose': torch.from_numpy(data_util.load_pose(os.path.join(inst, 'pose', f'{v:06d}.txt'))),
                           'uv': geometry.uv_grid(SIDE)})
            targets.append(torch.from_numpy(data_util.load_rgb(os.path.join(inst, 'rgb', f'{v:06d}.png'), SIDE)))
    batch = {key: torch.stack([obs[key] for obs in inputs]) for key in inputs[0]}
    with torch.no_grad():
        rgb, depth = model(batch)
    return batch, rgb, depth, torch.stack(targets)  # targets (B, s, s, 3)


def read_rows(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def test_metrics_agree_with_independent_computation(trained, full_run):
    out, summary = full_run
    _, rgb, _, targets = independent_render(trained)
    preds = np.clip(rgb.double().numpy().reshape(-1, SIDE, SIDE, 3) / 2 + 0.5, 0, 1)
    gts = targets.double().numpy() / 2 + 0.5
    psnr = [10 * np.log10(1 / np.mean((p - g) ** 2)) for p, g in zip(preds, gts)]
    ssim = [structural_similarity(p, g, channel_axis=-1, data_range=1) for p, g in zip(preds, gts)]

    rows = read_rows(out / 'metrics_per_image.csv')
    assert [(int(r['instance']), int(r['view'])) for r in rows] == [(i, v) for i in range(2) for v in range(NUM_VIEWS)]
    np.testing.assert_allclose([float(r['psnr']) for r in rows], psnr, atol=1e-3)
    np.testing.assert_allclose([float(r['ssim']) for r in rows], ssim, atol=1e-5)
    assert [r['split'] for r in rows] == (['fitted'] + ['held_out'] * (NUM_VIEWS - 1)) * 2

    mean_psnr, mean_ssim = (float(x) for x in (out / 'results.txt').read_text().split(','))
    assert mean_psnr == pytest.approx(np.mean(psnr), abs=1e-3)
    assert mean_ssim == pytest.approx(np.mean(ssim), abs=1e-5)
    metrics = json.loads((out / 'metrics.json').read_text())
    held_out = [k for k in range(len(psnr)) if k % NUM_VIEWS != 0]
    assert metrics['summary']['held_out_views']['psnr'] == pytest.approx(np.mean(np.array(psnr)[held_out]), abs=1e-3)
    assert metrics['summary']['held_out_views']['num_views'] == 2 * (NUM_VIEWS - 1)
    assert metrics['summary']['fitted_views']['num_views'] == 2
    assert metrics['per_instance'][1]['all_views']['ssim'] == pytest.approx(np.mean(ssim[NUM_VIEWS:]), abs=1e-5)
    assert summary['all_views']['psnr'] == pytest.approx(mean_psnr, abs=1e-6)


def test_images_have_the_documented_layout(trained, full_run):
    out, _ = full_run
    _, rgb, _, targets = independent_render(trained)
    for i in range(2):
        for v in range(NUM_VIEWS):
            k = i * NUM_VIEWS + v
            rendering = iio.imread(out / 'renderings' / f'{i:06d}' / f'{v:06d}.png')
            expected = util.to_uint8_image(rgb[k].reshape(SIDE, SIDE, 3))
            assert rendering.shape == (SIDE, SIDE, 3) and rendering.dtype == np.uint8
            assert np.abs(rendering.astype(int) - expected).max() <= 1
            comparison = iio.imread(out / 'gt_comparisons' / f'{i:06d}' / f'{v:06d}.png')
            assert comparison.shape == (SIDE, 3 * SIDE, 3)
            np.testing.assert_array_equal(comparison[:, 2 * SIDE:], util.to_uint8_image(targets[k]))
            np.testing.assert_array_equal(comparison[:, SIDE:2 * SIDE], rendering)
            normals = iio.imread(out / 'normals' / f'{i:06d}' / f'{v:06d}.png')
            np.testing.assert_array_equal(normals, comparison[:, :SIDE])
            assert iio.imread(out / 'depth' / f'{i:06d}' / f'{v:06d}.png').dtype == np.uint16
            # The preview: enlarged to at least 128 rows, the background (here: where the target is white,
            # --foreground target) white, the object in colour, a colour bar on the right.
            preview = iio.imread(out / 'depth' / f'{i:06d}' / f'{v:06d}_preview.png')
            zoom = -(-128 // SIDE)
            assert preview.shape[0] == SIDE * zoom and preview.shape[1] > SIDE * zoom + 20
            picture = preview[::zoom, :SIDE * zoom:zoom]  # (SIDE, SIDE, 3)
            background = (util.to_uint8_image(targets[k]) > 255 * 0.95).all(axis=-1)  # threshold 0.05
            assert background.any() and (~background).any()
            assert (picture[background] == 255).all()
            assert (picture[~background] != 255).any(axis=-1).all()
            bar = preview[SIDE * zoom // 2, SIDE * zoom:]  # a row across the colour bar
            assert (bar != 255).any(axis=-1).sum() >= 6


def test_point_cloud_lies_where_the_depth_says(trained, full_run):
    out, _ = full_run
    batch, rgb, depth, targets = independent_render(trained)
    for i in range(2):
        points, colors = srn_test.read_ply(out / 'point_clouds' / f'{i:06d}.ply')
        start = 0
        for v in range(NUM_VIEWS):
            k = i * NUM_VIEWS + v
            # foreground ('--foreground target'): ground-truth pixels that are not the white background
            foreground = (targets[k].reshape(-1, 3).numpy() / 2 + 0.5 < 0.95).any(axis=1)
            view_points = points[start:start + foreground.sum()]
            start += foreground.sum()
            # into this camera: pixel position and camera depth must match the saved depth map
            cam = np.linalg.inv(batch['pose'][k].double().numpy())
            cam_points = view_points @ cam[:3, :3].T + cam[:3, 3]
            depth_png = data_util.load_depth(out / 'depth' / f'{i:06d}' / f'{v:06d}.png').reshape(-1)
            assert (depth_png[foreground] > 0.5).all()  # surfaces in front of the camera, not clipped
            np.testing.assert_allclose(cam_points[:, 2], depth_png[foreground], atol=6e-4)
            np.testing.assert_allclose(cam_points[:, 2], depth[k, foreground, 0].numpy(), atol=1e-5)
            projected = geometry.project(*torch.from_numpy(cam_points.T[:, None]).float(),
                                         batch['intrinsics'][k:k + 1])[0, :, :2]
            np.testing.assert_allclose(projected.numpy(), batch['uv'][k][foreground].numpy(), atol=1e-3)
            rendering = iio.imread(out / 'renderings' / f'{i:06d}' / f'{v:06d}.png').reshape(-1, 3)
            np.testing.assert_array_equal(colors[start - foreground.sum():start], rendering[foreground])
        assert start == len(points) > 0  # one point per foreground pixel, nothing else


def test_videos_have_the_requested_frame_count(full_run):
    out, _ = full_run
    for i in range(2):
        frames = iio.imread(out / 'turntable' / f'{i:06d}.gif', index=None)
        assert frames.shape[0] == 4 and frames.shape[1:3] == (SIDE, SIDE)
    frames = iio.imread(out / 'interpolation' / '000000_000001.gif', index=None)
    assert frames.shape[0] == 5
    # the first frame shows instance 0 from its first view, as the rendering of that view does
    rendering = iio.imread(out / 'renderings' / '000000' / '000000.png')
    assert np.abs(frames[0][..., :3].astype(int) - rendering).mean() < 3


def test_batch_size_and_seed(trained, tmp_path):
    """Different batch sizes give the same metrics (deterministic rendering); a seed reproduces noisy ones."""
    runs = {}
    for name, extra in {'b1': ['--batch_size', '1', '--init_depth_std', '0'],
                        'b5': ['--batch_size', '5', '--init_depth_std', '0'],
                        'noisy_a': ['--batch_size', '5', '--seed', '3'],
                        'noisy_b': ['--batch_size', '5', '--seed', '3'],
                        'noisy_c': ['--batch_size', '5', '--seed', '4']}.items():
        srn_test.main(base_args(trained, tmp_path / name, '--save_out_first_n', '0', *extra))
        runs[name] = [float(r['psnr']) for r in read_rows(tmp_path / name / 'metrics_per_image.csv')]
    np.testing.assert_allclose(runs['b1'], runs['b5'], atol=1e-4)
    assert runs['noisy_a'] == runs['noisy_b']
    assert runs['noisy_a'] != runs['noisy_c']
    assert not (tmp_path / 'b1' / 'renderings').exists()  # --save_out_first_n 0 writes metrics only


def test_num_instances_is_read_and_checked(trained, tmp_path):
    with pytest.raises(ValueError, match='--num_instances 5 disagrees .* holds 2 latent codes'):
        srn_test.main(base_args(trained, tmp_path / 'a', '--num_instances', '5'))
    summary = srn_test.main(base_args(trained, tmp_path / 'b', '--num_instances', '2', '--save_out_first_n', '0',
                                      '--max_num_instances', '1'))
    assert summary['all_views']['num_views'] == NUM_VIEWS
    with pytest.raises(FileExistsError, match='--overwrite'):
        srn_test.main(base_args(trained, tmp_path / 'b'))


def test_more_instances_than_codes_is_a_clear_error(trained, tmp_path):
    data_root = make_dataset(str(tmp_path / 'three'), num_instances=3)
    args = base_args(trained, tmp_path / 'out')
    args[1] = data_root
    with pytest.raises(ValueError, match='3 instances, but .* holds only 2 latent codes'):
        srn_test.main(args)


def test_checkpoint_config_key(trained, tmp_path):
    """The reference's test configs write `checkpoint:`; empty values count as unset."""
    config = tmp_path / 'eval.yml'
    config.write_text(f"data_root: {trained['data_root']}\ncheckpoint: {trained['checkpoint']}\n"
                      f"img_sidelength: {SIDE}\ntracing_steps: 3\nbatch_size:\nnum_instances: # from checkpoint\n"
                      f"logging_root: {tmp_path / 'out'}\nsave_out_first_n: 0\n")
    opt = srn_test.get_parser().parse_args(['-c', str(config)])
    assert opt.checkpoint_path == trained['checkpoint']
    assert opt.batch_size == 32 and opt.num_instances is None
    summary = srn_test.main(['-c', str(config), '--device', 'cpu', '--no_progress'])
    assert summary['all_views']['num_views'] == 2 * NUM_VIEWS


def test_missing_checkpoint_is_a_clear_error(trained, tmp_path):
    args = ['--data_root', trained['data_root'], '--logging_root', str(tmp_path)]
    with pytest.raises(ValueError, match='--checkpoint_path is required'):
        srn_test.main(args)


def test_fit_route_fits_new_codes_with_frozen_networks(trained, tmp_path):
    """--fit_steps: new codes for the objects of data_root, fitted to view 0; the networks stay as trained."""
    before = srn_test.main(base_args(trained, tmp_path / 'before', '--init_depth_std', '0', '--save_out_first_n', '0',
                                     '--fit_observation_idcs', '0', '--fit_steps', '1', '--fit_lr', '0'))
    after = srn_test.main(base_args(trained, tmp_path / 'after', '--init_depth_std', '0', '--save_out_first_n', '0',
                                    '--fit_observation_idcs', '0', '--fit_steps', '20', '--fit_lr', '3e-2',
                                    '--fit_rays_per_view', '64'))
    # the briefly trained networks leave the codes little to explain, but fitting must help the fitted views
    assert after['fitted_views']['psnr'] > before['fitted_views']['psnr'] + 0.1
    fitted = util.read_checkpoint(tmp_path / 'after' / 'checkpoints' / 'fitted_latent_codes.pth')['model']
    original = util.read_checkpoint(trained['checkpoint'])['model']
    for key, value in original.items():
        if key != util.LATENT_CODES_KEY:
            torch.testing.assert_close(fitted[key], value, rtol=0, atol=0)
    assert not torch.allclose(fitted[util.LATENT_CODES_KEY], original[util.LATENT_CODES_KEY])
    # the saved fit renders again through the ordinary route with the same numbers
    again = srn_test.main(base_args(trained, tmp_path / 'again', '--init_depth_std', '0', '--save_out_first_n', '0',
                                    '--fit_observation_idcs', '0', '--checkpoint_path',
                                    str(tmp_path / 'after' / 'checkpoints')))
    assert again['held_out_views']['psnr'] == pytest.approx(after['held_out_views']['psnr'], abs=1e-4)


def _renderings(folder):
    """Every rendering a run wrote, stacked in file order: (V, s, s, 3) float."""
    files = sorted(glob.glob(str(folder / 'renderings' / '*' / '*.png')))
    return np.stack([iio.imread(f) for f in files]).astype(float)


def test_amp_renders_close_to_float32_and_fits(trained, tmp_path):
    """--amp bf16 renders what float32 renders, to bfloat16's precision, and its fit improves the fitted views.

    bfloat16 keeps 8 significant bits (1 part in 256, about one uint8 level of the [-1, 1] colour range, which
    is ~48 dB), and the error grows through phi's layers, the ray march and the pixel generator: the renderings
    of the trained codes must agree to 40 dB. A fit at a high rate takes another path in bfloat16 than in
    float32, so the fit is judged by what it does: at least half of float32's gain on the fitted views."""
    srn_test.main(base_args(trained, tmp_path / 'exact', '--init_depth_std', '0', '--batch_size', '3'))
    srn_test.main(base_args(trained, tmp_path / 'amp', '--init_depth_std', '0', '--batch_size', '3', '--amp', 'bf16'))
    exact, amp = _renderings(tmp_path / 'exact'), _renderings(tmp_path / 'amp')
    assert 10 * np.log10(255 ** 2 / np.mean((exact - amp) ** 2)) > 40
    assert not np.array_equal(exact, amp)  # it did run in bfloat16
    assert 'amp: bf16' in (tmp_path / 'amp' / 'params.txt').read_text()

    fit = ('--init_depth_std', '0', '--save_out_first_n', '0', '--fit_observation_idcs', '0')
    fitted = {}
    for name, extra in {'none': ('--fit_steps', '1', '--fit_lr', '0'),
                        'exact': ('--fit_steps', '20', '--fit_lr', '3e-2', '--fit_rays_per_view', '64'),
                        'amp': ('--fit_steps', '20', '--fit_lr', '3e-2', '--fit_rays_per_view', '64',
                                '--amp', 'bf16')}.items():
        fitted[name] = srn_test.main(base_args(trained, tmp_path / f'fit_{name}', *fit, *extra))['fitted_views']['psnr']
    assert fitted['exact'] > fitted['none'] + 0.1
    assert fitted['amp'] - fitted['none'] > 0.5 * (fitted['exact'] - fitted['none'])


@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('clang++') is None,
                    reason='torch.compile on the CPU needs a C++ compiler (g++ or clang++)')
def test_fast_compiles_once_for_every_batch(trained, tmp_path, monkeypatch):
    """--fast (bf16, torch.compile) end to end: fitting, the dataset's last short batch, turntables and an
    interpolation (expanded inputs, shorter batches) take three compilations at most: the fit's forward and
    backward, rendering from the table's codes, and rendering from given codes. Padding every batch to
    --batch_size is what keeps the count. The fit improves the fitted views, and the compiled renderings of
    the fitted codes agree with the eager bf16 path's (the saved codes rendered again with --amp bf16)."""
    import torch._dynamo
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 3)
    monkeypatch.setattr(torch._dynamo.config, 'fail_on_recompile_limit_hit', True)
    common = ('--init_depth_std', '0', '--batch_size', '3', '--fit_observation_idcs', '0')
    fit = ('--fit_steps', '20', '--fit_lr', '3e-2', '--fit_rays_per_view', '64')
    videos = ('--turntable', '4', '--interpolate', '0,1', '--interpolation_frames', '5')  # 8 views in batches of 3
    torch._dynamo.reset()
    try:
        fast = srn_test.main(base_args(trained, tmp_path / 'fast', *common, *fit, *videos, '--fast'))
    finally:
        torch._dynamo.reset()
    assert len(list((tmp_path / 'fast' / 'turntable').glob('*.gif'))) == 2
    assert len(list((tmp_path / 'fast' / 'interpolation').glob('*.gif'))) == 1
    unfitted = srn_test.main(base_args(trained, tmp_path / 'unfitted', *common, '--save_out_first_n', '0',
                                       '--fit_steps', '1', '--fit_lr', '0'))
    assert fast['fitted_views']['psnr'] > unfitted['fitted_views']['psnr'] + 0.1
    again = srn_test.main(base_args(trained, tmp_path / 'again', *common, '--amp', 'bf16', '--checkpoint_path',
                                    str(tmp_path / 'fast' / 'checkpoints')))
    a, b = _renderings(tmp_path / 'again'), _renderings(tmp_path / 'fast')
    assert 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)) > 40
    assert again['all_views']['psnr'] == pytest.approx(fast['all_views']['psnr'], abs=0.05)


def test_orbit_matches_the_cameras():
    """The turntable orbit keeps the cameras' radius and elevation and looks at the origin."""
    rng = np.random.default_rng(1)
    elevation = 0.4
    azimuths = rng.uniform(0, 2 * np.pi, 6)
    positions = 2.0 * np.stack([np.cos(elevation) * np.cos(azimuths), np.cos(elevation) * np.sin(azimuths),
                                np.full(6, np.sin(elevation))], 1)
    poses = np.stack([geometry.look_at(p) for p in positions])
    orbit = srn_test.orbit_poses(poses, 8)
    centres = orbit[:, :3, 3]
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 2.0, atol=1e-9)
    np.testing.assert_allclose(centres[:, 2], 2.0 * np.sin(elevation), atol=1e-9)
    np.testing.assert_allclose(orbit[:, :3, 2], -centres / 2.0, atol=1e-9)  # forward axis points at the origin
    np.testing.assert_allclose(centres[0] / np.linalg.norm(centres[0]), positions[0] / 2.0, atol=1e-9)


def test_shipped_test_configs_parse():
    configs = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'test_configs', '*.yml')))
    assert configs, 'test_configs/ is empty'
    for config in configs:
        opt = srn_test.get_parser().parse_args(['-c', config])
        assert opt.data_root and opt.checkpoint_path, config
        srn_test.parse_index_list(opt.fit_observation_idcs, config)


def test_kernels_triton_where_they_cannot_run_is_a_clear_error(trained, tmp_path):
    """--kernels triton needs bf16 and a CUDA device with Triton: refused before anything is written."""
    with pytest.raises(ValueError, match=r'--kernels triton: .*mixed-precision path; add --fast or --amp bf16'):
        srn_test.main(base_args(trained, tmp_path / 'a', '--kernels', 'triton'))
    with pytest.raises(ValueError, match=r'--kernels triton: the fused kernels need Triton and a CUDA device of '
                                         r'compute capability 8\.0 or later \(device cpu'):
        srn_test.main(base_args(trained, tmp_path / 'b', '--kernels', 'triton', '--amp', 'bf16'))
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
