"""The fused kernels of kernels.py against the PyTorch path they replace (hyperlayers.HypoNetwork).

They run on a CUDA GPU, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` with Triton installed,
slow but exact); elsewhere (CPU builds of PyTorch come without Triton) they skip, and the fallback is checked:
asking for the kernels where they cannot run must give the PyTorch path's result.

Every autotuning candidate of each kernel also runs alone against the kernel's definition in PyTorch (float32),
so whatever the autotuner picks on a GPU is covered; the autotuner itself stays off here (tests/conftest.py).

Tolerances:
- float32 kernels (IEEE products) against the float32 PyTorch path: outputs and every gradient within 1e-5
  relative L2 error, i.e. the same function up to summation order.
- mixed precision: the kernels' relative error against float32 stays within 1.5x the PyTorch mixed-precision
  path's own error (+1e-3), for phi's output and for each gradient the kernels compute (points, codes, and each of
  phi's weights and biases); the hypernetwork's own parameter gradients, which follow from those, count as one
  vector. Singly, its small LayerNorm parameters (16 values) carry 5-20% bfloat16 error in either path, and which
  path is worse on one of them is chance: a CPU emulation of these kernels with every activation and gradient
  they store kept in float32 (more accurate than either path) still showed up to 2.3x the PyTorch path's error on
  single ones, while phi's weight gradients agreed with it to +-5% (benchmarks/NOTES.md). bfloat16 on the GPU;
  float16 in the interpreter, whose bfloat16 products are wrong.
"""
import hashlib
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import custom_layers
import hyperlayers
import kernels
import srns
import util

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
HALF = torch.bfloat16 if DEVICE == 'cuda' else torch.float16
requires_kernels = pytest.mark.skipif(
    not kernels.available(), reason="the fused kernels need Triton and a CUDA GPU (or TRITON_INTERPRET=1)")


def relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def phi_outputs_and_grads(hyper, z, x, grad_v, fused, amp_dtype=None, direct=False):
    """phi(x) for codes z and the gradients of <phi(x), grad_v>, by name: ``v``; ``x`` and ``z``; ``phi.<i>.weight``
    and ``phi.<i>.bias``, those of phi's layers (what the kernels compute); ``hyper.<name>``, the hypernetwork's."""
    hyper.fused_kernels = fused
    hyper.zero_grad(set_to_none=True)
    z, x = z.detach().requires_grad_(), x.detach().requires_grad_()
    with util.autocast(x.device.type, amp_dtype):
        phi = hyper(z)
        for weights, biases, _ in phi.layers:
            weights.retain_grad(), biases.retain_grad()
        v = kernels.phi(x, phi.layers) if direct else phi(x)
    (v.float() * grad_v).sum().backward()
    values = {'v': v.detach(), 'x': x.grad, 'z': z.grad}
    for i, (weights, biases, _) in enumerate(phi.layers):
        values[f'phi.{i}.weight'], values[f'phi.{i}.bias'] = weights.grad, biases.grad
    values.update({f'hyper.{name}': param.grad for name, param in hyper.named_parameters()})
    return values


def make_phi(channels=kernels.MIN_CHANNELS, outermost_linear=False, batch_size=3, num_points=300, seed=0):
    """A hypernetwork for phi (3 -> C -> C -> C -> C, as SRNsModel's), codes, points and an output gradient.

    C defaults to the narrowest the kernels take: 256 on the GPU, 128 in the (slow) interpreter."""
    torch.manual_seed(seed)
    hyper = hyperlayers.HyperFC(hyper_in_ch=16, hyper_num_hidden_layers=1, hyper_hidden_ch=16, hidden_ch=channels,
                                num_hidden_layers=2, in_ch=3, out_ch=channels,
                                outermost_linear=outermost_linear).to(DEVICE)
    z = torch.randn(batch_size, 16, device=DEVICE)
    x = torch.randn(batch_size, num_points, 3, device=DEVICE)
    grad_v = torch.randn(batch_size, num_points, channels, device=DEVICE)
    return hyper, z, x, grad_v


@requires_kernels
@pytest.mark.parametrize('outermost_linear', [False, True])
def test_float32_kernels_equal_the_pytorch_path(outermost_linear):
    hyper, z, x, grad_v = make_phi(outermost_linear=outermost_linear, num_points=300 if DEVICE == 'cuda' else 70)
    util.set_tf32(False)
    exact = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False)
    fused = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False, direct=True)
    assert fused.keys() == exact.keys()
    for name, reference in exact.items():
        assert relative_error(fused[name], reference) < 1e-5, name


