"""Few-shot reconstruction of unseen objects: fit latent codes to a trained SRN (paper section 3.3).

The paper reconstructs an object it has never seen from one or two views by keeping the trained
hypernetwork, ray marcher and pixel generator frozen, starting a new latent code near zero, and
optimising only that code against the given views with the training loss (paper eq. 6-8). The
reference does this through ``train.py --overwrite_embeddings --freeze_networks
--specific_observation_idcs 64``: batches of 8 whole images drawn from all test objects, so each code
is touched only when one of its views is drawn, at the training learning rate of 5e-5.

``fit_latent_codes`` optimises the same objective, faster:

- every step sees every fitting view of every object (or ``batch_size`` of them), so each code receives
  a gradient at every step instead of at a few percent of them;
- each view contributes a random subset of ``rays_per_view`` pixels instead of the whole image: the
  code's gradient is an unbiased estimate of the full-image gradient at a fraction of the cost;
- only the latent table is handed to Adam, at a larger learning rate (the networks are frozen, so the
  small rate that keeps joint training stable is not needed).

Shape vocabulary: ``B`` observations, ``N`` rays per observation, ``L`` latent size.
"""
import torch

import srns
import util


def stack_observations(dataset):
    """Every observation of ``dataset`` (samples_per_instance = 1) as one dict of stacked tensors.

    Few-shot fitting uses one or two views per object, so they fit in memory at once.

    :return: (observation dict with tensors (B, ...), target rgb (B, N, 3))
    """
    observations = [dataset[i][0][0] for i in range(len(dataset))]
    stacked = {key: torch.stack([obs[key] for obs in observations]) for key in observations[0]}
    return stacked, stacked['rgb']


def fit_latent_codes(model, dataset, num_steps, lr=1e-3, batch_size=-1, rays_per_view=1024, l1_weight=200.,
                     reg_weight=1e-3, kl_weight=1., device='cpu', generator=None, progress=None, amp_dtype=None,
                     forward=None):
    """Optimise only ``model.latent_codes`` on the observations of ``dataset``; the networks stay fixed.

    :param model: SRNsModel whose latent table has one row per instance of ``dataset`` (and whose
        networks hold the trained weights); it is modified in place
    :param dataset: dataio.SceneClassDataset of the fitting views (samples_per_instance = 1)
    :param num_steps: Adam steps
    :param lr: Adam learning rate for the codes
    :param batch_size: observations per step; -1 = all of them (every code gets a gradient every step)
    :param rays_per_view: random pixels per observation and step; -1 = whole images (needed by the
        U-Net renderer, which convolves over the image)
    :param l1_weight, reg_weight, kl_weight: loss weights, as in training (SPEC section 1)
    :param generator: torch.Generator on the CPU for the ray and batch draws (reproducible fits)
    :param progress: optional callable(step, losses dict of floats), called every 50 steps and at the end
    :param amp_dtype: None (float32, the reference's computation) or a dtype for autocast around the forward
        and the losses, as in training
    :param forward: optional callable used in place of the model's forward, e.g. ``torch.compile(model)``
    :return: list of the total loss at every step (floats)
    """
    model = util.unwrap_model(model)
    if model.fit_single_srn or model.has_params:
        raise ValueError("fitting latent codes needs a model with a latent table: not fit_single_srn, "
                         "not has_params")
    if model.use_unet_renderer and rays_per_view != -1:
        raise ValueError("the U-Net renderer convolves over whole images: use rays_per_view=-1")

    observations, target_rgb = stack_observations(dataset)
    num_observations, num_pixels = target_rgb.shape[:2]
    if batch_size == -1 or batch_size > num_observations:
        batch_size = num_observations
    if rays_per_view == -1 or rays_per_view > num_pixels:
        rays_per_view = num_pixels
    observations = {key: value.to(device) for key, value in observations.items()}
    target_rgb = target_rgb.to(device)

    # Frozen networks: only the codes are optimised (the reference hands Adam every parameter, but
    # frozen ones never receive a gradient, so the result is the same).
    for name, param in model.named_parameters():
        param.requires_grad_(name == util.LATENT_CODES_KEY)
    optimizer = torch.optim.Adam([model.latent_codes.weight], lr=lr)

    losses_per_step = []
    for step in range(num_steps):
        if batch_size < num_observations:
            obs_idx = torch.randperm(num_observations, generator=generator)[:batch_size].to(device)
        else:
            obs_idx = torch.arange(num_observations, device=device)
        batch = {key: value[obs_idx] for key, value in observations.items()}
        target = target_rgb[obs_idx]  # (B, N, 3)
        if rays_per_view < num_pixels:
            # a different random pixel subset per observation: (B, N') indices into N
            ray_idx = torch.rand(len(obs_idx), num_pixels, generator=generator).argsort(dim=1)[:, :rays_per_view]
            ray_idx = ray_idx.to(device)
            batch['uv'] = torch.gather(batch['uv'], 1, ray_idx[..., None].expand(-1, -1, 2))  # (B, N', 2)
            target = torch.gather(target, 1, ray_idx[..., None].expand(-1, -1, 3))  # (B, N', 3)

        with util.autocast(target.device.type, amp_dtype):
            prediction = (model if forward is None else forward)(batch)
            losses = srns.compute_losses(model, batch, prediction, target, l1_weight=l1_weight,
                                         reg_weight=reg_weight, kl_weight=kl_weight)
        optimizer.zero_grad(set_to_none=True)
        losses['total_loss'].backward()
        optimizer.step()

        if progress is not None and (step % 50 == 0 or step == num_steps - 1):
            progress(step, {key: value.item() for key, value in losses.items()})  # host sync: logging only
        losses_per_step.append(losses['total_loss'].detach())
    return [float(loss) for loss in losses_per_step]
