"""What each fused kernel of kernels.py costs a multiprocessor, read off the compiler without a GPU.

Compiles every autotuning candidate of every kernel for a CUDA target (default sm_90, the H100/H200) on this machine,
through Triton's own compiler, and reports per candidate the registers a thread, the bytes spilled to local memory
(the stack frame), the shared memory a program needs, and the matrix instructions used (HGMMA: Hopper's warpgroup
products; HMMA: the older warp-level ones). A candidate over the multiprocessor's shared memory cannot launch, and
one that spills moves its registers through local memory: both are worth knowing before a GPU is at hand.

    python benchmarks/kernel_resources.py [--arch 90] [--kernels _hidden_layer_fwd,...] [--first] [--compiled]
                                          [--float32] [--out F.json]

With --compiled, float arguments (LayerNorm's eps) are compiled as fp64, as torch.compile launches the kernels (it
types a Python float fp64), where Triton's own launcher types it fp32.

It needs Triton (any build; no CUDA device, no driver) and must not run under TRITON_INTERPRET.
"""
import argparse
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}  # a block's bytes
BF16, F32 = torch.bfloat16, torch.float32
# The shapes the cars setting launches (B 64, N 4096, C 256): integer arguments are specialised as a launch with
# them would be (divisible by 16), the pointer arguments as 16-byte aligned tensors of these dtypes.
N, B, C, EPS = 4096, 64, 256, 1e-5


def launches(dtype=BF16):
    """(kernel name, positional argument dtypes or values, constants) for every way kernels.phi launches each
    kernel in ``dtype`` (bfloat16, or float32 with IEEE products, as the kernels' checks do) on phi's layout
    (every layer normalised), then every way kernels.fc_layers launches them (the pixel generator's layers, whose
    LayerNorm has a scale and a shift: AFFINE, IN_AFFINE)."""
    rows, precision, ACT = N, 'tf32' if dtype != F32 else 'ieee', dtype  # ACT: the activations' dtype
    fwd_args = (ACT, ACT, ACT, ACT, F32, ACT, ACT, ACT, ACT, ACT, N, rows)
    out = [('_input_layer_fwd', (F32, F32, F32, F32, ACT, N, rows, EPS), dict(C=C, KEEP=keep))
           for keep in (True, False)]
    for last, keep in ((False, True), (True, True), (False, False), (True, False)):
        flags = dict(C=C, NORMALIZE=True, WRITE_RELU=last, KEEP=keep, IN_RELU=True, IN_AFFINE=False, AFFINE=False,
                     PRECISION=precision)
        out.append(('_hidden_layer_fwd', (*fwd_args, EPS), flags))
    bwd_args = (ACT, ACT, ACT, F32, ACT, ACT, ACT, F32, F32, N, rows)
    for above in (True, False):
        out.append(('_hidden_layer_bwd', bwd_args, dict(C=C, ABOVE=above, AFFINE=False, PART_M=32,
                                                         PRECISION=precision)))
    weights = '_hidden_layer_bwd_weights' if dtype != F32 else '_hidden_layer_bwd_weights_f32'
    out.append((weights, (ACT, ACT, ACT, ACT, ACT, ACT, N, rows, N), dict(C=C, IN_RELU=True, IN_AFFINE=False,
                                                                           PRECISION=precision)))
    out.append(('_input_layer_bwd', (ACT, ACT, F32, F32, F32, F32, F32, F32, F32, N, rows),
                dict(C=C, ROWS=256, PRECISION=precision)))
    # the pixel generator's layers (kernels.fc_layers): the first takes its input as it is, the last writes h too
    for first, last in ((True, False), (False, False), (False, True)):
        out.append(('_hidden_layer_fwd', (*fwd_args, EPS), dict(C=C, NORMALIZE=True, WRITE_RELU=last, KEEP=True,
                                                                IN_RELU=not first, IN_AFFINE=not first, AFFINE=True,
                                                                PRECISION=precision)))
    for above in (True, False):
        out.append(('_hidden_layer_bwd', bwd_args, dict(C=C, ABOVE=above, AFFINE=True, PART_M=32,
                                                         PRECISION=precision)))
    for first in (True, False):
        out.append((weights, (ACT, ACT, ACT, ACT, ACT, ACT, N, rows, N), dict(C=C, IN_RELU=not first,
                                                                               IN_AFFINE=not first,
                                                                               PRECISION=precision)))
    return out


