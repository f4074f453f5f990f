"""Camera geometry of Scene Representation Networks (paper section 3.2, "Neural rendering").

Pure, device-agnostic tensor functions for the pinhole camera model used throughout SRNs:
OpenCV convention (x right, y down, z forward), poses are cam2world 4x4 matrices, and
intrinsics travel as 4x4 matrices ``[[f, 0, cx, 0], [0, f, cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]]``.

Pixel coordinates ``uv (N, 2)`` are integers, ``uv[:, 0]`` the column x and ``uv[:, 1]`` the row y,
in row-major order, with no half-pixel offset (as in the reference implementation).

Shape vocabulary: ``B`` observations, ``N`` pixels (rays) per observation, ``s`` image side length.

The helpers at the end (``look_at``, ``sphere_positions``, ``spiral_positions``) place cameras the way
the published SRN datasets do; the dataset generators use them.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def intrinsics_matrix(f, cx, cy, dtype=torch.float32):
    """The 4x4 intrinsics matrix of SPEC section 4 from focal length and principal point (pixels)."""
    return torch.tensor([[f, 0., cx, 0.],
                         [0., f, cy, 0.],
                         [0., 0., 1., 0.],
                         [0., 0., 0., 1.]], dtype=dtype)


def _focal_and_center(intrinsics):
    """(fx, fy, cx, cy), each (B, 1), from intrinsics (B, 4, 4)."""
    fx = intrinsics[:, 0, 0].unsqueeze(-1)
    fy = intrinsics[:, 1, 1].unsqueeze(-1)
    cx = intrinsics[:, 0, 2].unsqueeze(-1)
    cy = intrinsics[:, 1, 2].unsqueeze(-1)
    return fx, fy, cx, cy


def lift(x, y, z, intrinsics, homogeneous=False):
    """Pixel coordinates and camera depth to camera-space points.

    :param x, y, z: (B, N) pixel column, pixel row and camera-space depth (z, not ray length)
    :param intrinsics: (B, 4, 4)
    :return: (B, N, 3), or (B, N, 4) with a trailing 1 when homogeneous
    """
    fx, fy, cx, cy = _focal_and_center(intrinsics)
    x_cam = (x - cx) / fx * z
    y_cam = (y - cy) / fy * z
    if homogeneous:
        return torch.stack((x_cam, y_cam, z, torch.ones_like(z)), dim=-1)
    return torch.stack((x_cam, y_cam, z), dim=-1)


def project(x, y, z, intrinsics):
    """Camera-space points to pixel coordinates: the inverse of ``lift``.

    :param x, y, z: (B, N) camera-space coordinates
    :return: (B, N, 3) = (column, row, depth)
    """
    fx, fy, cx, cy = _focal_and_center(intrinsics)
    x_proj = fx * x / z + cx
    y_proj = fy * y / z + cy
    return torch.stack((x_proj, y_proj, z), dim=-1)


def world_from_xy_depth(xy, depth, cam2world, intrinsics):
    """World points seen at pixels ``xy`` with camera depth ``depth``.

    :param xy: (B, N, 2) pixel coordinates (column, row)
    :param depth: (B, N) or (B, N, 1) camera-space z
    :param cam2world: (B, 4, 4)
    :param intrinsics: (B, 4, 4)
    :return: (B, N, 3) world coordinates
    """
    if depth.dim() == 3:
        depth = depth.squeeze(-1)
    xy = xy.to(depth.dtype)
    points_cam = lift(xy[..., 0], xy[..., 1], depth, intrinsics, homogeneous=True)  # (B, N, 4)
    points_world = torch.matmul(cam2world, points_cam.transpose(1, 2)).transpose(1, 2)  # (B, N, 4)
    return points_world[..., :3]


def camera_center(cam2world):
    """(B, 3) camera centres in world space: the translation column of cam2world."""
    return cam2world[:, :3, 3]


def get_ray_directions(xy, cam2world, intrinsics):
    """Unit ray directions from the camera centre through the pixels ``xy``.

    :param xy: (B, N, 2) pixel coordinates
    :return: (B, N, 3) unit vectors in world space
    """
    z = torch.ones(xy.shape[:2], dtype=cam2world.dtype, device=cam2world.device)
    points_world = world_from_xy_depth(xy, z, cam2world, intrinsics)  # (B, N, 3)
    ray_dirs = points_world - camera_center(cam2world)[:, None, :]
    return F.normalize(ray_dirs, dim=2)


def depth_from_world(world_coords, cam2world, world2cam=None):
    """Camera-space depth (z) of world points.

    :param world_coords: (B, N, 3)
    :param cam2world: (B, 4, 4)
    :param world2cam: optional precomputed inverse of cam2world, (B, 4, 4)
    :return: (B, N, 1)
    """
    if world2cam is None:
        world2cam = torch.linalg.inv_ex(cam2world).inverse  # torch.inverse's values; compiles cacheably
    # Only the z row of world2cam is needed; elementwise, so it stays float32 under autocast.
    z_row = world2cam[:, None, 2, :]  # (B, 1, 4)
    return (world_coords * z_row[..., :3]).sum(dim=-1, keepdim=True) + z_row[..., 3:]


def uv_grid(sidelength, device=None):
    """(s*s, 2) int64 pixel coordinates of an s x s image, row-major: column first, then row."""
    rows, cols = torch.meshgrid(torch.arange(sidelength, device=device),
                                torch.arange(sidelength, device=device), indexing='ij')
    return torch.stack((cols.reshape(-1), rows.reshape(-1)), dim=-1).long()


def lin2img(tensor):
    """(B, N, C) with N = s*s, row-major, to an image batch (B, C, s, s)."""
    batch_size, num_samples, channels = tensor.shape
    sidelength = math.isqrt(num_samples)
    if sidelength * sidelength != num_samples:
        raise ValueError(f"lin2img: {num_samples} pixels do not form a square image")
    return tensor.permute(0, 2, 1).reshape(batch_size, channels, sidelength, sidelength)


def compute_normal_map(x_img, y_img, z, intrinsics):
    """Camera-space normals from a depth map, by central differences (SPEC section 4).

    :param x_img, y_img: (B, N) pixel columns and rows of a full s x s image, row-major
    :param z: (B, N) camera depth
    :return: (B, 3, s-2, s-2), not renormalised; a plane facing the camera gives (0, 0, +1)
    """
    cam_coords = lin2img(lift(x_img, y_img, z, intrinsics))  # (B, 3, s, s)
    rows_above, rows_below = cam_coords[:, :, :-2, :], cam_coords[:, :, 2:, :]
    cols_right, cols_left = cam_coords[:, :, :, 2:], cam_coords[:, :, :, :-2]
    vertical = F.normalize(rows_above - rows_below, dim=1)[:, :, :, 1:-1]  # (B, 3, s-2, s-2)
    horizontal = F.normalize(cols_right - cols_left, dim=1)[:, :, 1:-1, :]  # (B, 3, s-2, s-2)
    return torch.cross(vertical, horizontal, dim=1)


# --- Camera placement for dataset generation (numpy, float64) --------------------------------------

def look_at(camera_position, target=(0., 0., 0.), up=(0., 0., 1.)):
    """OpenCV cam2world (4, 4) for a camera at ``camera_position`` looking at ``target``.

    Columns are the camera's x (right), y (down) and z (forward) axes in world space, then its centre.
    ``up`` is the world's up direction (z-up, as the published ShapeNet renderings).
    """
    position = np.asarray(camera_position, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - position
    forward /= np.linalg.norm(forward)
    up = np.asarray(up, dtype=np.float64)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-8:  # looking straight along `up`: any perpendicular right will do
        right = np.cross(forward, np.array([0., 1., 0.]) if abs(up[1]) < 0.9 else np.array([1., 0., 0.]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    cam2world = np.eye(4)
    cam2world[:3, 0], cam2world[:3, 1], cam2world[:3, 2], cam2world[:3, 3] = right, down, forward, position
    return cam2world


def sphere_positions(num, radius, rng, upper_hemisphere=False):
    """(num, 3) points drawn uniformly on a sphere of ``radius`` (z >= 0 only if upper_hemisphere)."""
    points = rng.normal(size=(num, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    if upper_hemisphere:
        points[:, 2] = np.abs(points[:, 2])
    return radius * points


def spiral_positions(num, radius, num_turns=4.0, min_elevation=0.0, max_elevation=None):
    """(num, 3) points on an Archimedean spiral over the upper hemisphere of a sphere of ``radius``.

    Elevation rises linearly from ``min_elevation`` to ``max_elevation`` (radians, default just under the
    pole) while the azimuth makes ``num_turns`` turns, as the published SRN test trajectories.
    """
    if max_elevation is None:
        max_elevation = 0.45 * np.pi
    t = np.linspace(0.0, 1.0, num)
    elevation = min_elevation + t * (max_elevation - min_elevation)
    azimuth = 2.0 * np.pi * num_turns * t
    return radius * np.stack((np.cos(elevation) * np.cos(azimuth),
                              np.cos(elevation) * np.sin(azimuth),
                              np.sin(elevation)), axis=1)
