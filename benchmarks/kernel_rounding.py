"""Where the fused kernels' bfloat16 rounding matters: a CPU emulation of kernels.py's numerics.

``EmulatedPhi`` computes phi (forward and backward) as kernels.py does, in float32 with bfloat16 rounding at the
places the kernels round: the matrix products' operands, and what they store (the normalised activations xhat,
the LayerNorm gradient dpre, the input gradient dx, the weight gradients dW/db). Each of those stores can be kept
in float32 instead (``--keep``), to see what it costs. For a few seeds it prints the relative L2 error against the
float32 path of the emulation and of PyTorch's bfloat16 autocast path, for phi's weight gradients (what the
kernels compute) and for the hypernetwork parameters where the two differ most.

    python benchmarks/kernel_rounding.py [--keep xhat,dpre,dx,dw] [--seeds 4]
"""
import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import hyperlayers  # noqa: E402
import util  # noqa: E402

STORES = ('xhat', 'dpre', 'dx', 'dw')


def bf16(t):
    return t.to(torch.bfloat16).float()


def make_emulated_phi(keep):
    """The autograd function of phi with the kernels' rounding, except for the stores named in ``keep``."""
    def store(name, t):
        return t if name in keep else bf16(t)

    class EmulatedPhi(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *weights_and_biases):  # x (B, N, 3) float32; weights (B, C, K), biases (B, 1, C)
            weights, biases = weights_and_biases[0::2], weights_and_biases[1::2]
            xhats, rstds = [], []
            for i, (w, b) in enumerate(zip(weights, biases)):
                if i == 0:  # the input layer runs in float32
                    acc = x.float() @ w.float().transpose(-1, -2) + b.float()
                else:  # relu(xhat) @ W^T + b, bfloat16 operands, float32 accumulation
                    acc = bf16(torch.relu(xhats[-1])) @ bf16(w).transpose(-1, -2) + bf16(b)
                mean = acc.mean(-1, keepdim=True)
                rstd = torch.rsqrt(((acc - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
                xhats.append(store('xhat', (acc - mean) * rstd))
                rstds.append(rstd)
            ctx.save_for_backward(x, *weights, *xhats, *rstds)
            return torch.relu(xhats[-1]).to(torch.bfloat16)

        @staticmethod
        def backward(ctx, grad_v):
            saved, n = ctx.saved_tensors, (len(ctx.saved_tensors) - 1) // 3
            x, weights, xhats, rstds = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:]
            grad, grads = grad_v.float(), []
            for i in range(n - 1, -1, -1):
                xhat, gated = xhats[i], grad * (xhats[i] > 0)
                dpre = rstds[i] * (gated - gated.mean(-1, keepdim=True)
                                   - xhat * (gated * xhat).mean(-1, keepdim=True))
                if i == 0:
                    grads = [dpre.transpose(-1, -2) @ x.float(), dpre.sum(1, keepdim=True)] + grads
                    break
                dpre = store('dpre', dpre)
                dw = dpre.transpose(-1, -2) @ bf16(torch.relu(xhats[i - 1]))
                db = dpre.sum(1, keepdim=True)
                grads = [store('dw', dw).to(weights[i].dtype), store('dw', db).to(weights[i].dtype)] + grads
                grad = store('dx', dpre @ bf16(weights[i]))
            grads[0], grads[1] = grads[0].to(weights[0].dtype), grads[1].to(weights[0].dtype)
            return (None, *grads)

    return EmulatedPhi


def gradients(hyper, z, x, grad_v, path, emulated_phi):
    """{name: tensor}: the gradients of <phi(x), grad_v> for phi's weights/biases and the hypernetwork's parameters."""
    hyper.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=path != 'float32'):
        layers = hyper(z).layers
        tensors = []
        for weights, biases, _ in layers:
            weights.retain_grad(), biases.retain_grad()
            tensors += [weights, biases]
        v = emulated_phi.apply(x, *tensors) if path == 'emulated' else hyperlayers.HypoNetwork(layers)(x)
    (v.float() * grad_v).sum().backward()
    values = {f'phi.{i // 2}.{"bias" if i % 2 else "weight"}': t.grad for i, t in enumerate(tensors)}
    values.update({f'hyper.{name}': p.grad for name, p in hyper.named_parameters()})
    return values


def relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--keep', default='', help=f'stores kept in float32, of {",".join(STORES)}')
    parser.add_argument('--seeds', type=int, default=4)
    opt = parser.parse_args(argv)
    keep = {name for name in opt.keep.split(',') if name}
    util.set_tf32(False)
    emulated_phi = make_emulated_phi(keep)
    print(f"stores kept in float32: {', '.join(sorted(keep)) or 'none (as the kernels)'}")
    for seed in range(opt.seeds):
        torch.manual_seed(seed)
        hyper = hyperlayers.HyperFC(hyper_in_ch=16, hyper_num_hidden_layers=1, hyper_hidden_ch=16, hidden_ch=256,
                                    num_hidden_layers=2, in_ch=3, out_ch=256)
        z, x, grad_v = torch.randn(3, 16), torch.randn(3, 2000, 3), torch.randn(3, 2000, 256)
        exact, pytorch, emulated = (gradients(hyper, z, x, grad_v, path, emulated_phi)
                                    for path in ('float32', 'pytorch', 'emulated'))
        errors = {name: (relative_error(emulated[name], e), relative_error(pytorch[name], e))
                  for name, e in exact.items()}
        phi = ' '.join(f'{a:.3f}/{b:.3f}' for name, (a, b) in errors.items() if name.startswith('phi.'))
        name, (a, b) = max(((n, ab) for n, ab in errors.items() if n.startswith('hyper.')),
                           key=lambda item: item[1][0] / item[1][1])
        print(f"seed {seed}: phi's weight/bias gradients, emulated/pytorch error: {phi}\n"
              f"        hypernetwork parameter with the largest ratio: {name} {a:.3f}/{b:.3f} ({a / b:.2f}x)")


if __name__ == '__main__':
    main()
