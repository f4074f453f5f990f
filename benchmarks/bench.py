"""Training and rendering throughput of the cars-size SRN on one GPU: the exact path against the fast path.

For each setting (64 px x batch 64 and 128 px x batch 16, the two stages of the paper's cars schedule; and
the fast recipe's 128 views x 512 random rays at 64 px) and each variant, it times a full training step
(forward, losses, backward, Adam) and a rendering pass without gradients, with CUDA events, as the median
over repeated runs after warm-up, and records the peak GPU memory of training. Prints a table and writes JSON.

    python benchmarks/bench.py --variants exact,fast --out bench.json

Variants:
  exact       float32, TF32 off: the faithful path the reference fixtures hold
  exact_tf32  float32 storage with TF32 matrix units
  bf16        bfloat16 autocast, eager
  compile     float32 with torch.compile
  fast        bfloat16 autocast + torch.compile recomputing activations (memory budget 0.5) + CUDA graphs + TF32 +
              fused Adam, rendering with phi on the fused Triton kernels: train.py's --fast on one GPU
              (--kernels render, the default)
  fast_torch  fast with phi on PyTorch layers in rendering too: train.py --fast --kernels torch
  fast_nographs    fast without CUDA graphs: train.py --fast --no_cuda_graphs (and --fast under torchrun)
  fast_nobudget    fast_nographs without activation recomputation
  fused       fast with phi on the fused Triton kernels (kernels.py) in training too, no recomputation: train.py
              --fast --kernels triton
  fused_nographs   fused without CUDA graphs
  fused_budget05   fused_nographs with the compiler's activation recomputation (memory budget 0.5)
  fused_eager fused without torch.compile (bf16 autocast, TF32, fused Adam)
  fast_cdt, fast_autotune, fast_autotune_cdt   fast with the compiler's coordinate-descent tuning of its own
              kernels, with its autotuning of matrix products (templates that fuse neighbouring elementwise work)
              or with both
  fast_budget03, fast_budget01   fast with activation memory budget 0.3 or 0.1 (more recomputation)
  fast_lstm, fused_lstm   fast / fused with the ray marcher's LSTM cell written out in tensor operations
              (ComposedLSTMCell, same parameters) for the compiler to fuse, instead of PyTorch's own cell kernels
  fused_pixel fused with the pixel generator's FCLayers on the fused kernels too (FCBlock.fused_kernels,
              kernels.fc_layers; not yet a train.py option)
(Results in benchmarks/NOTES.md from before CUDA graphs joined --fast name fast_nographs "fast" and fast
"fast_cudagraphs"; likewise fused_nographs "fused" and fused "fused_cudagraphs".)
"""
import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import geometry  # noqa: E402
import srns  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402

# name: (side length, views per batch, rays per view or None for whole images)
SETTINGS = {'64px_b64': (64, 64, None), '128px_b16': (128, 16, None),
            'rays_64px_b128x512': (64, 128, 512)}  # the fast recipe (train_configs/shepard_metzler_fast.yml)
GRAPHS = 'reduce-overhead'  # torch.compile's mode for CUDA graphs
VARIANTS = {
    'exact': dict(amp=None, compile=False, tf32=False),
    'exact_tf32': dict(amp=None, compile=False, tf32=True),
    'bf16': dict(amp=torch.bfloat16, compile=False, tf32=True),
    'compile': dict(amp=None, compile=True, tf32=False),
    'fast': dict(amp=torch.bfloat16, compile=True, tf32=True, memory_budget=0.5, compile_mode=GRAPHS, fused='render'),
    'fast_nographs': dict(amp=torch.bfloat16, compile=True, tf32=True, memory_budget=0.5, fused='render'),
    'fast_nobudget': dict(amp=torch.bfloat16, compile=True, tf32=True),
    'fused': dict(amp=torch.bfloat16, compile=True, tf32=True, memory_budget=1.0, fused=True, compile_mode=GRAPHS),
    'fused_nographs': dict(amp=torch.bfloat16, compile=True, tf32=True, memory_budget=1.0, fused=True),
    'fused_budget05': dict(amp=torch.bfloat16, compile=True, tf32=True, memory_budget=0.5, fused=True),
    'fused_eager': dict(amp=torch.bfloat16, compile=False, tf32=True, fused=True),
}
# --fast --kernels torch: phi on PyTorch layers in rendering too (what --fast was before --kernels render)
VARIANTS['fast_torch'] = dict(VARIANTS['fast'], fused=False)
# --fast with truncated backpropagation through the march (train.py --tracing_grad_steps K)
VARIANTS.update({f'fast_grad{k}': dict(VARIANTS['fast'], tracing_grad_steps=k) for k in (3, 1)})
# --fast with more of the compiler's own tuning (torch._inductor.config settings, for this variant only) or more
# recomputation
VARIANTS.update({
    'fast_cdt': dict(VARIANTS['fast'], inductor=dict(coordinate_descent_tuning=True)),
    'fast_autotune': dict(VARIANTS['fast'], inductor=dict(max_autotune=True)),
    'fast_autotune_cdt': dict(VARIANTS['fast'], inductor=dict(max_autotune=True, coordinate_descent_tuning=True)),
    'fast_budget03': dict(VARIANTS['fast'], memory_budget=0.3),
    'fast_budget01': dict(VARIANTS['fast'], memory_budget=0.1),
})
VARIANTS.update({f'{name}_lstm': dict(VARIANTS[name], composed_lstm=True) for name in ('fast', 'fused')})
VARIANTS['fused_pixel'] = dict(VARIANTS['fused'], pixel_kernels=True)


