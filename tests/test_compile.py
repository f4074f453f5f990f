"""torch.compile's on-disk cache holds the whole compiled training step (util.allow_compile_cache).

A second start of ``train.py --fast`` reads the compiled forward and backward back from the cache instead of
tracing the model again; out of the box AOT autograd's cache passed over the SRN step (its autocast regions and
the gradient clamp), and every start traced and lowered it anew.
"""
import shutil

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

import srns
import train
import util
from torch._dynamo.utils import counters

WEIGHTS = dict(l1_weight=200., reg_weight=1e-3, kl_weight=1.)


def batch():
    """Two views of four random rays each, at 8 px, with random target colours."""
    generator = torch.Generator().manual_seed(0)
    model_input = {'instance_idx': torch.tensor([0., 1.]),
                   'pose': torch.eye(4).repeat(2, 1, 1),
                   'intrinsics': torch.tensor([[8., 0., 4.], [0., 8., 4.], [0., 0., 1.]]).repeat(2, 1, 1),
                   'uv': torch.randint(0, 8, (2, 4, 2), generator=generator).float()}
    model_input['pose'][:, 2, 3] = -1.3  # cameras 1.3 in front of the origin, looking along +z
    return model_input, {'rgb': torch.rand(2, 4, 3, generator=generator) * 2 - 1}


def compiled_step():
    """Compile a fresh model (same seed every time) and take one bf16 training step; its total loss."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = srns.SRNsModel(num_instances=2, latent_dim=8, tracing_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model_input, ground_truth = batch()
    losses = train.train_step(util.compile_model(model), optimizer, model_input, ground_truth, WEIGHTS,
                              amp_dtype=torch.bfloat16)
    return float(losses['total_loss'])


@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('clang++') is None,
                    reason='torch.compile on the CPU needs a C++ compiler (g++ or clang++)')
@pytest.mark.skipif(not (hasattr(torch._inductor.config, 'unsafe_marked_cacheable_functions')
                         and hasattr(torch._functorch.config, 'autograd_cache_allow_custom_autograd_functions')),
                    reason=f'PyTorch {torch.__version__} has no settings to mark functions cacheable')
def test_second_compile_reads_the_training_step_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))
    try:
        counters.clear()
        first = compiled_step()
        assert counters['aot_autograd']['autograd_cache_saved'] == 1, dict(counters['aot_autograd'])
        counters.clear()
        second = compiled_step()
        assert counters['aot_autograd']['autograd_cache_hit'] == 1, dict(counters['aot_autograd'])
        assert counters['aot_autograd'].get('autograd_cache_bypass', 0) == 0
        assert second == first
    finally:
        torch._dynamo.reset()
