"""Hypernetwork layers of Scene Representation Networks (paper section 3.3, "Generalizing across scenes").

A latent code z of a scene is mapped by a hypernetwork Psi to the weights of the scene representation
network phi: every layer of phi gets its own small MLP that turns z into that layer's weight matrix and
bias (``HyperLinear``). ``HyperFC`` stacks such layers; calling it with z returns phi as a callable
that maps world coordinates (B, N, 3) to features (B, N, C).

Shape vocabulary: ``B`` scenes (observations) in a batch, ``N`` points per scene, ``L`` latent size.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_layers import FCBlock, layer_norm_relu


class BatchLinear(nn.Module):
    """A linear layer with its own weights per batch element: y = x @ W^T + b.

    :param weights: (B, out, in)
    :param biases: (B, 1, out)
    """

    def __init__(self, weights, biases):
        super().__init__()
        self.weights = weights
        self.biases = biases

    def forward(self, input):  # (B, N, in) -> (B, N, out)
        return input.matmul(self.weights.transpose(-1, -2)) + self.biases

    def extra_repr(self):
        return f"in_ch={self.weights.shape[-1]}, out_ch={self.weights.shape[-2]}"


def last_hyper_layer_init(linear):
    """Kaiming-normal (fan_in, ReLU) then x0.1 for the layer that emits phi's weights.

    The 0.1 scale is the reference's: it keeps the initial phi close to a small random MLP, so the
    ray marcher starts from sensible features.
    """
    nn.init.kaiming_normal_(linear.weight, a=0.0, nonlinearity='relu', mode='fan_in')
    with torch.no_grad():
        linear.weight.mul_(0.1)


class HyperLinear(nn.Module):
    """Maps a latent code z (B, L) to a ``BatchLinear`` with in_ch inputs and out_ch outputs."""

    def __init__(self, in_ch, out_ch, hyper_in_ch, hyper_num_hidden_layers, hyper_hidden_ch):
        super().__init__()
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.hypo_params = FCBlock(in_features=hyper_in_ch,
                                   hidden_ch=hyper_hidden_ch,
                                   num_hidden_layers=hyper_num_hidden_layers,
                                   out_features=in_ch * out_ch + out_ch,
                                   outermost_linear=True)
        last_hyper_layer_init(self.hypo_params.net[-1])

    def weights_and_biases(self, hyper_input):
        """z (B, L) -> weights (B, out, in), biases (B, 1, out)."""
        hypo_params = self.hypo_params(hyper_input)  # (B, in*out + out)
        num_weights = self.in_ch * self.out_ch
        weights = hypo_params[..., :num_weights].reshape(*hypo_params.shape[:-1], self.out_ch, self.in_ch)
        biases = hypo_params[..., num_weights:num_weights + self.out_ch]
        biases = biases.reshape(*hypo_params.shape[:-1], 1, self.out_ch)
        return weights, biases

    def forward(self, hyper_input):
        return BatchLinear(*self.weights_and_biases(hyper_input))


class HyperLayer(nn.Module):
    """A HyperLinear followed by LayerNorm (no affine parameters) and ReLU."""

    def __init__(self, in_ch, out_ch, hyper_in_ch, hyper_num_hidden_layers, hyper_hidden_ch):
        super().__init__()
        self.hyper_linear = HyperLinear(in_ch=in_ch, out_ch=out_ch, hyper_in_ch=hyper_in_ch,
                                        hyper_num_hidden_layers=hyper_num_hidden_layers,
                                        hyper_hidden_ch=hyper_hidden_ch)
        self.norm_nl = nn.Sequential(nn.LayerNorm([out_ch], elementwise_affine=False),
                                     nn.ReLU(inplace=True))

    def forward(self, hyper_input):
        return nn.Sequential(self.hyper_linear(hyper_input), self.norm_nl)


class HypoNetwork:
    """phi for a batch of scenes: the MLP whose weights the hypernetwork emitted.

    A plain callable rather than an nn.Module, built anew for every batch; its tensors stay in the
    autograd graph of the hypernetwork, so gradients reach Psi and the latent codes.

    :param layers: list of (weights (B, out, in), biases (B, 1, out), normalize) per layer; ``normalize``
        applies LayerNorm without affine and ReLU after the linear map.
    :param fused: under mixed precision, evaluate with the fused kernels of kernels.py where they apply: True
        always, ``'render'`` only where no gradient is taken (rendering, validation), False never; the code below
        stays the definition they are tested against.
    """

    def __init__(self, layers, fused=False):
        if fused not in (False, True, 'render'):
            raise ValueError(f"fused must be False, True or 'render', not {fused!r}")
        self.layers = layers
        self.fused = fused

    def needs_gradients(self, x):
        """Whether autograd will take gradients through phi(x): of the points, or of the hypernetwork's outputs."""
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, *(w for w, _, _ in self.layers), *(b for _, b, _ in self.layers)))

    def __call__(self, x):  # (B, N, 3) -> (B, N, C)
        if (self.fused and torch.is_autocast_enabled(x.device.type)
                and (self.fused != 'render' or not self.needs_gradients(x))):
            import kernels  # here, not at the top: importing Triton costs seconds, and only this path needs it
            if kernels.supports(x, self.layers):
                return kernels.phi(x, self.layers)
        for i, (weights, biases, normalize) in enumerate(self.layers):
            if i == 0 and torch.is_autocast_enabled(x.device.type):
                # Under mixed precision the input layer still runs in float32: bfloat16 would round
                # world coordinates to ~1/256 of their size and blur geometry. With 3 inputs it is three
                # multiply-adds per output, written elementwise so that a compiler fuses it with the
                # LayerNorm that follows instead of writing a float32 (B, N, C) tensor.
                out_dtype = torch.get_autocast_dtype(x.device.type)
                with torch.autocast(x.device.type, enabled=False):
                    weights, x = weights.float(), x.float()  # (B, C, 3), (B, N, 3)
                    y = biases.float()
                    for k in range(x.shape[-1]):
                        y = y + x[..., k:k + 1] * weights[:, None, :, k]  # (B, N, C)
                x = y.to(out_dtype)
            else:
                x = x.matmul(weights.transpose(-1, -2)) + biases
            if normalize:
                x = layer_norm_relu(x)
        return x


