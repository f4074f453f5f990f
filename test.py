"""Evaluate a trained SRN: novel views, few-shot reconstruction of unseen objects, and what to look at.

Paper section 4: SRNs are judged by PSNR/SSIM of rendered novel views against held-out images, for the
objects seen in training ("novel view synthesis") and for unseen objects reconstructed from one or two
views (section 3.3, "few-shot reconstruction"). This script renders every observation of ``--data_root``
(instance, then view order) with the latent code of its instance and writes the reference's outputs
(SPEC section 6):

    params.txt                                one ``name: value`` line per option
    renderings/<%06d instance>/<%06d k>.png   the prediction, k counting the selected views of the instance
    gt_comparisons/<%06d instance>/<%06d k>.png   normals | prediction | target, s high and 3s wide
    results.txt                               "mean PSNR, mean SSIM" over all rendered views

and, beyond the reference:

    metrics_per_image.csv   instance, instance_name, view, k, psnr, ssim, split ('fitted' / 'held_out')
    metrics.json            the same per image, means per instance, and means over all, held-out and fitted views
    depth/<inst>/<k>.png    rendered camera depth, 16-bit PNG of round(depth * 1000)   (--save_depth)
    depth/<inst>/<k>_preview.png   the same, colour-mapped, background white, with a labelled colour bar
    normals/<inst>/<k>.png  camera-space normals as (n + 1) / 2                         (--save_normals)
    point_clouds/<inst>.ply coloured points fused from the rendered depth of all views  (--point_cloud)
    turntable/<inst>.gif    the object rendered along a camera orbit (.mp4 too when an encoder is installed)
    interpolation/<a>_<b>.gif   renderings along the straight line between two latent codes

With ``--fit_steps N`` the latent codes of the objects in ``--data_root`` are first fitted to the views
``--fit_observation_idcs`` with the networks frozen (``fit.py``), then every view is rendered; metrics are
reported over all views and over the held-out ones (the usual few-shot protocol).

Shape vocabulary: ``B`` observations, ``N`` rays per observation, ``s`` image side, ``L`` latent size.
"""
import csv
import importlib.util
import json
import math
import os
import sys
import time

import configargparse
import imageio.v3 as iio
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import data_util
import dataio
import fit
import geometry
import srns
import util


