"""Throughput of render_meshes' rasteriser: images/s at a given side for meshes of ~10k and ~100k triangles.

Meshes are built here (bumpy UV spheres with a texture), normalised like a dataset mesh,
and rendered from random sphere views as ``render_mesh_dataset`` does (rendering only; PNG writing
excluded, and reported separately). One run measures every mesh on every device and prints a table;
CUDA is left out, with a note, where it is not available.

    python benchmarks/bench_render_meshes.py --sidelength 128 --supersample 1 3 --device cpu cuda
"""
import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import data_util  # noqa: E402
import render_meshes  # noqa: E402


def textured_mesh(segments, seed=0):
    """A bumpy UV sphere (about 4 * segments^2 triangles, not convex) with spherical UVs and a random
    texture: many small triangles and some long thin ones near the poles, as in ShapeNet meshes."""
    import trimesh
    from PIL import Image
    sphere = trimesh.creation.uv_sphere(count=[segments, segments])
    rng = np.random.default_rng(seed)
    vertices = sphere.vertices * (1 + 0.05 * np.sin(7 * sphere.vertices[:, :1]) * np.cos(5 * sphere.vertices[:, 1:2]))
    uv = np.stack((np.arctan2(vertices[:, 1], vertices[:, 0]) / (2 * np.pi) + 0.5,
                   np.arccos(np.clip(sphere.vertices[:, 2], -1, 1)) / np.pi), 1)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    material = trimesh.visual.material.SimpleMaterial(image=image)
    return trimesh.Trimesh(vertices, sphere.faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
                           process=False)


def measure(renderer, poses, intrinsics, sidelength, supersample, repeats):
    """images/s of ``renderer`` over ``poses``: (best, median) of ``repeats`` runs, after a warm-up."""
    focal, cx, cy = intrinsics
    rgb, _ = renderer.render(poses[0], focal, cx, cy, sidelength, supersample)  # warm-up
    rgb.cpu()  # waits for the device
    rates = []
    for _ in range(repeats):  # the best of a few runs: the machine may be shared
        start = time.perf_counter()
        for pose in poses:
            rgb, _ = renderer.render(pose, focal, cx, cy, sidelength, supersample)
        rgb.cpu()
        rates.append(len(poses) / (time.perf_counter() - start))
    return max(rates), float(np.median(rates))


def available_devices(requested):
    """The requested devices that exist here: without CUDA, CUDA devices are left out (with a note),
    and the CPU is measured if nothing else is left."""
    devices = []
    for device in dict.fromkeys(requested):
        if device.startswith('cuda') and not torch.cuda.is_available():
            print(f"{device}: CUDA is not available here, left out", file=sys.stderr)
            continue
        devices.append(device)
    return devices or ['cpu']


def device_label(device):
    if device == 'cpu':
        return f"cpu ({torch.get_num_threads()} threads)"
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', nargs='+', default=['cpu', 'cuda'],
                        help='devices to compare (CUDA ones are skipped where CUDA is absent)')
    parser.add_argument('--sidelength', type=int, default=128)
    parser.add_argument('--supersample', type=int, nargs='+', default=[1, 3])
    parser.add_argument('--num_views', type=int, default=20)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--segments', type=int, nargs='+', default=[50, 158],
                        help='UV-sphere resolutions: 50 -> 9.6k triangles, 158 -> 98.6k')
    opt = parser.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    devices = available_devices(opt.device)
    intrinsics = render_meshes.camera_intrinsics(opt.sidelength)
    poses = render_meshes.camera_poses('sphere', opt.num_views, render_meshes.DEFAULT_RADIUS,
                                       np.random.default_rng(0))
    rows = []  # (triangles, supersample, {device: (best, median)})
    with tempfile.TemporaryDirectory() as tmp:
        for count in opt.segments:
            path = pathlib.Path(tmp) / f'mesh{count}.glb'
            textured_mesh(count).export(path)
            mesh = render_meshes.normalize_mesh(render_meshes.load_mesh(path))
            renderers = {device: render_meshes.MeshRenderer(mesh, device=device) for device in devices}
            for supersample in opt.supersample:
                rates = {device: measure(renderer, poses, intrinsics, opt.sidelength, supersample, opt.repeats)
                         for device, renderer in renderers.items()}
                rows.append((len(mesh.faces), supersample, rates))
                print(f"{len(mesh.faces):7d} triangles, supersample {supersample}: " + ', '.join(
                    f"{device} {best:.1f}" for device, (best, _) in rates.items()) + " images/s",
                      file=sys.stderr)  # progress; the table follows at the end
        rgb, depth = renderers[devices[0]].render(poses[0], *intrinsics, opt.sidelength, 1)
        start = time.perf_counter()
        for _ in range(opt.num_views):
            data_util.write_image(f'{tmp}/rgb.png', np.round(rgb.cpu().numpy() * 255).astype(np.uint8))
            data_util.write_depth(f'{tmp}/depth.png', depth.cpu().numpy())
        png_rate = opt.num_views / (time.perf_counter() - start)
    print(f"\nimages/s at {opt.sidelength} px, best of {opt.repeats} runs of {opt.num_views} views "
          f"(median in brackets)")
    labels = [device_label(device) for device in devices]
    width = max(22, *(len(label) for label in labels))
    print(f"{'triangles':>9}  {'supersample':>11}  " + '  '.join(f"{label:>{width}}" for label in labels))
    for triangles, supersample, rates in rows:
        cells = [f"{best:.1f} ({median:.1f})" for best, median in rates.values()]
        print(f"{triangles:>9}  {supersample:>11}  " + '  '.join(f"{cell:>{width}}" for cell in cells))
    print(f"PNG writing (rgb + depth, {opt.sidelength} px): {png_rate:.1f} frames/s")


if __name__ == '__main__':
    main()
