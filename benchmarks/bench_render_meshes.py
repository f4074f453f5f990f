"""Throughput of render_meshes' rasteriser: images/s at a given side for meshes of ~10k and ~100k triangles.

Meshes are built here (bumpy UV spheres with a texture), normalised like a dataset mesh,
and rendered from random sphere views as ``render_mesh_dataset`` does (rendering only; PNG writing
excluded, and reported separately).

    python benchmarks/bench_render_meshes.py --device cpu --sidelength 128 --supersample 3
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--sidelength', type=int, default=128)
    parser.add_argument('--supersample', type=int, nargs='+', default=[1, 3])
    parser.add_argument('--num_views', type=int, default=20)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--segments', type=int, nargs='+', default=[50, 158],
                        help='UV-sphere resolutions: 50 -> ~10k triangles, 158 -> ~100k')
    opt = parser.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    focal, cx, cy = render_meshes.camera_intrinsics(opt.sidelength)
    poses = render_meshes.camera_poses('sphere', opt.num_views, render_meshes.DEFAULT_RADIUS,
                                       np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        for count in opt.segments:
            path = pathlib.Path(tmp) / f'mesh{count}.glb'
            textured_mesh(count).export(path)
            mesh = render_meshes.normalize_mesh(render_meshes.load_mesh(path))
            renderer = render_meshes.MeshRenderer(mesh, device=opt.device)
            for supersample in opt.supersample:
                renderer.render(poses[0], focal, cx, cy, opt.sidelength, supersample)  # warm-up
                if opt.device.startswith('cuda'):
                    torch.cuda.synchronize()
                rates = []
                for _ in range(opt.repeats):  # the best of a few runs: the machine may be shared
                    start = time.perf_counter()
                    for pose in poses:
                        rgb, depth = renderer.render(pose, focal, cx, cy, opt.sidelength, supersample)
                    rgb.cpu()  # waits for the device
                    rates.append(opt.num_views / (time.perf_counter() - start))
                print(f"{len(mesh.faces):7d} triangles, {opt.sidelength} px, supersample {supersample}, "
                      f"{opt.device} ({torch.get_num_threads()} threads): best {max(rates):6.1f}, "
                      f"median {float(np.median(rates)):6.1f} images/s")
        start = time.perf_counter()
        for i in range(opt.num_views):
            data_util.write_image(f'{tmp}/rgb.png', (rgb.cpu().numpy() * 255).astype(np.uint8))
            data_util.write_depth(f'{tmp}/depth.png', depth.cpu().numpy())
        print(f"PNG writing (rgb + depth): {opt.num_views / (time.perf_counter() - start):6.1f} frames/s")


if __name__ == '__main__':
    main()
