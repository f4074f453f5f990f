"""Camera geometry known answers and round trips (SPEC section 4)."""
import numpy as np
import pytest
import torch

import geometry


def random_pose(seed):
    rng = np.random.default_rng(seed)
    position = geometry.sphere_positions(1, 2.0, rng)[0]
    return torch.tensor(geometry.look_at(position), dtype=torch.float64)[None]


def test_lift_project_round_trip():
    intrinsics = geometry.intrinsics_matrix(131.25, 64., 60., dtype=torch.float64)[None]
    x, y = torch.rand(1, 50, dtype=torch.float64) * 128, torch.rand(1, 50, dtype=torch.float64) * 128
    z = torch.rand(1, 50, dtype=torch.float64) + 0.5
    points = geometry.lift(x, y, z, intrinsics)
    back = geometry.project(points[..., 0], points[..., 1], points[..., 2], intrinsics)
    assert torch.allclose(back, torch.stack((x, y, z), -1))


def test_world_points_have_their_depth_and_lie_on_rays():
    cam2world = random_pose(0)
    intrinsics = geometry.intrinsics_matrix(20., 8., 8., dtype=torch.float64)[None]
    uv = geometry.uv_grid(16)[None].double()
    depth = torch.rand(1, 256, 1, dtype=torch.float64) + 1.
    world = geometry.world_from_xy_depth(uv, depth, cam2world, intrinsics)
    assert torch.allclose(geometry.depth_from_world(world, cam2world), depth)
    dirs = geometry.get_ray_directions(uv, cam2world, intrinsics)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(1, 256, dtype=torch.float64))
    along = world - cam2world[:, None, :3, 3]
    assert torch.allclose(torch.cross(along, dirs, dim=-1), torch.zeros_like(along), atol=1e-12)


def test_principal_point_ray_is_the_optical_axis():
    cam2world = random_pose(1)
    intrinsics = geometry.intrinsics_matrix(50., 10., 12., dtype=torch.float64)[None]
    direction = geometry.get_ray_directions(torch.tensor([[[10., 12.]]], dtype=torch.float64), cam2world, intrinsics)
    assert torch.allclose(direction[0, 0], cam2world[0, :3, 2])


def test_uv_grid_is_row_major_column_first():
    uv = geometry.uv_grid(3)
    assert uv.dtype == torch.int64
    assert uv[:4].tolist() == [[0, 0], [1, 0], [2, 0], [0, 1]]


def test_normal_map_of_planes():
    side = 8
    uv = geometry.uv_grid(side)[None].double()
    intrinsics = geometry.intrinsics_matrix(10., 4., 4., dtype=torch.float64)[None]
    flat = geometry.compute_normal_map(uv[..., 0], uv[..., 1], torch.full((1, side * side), 3., dtype=torch.float64),
                                       intrinsics)
    assert flat.shape == (1, 3, side - 2, side - 2)
    assert torch.allclose(flat, torch.tensor([0., 0., 1.], dtype=torch.float64)[None, :, None, None].expand_as(flat))
    # A plane tilted about the y axis: z = 3 + 0.5 x_cam. Its normal leans towards -x.
    x_cam_per_depth = (uv[..., 0] - 4.) / 10.
    z = 3. / (1. - 0.5 * x_cam_per_depth)
    tilted = geometry.compute_normal_map(uv[..., 0], uv[..., 1], z, intrinsics)
    expected = torch.tensor([-0.5, 0., 1.], dtype=torch.float64) / np.sqrt(1.25)
    assert torch.allclose(tilted[0, :, 3, 3], expected, atol=1e-9)


@pytest.mark.parametrize('position', [(0., -2., 0.), (1., 2., 3.), (0., 0., 2.)])
def test_look_at_is_a_proper_opencv_pose(position):
    pose = geometry.look_at(position)
    rotation = pose[:3, :3]
    assert np.allclose(rotation.T @ rotation, np.eye(3))
    assert np.isclose(np.linalg.det(rotation), 1.)
    forward = -np.asarray(position) / np.linalg.norm(position)
    assert np.allclose(rotation[:, 2], forward)
    if abs(forward[2]) < 0.99:
        assert rotation[2, 1] < 0  # image "down" points down in a z-up world


def test_spiral_stays_on_upper_hemisphere():
    points = geometry.spiral_positions(251, 1.3)
    assert np.allclose(np.linalg.norm(points, axis=1), 1.3)
    assert points[:, 2].min() >= -1e-12