@requires_kernels
def test_mixed_precision_kernels_are_as_close_to_float32_as_pytorch():
    hyper, z, x, grad_v = make_phi(num_points=2000 if DEVICE == 'cuda' else 70)
    util.set_tf32(False)
    exact = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False)
    pytorch = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False, amp_dtype=HALF)
    fused = phi_outputs_and_grads(hyper, z, x, grad_v, fused=True, amp_dtype=HALF)
    assert fused['v'].dtype == HALF

    def compared(values):  # what the kernels compute, one by one; the hypernetwork's gradients as one vector
        own = {name: value for name, value in values.items() if not name.startswith('hyper.')}
        hyper_grads = [value.float().flatten() for name, value in values.items() if name.startswith('hyper.')]
        return {**own, 'hyper': torch.cat(hyper_grads)}
    exact, pytorch, fused = compared(exact), compared(pytorch), compared(fused)
    for name, reference in exact.items():
        allowed = 1.5 * relative_error(pytorch[name], reference) + 1e-3
        assert relative_error(fused[name], reference) <= allowed, name


@requires_kernels
def test_odd_sizes_and_a_single_point():
    """Rows that do not fill a tile (masking), one observation, one point; and 1100 rows (the weight gradients in
    three runs of 384 rows, kernels._weight_splits, the last one short)."""
    for batch_size, num_points in ((1, 1), (2, 65), (1, 129), (2, 1100)):
        hyper, z, x, grad_v = make_phi(batch_size=batch_size, num_points=num_points)
        util.set_tf32(False)
        exact = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False)
        fused = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False, direct=True)
        for name, reference in exact.items():
            assert relative_error(fused[name], reference) < 1e-5, (name, batch_size, num_points)


@requires_kernels
def test_layer_norms_epsilon_reaches_the_forward_and_the_backward():
    """phi with an epsilon other than LayerNorm's default (1e-5): outputs and every gradient equal a float32 PyTorch
    phi with the same epsilon."""
    hyper, z, x, grad_v = make_phi(num_points=300 if DEVICE == 'cuda' else 70)
    util.set_tf32(False)
    layers = [(w.detach().requires_grad_(), b.detach().requires_grad_(), norm) for w, b, norm in hyper(z).layers]
    eps = 0.1

    def reference(points):  # HypoNetwork in float32, with LayerNorm's epsilon set
        for weights, biases, normalize in layers:
            points = points @ weights.transpose(1, 2) + biases
            points = F.relu(F.layer_norm(points, points.shape[-1:], eps=eps)) if normalize else points
        return points
    values = []
    for phi in (reference, lambda points: kernels.phi(points, layers, eps=eps)):
        points = x.detach().requires_grad_()
        v = phi(points)
        grads = torch.autograd.grad((v * grad_v).sum(), [points, *[t for w, b, _ in layers for t in (w, b)]])
        values.append([v, *grads])
    for i, (fused, expected) in enumerate(zip(values[1], values[0])):
        assert relative_error(fused, expected) < 1e-5, i


@requires_kernels
@pytest.mark.parametrize('outermost_linear', [False, True])
def test_without_gradients_phi_is_the_same(outermost_linear):
    """Under no_grad the kernels store phi's output alone (no xhat or 1/std for a backward): same values."""
    hyper, z, x, _ = make_phi(outermost_linear=outermost_linear, num_points=300 if DEVICE == 'cuda' else 70)
    with torch.autocast(DEVICE, dtype=HALF):
        layers = hyper(z).layers
        with torch.no_grad():
            without = kernels.phi(x, layers)
        with_grad = kernels.phi(x.requires_grad_(), layers)
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(without, with_grad.detach())


@requires_kernels
@pytest.mark.parametrize('split_rows', [64, 128, None])
def test_weight_gradients_summed_over_splits_of_the_rows(split_rows):
    """dW = dpre^T relu(x) and db = sum of dpre, computed over runs of rows (the last one short) and summed, equal
    the products over all rows (None: kernels._weight_splits, one run for these 300 rows)."""
    torch.manual_seed(0)
    dpre, x = torch.randn(2, 2, 300, kernels.MIN_CHANNELS, device=DEVICE).unbind(0)
    util.set_tf32(False)
    dw, db = kernels._weight_gradients(dpre, x, torch.float32, kernels._rows_key(300), split_rows)
    assert relative_error(dw, dpre.transpose(1, 2) @ x.clamp_min(0)) < 1e-5
    assert relative_error(db, dpre.sum(1)) < 1e-5


@requires_kernels
def test_phi_with_its_weight_gradients_split_over_rows(monkeypatch):
    monkeypatch.setattr(kernels, 'WEIGHT_ROWS', 64)
    hyper, z, x, grad_v = make_phi(num_points=300 if DEVICE == 'cuda' else 70)
    util.set_tf32(False)
    exact = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False)
    fused = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False, direct=True)
    for name, reference in exact.items():
        assert relative_error(fused[name], reference) < 1e-5, name


@requires_kernels
@pytest.mark.parametrize('grad', [True, False])
def test_phis_operators_carry_the_kernels_fingerprint(grad, monkeypatch):
    """torch.compile caches compiled graphs on disk by what the graph holds, in which phi's operators are calls by
    name with their arguments: each call carries kernels.SOURCE_KEY, a hash of kernels.py, so that a graph compiled
    with another kernels.py is not taken from the cache (it was: benchmarks/NOTES.md, round 10)."""
    hyper, z, x, _ = make_phi(num_points=20)
    layers = [(w.detach().requires_grad_(grad), b.detach(), norm) for w, b, norm in hyper(z).layers]
    name = 'phi_forward' if grad else 'phi_inference'
    operator, calls = getattr(torch.ops.srn, name), []

    def recorded(*args):
        calls.append(args)
        return operator(*args)
    monkeypatch.setattr(torch.ops.srn, name, recorded)
    kernels.phi(x, layers)
    assert len(calls) == 1 and calls[0][-1] == kernels.SOURCE_KEY
    assert kernels.SOURCE_KEY == hashlib.sha256(pathlib.Path(kernels.__file__).read_bytes()).hexdigest()[:16]


