"""Fused GPU kernels (Triton) for phi, the hot path of SRN training and rendering.

phi (paper section 3.1, its weights made per scene by the hypernetwork of section 3.3) is evaluated at every
ray-marching step and once more for the pixel generator: 11 times a step, on every ray. In PyTorch each of its
layers is a batched matrix product followed by LayerNorm (no affine) and ReLU, and each of those writes and reads
a (B, N, 256) activation; that memory traffic, not arithmetic, bounds the step (benchmarks/NOTES.md, "profile").

``phi`` here computes what ``hyperlayers.HypoNetwork`` computes, with one kernel per layer that keeps a
256-wide row in registers from the matrix product through LayerNorm, and the matching backward:

- forward, per layer: ``relu(x_prev) @ W^T + b -> LayerNorm`` in one pass; it stores the normalised values
  *before* the ReLU (xhat, what the backward needs) and 1/std per row, and the next layer applies the ReLU as
  it loads them. The input layer (3 -> 256) runs in float32, as ``HypoNetwork`` does under autocast.
- backward, per layer: LayerNorm's backward (gated by the ReLU) and the product with W in one pass, then the
  weight gradient ``dpre^T @ relu(x_prev)`` with the bias gradient in a second kernel.

Tolerance: the kernels take bfloat16 activations and weights (float32 for the input layer) with float32
accumulation, like PyTorch's bf16 path; they differ from it only in rounding (LayerNorm here sees the float32
product where PyTorch rounds it to bf16 first). ``tests/test_kernels.py`` holds outputs and gradients to the
PyTorch path in the same precision. The exact (float32) path never uses these kernels.

The switch: ``SRNsModel.use_fused_kernels(True)`` (train.py ``--kernels``); the PyTorch code in
hyperlayers.py stays the definition. Without Triton (CPU builds of PyTorch) ``available()`` is False.

Shape vocabulary: ``B`` observations, ``N`` points per observation, ``C`` = 256 channels, ``K`` input channels.
"""
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton; the PyTorch path is used then
    triton = None

# TRITON_INTERPRET=1 runs the kernels on the CPU (slowly), which is how the tests check them without a GPU.
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
# SRN_KERNELS_AUTOTUNE=0 skips autotuning (first candidate of each kernel): quick compiles, e.g. for tests.
AUTOTUNE = os.environ.get('SRN_KERNELS_AUTOTUNE', '1') != '0' and not INTERPRET


# The widest tile of the autotuning candidates is 256 columns; the interpreter runs only the first candidate,
# whose tiles are at most 128 wide, so the tests can use C = 128 there.
MIN_CHANNELS = 128 if INTERPRET else 256


def available():
    """Whether the fused kernels can run here: Triton is installed and a CUDA device (or the interpreter) exists."""
    return _REGISTERED and (torch.cuda.is_available() or INTERPRET)


