"""Train a Scene Representation Network (paper section 3.4, "Training details"; SPEC section 6).

One explicit loop, as the reference's ``train.py`` runs it: a step counter that counts across the stages of
a multi-resolution schedule (side lengths, batch sizes and step counts per stage), one plain Adam over all
parameters, validation every ``--steps_til_val`` steps, checkpoints every ``--steps_til_ckpt`` steps and at
the end, TensorBoard summaries. Same flags, same YAML-ish configs (``train_configs/``), same checkpoint
format, so the reference's configs and pre-trained checkpoints work unchanged.

Beyond the reference (SPEC section 8):

- runs on any device (``--device``), shows a progress bar, is reproducible given ``--seed``;
- resumes exactly and automatically from the newest checkpoint in ``logging_root`` (model, Adam state,
  step, stage, epoch, position in the epoch's data order, RNG states); ``--start_step`` still works and
  lands in the right stage;
- SIGINT/SIGTERM finish the current step, write a checkpoint and exit (130/143);
- a non-finite loss stops the run with a message and never reaches a checkpoint;
- multi-GPU with ``torchrun`` (DistributedDataParallel; rank 0 alone logs and writes);
- switches for bf16 autocast (``--amp bf16``) and ``torch.compile`` (``--compile``, replayed as CUDA graphs on
  one GPU); the default is the reference's fp32 path;
- ``--generate_shepard_metzler`` builds the Shepard-Metzler dataset on first use (the demo config).

The per-step scalars stay on the device and travel to the host in one transfer every ``--steps_til_log`` steps,
read one log interval late (``ScalarQueue``): the host waits for the GPU only on image and validation steps and
at checkpoints, so the GPU keeps an interval of steps queued while TensorBoard is written.

Usage: ``python train.py -c train_configs/demo.yml``; several GPUs:
``torchrun --nproc_per_node=4 train.py -c train_configs/cars.yml`` (the batch sizes are per GPU).
"""
import math
import os
import pathlib
import random
import signal
import sys
import threading
import time

import configargparse
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

import dataio
import srns
import util

# Per-step scalars, in the order of the stacked tensor that is buffered on the device between log steps.
SCALAR_NAMES = ('scaled_distortion_loss', 'scaled_regularization_loss', 'scaled_latent_loss', 'total_loss',
                'out_min', 'out_max', 'trgt_min', 'trgt_max', 'latent_reg_loss', 'embed_min', 'embed_max')
# Under torchrun each logged scalar is reduced over the ranks: losses averaged (the loss of the whole batch),
# extremes by min or max.
SCALAR_REDUCTIONS = ('mean', 'mean', 'mean', 'mean', 'min', 'max', 'min', 'max', 'mean', 'min', 'max')
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def get_parser():
    """The reference's flags with their names and defaults (SPEC section 6), then ours."""
    p = configargparse.ArgumentParser(config_file_parser_class=util.ConfigFileParser,
                                      description="Train a Scene Representation Network.")
    p.add('-c', '--config_filepath', required=False, is_config_file=True, help='Path to a config file.')

    # Multi-resolution schedule: one comma-separated entry per stage.
    p.add_argument('--img_sidelengths', type=str, default='64',
                   help='Side lengths of the training images, one per stage (e.g. 64,128).')
    p.add_argument('--max_steps_per_img_sidelength', type=str, default='200000',
                   help='Number of steps of each stage.')
    p.add_argument('--batch_size_per_img_sidelength', type=str, default='64',
                   help='Batch size of each stage (per GPU under torchrun).')

    p.add_argument('--data_root', required=True, help='Training dataset (root/<instance>/rgb, pose, intrinsics.txt).')
    p.add_argument('--val_root', required=False, help='Validation dataset; no validation without it.')
    p.add_argument('--logging_root', type=str, default='./logs',
                   help='Where params.txt, model.txt, events/ and checkpoints/ go.')

    p.add_argument('--lr', type=float, default=5e-5, help='Adam learning rate.')
    p.add_argument('--l1_weight', type=float, default=200, help='Weight of the image loss (an MSE, despite the name).')
    p.add_argument('--kl_weight', type=float, default=1, help='Weight of the latent-code prior.')
    p.add_argument('--reg_weight', type=float, default=1e-3, help='Weight of the depth regulariser.')

    p.add_argument('--steps_til_ckpt', type=int, default=10000, help='Steps between checkpoints.')
    p.add_argument('--steps_til_val', type=int, default=1000, help='Steps between validations.')
    p.add_argument('--no_validation', action='store_true', default=False, help='Never validate.')

    p.add_argument('--preload', action='store_true', default=False,
                   help='Decode every training image once into RAM.')
    p.add_argument('--checkpoint_path', default=None,
                   help='Checkpoint file or folder (its last *.pth) to take the weights from.')
    p.add_argument('--overwrite_embeddings', action='store_true', default=False,
                   help='Drop the checkpoint\'s latent codes (fit new scenes with the trained networks).')
    p.add_argument('--start_step', type=int, default=0,
                   help='Step to start counting from (resuming from logging_root needs no start step).')
    p.add_argument('--specific_observation_idcs', type=str, default=None,
                   help='Comma-separated view indices to train on (few-shot fitting), e.g. 64 or 64,104.')
    p.add_argument('--max_num_instances_train', type=int, default=-1, help='Use the first n training instances.')
    p.add_argument('--max_num_observations_train', type=int, default=50, help='Views per training instance.')
    p.add_argument('--max_num_instances_val', type=int, default=10, help='Validation instances.')
    p.add_argument('--max_num_observations_val', type=int, default=10, help='Views per validation instance.')
    p.add_argument('--has_params', action='store_true', default=False,
                   help='Take the latent codes from the dataset\'s params/ instead of learning them.')

    p.add_argument('--tracing_steps', type=int, default=10, help='Ray-marching steps.')
    p.add_argument('--freeze_networks', action='store_true', help='Train only the latent codes.')
    p.add_argument('--fit_single_srn', action='store_true', required=False, help='One SRN for one scene.')
    p.add_argument('--use_unet_renderer', action='store_true', help='DeepVoxels U-Net pixel generator (128 px).')
    p.add_argument('--embedding_size', type=int, default=256, help='Size of the latent codes.')

    # Ours.
    g = p.add_argument_group('beyond the reference')
    g.add_argument('--device', type=str, default=None, help='cuda or cpu (default: cuda when available).')
    g.add_argument('--seed', type=int, default=0, help='Seeds the initial weights, data order and depth noise.')
    g.add_argument('--num_workers', type=int, default=None,
                   help='DataLoader worker processes (default: 4 on CUDA, 0 on the CPU; for the one decoding pass '
                        'per stage of --rays_on_device, one per core up to 16 on CUDA).')
    g.add_argument('--amp', choices=('none', 'bf16'), default='none',
                   help='Mixed precision: bf16 autocast around forward and losses (default: fp32).')
    g.add_argument('--compile', action='store_true', default=False,
                   help='torch.compile the model, recomputing activations in the backward pass to halve memory.')
    g.add_argument('--fast', action='store_true', default=False,
                   help='The fast GPU path: --amp bf16 and --compile (with CUDA graphs on one GPU), TF32 matmuls, '
                        'fused Adam. About 5x the reference\'s throughput at a quarter of its memory '
                        '(benchmarks/NOTES.md).')
    g.add_argument('--no_cuda_graphs', action='store_true', default=False,
                   help='With --compile on one CUDA device the compiled step is replayed as CUDA graphs (the CPU '
                        'then launches one graph instead of hundreds of kernels); this turns that off. Never '
                        'used under torchrun.')
    g.add_argument('--kernels', choices=util.KERNEL_CHOICES, default='render', help=util.KERNELS_HELP)
    g.add_argument('--init_depth_std', type=float, default=5e-4,
                   help='Std of the ray marcher\'s initial depth noise (reference: 5e-4).')
    g.add_argument('--steps_til_log', type=int, default=10,
                   help='Steps between host synchronisations: scalars, progress bar and loss check.')
    g.add_argument('--steps_til_image', type=int, default=100, help='Steps between TensorBoard images.')
    g.add_argument('--steps_til_embedding', type=int, default=0,
                   help='Steps between latent-table projector summaries (0: never; the reference: 500).')
    g.add_argument('--generate_shepard_metzler', type=int, default=0, metavar='NUM_OBJECTS',
                   help='If data_root or val_root does not exist, first generate a Shepard-Metzler dataset of '
                        'this many objects in their parent folder (shepard_metzler.py; 0: never).')

    # The training recipe beyond the reference's (train_configs/*_fast.yml); the defaults are the reference's.
    r = p.add_argument_group('training recipe (defaults: the reference)')
    r.add_argument('--rays_per_view', type=int, default=0,
                   help='Train on this many random pixels of each view of a batch instead of whole images '
                        '(0: whole images, as the reference). The batch size then counts views. MLP pixel '
                        'generator only; validation and test.py render whole images.')
    r.add_argument('--rays_on_device', action='store_true', default=False,
                   help='With --rays_per_view: keep every training view on the training device (float16, decoded '
                        'once per side length) and draw the rays there instead of in DataLoader workers; many '
                        'views a step then cost no host time. Needs 6 bytes per pixel of device memory.')
    r.add_argument('--tracing_grad_steps', type=int, default=0,
                   help='Backpropagate through only the last this many of the --tracing_steps ray-marching steps '
                        '(truncated backpropagation, not in the paper: the earlier steps run without autograd, '
                        'which saves their backward pass and activations; 0: every step, as the reference).')
    r.add_argument('--latent_lr', type=float, default=None,
                   help='Adam learning rate of the latent codes (default: --lr, one rate for all, as the reference).')
    r.add_argument('--lr_warmup_steps', type=int, default=0,
                   help='Ramp the learning rates linearly from 0 over this many steps (0: no warm-up).')
    r.add_argument('--lr_schedule', choices=('constant', 'cosine'), default='constant',
                   help='constant (the reference), or cosine decay over the whole schedule to --lr_min_ratio.')
    r.add_argument('--lr_min_ratio', type=float, default=0.1,
                   help='With --lr_schedule cosine: the final learning rate as a fraction of the peak.')
    r.add_argument('--max_minutes', type=float, default=0,
                   help='Stop after this many minutes of wall clock (from the start, setup and compilation '
                        'included, summed over resumptions), with a final checkpoint and validation; the cosine '
                        'decay then follows whichever of steps and minutes is further along (0: no limit).')
    # (Not named --checkpoint_*: the reference's configs say `checkpoint:` for --checkpoint_path, a prefix match.)
    r.add_argument('--save_at_minutes', type=str, default=None, metavar='M1,M2,...',
                   help='Also write a checkpoint when the wall clock, counted as --max_minutes counts it, first '
                        'passes each of these minutes: with a constant learning rate, one run then shows the '
                        'quality reached at several budgets (benchmarks/time_to_quality.sh).')
    return p