def get_parser():
    """The command line: the reference's flags and defaults (SPEC section 6), then ours."""
    p = configargparse.ArgumentParser(config_file_parser_class=util.ConfigFileParser,
                                      description=__doc__.split('\n')[0])
    p.add_argument('-c', '--config_filepath', is_config_file=True, help='config file path')

    # --- reference flags ---
    p.add_argument('--img_sidelength', type=int, default=128, help='side length of the rendered images')
    p.add_argument('--data_root', required=True, help='dataset to render (SRN format, SPEC section 5)')
    p.add_argument('--logging_root', default='./logs', help='output folder')
    p.add_argument('--batch_size', type=int, default=32, help='observations rendered at once')
    p.add_argument('--preload', action='store_true', help='decode all images into RAM first')
    p.add_argument('--max_num_instances', type=int, default=-1, help='keep only the first n instances')
    p.add_argument('--specific_observation_idcs', type=str, default=None,
                   help='render only these views of every instance, e.g. 64,104')
    p.add_argument('--has_params', action='store_true', help='take z from the params/ of each view')
    p.add_argument('--save_out_first_n', type=int, default=250,
                   help='write images only for the first n instances (metrics are computed for all)')
    # The reference's test configs write `checkpoint:`, which reached --checkpoint_path by argparse's prefix
    # matching; both spellings are accepted explicitly.
    p.add_argument('--checkpoint_path', '--checkpoint', dest='checkpoint_path', default=None,
                   help='a .pth file, or a folder (its last *.pth by name)')
    p.add_argument('--num_instances', type=int, default=None,
                   help='latent codes in the checkpoint (read from it when not given)')
    p.add_argument('--tracing_steps', type=int, default=10, help='ray-marching steps')
    p.add_argument('--fit_single_srn', action='store_true', help='the checkpoint is a single-scene SRN')
    p.add_argument('--use_unet_renderer', action='store_true', help='DeepVoxels U-Net pixel generator')
    p.add_argument('--embedding_size', type=int, default=None,
                   help='latent size L (read from the checkpoint when not given; 256 in the paper)')

    # --- ours ---
    p.add_argument('--device', default=None, help="'cuda', 'cuda:1', 'cpu' (default: cuda when available)")
    p.add_argument('--seed', type=int, default=0, help='seeds the initial-depth noise: renderings are reproducible')
    p.add_argument('--init_depth_std', type=float, default=5e-4,
                   help='std of the ray marcher initial depth (5e-4 as in the reference; 0: deterministic)')
    p.add_argument('--num_workers', type=int, default=0, help='DataLoader worker processes')
    p.add_argument('--fit_observation_idcs', type=str, default=None,
                   help="views used to fit the codes (e.g. 64 or 64,104): metrics are also reported over "
                        "the other, held-out views")
    p.add_argument('--fit_steps', type=int, default=0,
                   help='first fit new latent codes for the objects of --data_root to --fit_observation_idcs, '
                        'networks frozen, for this many steps (0: use the checkpoint codes)')
    p.add_argument('--fit_lr', type=float, default=1e-3, help='Adam learning rate of the fit')
    p.add_argument('--fit_batch_size', type=int, default=-1,
                   help='fitting observations per step (-1: all of them, every code every step)')
    p.add_argument('--fit_rays_per_view', type=int, default=1024,
                   help='random pixels per fitting view and step (-1: whole images)')
    p.add_argument('--l1_weight', type=float, default=200, help='image loss weight of the fit')
    p.add_argument('--kl_weight', type=float, default=1, help='latent loss weight of the fit')
    p.add_argument('--reg_weight', type=float, default=1e-3, help='depth regulariser weight of the fit')

    p.add_argument('--save_depth', action='store_true',
                   help='write depth/ (16-bit PNG, uint16 = round(depth*1000)) and a colour-mapped preview')
    p.add_argument('--save_normals', action='store_true', help='write normals/ as (n + 1) / 2 PNGs')
    p.add_argument('--point_cloud', action='store_true',
                   help='write point_clouds/<instance>.ply fused from the rendered depth of all views')
    p.add_argument('--foreground', choices=('prediction', 'target'), default='prediction',
                   help='which pixels are the object in point clouds and depth previews: where the predicted '
                        'colour, or the ground-truth colour, differs from the white background')
    p.add_argument('--foreground_threshold', type=float, default=0.05,
                   help='a pixel is background when every channel (in [0, 1]) is above 1 - threshold')
    p.add_argument('--turntable', type=int, default=0,
                   help='frames of a turntable video per written instance along a camera orbit (0: none)')
    p.add_argument('--interpolate', type=str, default=None,
                   help="two instance positions 'a,b': a video along the line between their latent codes")
    p.add_argument('--interpolation_frames', type=int, default=30, help='frames of the interpolation video')
    p.add_argument('--fps', type=float, default=15, help='frame rate of the videos')
    p.add_argument('--overwrite', action='store_true', help='allow writing into a logging_root with results')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.add_argument('--amp', choices=('none', 'bf16'), default='none',
                   help='bf16 autocast for rendering and fitting (default: float32, as the reference computed it)')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model (the first batch, and the first fitting step, wait for the '
                        'compiler; every batch is padded to --batch_size, so one compilation serves them all)')
    p.add_argument('--fast', action='store_true',
                   help='the fast GPU path of train.py --fast for rendering and fitting: --amp bf16, --compile '
                        'and TF32 matmuls for what stays float32')
    p.add_argument('--kernels', choices=util.KERNEL_CHOICES, default='render', help=util.KERNELS_HELP)
    return p


