"""Fused GPU kernels (Triton) for phi, the hot path of SRN training and rendering.

phi (paper section 3.1, its weights made per scene by the hypernetwork of section 3.3) is evaluated at every
ray-marching step and once more for the pixel generator: 11 times a step, on every ray. In PyTorch each of its
layers is a batched matrix product followed by LayerNorm (no affine) and ReLU, and each of those writes and reads
a (B, N, 256) activation; that memory traffic, not arithmetic, bounds the step (benchmarks/NOTES.md, "profile").

``phi`` here computes what ``hyperlayers.HypoNetwork`` computes, with one kernel per layer that keeps a
256-wide row in registers from the matrix product through LayerNorm, and the matching backward:

- forward, per layer: ``relu(x_prev) @ W^T + b -> LayerNorm`` in one pass; it stores the normalised values
  *before* the ReLU (xhat, what the backward needs) and 1/std per row, and the next layer applies the ReLU as
  it loads them. The input layer (3 -> 256) runs in float32, as ``HypoNetwork`` does under autocast, in a pass of
  its own that stores its xhat in the activations' dtype (the next layer's operand) and its row statistics
  (mean and 1/std), from which its backward forms xhat again in float32. (Forming the input layer's activations
  from the points inside the next layer's product instead saves two stored activations but starves that product's
  pipeline: benchmarks/NOTES.md, rounds 3 and 4.)
- backward, per layer from the top: the layer above's d(pre-activation) through its W, then LayerNorm's backward
  (gated by the ReLU), in one pass that stores only this layer's d(pre-activation) dpre; then the weight gradient
  ``dpre^T @ relu(x_prev)`` with the bias gradient in a second kernel, over runs of rows summed afterwards.

A persistent variant (a program a run of rows of one observation, W loaded into shared memory once) was
tried and measured slower in training: benchmarks/NOTES.md, round 7.

``fc_layers`` runs the pixel generator's FCLayers (``custom_layers.FCBlock``: Linear, LayerNorm with a scale and a
shift, ReLU; one set of weights for every ray) on the same kernels: all rows as one observation, the scale and
shift applied where the ReLU is (AFFINE, IN_AFFINE), and their gradients summed in the LayerNorm backward's pass.
It is switched on by ``FCBlock.fused_kernels`` (benchmarks/bench.py's ``fused_pixel``; not yet a train.py option).

Tolerance: the kernels take bfloat16 activations and weights (float32 for the input layer) with float32
accumulation, like PyTorch's bf16 path; they differ from it only in rounding (LayerNorm here sees the float32
product where PyTorch rounds it to bf16 first). ``tests/test_kernels.py`` holds outputs and gradients to the
PyTorch path in the same precision. The exact (float32) path never uses these kernels.

The switch: ``SRNsModel.use_fused_kernels(True)`` (train.py ``--kernels``); the PyTorch code in
hyperlayers.py stays the definition. Without Triton (CPU builds of PyTorch) ``available()`` is False.

Shape vocabulary: ``B`` observations, ``N`` points per observation, ``C`` = 256 channels, ``K`` input channels.
"""
import hashlib
import os
import pathlib
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton; the PyTorch path is used then
    triton = None

# A fingerprint of this file, passed to the custom operators below as an argument they do not use. torch.compile
# caches compiled graphs on disk by what its graph holds, where these operators are calls by name: without it, a graph
# compiled with an earlier kernels.py (an upgrade, an edit) came back from the cache, kernels and all
# (benchmarks/NOTES.md, round 10).
SOURCE_KEY = hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]

# TRITON_INTERPRET=1 runs the kernels on the CPU (slowly), which is how the tests check them without a GPU.
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
# SRN_KERNELS_AUTOTUNE=0 skips autotuning (first candidate of each kernel): quick compiles, e.g. for tests.
AUTOTUNE = os.environ.get('SRN_KERNELS_AUTOTUNE', '1') != '0' and not INTERPRET


# The widest tile of the autotuning candidates is 256 columns; the interpreter runs only the first candidate,
# whose tiles are at most 128 wide, so the tests can use C = 128 there.
MIN_CHANNELS = 128 if INTERPRET else 256
CANDIDATES = {}  # kernel name -> every autotuning candidate (triton.Config), filled below


# Compute capability the kernels need: Ampere (8.0) and later multiply bfloat16 on the matrix units. Compiled for
# Volta or Turing (7.x) Triton has no matrix instructions for them and spills 7-21 KB a thread to local memory
# (benchmarks/kernel_resources.py --arch 70 / 75), far slower than cuBLAS, so phi stays on PyTorch layers there.
MIN_CAPABILITY = (8, 0)


def runs_on(device):
    """Whether the kernels can run on ``device``: a CUDA device of compute capability ``MIN_CAPABILITY`` or later,
    or the CPU under the interpreter. (Triton itself may be missing: see ``available``.)"""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY
    return INTERPRET and device.type == 'cpu'