class ComposedLSTMCell(torch.nn.Module):
    """``nn.LSTMCell``'s function (gate order i, f, g, o) in tensor operations, on the given cell's own parameters.

    PyTorch's cell runs as kernels of its own that the compiler cannot fuse with its neighbours; its backward sums
    the gate gradients over every ray for the bias gradient in a separate reduction (in the fused step's profile a
    bfloat16 ``reduce_kernel``, 10 a step at 77.5 us, which this cell removes). Written out, the compiler can fuse
    the gate arithmetic with the products' epilogues and that sum with the gates' backward. Measured on an H100:
    -0.5 ms of GPU time a step, -0.2 ms of step time, within one run's noise (benchmarks/NOTES.md, round 10).
    """

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, state=None):
        cell = self.cell
        gates = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)  # (M, 4 * hidden)
        if state is None:  # PyTorch's cell starts from zeros
            gates = gates + cell.bias_hh
            c = None
        else:
            h, c = state
            gates = gates + torch.nn.functional.linear(h, cell.weight_hh, cell.bias_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c_next = torch.sigmoid(i) * torch.tanh(g)
        if c is not None:
            c_next = c_next + torch.sigmoid(f) * c
        return torch.sigmoid(o) * torch.tanh(c_next), c_next


def make_batch(sidelength, batch_size, num_instances, device, seed=0, rays_per_view=None):
    """A batch of cars-like views: cameras on a sphere of radius 1.3 looking at the origin; whole images, or
    ``rays_per_view`` random pixels of each."""
    rng = np.random.default_rng(seed)
    poses = np.stack([geometry.look_at(p) for p in geometry.sphere_positions(batch_size, 1.3, rng)])
    f = 131.25 * sidelength / 128
    intrinsics = geometry.intrinsics_matrix(f, sidelength / 2, sidelength / 2)
    uv = geometry.uv_grid(sidelength).repeat(batch_size, 1, 1)  # (B, s*s, 2)
    generator = torch.Generator().manual_seed(seed)
    if rays_per_view:
        pixels = torch.rand(batch_size, sidelength ** 2, generator=generator).argsort(dim=1)[:, :rays_per_view]
        uv = torch.gather(uv, 1, pixels.sort(dim=1).values[..., None].expand(-1, -1, 2))  # (B, N, 2)
    model_input = {
        'instance_idx': torch.randint(num_instances, (batch_size,), generator=generator).float(),
        'pose': torch.tensor(poses, dtype=torch.float32),
        'intrinsics': intrinsics.repeat(batch_size, 1, 1),
        'uv': uv,
    }
    target = torch.rand(batch_size, uv.shape[1], 3, generator=generator) * 2 - 1
    return {k: v.to(device) for k, v in model_input.items()}, target.to(device)


def time_cuda(fn, warmup, repeats):
    """Median milliseconds of fn() over ``repeats`` runs, timed with CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def bench_variant(name, options, sidelength, batch_size, args, rays_per_view=None):
    import torch._inductor.config as inductor_config
    with inductor_config.patch(options.get('inductor', {})):
        return _bench_variant(name, options, sidelength, batch_size, args, rays_per_view)


def _bench_variant(name, options, sidelength, batch_size, args, rays_per_view=None):
    util.set_tf32(options['tf32'])
    torch._dynamo.reset()
    torch.manual_seed(0)
    device = torch.device('cuda')
    model = srns.SRNsModel(num_instances=2433, latent_dim=256, tracing_steps=10,
                           tracing_grad_steps=options.get('tracing_grad_steps', 0)).to(device)
    model.use_fused_kernels(options.get('fused', False))
    model.pixel_generator.fused_kernels = options.get('pixel_kernels', False)
    if options.get('composed_lstm'):
        model.ray_marcher.lstm = ComposedLSTMCell(model.ray_marcher.lstm)
    fused_adam = options['compile'] or options['amp'] is not None
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, fused=fused_adam)
    model_input, target = make_batch(sidelength, batch_size, 2433, device, rays_per_view=rays_per_view)
    forward = (util.compile_model(model, options.get('memory_budget', 1.0), mode=options.get('compile_mode'))
               if options['compile'] else model)
    amp = options['amp']

    loss_weights = {'l1_weight': 200., 'reg_weight': 1e-3, 'kl_weight': 1.}

    graphs = options.get('compile_mode') == GRAPHS

    def train_step():  # exactly train.py's step
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return train.train_step(forward, optimizer, model_input, {'rgb': target}, loss_weights, amp_dtype=amp)

    def render():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), util.autocast('cuda', amp):
            return forward(model_input)

    setting = f'{sidelength}px_b{batch_size}' + (f'x{rays_per_view}' if rays_per_view else '')
    result = {'variant': name, 'setting': setting, 'rays': batch_size * model_input['uv'].shape[1]}
    t0 = time.perf_counter()
    train_step()  # first call compiles
    torch.cuda.synchronize()
    result['first_step_s'] = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    result['train_ms'], result['train_ms_all'] = time_cuda(train_step, args.warmup, args.repeats)
    result['train_peak_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    result['rays_per_s'] = result['rays'] / result['train_ms'] * 1e3
    model.eval()
    t0 = time.perf_counter()
    render()
    torch.cuda.synchronize()
    result['first_render_s'] = time.perf_counter() - t0
    result['render_ms'], result['render_ms_all'] = time_cuda(render, args.warmup, args.repeats)
    result['render_images_per_s'] = batch_size / result['render_ms'] * 1e3
    losses = train_step()
    result['loss_finite'] = bool(torch.isfinite(losses['total_loss']).item())
    if args.profile_render:
        result['render_profile'] = profile_steps(render, args.profile_render, 'rendering passes', args.profile_rows)
    if args.profile:
        model.train()
        result['profile'] = profile_steps(train_step, args.profile, row_limit=args.profile_rows)
    del model, optimizer, forward
    torch.cuda.empty_cache()
    return result


def profile_steps(step, num_steps, what='training steps', row_limit=25):
    """torch.profiler over ``num_steps`` calls of ``step`` (training steps or rendering passes): the kernels (and
    ops) by their own GPU time.

    :return: the table as text (also printed), self CUDA time and FLOP counts where PyTorch knows them
    """
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_flops=True) as prof:
        for _ in range(num_steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by='self_cuda_time_total', row_limit=row_limit, max_name_column_width=70)
    print(f"profile of {num_steps} {what} (times are totals over them):\n{table}", flush=True)
    return table


def compare_paths(sidelength, batch_size):
    """Relative L2 error of the fast path's outputs and gradients against the exact float32 path, with phi on
    PyTorch layers (``fast``) and on the fused kernels (``fused``)."""
    torch._dynamo.reset()
    util.set_tf32(False)
    torch.manual_seed(0)
    model = srns.SRNsModel(num_instances=2433, latent_dim=256, tracing_steps=10, init_depth_std=0.).cuda()
    model_input, target = make_batch(sidelength, batch_size, 2433, 'cuda')

    def run(forward, amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            rgb, depth = forward(model_input)
            loss = srns.compute_losses(model, model_input, (rgb, depth), target)['total_loss']
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return rgb.float().detach(), depth.float().detach(), grads

    exact = run(model, False)
    util.set_tf32(True)
    names = ('rgb', 'depth', 'gradients')
    errors = {}
    for variant, fused in (('fast', False), ('fused', True)):
        torch._dynamo.reset()
        model.use_fused_kernels(fused)
        result = run(util.compile_model(model, 0.5), True)
        errors[variant] = {name: ((f - e).norm() / e.norm()).item() for name, e, f in zip(names, exact, result)}
    model.use_fused_kernels(False)
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', default='exact,fast')
    parser.add_argument('--settings', default='64px_b64,128px_b16',
                        help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--out', default='bench.json')
    parser.add_argument('--compare', action='store_true', help='also compare fast and exact outputs')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help='also profile this many training steps per variant and setting (torch.profiler)')
    parser.add_argument('--profile_render', type=int, default=0, metavar='PASSES',
                        help='also profile this many rendering passes per variant and setting')
    parser.add_argument('--profile_rows', type=int, default=25, help='rows of each profile table (kernels by GPU time)')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('bench.py measures GPU throughput: no CUDA device found')
    results = []
    for setting in args.settings.split(','):
        sidelength, batch_size, rays_per_view = SETTINGS[setting]
        for name in args.variants.split(','):
            result = bench_variant(name, VARIANTS[name], sidelength, batch_size, args, rays_per_view)
            results.append(result)
            print(f"{result['setting']:>10} {name:>10}  train {result['train_ms']:7.1f} ms  "
                  f"{result['train_peak_gib']:5.1f} GiB  render {result['render_ms']:6.1f} ms  "
                  f"(first step {result['first_step_s']:.0f} s)", flush=True)
    info = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'results': results}
    if args.compare:
        info['fast_vs_exact_relative_error'] = compare_paths(64, 8)
        print('fast vs exact, relative L2 error:', info['fast_vs_exact_relative_error'])
    pathlib.Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"\n{info['device']}, torch {info['torch']}")
    print(f"{'setting':>10} {'variant':>10} {'train ms':>9} {'Mrays/s':>8} {'peak GiB':>9} {'render ms':>10} {'img/s':>8}")
    for r in results:
        print(f"{r['setting']:>10} {r['variant']:>10} {r['train_ms']:9.1f} {r['rays_per_s'] / 1e6:8.2f} "
              f"{r['train_peak_gib']:9.1f} {r['render_ms']:10.1f} {r['render_images_per_s']:8.0f}")


if __name__ == '__main__':
    main()