def make_pixel_generator(channels=kernels.MIN_CHANNELS, outermost_linear=True, batch_size=2, num_points=45, seed=0):
    """A pixel generator (custom_layers.FCBlock C -> C -> C -> C -> 3, as SRNsModel's but shallower; LayerNorm's scale
    and shift drawn away from 1 and 0, where training takes them), its input (phi's output: nonnegative) and an
    output gradient. Without ``outermost_linear`` the last layer is another FCLayer C -> C."""
    torch.manual_seed(seed)
    out_features = 3 if outermost_linear else channels
    block = custom_layers.FCBlock(hidden_ch=channels, num_hidden_layers=2, in_features=channels,
                                  out_features=out_features, outermost_linear=outermost_linear).to(DEVICE)
    with torch.no_grad():
        for layer in block.net:
            if isinstance(layer, custom_layers.FCLayer):
                layer.net[1].weight.uniform_(0.5, 1.5), layer.net[1].bias.uniform_(-0.3, 0.3)
    v = torch.randn(batch_size, num_points, channels, device=DEVICE).clamp_min(0)
    grad_out = torch.randn(batch_size, num_points, out_features, device=DEVICE)
    return block, v, grad_out


def pixel_generator_outputs_and_grads(block, v, grad_out, fused, amp_dtype=None, direct=False):
    """The block's output for v and the gradients of <output, grad_out>, by name: ``out``, ``v`` and the block's
    parameters'. ``direct``: the FCLayers on kernels.fc_layers whatever the switch (float32 too), the last layer
    on PyTorch."""
    block.fused_kernels = fused
    block.zero_grad(set_to_none=True)
    v = v.detach().requires_grad_()
    with util.autocast(v.device.type, amp_dtype):
        if direct:
            layers = [layer.kernel_parameters() for layer in block.net[:-1]]
            out = block.net[-1](kernels.fc_layers(v, layers))
        else:
            out = block(v)
    (out.float() * grad_out).sum().backward()
    return {'out': out.detach(), 'v': v.grad, **{name: p.grad for name, p in block.named_parameters()}}


@requires_kernels
@pytest.mark.parametrize('batch_size,num_points', [(2, 45), (1, 1), (1, 129), (2, 1100)])
def test_pixel_generator_kernels_in_float32_equal_the_pytorch_path(batch_size, num_points):
    """custom_layers.FCBlock's FCLayers (LayerNorm with scale and shift) on kernels.fc_layers, float32: the output
    and every gradient equal the PyTorch layers' within 1e-5. Rows that do not fill a tile, a single row, and 2200
    rows (the weight gradients in five runs of rows, kernels._weight_splits)."""
    block, v, grad_out = make_pixel_generator(batch_size=batch_size, num_points=num_points)
    util.set_tf32(False)
    exact = pixel_generator_outputs_and_grads(block, v, grad_out, fused=False)
    fused = pixel_generator_outputs_and_grads(block, v, grad_out, fused=False, direct=True)
    assert fused.keys() == exact.keys() and len(exact) == 2 + 4 * 3 + 2
    for name, reference in exact.items():
        assert relative_error(fused[name], reference) < 1e-5, name


@requires_kernels
@pytest.mark.parametrize('outermost_linear', [True, False])
def test_mixed_precision_pixel_generator_kernels_are_as_close_to_float32_as_pytorch(outermost_linear):
    """The switch (FCBlock.fused_kernels) under mixed precision: the output and each gradient within 1.5 times the
    PyTorch mixed-precision path's own error against float32 (+1e-3), as phi's kernels. Without a linear last
    layer every layer is on the kernels."""
    block, v, grad_out = make_pixel_generator(outermost_linear=outermost_linear,
                                              num_points=2000 if DEVICE == 'cuda' else 45)
    util.set_tf32(False)
    exact = pixel_generator_outputs_and_grads(block, v, grad_out, fused=False)
    pytorch = pixel_generator_outputs_and_grads(block, v, grad_out, fused=False, amp_dtype=HALF)
    fused = pixel_generator_outputs_and_grads(block, v, grad_out, fused=True, amp_dtype=HALF)
    assert fused['out'].dtype == HALF
    for name, reference in exact.items():
        allowed = 1.5 * relative_error(pytorch[name], reference) + 1e-3
        assert relative_error(fused[name], reference) <= allowed, (name, relative_error(fused[name], reference),
                                                                   allowed)
    assert not torch.equal(fused['out'], pytorch['out'])  # the switch did choose the kernels


