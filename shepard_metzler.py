"""Shepard-Metzler objects in the SRN dataset format (paper section 4, the third dataset).

A Shepard-Metzler object is seven cubes joined face to face, each its own colour. We build one as a
self-avoiding random walk on the integer grid (every new cube shares a face with the previous one, no two
cubes overlap), centre it at the origin and scale the grid by ``cube_size``. Views are rendered by exact
analytic ray casting against the axis-aligned cubes (the slab method, vectorised in numpy; no external
renderer), with Lambertian + ambient shading from face normals under two fixed world-space lights, so an
object's appearance is view-independent, as SRNs model it. Rays pass through integer pixel coordinates
with no half-pixel offset, exactly as the SRN ray marcher casts them (SPEC section 4).

On-disk layout (SPEC section 5; the loaders in ``dataio`` read it unchanged)::

    output_dir/train/<%06d object>/rgb/%06d.png      num_train_views views on a sphere around the object
                                   pose/%06d.txt     OpenCV cam2world, one line of 16 numbers
                                   depth/%06d.png    16-bit camera z, round(z * 1000), 0 = background
                                   intrinsics.txt    "f cx cy 0." / "0. 0. 0." / "1." / "s s"
                                   cubes.txt         cube centres (x y z) and albedo (r g b), one per line
    output_dir/val/<object>/...    the first num_val_objects objects, num_val_views other sphere views
    output_dir/test/<object>/...   every object, num_test_views views on a spiral (novel-view evaluation)
    output_dir/dataset_info.json   the settings; written last, it marks the dataset complete

An object has the same folder name (hence the same latent-code index) in every split. Each object is
generated from its own random stream seeded by (seed, object index), so the output is identical whatever
the number of worker processes.

Command line: ``python shepard_metzler.py --output_dir data/shepard_metzler --num_objects 1000``.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys

import numpy as np

import data_util
import util
from geometry import look_at, sphere_positions, spiral_positions

NUM_CUBES = 7  # Shepard & Metzler (1971); the SRN paper's Shepard-Metzler objects have seven parts
INFO_FILE = "dataset_info.json"
SPLITS = ("train", "val", "test")

# Two fixed world-space directional lights (key and fill) and an ambient term. View-independent shading:
# SRNs map a 3D point to one colour, whatever the viewing direction.
_KEY_LIGHT = np.array([0.4, 0.3, 0.85]) / np.linalg.norm([0.4, 0.3, 0.85])
_FILL_LIGHT = np.array([-0.6, -0.7, -0.3]) / np.linalg.norm([-0.6, -0.7, -0.3])
_AMBIENT, _KEY, _FILL = 0.3, 0.6, 0.25
_FACE_DIRECTIONS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])

DEFAULTS = dict(num_train_views=50, num_val_views=10, num_val_objects=10, num_test_views=20, sidelength=64,
                cube_size=0.25, radius=2.0, focal_ratio=1.25, seed=0)


def random_object(rng, num_cubes=NUM_CUBES):
    """Integer cube positions (num_cubes, 3) of a self-avoiding face-adjacent random walk."""
    cubes = [np.zeros(3, dtype=np.int64)]
    occupied = {(0, 0, 0)}
    while len(cubes) < num_cubes:
        # with at most 6 cubes placed, the last one always has a free face, so this terminates
        candidate = cubes[-1] + _FACE_DIRECTIONS[rng.integers(6)]
        if tuple(candidate) not in occupied:
            occupied.add(tuple(candidate))
            cubes.append(candidate)
    return np.stack(cubes)


def random_colours(rng, num_cubes=NUM_CUBES):
    """(num_cubes, 3) albedos in [0, 1] with evenly spread, shuffled hues: each cube its own colour."""
    hues = (rng.permutation(num_cubes) + rng.uniform()) / num_cubes
    saturation = rng.uniform(0.55, 0.9, num_cubes)
    value = rng.uniform(0.75, 0.95, num_cubes)
    # HSV -> RGB, vectorised
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hues[:, None] * 6.0) % 6.0
    weight = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[:, None] * (1.0 - saturation[:, None] * weight)


def object_boxes(cubes, cube_size):
    """Centred cube centres (K, 3) in scene units and their boxes' corners lo, hi (K, 3)."""
    centres = (cubes - cubes.mean(axis=0)) * cube_size
    return centres, centres - cube_size / 2, centres + cube_size / 2


