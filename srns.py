"""Scene Representation Networks (Sitzmann, Zollhoefer, Wetzstein, NeurIPS 2019).

The model of the paper, wired as in its section 3:

    latent code z  --hypernetwork Psi (sec. 3.3)-->  phi: R^3 -> R^C   (the scene representation, sec. 3.1)
    camera rays    --LSTM ray marcher on phi (sec. 3.2)-->  surface points x, depth
    phi(x)         --pixel generator (sec. 3.2)-->  colour per ray

``SRNsModel`` keeps the reference implementation's constructor, submodule names and state-dict keys,
so its pre-trained checkpoints load unchanged. The losses (paper eq. 6-8 and the depth regulariser),
PSNR/SSIM and the normals | prediction | target comparison images live here too.

Shape vocabulary: ``B`` observations, ``N`` rays per observation, ``C`` = 256 feature channels, ``L`` latent size.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import geometry
import hyperlayers
from custom_layers import DeepvoxelsRenderer, FCBlock, Raymarcher


class SRNsModel(nn.Module):
    """SRN with an auto-decoded latent code per scene (default), or a single scene (``fit_single_srn``).

    :param num_instances: number of scenes, i.e. rows of the latent-code table
    :param latent_dim: L
    :param tracing_steps: ray-marching steps of the LSTM
    :param has_params: take z from the batch's ``param`` (or forward's ``z``) instead of the table
    :param fit_single_srn: one phi for one scene, no hypernetwork
    :param use_unet_renderer: DeepVoxels U-Net pixel generator (128 x 128 images only)
    :param freeze_networks: train only the latent codes (few-shot fitting of unseen scenes)
    :param init_depth_std: std of the ray marcher's initial depth noise (5e-4 in the reference)
    :param tracing_grad_steps: backpropagate through only the last that many ray-marching steps (0: all, the
        reference's; see ``Raymarcher``)
    """

    def __init__(self, num_instances, latent_dim, tracing_steps, has_params=False, fit_single_srn=False,
                 use_unet_renderer=False, freeze_networks=False, init_depth_std=5e-4, tracing_grad_steps=0):
        super().__init__()
        if freeze_networks and fit_single_srn:
            raise ValueError("freeze_networks needs latent codes to train, but fit_single_srn has none: "
                             "use one or the other")
        self.num_instances = num_instances
        self.latent_dim = latent_dim
        self.has_params = has_params
        self.fit_single_srn = fit_single_srn
        self.use_unet_renderer = use_unet_renderer
        self.freeze_networks = freeze_networks
        self.num_hidden_units_phi = 256
        self.phi_layers = 4  # includes the in- and out-layer
        self.rendering_layers = 5  # includes the in- and out-layer

        # Submodules are built in the reference's order, so a seed gives the same initial weights.
        if self.fit_single_srn:
            self.phi = FCBlock(hidden_ch=self.num_hidden_units_phi, num_hidden_layers=self.phi_layers - 2,
                               in_features=3, out_features=self.num_hidden_units_phi)
        else:
            self.latent_codes = nn.Embedding(num_instances, latent_dim)
            nn.init.normal_(self.latent_codes.weight, mean=0, std=0.01)  # paper: codes start near zero
            self.hyper_phi = hyperlayers.HyperFC(hyper_in_ch=latent_dim, hyper_num_hidden_layers=1,
                                                 hyper_hidden_ch=latent_dim,
                                                 hidden_ch=self.num_hidden_units_phi,
                                                 num_hidden_layers=self.phi_layers - 2,
                                                 in_ch=3, out_ch=self.num_hidden_units_phi)

        self.ray_marcher = Raymarcher(num_feature_channels=self.num_hidden_units_phi,
                                      raymarch_steps=tracing_steps, init_depth_std=init_depth_std,
                                      grad_steps=tracing_grad_steps)

        if self.use_unet_renderer:
            self.pixel_generator = DeepvoxelsRenderer(nf0=32, in_channels=self.num_hidden_units_phi,
                                                      input_resolution=128, img_sidelength=128)
        else:
            self.pixel_generator = FCBlock(hidden_ch=self.num_hidden_units_phi,
                                           num_hidden_layers=self.rendering_layers - 1,
                                           in_features=self.num_hidden_units_phi, out_features=3,
                                           outermost_linear=True)

        if self.freeze_networks:
            for module in (self.pixel_generator, self.ray_marcher, self.hyper_phi):
                for param in module.parameters():
                    param.requires_grad = False

    def use_fused_kernels(self, enabled=True):
        """Evaluate phi with the fused GPU kernels of kernels.py under mixed precision (a speed switch only:
        the PyTorch layers stay the definition, float32 never uses the kernels): ``True`` always, ``'render'``
        only without gradients (rendering and validation; training stays on the PyTorch layers), ``False``
        never. Returns self."""
        if enabled not in (False, True, 'render'):
            raise ValueError(f"use_fused_kernels takes False, True or 'render', not {enabled!r}")
        if enabled:
            import kernels  # noqa: F401  (load Triton now, not inside a compiled region)
        if not self.fit_single_srn:
            self.hyper_phi.fused_kernels = enabled
        return self

    def get_z(self, model_input, z=None):
        """The batch's latent codes (B, L): ``z`` if given, else ``param`` or the table's; None for one scene."""
        if self.fit_single_srn:
            return None
        if z is not None:  # explicit codes: fitting, interpolation
            return z
        if self.has_params:
            return model_input['param']
        return self.latent_codes(model_input['instance_idx'].long())

    def get_phi(self, z):
        """phi for the batch: the hypernetwork's output for z, or the single scene's MLP."""
        return self.phi if self.fit_single_srn else self.hyper_phi(z)

    def forward(self, model_input, z=None, return_trace=False):
        """Render the rays of a batch.

        :param model_input: dict with ``instance_idx`` (B,), ``pose`` (B, 4, 4) cam2world, ``intrinsics``
            (B, 4, 4), ``uv`` (B, N, 2) and, with has_params, ``param`` (B, L)
        :param z: optional latent codes (B, L) used instead of the table's (or ``param``)
        :return: rgb (B, N, 3) and depth (B, N, 1); with ``return_trace`` also the per-step depths
        """
        cam2world = model_input['pose']
        intrinsics = model_input['intrinsics']
        uv = model_input['uv'].to(cam2world.dtype)  # (B, N, 2)

        phi = self.get_phi(self.get_z(model_input, z))
        marched = self.ray_marcher(cam2world=cam2world, phi=phi, uv=uv, intrinsics=intrinsics,
                                   return_trace=return_trace)
        points_xyz, depth = marched[0], marched[1]  # (B, N, 3), (B, N, 1)
        v = phi(points_xyz)  # (B, N, C)
        rgb = self.pixel_generator(v)  # (B, N, 3)
        if return_trace:
            return rgb, depth, marched[2]
        return rgb, depth


# --- Losses (paper section 3.4) ---------------------------------------------------------------------

def image_loss(rgb, target_rgb):
    """Mean squared error over all B*N*3 values (weighted by --l1_weight, a historical name)."""
    return F.mse_loss(rgb, target_rgb)


def depth_regularization_loss(depth):
    """10000 * mean(min(depth, 0)^2): penalises surfaces behind the camera."""
    return torch.mean(torch.clamp(depth, max=0.) ** 2) * 10000


def latent_loss(z):
    """Mean of the squared latent codes of the batch (a Gaussian prior on z); 0 without codes."""
    if z is None:
        return torch.zeros(())
    return torch.mean(z ** 2)


def compute_losses(model, model_input, prediction, target_rgb, l1_weight=200., reg_weight=1e-3, kl_weight=1.,
                   z=None):
    """The three loss terms and the weighted total, as a dict of 0-d tensors.

    Keys: ``image_loss``, ``depth_reg_loss`` (already x10000), ``latent_loss`` and ``total_loss``
    = l1_weight * image + reg_weight * depth_reg + kl_weight * latent.
    """
    rgb, depth = prediction[0], prediction[1]
    model = getattr(model, 'module', model)  # DistributedDataParallel
    model = getattr(model, '_orig_mod', model)  # torch.compile
    losses = {'image_loss': image_loss(rgb, target_rgb),
              'depth_reg_loss': depth_regularization_loss(depth),
              'latent_loss': latent_loss(model.get_z(model_input, z)).to(rgb.device)}
    losses['total_loss'] = (l1_weight * losses['image_loss'] + reg_weight * losses['depth_reg_loss']
                            + kl_weight * losses['latent_loss'])
    return losses


# --- Metrics and images -----------------------------------------------------------------------------

def psnr_ssim(rgb, target_rgb):
    """Per-image PSNR and SSIM, as the reference reports them (SPEC section 6).

    Both images are mapped from [-1, 1] to [0, 1] (the prediction clipped), then PSNR over all H*W*3
    values and SSIM with scikit-image's 7x7 uniform window, in float64.

    :param rgb, target_rgb: (B, N, 3) tensors or arrays with N = s*s
    :return: two lists of B floats
    """
    # Imported here: scikit-image's metrics pull in scipy.stats, a second of every start that trains without them.
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rgb = torch.as_tensor(rgb).detach().to('cpu', torch.float64)
    target_rgb = torch.as_tensor(target_rgb).detach().to('cpu', torch.float64)
    preds = geometry.lin2img(rgb).permute(0, 2, 3, 1).numpy()  # (B, s, s, 3)
    targets = geometry.lin2img(target_rgb).permute(0, 2, 3, 1).numpy()
    psnrs, ssims = [], []
    for pred, target in zip(preds, targets):
        pred = np.clip(pred / 2. + 0.5, 0., 1.)
        target = target / 2. + 0.5
        with np.errstate(divide='ignore'):  # a perfect prediction has infinite PSNR
            psnrs.append(float(peak_signal_noise_ratio(target, pred, data_range=1)))
        ssims.append(float(structural_similarity(pred, target, channel_axis=-1, data_range=1)))
    return psnrs, ssims


def normal_map(model_input, depth):
    """Camera-space normals (B, 3, s, s) of a rendered depth map, padded back to s x s with the value 1."""
    uv = model_input['uv'].to(depth.dtype)  # (B, N, 2)
    batch_size = uv.shape[0]
    normals = geometry.compute_normal_map(x_img=uv[..., 0], y_img=uv[..., 1], z=depth.reshape(batch_size, -1),
                                          intrinsics=model_input['intrinsics'])
    return F.pad(normals, pad=(1, 1, 1, 1), mode='constant', value=1.)


def comparison_images(model_input, prediction, target_rgb=None):
    """normals | prediction | target side by side, (B, 3, s, 3s) in [-1, 1] (2s wide without a target)."""
    rgb, depth = prediction[0], prediction[1]
    with torch.no_grad():
        panels = [normal_map(model_input, depth), geometry.lin2img(rgb)]
        if target_rgb is not None:
            panels.append(geometry.lin2img(target_rgb.to(rgb.device)))
        return torch.cat([panel.to(rgb.dtype) for panel in panels], dim=3)