class HyperFC(nn.Module):
    """The hypernetwork Psi: one HyperLayer per layer of phi.

    Calling it with z (B, L) returns phi, mapping (B, N, in_ch) to (B, N, out_ch).
    """

    def __init__(self, hyper_in_ch, hyper_num_hidden_layers, hyper_hidden_ch, hidden_ch,
                 num_hidden_layers, in_ch, out_ch, outermost_linear=False):
        super().__init__()
        hyper_kwargs = dict(hyper_in_ch=hyper_in_ch, hyper_num_hidden_layers=hyper_num_hidden_layers,
                            hyper_hidden_ch=hyper_hidden_ch)
        layers = [HyperLayer(in_ch=in_ch, out_ch=hidden_ch, **hyper_kwargs)]
        for _ in range(num_hidden_layers):
            layers.append(HyperLayer(in_ch=hidden_ch, out_ch=hidden_ch, **hyper_kwargs))
        if outermost_linear:
            layers.append(HyperLinear(in_ch=hidden_ch, out_ch=out_ch, **hyper_kwargs))
        else:
            layers.append(HyperLayer(in_ch=hidden_ch, out_ch=out_ch, **hyper_kwargs))
        self.layers = nn.ModuleList(layers)
        self.fused_kernels = False  # kernels.py under mixed precision: False, True or 'render' (HypoNetwork's fused)

    def forward(self, hyper_input):  # z (B, L) -> phi
        hypo_layers = []
        for layer in self.layers:
            if isinstance(layer, HyperLayer):
                hypo_layers.append((*layer.hyper_linear.weights_and_biases(hyper_input), True))
            else:
                hypo_layers.append((*layer.weights_and_biases(hyper_input), False))
        return HypoNetwork(hypo_layers, fused=self.fused_kernels)
