"""Why does a (rows, 256) LayerNorm kernel fall short of the memory roofline? Variants of the input layer's kernel.

Each variant writes one (B, N, 256) bf16 activation (134 MB at the cars setting); the ladder goes from a bare
store of zeros to the full kernel, over tile heights and warp counts, so that the step that costs the time shows.

    python benchmarks/probe_store.py
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _probe(x_ptr, w_ptr, b_ptr, out_ptr, rstd_ptr, N, eps, C: tl.constexpr, BLOCK_M: tl.constexpr,
           STAGE: tl.constexpr, INT64: tl.constexpr, MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64) if INT64 else tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = tl.arange(0, C)
    acc = tl.zeros([BLOCK_M, C], dtype=tl.float32)
    if STAGE >= 1:  # bias and the three multiply-adds (weights stored (B, 3, C))
        acc += tl.load(b_ptr + b * C + cols)[None, :]
        for k in tl.static_range(3):
            xk = tl.load(x_ptr + b * N * 3 + rows * 3 + k, mask=row_ok, other=0.)
            wk = tl.load(w_ptr + (b * 3 + k) * C + cols)
            acc += xk[:, None] * wk[None, :]
    if STAGE >= 2:  # LayerNorm
        mean = tl.sum(acc, axis=1) / C
        acc = acc - mean[:, None]
        rstd = tl.rsqrt(tl.sum(acc * acc, axis=1) / C + eps)
        acc = acc * rstd[:, None]
        if STAGE >= 3:
            tl.store(rstd_ptr + b * N + rows, rstd, mask=row_ok)
    offsets = out_ptr + b * N * C + rows[:, None] * C + cols[None, :]
    if MASK:
        tl.store(offsets, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(offsets, acc.to(out_ptr.dtype.element_ty))


def main():
    B, N, C = 64, 4096, 256
    x = torch.randn(B, N, 3, device='cuda')
    w, bias = torch.randn(B, 3, C, device='cuda'), torch.randn(B, C, device='cuda')
    out = torch.empty(B, N, C, device='cuda', dtype=torch.bfloat16)
    rstd = torch.empty(B, N, device='cuda')
    gb = out.numel() * 2 / 1e9
    print(f"torch zero_: {gb / do_bench(lambda: out.zero_()) :.2f} TB/s")
    for stage in (0, 1, 2, 3):
        for int64, mask in ((True, True), (False, False)):
            line = []
            for block_m, warps in ((1, 1), (2, 1), (4, 2), (8, 2), (8, 4), (16, 4), (32, 4), (32, 8)):
                def launch():
                    _probe[(triton.cdiv(N, block_m), B)](x, w, bias, out, rstd, N, 1e-5, C=C, BLOCK_M=block_m,
                                                          STAGE=stage, INT64=int64, MASK=mask, num_warps=warps)
                line.append(f"{block_m}/{warps}:{gb / do_bench(launch):.2f}")
            print(f"stage {stage} int64 {int64:d} mask {mask:d}  TB/s by rows/warps  " + '  '.join(line), flush=True)


if __name__ == '__main__':
    main()