def camera_rays(cam2world, focal, sidelength):
    """Ray origin (3,) and directions (N, 3) whose camera-z component is 1, for integer pixels, row-major.

    Because the direction has unit camera z, the ray parameter t of a hit *is* its camera depth.
    """
    rows, cols = np.meshgrid(np.arange(sidelength), np.arange(sidelength), indexing='ij')
    centre = sidelength / 2.0
    directions_cam = np.stack(((cols.reshape(-1) - centre) / focal, (rows.reshape(-1) - centre) / focal,
                               np.ones(sidelength * sidelength)), axis=1)  # (N, 3)
    return cam2world[:3, 3], directions_cam @ cam2world[:3, :3].T


def ray_cast(origin, directions, lo, hi):
    """Exact nearest hit of rays with a union of axis-aligned boxes (slab method).

    Per axis, the slab a ray enters first is the low face when the ray runs towards +axis and the high face
    otherwise; a ray hits a box when the last entry precedes the first exit. Working per axis on (N, K)
    arrays (rather than one (N, K, 3) array) measured about 3x faster.

    :param origin: (3,) shared ray origin, outside every box
    :param directions: (N, 3)
    :param lo, hi: (K, 3) box corners
    :return: t (N,) ray parameter of the first hit (inf when none), box (N,) index, normal (N, 3) face normal
    """
    positive = directions >= 0  # (N, 3)
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = 1.0 / directions  # (N, 3), +-inf for axis-parallel rays
    t_enter_axes, t_exit = [], None
    for axis in range(3):
        near = np.where(positive[:, axis, None], lo[None, :, axis], hi[None, :, axis]) - origin[axis]  # (N, K)
        far = np.where(positive[:, axis, None], hi[None, :, axis], lo[None, :, axis]) - origin[axis]
        with np.errstate(invalid='ignore'):  # 0 * inf on a face plane through the origin: nan, no hit
            t_near, t_far = near * inv[:, axis, None], far * inv[:, axis, None]
        t_enter_axes.append(t_near)
        t_exit = t_far if t_exit is None else np.minimum(t_exit, t_far)
    t_enter = np.maximum(np.maximum(t_enter_axes[0], t_enter_axes[1]), t_enter_axes[2])  # (N, K)
    t_enter = np.where((t_enter <= t_exit) & (t_enter > 0), t_enter, np.inf)
    box = t_enter.argmin(axis=1)  # (N,)
    rays = np.arange(len(directions))
    t = t_enter[rays, box]
    # the face hit belongs to the slab entered last
    axis = np.stack([t_near[rays, box] for t_near in t_enter_axes], axis=1).argmax(axis=1)  # (N,)
    normal = np.zeros_like(directions)
    normal[rays, axis] = np.where(positive[rays, axis], -1.0, 1.0)
    return t, box, normal


def render_view(lo, hi, albedo, cam2world, focal, sidelength):
    """RGB (s, s, 3) in [0, 1] on white, and depth (s, s) camera z with 0 for background."""
    origin, directions = camera_rays(cam2world, focal, sidelength)
    t, box, normal = ray_cast(origin, directions, lo, hi)
    hit = np.isfinite(t)
    shade = (_AMBIENT + _KEY * np.clip(normal @ _KEY_LIGHT, 0, None)
             + _FILL * np.clip(normal @ _FILL_LIGHT, 0, None))  # (N,)
    rgb = np.ones((len(t), 3))
    rgb[hit] = np.clip(albedo[box[hit]] * shade[hit, None], 0.0, 1.0)
    depth = np.where(hit, t, 0.0)
    return rgb.reshape(sidelength, sidelength, 3), depth.reshape(sidelength, sidelength)


def _object_cameras(rng, settings):
    """cam2world poses (V, 4, 4) of the train, val and test views of one object."""
    radius = settings['radius']
    train = sphere_positions(settings['num_train_views'], radius, rng)
    val = sphere_positions(settings['num_val_views'], radius, rng)
    test = spiral_positions(settings['num_test_views'], radius)
    return {split: np.stack([look_at(p) for p in positions]) if len(positions) else np.zeros((0, 4, 4))
            for split, positions in zip(SPLITS, (train, val, test))}