@pytest.mark.parametrize('in_features', [16, 12])
def test_which_pixel_generator_layers_the_switch_sends_to_the_kernels(monkeypatch, in_features):
    """FCBlock.fused_kernels: under mixed precision with gradients, the leading FCLayers C -> C go to
    kernels.fc_layers and the rest to PyTorch; without gradients, in float32, switched off, or with a first layer
    that is not C -> C, all of them stay on PyTorch. The kernels are stood in for, so this runs anywhere."""
    calls = []

    def stand_in(x, layers, eps=1e-5):
        calls.append(len(layers))
        return x.to(torch.bfloat16)
    monkeypatch.setattr(kernels, 'supports_fc', lambda x, layers, eps: True)
    monkeypatch.setattr(kernels, 'fc_layers', stand_in)
    torch.manual_seed(0)
    block = custom_layers.FCBlock(hidden_ch=16, num_hidden_layers=2, in_features=in_features, out_features=3,
                                  outermost_linear=True)
    x = torch.randn(2, 5, in_features)
    square = 3 if in_features == 16 else 0
    for fused, grad, amp, expected in ((True, True, True, [square] if square else []), (True, False, True, []),
                                       (True, True, False, []), (False, True, True, [])):
        calls.clear()
        block.fused_kernels = fused
        with torch.set_grad_enabled(grad), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            out = block(x)
        assert calls == expected and out.shape == (2, 5, 3), (fused, grad, amp)


def test_supports_fc_only_square_layers():
    """kernels.supports_fc: FCLayers C -> C (C a power of two the kernels take) with one epsilon, on a device they
    serve, and fewer than 2^31 values."""
    width = kernels.MIN_CHANNELS
    x = torch.randn(2, 5, width, device=DEVICE)

    def layers(shapes):
        return [(torch.randn(out, inp, device=DEVICE), *torch.randn(3, out, device=DEVICE)) for inp, out in shapes]
    good = layers([(width, width)] * 2)
    assert kernels.supports_fc(x, good, [1e-5, 1e-5]) == kernels.available()
    assert not kernels.supports_fc(x, good, [1e-5, 1e-3])
    assert not kernels.supports_fc(x, layers([(width, width), (width, 3)]), [1e-5, 1e-5])
    assert not kernels.supports_fc(x, [], [])
    assert not kernels.supports_fc(torch.randn(2, 5, 96, device=DEVICE), layers([(96, 96)]), [1e-5])
    huge = torch.empty(2 ** 31 // width, width, device='meta')
    assert not kernels.supports_fc(huge, good, [1e-5, 1e-5])


@requires_kernels
def test_the_pixel_generators_operator_carries_the_kernels_fingerprint(monkeypatch):
    """As phi's operators: the call carries kernels.SOURCE_KEY."""
    block, v, _ = make_pixel_generator(num_points=20)
    operator, calls = torch.ops.srn.fc_forward, []

    def recorded(*args):
        calls.append(args)
        return operator(*args)
    monkeypatch.setattr(torch.ops.srn, 'fc_forward', recorded)
    kernels.fc_layers(v, [layer.kernel_parameters() for layer in block.net[:-1]])
    assert len(calls) == 1 and calls[0][-1] == kernels.SOURCE_KEY


@requires_kernels
@pytest.mark.parametrize('pixel_generator', [False, True])
@pytest.mark.parametrize('compiled', [False, True])
def test_srn_training_step_on_the_kernels(compiled, pixel_generator):
    """The whole model, forward and backward, with phi on the kernels (and the pixel generator's layers with
    ``pixel_generator``; under torch.compile too, on a GPU; in the interpreter eagerly, with fewer rays and marching
    steps): rgb, depth and the loss, and the gradients of each of
    the model's parts (latent codes, hypernetwork, ray marcher, pixel generator) as one vector, at most 1.5 times as
    far from float32 as PyTorch's own mixed precision. Per parameter the comparison is chance for the small ones:
    the ray marcher's one-element output bias sums ~40k rounded terms, and over 8 seeds on an H200 the kernels were
    further off than PyTorch for 220 of 576 (seed, tensor) pairs, that bias in 1 of 8."""
    if compiled and DEVICE != 'cuda':
        pytest.skip("torch.compile of the kernels needs a CUDA GPU")
    torch.manual_seed(0)
    util.set_tf32(False)
    model = srns.SRNsModel(num_instances=10, latent_dim=256, tracing_steps=10 if DEVICE == 'cuda' else 3,
                           init_depth_std=0.).to(DEVICE)
    side = 32 if DEVICE == 'cuda' else 8
    uv = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing='xy'), -1).reshape(1, -1, 2)
    pose = torch.eye(4).repeat(4, 1, 1)
    pose[:, 2, 3] = -1.5  # cameras on the -z axis looking at the origin
    focal = 1.25 * side
    intrinsics = torch.tensor([[focal, 0, side / 2, 0], [0, focal, side / 2, 0], [0, 0, 1, 0],
                               [0, 0, 0, 1]]).repeat(4, 1, 1)
    model_input = {'instance_idx': torch.arange(4).float(), 'pose': pose, 'intrinsics': intrinsics,
                   'uv': uv.repeat(4, 1, 1).float()}
    model_input = {k: v.to(DEVICE) for k, v in model_input.items()}
    target = torch.rand(4, side * side, 3, device=DEVICE) * 2 - 1

    def run(fused, amp):
        torch._dynamo.reset()
        model.use_fused_kernels(fused)
        model.pixel_generator.fused_kernels = pixel_generator and fused is True
        forward = torch.compile(model) if compiled and amp else model
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=HALF, enabled=amp):
            rgb, depth = forward(model_input)
            loss = srns.compute_losses(model, model_input, (rgb, depth), target)['total_loss']
        loss.backward()
        parts = {'rgb': rgb, 'depth': depth, 'loss': loss}
        for name, module in model.named_children():
            grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
            if grads:
                parts[name] = torch.cat(grads)
        return parts

    exact, pytorch, fused = run(False, False), run(False, True), run(True, True)
    model.use_fused_kernels(False)
    model.pixel_generator.fused_kernels = False
    assert fused.keys() == exact.keys() and {'latent_codes', 'hyper_phi', 'ray_marcher', 'pixel_generator'} <= set(exact)
    for name, reference in exact.items():
        allowed = 1.5 * relative_error(pytorch[name], reference) + 1e-3
        assert relative_error(fused[name], reference) <= allowed, (name, relative_error(fused[name], reference), allowed)