@contextlib.contextmanager
def offline_driver(arch):
    """Triton's CUDA driver for compiling only, while the block runs: the target is sm_``arch``, and nothing asks
    for a device."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    class OfflineCuda(CudaDriver):
        def __init__(self):  # no libcuda, no device
            self.target = GPUTarget('cuda', arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device('cpu')
    previous = driver._active  # None until a driver was first asked for (none can be made without a GPU)
    driver.set_active(OfflineCuda())
    try:
        yield
    finally:
        driver._active = previous


def resource_usage(cubin):
    """(registers, stack bytes) of the cubin's kernel, from cuobjdump (shipped with Triton)."""
    import triton.backends.nvidia as nvidia
    tool = pathlib.Path(nvidia.__file__).parent / 'bin' / 'cuobjdump'
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), '--dump-resource-usage', f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(tool), '-sass', f.name], capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(pattern, usage)[1]) for pattern in (r'REG:(\d+)', r'STACK:(\d+)'))
    return registers, stack, len(re.findall(r'\bHGMMA\.', sass)), len(re.findall(r'\bHMMA\.', sass))


@contextlib.contextmanager
def float_arguments_as(fn, dtype):
    """While the block runs, the jitted ``fn`` compiles its float arguments (eps) as ``dtype``: 'fp32' as Triton's
    own launcher types a Python float, 'fp64' as torch.compile's (Inductor's signature for Python floats). Its
    in-memory cache is emptied around the block, whose keys do not tell the two apart."""
    pack = fn._pack_args

    def packed(*args, **kwargs):
        options, signature, constexprs, attrs = pack(*args, **kwargs)
        return options, {k: dtype if v == 'fp32' else v for k, v in signature.items()}, constexprs, attrs
    fn.device_caches.clear()
    fn._pack_args = packed
    try:
        yield
    finally:
        fn._pack_args = pack
        fn.device_caches.clear()


def compile_candidate(kernel, args, constants, config, float_type='fp32'):
    with float_arguments_as(kernel.fn, float_type):
        compiled = kernel.fn.warmup(*args, **constants, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages, grid=(1,))
    registers, stack, hgmma, hmma = resource_usage(compiled.asm['cubin'])
    return dict(shared=compiled.metadata.shared, registers=registers, stack=stack, hgmma=hgmma, hmma=hmma)


def report(arch=90, names=None, first_only=False, float_type='fp32', dtype=BF16):
    """Every candidate (or only the first, which runs when autotuning is off) of the kernels ``names`` (all by
    default), compiled for sm_``arch``, float arguments as ``float_type`` ('fp64': as torch.compile launches them),
    for operands of ``dtype``: a list of dicts, one a candidate and way of launching the kernel."""
    if os.environ.get('TRITON_INTERPRET') == '1':
        raise RuntimeError('kernel_resources.py compiles the kernels: unset TRITON_INTERPRET')
    import kernels
    rows = []
    with offline_driver(arch):
        for name, args, constants in launches(dtype):
            if names and name not in names:
                continue
            configs = kernels.CANDIDATES[name][:1] if first_only else kernels.CANDIDATES[name]
            for index, config in enumerate(configs):
                row = dict(kernel=name, candidate=index, **config.kwargs, warps=config.num_warps,
                           stages=config.num_stages,
                           **{k: v for k, v in constants.items() if k not in ('C', 'PRECISION', 'PART_M')})
                try:
                    row.update(compile_candidate(getattr(kernels, name), args, constants, config, float_type))
                    row['fits'] = row['shared'] <= SHARED_LIMIT.get(arch, SHARED_LIMIT[90]) and row['stack'] == 0
                except Exception as error:  # a candidate the compiler refuses for this target
                    row.update(error=str(error)[:200], fits=False)
                rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', type=int, default=90, help='compute capability, e.g. 90 (H100, H200), 80 (A100)')
    parser.add_argument('--kernels', default='', help='comma-separated kernel names (default: all)')
    parser.add_argument('--first', action='store_true', help='only the first candidate of each kernel')
    parser.add_argument('--compiled', action='store_true',
                        help='float arguments (eps) as torch.compile passes them, fp64, not fp32 as Triton does')
    parser.add_argument('--float32', action='store_true',
                        help='float32 operands with IEEE products (the kernels\' checks), not bfloat16')
    parser.add_argument('--out', default='', help='also write the rows as JSON here')
    args = parser.parse_args(argv)
    rows = report(args.arch, [n for n in args.kernels.split(',') if n], args.first,
                  'fp64' if args.compiled else 'fp32', F32 if args.float32 else BF16)
    for row in rows:
        meta = ' '.join(f'{k}={v}' for k, v in row.items()
                        if k not in ('kernel', 'candidate', 'shared', 'registers', 'stack', 'hgmma', 'hmma', 'fits',
                                     'error'))
        if 'error' in row:
            print(f"{row['kernel']:28s} #{row['candidate']} {meta}: does not compile: {row['error']}")
            continue
        print(f"{row['kernel']:28s} #{row['candidate']} {meta:72s} {row['registers']:3d} regs  "
              f"{row['stack']:5d} B stack  {row['shared'] / 1024:6.1f} KiB shared  HGMMA {row['hgmma']:3d}  "
              f"HMMA {row['hmma']:3d}  {'ok' if row['fits'] else 'DOES NOT FIT'}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({'arch': args.arch, 'rows': rows}, indent=1))


if __name__ == '__main__':
    main()