# --- Configuration ------------------------------------------------------------------------------------

class SetupError(Exception):
    """A problem with the inputs or the environment: reported in one line, without a traceback."""


def data_error_message(error):
    """The one-line message of a dataset error, also when a DataLoader worker re-raised it.

    A worker's exception reaches the main process as the same type whose text is the worker's whole
    traceback ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."); its last line
    is the original message, which names the file.
    """
    text = str(error).strip()
    if text.startswith('Caught ') and 'Traceback' in text:
        text = text.splitlines()[-1]
        text = text.split(': ', 1)[1] if text.startswith(type(error).__name__) and ': ' in text else text
    return text


def parse_int_list(text, name):
    try:
        return [int(item) for item in str(text).split(',') if item.strip()]
    except ValueError:
        raise SetupError(f"--{name}: expected comma-separated integers, got {text!r}") from None


def parse_minutes(text):
    """--save_at_minutes: positive minutes, ascending."""
    try:
        minutes = sorted(float(item) for item in str(text).split(',') if item.strip())
    except ValueError:
        raise SetupError(f"--save_at_minutes: expected comma-separated minutes, got {text!r}") from None
    if not minutes or minutes[0] <= 0:
        raise SetupError(f"--save_at_minutes: expected minutes > 0, got {text!r}")
    return minutes


def schedule_from_opt(opt):
    """(side lengths, batch sizes, step counts) per stage, checked."""
    sidelengths = parse_int_list(opt.img_sidelengths, 'img_sidelengths')
    batch_sizes = parse_int_list(opt.batch_size_per_img_sidelength, 'batch_size_per_img_sidelength')
    max_steps = parse_int_list(opt.max_steps_per_img_sidelength, 'max_steps_per_img_sidelength')
    if not (len(sidelengths) == len(batch_sizes) == len(max_steps)) or not sidelengths:
        raise SetupError(f"the stage lists must have one entry per stage and the same length: "
                         f"--img_sidelengths {opt.img_sidelengths} ({len(sidelengths)}), "
                         f"--batch_size_per_img_sidelength {opt.batch_size_per_img_sidelength} ({len(batch_sizes)}), "
                         f"--max_steps_per_img_sidelength {opt.max_steps_per_img_sidelength} ({len(max_steps)})")
    if min(sidelengths) < 3 or min(batch_sizes) < 1 or min(max_steps) < 0:
        raise SetupError("side lengths must be >= 3, batch sizes >= 1 and step counts >= 0")
    if opt.use_unet_renderer and (set(sidelengths) != {128}):
        raise SetupError(f"--use_unet_renderer is built for 128 x 128 images, but --img_sidelengths is "
                         f"{opt.img_sidelengths}: use 128 for every stage")
    return sidelengths, batch_sizes, max_steps


def stage_of(step, max_steps):
    """The stage a step counter lies in (the reference never left stage 0 for a large start_step)."""
    end = 0
    for stage, steps in enumerate(max_steps):
        end += steps
        if step < end:
            return stage
    return len(max_steps) - 1


def check_dataset_root(path, name):
    if not os.path.isdir(path):
        raise SetupError(f"--{name} {path}: folder not found (expected root/<instance>/rgb/, pose/, intrinsics.txt)")
    if not any(entry.is_dir() and not entry.name.startswith('.') for entry in os.scandir(path)):
        raise SetupError(f"--{name} {path}: empty, no instance folders (expected root/<instance>/rgb/, pose/, "
                         f"intrinsics.txt)")


def check_writable(folder):
    try:
        util.ensure_writable_folder(folder)
    except OSError as error:
        raise SetupError(f"--logging_root {folder}: not writable ({error.strerror or error}); "
                         f"choose another folder") from None


def generate_shepard_metzler(opt):
    """Build the Shepard-Metzler dataset that data_root / val_root point into, if they are missing."""
    import shepard_metzler
    roots = [opt.data_root] + ([opt.val_root] if opt.val_root and not opt.no_validation else [])
    for dataset_dir in sorted({str(pathlib.Path(root).parent) for root in roots if not os.path.isdir(root)}):
        print(f"Generating the Shepard-Metzler dataset in {dataset_dir} (first use only) ...", flush=True)
        try:
            shepard_metzler.ensure_dataset(dataset_dir, num_objects=opt.generate_shepard_metzler, progress=True)
        except (ValueError, OSError) as error:
            raise SetupError(str(error)) from None


