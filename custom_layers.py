"""Network building blocks of Scene Representation Networks.

- ``FCLayer`` / ``FCBlock``: the MLPs used for phi (single-scene mode), the hypernetwork and the pixel
  generator (paper section 3.1 and 3.3).
- ``Raymarcher``: the differentiable LSTM ray marcher (paper section 3.2, "Differentiable ray marching").
- ``DeepvoxelsRenderer`` with its U-Net and conv blocks: the optional convolutional pixel generator that
  the reference borrowed from DeepVoxels (SPEC section 3), written here so no submodule is needed.

Shape vocabulary: ``B`` observations, ``N`` pixels (rays) per observation, ``C`` feature channels of phi.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import geometry


# --- Fully connected blocks -------------------------------------------------------------------------

def init_weights_normal(module):
    """Kaiming-normal (fan_in, ReLU gain) for every nn.Linear weight; biases keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight, a=0.0, nonlinearity='relu', mode='fan_in')


def layer_norm_relu(x, weight=None, bias=None, eps=1e-5):
    """ReLU(LayerNorm(x)) over the last dimension, in x's own precision.

    Autocast would run LayerNorm in float32 and return float32, doubling the activation memory of the
    bfloat16 path; here the statistics are still accumulated in float32 inside the kernel, but the
    output keeps x's dtype. In float32 this is exactly nn.LayerNorm followed by nn.ReLU.
    """
    with torch.autocast(x.device.type, enabled=False):
        if weight is not None:
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return F.relu(F.layer_norm(x, x.shape[-1:], weight, bias, eps))