def test_without_the_kernels_the_switch_falls_back_to_pytorch():
    """On a device the kernels do not serve, asking for them gives the PyTorch path's values."""
    torch.manual_seed(0)
    hyper = hyperlayers.HyperFC(hyper_in_ch=16, hyper_num_hidden_layers=1, hyper_hidden_ch=16, hidden_ch=128,
                                num_hidden_layers=2, in_ch=3, out_ch=128)
    z, x = torch.randn(2, 16), torch.randn(2, 50, 3)
    grad_v = torch.randn(2, 50, 128)
    if kernels.INTERPRET:
        pytest.skip("under TRITON_INTERPRET the kernels serve the CPU")
    assert not kernels.supports(x, hyper(z).layers)
    plain = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False, amp_dtype=torch.bfloat16)
    switched = phi_outputs_and_grads(hyper, z, x, grad_v, fused=True, amp_dtype=torch.bfloat16)
    assert switched.keys() == plain.keys()
    for name, reference in plain.items():
        assert torch.equal(switched[name], reference), name


def test_supports_only_phis_layout():
    """Layouts other than phi's (a linear layer inside, another input width, narrow layers) are not fused."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, device=DEVICE)

    def layers(widths, normalize):
        return [(torch.randn(2, out, inp, device=DEVICE), torch.randn(2, 1, out, device=DEVICE), norm)
                for (inp, out), norm in zip(widths, normalize)]
    width = kernels.MIN_CHANNELS
    good = layers([(3, width), (width, width), (width, width)], [True, True, True])
    assert kernels.supports(x, good) == kernels.available()  # the kernels serve DEVICE wherever they run
    assert not kernels.supports(x, layers([(3, 128), (128, 128), (128, 128)], [True, False, True]))
    assert not kernels.supports(x, layers([(3, 64), (64, 64)], [True, True]))
    assert not kernels.supports(x, layers([(3, 96), (96, 96)], [True, True]))
    if not kernels.INTERPRET:  # 128 columns are below the tiles of the GPU's candidates
        assert not kernels.supports(x, layers([(3, 128), (128, 128)], [True, True]))
    assert not kernels.supports(torch.randn(2, 5, 4, device=DEVICE), layers([(4, 128), (128, 128)], [True, True]))


def cdiv(a, b):
    return -(-a // b)


def candidates(name, channels):
    """Every autotuning candidate of a kernel whose channel tiles fit ``channels`` (all of them on the GPU)."""
    return [config for config in kernels.CANDIDATES[name]
            if max(config.kwargs.get('BLOCK_N', 0), config.kwargs.get('BLOCK_K', 0)) <= channels]


def launch(name, grid, *args, config, **constants):
    """One kernel with one candidate's meta-parameters, without the autotuner."""
    kernel = getattr(kernels, name).fn
    kernel[grid](*args, **constants, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def layer_norm_relu_backward(grad, xhat, rstd, g=None, beta=None):
    """d(pre-LayerNorm) from d(relu(xhat)), for LayerNorm without affine parameters; with them (g, beta), from
    d(relu(xhat * g + beta))."""
    if g is None:
        grad = grad * (xhat > 0)
    else:
        grad = grad * (xhat * g + beta > 0) * g
    return rstd[..., None] * (grad - grad.mean(-1, keepdim=True) - xhat * (grad * xhat).mean(-1, keepdim=True))


@requires_kernels
@pytest.mark.parametrize('name', ['_input_layer_fwd', '_hidden_layer_fwd', '_hidden_layer_bwd',
                                  '_hidden_layer_bwd_weights', '_hidden_layer_bwd_weights_f32', '_input_layer_bwd'])
def test_every_autotuning_candidate_computes_its_kernels_function(name):
    """Each kernel with each of its candidates, in float32 (IEEE products), against its definition in PyTorch,
    on 150 rows (a last tile that is not full) of 2 observations: what any tuning may pick computes the same,
    whatever candidate the autotuner takes on a GPU (the other tests see only the ones it picked). The weight
    gradient's candidates for 2-byte operands (some need more shared memory in float32 than a GPU has) run on
    operands rounded to bfloat16 (float16 in the interpreter), against float32 products of the rounded values."""
    torch.manual_seed(0)
    util.set_tf32(False)
    B, N, C, eps = 2, 150, kernels.MIN_CHANNELS, 1e-5
    configs = candidates(name, C)
    assert configs

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE)
    x, w0, b0 = rand(B, N, 3), rand(B, C, 3), rand(B, C)
    act, grad, w, b = rand(B, N, C), rand(B, N, C), rand(B, C, C) / 16, rand(B, C)
    rstd = torch.rand(B, N, device=DEVICE) + 0.5
    rows = kernels._rows_key(N)

    def layer_norm(pre):
        return F.layer_norm(pre, (C,), eps=eps), 1 / torch.sqrt(pre.var(-1, unbiased=False) + eps)
    w0t = w0.transpose(1, 2).contiguous()  # the kernels take W0 transposed, (B, 3, C)
    pre0 = x @ w0.transpose(1, 2) + b0[:, None]
    xhat0, rstd0 = layer_norm(pre0)
    stats = torch.stack([pre0.mean(-1), rstd0], -1)  # the input layer's row statistics (B, N, 2)
    g, beta = rand(C) / 2 + 1, rand(C) / 2  # a LayerNorm's scale and shift (the pixel generator's layers)
    for config in configs:
        rows_grid = (cdiv(N, config.kwargs.get('BLOCK_M', 1)), B)
        if name == '_input_layer_fwd':
            out, stats_out = torch.empty(B, N, C, device=DEVICE), torch.empty(B, N, 2, device=DEVICE)
            launch(name, rows_grid, x, w0t, b0, stats_out, out, N, rows, eps, C=C, KEEP=True, config=config)
            expected, results = (xhat0, stats), (out, stats_out)
        elif name == '_hidden_layer_fwd':
            expected, results = [], []
            # phi's layers (relu(x) in, relu(xhat) out), a pixel generator's first layer (x in as it is) and later
            # ones (relu(x * g + beta) of the layer below in, relu(xhat * g + beta) out)
            layouts = ((act.clamp_min(0), dict(IN_RELU=True, IN_AFFINE=False), False),
                       (act, dict(IN_RELU=False, IN_AFFINE=False), True),
                       ((act * g + beta).clamp_min(0), dict(IN_RELU=True, IN_AFFINE=True), True))
            for operand, in_flags, affine in layouts:
                out, rstd_out, relu = (torch.empty(B, N, C, device=DEVICE), torch.empty(B, N, device=DEVICE),
                                       torch.empty(B, N, C, device=DEVICE))
                launch(name, rows_grid, act, w, b, out, rstd_out, relu, g, beta, g, beta, N, rows, eps, C=C,
                       NORMALIZE=True, WRITE_RELU=True, KEEP=True, AFFINE=affine, PRECISION='ieee', config=config,
                       **in_flags)
                xhat, rstd_expected = layer_norm(operand @ w.transpose(1, 2) + b[:, None])
                expected += [xhat, rstd_expected, (xhat * g + beta if affine else xhat).clamp_min(0)]
                results += [out, rstd_out, relu]
        elif name == '_hidden_layer_bwd':
            parts = cdiv(N, kernels.PART_M)
            expected, results = [], []
            for above, affine in ((True, False), (False, False), (True, True), (False, True)):
                dpre = torch.empty(B, N, C, device=DEVICE)
                # every share of dg and dbeta must be written: NaN where none is
                dg_part, dbeta_part = torch.full((2, B, parts, C), float('nan'), device=DEVICE)
                launch(name, rows_grid, grad, w, act, rstd, dpre, g, beta, dg_part, dbeta_part, N, rows, C=C,
                       ABOVE=above, AFFINE=affine, PART_M=kernels.PART_M, PRECISION='ieee', config=config)
                d_out = grad @ w if above else grad
                expected.append(layer_norm_relu_backward(d_out, act, rstd, *((g, beta) if affine else ())))
                results.append(dpre)
                if affine:
                    d_y = d_out * (act * g + beta > 0)  # d(xhat * g + beta)
                    expected += [(d_y * act).sum(1), d_y.sum(1)]
                    results += [dg_part.sum(1), dbeta_part.sum(1)]
        elif name.startswith('_hidden_layer_bwd_weights'):
            split = 64
            splits = cdiv(N, split)
            grid = (C // config.kwargs['BLOCK_N'], B * splits)
            dpre, x_in = (grad, act) if name.endswith('_f32') else (grad.to(HALF), act.to(HALF))
            precision = 'ieee' if name.endswith('_f32') else 'tf32'
            expected, results = [], []
            for in_flags in (dict(IN_RELU=True, IN_AFFINE=False), dict(IN_RELU=False, IN_AFFINE=False),
                             dict(IN_RELU=True, IN_AFFINE=True)):
                dw, db = torch.empty(B * splits, C, C, device=DEVICE), torch.empty(B * splits, C, device=DEVICE)
                launch(name, grid, dpre, x_in, dw, db, g, beta, N, rows, split, C=C, PRECISION=precision,
                       config=config, **in_flags)
                operand = x_in.float() * g + beta if in_flags['IN_AFFINE'] else x_in.float()
                if in_flags['IN_AFFINE']:  # rounded to the operands' dtype, as the kernel rounds it
                    operand = operand.to(x_in.dtype).float()
                operand = operand.clamp_min(0) if in_flags['IN_RELU'] else operand
                expected += [dpre.float().transpose(1, 2) @ operand, dpre.float().sum(1)]
                results += [dw.view(B, splits, C, C).sum(1), db.view(B, splits, C).sum(1)]
        else:  # _input_layer_bwd, from the first hidden layer's dpre (grad) and weights (w), and the statistics
            parts = cdiv(N, kernels.INPUT_ROWS)
            dx = torch.empty_like(x)
            dw_part, db_part = torch.empty(B, parts, 3, C, device=DEVICE), torch.empty(B, parts, C, device=DEVICE)
            launch(name, (parts, B), grad, w, stats, x, w0t, b0, dx, dw_part, db_part, N, rows, C=C,
                   ROWS=kernels.INPUT_ROWS, PRECISION='ieee', config=config)
            dpre = layer_norm_relu_backward(grad @ w, xhat0, rstd0)
            expected = dpre @ w0, dpre.transpose(1, 2) @ x, dpre.sum(1)
            results = dx, dw_part.sum(1).transpose(1, 2), db_part.sum(1)
        for i, (value, reference) in enumerate(zip(results, expected)):
            assert relative_error(value, reference) < 1e-5, (config, i)


@pytest.mark.skipif(kernels.triton is None or kernels.INTERPRET or torch.cuda.is_available(),
                    reason="compiles for an H100 without one: needs Triton, and neither the interpreter nor a GPU here")
def test_the_kernels_cost_the_same_when_torch_compile_launches_them():
    """torch.compile types a Python float argument fp64 where Triton's launcher types it fp32: LayerNorm's eps reached
    the kernels as a double under ``--compile``, and made the statistics and the normalised tile double precision
    (``_hidden_layer_fwd`` spilled 56-200 B). The kernels that take eps, compiled for sm_90 with it as fp64, compile,
    spill no registers to local memory (as with fp32) and need the shared memory they need with fp32."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'))
    import kernel_resources
    names = ['_input_layer_fwd', '_hidden_layer_fwd']
    eager, compiled = (kernel_resources.report(90, names, first_only=True, float_type=float_type)
                       for float_type in ('fp32', 'fp64'))
    assert len(eager) == len(compiled) > len(names)
    for launched, by_compile in zip(eager, compiled):
        assert 'error' not in by_compile, by_compile
        assert by_compile['stack'] == launched['stack'] == 0, (launched, by_compile)
        assert by_compile['shared'] == launched['shared'], (launched, by_compile)


@pytest.mark.skipif(kernels.triton is None or kernels.INTERPRET or torch.cuda.is_available(),
                    reason="compiles for an H100 without one: needs Triton, and neither the interpreter nor a GPU here")
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_the_first_candidates_fit_an_h100s_shared_memory(dtype):
    """With autotuning off (the tests' default) each kernel launches its first candidate, in bfloat16 (training) and
    float32 (the checks against the exact path): each needs no more shared memory than an H100 multiprocessor has
    (227 KB). The weight gradient's bfloat16 candidate once needed 256 KB in float32 and failed every float32 test
    on an H100; its float32 launches now have candidates of their own."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'))
    import kernel_resources
    rows = kernel_resources.report(90, first_only=True, dtype=dtype)
    assert {row['kernel'] for row in rows} == {'_input_layer_fwd', '_hidden_layer_fwd', '_hidden_layer_bwd',
                                               '_input_layer_bwd', '_hidden_layer_bwd_weights' +
                                               ('_f32' if dtype == torch.float32 else '')}
    for row in rows:
        assert 'error' not in row and row['shared'] <= kernel_resources.SHARED_LIMIT[90], row


def test_kernels_mode_of_each_choice():
    """--kernels -> the model's switch: render falls back to PyTorch where the kernels cannot run, triton is
    refused there."""
    cpu = torch.device('cpu')
    assert util.fused_kernels_mode('torch', 'bf16', cpu) is False
    assert util.fused_kernels_mode('render', 'bf16', cpu) is False
    assert util.fused_kernels_mode('render', 'none', cpu) is False
    with pytest.raises(ValueError, match='mixed-precision path'):
        util.fused_kernels_mode('triton', 'none', cpu)
    with pytest.raises(ValueError, match=r'need Triton and a CUDA device of compute capability 8\.0 or later '
                                         r'\(device cpu'):
        util.fused_kernels_mode('triton', 'bf16', cpu)
    with pytest.raises(ValueError, match='expected one of torch, render, triton'):
        util.fused_kernels_mode('cuda', 'bf16', cpu)
    if torch.cuda.is_available():
        gpu = torch.device('cuda')
        assert util.fused_kernels_mode('render', 'none', gpu) is False  # float32 never uses the kernels
        assert util.fused_kernels_mode('render', 'bf16', gpu) == ('render' if kernels.available() else False)
        if kernels.available():
            assert util.fused_kernels_mode('triton', 'bf16', gpu) is True
    with pytest.raises(ValueError, match='False, True or .render.'):
        srns.SRNsModel(num_instances=1, latent_dim=8, tracing_steps=2).use_fused_kernels('always')


@pytest.mark.parametrize('capability', [(7, 0), (7, 5), (8, 0), (8, 6), (9, 0)])
def test_the_kernels_run_on_ampere_and_later(monkeypatch, capability):
    """Volta and Turing GPUs (compute capability 7.x) have no bfloat16 matrix instructions, and the kernels compile
    to loops that spill kilobytes a thread there: --kernels render keeps phi on PyTorch layers on them, and --kernels
    triton is refused with the device's capability named. A GPU of each capability is stood in for (and Triton, as
    if installed), so this runs anywhere."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(kernels, '_REGISTERED', True)
    gpu = torch.device('cuda')
    runs = capability >= (8, 0)
    assert kernels.runs_on(gpu) is runs and kernels.available(gpu) is runs and kernels.available() is runs
    assert util.fused_kernels_mode('render', 'bf16', gpu) == ('render' if runs else False)
    if runs:
        assert util.fused_kernels_mode('triton', 'bf16', gpu) is True
    else:
        with pytest.raises(ValueError, match=r'compute capability 8\.0 or later \(device cuda, compute capability '
                                             rf'{capability[0]}\.{capability[1]},'):
            util.fused_kernels_mode('triton', 'bf16', gpu)
    monkeypatch.setattr(kernels, '_REGISTERED', False)  # no Triton: nowhere, whatever the GPU
    assert not kernels.available(gpu) and util.fused_kernels_mode('render', 'bf16', gpu) is False


@pytest.mark.parametrize('fused', [False, True, 'render'])
def test_which_evaluations_the_switch_sends_to_the_kernels(monkeypatch, fused):
    """True: every evaluation under mixed precision; 'render': only those without gradients (no_grad, or nothing
    that requires grad); False: none; float32: none. The kernels are stood in for, so this runs anywhere."""
    calls = []

    def stand_in(x, layers, eps=1e-5):
        calls.append(torch.is_grad_enabled())
        return torch.zeros(*x.shape[:-1], layers[-1][0].shape[-2])

    monkeypatch.setattr(kernels, 'supports', lambda x, layers: True)
    monkeypatch.setattr(kernels, 'phi', stand_in)
    torch.manual_seed(0)
    hyper = hyperlayers.HyperFC(hyper_in_ch=8, hyper_num_hidden_layers=1, hyper_hidden_ch=8, hidden_ch=16,
                                num_hidden_layers=1, in_ch=3, out_ch=16)
    hyper.fused_kernels = fused
    z, x = torch.randn(2, 8), torch.randn(2, 5, 3)
    expected = []
    with torch.autocast('cpu', dtype=torch.bfloat16):
        hyper(z)(x)  # gradients of the hypernetwork's parameters to come
        expected += [True] if fused is True else []
        with torch.no_grad():
            hyper(z)(x)
        expected += [False] if fused else []
        with torch.no_grad():
            phi = hyper(z)
        phi(x)  # grad mode on, but nothing requires grad
        expected += [True] if fused else []
        phi(x.requires_grad_())  # the points' gradient (the ray marcher's)
        expected += [True] if fused is True else []
    with torch.no_grad():
        hyper(z)(x)  # float32
    assert calls == expected


@requires_kernels
def test_render_switch_gives_the_kernels_without_gradients_and_pytorch_with_them():
    """fused='render': without gradients phi(x) is the kernels' no-gradient output bit for bit; with gradients,
    phi's output and every gradient are the PyTorch path's bit for bit."""
    hyper, z, x, grad_v = make_phi(num_points=300 if DEVICE == 'cuda' else 70)
    plain = phi_outputs_and_grads(hyper, z, x, grad_v, fused=False, amp_dtype=HALF)
    render = phi_outputs_and_grads(hyper, z, x, grad_v, fused='render', amp_dtype=HALF)
    assert render.keys() == plain.keys()
    for name, reference in plain.items():
        assert torch.equal(render[name], reference), name
    hyper.fused_kernels = 'render'
    with torch.no_grad(), torch.autocast(DEVICE, dtype=HALF):
        phi = hyper(z)
        rendered, direct, pytorch = phi(x), kernels.phi(x, phi.layers), hyperlayers.HypoNetwork(phi.layers)(x)
    assert torch.equal(rendered, direct)
    assert not torch.equal(rendered, pytorch)  # a different computation, so the switch did choose the kernels