def available(device=None):
    """Whether the fused kernels can run here: Triton is installed, and ``device`` (default: the current CUDA
    device, or the CPU under the interpreter) is one they run on (``runs_on``)."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return _REGISTERED and runs_on(device)


def supports(x, layers):
    """Whether ``phi(x, layers)`` has a fused kernel: phi's layout (3 -> C -> ... -> C, C a power of two >= 256, every
    layer normalised, or all but the last) on a CUDA device (or the CPU under the interpreter). It does not ask for the
    device's compute capability (``runs_on``): the switch that sends phi here is set where ``available`` was asked
    (``util.fused_kernels_mode``), and this check runs inside compiled code on every evaluation."""
    if not _REGISTERED or not (x.is_cuda or (INTERPRET and x.device.type == 'cpu')):
        return False
    channels = layers[0][0].shape[-2]
    if x.dim() != 3 or x.shape[-1] != 3 or channels & (channels - 1) or channels < MIN_CHANNELS or len(layers) < 2:
        return False
    for i, (weights, _, normalize) in enumerate(layers):
        in_ch = 3 if i == 0 else channels
        if weights.shape[-2:] != (channels, in_ch) or not (normalize or i == len(layers) - 1):
            return False
    return True


if triton is not None:
    def _configs(kernel, *configs):
        """Autotuning candidates ((meta-parameters, num_warps, num_stages) each) of the kernel named ``kernel``;
        only the first without AUTOTUNE. All of them stay in ``CANDIDATES[kernel]`` (the tests run each).

        A (rows, 256) float32 tile costs rows * 256 / (32 * num_warps) registers a thread; the candidates keep the
        LayerNorm kernels' live tiles small enough not to spill.
        """
        configs = [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in configs]
        CANDIDATES[kernel] = configs
        return configs if AUTOTUNE else configs[:1]

    @triton.jit
    def _points(x_ptr, b, rows, row_ok, N):
        """The three coordinates of a tile's points, (BLOCK_M,) float32 each, from x (B, N, 3)."""
        point = x_ptr + b * N * 3 + rows * 3
        return (tl.load(point, mask=row_ok, other=0.), tl.load(point + 1, mask=row_ok, other=0.),
                tl.load(point + 2, mask=row_ok, other=0.))

    @triton.jit
    def _layer_input(x, in_g_ptr, in_beta_ptr, ks, dtype, IN_RELU: tl.constexpr, IN_AFFINE: tl.constexpr):
        """A layer's operand from the stored output of the layer below, channels ks: relu(x) (phi), relu(x * g +
        beta) with IN_AFFINE (LayerNorm's scale and shift of the layer below, (C,) each), or x itself (an input
        that is no layer's output), in ``dtype``."""
        if IN_AFFINE:
            x = (x.to(tl.float32) * tl.load(in_g_ptr + ks).to(tl.float32)[None, :]
                 + tl.load(in_beta_ptr + ks).to(tl.float32)[None, :])
        if IN_RELU:
            x = tl.where(x > 0, x, 0.)
        return x.to(dtype)

    @triton.jit
    def _centred_and_rstd(pre, eps, C: tl.constexpr):
        """LayerNorm's statistics of a (rows, C) float32 tile: the tile minus its row means, the means, and 1/std."""
        mean = tl.sum(pre, axis=1) / C
        pre = pre - mean[:, None]
        return pre, mean, 1. / tl.sqrt(tl.sum(pre * pre, axis=1) / C + tl.cast(eps, tl.float32))

    @triton.jit
    def _input_layer_pre(x0, x1, x2, w0_ptr, b0_ptr, b, ks, C: tl.constexpr):
        """The input layer's pre-activation x @ W0^T + b0 on channels ks, (rows, len(ks)) float32, from W0
        transposed, (B, 3, C): each coordinate's weights contiguous."""
        w = w0_ptr + b * 3 * C + ks
        return (tl.load(b0_ptr + b * C + ks)[None, :] + x0[:, None] * tl.load(w)[None, :]
                + x1[:, None] * tl.load(w + C)[None, :] + x2[:, None] * tl.load(w + 2 * C)[None, :])

    @triton.jit
    def _input_layer_stats(stats_ptr, b, rows, row_ok, N):
        """The input layer's row statistics (mean, 1/std), (BLOCK_M,) float32 each, from stats (B, N, 2)."""
        row = stats_ptr + (b * N + rows) * 2
        return tl.load(row, mask=row_ok, other=0.), tl.load(row + 1, mask=row_ok, other=0.)

    @triton.jit
    def _input_layer_xhat(x0, x1, x2, w0_ptr, b0_ptr, mean, rstd, b, ks, C: tl.constexpr):
        """The input layer's normalised values on channels ks, recomputed from the points and the row statistics."""
        return (_input_layer_pre(x0, x1, x2, w0_ptr, b0_ptr, b, ks, C) - mean[:, None]) * rstd[:, None]

    @triton.jit
    def _hidden_layer_epilogue(acc, b_ptr, out_ptr, rstd_ptr, relu_ptr, g_ptr, beta_ptr, b, rows, row_ok, N, eps,
                               C: tl.constexpr, NORMALIZE: tl.constexpr, WRITE_RELU: tl.constexpr,
                               KEEP: tl.constexpr, AFFINE: tl.constexpr):
        """Bias, LayerNorm or not, and phi's output relu(xhat) with WRITE_RELU (relu(xhat * g + beta) with AFFINE,
        LayerNorm's own scale and shift, (C,) each). It stores the layer's output (xhat, the next layer's input) and
        1/std; without KEEP (no backward to come) only what a later layer reads: phi's output alone in the last
        layer, and no 1/std."""
        cols = tl.arange(0, C)
        acc += tl.load(b_ptr + b * C + cols).to(tl.float32)[None, :]
        if NORMALIZE:
            acc, _, rstd = _centred_and_rstd(acc, eps, C)
            acc = acc * rstd[:, None]
            if KEEP:
                tl.store(rstd_ptr + b * N + rows, rstd, mask=row_ok)
        tile = rows[:, None] * C + cols[None, :]  # int32 offsets; the batch offset goes on the pointers
        if KEEP or not WRITE_RELU:
            tl.store(out_ptr + b * N * C + tile, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_RELU:
            if AFFINE:
                acc = (acc * tl.load(g_ptr + cols).to(tl.float32)[None, :]
                       + tl.load(beta_ptr + cols).to(tl.float32)[None, :])
            tl.store(relu_ptr + b * N * C + tile, tl.maximum(acc, 0.).to(relu_ptr.dtype.element_ty),
                     mask=row_ok[:, None])

    @triton.autotune(configs=_configs('_input_layer_fwd',
                                      ({'BLOCK_M': 16, 'BLOCK_K': 256}, 4, 2), ({'BLOCK_M': 32, 'BLOCK_K': 256}, 4, 2),
                                      ({'BLOCK_M': 32, 'BLOCK_K': 256}, 8, 2), ({'BLOCK_M': 64, 'BLOCK_K': 256}, 8, 2),
                                      ({'BLOCK_M': 128, 'BLOCK_K': 32}, 4, 2)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _input_layer_fwd(x_ptr, w0_ptr, b0_ptr, stats_ptr, out_ptr, N, ROWS_KEY, eps, C: tl.constexpr,
                         KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """xhat0 = LayerNorm(x @ W0^T + b0) for x (B, N, 3), W0^T (B, 3, C), b0 (B, C), in float32, stored in the
        activations' dtype for the next layer and the weight gradient; with KEEP also the row statistics (mean,
        1/std), (B, N, 2) float32, from which the input layer's backward forms xhat0 again in float32.

        With BLOCK_K >= C a (BLOCK_M, C) tile at once; else in channel chunks of BLOCK_K, three times over (the
        mean, the centred sum of squares, the output): three multiply-adds an element, so more rows a program."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        x0, x1, x2 = _points(x_ptr, b, rows, row_ok, N)
        if BLOCK_K >= C:
            cols = tl.arange(0, C)
            pre, mean, rstd = _centred_and_rstd(_input_layer_pre(x0, x1, x2, w0_ptr, b0_ptr, b, cols, C), eps, C)
            tl.store(out_ptr + b * N * C + rows[:, None] * C + cols[None, :],
                     (pre * rstd[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, C, BLOCK_K):
                total += tl.sum(_input_layer_pre(x0, x1, x2, w0_ptr, b0_ptr, b, k0 + tl.arange(0, BLOCK_K), C), 1)
            mean = total / C
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, C, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                centred = _input_layer_pre(x0, x1, x2, w0_ptr, b0_ptr, b, ks, C) - mean[:, None]
                squares += tl.sum(centred * centred, axis=1)
            rstd = 1. / tl.sqrt(squares / C + tl.cast(eps, tl.float32))
            for k0 in range(0, C, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                xhat = _input_layer_xhat(x0, x1, x2, w0_ptr, b0_ptr, mean, rstd, b, ks, C)
                tl.store(out_ptr + b * N * C + rows[:, None] * C + ks[None, :], xhat.to(out_ptr.dtype.element_ty),
                         mask=row_ok[:, None])
        if KEEP:
            tl.store(stats_ptr + (b * N + rows) * 2, mean, mask=row_ok)
            tl.store(stats_ptr + (b * N + rows) * 2 + 1, rstd, mask=row_ok)

    @triton.autotune(configs=_configs('_hidden_layer_fwd',
                                      ({'BLOCK_M': 64, 'BLOCK_K': 64}, 4, 3), ({'BLOCK_M': 64, 'BLOCK_K': 64}, 8, 3),
                                      ({'BLOCK_M': 128, 'BLOCK_K': 64}, 8, 3), ({'BLOCK_M': 32, 'BLOCK_K': 64}, 4, 3),
                                      ({'BLOCK_M': 64, 'BLOCK_K': 32}, 8, 4), ({'BLOCK_M': 128, 'BLOCK_K': 32}, 8, 4)),
                     key=['ROWS_KEY', 'C', 'IN_AFFINE'])
    @triton.jit
    def _hidden_layer_fwd(x_ptr, w_ptr, b_ptr, out_ptr, rstd_ptr, relu_ptr, in_g_ptr, in_beta_ptr, g_ptr, beta_ptr,
                          N, ROWS_KEY, eps, C: tl.constexpr, NORMALIZE: tl.constexpr, WRITE_RELU: tl.constexpr,
                          KEEP: tl.constexpr, IN_RELU: tl.constexpr, IN_AFFINE: tl.constexpr, AFFINE: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """out = LayerNorm(relu(x) @ W^T + b) (or without LayerNorm) for x (B, N, C), W (B, C, C), b (B, C);
        with WRITE_RELU also relu(out), phi's output. The operand relu(x) is ``_layer_input``'s (IN_RELU,
        IN_AFFINE); with AFFINE, WRITE_RELU writes relu(out * g + beta) (the pixel generator's LayerNorm)."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, C)
        acc = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + b * N * C + rows[:, None] * C + ks[None, :], mask=row_ok[:, None], other=0.)
            x = _layer_input(x, in_g_ptr, in_beta_ptr, ks, w_ptr.dtype.element_ty, IN_RELU, IN_AFFINE)
            w_t = tl.load(w_ptr + b * C * C + cols[None, :] * C + ks[:, None])  # (BLOCK_K, C) = W^T
            acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
        _hidden_layer_epilogue(acc, b_ptr, out_ptr, rstd_ptr, relu_ptr, g_ptr, beta_ptr, b, rows, row_ok, N, eps, C,
                               NORMALIZE, WRITE_RELU, KEEP, AFFINE)

    @triton.jit
    def _layer_norm_saved(xhat_ptr, rstd_ptr, b, rows, row_ok, N, C: tl.constexpr):
        """xhat (BLOCK_M, C) and 1/std (BLOCK_M,) of a tile of rows as the forward stored them, float32."""
        cols = tl.arange(0, C)
        xhat = tl.load(xhat_ptr + b * N * C + rows[:, None] * C + cols[None, :], mask=row_ok[:, None],
                       other=0.).to(tl.float32)
        return xhat, tl.load(rstd_ptr + b * N + rows, mask=row_ok, other=0.)

    @triton.jit
    def _layer_norm_relu_bwd(grad, xhat_ptr, rstd_ptr, b, rows, row_ok, N, C: tl.constexpr):
        """d(pre-LayerNorm) from d(relu output) for a (BLOCK_M, C) tile, float32, with xhat and 1/std loaded."""
        xhat, rstd = _layer_norm_saved(xhat_ptr, rstd_ptr, b, rows, row_ok, N, C)
        return _layer_norm_relu_bwd_of(grad, xhat, rstd, C)

    @triton.jit
    def _layer_norm_relu_bwd_of(grad, xhat, rstd, C: tl.constexpr):
        """d(pre-LayerNorm) from d(relu output), xhat (BLOCK_M, C) and 1/std (BLOCK_M,) given, float32."""
        return _layer_norm_bwd_of(tl.where(xhat > 0, grad, 0.), xhat, rstd, C)  # ReLU

    @triton.jit
    def _layer_norm_bwd_of(grad, xhat, rstd, C: tl.constexpr):
        """d(pre-LayerNorm) from d(xhat), xhat (BLOCK_M, C) and 1/std (BLOCK_M,) given, float32."""
        mean_grad = tl.sum(grad, axis=1) / C
        mean_grad_xhat = tl.sum(grad * xhat, axis=1) / C
        return rstd[:, None] * (grad - mean_grad[:, None] - xhat * mean_grad_xhat[:, None])

    @triton.jit
    def _grad_from_above(dpre_above_ptr, w_above_ptr, b, rows, row_ok, N, C: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """d(this layer's output) = dpre_above @ W_above for a (BLOCK_M, C) tile, float32: the layer above's
        d(pre-activation) (B, N, C) through its weights W_above (B, C, C), a loop over its C channels."""
        cols = tl.arange(0, C)
        acc = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            d = tl.load(dpre_above_ptr + b * N * C + rows[:, None] * C + ks[None, :], mask=row_ok[:, None],
                        other=0.)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_above_ptr + b * C * C + ks[:, None] * C + cols[None, :])  # (BLOCK_K, C) rows of W_above
            acc = tl.dot(d, w, acc, input_precision=PRECISION)
        return acc

    @triton.autotune(configs=_configs('_hidden_layer_bwd',
                                      ({'BLOCK_M': 64, 'BLOCK_K': 64}, 4, 3), ({'BLOCK_M': 64, 'BLOCK_K': 64}, 8, 3),
                                      ({'BLOCK_M': 128, 'BLOCK_K': 64}, 8, 3), ({'BLOCK_M': 32, 'BLOCK_K': 64}, 4, 3),
                                      ({'BLOCK_M': 64, 'BLOCK_K': 32}, 8, 4), ({'BLOCK_M': 32, 'BLOCK_K': 32}, 4, 4)),
                     key=['ROWS_KEY', 'C', 'ABOVE', 'AFFINE'])
    @triton.jit
    def _hidden_layer_bwd(dpre_above_ptr, w_above_ptr, xhat_ptr, rstd_ptr, dpre_ptr, g_ptr, beta_ptr, dg_part_ptr,
                          dbeta_part_ptr, N, ROWS_KEY, C: tl.constexpr, ABOVE: tl.constexpr, AFFINE: tl.constexpr,
                          PART_M: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        """dpre = LayerNorm/ReLU backward of this layer's output gradient, for one (BLOCK_M, C) tile of rows.

        With ABOVE the output gradient is the layer above's dpre through its weights (``_grad_from_above``), so
        d(activation) is never stored: the pass reads dpre_above and xhat and writes dpre. Without, it is the
        gradient of phi's output, read from ``dpre_above_ptr`` (w_above_ptr unused).

        With AFFINE the layer's output is relu(xhat * g + beta) (the pixel generator's LayerNorm, g and beta (C,)),
        and the tile's shares of their gradients go to rows of dg_part and dbeta_part, (B, cdiv(N, PART_M), C)
        float32, summed afterwards: a program writes its share to the first of the BLOCK_M / PART_M rows its tile
        covers and zeros to the others, so every row is written whatever BLOCK_M the autotuner took."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, C)
        tile = rows[:, None] * C + cols[None, :]  # int32 offsets; the batch offset goes on the pointers
        if ABOVE:
            grad = _grad_from_above(dpre_above_ptr, w_above_ptr, b, rows, row_ok, N, C, PRECISION, BLOCK_M,
                                    BLOCK_K)
        else:
            grad = tl.load(dpre_above_ptr + b * N * C + tile, mask=row_ok[:, None], other=0.).to(tl.float32)
        if AFFINE:
            xhat, rstd = _layer_norm_saved(xhat_ptr, rstd_ptr, b, rows, row_ok, N, C)
            g = tl.load(g_ptr + cols).to(tl.float32)
            grad = tl.where(xhat * g[None, :] + tl.load(beta_ptr + cols).to(tl.float32)[None, :] > 0, grad, 0.)
            parts = tl.cdiv(N, PART_M)
            part = pid_m * (BLOCK_M // PART_M)
            dg_row = dg_part_ptr + (b * parts + part) * C + cols
            dbeta_row = dbeta_part_ptr + (b * parts + part) * C + cols
            tl.store(dg_row, tl.sum(grad * xhat, axis=0))  # rows past N hold xhat 0 and add nothing
            tl.store(dbeta_row, tl.sum(grad, axis=0))
            for j in tl.static_range(1, BLOCK_M // PART_M):
                covered = (cols * 0 + part + j) < parts  # (the last tile may reach past the last row's part)
                tl.store(dg_row + j * C, tl.zeros([C], dtype=tl.float32), mask=covered)
                tl.store(dbeta_row + j * C, tl.zeros([C], dtype=tl.float32), mask=covered)
            dpre = _layer_norm_bwd_of(grad * g[None, :], xhat, rstd, C)
        else:
            dpre = _layer_norm_relu_bwd(grad, xhat_ptr, rstd_ptr, b, rows, row_ok, N, C)
        tl.store(dpre_ptr + b * N * C + tile, dpre.to(dpre_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.autotune(configs=_configs('_hidden_layer_bwd_weights',
                                      ({'BLOCK_N': 64, 'BLOCK_R': 64}, 4, 3), ({'BLOCK_N': 64, 'BLOCK_R': 64}, 4, 4),
                                      ({'BLOCK_N': 64, 'BLOCK_R': 32}, 4, 4), ({'BLOCK_N': 128, 'BLOCK_R': 32}, 8, 4),
                                      ({'BLOCK_N': 128, 'BLOCK_R': 64}, 8, 3), ({'BLOCK_N': 128, 'BLOCK_R': 64}, 8, 4)),
                     key=['ROWS_KEY', 'C', 'SPLIT_ROWS', 'IN_AFFINE'])
    @triton.jit
    def _hidden_layer_bwd_weights(dpre_ptr, x_ptr, dw_ptr, db_ptr, in_g_ptr, in_beta_ptr, N, ROWS_KEY, SPLIT_ROWS,
                                  C: tl.constexpr, IN_RELU: tl.constexpr, IN_AFFINE: tl.constexpr,
                                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """dW = dpre^T @ relu(x) and db = sum of dpre over rows, for BLOCK_N rows of dW (all C columns) over one
        split of the rows; dpre and x, the stored output of the layer below, (B, N, C) (the operand relu(x) is
        ``_layer_input``'s, as in the forward).

        Each row of dpre is read once, by the program of its columns, and each row of x once a block of dW rows.
        The rows of an observation are split into S = cdiv(N, SPLIT_ROWS) runs of SPLIT_ROWS (a multiple of
        BLOCK_R), one program each, where there are too few observations to fill the GPU; program 1 counts
        (observation, split) pairs, and each writes its split's share: (B, S, C, C) and (B, S, C), which the
        caller sums (with S = 1 the gradients themselves).
        """
        pid_n, part = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b = part // tl.cdiv(N, SPLIT_ROWS)
        first = (part % tl.cdiv(N, SPLIT_ROWS)) * SPLIT_ROWS
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, C)
        acc = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, SPLIT_ROWS, BLOCK_R):
            rs = first + r0 + tl.arange(0, BLOCK_R)
            row_ok = rs < N
            d = tl.load(dpre_ptr + b * N * C + rs[:, None] * C + ns[None, :], mask=row_ok[:, None],
                        other=0.)  # (BLOCK_R, BLOCK_N)
            x = tl.load(x_ptr + b * N * C + rs[:, None] * C + cols[None, :], mask=row_ok[:, None], other=0.)
            x = _layer_input(x, in_g_ptr, in_beta_ptr, cols, d.dtype, IN_RELU, IN_AFFINE)
            acc = tl.dot(tl.trans(d), x, acc, input_precision=PRECISION)
            bias_acc += tl.sum(d.to(tl.float32), axis=0)
        tl.store(dw_ptr + part * C * C + ns[:, None] * C + cols[None, :], acc.to(dw_ptr.dtype.element_ty))
        tl.store(db_ptr + part * C + ns, bias_acc.to(db_ptr.dtype.element_ty))

    # The same kernel for float32 operands (the kernels' checks against the exact path). A (BLOCK_R, C) tile of x
    # is twice the bytes there, and the candidates above need up to 352 KB of shared memory, past the 227 KB of
    # an H100's multiprocessor (163 KB on an A100): these need at most 144 KB (kernel_resources.py --float32).
    _hidden_layer_bwd_weights_f32 = triton.autotune(
        configs=_configs('_hidden_layer_bwd_weights_f32',
                         ({'BLOCK_N': 64, 'BLOCK_R': 32}, 4, 3), ({'BLOCK_N': 64, 'BLOCK_R': 64}, 4, 2),
                         ({'BLOCK_N': 128, 'BLOCK_R': 32}, 8, 2)),
        key=['ROWS_KEY', 'C', 'SPLIT_ROWS', 'IN_AFFINE'])(_hidden_layer_bwd_weights.fn)

    @triton.autotune(configs=_configs('_input_layer_bwd',
                                      ({'BLOCK_M': 32, 'BLOCK_K': 64}, 4, 3), ({'BLOCK_M': 32, 'BLOCK_K': 32}, 4, 4),
                                      ({'BLOCK_M': 16, 'BLOCK_K': 64}, 4, 3), ({'BLOCK_M': 16, 'BLOCK_K': 32}, 4, 4),
                                      ({'BLOCK_M': 64, 'BLOCK_K': 32}, 8, 4)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _input_layer_bwd(dpre_above_ptr, w_above_ptr, stats_ptr, x_ptr, w_ptr, b_ptr, dx_ptr, dw_part_ptr,
                         db_part_ptr, N, ROWS_KEY, C: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """The input layer's backward for ROWS rows: dx (B, N, 3) and these rows' share of dW and db, from the
        first hidden layer's dpre and weights (its output gradient is formed here, ``_grad_from_above``) and the
        input layer's row statistics (B, N, 2), from which its xhat is formed again in float32; W0^T (B, 3, C).

        The shares (B, cdiv(N, ROWS), 3, C) and (B, cdiv(N, ROWS), C) are summed afterwards; float32 arithmetic.
        Each tile's rows are summed as it is done, so the running sums are (C,) vectors, not (BLOCK_M, C) tiles.
        """
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, C)
        w0 = tl.load(w_ptr + b * 3 * C + cols).to(tl.float32)  # W0^T (B, 3, C)
        w1 = tl.load(w_ptr + b * 3 * C + C + cols).to(tl.float32)
        w2 = tl.load(w_ptr + b * 3 * C + 2 * C + cols).to(tl.float32)
        dw0 = tl.zeros([C], dtype=tl.float32)
        dw1 = tl.zeros([C], dtype=tl.float32)
        dw2 = tl.zeros([C], dtype=tl.float32)
        db = tl.zeros([C], dtype=tl.float32)
        for r0 in range(0, ROWS, BLOCK_M):
            rows = pid_m * ROWS + r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            grad = _grad_from_above(dpre_above_ptr, w_above_ptr, b, rows, row_ok, N, C, PRECISION, BLOCK_M,
                                    BLOCK_K)
            x0, x1, x2 = _points(x_ptr, b, rows, row_ok, N)
            mean, rstd = _input_layer_stats(stats_ptr, b, rows, row_ok, N)
            xhat = _input_layer_xhat(x0, x1, x2, w_ptr, b_ptr, mean, rstd, b, cols, C)
            dpre = _layer_norm_relu_bwd_of(grad, xhat, rstd, C)  # (BLOCK_M, C); rows past N are 0 (rstd 0)
            tl.store(dx_ptr + b * N * 3 + rows * 3, tl.sum(dpre * w0[None, :], axis=1), mask=row_ok)
            tl.store(dx_ptr + b * N * 3 + rows * 3 + 1, tl.sum(dpre * w1[None, :], axis=1), mask=row_ok)
            tl.store(dx_ptr + b * N * 3 + rows * 3 + 2, tl.sum(dpre * w2[None, :], axis=1), mask=row_ok)
            dw0 += tl.sum(dpre * x0[:, None], axis=0)
            dw1 += tl.sum(dpre * x1[:, None], axis=0)
            dw2 += tl.sum(dpre * x2[:, None], axis=0)
            db += tl.sum(dpre, axis=0)
        part = b * tl.num_programs(0) + pid_m
        tl.store(dw_part_ptr + (part * 3) * C + cols, dw0)
        tl.store(dw_part_ptr + (part * 3 + 1) * C + cols, dw1)
        tl.store(dw_part_ptr + (part * 3 + 2) * C + cols, dw2)
        tl.store(db_part_ptr + part * C + cols, db)


INPUT_ROWS = 256  # rows per program in the input layer's backward
# Rows of a share of LayerNorm's scale and shift gradients in _hidden_layer_bwd: every candidate's BLOCK_M is a
# multiple of it.
PART_M = 32
# The hidden layers' weight gradients run a program per block of dW rows and observation: at 64 px (B 64, N 4096)
# 128 programs for the H100's 132 multiprocessors, each over all of its observation's rows. With fewer observations
# (128 px: B 16, N 16384) the rows are split into runs, about a program a multiprocessor, of at least WEIGHT_ROWS
# rows each, and the shares are summed in float32.
WEIGHT_ROWS = 512


def _multiprocessors(device):
    """The GPU's multiprocessors (PyTorch keeps each device's properties); for the interpreter on the CPU, an
    H100's 132."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 132


def _weight_splits(batch_size, num_points, device):
    """Runs of rows the weight gradients split each observation into: about a program a multiprocessor (two blocks
    of dW rows an observation and run), in runs of at least WEIGHT_ROWS rows. At 64 px x 64 that is 1 (no shares to
    sum), at 128 px x 16 4."""
    wanted = (_multiprocessors(device) + batch_size) // (2 * batch_size)  # rounded, in integers (sizes may be symbolic)
    return max(1, min(wanted, -(-num_points // WEIGHT_ROWS)))


def _split_rows(batch_size, num_points, device, split_rows=None):
    """The rows of a run of the weight gradients (default: ``_weight_splits`` runs an observation), rounded up to
    whole BLOCK_R steps of every candidate, as the kernel needs."""
    if split_rows is None:
        split_rows = triton.cdiv(num_points, _weight_splits(batch_size, num_points, device))
    return triton.cdiv(split_rows, 64) * 64


def _launch(kernel):
    """A kernel launcher torch.compile can trace (``wrap_triton``), or the kernel itself."""
    wrap = getattr(torch.library, 'wrap_triton', None)
    return wrap(kernel) if wrap is not None and not INTERPRET else kernel


def _precision(dtype):
    """float32 products stay float32 (IEEE), so the kernels can be checked against the exact path to ~1e-6."""
    return 'ieee' if dtype == torch.float32 else 'tf32'


def _rows_key(num_points):
    """What the autotuner keys on: the row count's power of two, capped at 4096, so that each new count
    (validation, ray batches, a last smaller batch) does not tune the kernels again."""
    return min(triton.next_power_of_2(num_points), 4096)


def _rows_grid(num_rows, batch_size):
    def grid(meta):
        return (triton.cdiv(num_rows, meta['BLOCK_M']), batch_size)
    return grid


def _phi_forward_impl(x, weights, biases, eps, normalize_last, keep=True):
    """[v (B, N, C), the input layer's row statistics (B, N, 2) (mean, 1/std), xhat of the input layer and of every
    normalised hidden layer (B, N, C), 1/std of every normalised hidden layer (B, N)]; without ``keep`` (no
    backward to come) only v."""
    batch_size, num_points, _ = x.shape
    rows_key = _rows_key(num_points)
    channels = weights[1].shape[-2]
    act_dtype = weights[1].dtype
    grid = _rows_grid(num_points, batch_size)

    def empty_rows(*shape, dtype=act_dtype):
        return torch.empty(batch_size, num_points, *shape, device=x.device, dtype=dtype)
    stats = empty_rows(2, dtype=torch.float32) if keep else x  # (without keep a pointer the kernel leaves alone)
    xhats, rstds = [empty_rows(channels)], []
    _launch(_input_layer_fwd)[grid](x, weights[0], biases[0], stats, xhats[0], num_points, rows_key, eps,
                                    C=channels, KEEP=keep)
    out = None
    for i in range(1, len(weights)):
        last = i == len(weights) - 1
        normalize = normalize_last or not last
        out = empty_rows(channels)
        rstd = empty_rows(dtype=torch.float32) if normalize and keep else out
        v = empty_rows(channels) if last and normalize and keep else out
        unused = biases[i]  # (LayerNorm's scale and shift pointers, which phi's layers do not have)
        _launch(_hidden_layer_fwd)[grid](xhats[-1], weights[i], biases[i], out, rstd, v, unused, unused, unused, unused,
                                         num_points, rows_key, eps, C=channels, NORMALIZE=normalize,
                                         WRITE_RELU=last and normalize, KEEP=keep, IN_RELU=True, IN_AFFINE=False,
                                         AFFINE=False, PRECISION=_precision(act_dtype))
        if normalize:  # (without keep, xhats[-1] is only the next layer's input)
            xhats.append(out), rstds.append(rstd)
        out = v
    return [out, stats, *xhats, *rstds] if keep else [out]


def _weight_gradients(dpre, x, dtype, rows_key, split_rows=None, x_relu=True, x_affine=None):
    """dW = dpre^T @ relu(x) (B, C, C) and db (B, C) of a hidden layer, in ``dtype``, from dpre and x (B, N, C), in
    runs of ``split_rows`` rows an observation (default: ``_weight_splits`` runs). The operand is relu(x) with
    ``x_relu``, else x; with ``x_affine`` (g, beta), relu(x * g + beta)."""
    batch_size, num_points, channels = dpre.shape
    split_rows = _split_rows(batch_size, num_points, dpre.device, split_rows)
    splits = triton.cdiv(num_points, split_rows)
    share_dtype = dtype if splits == 1 else torch.float32
    dw = torch.empty(batch_size * splits, channels, channels, device=dpre.device, dtype=share_dtype)
    db = torch.empty(batch_size * splits, channels, device=dpre.device, dtype=share_dtype)

    def grid(meta):
        return (triton.cdiv(channels, meta['BLOCK_N']), batch_size * splits)
    kernel = _hidden_layer_bwd_weights_f32 if dpre.element_size() > 2 else _hidden_layer_bwd_weights
    g, beta = x_affine if x_affine is not None else (db, db)
    _launch(kernel)[grid](dpre, x, dw, db, g, beta, num_points, rows_key, split_rows, C=channels, IN_RELU=x_relu,
                          IN_AFFINE=x_affine is not None, PRECISION=_precision(dtype))
    if splits == 1:
        return dw, db
    return (dw.view(batch_size, splits, channels, channels).sum(1).to(dtype),
            db.view(batch_size, splits, channels).sum(1).to(dtype))


def _phi_backward_impl(grad_v, x, weights, biases, stats, xhats, rstds):
    """[dx, dW_0, db_0, dW_1, db_1, ...] for the loss gradient ``grad_v`` (B, N, C) of phi's output, from the
    layers' weights and biases and what the forward kept: the input layer's row statistics, xhat of the input layer
    and of the normalised hidden layers, and their 1/std.

    From the top: each layer's d(pre-activation) dpre (B, N, C), formed from the one above it (one pass a layer:
    ``_hidden_layer_bwd``), then the weight gradients from dpre and the layer's input (``_weight_gradients``); the
    input layer's pass forms its own from the first hidden layer's dpre, and its xhat again (float32) from the
    points and its row statistics. It needs no LayerNorm epsilon: every 1/std it uses was stored by the forward."""
    batch_size, num_points, channels = grad_v.shape
    rows_key = _rows_key(num_points)
    grid = _rows_grid(num_points, batch_size)
    dtype = weights[1].dtype
    top = len(weights) - 1  # hidden layers 1..top; xhats[i] and rstds[i - 1] are layer i's, xhats[0] the input's

    def empty_rows(*shape, dtype=dtype):
        return torch.empty(batch_size, num_points, *shape, device=x.device, dtype=dtype)
    if len(rstds) == top:  # the last layer is normalised: LayerNorm/ReLU backward of phi's output gradient
        dpre = empty_rows(channels)
        _launch(_hidden_layer_bwd)[grid](grad_v, grad_v, xhats[top], rstds[top - 1], dpre, *[grad_v] * 4, num_points,
                                         rows_key, C=channels, ABOVE=False, AFFINE=False, PART_M=PART_M,
                                         PRECISION=_precision(dtype))
    else:  # a linear last layer
        dpre = grad_v.to(dtype)
    grads = []
    for i in range(top, 0, -1):
        grads = [*_weight_gradients(dpre, xhats[i - 1], dtype, rows_key), *grads]
        if i > 1:
            below = empty_rows(channels)
            _launch(_hidden_layer_bwd)[grid](dpre, weights[i], xhats[i - 1], rstds[i - 2], below, *[dpre] * 4,
                                             num_points, rows_key, C=channels, ABOVE=True, AFFINE=False,
                                             PART_M=PART_M, PRECISION=_precision(dtype))
            dpre = below
    # The input layer: float32, with the shares of dW and db of every INPUT_ROWS rows summed here.
    num_parts = triton.cdiv(num_points, INPUT_ROWS)
    dx = torch.empty_like(x)
    dw_part = torch.empty(batch_size, num_parts, 3, channels, device=x.device, dtype=torch.float32)
    db_part = torch.empty(batch_size, num_parts, channels, device=x.device, dtype=torch.float32)
    _launch(_input_layer_bwd)[(num_parts, batch_size)](dpre, weights[1], stats, x, weights[0], biases[0], dx, dw_part,
                                                       db_part, num_points, rows_key, C=channels, ROWS=INPUT_ROWS,
                                                       PRECISION=_precision(dtype))
    dw0 = dw_part.sum(1).to(weights[0].dtype)  # (B, 3, C), the gradient of W0^T
    db0 = db_part.sum(1).to(weights[0].dtype)
    return [dx, dw0, db0, *grads]


def _fc_forward_impl(v, weights, biases, gammas, betas, eps):
    """FCLayers (Linear C -> C, LayerNorm with scale g and shift beta, ReLU) over the rows of v (M, C), every row with
    the same weights: [h, the last layer's output (M, C); each layer's xhat (M, C); each layer's 1/std (M,)].

    The rows are one observation to the kernels (B = 1), which take W (C, C), b, g and beta (C,) as they are. The
    first layer's operand is v itself, each later one's relu(xhat * g + beta) of the layer below, formed as it is
    loaded (``_layer_input``), so only xhat and 1/std are stored, as in phi; the last layer also writes h."""
    num_rows, channels = v.shape
    rows_key = _rows_key(num_rows)
    grid = _rows_grid(num_rows, 1)
    act_dtype = weights[0].dtype
    h = torch.empty(num_rows, channels, device=v.device, dtype=act_dtype)
    xhats, rstds = [], []
    for i in range(len(weights)):
        xhats.append(torch.empty(num_rows, channels, device=v.device, dtype=act_dtype))
        rstds.append(torch.empty(num_rows, device=v.device, dtype=torch.float32))
        below = (gammas[i - 1], betas[i - 1]) if i else (gammas[i], betas[i])  # (unused by the first layer)
        _launch(_hidden_layer_fwd)[grid](xhats[i - 1] if i else v, weights[i], biases[i], xhats[i], rstds[i], h,
                                         *below, gammas[i], betas[i], num_rows, rows_key, eps, C=channels,
                                         NORMALIZE=True, WRITE_RELU=i == len(weights) - 1, KEEP=True, IN_RELU=i > 0,
                                         IN_AFFINE=i > 0, AFFINE=True, PRECISION=_precision(act_dtype))
    return [h, *xhats, *rstds]


def _fc_backward_impl(grad_h, v, weights, gammas, betas, xhats, rstds):
    """[dv, dW_0, db_0, dg_0, dbeta_0, dW_1, ...] of ``_fc_forward_impl`` for the loss gradient ``grad_h`` (M, C)
    of its output, from what the forward kept.

    From the top, as phi's backward: each layer's dpre from the one above (``_hidden_layer_bwd`` with the layer's
    scale and shift, which also sums their gradients in shares of PART_M rows), then its weight gradients from dpre
    and its operand; dv = dpre_0 @ W_0 last."""
    num_rows, channels = grad_h.shape
    rows_key = _rows_key(num_rows)
    grid = _rows_grid(num_rows, 1)
    dtype = weights[0].dtype
    num_parts = triton.cdiv(num_rows, PART_M)

    def layer_norm_bwd(grad, w_above, i):  # dpre of layer i, and its dg and dbeta, from d(output) or dpre above
        dpre = torch.empty(num_rows, channels, device=grad.device, dtype=dtype)
        dg_part, dbeta_part = torch.empty(2, num_parts, channels, device=grad.device, dtype=torch.float32)
        _launch(_hidden_layer_bwd)[grid](grad, grad if w_above is None else w_above, xhats[i], rstds[i], dpre,
                                         gammas[i], betas[i], dg_part, dbeta_part, num_rows, rows_key, C=channels,
                                         ABOVE=w_above is not None, AFFINE=True, PART_M=PART_M,
                                         PRECISION=_precision(dtype))
        return dpre, dg_part.sum(0).to(gammas[i].dtype), dbeta_part.sum(0).to(betas[i].dtype)

    top = len(weights) - 1
    dpre, dg, dbeta = layer_norm_bwd(grad_h.to(dtype), None, top)
    grads = []
    for i in range(top, -1, -1):
        operand = xhats[i - 1] if i else v
        dw, db = _weight_gradients(dpre[None], operand[None], dtype, rows_key, x_relu=i > 0,
                                   x_affine=(gammas[i - 1], betas[i - 1]) if i else None)
        grads = [dw[0], db[0], dg, dbeta, *grads]
        if i:
            dpre, dg, dbeta = layer_norm_bwd(dpre, weights[i], i - 1)
    return [dpre @ weights[0], *grads]


def _register():
    """The forward and backward as custom operators with autograd, which torch.compile traces into."""
    @torch.library.triton_op('srn::phi_forward', mutates_args=())
    def _phi_forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                     eps: float, normalize_last: bool, source: str) -> list[torch.Tensor]:
        return _phi_forward_impl(x, weights, biases, eps, normalize_last)

    @torch.library.triton_op('srn::phi_inference', mutates_args=())
    def _phi_inference(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                       eps: float, normalize_last: bool, source: str) -> torch.Tensor:
        return _phi_forward_impl(x, weights, biases, eps, normalize_last, keep=False)[0]

    @torch.library.triton_op('srn::phi_backward', mutates_args=())
    def _phi_backward(grad_v: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                      stats: torch.Tensor, xhats: list[torch.Tensor], rstds: list[torch.Tensor],
                      source: str) -> list[torch.Tensor]:
        return _phi_backward_impl(grad_v, x, weights, biases, stats, xhats, rstds)

    def _setup_context(ctx, inputs, output):
        x, weights, biases, _, normalize_last, _ = inputs  # LayerNorm's eps: the backward needs none
        hidden = len(weights) - 1
        num_norm = hidden if normalize_last else hidden - 1  # normalised hidden layers
        stats, xhats, rstds = output[1], output[2:3 + num_norm], output[3 + num_norm:]  # xhats[0]: input layer's
        ctx.num_layers, ctx.num_norm = len(weights), num_norm
        ctx.save_for_backward(x, stats, *weights, *biases, *xhats, *rstds)
        ctx.mark_non_differentiable(stats, *xhats, *rstds)

    def _backward(ctx, grads):
        saved = ctx.saved_tensors
        n, m = ctx.num_layers, ctx.num_norm
        x, stats, weights, biases = saved[0], saved[1], list(saved[2:2 + n]), list(saved[2 + n:2 + 2 * n])
        xhats, rstds = list(saved[2 + 2 * n:3 + 2 * n + m]), list(saved[3 + 2 * n + m:])
        flat = _phi_backward(grads[0].contiguous(), x, weights, biases, stats, xhats, rstds, SOURCE_KEY)
        return flat[0], flat[1::2], flat[2::2], None, None, None

    torch.library.register_autograd('srn::phi_forward', _backward, setup_context=_setup_context)

    @torch.library.triton_op('srn::fc_forward', mutates_args=())
    def _fc_forward(v: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                    gammas: list[torch.Tensor], betas: list[torch.Tensor], eps: float,
                    source: str) -> list[torch.Tensor]:
        return _fc_forward_impl(v, weights, biases, gammas, betas, eps)

    @torch.library.triton_op('srn::fc_backward', mutates_args=())
    def _fc_backward(grad_h: torch.Tensor, v: torch.Tensor, weights: list[torch.Tensor], gammas: list[torch.Tensor],
                     betas: list[torch.Tensor], xhats: list[torch.Tensor], rstds: list[torch.Tensor],
                     source: str) -> list[torch.Tensor]:
        return _fc_backward_impl(grad_h, v, weights, gammas, betas, xhats, rstds)

    def _fc_setup_context(ctx, inputs, output):
        v, weights, _, gammas, betas, _, _ = inputs
        ctx.num_layers = len(weights)
        ctx.save_for_backward(v, *weights, *gammas, *betas, *output[1:])
        ctx.mark_non_differentiable(*output[1:])

    def _fc_backward_of(ctx, grads):
        saved, n = ctx.saved_tensors, ctx.num_layers
        v, weights, gammas, betas = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n]
        xhats, rstds = saved[1 + 3 * n:1 + 4 * n], saved[1 + 4 * n:]
        flat = _fc_backward(grads[0].contiguous(), v, list(weights), list(gammas), list(betas), list(xhats),
                            list(rstds), SOURCE_KEY)
        return flat[0], flat[1::4], flat[2::4], flat[3::4], flat[4::4], None, None

    torch.library.register_autograd('srn::fc_forward', _fc_backward_of, setup_context=_fc_setup_context)


_REGISTERED = False
if triton is not None and hasattr(torch.library, 'triton_op'):
    try:
        _register()
        _REGISTERED = True
    except Exception as error:  # an older PyTorch whose custom-operator API differs: keep the PyTorch path
        warnings.warn(f"kernels.py: the fused kernels are unavailable ({error}); phi runs on PyTorch layers")


def phi(x, layers, eps=1e-5):
    """phi(x) with the fused kernels: ``hyperlayers.HypoNetwork(layers)(x)`` under bfloat16 autocast.

    :param x: (B, N, 3) world coordinates
    :param layers: [(weights (B, C, in), biases (B, 1, C), normalize)] as HypoNetwork holds them; every layer
        but perhaps the last is normalised (LayerNorm without affine, then ReLU)
    :return: v (B, N, C) in the activations' dtype (bfloat16 under autocast)
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        # The input layer's W0 goes in transposed, (B, 3, C), so that the kernels read each coordinate's weights
        # contiguously; autograd takes its gradient back through the transpose.
        weights = [layers[0][0].float().transpose(1, 2).contiguous()]
        weights += [w.to(dtype).contiguous() for w, _, _ in layers[1:]]
        biases = [layers[0][1].float().reshape(x.shape[0], -1).contiguous()]
        biases += [b.to(dtype).reshape(x.shape[0], -1).contiguous() for _, b, _ in layers[1:]]
        x = x.float().contiguous()
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases)):
            return torch.ops.srn.phi_forward(x, weights, biases, eps, layers[-1][2], SOURCE_KEY)[0]
        # No backward to come (rendering, validation): the last layer stores phi's output alone.
        return torch.ops.srn.phi_inference(x, weights, biases, eps, layers[-1][2], SOURCE_KEY)


def supports_fc(x, layers, eps):
    """Whether ``fc_layers(x, layers, eps)`` has fused kernels: FCLayers C -> C (C a power of two >= 256), one LayerNorm
    epsilon, on a CUDA device (or the CPU under the interpreter), and fewer than 2^31 values (the kernels' offsets
    within the one observation the rows make are int32)."""
    if not _REGISTERED or not (x.is_cuda or (INTERPRET and x.device.type == 'cpu')) or not layers:
        return False
    channels = x.shape[-1]
    if channels & (channels - 1) or channels < MIN_CHANNELS or x.numel() >= 2 ** 31 or len(set(eps)) != 1:
        return False
    return all(w.shape == (channels, channels) and b.shape == g.shape == beta.shape == (channels,)
               for w, b, g, beta in layers)


def fc_layers(x, layers, eps=1e-5):
    """FCLayers (``custom_layers.FCLayer``: Linear, LayerNorm with affine parameters, ReLU) C -> C with the fused
    kernels, what ``custom_layers.FCBlock`` computes with them under bfloat16 autocast.

    :param x: (..., C)
    :param layers: [(Linear weight (C, C), its bias (C,), LayerNorm weight (C,), its bias (C,))]
    :return: (..., C) in the activations' dtype (bfloat16 under autocast)
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        # LayerNorm's scale and shift in the activations' dtype, as custom_layers.layer_norm_relu gives them
        weights, biases, gammas, betas = ([t.to(dtype).contiguous() for t in ts] for ts in zip(*layers))
        v = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        h = torch.ops.srn.fc_forward(v, weights, biases, gammas, betas, eps, SOURCE_KEY)[0]
    return h.view(*x.shape[:-1], h.shape[-1])