class FCLayer(nn.Module):
    """Linear -> LayerNorm (affine) -> ReLU."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, out_features),
                                 nn.LayerNorm([out_features]),
                                 nn.ReLU(inplace=True))

    def forward(self, input):
        linear, norm = self.net[0], self.net[1]
        return layer_norm_relu(linear(input), norm.weight, norm.bias, norm.eps)

    def kernel_parameters(self):
        """(Linear weight, Linear bias, LayerNorm weight, LayerNorm bias), as ``kernels.fc_layers`` takes a layer."""
        linear, norm = self.net[0], self.net[1]
        return linear.weight, linear.bias, norm.weight, norm.bias


class FCBlock(nn.Module):
    """An MLP of FCLayers: in -> hidden, ``num_hidden_layers`` x hidden -> hidden, then hidden -> out.

    The last layer is a bare nn.Linear when ``outermost_linear``, else another FCLayer.

    ``fused_kernels`` (off by default): under mixed precision with gradients, the leading FCLayers that map C -> C
    run on the fused kernels of kernels.py (``kernels.fc_layers``) where they apply; the layers here stay the
    definition they are tested against.
    """

    def __init__(self, hidden_ch, num_hidden_layers, in_features, out_features, outermost_linear=False):
        super().__init__()
        layers = [FCLayer(in_features=in_features, out_features=hidden_ch)]
        for _ in range(num_hidden_layers):
            layers.append(FCLayer(in_features=hidden_ch, out_features=hidden_ch))
        if outermost_linear:
            layers.append(nn.Linear(in_features=hidden_ch, out_features=out_features))
        else:
            layers.append(FCLayer(in_features=hidden_ch, out_features=out_features))
        self.net = nn.Sequential(*layers)
        self.net.apply(init_weights_normal)
        self.fused_kernels = False

    def __getitem__(self, item):
        return self.net[item]

    def forward(self, input):
        if self.fused_kernels and torch.is_grad_enabled() and torch.is_autocast_enabled(input.device.type):
            import kernels  # here, not at the top: importing Triton costs seconds, and only this path needs it
            square = []  # the leading FCLayers C -> C
            for layer in self.net:
                if not (isinstance(layer, FCLayer) and layer.net[0].weight.shape == (input.shape[-1],) * 2):
                    break
                square.append(layer)
            layers = [layer.kernel_parameters() for layer in square]
            eps = [layer.net[1].eps for layer in square]
            if square and kernels.supports_fc(input, layers, eps):
                return self.net[len(square):](kernels.fc_layers(input, layers, eps[0]))
        return self.net(input)


# --- Ray marcher ------------------------------------------------------------------------------------

class ClampGrad(torch.autograd.Function):
    """Identity whose backward clamps the incoming gradient to [-10, 10] (the reference's value).

    Applied to the LSTM's hidden state it clamps the gradient summed over all uses of that state,
    as the reference's tensor hook does; unlike a hook it also traces under torch.compile.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=-10., max=10.)


class Raymarcher(nn.Module):
    """The LSTM ray marcher: finds the surface along each camera ray by learned sphere tracing.

    At every step phi is queried at the current points, an LSTM cell updates its state from the features,
    and a linear layer reads a step length off the hidden state; the points move along their rays by it.

    ``grad_steps`` > 0 backpropagates through only the last that many steps (truncated backpropagation through
    the march, not in the paper): the earlier steps run without autograd, so they neither save activations nor
    cost a backward pass; the points and the LSTM state they reach enter the later steps as constants. 0 (the
    default, the reference's) backpropagates through every step.
    """

    INIT_DEPTH_MEAN = 0.05  # initial camera depth of every ray (reference value)

    def __init__(self, num_feature_channels, raymarch_steps, init_depth_std=5e-4, grad_steps=0):
        super().__init__()
        if grad_steps < 0:
            raise ValueError(f"grad_steps must be >= 0 (0: every step), got {grad_steps}")
        self.n_feature_channels = num_feature_channels
        self.steps = raymarch_steps
        self.grad_steps = grad_steps
        self.init_depth_std = init_depth_std  # 5e-4 in the reference; 0 makes rendering deterministic
        hidden_size = 16
        # PyTorch's default LSTMCell init (uniform +-1/sqrt(16)); only the forget-gate biases are changed.
        self.lstm = nn.LSTMCell(input_size=num_feature_channels, hidden_size=hidden_size)
        lstm_forget_gate_init(self.lstm)
        self.out_layer = nn.Linear(hidden_size, 1)

    def initial_depth(self, batch_size, num_samples, like):
        """(B, N, 1) initial camera depth ~ Normal(0.05, init_depth_std), drawn on every call."""
        depth = torch.full((batch_size, num_samples, 1), self.INIT_DEPTH_MEAN, dtype=like.dtype,
                           device=like.device)
        if self.init_depth_std > 0:
            depth = depth + torch.randn_like(depth) * self.init_depth_std
        return depth

    def forward(self, cam2world, phi, uv, intrinsics, return_trace=False):
        """March rays through the pixels ``uv`` of cameras ``cam2world``.

        :param cam2world: (B, 4, 4)
        :param phi: callable (B, N, 3) -> (B, N, C)
        :param uv: (B, N, 2) pixel coordinates, float
        :param intrinsics: (B, 4, 4)
        :return: points (B, N, 3) and their camera depth (B, N, 1); with ``return_trace`` also the list of
            depths after every step (for the ray-march progress images)
        """
        batch_size, num_samples, _ = uv.shape
        # Camera geometry stays in float32 under mixed precision.
        with torch.autocast(uv.device.type, enabled=False):
            ray_dirs = geometry.get_ray_directions(uv, cam2world=cam2world, intrinsics=intrinsics)  # (B, N, 3)
            # The reference inverts cam2world at every step; it is the same each time, so once suffices.
            # inv_ex: torch.inverse's values without its error check, an effectful op that keeps torch.compile
            # from caching the compiled forward (the datasets refuse singular poses when they are opened).
            world2cam = torch.linalg.inv_ex(cam2world).inverse
            depth = self.initial_depth(batch_size, num_samples, like=ray_dirs)
            world_coords = geometry.world_from_xy_depth(uv, depth, cam2world=cam2world, intrinsics=intrinsics)
        state = None
        trace = [depth]
        first_grad_step = self.steps - self.grad_steps if 0 < self.grad_steps < self.steps else 0
        for step in range(self.steps):
            with torch.no_grad() if step < first_grad_step else contextlib.nullcontext():
                v = phi(world_coords)  # (B, N, C)
                hidden, cell = self.lstm(v.reshape(-1, self.n_feature_channels), state)  # 2 x (B*N, 16)
                state = (ClampGrad.apply(hidden), cell)
                # The step length stays float32 under mixed precision: it moves the points along the ray.
                with torch.autocast(hidden.device.type, enabled=False):
                    signed_distance = self.out_layer(state[0].float()).reshape(batch_size, num_samples, 1)
                world_coords = world_coords + ray_dirs * signed_distance
                depth = geometry.depth_from_world(world_coords, cam2world, world2cam=world2cam)  # (B, N, 1)
            if return_trace:
                trace.append(depth)
        if return_trace:
            return world_coords, depth, trace
        return world_coords, depth


def lstm_forget_gate_init(lstm):
    """Set the forget-gate quarter (gate order i, f, g, o) of both LSTM bias vectors to 1.

    A forget bias of 1 is the usual trick for stable early LSTM training; the reference applies it.
    """
    with torch.no_grad():
        for bias in (lstm.bias_ih, lstm.bias_hh):
            n = bias.shape[0]
            bias[n // 4:n // 2].fill_(1.)


# --- DeepVoxels U-Net renderer (SPEC section 3) -----------------------------------------------------
# Parameter names and the doubly registered aliases (``Conv2dSame.weight`` next to ``net.1.weight``,
# ``Unet.out_layer_weight``) are kept so that the reference's pre-trained checkpoints load strictly.

class Conv2dSame(nn.Module):
    """Reflection-padded convolution with stride 1 whose output keeps the input's size."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=True):
        super().__init__()
        pad_before = kernel_size // 2
        pad_after = pad_before - 1 if kernel_size % 2 == 0 else pad_before
        self.net = nn.Sequential(nn.ReflectionPad2d((pad_before, pad_after, pad_before, pad_after)),
                                 nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, stride=1))
        self.weight = self.net[1].weight  # alias kept for checkpoint compatibility
        self.bias = self.net[1].bias

    def forward(self, x):
        return self.net(x)


def _norm_act_dropout(channels, norm, activation, dropout_prob):
    """[norm(channels)], activation, Dropout2d — the tail shared by all U-Net convolutions."""
    layers = [norm(channels, affine=True)] if norm is not None else []
    return layers + [activation, nn.Dropout2d(dropout_prob, inplace=False)]


class DownBlock(nn.Module):
    """3x3 conv keeping the width, then a 4x4 stride-2 conv: halves the resolution."""

    def __init__(self, in_channels, out_channels, dropout_prob=0.1, norm=nn.BatchNorm2d):
        super().__init__()
        bias = norm is None
        layers = [nn.ReflectionPad2d(1),
                  nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=0, stride=1, bias=bias)]
        layers += _norm_act_dropout(in_channels, norm, nn.LeakyReLU(0.2), dropout_prob)
        layers += [nn.ReflectionPad2d(1),
                   nn.Conv2d(in_channels, out_channels, kernel_size=4, padding=0, stride=2, bias=bias)]
        layers += _norm_act_dropout(out_channels, norm, nn.LeakyReLU(0.2), dropout_prob)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class UpBlock(nn.Module):
    """4x4 stride-2 transposed conv, then a 3x3 conv: doubles the resolution."""

    def __init__(self, in_channels, out_channels, dropout_prob=0.1, norm=nn.BatchNorm2d):
        super().__init__()
        bias = norm is None
        layers = [nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=bias)]
        layers += _norm_act_dropout(out_channels, norm, nn.ReLU(), dropout_prob)
        layers += [Conv2dSame(out_channels, out_channels, kernel_size=3, bias=bias)]
        layers += _norm_act_dropout(out_channels, norm, nn.ReLU(), dropout_prob)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class UnetSkipConnectionBlock(nn.Module):
    """DownBlock -> inner block -> UpBlock, output concatenated after the input: [x, up(inner(down(x)))]."""

    def __init__(self, outer_nc, inner_nc, norm=nn.BatchNorm2d, submodule=None, dropout_prob=0.1):
        super().__init__()
        if submodule is None:
            layers = [DownBlock(outer_nc, inner_nc, dropout_prob=dropout_prob, norm=norm),
                      UpBlock(inner_nc, outer_nc, dropout_prob=dropout_prob, norm=norm)]
        else:
            layers = [DownBlock(outer_nc, inner_nc, dropout_prob=dropout_prob, norm=norm),
                      submodule,
                      UpBlock(2 * inner_nc, outer_nc, dropout_prob=dropout_prob, norm=norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):  # (B, outer, H, W) -> (B, 2*outer, H, W)
        return torch.cat([x, self.model(x)], dim=1)


class Unet(nn.Module):
    """A U-Net with ``num_down`` downsamplings; the innermost block has no normalisation."""

    def __init__(self, in_channels, out_channels, nf0, num_down, max_channels, dropout_prob=0.1,
                 norm=nn.BatchNorm2d, outermost_linear=False):
        super().__init__()
        if num_down < 1:
            raise ValueError("Unet: need at least one downsampling layer (image side must be even)")
        self.in_layer = nn.Sequential(Conv2dSame(in_channels, nf0, kernel_size=3, bias=norm is None),
                                      *_norm_act_dropout(nf0, norm, nn.LeakyReLU(0.2), dropout_prob))
        width = min(2 ** (num_down - 1) * nf0, max_channels)
        block = UnetSkipConnectionBlock(width, width, norm=None, dropout_prob=dropout_prob)
        for i in reversed(range(num_down - 1)):
            block = UnetSkipConnectionBlock(min(2 ** i * nf0, max_channels), min(2 ** (i + 1) * nf0, max_channels),
                                            norm=norm, submodule=block, dropout_prob=dropout_prob)
        self.unet_block = block
        out_layers = [Conv2dSame(2 * nf0, out_channels, kernel_size=3, bias=outermost_linear or norm is None)]
        if not outermost_linear:
            out_layers += [norm(out_channels, affine=True)] if norm is not None else []
            out_layers += [nn.ReLU()]
        self.out_layer = nn.Sequential(*out_layers)
        self.out_layer_weight = self.out_layer[0].weight  # alias kept for checkpoint compatibility

    def forward(self, x):
        return self.out_layer(self.unet_block(self.in_layer(x)))


def num_divisible_by_2(number):
    """How many times ``number`` can be halved while staying an integer."""
    count = 0
    while number > 0 and number % 2 == 0:
        number //= 2
        count += 1
    return count


class DeepvoxelsRenderer(nn.Module):
    """U-Net pixel generator: features on the s x s pixel grid (B, N, C) -> RGB (B, N, 3) in [-1, 1].

    Only the configuration the reference uses is supported: ``input_resolution == img_sidelength``.
    """

    def __init__(self, nf0, in_channels, input_resolution, img_sidelength):
        super().__init__()
        if input_resolution != img_sidelength:
            raise ValueError("DeepvoxelsRenderer: input_resolution must equal img_sidelength "
                             f"(got {input_resolution} and {img_sidelength})")
        self.nf0 = nf0
        self.in_channels = in_channels
        self.input_resolution = input_resolution
        self.img_sidelength = img_sidelength
        num_down = num_divisible_by_2(input_resolution)
        self.net = nn.Sequential(
            Unet(in_channels=in_channels, out_channels=3, nf0=nf0, num_down=num_down, max_channels=8 * nf0,
                 dropout_prob=0.1, norm=nn.BatchNorm2d, outermost_linear=True),
            nn.Tanh())

    def forward(self, input):  # (B, N, C) -> (B, N, 3)
        batch_size, num_samples, channels = input.shape
        if num_samples != self.img_sidelength ** 2:
            raise ValueError(f"DeepvoxelsRenderer was built for {self.img_sidelength}x{self.img_sidelength} "
                             f"images but got {num_samples} pixels per image")
        x = input.permute(0, 2, 1).reshape(batch_size, channels, self.img_sidelength, self.img_sidelength)
        out = self.net(x)  # (B, 3, s, s)
        return out.reshape(batch_size, 3, -1).permute(0, 2, 1)