# --- Data ---------------------------------------------------------------------------------------------

class EpochSampler(Sampler):
    """The shuffled data order of one epoch, reproducible from (seed, epoch), sharded over ranks.

    Like DistributedSampler (pad to a multiple of the world size, rank r takes every r-th index), but it
    can start ``start_batch`` batches into the epoch, so a resumed run sees exactly the remaining order.

    With ``keyed`` it yields ``epoch * num_samples + index`` instead of ``index``: keys that differ from epoch
    to epoch, for datasets whose items also draw random numbers (``dataio.RandomRays``).
    """

    def __init__(self, num_samples, batch_size, seed, rank=0, world_size=1, keyed=False):
        self.num_samples, self.batch_size, self.keyed = num_samples, batch_size, keyed
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.num_per_rank = -(-num_samples // world_size)
        self.batches_per_epoch = self.num_per_rank // batch_size  # drop_last, as the reference

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        order += order[:self.num_per_rank * self.world_size - len(order)]
        order = order[self.rank::self.world_size]
        order = order[self.start_batch * self.batch_size:self.batches_per_epoch * self.batch_size]
        if self.keyed:
            order = [self.epoch * self.num_samples + index for index in order]
        return iter(order)

    def __len__(self):
        return max(0, (self.batches_per_epoch - self.start_batch) * self.batch_size)


def ignore_interrupts(worker_id):
    """DataLoader worker init: leave SIGINT/SIGTERM to the main process.

    Ctrl-C and `timeout` signal the whole process group. A worker killed by them makes PyTorch raise
    from inside whatever the main process is doing (the final checkpoint save included); ignoring the
    signals lets the main process finish its step, save, and shut the workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def to_device(batch, device):
    """Move a dict of tensors to the device (non-blocking: the loader pins memory on CUDA)."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


# --- Optimiser and learning rates -------------------------------------------------------------------------

def make_optimizer(model, opt, fused=False):
    """Adam over all parameters, frozen ones included, as the reference (SPEC section 1); with --latent_lr the
    latent table is a second parameter group with its own rate. Each group keeps its peak rate as ``base_lr``."""
    codes = getattr(model, 'latent_codes', None)
    if opt.latent_lr is None or codes is None or model.fit_single_srn:
        groups = [{'params': list(model.parameters()), 'base_lr': opt.lr}]
    else:
        networks = [param for name, param in model.named_parameters() if name != util.LATENT_CODES_KEY]
        groups = [{'params': networks, 'base_lr': opt.lr}, {'params': [codes.weight], 'base_lr': opt.latent_lr}]
    for group in groups:
        group['lr'] = group['base_lr']
    return torch.optim.Adam(groups, lr=opt.lr, fused=fused)


def learning_rate_factor(step, total_steps, warmup_steps=0, schedule='constant', min_ratio=0.1, time_fraction=0.):
    """The fraction of the peak learning rate at ``step``: a linear warm-up, then constant or a cosine decay
    that reaches ``min_ratio`` at the end of the schedule (or of the time budget, ``time_fraction`` of which
    has passed, if that comes first). 1 throughout for the reference's recipe."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == 'cosine':
        progress = min(1.0, max(step / max(1, total_steps), time_fraction))
        factor *= min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def resumed_learning_rate_factor(factor, step, resume_step, resume_factor, ramp_steps):
    """The schedule's ``factor`` at ``step`` of a resumed run whose schedule jumped up: ramped linearly over
    ``ramp_steps`` steps from the factor the checkpoint last trained with (``resume_factor``), never above the
    schedule's.

    A longer --max_minutes or step count moves a cosine decay back up, and at once a larger rate diverges: Adam's
    moments are tuned to the small late steps (measured on a GPU: a 4.6x jump on resuming sent the loss from
    10.8 to 47 within two steps). train.py ramps only for a jump of over 1.2x after the warm-up, so resuming an
    unchanged schedule stays exact.
    """
    done = (step - resume_step + 1) / ramp_steps  # of the ramp, after this step
    return factor if done >= 1 else min(factor, resume_factor + (factor - resume_factor) * done)


def set_learning_rates(optimizer, factor):
    for group in optimizer.param_groups:
        group['lr'] = group['base_lr'] * factor


# --- One step -----------------------------------------------------------------------------------------

def train_step(model, optimizer, model_input, ground_truth, loss_weights, amp_dtype=None):
    """One optimisation step, in the reference's order: forward, zero_grad, losses, backward, step.

    :param loss_weights: dict with ``l1_weight``, ``reg_weight``, ``kl_weight``
    :param amp_dtype: None (fp32) or a dtype for torch.autocast around forward and losses
    :return: dict of tensors on the device, no host sync: ``image_loss``, ``depth_reg_loss``,
        ``latent_loss``, ``total_loss`` (0-d) and the detached prediction ``rgb (B, N, 3)``, ``depth (B, N, 1)``
    """
    device_type = ground_truth['rgb'].device.type
    with util.autocast(device_type, amp_dtype):
        rgb, depth = model(model_input)
        optimizer.zero_grad(set_to_none=True)
        losses = srns.compute_losses(model, model_input, (rgb, depth), ground_truth['rgb'], **loss_weights)
    losses['total_loss'].backward()
    optimizer.step()
    losses['rgb'], losses['depth'] = rgb.detach(), depth.detach()
    return losses


def step_scalars(losses, model, model_input, ground_truth, loss_weights):
    """The per-step TensorBoard scalars as one float32 vector on the device (order: SCALAR_NAMES)."""
    plain = util.unwrap_model(model)
    rgb, target = losses['rgb'], ground_truth['rgb']
    if getattr(plain, 'latent_codes', None) is not None and not plain.fit_single_srn:
        codes = plain.latent_codes.weight.detach()
        embed_min, embed_max = codes.min(), codes.max()
    else:
        embed_min = embed_max = torch.zeros((), device=rgb.device)
    values = [loss_weights['l1_weight'] * losses['image_loss'], loss_weights['reg_weight'] * losses['depth_reg_loss'],
              loss_weights['kl_weight'] * losses['latent_loss'], losses['total_loss'],
              rgb.min(), rgb.max(), target.min(), target.max(), losses['latent_loss'], embed_min, embed_max]
    return torch.stack([v.detach().float().reshape(()) for v in values])


# --- Validation and images ------------------------------------------------------------------------------

@torch.no_grad()
def validate(model, loader, device, amp_dtype=None):
    """Mean image loss, PSNR and SSIM over the validation set (eval mode, back to train mode after)."""
    model = util.unwrap_model(model)
    model.eval()
    dist_losses, psnrs, ssims = [], [], []
    for model_input, ground_truth in loader:
        model_input, ground_truth = to_device(model_input, device), to_device(ground_truth, device)
        with util.autocast(device.type, amp_dtype):
            rgb, depth = model(model_input)
        rgb = rgb.float()
        dist_losses.append(float(srns.image_loss(rgb, ground_truth['rgb'])) * rgb.shape[0])
        batch_psnrs, batch_ssims = srns.psnr_ssim(rgb, ground_truth['rgb'])
        psnrs += batch_psnrs
        ssims += batch_ssims
    model.train()
    return sum(dist_losses) / len(psnrs), float(np.mean(psnrs)), float(np.mean(ssims))


def to_01(images):
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()


def depth_images(depth, target):
    """(B, N, 1) depths -> (B, 3, H, W) in [0, 1]: viridis over each object's depth range, the background
    (white in the target) white, a labelled colour bar beside each (``util.colorize_depth``)."""
    side = srns.geometry.lin2img(depth[:1].float()).shape[-1]
    foreground = util.foreground_mask(target.float())  # (B, N): not the white background
    previews = [util.colorize_depth(d.reshape(side, side).cpu().numpy(), m.reshape(side, side).cpu().numpy())
                for d, m in zip(depth.float(), foreground)]
    return torch.from_numpy(np.stack(previews)).permute(0, 3, 1, 2).float() / 255.


def image_grid(images, ncol=None):
    """(B, C, H, W) in [0, 1] -> (C, rows*H, ncol*W), a plain tiling (no torchvision dependency). A diverged
    model's NaN comes out black and infinities as the end of the range they lie past, so TensorBoard gets no NaN."""
    images = torch.nan_to_num(images, nan=0., posinf=1., neginf=0.).clamp(0, 1)
    batch, channels, height, width = images.shape
    ncol = ncol or batch
    nrow = -(-batch // ncol)
    canvas = torch.ones(channels, nrow * height, ncol * width, dtype=images.dtype)
    for index in range(batch):
        row, col = divmod(index, ncol)
        canvas[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = images[index]
    return canvas


@torch.no_grad()
def whole_views(model, dataset, device, amp_dtype=None, num_views=4):
    """(model input, ground truth, {'rgb', 'depth'}) of ``num_views`` evenly spaced whole observations of
    ``dataset`` rendered by the model: what log_images shows when the training batch is scattered rays."""
    indices = np.linspace(0, len(dataset) - 1, num=min(num_views, len(dataset))).round().astype(int)
    model_input, ground_truth = dataio.collate_fn([dataset[int(i)] for i in indices])
    model_input, ground_truth = to_device(model_input, device), to_device(ground_truth, device)
    with util.autocast(device.type, amp_dtype):
        rgb, depth = util.unwrap_model(model)(model_input)
    return model_input, ground_truth, {'rgb': rgb, 'depth': depth}


@torch.no_grad()
def log_images(writer, step, model, model_input, ground_truth, losses, num_images=4):
    """Output_vs_gt, pred_depth, normals, an error image and the ray-march progress (first few views)."""
    first = {key: value[:num_images] if torch.is_tensor(value) else value for key, value in model_input.items()}
    rgb, depth = losses['rgb'][:num_images].float(), losses['depth'][:num_images].float()
    target = ground_truth['rgb'][:num_images].float()
    comparison = srns.comparison_images(first, (rgb, depth), target)  # (b, 3, s, 3s)
    writer.add_image('Output_vs_gt', image_grid(to_01(comparison), ncol=1), step)
    writer.add_image('pred_depth', image_grid(depth_images(depth, target)), step)
    normals = srns.normal_map(first, depth)
    writer.add_image('normals', image_grid(to_01(normals)), step)
    error = srns.geometry.lin2img(((rgb - target) ** 2).mean(dim=-1, keepdim=True))  # (b, 1, s, s)
    writer.add_image('error', image_grid((error / error.max().clamp_min(1e-8)).clamp(0, 1).cpu()), step)

    # The ray-march progress: depth after every marching step of the first view (one extra forward).
    plain = util.unwrap_model(model)
    one = {key: value[:1] if torch.is_tensor(value) else value for key, value in model_input.items()}
    _, _, trace = plain(one, return_trace=True)
    trace = torch.cat([srns.geometry.lin2img(d.float()) for d in trace], dim=0)  # (steps+1, 1, s, s)
    trace = (trace - trace.min()) / (trace.max() - trace.min()).clamp_min(1e-8)
    writer.add_image('raymarch_progress', image_grid(trace.cpu()), step)


# --- Checkpoints and resuming ---------------------------------------------------------------------------

def newest_checkpoint(checkpoint_dir):
    """The newest checkpoint file in ``checkpoint_dir`` by name, or a phrase saying there is none."""
    try:
        return str(util.resolve_checkpoint_path(checkpoint_dir))
    except FileNotFoundError:
        return f"none (no checkpoint in {checkpoint_dir} yet)"


def rng_state():
    """torch, CUDA, numpy and Python RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {'torch': torch.get_rng_state(),
             'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'position': int(position),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
             'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state((numpy_state['kind'], numpy_state['keys'].numpy().astype(np.uint32), numpy_state['position'],
                         numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def find_resumable_checkpoint(checkpoint_dir, set_aside_unreadable=True):
    """(path, checkpoint dict) of the newest readable checkpoint (last by name) in ``checkpoint_dir``, or None.

    A checkpoint that cannot be read (truncated by a full disk or a copy, overwritten) does not stop the
    run: it is renamed to ``<name>.corrupt`` (kept for inspection, and no longer the newest) with a warning,
    and the previous one is tried. Checkpoints are written atomically, so this takes a fault from outside.
    """
    for path in reversed(sorted(pathlib.Path(checkpoint_dir).glob('*.pth'))):
        try:
            checkpoint = util.read_checkpoint(path, map_location='cpu')
        except ValueError as error:
            if not set_aside_unreadable:
                raise SetupError(str(error)) from None
            corrupt = path.with_name(path.name + '.corrupt')
            os.replace(path, corrupt)
            print(f"train.py: warning: {path} cannot be read, renamed to {corrupt.name}; "
                  f"trying the previous checkpoint ({str(error).splitlines()[0]})", file=sys.stderr, flush=True)
            continue
        if 'step' not in checkpoint:
            raise SetupError(f"{path}: a checkpoint without a training step (not written by this "
                             f"train.py) lies in {checkpoint_dir}; to start from its weights, move it out and "
                             f"pass it as --checkpoint_path, or choose another --logging_root")
        return path, checkpoint
    return None


# Options whose change between a run and its resumption must be refused: the model's shapes and kind.
FIXED_ON_RESUME = ('embedding_size', 'has_params', 'fit_single_srn', 'use_unet_renderer')
# Options that do not change what is trained, only how it runs or is logged: never reported.
IGNORED_ON_RESUME = ('config_filepath', 'logging_root', 'device', 'num_workers', 'preload', 'checkpoint_path',
                     'start_step', 'steps_til_ckpt', 'steps_til_val', 'steps_til_log', 'steps_til_image',
                     'steps_til_embedding', 'generate_shepard_metzler', 'no_validation', 'val_root',
                     'max_num_instances_val', 'max_num_observations_val', 'fast', 'amp', 'compile',
                     'kernels', 'save_at_minutes', 'no_cuda_graphs')


def resume_changes(stored, opt, path):
    """The options that differ from the run being resumed, as 'name old -> new' strings.

    Refuses (SetupError) what cannot match the stored model; the rest is returned, to be reported: the
    new values apply from here on.
    """
    current = vars(opt)
    changed = []
    for name in sorted(set(stored) & set(current)):
        if name in IGNORED_ON_RESUME or stored[name] == current[name]:
            continue
        if name in FIXED_ON_RESUME:
            raise SetupError(f"{path}: this run was trained with --{name} {stored[name]}, not {current[name]}; "
                             f"the model cannot change on resumption. Use the same value, or another "
                             f"--logging_root for a new run")
        if name == 'latent_lr' and (stored[name] is None) != (current[name] is None):
            raise SetupError(f"{path}: this run was trained with --latent_lr {stored[name]}, not "
                             f"{current[name]}; a separate rate for the codes cannot be added or removed on "
                             f"resumption (Adam's state is kept per parameter group)")
        changed.append(f"--{name} {stored[name]} -> {current[name]}")
    return changed


class ScalarQueue:
    """The per-step scalars on their way to the host, read one log interval late.

    ``push`` keeps each step's scalar vector (len(SCALAR_NAMES),) on the device. ``flush`` stacks the steps pushed
    since the last flush into one tensor, reduces it (``reduce``: over the ranks under torchrun), starts its copy
    to the host without waiting, and returns the window flushed the time before, which the GPU finished while the
    last interval was being queued: the host never waits for the steps it has just queued, and the GPU stays busy
    with them while the host writes TensorBoard. ``flush(wait=True)`` returns every step pushed so far (before a
    checkpoint and at the end, so that no checkpoint is written past a non-finite step unseen).

    Each window also carries the wall-clock seconds from the end of the window before it to its own end, where
    its steps ran: a CUDA event's time on the device (idle gaps included), or the host's clock on the CPU, where
    the steps have run when they are flushed. So the throughput stays right when several windows are read at once
    (at a checkpoint, at the end), which the moment of reading would not give.
    """

    def __init__(self, reduce):
        self.reduce = reduce  # (k, S) on the device -> (k, S) on the device
        self.rows, self.steps = [], []
        self.in_flight = []  # [(values (k, S) on the host, CUDA event or host time, the k steps)], oldest first
        self.last_end = None  # the end (event or host time) of the newest window returned

    def push(self, values, step):
        self.rows.append(values)
        self.steps.append(step)

    def flush(self, wait=False):
        """-> [(values (k, S) float32 on the CPU, list of their k steps, seconds since the window before ended
        or None for the first)]"""
        if self.rows:
            values = self.reduce(torch.stack(self.rows))
            if values.is_cuda:  # into pinned memory, in stream order; read once the event has passed
                host, end = values.to('cpu', non_blocking=True), torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                host, end = values.cpu(), time.perf_counter()
            self.in_flight.append((host, end, self.steps))
            self.rows, self.steps = [], []
        split = len(self.in_flight) if wait else max(len(self.in_flight) - 1, 0)  # the newest stays in flight
        ready, self.in_flight = self.in_flight[:split], self.in_flight[split:]
        windows = []
        for host, end, steps in ready:
            if isinstance(end, torch.cuda.Event):
                end.synchronize()
            seconds = None
            if isinstance(end, torch.cuda.Event) and isinstance(self.last_end, torch.cuda.Event):
                seconds = self.last_end.elapsed_time(end) / 1e3
            elif isinstance(end, float) and isinstance(self.last_end, float):
                seconds = end - self.last_end
            self.last_end = end
            windows.append((host, steps, seconds))
        return windows


# --- Distributed ----------------------------------------------------------------------------------------

def reduce_scalars(values, world_size):
    """(k, len(SCALAR_NAMES)) per-rank scalars -> the same over all ranks (one all-gather; collective)."""
    if world_size == 1:
        return values
    gathered = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(gathered, values.contiguous())
    gathered = torch.stack(gathered)  # (world_size, k, len(SCALAR_NAMES))
    mean, low, high = gathered.mean(0), gathered.amin(0), gathered.amax(0)
    columns = {'mean': mean, 'min': low, 'max': high}
    return torch.stack([columns[how][:, i] for i, how in enumerate(SCALAR_REDUCTIONS)], dim=1)


def setup_distributed(opt):
    """(rank, world size, device); initialises the process group under torchrun."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    device_name = opt.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device_name)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def shared_value(value, device, world_size):
    """Rank 0's float ``value`` on every rank (one broadcast under torchrun), so that all ranks decide alike."""
    if world_size == 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def any_rank(flag, device, world_size):
    """True if ``flag`` is true on any rank (one all-reduce under torchrun)."""
    if world_size == 1:
        return bool(flag)
    tensor = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits.

    A second SIGINT more than ``repeat_window`` seconds after the first stops at once, without saving (a
    deliberate second Ctrl-C). Closer repeats are the same interrupt delivered twice: GNU ``timeout -s INT``
    and some job schedulers signal the process and then its process group, so it arrives twice within
    milliseconds; taking that for a second Ctrl-C would lose the final checkpoint.
    """

    def __init__(self, repeat_window=1.0):
        self.signum = None
        self.received_at = None
        self.repeat_window = repeat_window
        self.previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for signum in SIGNAL_EXIT_CODES:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.received_at = signum, now
        elif signum == signal.SIGINT and now - self.received_at > self.repeat_window:
            raise KeyboardInterrupt  # a deliberate second Ctrl-C: stop now

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


# --- The run --------------------------------------------------------------------------------------------

def main(argv=None):
    """Parse the flags (and config), build data and model, train. Returns 0; exits non-zero on errors."""
    opt = get_parser().parse_args(argv)
    if opt.fast:
        opt.amp, opt.compile = 'bf16', True
    # One run per logging_root: the first process (rank 0 under torchrun) locks it; if that fails, torchrun
    # stops the other ranks.
    lock = util.RunLock(opt.logging_root, what='train.py') if int(os.environ.get('RANK', '0')) == 0 else None
    try:
        if lock is not None:
            check_writable(opt.logging_root)
            lock.acquire()
        return train(opt)
    except (SetupError, util.RunLockedError, util.CheckpointWriteError) as error:
        raise SystemExit(f"train.py: error: {error}") from None
    except KeyboardInterrupt:  # a deliberate second Ctrl-C, or one during setup
        print(f"train.py: interrupted without saving; run the same command to resume from the newest checkpoint "
              f"in {pathlib.Path(opt.logging_root) / 'checkpoints'}", file=sys.stderr, flush=True)
        raise SystemExit(SIGNAL_EXIT_CODES[signal.SIGINT]) from None
    finally:
        if lock is not None:
            lock.release()


def use_fused_kernels(opt, device):
    """--kernels: where phi runs on the fused Triton kernels (util.fused_kernels_mode): False, 'render' or True."""
    try:
        return util.fused_kernels_mode(opt.kernels, opt.amp, device)
    except ValueError as error:
        raise SetupError(str(error)) from None


def check_device_memory(device, nbytes, what):
    """Refuse (SetupError) to place ``nbytes`` on a CUDA device when they would take over half its free memory:
    the model still needs its activations. Other devices are not checked."""
    if device.type != 'cuda':
        return
    free, total = torch.cuda.mem_get_info(device)
    if nbytes > free / 2:
        raise SetupError(f"{what} need {nbytes / 2 ** 30:.1f} GiB on {device}, which has {free / 2 ** 30:.1f} of "
                         f"{total / 2 ** 30:.1f} GiB free (at most half of it may go to them); drop "
                         f"--rays_on_device to stream the views from the host, or train on fewer views")


def train(opt):
    run_start = time.perf_counter()
    sidelengths, batch_sizes, max_steps = schedule_from_opt(opt)
    total_steps = sum(max_steps)
    save_at_minutes = parse_minutes(opt.save_at_minutes) if opt.save_at_minutes else []
    specific_observation_idcs = (parse_int_list(opt.specific_observation_idcs, 'specific_observation_idcs')
                                 if opt.specific_observation_idcs is not None else None)
    if opt.freeze_networks and opt.fit_single_srn:
        raise SetupError("--freeze_networks trains only latent codes, and --fit_single_srn has none: use one")
    for name in ('steps_til_ckpt', 'steps_til_val', 'steps_til_log', 'steps_til_image'):
        if getattr(opt, name) < 1:
            raise SetupError(f"--{name} must be >= 1, got {getattr(opt, name)}")
    if opt.rays_per_view < 0 or opt.lr_warmup_steps < 0 or opt.max_minutes < 0 or not 0 <= opt.lr_min_ratio <= 1:
        raise SetupError("--rays_per_view, --lr_warmup_steps and --max_minutes must be >= 0, --lr_min_ratio in "
                         "[0, 1]")
    if not 0 <= opt.tracing_grad_steps <= opt.tracing_steps:
        raise SetupError(f"--tracing_grad_steps must be between 0 (every step) and --tracing_steps "
                         f"({opt.tracing_steps}), got {opt.tracing_grad_steps}")
    if opt.rays_per_view and opt.use_unet_renderer:
        raise SetupError("--rays_per_view: the U-Net renderer convolves over whole images; use 0 with it")
    if opt.rays_on_device and not opt.rays_per_view:
        raise SetupError("--rays_on_device draws random rays: it needs --rays_per_view N (N > 0)")

    rank, world_size, device = setup_distributed(opt)
    is_main = rank == 0
    # What stays float32 under --fast (the input layer, step lengths, geometry) may use TF32; the exact path not.
    util.set_tf32(opt.fast)
    logging_root = pathlib.Path(opt.logging_root)
    checkpoint_dir = logging_root / 'checkpoints'
    check_writable(logging_root)  # on every rank, so that none waits at the barrier for a failed one
    if is_main:  # main() holds the folder's lock: no other run writes here
        for stale in util.remove_stale_temporaries(checkpoint_dir):
            print(f"Removed {stale}, a partial checkpoint left by an earlier run that was killed", flush=True)
        found = find_resumable_checkpoint(checkpoint_dir)
        if opt.generate_shepard_metzler:
            generate_shepard_metzler(opt)
    if world_size > 1:
        dist.barrier()

    validation = bool(opt.val_root) and not opt.no_validation
    check_dataset_root(opt.data_root, 'data_root')
    if validation:
        check_dataset_root(opt.val_root, 'val_root')
    try:
        train_dataset = dataio.SceneClassDataset(root_dir=opt.data_root, img_sidelength=sidelengths[0],
                                                 max_num_instances=opt.max_num_instances_train,
                                                 max_observations_per_instance=opt.max_num_observations_train,
                                                 specific_observation_idcs=specific_observation_idcs,
                                                 samples_per_instance=1, preload=opt.preload)
        val_dataset = None
        if validation:
            val_dataset = dataio.SceneClassDataset(root_dir=opt.val_root, img_sidelength=sidelengths[0],
                                                   max_num_instances=opt.max_num_instances_val,
                                                   max_observations_per_instance=opt.max_num_observations_val,
                                                   samples_per_instance=1)
    except (ValueError, OSError) as error:  # FileNotFoundError, PermissionError: the message names the file
        raise SetupError(str(error)) from None
    for stage, batch_size in enumerate(batch_sizes):
        if len(train_dataset) // world_size < batch_size:
            raise SetupError(f"--data_root {opt.data_root}: {len(train_dataset)} observations"
                             f"{f' over {world_size} processes' if world_size > 1 else ''} do not fill one batch "
                             f"of {batch_size} (stage {stage}); lower --batch_size_per_img_sidelength")

    torch.manual_seed(opt.seed)
    np.random.seed(opt.seed)
    random.seed(opt.seed)
    model = srns.SRNsModel(num_instances=train_dataset.num_instances, latent_dim=opt.embedding_size,
                           has_params=opt.has_params, fit_single_srn=opt.fit_single_srn,
                           use_unet_renderer=opt.use_unet_renderer, tracing_steps=opt.tracing_steps,
                           freeze_networks=opt.freeze_networks, init_depth_std=opt.init_depth_std,
                           tracing_grad_steps=opt.tracing_grad_steps)
    model.to(device)
    model.train()
    fused_kernels = use_fused_kernels(opt, device)
    model.use_fused_kernels(fused_kernels)
    # The fused Adam kernel is one launch instead of one per parameter tensor; same update rule.
    optimizer = make_optimizer(model, opt, fused=opt.fast and device.type == 'cuda')
    base_lrs = [group['base_lr'] for group in optimizer.param_groups]  # this run's, also after resuming
    if world_size > 1:
        torch.manual_seed(opt.seed + rank)  # different depth noise per rank; weights are broadcast by DDP

    # Resume from logging_root, else load --checkpoint_path's weights (the reference's way), else start.
    step, epoch, epoch_step, epoch_label, elapsed_before = opt.start_step, 0, 0, 0, 0.
    resume_lr_factor = None  # the learning-rate factor the checkpoint last trained with
    if not is_main:  # rank 0 has set unreadable checkpoints aside before the barrier
        found = find_resumable_checkpoint(checkpoint_dir, set_aside_unreadable=False)
    resume_path, resume = found if found is not None else (None, None)
    try:
        if resume is not None:
            changes = resume_changes(resume.get('config', {}), opt, resume_path)
            stored_codes = util.num_latent_codes(resume)
            if stored_codes is not None and not opt.fit_single_srn and stored_codes != train_dataset.num_instances:
                raise SetupError(f"{resume_path}: this run was trained on {stored_codes} instances, but --data_root "
                                 f"{opt.data_root} now gives {train_dataset.num_instances}; resume with the same "
                                 f"data, or start a new run in another --logging_root")
            if is_main:
                note = f" (ignoring --checkpoint_path {opt.checkpoint_path})" if opt.checkpoint_path else ''
                print(f"Resuming from {resume_path} at step {resume['step']}{note}", flush=True)
                if changes:
                    print(f"train.py: warning: resuming with changed options, the new values apply from step "
                          f"{resume['step']} on: {'; '.join(changes)}", file=sys.stderr, flush=True)
            util.load_checkpoint(resume, model, optimizer)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):  # Adam's state is restored, the
                group['base_lr'] = group['lr'] = base_lr                    # learning rates are this run's
            step, epoch, epoch_step = resume['step'], resume.get('epoch', 0), resume.get('epoch_step', 0)
            epoch_label = resume.get('epoch_label', epoch)
            elapsed_before = resume.get('elapsed_seconds', 0.)
            resume_lr_factor = resume.get('lr_factor')
            rng_states = resume.get('rng_states')
            if rng_states is not None and len(rng_states) == world_size:
                set_rng_state(rng_states[rank])
            else:
                torch.manual_seed(opt.seed + rank + 7919 * step)
        elif opt.checkpoint_path:
            if is_main:
                print(f"Loading weights from {opt.checkpoint_path}"
                      f"{' without its latent codes' if opt.overwrite_embeddings else ''}", flush=True)
            util.load_checkpoint(opt.checkpoint_path, model, overwrite_embeddings=opt.overwrite_embeddings,
                                 map_location=device)
    except (FileNotFoundError, ValueError) as error:
        raise SetupError(str(error)) from None
    del resume

    # Writes happen on rank 0 only.
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        util.cond_mkdir(checkpoint_dir)
        with open(logging_root / 'params.txt', 'w') as file:
            file.write('\n'.join(f"{name}: {value}" for name, value in sorted(vars(opt).items())) + '\n')
        with open(logging_root / 'model.txt', 'w') as file:
            file.write(str(model) + '\n')
        # The event files lie in logging_root itself, so `tensorboard --logdir logs` names each run by its folder.
        writer = SummaryWriter(str(logging_root), flush_secs=30)

    train_model = model
    # CUDA graphs: the outputs of a replay live in memory the next replay overwrites, so each step is marked
    # as a new one and everything read off a step's outputs (scalars, images) is computed before the next.
    cuda_graphs = opt.compile and not opt.no_cuda_graphs and device.type == 'cuda' and world_size == 1
    if opt.compile:
        # The fused kernels save what their backward needs; with a memory budget the compiler ran their whole
        # forward again in the backward (benchmarks/NOTES.md).
        train_model = util.compile_model(train_model, activation_memory_budget=1.0 if fused_kernels is True else 0.5,
                                         mode='reduce-overhead' if cuda_graphs else None)
    if world_size > 1:
        # has_params leaves the latent table without gradients: DDP must not wait for them
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=opt.has_params)

    amp_dtype = torch.bfloat16 if opt.amp == 'bf16' else None
    # What the loader serves: whole observations (the reference), or random rays of them (--rays_per_view).
    num_workers = opt.num_workers if opt.num_workers is not None else (4 if device.type == 'cuda' else 0)
    train_items, device_rays = train_dataset, None
    if opt.rays_on_device:
        # decoded once per stage: a worker per core (at most 16) unless --num_workers says otherwise
        decoders = opt.num_workers if opt.num_workers is not None else (
            min(16, os.cpu_count() or 1) if device.type == 'cuda' else 0)
        device_rays = dataio.DeviceRays(train_dataset, opt.rays_per_view, device, seed=opt.seed + 7919 * rank,
                                        num_workers=decoders, worker_init_fn=ignore_interrupts)
        check_device_memory(device, dataio.DeviceRays.nbytes(len(train_dataset), max(sidelengths)),
                            f"--rays_on_device: the {len(train_dataset)} training views at {max(sidelengths)} px")
    elif opt.rays_per_view:
        train_items = dataio.RandomRays(train_dataset, opt.rays_per_view, seed=opt.seed + 7919 * rank)
    scheduled_lr = opt.lr_warmup_steps > 0 or opt.lr_schedule != 'constant'
    loss_weights = {'l1_weight': opt.l1_weight, 'reg_weight': opt.reg_weight, 'kl_weight': opt.kl_weight}
    loader_kwargs = dict(num_workers=num_workers, pin_memory=device.type == 'cuda',
                         persistent_workers=num_workers > 0, collate_fn=dataio.collate_fn,
                         worker_init_fn=ignore_interrupts if num_workers > 0 else None)
    val_loader = None
    if validation:
        val_loader = DataLoader(val_dataset, batch_size=2, shuffle=False, num_workers=0,
                                collate_fn=dataio.collate_fn)

    def save(path_step):
        """Checkpoint ``checkpoints/epoch_%04d_iter_%06d.pth`` (collective under torchrun: RNG states), after
        reading every step's scalars: a state past a non-finite loss is never written."""
        bad = flush_scalars(wait=True)
        if any_rank(bad is not None, device, world_size):
            fail_non_finite(bad)
        states = [rng_state()]
        if world_size > 1:
            states = [None] * world_size
            dist.all_gather_object(states, rng_state())
        if is_main:
            path = checkpoint_dir / f"epoch_{epoch_label:04d}_iter_{path_step:06d}.pth"
            try:
                util.save_checkpoint(path, model, optimizer, step=step, stage=stage_of(step, max_steps),
                                     epoch=epoch, epoch_step=epoch_step, epoch_label=epoch_label,
                                     elapsed_seconds=elapsed(), lr_factor=lr_factor, world_size=world_size,
                                     rng_states=states,
                                     config=vars(opt))
            except util.CheckpointWriteError as error:
                raise SetupError(f"{error}; stopped at step {step}. The newest intact checkpoint is "
                                 f"{last_checkpoint or newest_checkpoint(checkpoint_dir)}") from None
            return path

    def elapsed():
        """Wall-clock seconds of this run, earlier resumptions included."""
        return elapsed_before + time.perf_counter() - run_start

    def validate_and_log(step):
        """Validation PSNR/SSIM of the current model (rank 0), logged at ``step``; stops on a bad val file."""
        try:
            val_loss, val_psnr, val_ssim = validate(model, val_loader, device, amp_dtype)
        except (ValueError, OSError) as error:
            raise SetupError(f"{data_error_message(error)} (validation at step {step}); the newest checkpoint "
                             f"is {last_checkpoint or newest_checkpoint(checkpoint_dir)}") from None
        writer.add_scalar('val_dist_loss', val_loss, step)
        writer.add_scalar('val_psnr', val_psnr, step)
        writer.add_scalar('val_ssim', val_ssim, step)
        return val_loss, val_psnr, val_ssim

    if step >= total_steps:
        if is_main:
            print(f"Nothing to do: step {step} is the end of the schedule ({total_steps} steps)", flush=True)
            writer.close()
        if world_size > 1:
            dist.destroy_process_group()
        return 0

    stop = SignalFlag().install()
    progress = None
    if is_main:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=min(step, total_steps), dynamic_ncols=True, unit='step',
                        smoothing=0.1, mininterval=1.0)
    scalars = ScalarQueue(lambda values: reduce_scalars(values, world_size))
    loader, loader_iter, sampler, stage = None, None, None, None
    exit_code, last_checkpoint = 0, None

    timer = {'step': None}  # the step after the last window read (steps_per_second)

    def flush_scalars(wait=False):
        """Write the per-step scalars that have reached the host (every one pushed, with ``wait``) and the
        throughput between log steps; return the first non-finite step among them, if any."""
        bad = None
        for values, steps, seconds in scalars.flush(wait):  # values (k, len(SCALAR_NAMES))
            end = steps[-1] + 1
            if writer is not None and seconds and timer['step'] is not None and end > timer['step']:
                writer.add_scalar('steps_per_second', (end - timer['step']) / seconds, end)
            timer['step'] = end
            for row, logged_step in zip(values, steps):
                if not torch.isfinite(row[:4]).all():
                    bad = bad or (logged_step, dict(zip(SCALAR_NAMES[:4], row[:4].tolist())))
                if writer is not None:
                    for name, value in zip(SCALAR_NAMES, row.tolist()):
                        writer.add_scalar(name, value, logged_step)
            if progress is not None:
                progress.set_postfix(loss=f"{values[-1, 3].item():.4g}", stage=stage, refresh=False)
        return bad

    def fail_non_finite(bad):
        logged_step, terms = bad if bad else (step, {})
        shown = ', '.join(f"{name} {value:.4g}" for name, value in terms.items())
        message = (f"train.py: error: non-finite loss at step {logged_step} ({shown or 'on another process'}); "
                   f"stopped without writing a checkpoint of this state. The last good checkpoint "
                   f"is {last_checkpoint or 'the newest in ' + str(checkpoint_dir)}; try a lower --lr.")
        raise SystemExit(message)

    loop_start = time.perf_counter()
    # A resumed run whose schedule now asks for a much larger rate than the checkpoint ran at ramps up to it.
    lr_factor, lr_ramp = resume_lr_factor if resume_lr_factor is not None else 1.0, None
    ramp_steps = opt.lr_warmup_steps or 100
    save_at_minutes = [m for m in save_at_minutes if m * 60 > elapsed_before]  # not again after resuming
    saved_at_end = None  # (minutes, step, minutes now) of --save_at_minutes times the final checkpoint serves

    def report_saved_at(passed, at_step, minutes_now):
        for minutes in passed if is_main else ():  # one line each: scripts look them up
            progress.write(f"--save_at_minutes {minutes:g}: {last_checkpoint} at step {at_step}, "
                           f"{minutes_now:.2f} min")
    # The fraction of --max_minutes passed: updated on log steps, the same on every rank; a resumed run starts
    # from the checkpoint's clock, so its learning rate continues the decay instead of jumping back to the peak.
    time_fraction = elapsed_before / (60 * opt.max_minutes) if opt.max_minutes else 0.
    out_of_time = time_fraction >= 1
    if scheduled_lr and resume_lr_factor is not None and step >= opt.lr_warmup_steps:
        first = learning_rate_factor(step, total_steps, opt.lr_warmup_steps, opt.lr_schedule, opt.lr_min_ratio,
                                     time_fraction)
        if first > 1.2 * resume_lr_factor:
            lr_ramp = (step, resume_lr_factor)
            if is_main:
                progress.write(f"The learning-rate schedule now asks for {first / resume_lr_factor:.1f}x the rate this "
                               f"run last trained with: ramping up to it over {ramp_steps} steps")
    try:
        while step < total_steps and not out_of_time:
            if loader_iter is None:
                new_stage = stage_of(step, max_steps)
                if new_stage != stage:
                    stage = new_stage
                    sampler = EpochSampler(len(train_dataset), batch_sizes[stage], opt.seed, rank, world_size,
                                           keyed=bool(opt.rays_per_view))
                    if device_rays is not None:
                        try:
                            device_rays.set_img_sidelength(sidelengths[stage])
                        except (ValueError, OSError) as error:
                            raise SetupError(f"{data_error_message(error)} (reading the training views for "
                                             f"--rays_on_device at step {step})") from None
                    else:
                        train_dataset.set_img_sidelength(sidelengths[stage])
                        loader = DataLoader(train_items, batch_size=batch_sizes[stage], sampler=sampler,
                                            drop_last=True, generator=torch.Generator().manual_seed(opt.seed),
                                            **loader_kwargs)
                    stage_end = sum(max_steps[:stage + 1])
                    if is_main:
                        progress.write(f"Stage {stage}: {sidelengths[stage]} px, batch {batch_sizes[stage]}"
                                       f"{' per process' if world_size > 1 else ''}, steps {step}..{stage_end}")
                sampler.set_epoch(epoch, epoch_step)
                loader_iter = (device_rays.batches(sampler, batch_sizes[stage]) if device_rays is not None
                               else iter(loader))

            try:
                model_input, ground_truth = next(loader_iter)
                data_error = None
            except (ValueError, OSError) as error:  # an unreadable file found mid-run (a corrupt image)
                data_error = data_error_message(error)
            if data_error is not None:
                if world_size == 1:  # the state is sound: keep it (under torchrun the other ranks go on)
                    last_checkpoint = save(step)
                raise SetupError(f"{data_error} (training step {step}); fix or remove that view, then run the "
                                 f"same command to resume from {last_checkpoint or newest_checkpoint(checkpoint_dir)}")
            model_input, ground_truth = to_device(model_input, device), to_device(ground_truth, device)
            if scheduled_lr:
                lr_factor = learning_rate_factor(step, total_steps, opt.lr_warmup_steps, opt.lr_schedule,
                                                 opt.lr_min_ratio, time_fraction)
                if lr_ramp is not None:
                    lr_factor = resumed_learning_rate_factor(lr_factor, step, *lr_ramp, ramp_steps)
                set_learning_rates(optimizer, lr_factor)
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            losses = train_step(train_model, optimizer, model_input, ground_truth, loss_weights, amp_dtype)
            scalars.push(step_scalars(losses, model, model_input, ground_truth, loss_weights), step)

            if writer is not None and step % opt.steps_til_image == 0:
                if opt.rays_per_view:  # a batch of scattered rays makes no picture: render whole training views
                    log_images(writer, step, model, *whole_views(model, train_dataset, device, amp_dtype))
                else:
                    log_images(writer, step, model, model_input, ground_truth, losses)
            if opt.steps_til_embedding and writer is not None and step % opt.steps_til_embedding == 0 \
                    and not opt.fit_single_srn:
                writer.add_embedding(model.latent_codes.weight.detach().cpu(), global_step=step)
            if val_loader is not None and step % opt.steps_til_val == 0 and is_main:
                val_loss, val_psnr, val_ssim = validate_and_log(step)
                progress.write(f"step {step}: val PSNR {val_psnr:.2f} dB, SSIM {val_ssim:.3f}, "
                               f"image loss {val_loss:.4g}")

            step += 1
            epoch_step += 1
            if progress is not None:
                progress.update(1)
            # Move the epoch on right away, so that a checkpoint written now resumes at the next batch.
            if epoch_step >= sampler.batches_per_epoch or step >= stage_end:
                # Checkpoint names count epochs as the reference does: not when a stage or the run ends.
                epoch_label += step < stage_end
                epoch, epoch_step, loader_iter = epoch + 1, 0, None
                if step >= stage_end:
                    loader = None  # a new stage builds a new DataLoader

            log_now = step % opt.steps_til_log == 0 or step % opt.steps_til_ckpt == 0 or step >= total_steps
            if world_size == 1 and stop.signum is not None:
                log_now = True
            if log_now:
                bad = flush_scalars()
                if any_rank(bad is not None, device, world_size):
                    fail_non_finite(bad)
                if opt.max_minutes:
                    time_fraction = shared_value(elapsed() / (60 * opt.max_minutes), device, world_size)
                    out_of_time = time_fraction >= 1
                if save_at_minutes:
                    minutes_now = shared_value(elapsed() / 60, device, world_size)
                    passed = [m for m in save_at_minutes if m <= minutes_now]
                    save_at_minutes = [m for m in save_at_minutes if m > minutes_now]
                    if passed and step < total_steps and not out_of_time:
                        last_checkpoint = save(step)
                        report_saved_at(passed, step, minutes_now)
                    elif passed:  # this is the last step: the final checkpoint, written below, serves them
                        saved_at_end = passed, step, minutes_now
                if any_rank(stop.signum is not None, device, world_size):
                    last_checkpoint = save(step)
                    exit_code = SIGNAL_EXIT_CODES.get(stop.signum, 143)
                    if is_main:
                        received = signal.Signals(stop.signum).name if stop.signum else 'a signal to another process'
                        progress.write(f"Interrupted ({received}): saved {last_checkpoint or 'checkpoint'} at step "
                                       f"{step}; run the same command to resume.")
                    break
            if step % opt.steps_til_ckpt == 0 and step < total_steps:
                last_checkpoint = save(step)
        else:
            last_checkpoint = save(step)  # reads every step's scalars first
            if is_main:
                quality = ''
                if val_loader is not None:  # the final model's quality, whatever steps_til_val is
                    _, val_psnr, val_ssim = validate_and_log(step)
                    quality = f"; val PSNR {val_psnr:.2f} dB, SSIM {val_ssim:.3f}"
                minutes, seconds = divmod(int(time.perf_counter() - loop_start), 60)
                budget = f" (the --max_minutes {opt.max_minutes:g} budget)" if out_of_time else ''
                progress.write(f"Done: {step} steps in {minutes}:{seconds:02d}{budget}{quality}; "
                               f"final checkpoint {last_checkpoint}")
                if saved_at_end:
                    report_saved_at(*saved_at_end)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        dataio.shutdown_workers(loader_iter)
        loader_iter = loader = None
        if world_size > 1 and dist.is_initialized():
            # DDP holds the process group: release it first, or its threads may still run at exit (abort).
            train_model = None
            dist.destroy_process_group()
    if exit_code:
        raise SystemExit(exit_code)
    return 0


if __name__ == '__main__':
    sys.exit(main())