def parse_index_list(text, flag):
    """'64,104' -> [64, 104]; None or '' -> None."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(token) for token in str(text).replace(' ', '').split(',') if token]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers such as 64,104, got {text!r}") from None


# --- Model ------------------------------------------------------------------------------------------

def resolve_model_size(opt, checkpoint, num_dataset_instances):
    """(num_instances, embedding_size) for the model, checked against the checkpoint and the dataset."""
    path = checkpoint['path']
    stored_codes = checkpoint['model'].get(util.LATENT_CODES_KEY)
    if opt.embedding_size is not None:
        embedding_size = opt.embedding_size
    else:
        embedding_size = 256 if stored_codes is None else int(stored_codes.shape[1])

    if opt.fit_single_srn:
        return 1, embedding_size
    if stored_codes is None:
        raise ValueError(f"{path}: no latent codes in this checkpoint (a single-scene SRN?): pass --fit_single_srn")
    stored = int(stored_codes.shape[0])

    if opt.fit_steps > 0:  # new codes, one per object of data_root
        if opt.num_instances is not None and opt.num_instances != num_dataset_instances:
            raise ValueError(f"--num_instances {opt.num_instances}: with --fit_steps one code is fitted per "
                             f"instance of {opt.data_root}, which holds {num_dataset_instances}; drop --num_instances")
        return num_dataset_instances, embedding_size

    if opt.num_instances is not None and opt.num_instances != stored:
        raise ValueError(f"--num_instances {opt.num_instances} disagrees with {path}, which holds {stored} latent "
                         f"codes; drop --num_instances to read the number from the checkpoint")
    if not opt.has_params and num_dataset_instances > stored:
        raise ValueError(f"{opt.data_root}: {num_dataset_instances} instances, but {path} holds only {stored} latent "
                         f"codes (instance i is rendered with code i). For the objects the model was trained on "
                         f"use --max_num_instances {stored}; for unseen objects fit codes first, with "
                         f"--fit_steps and --fit_observation_idcs or with train.py --overwrite_embeddings "
                         f"--freeze_networks")
    return stored, embedding_size


def build_model(opt, num_instances, embedding_size):
    """SRNsModel from the options (the one place where options become keyword arguments)."""
    return srns.SRNsModel(num_instances=num_instances, latent_dim=embedding_size, tracing_steps=opt.tracing_steps,
                          has_params=opt.has_params, fit_single_srn=opt.fit_single_srn,
                          use_unet_renderer=opt.use_unet_renderer, init_depth_std=opt.init_depth_std)


class Forward:
    """The model's forward for rendering (no gradients) under test.py's precision flags; float32 (rgb, depth).

    By default it is the model's own float32 forward, the reference's computation. With ``amp_dtype`` it runs
    under autocast (the float32 regions of the model stay float32, as in training); with ``compile`` through
    ``torch.compile``. A compiled graph is specialised to the batch size, so every batch is padded to
    ``batch_size`` observations by repeating its last one (the padding is rendered and dropped): the dataset's
    last, shorter batch and the videos' batches reuse the first compilation instead of waiting for another.
    """

    def __init__(self, model, amp_dtype=None, compile=False, batch_size=1):
        self.model, self.amp_dtype, self.batch_size = model, amp_dtype, batch_size
        self.compiled = util.compile_model(model) if compile else None

    def __call__(self, model_input, z=None):
        """:param model_input: dict of (B, ...) tensors, B <= batch_size; :param z: optional (B, L) codes
        :return: rgb (B, N, 3), depth (B, N, 1), float32"""
        num = len(model_input['pose'])
        # a view of the latent table made under no_grad still requires grad; the compiled graph would be
        # specialised to that and compiled again for a padded (fresh) z
        z = None if z is None else z.detach()
        module = self.model
        if self.compiled is not None:
            module = self.compiled
            model_input = {key: self._as_compiled(value) if torch.is_tensor(value) else value
                           for key, value in model_input.items()}
            z = None if z is None else self._as_compiled(z)
        with torch.no_grad(), util.autocast(model_input['pose'].device.type, self.amp_dtype):
            rgb, depth = module(model_input, z=z)
        return rgb[:num].float(), depth[:num].float()

    def _as_compiled(self, tensor):
        """(B, ...) -> (batch_size, ...) contiguous, the last row repeated: the shape and the strides the compiled
        graph is specialised to (expanded, stride-0 inputs would compile it again)."""
        if len(tensor) < self.batch_size:
            tensor = torch.cat([tensor, tensor[-1:].expand(self.batch_size - len(tensor), *tensor.shape[1:])])
        return tensor.contiguous()


# --- Images, depth, point clouds, videos ----------------------------------------------------------

def write_ply(path, points, colors):
    """Binary little-endian PLY with x y z (float32) red green blue (uint8) per vertex."""
    points = np.asarray(points, dtype='<f4').reshape(-1, 3)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    vertices = np.empty(len(points), dtype=[('x', '<f4'), ('y', '<f4'), ('z', '<f4'),
                                            ('red', 'u1'), ('green', 'u1'), ('blue', 'u1')])
    vertices['x'], vertices['y'], vertices['z'] = points.T
    vertices['red'], vertices['green'], vertices['blue'] = colors.T
    header = ("ply\nformat binary_little_endian 1.0\ncomment SRN point cloud fused from rendered depth maps\n"
              f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with open(path, 'wb') as file:
        file.write(header.encode('ascii'))
        file.write(vertices.tobytes())


def read_ply(path):
    """(points (V, 3) float32, colors (V, 3) uint8) of a PLY written by ``write_ply``."""
    with open(path, 'rb') as file:
        data = file.read()
    end = data.index(b'end_header\n') + len(b'end_header\n')
    header = data[:end].decode('ascii').splitlines()
    count = int(next(line for line in header if line.startswith('element vertex')).split()[-1])
    vertices = np.frombuffer(data[end:], count=count, dtype=[('x', '<f4'), ('y', '<f4'), ('z', '<f4'),
                                                             ('red', 'u1'), ('green', 'u1'), ('blue', 'u1')])
    points = np.stack([vertices['x'], vertices['y'], vertices['z']], axis=1)
    colors = np.stack([vertices['red'], vertices['green'], vertices['blue']], axis=1)
    return points, colors


def mp4_encoder():
    """'pyav' or 'ffmpeg' when an MP4 encoder is installed for imageio, else None (MP4 is optional)."""
    if importlib.util.find_spec('av') is not None:
        return 'pyav'
    if importlib.util.find_spec('imageio_ffmpeg') is not None:
        return 'ffmpeg'
    return None


def write_video(path_stem, frames, fps):
    """Write frames (T, s, s, 3) uint8 as ``<stem>.gif`` (always) and ``<stem>.mp4`` (if an encoder exists).

    :return: the paths written
    """
    frames = np.asarray(frames)
    paths = [path_stem + '.gif']
    iio.imwrite(paths[0], frames, duration=1000. / fps, loop=0)  # duration: milliseconds per frame
    encoder = mp4_encoder()
    if encoder is not None:
        paths.append(path_stem + '.mp4')
        if encoder == 'pyav':
            iio.imwrite(paths[1], frames, plugin='pyav', codec='libx264', fps=int(round(fps)))
        else:
            import imageio.v2 as iio2
            iio2.mimwrite(paths[1], list(frames), fps=fps, macro_block_size=1)
    return paths


def orbit_poses(poses, num_frames):
    """cam2world (T, 4, 4) on a circle around the origin matching an instance's cameras.

    The radius is the mean distance of the camera centres to the origin, the world's up direction the one
    orthogonal to the cameras' horizontal x axes (so z-up and y-up datasets both work), the elevation the cameras' mean elevation, and the orbit starts at the first camera's azimuth.

    :param poses: (V, 4, 4) cam2world of the instance's views
    """
    poses = np.asarray(poses, dtype=np.float64)
    centres = poses[:, :3, 3]  # (V, 3)
    radius = float(np.linalg.norm(centres, axis=1).mean())
    # Upright cameras keep their x axis (right) horizontal: up is the direction most orthogonal to all of
    # them (the scatter matrix's smallest eigenvector), signed like the cameras' mean up vector (-y).
    rights = poses[:, :3, 0]  # (V, 3)
    eigenvalues, eigenvectors = np.linalg.eigh(rights.T @ rights)
    up = eigenvectors[:, 0]
    if len(poses) < 2 or eigenvalues[1] < 1e-6:  # too few distinct cameras to tell: average their up vectors
        up = -poses[:, :3, 1].mean(axis=0)
    up = up / np.linalg.norm(up)
    if up @ -poses[:, :3, 1].mean(axis=0) < 0:
        up = -up
    directions = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    elevation = float(np.arcsin(np.clip(directions @ up, -1., 1.)).mean())
    # basis of the plane orthogonal to up, starting at the first camera's azimuth
    first = directions[0] - (directions[0] @ up) * up
    if np.linalg.norm(first) < 1e-6:  # first camera on the pole: any horizontal start
        first = np.cross(up, [1., 0., 0.]) if abs(up[0]) < 0.9 else np.cross(up, [0., 1., 0.])
    e1 = first / np.linalg.norm(first)
    e2 = np.cross(up, e1)
    azimuths = np.linspace(0., 2. * np.pi, num_frames, endpoint=False)
    positions = radius * (math.cos(elevation) * (np.cos(azimuths)[:, None] * e1 + np.sin(azimuths)[:, None] * e2)
                          + math.sin(elevation) * up)
    return np.stack([geometry.look_at(position, target=(0., 0., 0.), up=up) for position in positions])


def render_frames(forward, poses, intrinsics, sidelength, z, batch_size, device):
    """Render (T, s, s, 3) uint8 frames for cam2world poses (T, 4, 4) and codes z (T, L) (None: single scene)
    with ``forward`` (a Forward, or the model itself)."""
    uv = geometry.uv_grid(sidelength, device=device)  # (N, 2)
    poses = torch.as_tensor(poses, dtype=torch.float32, device=device)
    frames = []
    for start in range(0, len(poses), batch_size):
        pose = poses[start:start + batch_size]  # (B, 4, 4)
        model_input = {'pose': pose, 'intrinsics': intrinsics.to(device).expand(len(pose), 4, 4),
                       'uv': uv.expand(len(pose), -1, -1)}
        z_batch = None if z is None else z[start:start + batch_size]
        rgb, _ = forward(model_input, z=z_batch)  # (B, N, 3)
        images = geometry.lin2img(rgb).permute(0, 2, 3, 1)  # (B, s, s, 3)
        frames.extend(util.to_uint8_image(image) for image in images)
    return np.stack(frames)


# --- Metrics ------------------------------------------------------------------------------------------

def mean_metrics(rows):
    """{'psnr', 'ssim', 'num_views'} averaged over the rows (None when there are none)."""
    if not rows:
        return {'psnr': None, 'ssim': None, 'num_views': 0}
    return {'psnr': float(np.mean([row['psnr'] for row in rows])),
            'ssim': float(np.mean([row['ssim'] for row in rows])), 'num_views': len(rows)}


def summarize(rows):
    """Means over all views, held-out views and fitted views, and per instance."""
    per_instance = []
    for instance in sorted({row['instance'] for row in rows}):
        mine = [row for row in rows if row['instance'] == instance]
        per_instance.append({'instance': instance, 'instance_name': mine[0]['instance_name'],
                             'all_views': mean_metrics(mine),
                             'held_out_views': mean_metrics([r for r in mine if r['split'] == 'held_out'])})
    return {'all_views': mean_metrics(rows),
            'held_out_views': mean_metrics([row for row in rows if row['split'] == 'held_out']),
            'fitted_views': mean_metrics([row for row in rows if row['split'] == 'fitted']),
            'per_instance': per_instance}


def write_metrics(logging_root, rows, summary, info):
    """results.txt (the reference's), metrics_per_image.csv and metrics.json."""
    with open(os.path.join(logging_root, 'results.txt'), 'w') as file:
        file.write("%0.6f, %0.6f" % (summary['all_views']['psnr'], summary['all_views']['ssim']))
    fields = ['instance', 'instance_name', 'view', 'k', 'psnr', 'ssim', 'split']
    with open(os.path.join(logging_root, 'metrics_per_image.csv'), 'w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (repr(row[key]) if isinstance(row[key], float) else row[key]) for key in fields})
    with open(os.path.join(logging_root, 'metrics.json'), 'w') as file:
        json.dump({**info, 'summary': {key: summary[key] for key in ('all_views', 'held_out_views', 'fitted_views')},
                   'per_instance': summary['per_instance'], 'per_image': rows}, file, indent=1)


# --- Main ---------------------------------------------------------------------------------------------

def _instance_name(dataset, instance):
    return os.path.basename(os.path.normpath(dataset.instance_dirs[instance]))


def _prepare_logging_root(logging_root, overwrite):
    """Check that ``logging_root`` may receive results and can be written; nothing is written yet."""
    if os.path.exists(os.path.join(logging_root, 'results.txt')) and not overwrite:
        raise FileExistsError(f"{logging_root}: already holds results.txt; pass --overwrite to replace the "
                              f"results, or choose another --logging_root")
    try:
        util.ensure_writable_folder(logging_root)
    except OSError as error:
        raise OutputError(f"{logging_root}: cannot write the results here ({error.strerror or error}); "
                          f"choose another --logging_root") from None


class OutputError(OSError):
    """The output folder cannot be written."""


def main(argv=None):
    """Run the evaluation; returns the summary dict (means over all / held-out / fitted views, per instance).

    Every input (flags, dataset, checkpoint) is checked before anything is written to ``--logging_root``.
    """
    opt = get_parser().parse_args(argv)
    specific_observation_idcs = parse_index_list(opt.specific_observation_idcs, '--specific_observation_idcs')
    fit_observation_idcs = parse_index_list(opt.fit_observation_idcs, '--fit_observation_idcs')
    interpolate = parse_index_list(opt.interpolate, '--interpolate')
    if opt.checkpoint_path is None:
        raise ValueError("--checkpoint_path is required: a trained model's .pth file, or its run's checkpoints/ "
                         "folder (config key `checkpoint_path:` or `checkpoint:`)")
    if opt.fit_steps > 0 and fit_observation_idcs is None:
        raise ValueError("--fit_steps needs --fit_observation_idcs, the views the codes are fitted to (e.g. 64)")
    if interpolate is not None and len(interpolate) != 2:
        raise ValueError(f"--interpolate: expected two instance positions 'a,b', got {opt.interpolate!r}")
    if opt.use_unet_renderer and opt.img_sidelength != 128:
        raise ValueError(f"--img_sidelength {opt.img_sidelength}: the U-Net renderer works at 128 only")
    if opt.fast:
        opt.amp, opt.compile = 'bf16', True
    device = torch.device(opt.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    fused_kernels = util.fused_kernels_mode(opt.kernels, opt.amp, device)  # before any file is read
    util.set_tf32(opt.fast)  # by default float32 throughout, as the reference computed it

    dataset = dataio.SceneClassDataset(root_dir=opt.data_root, img_sidelength=opt.img_sidelength,
                                       max_num_instances=opt.max_num_instances,
                                       specific_observation_idcs=specific_observation_idcs,
                                       samples_per_instance=1, preload=opt.preload)
    checkpoint = util.read_checkpoint(opt.checkpoint_path, map_location='cpu')
    num_instances, embedding_size = resolve_model_size(opt, checkpoint, dataset.num_instances)
    torch.manual_seed(opt.seed)
    model = build_model(opt, num_instances, embedding_size)
    util.load_checkpoint(checkpoint['path'], model, overwrite_embeddings=opt.fit_steps > 0)
    model.to(device).eval()
    model.use_fused_kernels(fused_kernels)
    forward = Forward(model, amp_dtype=torch.bfloat16 if opt.amp == 'bf16' else None, compile=opt.compile,
                      batch_size=opt.batch_size)

    _prepare_logging_root(opt.logging_root, opt.overwrite)
    with util.RunLock(opt.logging_root, what='test.py'):
        try:
            return _run(opt, model, forward, dataset, checkpoint, num_instances, embedding_size,
                        fit_observation_idcs, interpolate, device)
        except OSError as error:
            if error.filename is not None or isinstance(error, util.CheckpointWriteError):
                raise  # its message names the file
            raise OutputError(f"{opt.logging_root}: writing the results failed ({error.strerror or error})") \
                from None


def _run(opt, model, forward, dataset, checkpoint, num_instances, embedding_size, fit_observation_idcs,
         interpolate, device):
    with open(os.path.join(opt.logging_root, 'params.txt'), 'w') as file:
        file.write('\n'.join(f"{key}: {value}" for key, value in sorted(vars(opt).items())) + '\n')
    print(f"{checkpoint['path']}: {num_instances} latent codes of size {embedding_size}; "
          f"{dataset.num_instances} instances, {len(dataset)} views of {opt.data_root} at {opt.img_sidelength} px "
          f"on {device}")

    if opt.fit_steps > 0:
        fit_dataset = dataio.SceneClassDataset(root_dir=opt.data_root, img_sidelength=opt.img_sidelength,
                                               max_num_instances=opt.max_num_instances,
                                               specific_observation_idcs=fit_observation_idcs,
                                               samples_per_instance=1)
        generator = torch.Generator().manual_seed(opt.seed)
        torch.manual_seed(opt.seed)
        start_time = time.time()
        with tqdm(total=opt.fit_steps, desc='fitting latent codes', disable=opt.no_progress) as bar:
            def progress(step, losses):
                bar.update(step + 1 - bar.n)
                bar.set_postfix(loss=f"{losses['total_loss']:.4f}",
                                psnr=f"{10 * math.log10(4. / max(losses['image_loss'], 1e-12)):.2f}")
            fit.fit_latent_codes(model, fit_dataset, opt.fit_steps, lr=opt.fit_lr, batch_size=opt.fit_batch_size,
                                 rays_per_view=-1 if opt.use_unet_renderer else opt.fit_rays_per_view,
                                 l1_weight=opt.l1_weight, reg_weight=opt.reg_weight, kl_weight=opt.kl_weight,
                                 device=device, generator=generator, progress=progress,
                                 amp_dtype=forward.amp_dtype, forward=forward.compiled)
        model.eval()
        print(f"fitted {dataset.num_instances} latent codes to views {fit_observation_idcs} in {opt.fit_steps} steps, "
              f"{time.time() - start_time:.1f} s")
        fitted_path = os.path.join(opt.logging_root, 'checkpoints', 'fitted_latent_codes.pth')
        util.save_checkpoint(fitted_path, model, step=opt.fit_steps, config=vars(opt))
        print(f"fitted codes saved to {fitted_path} (render again with --checkpoint_path {fitted_path})")

    rows = evaluate(opt, forward, dataset, fit_observation_idcs, device)
    summary = summarize(rows)
    info = {'checkpoint': checkpoint['path'], 'data_root': opt.data_root, 'img_sidelength': opt.img_sidelength,
            'fit_observation_idcs': fit_observation_idcs, 'fit_steps': opt.fit_steps, 'seed': opt.seed}
    write_metrics(opt.logging_root, rows, summary, info)

    with torch.no_grad():
        if opt.turntable > 0:
            write_turntables(opt, model, forward, dataset, device)
        if interpolate is not None:
            write_interpolation(opt, model, forward, dataset, interpolate, device)

    for key in ('all_views', 'held_out_views', 'fitted_views'):
        part = summary[key]
        if part['num_views']:
            print(f"{key.replace('_', ' ')}: PSNR {part['psnr']:.4f} dB, SSIM {part['ssim']:.4f} "
                  f"over {part['num_views']} views")
    print_outputs(opt.logging_root)
    return summary


def print_outputs(logging_root):
    """Say where the results and pictures are (the folders this run wrote, with their file counts)."""
    print(f"Results in {logging_root}: results.txt, metrics.json, metrics_per_image.csv")
    described = {'renderings': 'the rendered views', 'gt_comparisons': 'normals | prediction | target',
                 'depth': 'depth maps (16-bit) and *_preview.png', 'normals': 'normal maps',
                 'point_clouds': 'coloured point clouds (.ply)', 'turntable': 'turntable videos',
                 'interpolation': 'latent-code interpolation videos'}
    for name, what in described.items():
        folder = os.path.join(logging_root, name)
        if os.path.isdir(folder):
            count = sum(len(files) for _, _, files in os.walk(folder))
            print(f"  {folder}/  {what} ({count} files)")


def evaluate(opt, forward, dataset, fit_observation_idcs, device):
    """Render every observation of ``dataset`` in order with ``forward`` (a Forward), write the images, return
    per-image metric rows."""
    torch.manual_seed(opt.seed)  # the initial-depth noise: same seed, same renderings
    loader = DataLoader(dataset, batch_size=opt.batch_size, shuffle=False, collate_fn=dataset.collate_fn,
                        num_workers=opt.num_workers)
    fit_views = set(fit_observation_idcs or [])
    rows = []
    clouds = {}  # instance -> (list of points, list of colours), written when the instance is complete
    folders = {}
    global_index = 0
    bar = tqdm(total=len(dataset), desc='rendering', unit='view', disable=opt.no_progress)
    for model_input, ground_truth in loader:
        model_input = {key: value.to(device) for key, value in model_input.items()}
        target_rgb = ground_truth['rgb'].to(device)  # (B, N, 3)
        with torch.no_grad():
            rgb, depth = forward(model_input)  # (B, N, 3), (B, N, 1)
            psnrs, ssims = srns.psnr_ssim(rgb, target_rgb)
            comparisons = srns.comparison_images(model_input, (rgb, depth), target_rgb)  # (B, 3, s, 3s)
            normals = srns.normal_map(model_input, depth) if opt.save_normals else None  # (B, 3, s, s)
            mask_source = rgb if opt.foreground == 'prediction' else target_rgb
            foreground = util.foreground_mask(mask_source, opt.foreground_threshold)  # (B, N)
            points = None
            if opt.point_cloud:
                points = geometry.world_from_xy_depth(model_input['uv'], depth, model_input['pose'],
                                                      model_input['intrinsics'])  # (B, N, 3)
        side = opt.img_sidelength
        for b in range(len(rgb)):
            instance, k = dataset.get_instance_idx(global_index)
            global_index += 1
            view = dataset.all_instances[instance].positions[k]
            rows.append({'instance': instance, 'instance_name': _instance_name(dataset, instance), 'view': view,
                         'k': k, 'psnr': psnrs[b], 'ssim': ssims[b],
                         'split': 'fitted' if view in fit_views else 'held_out'})
            if instance >= opt.save_out_first_n:
                continue
            if instance not in folders:
                folders[instance] = '%06d' % instance
                for sub in ('renderings', 'gt_comparisons') + (('depth',) if opt.save_depth else ()) \
                        + (('normals',) if opt.save_normals else ()):
                    util.cond_mkdir(os.path.join(opt.logging_root, sub, folders[instance]))
            name = '%06d.png' % k
            prediction = util.to_uint8_image(rgb[b].reshape(side, side, 3))
            data_util.write_image(os.path.join(opt.logging_root, 'renderings', folders[instance], name), prediction)
            data_util.write_image(os.path.join(opt.logging_root, 'gt_comparisons', folders[instance], name),
                                  util.to_uint8_image(comparisons[b].permute(1, 2, 0)))
            if opt.save_depth:
                depth_image = depth[b, :, 0].reshape(side, side).cpu().double().numpy()
                # the 16-bit format holds 0 ... 65.535 scene units; rays that end behind the camera read 0
                data_util.write_depth(os.path.join(opt.logging_root, 'depth', folders[instance], name),
                                      np.clip(depth_image, 0., 65535 / data_util.DEPTH_SCALE))
                preview = util.colorize_depth(depth_image, foreground[b].reshape(side, side).cpu().numpy())
                data_util.write_image(os.path.join(opt.logging_root, 'depth', folders[instance],
                                                   '%06d_preview.png' % k), preview)
            if opt.save_normals:
                data_util.write_image(os.path.join(opt.logging_root, 'normals', folders[instance], name),
                                      util.to_uint8_image(normals[b].permute(1, 2, 0)))
            if opt.point_cloud:
                keep = foreground[b]
                cloud = clouds.setdefault(instance, ([], []))
                cloud[0].append(points[b][keep].cpu().numpy())
                cloud[1].append(prediction.reshape(-1, 3)[keep.cpu().numpy()])
        bar.update(len(rgb))
        bar.set_postfix(psnr=f"{np.mean([row['psnr'] for row in rows]):.2f}")
        if opt.point_cloud:  # instances that are complete can be written and forgotten
            current = dataset.get_instance_idx(global_index - 1)[0]
            for instance in [i for i in clouds if i < current or global_index == len(dataset)]:
                _write_cloud(opt.logging_root, instance, *clouds.pop(instance))
    bar.close()
    return rows


def _write_cloud(logging_root, instance, points, colors):
    util.cond_mkdir(os.path.join(logging_root, 'point_clouds'))
    write_ply(os.path.join(logging_root, 'point_clouds', '%06d.ply' % instance),
              np.concatenate(points), np.concatenate(colors))


def _instance_code(model, dataset, instance, device):
    """(1, L) latent code of an instance: its row of the table, or (has_params) its first view's params."""
    if model.fit_single_srn:
        return None
    if model.has_params:
        return dataset.all_instances[instance][0]['param'][None].to(device)
    return model.latent_codes.weight[instance][None]


def write_turntables(opt, model, forward, dataset, device):
    """turntable/<instance>.gif (and .mp4): the first save_out_first_n instances along a camera orbit."""
    torch.manual_seed(opt.seed)
    util.cond_mkdir(os.path.join(opt.logging_root, 'turntable'))
    instances = range(min(dataset.num_instances, opt.save_out_first_n))
    for instance in tqdm(instances, desc='turntables', disable=opt.no_progress):
        views = dataset.all_instances[instance]
        poses = orbit_poses(views.poses.numpy(), opt.turntable)
        code = _instance_code(model, dataset, instance, device)
        z = None if code is None else code.expand(opt.turntable, -1)
        frames = render_frames(forward, poses, views[0]['intrinsics'], opt.img_sidelength, z, opt.batch_size,
                               device)
        write_video(os.path.join(opt.logging_root, 'turntable', '%06d' % instance), frames, opt.fps)


def write_interpolation(opt, model, forward, dataset, pair, device):
    """interpolation/<a>_<b>.gif: codes (1 - t) z_a + t z_b, t from 0 to 1, seen from instance a's first view."""
    if model.fit_single_srn:
        raise ValueError("--interpolate needs latent codes; a single-scene SRN has none")
    for instance in pair:
        if not 0 <= instance < dataset.num_instances:
            raise ValueError(f"--interpolate: instance {instance} out of range; {opt.data_root} has "
                             f"{dataset.num_instances} instances (positions 0..{dataset.num_instances - 1})")
    torch.manual_seed(opt.seed)
    util.cond_mkdir(os.path.join(opt.logging_root, 'interpolation'))
    z_a, z_b = (_instance_code(model, dataset, instance, device) for instance in pair)
    t = torch.linspace(0., 1., opt.interpolation_frames, device=device)[:, None]  # (T, 1)
    z = (1. - t) * z_a + t * z_b  # (T, L)
    first_view = dataset.all_instances[pair[0]][0]
    poses = first_view['pose'][None].expand(opt.interpolation_frames, 4, 4)
    frames = render_frames(forward, poses, first_view['intrinsics'], opt.img_sidelength, z, opt.batch_size, device)
    write_video(os.path.join(opt.logging_root, 'interpolation', '%06d_%06d' % tuple(pair)), frames, opt.fps)


if __name__ == '__main__':
    sys.exit(util.run_command(main, 'test.py'))
