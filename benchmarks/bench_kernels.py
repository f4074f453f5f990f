"""Each fused kernel of kernels.py alone, with every autotuning candidate, at the cars setting's shapes.

For one evaluation of phi at 64 px x 64 (B = 64 observations, N = 4096 points, C = 256, bfloat16) it prints each
kernel's time per candidate and the memory bandwidth and matrix rate that time implies, next to what PyTorch
takes for the same work (a copy of one activation, the batched product, LayerNorm), so a slow kernel shows
whether it is far from the memory roofline or from the matrix units.

    python benchmarks/bench_kernels.py [--only_phi] [--out kernels.json]
"""
import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--points', type=int, default=4096)
    parser.add_argument('--out', default='kernels.json')
    parser.add_argument('--only_phi', action='store_true',
                        help='only whole evaluations of phi (each implementation), not each kernel and candidate')
    args = parser.parse_args(argv)
    if not kernels.available() or not torch.cuda.is_available():
        raise SystemExit('bench_kernels.py needs a CUDA device and Triton')
    from triton.testing import do_bench
    B, N, C = args.batch, args.points, 256
    dev, bf16 = 'cuda', torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(B, N, 3, device=dev)
    w0, b0 = torch.randn(B, 3, C, device=dev), torch.randn(B, C, device=dev)  # W0 transposed, as the kernels take it
    act = torch.randn(B, N, C, device=dev, dtype=bf16)
    act2 = torch.randn(B, N, C, device=dev, dtype=bf16)
    w, b = torch.randn(B, C, C, device=dev, dtype=bf16) / 16, torch.randn(B, C, device=dev, dtype=bf16)
    rstd = torch.rand(B, N, device=dev) + 0.5
    stats = torch.stack([torch.randn(B, N, device=dev), rstd], -1)  # the input layer's (mean, 1/std) a row
    out, out2 = torch.empty_like(act), torch.empty_like(act)
    dx3 = torch.empty_like(x)
    act_bytes = B * N * C * 2
    flops = 2 * B * N * C * C
    results = []

    def report(name, ms, bytes_moved, flop=0):  # bytes_moved None: not one figure (a whole evaluation of phi)
        row = {'kernel': name, 'us': ms * 1e3, 'TB/s': bytes_moved / ms / 1e9 if bytes_moved else None,
               'TFLOP/s': flop / ms / 1e9}
        results.append(row)
        bandwidth = f"{row['TB/s']:5.2f}" if bytes_moved else '    -'
        print(f"{name:60s} {row['us']:8.1f} us  {bandwidth} TB/s  {row['TFLOP/s']:6.1f} TFLOP/s", flush=True)

    def save():
        info = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'shape': [B, N, C],
                'results': results}
        pathlib.Path(args.out).write_text(json.dumps(info, indent=1))

    if args.only_phi:
        phi_evaluations(B, N, C, report)
        save()
        return
    report('torch: copy one activation (B, N, C) bf16', do_bench(lambda: out.copy_(act)), 2 * act_bytes)
    report('torch: bmm (B, N, C) @ (B, C, C) bf16', do_bench(lambda: torch.bmm(act, w.transpose(1, 2))),
           2 * act_bytes, flops)
    report('torch: layer_norm + relu bf16', do_bench(lambda: F.relu(F.layer_norm(act, (C,)))), 2 * act_bytes)

    rows_grid = lambda meta: (triton_cdiv(N, meta['BLOCK_M']), B)  # noqa: E731
    # LayerNorm's scale and shift, and the shares of their gradients (the pixel generator's layers: AFFINE)
    g, beta = torch.rand(C, device=dev, dtype=bf16) + 0.5, torch.randn(C, device=dev, dtype=bf16) / 4
    dg_part = torch.empty(2, B, triton_cdiv(N, kernels.PART_M), C, device=dev)
    phi_layer = dict(IN_RELU=True, IN_AFFINE=False, AFFINE=False)
    pixel_layer = dict(IN_RELU=True, IN_AFFINE=True, AFFINE=True)
    cases = [
        ('_input_layer_fwd', kernels._input_layer_fwd, rows_grid, lambda kw: (x, w0, b0, stats, out, N, N, 1e-5),
         dict(C=C, KEEP=True), act_bytes, 0),
        ('_hidden_layer_fwd', kernels._hidden_layer_fwd, rows_grid,
         lambda kw: (act, w, b, out, rstd, out2, g, beta, g, beta, N, N, 1e-5),
         dict(C=C, NORMALIZE=True, WRITE_RELU=False, KEEP=True, PRECISION='tf32', **phi_layer), 2 * act_bytes, flops),
        ('_hidden_layer_fwd (pixel generator)', kernels._hidden_layer_fwd, rows_grid,
         lambda kw: (act, w, b, out, rstd, out2, g, beta, g, beta, N, N, 1e-5),
         dict(C=C, NORMALIZE=True, WRITE_RELU=False, KEEP=True, PRECISION='tf32', **pixel_layer), 2 * act_bytes,
         flops),
    ]
    for above in (True, False):
        for affine in (False, True):
            cases.append((f"_hidden_layer_bwd ({'from the layer above' if above else 'the output gradient'}"
                          f"{', pixel generator' if affine else ''})", kernels._hidden_layer_bwd, rows_grid,
                          lambda kw: (act, w, act2, rstd, out, g, beta, dg_part[0], dg_part[1], N, N),
                          dict(C=C, ABOVE=above, AFFINE=affine, PART_M=kernels.PART_M, PRECISION='tf32'),
                          3 * act_bytes, flops if above else 0))
    # The weight gradients over runs of split_rows rows (one program per observation, block of dW rows and run),
    # their float32 shares summed afterwards (kernels._weight_gradients); split_rows >= N is the unsplit kernel, and
    # the sweep includes the runs kernels.phi takes on this GPU (kernels._weight_splits).
    chosen = kernels._split_rows(B, N, torch.device(dev))
    for split_rows in sorted({512, 1024, 2048, chosen, N}):
        splits = triton_cdiv(N, split_rows)
        share = torch.float32 if splits > 1 else bf16
        dw_share = torch.empty(B * splits, C, C, device=dev, dtype=share)
        db_share = torch.empty(B * splits, C, device=dev, dtype=share)
        cases.append((f'_hidden_layer_bwd_weights (split {split_rows})', kernels._hidden_layer_bwd_weights,
                      lambda meta, splits=splits: (C // meta['BLOCK_N'], B * splits),
                      lambda kw, dw_share=dw_share, db_share=db_share, split_rows=split_rows:
                          (act, act2, dw_share, db_share, g, beta, N, N, split_rows),
                      dict(C=C, PRECISION='tf32', IN_RELU=True, IN_AFFINE=False), 2 * act_bytes, flops))
        report(f'kernels._weight_gradients (split {split_rows}, autotuned, shares summed)',
               do_bench(lambda split_rows=split_rows: kernels._weight_gradients(act, act2, bf16, N, split_rows)),
               2 * act_bytes, flops)
    for name, autotuned, grid, make_args, constants, bytes_moved, flop in cases:
        for config in kernels.CANDIDATES[name.split()[0]]:
            meta = dict(config.kwargs)

            def launch():
                autotuned.fn[grid](*make_args(meta), **constants, **meta, num_warps=config.num_warps,
                                   num_stages=config.num_stages)
            try:
                ms = do_bench(launch)
            except Exception as error:  # a candidate that does not compile on this GPU (e.g. out of resources)
                print(f"{name} {meta} w{config.num_warps} s{config.num_stages}: failed: {str(error)[:120]}")
                continue
            report(f"{name} {meta} w{config.num_warps} s{config.num_stages}", ms, bytes_moved, flop)
    parts = torch.empty(B, triton_cdiv(N, kernels.INPUT_ROWS), 3, C, device=dev)
    parts_b = torch.empty(B, triton_cdiv(N, kernels.INPUT_ROWS), C, device=dev)
    for config in kernels.CANDIDATES['_input_layer_bwd']:
        meta = dict(config.kwargs)

        def launch():
            kernels._input_layer_bwd.fn[(triton_cdiv(N, kernels.INPUT_ROWS), B)](
                act, w, stats, x, w0, b0, dx3, parts, parts_b, N, N, C=C, ROWS=kernels.INPUT_ROWS,
                PRECISION='tf32', **meta, num_warps=config.num_warps, num_stages=config.num_stages)
        report(f"_input_layer_bwd {meta} w{config.num_warps} s{config.num_stages}", do_bench(launch), act_bytes,
               flops)
    phi_evaluations(B, N, C, report)
    pixel_generator_evaluations(B, N, C, report)
    save()


def pixel_generator_evaluations(B, N, C, report):
    """The pixel generator (custom_layers.FCBlock C -> C x 5 -> 3, the cars model's, bfloat16 autocast) on the rows
    of B x N features, forward + backward, on PyTorch's layers eager and compiled (what --fast runs) and with its
    FCLayers on the kernels (FCBlock.fused_kernels)."""
    import custom_layers
    from triton.testing import do_bench
    dev = 'cuda'
    torch.manual_seed(0)
    block = custom_layers.FCBlock(hidden_ch=C, num_hidden_layers=4, in_features=C, out_features=3,
                                  outermost_linear=True).to(dev)
    v = torch.randn(B, N, C, device=dev, dtype=torch.bfloat16).clamp_min(0).requires_grad_()
    grad_rgb = torch.randn(B, N, 3, device=dev, dtype=torch.bfloat16)
    compiled = torch.compile(block)
    for name, fn, fused in (('pytorch eager', block, False), ('pytorch compiled', compiled, False),
                            ('kernels', block, True)):
        def forward_backward():
            block.fused_kernels = fused
            with torch.autocast(dev, dtype=torch.bfloat16):
                rgb = fn(v)
            rgb.backward(grad_rgb)
        try:
            report(f'pixel generator, {name}: forward + backward', do_bench(forward_backward), None,
                   3 * 2 * B * N * C * C * 5)
        except Exception as error:
            print(f'pixel generator, {name}: failed: {str(error)[:300]}', flush=True)
    block.fused_kernels = False


def phi_evaluations(B, N, C, report):
    """One evaluation of phi (3 -> C -> C -> C -> C, bfloat16 autocast), forward and forward + backward, on each
    implementation: PyTorch's layers eager and compiled (what --fast runs), and the kernels. Peak memory of
    forward + backward too."""
    import hyperlayers
    from triton.testing import do_bench
    dev = 'cuda'
    torch.manual_seed(0)
    x = torch.randn(B, N, 3, device=dev)
    layers = [(torch.randn(B, C, 3, device=dev), torch.randn(B, 1, C, device=dev) / 4, True)]
    layers += [(torch.randn(B, C, C, device=dev, dtype=torch.bfloat16) / 16,
                torch.randn(B, 1, C, device=dev, dtype=torch.bfloat16) / 4, True) for _ in range(3)]
    layers = [(w.requires_grad_(), b.requires_grad_(), norm) for w, b, norm in layers]
    grad_v = torch.randn(B, N, C, device=dev, dtype=torch.bfloat16)
    flops = 2 * B * N * C * C * 3  # the three C x C layers

    def pytorch(x_):
        return hyperlayers.HypoNetwork(layers)(x_)
    compiled = torch.compile(pytorch)
    variants = [('pytorch eager', pytorch), ('pytorch compiled', compiled),
                ('kernels', lambda x_: kernels.phi(x_, layers))]
    for name, fn in variants:
        def forward():
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
                return fn(x)

        def forward_backward():
            with torch.autocast(dev, dtype=torch.bfloat16):
                v = fn(x)
            v.backward(grad_v)
        try:
            forward_backward()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            report(f'phi, {name}: forward', do_bench(forward), None, flops)
            report(f'phi, {name}: forward + backward ({peak:.2f} GiB above inputs)', do_bench(forward_backward),
                   None, 3 * flops)
        except Exception as error:
            print(f'phi, {name}: failed: {str(error)[:300]}', flush=True)


def triton_cdiv(a, b):
    return (a + b - 1) // b


if __name__ == '__main__':
    main()
