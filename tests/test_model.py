"""The SRN model against the reference fixtures, plus its invariants (SPEC sections 1-3)."""
import json
import pathlib
import re

import pytest
import torch

import custom_layers
import geometry
import srns
import util

REPO = pathlib.Path(__file__).resolve().parent.parent
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def exact_float32():
    """The exact path's numerics (what train.py without --fast and test.py set): no TF32, also not in cuDNN."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    util.set_tf32(False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def build_from_config(config, **overrides):
    kwargs = dict(num_instances=config.get('num_instances', 1), latent_dim=config.get('latent_dim', 256),
                  tracing_steps=config.get('tracing_steps', 10), has_params=config.get('has_params', False),
                  fit_single_srn=config.get('fit_single_srn', False),
                  use_unet_renderer=config.get('use_unet_renderer', False))
    kwargs.update(overrides)
    return srns.SRNsModel(**kwargs)


@pytest.mark.parametrize('configuration', ['cars_default', 'single_scene', 'unet_renderer'])
def test_state_dict_matches_reference_manifest(reference_fixtures, configuration):
    manifest = json.loads((reference_fixtures / 'state_dict_manifest.json').read_text())[configuration]
    model = build_from_config(manifest['config'])
    ours = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    assert ours == [(key, list(shape)) for key, shape in manifest['state_dict'].items()]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['hypernet', 'single_scene'])
def test_forward_losses_and_gradients_match_reference(reference_fixtures, name, device, record_property):
    # The measured errors go to the JUnit XML report (pytest --junitxml=...) as properties.
    golden = torch.load(reference_fixtures / name / 'golden.pt', map_location='cpu', weights_only=True)
    config = golden['config']
    model = build_from_config(config, init_depth_std=config['init_depth_std'])
    util.load_checkpoint(reference_fixtures / name / 'checkpoint.pth', model)
    model.train(config['train_mode']).to(device)
    model_input = {key: value.to(device) for key, value in golden['input'].items()}

    rgb, depth = model(model_input)
    assert rgb.shape == golden['rgb'].shape and depth.shape == golden['depth'].shape
    rgb_error, depth_error = (rgb.cpu() - golden['rgb']).abs().max(), (depth.cpu() - golden['depth']).abs().max()
    record_property('rgb_max_abs_error', f"{rgb_error:.3g}")
    record_property('depth_max_abs_error', f"{depth_error:.3g}")
    assert rgb_error <= 1e-4
    assert depth_error <= 1e-4

    weights = config['loss_weights']
    losses = srns.compute_losses(model, model_input, (rgb, depth), golden['target_rgb'].to(device),
                                 l1_weight=weights['img'], reg_weight=weights['depth'], kl_weight=weights['latent'])
    loss_errors = {key: abs(losses[key].item() / float(golden[key]) - 1) if float(golden[key]) else
                   abs(losses[key].item()) for key in ('image_loss', 'depth_reg_loss', 'latent_loss', 'total_loss')}
    record_property('loss_max_rel_error', f"{max(loss_errors.values()):.3g}")
    for key in ('image_loss', 'depth_reg_loss', 'latent_loss', 'total_loss'):
        expected = float(golden[key])
        assert losses[key].item() == pytest.approx(expected, rel=1e-4, abs=1e-12), key

    losses['total_loss'].backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert set(grads) == set(golden['grad_norms'])
    grad_errors = [abs(grads[key].norm().item() / float(value) - 1)
                   for key, value in golden['grad_norms'].items() if float(value)]
    record_property('grad_norm_max_rel_error', f"{max(grad_errors):.3g}")
    for param_name, expected in golden['grad_norms'].items():
        got = grads[param_name].norm().item()
        assert got == pytest.approx(float(expected), rel=1e-3, abs=1e-8), param_name


@pytest.mark.parametrize('device', DEVICES)
def test_unet_renderer_matches_reference(reference_fixtures, device, record_property):
    fixture = torch.load(reference_fixtures / 'unet_renderer' / 'unet_renderer.pt', map_location='cpu',
                         weights_only=True)
    config = fixture['config']
    renderer = custom_layers.DeepvoxelsRenderer(config['nf0'], config['in_channels'], config['input_resolution'],
                                                config['img_sidelength'])
    renderer.load_state_dict(fixture['state_dict'], strict=True)
    renderer.eval().to(device)
    with torch.no_grad():
        output = renderer(fixture['input'].to(device))
    error = (output.cpu() - fixture['output']).abs().max()
    record_property('max_abs_error', f"{error:.3g}")
    assert error <= 1e-4


def test_reference_checkpoint_with_optimizer_loads(reference_fixtures):
    model = srns.SRNsModel(1, 16, 10, fit_single_srn=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
    util.load_checkpoint(reference_fixtures / 'single_scene' / 'checkpoint.pth', model, optimizer)
    assert len(optimizer.state) == len(list(model.parameters()))


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = srns.SRNsModel(num_instances=50, latent_dim=32, tracing_steps=3)
    lstm = model.ray_marcher.lstm
    for bias in (lstm.bias_ih, lstm.bias_hh):
        assert torch.all(bias[16:32] == 1.)  # forget gate
        assert bias[:16].abs().max() <= 0.25 and bias[32:].abs().max() <= 0.25  # default uniform +-1/sqrt(16)
    assert model.latent_codes.weight.std().item() == pytest.approx(0.01, rel=0.2)
    last = model.hyper_phi.layers[1].hyper_linear.hypo_params.net[-1].weight  # (256*256+256, 32)
    assert last.std().item() == pytest.approx(0.1 * (2. / 32) ** 0.5, rel=0.05)
    first = model.pixel_generator.net[0].net[0].weight  # Kaiming normal, fan_in 256
    assert first.std().item() == pytest.approx((2. / 256) ** 0.5, rel=0.05)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = srns.SRNsModel(4, 8, 2).state_dict()
    torch.manual_seed(3)
    b = srns.SRNsModel(4, 8, 2).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def tiny_batch(batch_size=2, side=6, num_instances=3):
    torch.manual_seed(1)
    uv = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing='xy'), -1).reshape(-1, 2)
    pose = torch.eye(4).repeat(batch_size, 1, 1)
    pose[:, 2, 3] = -2.  # camera at z = -2 looking along +z at the origin
    intrinsics = torch.tensor([[5., 0., side / 2, 0.], [0., 5., side / 2, 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]])
    return {'instance_idx': torch.arange(batch_size).float() % num_instances, 'pose': pose,
            'intrinsics': intrinsics.repeat(batch_size, 1, 1), 'uv': uv.repeat(batch_size, 1, 1),
            'param': torch.randn(batch_size, 8)}


def test_freeze_networks_trains_only_latent_codes():
    model = srns.SRNsModel(3, 8, 2, freeze_networks=True)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable == ['latent_codes.weight']
    batch = tiny_batch()
    losses = srns.compute_losses(model, batch, model(batch), torch.zeros(2, 36, 3))
    losses['total_loss'].backward()
    assert model.latent_codes.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='fit_single_srn'):
        srns.SRNsModel(1, 8, 2, fit_single_srn=True, freeze_networks=True)


def test_has_params_uses_batch_params_and_explicit_z():
    model = srns.SRNsModel(3, 8, 2, has_params=True, init_depth_std=0.)
    batch = tiny_batch()
    rgb_param, _ = model(batch)
    rgb_z, _ = model(batch, z=batch['param'])
    rgb_other, _ = model(batch, z=torch.zeros_like(batch['param']))
    assert torch.allclose(rgb_param, rgb_z)
    assert not torch.allclose(rgb_param, rgb_other)
    losses = srns.compute_losses(model, batch, (rgb_param, _), torch.zeros_like(rgb_param))
    assert losses['latent_loss'].item() == pytest.approx(batch['param'].pow(2).mean().item())


def test_explicit_z_overrides_the_latent_table():
    model = srns.SRNsModel(3, 8, 2, init_depth_std=0.)
    batch = tiny_batch()
    codes = model.latent_codes(batch['instance_idx'].long())
    assert torch.allclose(model(batch)[0], model(batch, z=codes)[0])
    assert not torch.allclose(model(batch)[0], model(batch, z=codes + 1.)[0])


def test_initial_depth_noise_is_settable():
    batch = tiny_batch()
    model = srns.SRNsModel(3, 8, 2, init_depth_std=0.).eval()
    with torch.no_grad():
        assert torch.equal(model(batch)[1], model(batch)[1])
    model.ray_marcher.init_depth_std = 5e-4
    with torch.no_grad():
        assert not torch.equal(model(batch)[1], model(batch)[1])


def test_hidden_state_gradient_is_clamped():
    marcher = custom_layers.Raymarcher(4, 1, init_depth_std=0.)
    weights = torch.zeros(1, 4, 3, requires_grad=True)

    def phi(x):
        return x.matmul(weights.transpose(-1, -2))

    uv = torch.zeros(1, 1, 2)
    pose, intrinsics = torch.eye(4)[None], torch.eye(4)[None]
    hidden = []
    original = marcher.lstm.forward

    def recording_forward(*args):
        state = original(*args)
        state[0].retain_grad()
        hidden.append(state[0])
        return state
    marcher.lstm.forward = recording_forward
    with torch.no_grad():
        marcher.out_layer.weight.fill_(1000.)
    _, depth = marcher(pose, phi, uv, intrinsics)
    depth.sum().backward()
    assert hidden[0].grad.abs().max() <= 10.  # retain_grad sees the clamped gradient
    assert marcher.lstm.weight_ih.grad is not None


@pytest.mark.parametrize('grad_steps', [0, 1, 2, 5])
def test_truncated_march_backpropagates_through_the_last_steps_only(grad_steps):
    """Known answer: with a phi that ignores the points, the step-length bias moves the final points by
    ray_dir per differentiable step, so d(sum of points)/d(bias) = (differentiable steps) x sum of ray_dirs."""
    batch = tiny_batch()
    marcher = custom_layers.Raymarcher(4, 5, init_depth_std=0., grad_steps=grad_steps)

    def constant_phi(x):
        return x.new_ones(*x.shape[:-1], 4)

    points, _ = marcher(batch['pose'], constant_phi, batch['uv'].float(), batch['intrinsics'])
    points.sum().backward()
    ray_dirs = geometry.get_ray_directions(batch['uv'].float(), batch['pose'], batch['intrinsics'])
    steps_with_grad = grad_steps or 5
    torch.testing.assert_close(marcher.out_layer.bias.grad, steps_with_grad * ray_dirs.sum().reshape(1))


def test_truncated_march_keeps_the_forward_and_stays_off_under_no_grad():
    batch = tiny_batch()
    torch.manual_seed(0)
    full = srns.SRNsModel(3, 8, 4, init_depth_std=0.)
    truncated = srns.SRNsModel(3, 8, 4, init_depth_std=0., tracing_grad_steps=1)
    truncated.load_state_dict(full.state_dict())
    all_steps = srns.SRNsModel(3, 8, 4, init_depth_std=0., tracing_grad_steps=4)
    all_steps.load_state_dict(full.state_dict())

    def gradients(model):
        rgb, depth = model(batch)
        (rgb.square().mean() + depth.mean()).backward()
        return rgb.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    rgb_full, grads_full = gradients(full)
    rgb_truncated, grads_truncated = gradients(truncated)
    rgb_all, grads_all = gradients(all_steps)
    assert torch.equal(rgb_full, rgb_truncated) and torch.equal(rgb_full, rgb_all)  # the same forward
    assert grads_all.keys() == grads_full.keys() == grads_truncated.keys()
    for name in grads_full:  # grad_steps = tracing_steps is the full backward
        torch.testing.assert_close(grads_all[name], grads_full[name], msg=name)
    assert not torch.allclose(grads_truncated['ray_marcher.lstm.weight_ih'], grads_full['ray_marcher.lstm.weight_ih'])
    assert grads_truncated['ray_marcher.lstm.weight_ih'].abs().sum() > 0  # the last step still trains the LSTM
    with torch.no_grad():
        assert not truncated(batch)[0].requires_grad  # the last steps do not turn autograd back on

    many_rays = tiny_batch(side=32)  # activations, not the hypernetwork's weights, dominate what is saved

    def saved_bytes(model):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(many_rays)
        return total[0]
    # The activations kept for the backward: what a march of one step keeps, much less than four steps keep
    one_step = srns.SRNsModel(3, 8, 1, init_depth_std=0.)
    one_step.load_state_dict(full.state_dict())
    assert saved_bytes(truncated) == saved_bytes(one_step) < 0.6 * saved_bytes(full)
    with pytest.raises(ValueError, match='grad_steps must be >= 0'):
        custom_layers.Raymarcher(4, 2, grad_steps=-1)


def test_trace_holds_every_step():
    model = srns.SRNsModel(3, 8, 4, init_depth_std=0.)
    rgb, depth, trace = model(tiny_batch(), return_trace=True)
    assert len(trace) == 5 and torch.equal(trace[-1], depth)
    assert torch.allclose(trace[0], torch.full_like(depth, 0.05))


def test_unet_model_rejects_other_sizes():
    model = srns.SRNsModel(2, 8, 1, use_unet_renderer=True)
    with pytest.raises(ValueError, match='128x128'):
        model(tiny_batch())


def test_psnr_ssim_known_answers():
    target = torch.zeros(1, 64, 3)
    prediction = target + 0.2  # 0.1 in [0, 1] units
    psnr, ssim = srns.psnr_ssim(prediction, target)
    assert psnr[0] == pytest.approx(20.0, abs=1e-6)
    assert srns.psnr_ssim(target, target)[1][0] == pytest.approx(1.0)
    clipped_psnr, _ = srns.psnr_ssim(torch.full((1, 64, 3), 3.), torch.ones(1, 64, 3))
    assert clipped_psnr[0] == float('inf')  # prediction clipped to the target's value


def test_comparison_images_layout():
    model = srns.SRNsModel(3, 8, 2, init_depth_std=0.)
    batch = tiny_batch(side=6)
    rgb, depth = model(batch)
    target = torch.rand(2, 36, 3)
    images = srns.comparison_images(batch, (rgb, depth), target)
    assert images.shape == (2, 3, 6, 18)
    assert torch.allclose(images[..., 12:], target.reshape(2, 6, 6, 3).permute(0, 3, 1, 2))
    assert torch.allclose(images[..., 6:12], rgb.detach().reshape(2, 6, 6, 3).permute(0, 3, 1, 2))
    assert torch.all(images[:, :, 0, :6] == 1.)  # normals padded with 1


def test_library_code_has_no_cuda_calls_or_prints_in_forward():
    for module in ('srns.py', 'hyperlayers.py', 'custom_layers.py', 'geometry.py', 'util.py'):
        source = (REPO / module).read_text()
        assert '.cuda()' not in source, module
        assert not re.search(r'^\s*print\(', source, re.M), module