def _write_instance(instance_dir, lo, hi, centres, albedo, poses, focal, sidelength):
    for sub in ("rgb", "pose", "depth"):
        os.makedirs(os.path.join(instance_dir, sub), exist_ok=True)
    data_util.write_intrinsics(os.path.join(instance_dir, "intrinsics.txt"), focal, sidelength / 2.0,
                               sidelength / 2.0, sidelength, sidelength)
    np.savetxt(os.path.join(instance_dir, "cubes.txt"), np.concatenate((centres, albedo), axis=1),
               fmt="%.9g", header="cube centre x y z (scene units, edge %r), albedo r g b"
               % float(hi[0, 0] - lo[0, 0]))
    for view, cam2world in enumerate(poses):
        rgb, depth = render_view(lo, hi, albedo, cam2world, focal, sidelength)
        name = f"{view:06d}"
        data_util.write_image(os.path.join(instance_dir, "rgb", name + ".png"), rgb)
        data_util.write_depth(os.path.join(instance_dir, "depth", name + ".png"), depth)
        data_util.write_pose(os.path.join(instance_dir, "pose", name + ".txt"), cam2world)


def make_object(index, settings):
    """Object ``index`` of a dataset: its cubes, albedos and cameras, drawn from the stream (seed, index).

    :return: dict with centres (7, 3), lo and hi (7, 3) box corners, albedo (7, 3), focal (pixels) and
        cameras {split: cam2world (V, 4, 4)}
    """
    rng = np.random.default_rng([settings['seed'], index])
    cubes = random_object(rng)
    albedo = random_colours(rng)
    centres, lo, hi = object_boxes(cubes, settings['cube_size'])
    return dict(centres=centres, lo=lo, hi=hi, albedo=albedo, cameras=_object_cameras(rng, settings),
                focal=settings['focal_ratio'] * settings['sidelength'])


def generate_object(output_dir, index, settings):
    """Render and write all splits of object ``index``; deterministic in (settings['seed'], index)."""
    obj = make_object(index, settings)
    for split in SPLITS:
        if split == "val" and index >= settings['num_val_objects']:
            continue
        if len(obj['cameras'][split]) == 0:
            continue
        _write_instance(os.path.join(output_dir, split, f"{index:06d}"), obj['lo'], obj['hi'], obj['centres'],
                        obj['albedo'], obj['cameras'][split], obj['focal'], settings['sidelength'])
    return index


def _generate_object_star(args):
    return generate_object(*args)


def _settings(num_objects, **kwargs):
    settings = dict(DEFAULTS, num_objects=int(num_objects))
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown dataset settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    settings.update({k: v for k, v in kwargs.items() if v is not None})
    if settings['num_objects'] < 1 or settings['num_train_views'] < 1 or settings['sidelength'] < 2:
        raise ValueError(f"need num_objects >= 1, num_train_views >= 1 and sidelength >= 2, got {settings}")
    settings['num_val_objects'] = min(settings['num_val_objects'], settings['num_objects'])
    return settings


def split_dirs(output_dir):
    """{split: folder} of a generated dataset."""
    return {split: os.path.join(output_dir, split) for split in SPLITS}