def supports(x, layers):
    """Whether ``phi(x, layers)`` has a fused kernel: phi's layout (3 -> C -> ... -> C, C a power of two >= 256, every
    layer normalised, or all but the last) on tensors of a device the kernels run on."""
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
    def _configs(*configs):
        """Autotuning candidates ((meta-parameters, num_warps, num_stages) each); only the first without AUTOTUNE.

        A (rows, 256) float32 tile costs rows * 256 / (32 * num_warps) registers a thread; the candidates keep the
        LayerNorm kernels' live tiles small enough not to spill.
        """
        configs = [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in configs]
        return configs if AUTOTUNE else configs[:1]

    @triton.autotune(configs=_configs(({'BLOCK_M': 16}, 4, 1), ({'BLOCK_M': 32}, 4, 1), ({'BLOCK_M': 32}, 8, 1),
                                      ({'BLOCK_M': 64}, 8, 1)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _input_layer_fwd(x_ptr, w_ptr, b_ptr, xhat_ptr, rstd_ptr, N, ROWS_KEY, eps,
                         C: tl.constexpr, BLOCK_M: tl.constexpr):
        """xhat = LayerNorm(x @ W^T + b) for x (B, N, 3) float32, W (B, C, 3), b (B, C); float32 arithmetic."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, C)
        acc = tl.zeros([BLOCK_M, C], dtype=tl.float32) + tl.load(b_ptr + b * C + cols).to(tl.float32)[None, :]
        for k in tl.static_range(3):
            xk = tl.load(x_ptr + b * N * 3 + rows * 3 + k, mask=row_ok, other=0.).to(tl.float32)
            wk = tl.load(w_ptr + b * C * 3 + cols * 3 + k).to(tl.float32)
            acc += xk[:, None] * wk[None, :]
        mean = tl.sum(acc, axis=1) / C
        centred = acc - mean[:, None]
        rstd = 1. / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        tl.store(rstd_ptr + b * N + rows, rstd, mask=row_ok)
        tl.store(xhat_ptr + b * N * C + rows[:, None] * C + cols[None, :],
                 (centred * rstd[:, None]).to(xhat_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.autotune(configs=_configs(({'BLOCK_M': 64, 'BLOCK_K': 64}, 4, 3), ({'BLOCK_M': 64, 'BLOCK_K': 64}, 8, 3),
                                      ({'BLOCK_M': 128, 'BLOCK_K': 64}, 8, 3), ({'BLOCK_M': 32, 'BLOCK_K': 64}, 4, 3),
                                      ({'BLOCK_M': 64, 'BLOCK_K': 32}, 8, 4), ({'BLOCK_M': 128, 'BLOCK_K': 32}, 8, 4)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _hidden_layer_fwd(x_ptr, w_ptr, b_ptr, out_ptr, rstd_ptr, relu_ptr, N, ROWS_KEY, eps,
                          C: tl.constexpr, NORMALIZE: tl.constexpr, WRITE_RELU: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """out = LayerNorm(relu(x) @ W^T + b) (or without LayerNorm) for x (B, N, C), W (B, C, C), b (B, C);
        with WRITE_RELU also relu(out), phi's output."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, C)
        acc = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + b * N * C + rows[:, None] * C + ks[None, :], mask=row_ok[:, None], other=0.)
            x = tl.where(x > 0, x, 0.).to(w_ptr.dtype.element_ty)  # the previous layer's ReLU
            w_t = tl.load(w_ptr + b * C * C + cols[None, :] * C + ks[:, None])  # (BLOCK_K, C) = W^T
            acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
        acc += tl.load(b_ptr + b * C + cols).to(tl.float32)[None, :]
        if NORMALIZE:
            mean = tl.sum(acc, axis=1) / C
            acc = acc - mean[:, None]
            rstd = 1. / tl.sqrt(tl.sum(acc * acc, axis=1) / C + eps)
            acc = acc * rstd[:, None]
            tl.store(rstd_ptr + b * N + rows, rstd, mask=row_ok)
        tile = rows[:, None] * C + cols[None, :]  # int32 offsets; the batch offset goes on the pointers
        tl.store(out_ptr + b * N * C + tile, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_RELU:
            tl.store(relu_ptr + b * N * C + tile, tl.maximum(acc, 0.).to(relu_ptr.dtype.element_ty),
                     mask=row_ok[:, None])

    @triton.jit
    def _layer_norm_relu_bwd(grad, xhat_ptr, rstd_ptr, b, rows, row_ok, N, C: tl.constexpr):
        """d(pre-LayerNorm) from d(relu output) for a (BLOCK_M, C) tile, float32."""
        cols = tl.arange(0, C)
        xhat = tl.load(xhat_ptr + b * N * C + rows[:, None] * C + cols[None, :], mask=row_ok[:, None],
                       other=0.).to(tl.float32)
        rstd = tl.load(rstd_ptr + b * N + rows, mask=row_ok, other=0.)
        grad = tl.where(xhat > 0, grad, 0.)  # ReLU
        mean_grad = tl.sum(grad, axis=1) / C
        mean_grad_xhat = tl.sum(grad * xhat, axis=1) / C
        return rstd[:, None] * (grad - mean_grad[:, None] - xhat * mean_grad_xhat[:, None])

    @triton.autotune(configs=_configs(({'BLOCK_M': 32, 'BLOCK_N': 64}, 4, 1), ({'BLOCK_M': 32, 'BLOCK_N': 128}, 8, 1),
                                      ({'BLOCK_M': 64, 'BLOCK_N': 64}, 8, 1), ({'BLOCK_M': 64, 'BLOCK_N': 128}, 8, 1),
                                      ({'BLOCK_M': 16, 'BLOCK_N': 128}, 4, 1), ({'BLOCK_M': 64, 'BLOCK_N': 256}, 8, 1)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _hidden_layer_bwd_input(grad_ptr, xhat_ptr, rstd_ptr, w_ptr, dpre_ptr, dx_ptr, N, ROWS_KEY,
                                C: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dpre = LayerNorm/ReLU backward of grad (stored), dx = dpre @ W, for one (BLOCK_M, C) tile of rows."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, C)
        tile = rows[:, None] * C + cols[None, :]  # int32 offsets; the batch offset goes on the pointers
        grad = tl.load(grad_ptr + b * N * C + tile, mask=row_ok[:, None], other=0.).to(tl.float32)
        if NORMALIZE:
            dpre = _layer_norm_relu_bwd(grad, xhat_ptr, rstd_ptr, b, rows, row_ok, N, C)
            dpre = dpre.to(w_ptr.dtype.element_ty)
            tl.store(dpre_ptr + b * N * C + tile, dpre, mask=row_ok[:, None])
        else:
            dpre = grad.to(w_ptr.dtype.element_ty)
        for n0 in tl.static_range(0, C, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            w = tl.load(w_ptr + b * C * C + cols[:, None] * C + ns[None, :])  # (C, BLOCK_N)
            dx = tl.dot(dpre, w, input_precision=PRECISION)
            tl.store(dx_ptr + b * N * C + rows[:, None] * C + ns[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None])

    @triton.autotune(configs=_configs(({'BLOCK_N': 128, 'BLOCK_K': 128, 'BLOCK_R': 64}, 8, 3),
                                      ({'BLOCK_N': 128, 'BLOCK_K': 128, 'BLOCK_R': 32}, 8, 4),
                                      ({'BLOCK_N': 128, 'BLOCK_K': 64, 'BLOCK_R': 64}, 4, 3),
                                      ({'BLOCK_N': 256, 'BLOCK_K': 64, 'BLOCK_R': 64}, 8, 3),
                                      ({'BLOCK_N': 256, 'BLOCK_K': 128, 'BLOCK_R': 32}, 8, 3)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _hidden_layer_bwd_weights(dpre_ptr, x_ptr, dw_ptr, db_ptr, N, ROWS_KEY,
                                  C: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """dW = dpre^T @ relu(x) (B, C, C) and db = sum of dpre over rows (B, C), for one (BLOCK_N, BLOCK_K) tile."""
        pid_n, pid_k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, N, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            row_ok = rs < N
            dpre_t = tl.load(dpre_ptr + b * N * C + rs[None, :] * C + ns[:, None], mask=row_ok[None, :],
                             other=0.)  # (BLOCK_N, BLOCK_R)
            x = tl.load(x_ptr + b * N * C + rs[:, None] * C + ks[None, :], mask=row_ok[:, None], other=0.)
            x = tl.where(x > 0, x, 0.).to(dpre_t.dtype)  # the previous layer's ReLU
            acc = tl.dot(dpre_t, x, acc, input_precision=PRECISION)
            if pid_k == 0:
                bias_acc += tl.sum(dpre_t.to(tl.float32), axis=1)
        tl.store(dw_ptr + b * C * C + ns[:, None] * C + ks[None, :], acc.to(dw_ptr.dtype.element_ty))
        if pid_k == 0:
            tl.store(db_ptr + b * C + ns, bias_acc.to(db_ptr.dtype.element_ty))

    @triton.autotune(configs=_configs(({'BLOCK_M': 16}, 4, 1), ({'BLOCK_M': 32}, 4, 1), ({'BLOCK_M': 32}, 8, 1),
                                      ({'BLOCK_M': 64}, 8, 1)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _input_layer_bwd(grad_ptr, xhat_ptr, rstd_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, db_part_ptr, N, ROWS_KEY,
                         C: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
        """The input layer's backward for ROWS rows: dx (B, N, 3) and these rows' share of dW and db.

        The shares (B, cdiv(N, ROWS), 3, C) and (B, cdiv(N, ROWS), C) are summed afterwards; float32 throughout.
        """
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, C)
        w0 = tl.load(w_ptr + b * C * 3 + cols * 3).to(tl.float32)
        w1 = tl.load(w_ptr + b * C * 3 + cols * 3 + 1).to(tl.float32)
        w2 = tl.load(w_ptr + b * C * 3 + cols * 3 + 2).to(tl.float32)
        # (BLOCK_M, C) running sums, reduced over rows once at the end
        dw0 = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        dw2 = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        db = tl.zeros([BLOCK_M, C], dtype=tl.float32)
        for r0 in range(0, ROWS, BLOCK_M):
            rows = pid_m * ROWS + r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            grad = tl.load(grad_ptr + b * N * C + rows[:, None] * C + cols[None, :], mask=row_ok[:, None],
                           other=0.).to(tl.float32)
            dpre = _layer_norm_relu_bwd(grad, xhat_ptr, rstd_ptr, b, rows, row_ok, N, C)
            point = x_ptr + b * N * 3 + rows * 3
            tl.store(dx_ptr + b * N * 3 + rows * 3, tl.sum(dpre * w0[None, :], axis=1), mask=row_ok)
            tl.store(dx_ptr + b * N * 3 + rows * 3 + 1, tl.sum(dpre * w1[None, :], axis=1), mask=row_ok)
            tl.store(dx_ptr + b * N * 3 + rows * 3 + 2, tl.sum(dpre * w2[None, :], axis=1), mask=row_ok)
            dw0 += dpre * tl.load(point, mask=row_ok, other=0.)[:, None]
            dw1 += dpre * tl.load(point + 1, mask=row_ok, other=0.)[:, None]
            dw2 += dpre * tl.load(point + 2, mask=row_ok, other=0.)[:, None]
            db += dpre
        part = b * tl.num_programs(0) + pid_m
        tl.store(dw_part_ptr + (part * 3) * C + cols, tl.sum(dw0, axis=0))
        tl.store(dw_part_ptr + (part * 3 + 1) * C + cols, tl.sum(dw1, axis=0))
        tl.store(dw_part_ptr + (part * 3 + 2) * C + cols, tl.sum(dw2, axis=0))
        tl.store(db_part_ptr + part * C + cols, tl.sum(db, axis=0))


    # --- phi in two kernels: every layer of a tile of rows in one program (forward), and back (backward) ----------
    # A 256-wide row is held as two halves of C // 2 columns ("lo" and "hi"): Triton cannot slice a register tensor,
    # and a product with a whole 256 x 256 matrix would need it in registers at once. Each layer's product is then
    # four (BLOCK_M, H) x (H, H) products with quarters of W, and LayerNorm's row statistics add the two halves.

    @triton.jit
    def _layer_norm_halves(lo, hi, C: tl.constexpr, eps):
        """LayerNorm (no affine) of rows held as two halves: (xhat_lo, xhat_hi, 1/std), float32."""
        mean = (tl.sum(lo, axis=1) + tl.sum(hi, axis=1)) / C
        lo, hi = lo - mean[:, None], hi - mean[:, None]
        rstd = 1. / tl.sqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / C + eps)
        return lo * rstd[:, None], hi * rstd[:, None], rstd

    @triton.jit
    def _layer_norm_relu_bwd_halves(g_lo, g_hi, xh_lo, xh_hi, rstd, C: tl.constexpr):
        """d(pre-LayerNorm) from d(ReLU output) for rows held as halves, float32."""
        g_lo, g_hi = tl.where(xh_lo > 0, g_lo, 0.), tl.where(xh_hi > 0, g_hi, 0.)
        mean_g = (tl.sum(g_lo, axis=1) + tl.sum(g_hi, axis=1)) / C
        mean_gx = (tl.sum(g_lo * xh_lo, axis=1) + tl.sum(g_hi * xh_hi, axis=1)) / C
        d_lo = rstd[:, None] * (g_lo - mean_g[:, None] - xh_lo * mean_gx[:, None])
        d_hi = rstd[:, None] * (g_hi - mean_g[:, None] - xh_hi * mean_gx[:, None])
        return d_lo, d_hi

    @triton.jit
    def _product_halves(a_lo, a_hi, w_ptr, C: tl.constexpr, H: tl.constexpr, TRANSPOSED: tl.constexpr,
                        PRECISION: tl.constexpr):
        """(a_lo | a_hi) @ M for the (C, C) matrix at w_ptr: M = W^T with TRANSPOSED (a layer's forward), else W
        (its backward to the input); returned as two float32 halves of columns."""
        i, j = tl.arange(0, H)[:, None], tl.arange(0, H)[None, :]  # M[i, j] of a quarter
        if TRANSPOSED:
            offs = j * C + i  # M[k, n] = W[n, k]
        else:
            offs = i * C + j
        step_row, step_col = (H, H * C) if TRANSPOSED else (H * C, H)
        out_lo = tl.dot(a_lo, tl.load(w_ptr + offs), input_precision=PRECISION)
        out_lo = tl.dot(a_hi, tl.load(w_ptr + offs + step_row), out_lo, input_precision=PRECISION)
        out_hi = tl.dot(a_lo, tl.load(w_ptr + offs + step_col), input_precision=PRECISION)
        out_hi = tl.dot(a_hi, tl.load(w_ptr + offs + step_row + step_col), out_hi, input_precision=PRECISION)
        return out_lo, out_hi

    @triton.autotune(configs=_configs(({'BLOCK_M': 64}, 8, 1), ({'BLOCK_M': 32}, 4, 1), ({'BLOCK_M': 64}, 4, 1),
                                      ({'BLOCK_M': 128}, 8, 1)),
                     key=['ROWS_KEY', 'C'])
    @triton.jit
    def _phi_fwd(x_ptr, w0_ptr, b0_ptr, w_ptr, b_ptr, xhat_ptr, rstd_ptr, v_ptr, B, N, ROWS_KEY, eps,
                 C: tl.constexpr, L: tl.constexpr, NORMALIZE_LAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr):
        """phi for a tile of rows: the float32 input layer 3 -> C, then L layers C -> C, each LayerNorm + ReLU
        (the last perhaps linear). Stores every normalised layer's xhat (M, B, N, C) and 1/std (M, B, N), and
        v (B, N, C). Weights: W_0 (B, C, 3), b_0 (B, C) float32; W (L, B, C, C), b (L, B, C)."""
        H: tl.constexpr = C // 2
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, H)
        tile = rows[:, None] * C + cols[None, :]
        lo = tl.zeros([BLOCK_M, H], dtype=tl.float32) + tl.load(b0_ptr + b * C + cols)[None, :]
        hi = tl.zeros([BLOCK_M, H], dtype=tl.float32) + tl.load(b0_ptr + b * C + H + cols)[None, :]
        for k in tl.static_range(3):
            xk = tl.load(x_ptr + b * N * 3 + rows * 3 + k, mask=row_ok, other=0.)[:, None]
            lo += xk * tl.load(w0_ptr + b * C * 3 + cols * 3 + k)[None, :]
            hi += xk * tl.load(w0_ptr + b * C * 3 + (H + cols) * 3 + k)[None, :]
        lo, hi, rstd = _layer_norm_halves(lo, hi, C, eps)
        tl.store(rstd_ptr + b * N + rows, rstd, mask=row_ok)
        act = xhat_ptr + b * N * C
        tl.store(act + tile, lo.to(xhat_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(act + H + tile, hi.to(xhat_ptr.dtype.element_ty), mask=row_ok[:, None])
        for i in tl.static_range(L):
            a_lo = tl.maximum(lo, 0.).to(w_ptr.dtype.element_ty)
            a_hi = tl.maximum(hi, 0.).to(w_ptr.dtype.element_ty)
            lo, hi = _product_halves(a_lo, a_hi, w_ptr + (i * B + b) * C * C, C, H, True, PRECISION)
            lo += tl.load(b_ptr + (i * B + b) * C + cols).to(tl.float32)[None, :]
            hi += tl.load(b_ptr + (i * B + b) * C + H + cols).to(tl.float32)[None, :]
            if NORMALIZE_LAST or i < L - 1:
                lo, hi, rstd = _layer_norm_halves(lo, hi, C, eps)
                tl.store(rstd_ptr + ((i + 1) * B + b) * N + rows, rstd, mask=row_ok)
                act = xhat_ptr + ((i + 1) * B + b) * N * C
                tl.store(act + tile, lo.to(xhat_ptr.dtype.element_ty), mask=row_ok[:, None])
                tl.store(act + H + tile, hi.to(xhat_ptr.dtype.element_ty), mask=row_ok[:, None])
        if NORMALIZE_LAST:
            lo, hi = tl.maximum(lo, 0.), tl.maximum(hi, 0.)
        tl.store(v_ptr + b * N * C + tile, lo.to(v_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(v_ptr + b * N * C + H + tile, hi.to(v_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.autotune(configs=_configs(({}, 8, 1), ({}, 4, 1), ({}, 16, 1)), key=['ROWS_KEY', 'C', 'BLOCK_M'])
    @triton.jit
    def _phi_bwd(grad_ptr, x_ptr, w0_ptr, w_ptr, xhat_ptr, rstd_ptr, dpre_ptr, relu_ptr, dx_ptr, part_ptr,
                 B, N, ROWS_KEY, C: tl.constexpr, L: tl.constexpr, NORMALIZE_LAST: tl.constexpr,
                 STORE_RELU: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
        """phi's backward for a tile of rows, from the gradient of v (B, N, C) down to the points: dx (B, N, 3)
        float32; each layer's d(pre-activation) (L, B, N, C), for its weight gradient (with STORE_RELU also
        relu(xhat) of the layer below, (L, B, N, C), that product's other operand); and this tile's sums over rows
        (float32) for the bias gradients and the input layer's weight gradient, part_ptr (B, tiles, L + 4, C):
        slots 0..L-1 the biases of layers 1..L, L..L+2 the columns of dW_0, L+3 the bias of layer 0."""
        H: tl.constexpr = C // 2
        M: tl.constexpr = L + 1 if NORMALIZE_LAST else L  # normalised layers
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = tl.arange(0, H)
        tile = rows[:, None] * C + cols[None, :]
        part = part_ptr + (b * tl.num_programs(0) + pid_m) * (L + 4) * C
        g_lo = tl.load(grad_ptr + b * N * C + tile, mask=row_ok[:, None], other=0.).to(tl.float32)
        g_hi = tl.load(grad_ptr + b * N * C + H + tile, mask=row_ok[:, None], other=0.).to(tl.float32)
        for j in tl.static_range(L, -1, -1):  # layer j: the layers L..1 (C -> C), then the input layer 0
            if j < M:  # LayerNorm + ReLU backward
                act = xhat_ptr + (j * B + b) * N * C
                xh_lo = tl.load(act + tile, mask=row_ok[:, None], other=0.).to(tl.float32)
                xh_hi = tl.load(act + H + tile, mask=row_ok[:, None], other=0.).to(tl.float32)
                rstd = tl.load(rstd_ptr + (j * B + b) * N + rows, mask=row_ok, other=0.)
                if STORE_RELU and j < L:  # relu(xhat_j), the input of layer j + 1
                    act = relu_ptr + (j * B + b) * N * C
                    tl.store(act + tile, tl.maximum(xh_lo, 0.).to(relu_ptr.dtype.element_ty), mask=row_ok[:, None])
                    tl.store(act + H + tile, tl.maximum(xh_hi, 0.).to(relu_ptr.dtype.element_ty),
                             mask=row_ok[:, None])
                d_lo, d_hi = _layer_norm_relu_bwd_halves(g_lo, g_hi, xh_lo, xh_hi, rstd, C)
            else:  # a linear last layer
                d_lo, d_hi = g_lo, g_hi
            if j > 0:
                d_lo, d_hi = d_lo.to(w_ptr.dtype.element_ty), d_hi.to(w_ptr.dtype.element_ty)
                act = dpre_ptr + ((j - 1) * B + b) * N * C
                tl.store(act + tile, d_lo, mask=row_ok[:, None])
                tl.store(act + H + tile, d_hi, mask=row_ok[:, None])
                tl.store(part + (j - 1) * C + cols, tl.sum(d_lo.to(tl.float32), axis=0))  # masked rows are 0
                tl.store(part + (j - 1) * C + H + cols, tl.sum(d_hi.to(tl.float32), axis=0))
                g_lo, g_hi = _product_halves(d_lo, d_hi, w_ptr + ((j - 1) * B + b) * C * C, C, H, False, PRECISION)
            else:  # the input layer (float32): dx, and the sums for dW_0 and b_0
                w0 = w0_ptr + b * C * 3
                for k in tl.static_range(3):
                    dxk = (tl.sum(d_lo * tl.load(w0 + cols * 3 + k)[None, :], axis=1)
                           + tl.sum(d_hi * tl.load(w0 + (H + cols) * 3 + k)[None, :], axis=1))
                    tl.store(dx_ptr + b * N * 3 + rows * 3 + k, dxk, mask=row_ok)
                    xk = tl.load(x_ptr + b * N * 3 + rows * 3 + k, mask=row_ok, other=0.)[:, None]
                    tl.store(part + (L + k) * C + cols, tl.sum(d_lo * xk, axis=0))
                    tl.store(part + (L + k) * C + H + cols, tl.sum(d_hi * xk, axis=0))
                tl.store(part + (L + 3) * C + cols, tl.sum(d_lo, axis=0))
                tl.store(part + (L + 3) * C + H + cols, tl.sum(d_hi, axis=0))

INPUT_ROWS = 256  # rows per program in the input layer's backward


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


def _phi_forward_impl(x, weights, biases, eps, normalize_last):
    """[v (B, N, C), xhat of every normalised layer (B, N, C), 1/std of every normalised layer (B, N)]."""
    batch_size, num_points, _ = x.shape
    rows_key = _rows_key(num_points)
    channels = weights[0].shape[-2]
    act_dtype = weights[1].dtype
    grid = _rows_grid(num_points, batch_size)

    def empty_rows(*shape, dtype=act_dtype):
        return torch.empty(batch_size, num_points, *shape, device=x.device, dtype=dtype)
    xhats, rstds = [empty_rows(channels)], [empty_rows(dtype=torch.float32)]
    _launch(_input_layer_fwd)[grid](x, weights[0], biases[0], xhats[0], rstds[0], num_points, rows_key, eps,
                                    C=channels)
    out = None
    for i in range(1, len(weights)):
        last = i == len(weights) - 1
        normalize = normalize_last or not last
        out = empty_rows(channels)
        rstd = empty_rows(dtype=torch.float32) if normalize else out
        v = empty_rows(channels) if last and normalize else out
        _launch(_hidden_layer_fwd)[grid](xhats[-1], weights[i], biases[i], out, rstd, v, num_points, rows_key, eps,
                                         C=channels, NORMALIZE=normalize, WRITE_RELU=last and normalize,
                                         PRECISION=_precision(act_dtype))
        if normalize:
            xhats.append(out), rstds.append(rstd)
        out = v
    return [out, *xhats, *rstds]


def _phi_backward_impl(grad_v, x, weights, xhats, rstds):
    """[dx, dW_0, db_0, dW_1, db_1, ...] for the loss gradient ``grad_v`` (B, N, C) of phi's output."""
    batch_size, num_points, channels = grad_v.shape
    rows_key = _rows_key(num_points)
    grid = _rows_grid(num_points, batch_size)
    grads = []
    grad = grad_v
    for i in range(len(weights) - 1, 0, -1):
        normalize = i < len(xhats)
        weight = weights[i]
        dpre = torch.empty_like(grad, dtype=weight.dtype) if normalize else grad.to(weight.dtype)
        dx = torch.empty(batch_size, num_points, channels, device=x.device, dtype=weight.dtype)
        _launch(_hidden_layer_bwd_input)[grid](grad, xhats[i] if normalize else grad,
                                               rstds[i] if normalize else grad, weight, dpre, dx, num_points, rows_key,
                                               C=channels, NORMALIZE=normalize,
                                               PRECISION=_precision(weight.dtype))
        dw = torch.empty_like(weight)
        db = torch.empty(batch_size, channels, device=x.device, dtype=weight.dtype)

        def weights_grid(meta):
            return (triton.cdiv(channels, meta['BLOCK_N']), triton.cdiv(channels, meta['BLOCK_K']), batch_size)
        _launch(_hidden_layer_bwd_weights)[weights_grid](dpre, xhats[i - 1], dw, db, num_points, rows_key,
                                                         C=channels, PRECISION=_precision(weight.dtype))
        grads = [dw, db] + grads
        grad = dx
    # The input layer: float32, with the shares of dW and db of every INPUT_ROWS rows summed here.
    num_parts = triton.cdiv(num_points, INPUT_ROWS)
    dx = torch.empty_like(x)
    dw_part = torch.empty(batch_size, num_parts, 3, channels, device=x.device, dtype=torch.float32)
    db_part = torch.empty(batch_size, num_parts, channels, device=x.device, dtype=torch.float32)
    _launch(_input_layer_bwd)[(num_parts, batch_size)](grad, xhats[0], rstds[0], x, weights[0], dx, dw_part,
                                                       db_part, num_points, rows_key, C=channels,
                                                       ROWS=INPUT_ROWS)
    dw0 = dw_part.sum(1).transpose(1, 2).to(weights[0].dtype)  # (B, C, 3)
    db0 = db_part.sum(1).to(weights[0].dtype)
    return [dx, dw0, db0, *grads]


# Which implementation phi() uses: 'whole' (every layer of a tile of rows in one program, _phi_fwd / _phi_bwd) or
# 'layers' (one kernel per layer); and how 'whole' computes phi's weight gradients: 'cublas' (relu(xhat) stored
# by the backward kernel, then one batched product) or 'triton' (_hidden_layer_bwd_weights, ReLU as it loads).
IMPLEMENTATION = os.environ.get('SRN_KERNELS_IMPL', 'whole')
WEIGHT_GRADS = os.environ.get('SRN_KERNELS_WEIGHT_GRADS', 'cublas')
# Rows per program of _phi_bwd; fixed (not autotuned) because it sets how many partial sums there are.
BWD_BLOCK_M = int(os.environ.get('SRN_KERNELS_BWD_BLOCK_M', '32' if INTERPRET else '64'))


def _whole_forward_impl(x, w0, b0, w, b, eps, normalize_last):
    """[v (B, N, C), xhat (M, B, N, C), 1/std (M, B, N)] for phi's M normalised layers."""
    num_layers, batch_size, channels = w.shape[0], x.shape[0], w.shape[-1]
    num_points = x.shape[1]
    num_norm = num_layers + 1 if normalize_last else num_layers
    xhat = torch.empty(num_norm, batch_size, num_points, channels, device=x.device, dtype=w.dtype)
    rstd = torch.empty(num_norm, batch_size, num_points, device=x.device, dtype=torch.float32)
    v = torch.empty(batch_size, num_points, channels, device=x.device, dtype=w.dtype)
    _launch(_phi_fwd)[_rows_grid(num_points, batch_size)](
        x, w0, b0, w, b, xhat, rstd, v, batch_size, num_points, _rows_key(num_points), eps, C=channels,
        L=num_layers, NORMALIZE_LAST=normalize_last, PRECISION=_precision(w.dtype))
    return [v, xhat, rstd]


def _whole_backward_impl(grad_v, x, w0, w, xhat, rstd, normalize_last):
    """[dx (B, N, 3), dW_0 (B, C, 3), db_0 (B, C), dW (L, B, C, C), db (L, B, C)] for the gradient of v."""
    num_layers, batch_size, channels = w.shape[0], x.shape[0], w.shape[-1]
    num_points = x.shape[1]
    tiles = triton.cdiv(num_points, BWD_BLOCK_M)
    dpre = torch.empty(num_layers, batch_size, num_points, channels, device=x.device, dtype=w.dtype)
    store_relu = WEIGHT_GRADS == 'cublas'
    relu = torch.empty_like(dpre) if store_relu else dpre
    dx = torch.empty_like(x)
    part = torch.empty(batch_size, tiles, num_layers + 4, channels, device=x.device, dtype=torch.float32)
    _launch(_phi_bwd)[(tiles, batch_size)](
        grad_v, x, w0, w, xhat, rstd, dpre, relu, dx, part, batch_size, num_points, _rows_key(num_points),
        C=channels, L=num_layers, NORMALIZE_LAST=normalize_last, STORE_RELU=store_relu,
        PRECISION=_precision(w.dtype), BLOCK_M=BWD_BLOCK_M)
    sums = part.sum(1)  # (B, L + 4, C); the outputs are copies (a custom operator's outputs may not alias)
    db = sums[:, :num_layers].transpose(0, 1).to(w.dtype, memory_format=torch.contiguous_format, copy=True)
    dw0 = sums[:, num_layers:num_layers + 3].transpose(1, 2).clone(memory_format=torch.contiguous_format)
    db0 = sums[:, num_layers + 3].clone()  # (L, B, C), (B, C, 3), (B, C)
    if store_relu:
        dw = torch.matmul(dpre.transpose(-1, -2), relu)  # (L, B, C, N) @ (L, B, N, C): dW_i = dpre_i^T relu(xhat)
    else:
        dw = torch.empty_like(w)
        db_unused = torch.empty(batch_size, channels, device=x.device, dtype=w.dtype)

        def weights_grid(meta):
            return (triton.cdiv(channels, meta['BLOCK_N']), triton.cdiv(channels, meta['BLOCK_K']), batch_size)
        for i in range(num_layers):
            _launch(_hidden_layer_bwd_weights)[weights_grid](dpre[i], xhat[i], dw[i], db_unused, num_points,
                                                             _rows_key(num_points), C=channels,
                                                             PRECISION=_precision(w.dtype))
    return [dx, dw0, db0, dw, db]


def _register():
    """The forward and backward as custom operators with autograd, which torch.compile traces into."""
    @torch.library.triton_op('srn::phi_forward', mutates_args=())
    def _phi_forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                     eps: float, normalize_last: bool) -> list[torch.Tensor]:
        return _phi_forward_impl(x, weights, biases, eps, normalize_last)

    @torch.library.triton_op('srn::phi_backward', mutates_args=())
    def _phi_backward(grad_v: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                      xhats: list[torch.Tensor], rstds: list[torch.Tensor]) -> list[torch.Tensor]:
        return _phi_backward_impl(grad_v, x, weights, xhats, rstds)

    def _setup_context(ctx, inputs, output):
        x, weights, _, _, normalize_last = inputs
        num_norm = len(weights) if normalize_last else len(weights) - 1
        xhats, rstds = output[1:1 + num_norm], output[1 + num_norm:]
        ctx.num_layers, ctx.num_norm = len(weights), num_norm
        ctx.save_for_backward(x, *weights, *xhats, *rstds)
        ctx.mark_non_differentiable(*xhats, *rstds)

    def _backward(ctx, grads):
        saved = ctx.saved_tensors
        n, m = ctx.num_layers, ctx.num_norm
        x, weights = saved[0], list(saved[1:1 + n])
        xhats, rstds = list(saved[1 + n:1 + n + m]), list(saved[1 + n + m:])
        flat = _phi_backward(grads[0].contiguous(), x, weights, xhats, rstds)
        return flat[0], flat[1::2], flat[2::2], None, None

    torch.library.register_autograd('srn::phi_forward', _backward, setup_context=_setup_context)

    @torch.library.triton_op('srn::phi_whole_forward', mutates_args=())
    def _phi_whole_forward(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                           eps: float, normalize_last: bool) -> list[torch.Tensor]:
        return _whole_forward_impl(x, w0, b0, w, b, eps, normalize_last)

    @torch.library.triton_op('srn::phi_whole_backward', mutates_args=())
    def _phi_whole_backward(grad_v: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, w: torch.Tensor,
                            xhat: torch.Tensor, rstd: torch.Tensor, normalize_last: bool) -> list[torch.Tensor]:
        return _whole_backward_impl(grad_v, x, w0, w, xhat, rstd, normalize_last)

    def _whole_setup_context(ctx, inputs, output):
        x, w0, _, w, _, _, normalize_last = inputs
        ctx.normalize_last = normalize_last
        ctx.save_for_backward(x, w0, w, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def _whole_backward(ctx, grads):
        x, w0, w, xhat, rstd = ctx.saved_tensors
        dx, dw0, db0, dw, db = _phi_whole_backward(grads[0].contiguous(), x, w0, w, xhat, rstd, ctx.normalize_last)
        return dx, dw0, db0, dw, db, None, None

    torch.library.register_autograd('srn::phi_whole_forward', _whole_backward, setup_context=_whole_setup_context)


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
    batch_size = x.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        w0 = layers[0][0].float().contiguous()  # (B, C, 3)
        b0 = layers[0][1].float().reshape(batch_size, -1).contiguous()  # (B, C)
        if IMPLEMENTATION == 'whole':
            w = torch.stack([weights.to(dtype) for weights, _, _ in layers[1:]])  # (L, B, C, C)
            b = torch.stack([biases.to(dtype).reshape(batch_size, -1) for _, biases, _ in layers[1:]])  # (L, B, C)
            return torch.ops.srn.phi_whole_forward(x.float().contiguous(), w0, b0, w, b, eps, layers[-1][2])[0]
        weights = [w0] + [w.to(dtype).contiguous() for w, _, _ in layers[1:]]
        biases = [b0] + [b.to(dtype).reshape(batch_size, -1).contiguous() for _, b, _ in layers[1:]]
        return torch.ops.srn.phi_forward(x.float().contiguous(), weights, biases, eps, layers[-1][2])[0]
