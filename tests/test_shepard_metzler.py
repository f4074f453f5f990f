"""Shepard-Metzler generator: valid objects, SRN-format round trips, exact depth, determinism, ensure."""
import filecmp
import json
import os
import re

import numpy as np
import pytest
import torch

import data_util
import dataio
import geometry
import shepard_metzler as sm

TINY = dict(num_train_views=4, num_val_views=2, num_val_objects=1, num_test_views=3, sidelength=24)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sm") / "data"
    info = sm.generate_dataset(str(root), num_objects=2, workers=1, seed=3, **TINY)
    return root, info


def test_objects_are_seven_face_adjacent_cubes_without_overlap():
    for index in range(20):
        cubes = sm.random_object(np.random.default_rng([0, index]))
        assert cubes.shape == (7, 3)
        assert len({tuple(c) for c in cubes}) == 7  # no overlaps
        steps = np.abs(np.diff(cubes, axis=0)).sum(axis=1)
        assert np.all(steps == 1)  # each cube shares a face with the previous one
        centres, lo, hi = sm.object_boxes(cubes, 0.25)
        np.testing.assert_allclose(centres.mean(axis=0), 0, atol=1e-12)
        np.testing.assert_allclose(hi - lo, 0.25)


def test_ray_cast_known_answer():
    # a unit box [0, 1]^3 seen from x = -2 along +x: hit at t = 2 on the -x face
    t, box, normal = sm.ray_cast(np.array([-2., 0.5, 0.5]), np.array([[1., 0., 0.], [0., 1., 0.]]),
                                 np.zeros((1, 3)), np.ones((1, 3)))
    assert t[0] == 2.0 and box[0] == 0 and normal[0].tolist() == [-1., 0., 0.]
    assert np.isinf(t[1])


def test_layout_and_loading(tiny_dataset):
    root, info = tiny_dataset
    assert json.loads((root / sm.INFO_FILE).read_text())["num_objects"] == 2
    counts = {"train": (2, 4), "val": (1, 2), "test": (2, 3)}
    for split, (num_instances, num_views) in counts.items():
        dataset = dataio.SceneClassDataset(info["splits"][split], samples_per_instance=1)
        assert dataset.num_instances == num_instances and len(dataset) == num_instances * num_views
        obs = dataset[0][0][0]
        assert obs["rgb"].shape == (24 * 24, 3) and obs["intrinsics"][0, 0] == 24 * 1.25
        for instance in os.listdir(info["splits"][split]):
            assert len(os.listdir(root / split / instance / "depth")) == num_views
    assert sorted(os.listdir(root / "val")) == sorted(os.listdir(root / "train"))[:1]  # same latent index


def test_poses_and_intrinsics_round_trip(tiny_dataset):
    root, info = tiny_dataset
    for index in range(2):
        obj = sm.make_object(index, info)
        for split in ("train", "test"):
            instance = root / split / f"{index:06d}"
            for view, cam2world in enumerate(obj["cameras"][split]):
                loaded = data_util.load_pose(instance / "pose" / f"{view:06d}.txt")
                np.testing.assert_array_equal(loaded, cam2world.astype(np.float32))
                np.testing.assert_allclose(loaded[:3, :3] @ loaded[:3, :3].T, np.eye(3), atol=1e-6)
                assert abs(np.linalg.norm(cam2world[:3, 3]) - info["radius"]) < 1e-9
            intrinsics = data_util.read_intrinsics(instance / "intrinsics.txt")
            assert (intrinsics.f, intrinsics.cx, intrinsics.cy, intrinsics.height, intrinsics.width) == \
                (obj["focal"], 12.0, 12.0, 24.0, 24.0)


def test_depth_lifts_onto_the_cube_surfaces(tiny_dataset):
    root, info = tiny_dataset
    instance = root / "train" / "000001"
    obj = sm.make_object(1, info)
    intrinsics = torch.from_numpy(data_util.parse_intrinsics(instance / "intrinsics.txt"))[None]
    num_foreground = 0
    for view in range(info["num_train_views"]):
        depth = torch.from_numpy(data_util.load_depth(instance / "depth" / f"{view:06d}.png")).reshape(1, -1)
        rgb = data_util.load_rgb(instance / "rgb" / f"{view:06d}.png").reshape(-1, 3)
        pose = torch.from_numpy(data_util.load_pose(instance / "pose" / f"{view:06d}.txt")).double()[None]
        uv = geometry.uv_grid(24)[None].double()
        points = geometry.world_from_xy_depth(uv, depth.double(), pose, intrinsics.double())[0].numpy()
        foreground = depth[0].numpy() > 0
        assert np.all(rgb[~foreground] == 1.0) and np.all(rgb[foreground].min(axis=1) < 1.0)  # white background
        # signed distance of every lifted point to each cube: ~0 on a face, never inside
        offsets = np.abs(points[foreground, None, :] - obj["centres"][None]) - info["cube_size"] / 2  # (F, 7, 3)
        signed = np.where(offsets.max(axis=2) > 0, np.linalg.norm(np.maximum(offsets, 0), axis=2),
                          offsets.max(axis=2))  # (F, 7)
        nearest = signed.min(axis=1)
        assert np.all(np.abs(nearest) < 1.5e-3)  # depth is stored in 1e-3 steps
        num_foreground += foreground.sum()
    assert num_foreground > 0


def test_deterministic_whatever_the_workers(tmp_path, tiny_dataset):
    root, _ = tiny_dataset
    other = tmp_path / "again"
    sm.generate_dataset(str(other), num_objects=2, workers=2, seed=3, **TINY)
    comparison = filecmp.dircmp(root / "train", other / "train")
    for instance in ("000000", "000001"):
        for sub in ("rgb", "pose", "depth"):
            names = sorted(os.listdir(root / "train" / instance / sub))
            match, mismatch, errors = filecmp.cmpfiles(root / "train" / instance / sub,
                                                       other / "train" / instance / sub, names, shallow=False)
            assert not mismatch and not errors and len(match) == 4
    assert not comparison.left_only and not comparison.right_only


def test_ensure_dataset_generates_once_and_checks_settings(tmp_path):
    root = tmp_path / "demo"
    settings = dict(TINY, num_train_views=2, num_test_views=0, sidelength=8)
    sm.ensure_dataset(str(root), num_objects=1, workers=1, **settings)
    marker = root / sm.INFO_FILE
    stamp = marker.stat().st_mtime_ns
    sm.ensure_dataset(str(root), num_objects=1, workers=1, **settings)
    assert marker.stat().st_mtime_ns == stamp  # complete: nothing regenerated
    with pytest.raises(ValueError, match=re.escape(str(marker))):
        sm.ensure_dataset(str(root), num_objects=2, workers=1, **settings)
    marker.unlink()  # an interrupted run: regenerated
    sm.ensure_dataset(str(root), num_objects=1, workers=1, **settings)
    assert marker.is_file()
    with pytest.raises(FileExistsError, match=re.escape(str(root))):
        sm.generate_dataset(str(root), num_objects=1, workers=1, **settings)


def test_command_line(tmp_path):
    info = sm.main(["--output_dir", str(tmp_path / "cli"), "--num_objects", "1", "--num_train_views", "2",
                    "--num_test_views", "1", "--num_val_views", "1", "--sidelength", "8", "--workers", "1"])
    assert len(os.listdir(tmp_path / "cli" / "train" / "000000" / "rgb")) == 2 and info["sidelength"] == 8