def generate_dataset(output_dir, num_objects, num_train_views=50, num_val_views=10, num_val_objects=10,
                     num_test_views=20, sidelength=64, cube_size=0.25, radius=2.0, focal_ratio=1.25, seed=0,
                     workers=None, overwrite=False, progress=False):
    """Write a Shepard-Metzler dataset in the SRN format (layout in the module docstring).

    :param output_dir: where train/, val/, test/ and dataset_info.json go
    :param num_objects: number of objects (latent codes)
    :param num_train_views, num_val_views, num_test_views: views per object in each split (sphere, sphere,
        spiral); val holds only the first ``num_val_objects`` objects
    :param sidelength: image side s in pixels; intrinsics are written for it
    :param cube_size: cube edge in scene units; the default 0.25 keeps objects within ~0.9 of the origin
    :param radius: camera distance from the origin (scene units)
    :param focal_ratio: focal length in units of the side length (1.25: a 44-degree field of view, so a
        median object spans about 80% of the frame and about 1% of views clip a cube at the border)
    :param seed: objects are drawn from (seed, object index)
    :param workers: processes (default: all cores; 0 or 1 renders in this process)
    :param overwrite: replace an existing dataset in ``output_dir``
    :param progress: show a tqdm progress bar (command-line use)
    :return: the settings dict also written to dataset_info.json, with 'splits' {split: folder}
    """
    settings = _settings(num_objects, num_train_views=num_train_views, num_val_views=num_val_views,
                         num_val_objects=num_val_objects, num_test_views=num_test_views, sidelength=sidelength,
                         cube_size=cube_size, radius=radius, focal_ratio=focal_ratio, seed=seed)
    existing = [path for path in list(split_dirs(output_dir).values()) + [os.path.join(output_dir, INFO_FILE)]
                if os.path.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir}: already holds {', '.join(os.path.basename(p) for p in existing)}; "
                              f"pass overwrite=True (--overwrite) to replace it, or choose another output_dir")
    for path in existing:  # only what this generator writes; anything else in output_dir is left alone
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(output_dir, exist_ok=True)

    jobs = [(output_dir, index, settings) for index in range(settings['num_objects'])]
    workers = os.cpu_count() if workers is None else workers
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=f"Shepard-Metzler -> {output_dir}", unit="object")
    if workers <= 1:
        for job in jobs:
            _generate_object_star(job)
            if bar is not None:
                bar.update()
    else:
        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(_generate_object_star, jobs, chunksize=4):
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()

    info = dict(settings, splits=split_dirs(output_dir), format="srn", generator="shepard_metzler")
    temporary = os.path.join(output_dir, INFO_FILE + ".tmp")
    with open(temporary, 'w') as file:
        json.dump(info, file, indent=2)
    os.replace(temporary, os.path.join(output_dir, INFO_FILE))  # written last: the dataset is complete
    return info


def ensure_dataset(output_dir, num_objects, workers=None, progress=False, **settings):
    """Generate the dataset unless ``output_dir`` already holds a complete one with the same settings.

    A folder without dataset_info.json (e.g. an interrupted run) is regenerated. A complete dataset made
    with different settings raises ValueError rather than being silently replaced or silently used.
    :return: the dataset's info dict (settings and 'splits' {split: folder})
    """
    wanted = _settings(num_objects, **settings)
    info_path = os.path.join(output_dir, INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path, 'r') as file:
            info = json.load(file)
        found = {key: info.get(key) for key in wanted}
        if found != wanted:
            differences = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
            raise ValueError(f"{info_path}: dataset was generated with other settings {{setting: (found, "
                             f"wanted)}} = {differences}; delete {output_dir} or choose another folder")
        info['splits'] = split_dirs(output_dir)
        return info
    return generate_dataset(output_dir, workers=workers, overwrite=True, progress=progress, **wanted)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--output_dir', default='data/shepard_metzler', help='dataset folder to write')
    parser.add_argument('--num_objects', type=int, default=1000)
    parser.add_argument('--num_train_views', type=int, default=DEFAULTS['num_train_views'])
    parser.add_argument('--num_val_views', type=int, default=DEFAULTS['num_val_views'])
    parser.add_argument('--num_val_objects', type=int, default=DEFAULTS['num_val_objects'])
    parser.add_argument('--num_test_views', type=int, default=DEFAULTS['num_test_views'])
    parser.add_argument('--sidelength', type=int, default=DEFAULTS['sidelength'])
    parser.add_argument('--cube_size', type=float, default=DEFAULTS['cube_size'])
    parser.add_argument('--radius', type=float, default=DEFAULTS['radius'])
    parser.add_argument('--focal_ratio', type=float, default=DEFAULTS['focal_ratio'],
                        help='focal length / side length')
    parser.add_argument('--seed', type=int, default=DEFAULTS['seed'])
    parser.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset')
    return parser


def main(argv=None):
    opt = get_parser().parse_args(argv)
    settings = {k: v for k, v in vars(opt).items() if k not in ('output_dir', 'workers', 'overwrite')}
    return generate_dataset(opt.output_dir, workers=opt.workers, overwrite=opt.overwrite, progress=True,
                            **settings)


if __name__ == '__main__':
    sys.exit(util.run_command(main, 'shepard_metzler.py'))
