"""SRN datasets (SPEC section 5): reference parity, semantics, and clear errors naming the path."""
import os
import re
import warnings

import numpy as np
import pytest
import torch

import data_util
import dataio


def make_dataset(root, num_instances=2, num_views=3, side=8, params=False, one_line_pose=True):
    """A tiny SRN-format dataset in ``root``: instance i, view j has constant colour (i, j) and pose ~ j."""
    for i in range(num_instances):
        inst = root / f"obj_{i:02d}"
        for sub in ("rgb", "pose") + (("params",) if params else ()):
            (inst / sub).mkdir(parents=True)
        data_util.write_intrinsics(inst / "intrinsics.txt", side * 1.0, side / 2, side / 2, side, side)
        for j in range(num_views):
            data_util.write_image(inst / "rgb" / f"{j:06d}.png", np.full((side, side, 3), 10 * i + j, np.uint8))
            pose = np.eye(4)
            pose[:3, 3] = (i, j, 1.0)
            if one_line_pose:
                data_util.write_pose(inst / "pose" / f"{j:06d}.txt", pose)
            else:
                np.savetxt(inst / "pose" / f"{j:06d}.txt", pose)
            if params:
                data_util.write_params(inst / "params" / f"{j:06d}.txt", [i, j])
    return root


def names(path):
    return re.escape(str(path))


@pytest.mark.parametrize("preload", [False, True])
def test_reference_loader_parity(reference_fixtures, preload):
    cases = torch.load(reference_fixtures / "tiny_srn_dataset_loader.pt", map_location="cpu", weights_only=True)
    for case, expected in cases.items():
        dataset = dataio.SceneClassDataset(str(reference_fixtures / "tiny_srn_dataset"), preload=preload,
                                           **expected["kwargs"])
        assert dataset.num_instances == expected["num_instances"], case
        assert len(dataset) == expected["length"], case
        for i, item in enumerate(expected["items"]):
            observations, ground_truth = dataset[i]
            obs = observations[0]
            assert list(obs) == list(item), case
            for key in item:
                assert obs[key].dtype == item[key].dtype and obs[key].shape == item[key].shape, (case, key)
            torch.testing.assert_close(obs["rgb"], item["rgb"], atol=1e-5, rtol=0)
            torch.testing.assert_close(ground_truth[0]["rgb"], item["rgb"], atol=1e-5, rtol=0)
            for key in ("pose", "intrinsics", "uv", "instance_idx", "param"):
                assert torch.equal(obs[key], item[key]), (case, i, key)


def test_order_subsets_and_lookup(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=3, num_views=5, side=8, params=True)
    dataset = dataio.SceneClassDataset(str(root), img_sidelength=4, samples_per_instance=1,
                                       max_observations_per_instance=3)
    assert dataset.num_instances == 3 and len(dataset) == 9
    seen = [(int(dataset[k][0][0]["instance_idx"]), dataset[k][0][0]["param"].tolist()) for k in range(9)]
    # views floor(i*5/3) = 0, 1, 3 of each instance, in instance-then-view order
    assert seen == [(i, [float(i), float(j)]) for i in range(3) for j in (0, 1, 3)]
    obs = dataset[4][0][0]
    assert obs["rgb"].shape == (16, 3) and obs["uv"].dtype == torch.int64
    np.testing.assert_allclose(obs["rgb"].numpy(), (11 / 255) * 2 - 1, atol=1e-6)  # instance 1, view 1
    assert obs["intrinsics"][0, 0] == 4.0 and obs["intrinsics"][0, 2] == 2.0
    assert obs["pose"][:3, 3].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(IndexError):
        dataset[9]

    repeated = dataio.SceneClassDataset(str(root), max_num_instances=1, max_observations_per_instance=7)
    assert len(repeated) == 7  # k > n repeats views
    specific = dataio.SceneClassDataset(str(root), specific_observation_idcs=[4, 2], samples_per_instance=1)
    assert [o[0][0]["pose"][1, 3].item() for o in (specific[0], specific[1])] == [4.0, 2.0]


def test_collate_and_samples_per_instance(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=2, num_views=4, side=4, one_line_pose=False)
    dataset = dataio.SceneClassDataset(str(root), img_sidelength=2, samples_per_instance=3)
    observations, ground_truth = dataset.collate_fn([dataset[0], dataset[5]])
    assert observations["rgb"].shape == (6, 4, 3) and observations["pose"].shape == (6, 4, 4)
    assert observations["uv"].shape == (6, 4, 2) and observations["instance_idx"].tolist() == [0, 0, 0, 1, 1, 1]
    assert observations["param"].shape == (6, 1) and ground_truth["rgb"].shape == (6, 4, 3)


@pytest.mark.parametrize("preload", [False, True])
def test_set_img_sidelength_and_dataloader_workers(tmp_path, preload):
    root = make_dataset(tmp_path / "data", num_instances=2, num_views=2, side=8)
    dataset = dataio.SceneClassDataset(str(root), img_sidelength=8, samples_per_instance=1, preload=preload)
    dataset.set_img_sidelength(2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=dataset.collate_fn)
    observations, _ = next(iter(loader))
    assert observations["rgb"].shape == (2, 4, 3) and observations["intrinsics"][0, 0, 0] == 2.0
    dataset.set_img_sidelength(8)
    assert dataset[3][0][0]["rgb"].shape == (64, 3)


# --- Bad inputs: each raises the right type, at construction where possible, naming the path -------------

def test_missing_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "absent")):
        dataio.SceneClassDataset(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "empty")):
        dataio.SceneClassDataset(str(tmp_path / "empty"))


@pytest.mark.parametrize("folder", ["rgb", "pose"])
def test_instance_without_rgb_or_pose(tmp_path, folder):
    root = make_dataset(tmp_path / "data")
    for f in (root / "obj_01" / folder).iterdir():
        f.unlink()
    (root / "obj_01" / folder).rmdir()
    with pytest.raises(FileNotFoundError, match=names(root / "obj_01" / folder)):
        dataio.SceneClassDataset(str(root))


def test_different_numbers_of_images_and_poses(tmp_path):
    root = make_dataset(tmp_path / "data")
    (root / "obj_00" / "rgb" / "000002.png").unlink()
    with pytest.raises(ValueError, match=names(root / "obj_00")) as info:
        dataio.SceneClassDataset(str(root))
    assert "2 images" in str(info.value) and "3 poses" in str(info.value)


def test_truncated_image_fails_when_decoded_with_one_line_naming_it(tmp_path):
    root = make_dataset(tmp_path / "data", side=16)
    path = root / "obj_01" / "rgb" / "000001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dataset = dataio.SceneClassDataset(str(root), samples_per_instance=1)  # its header is intact
    with pytest.raises(ValueError, match=names(path)) as info:
        dataset[4]
    assert "\n" not in str(info.value) and "cannot decode" in str(info.value)
    with pytest.raises(ValueError, match=names(path)):  # with preload, at construction
        dataio.SceneClassDataset(str(root), preload=True)


@pytest.mark.parametrize("preload", [False, True])
def test_garbage_image_fails_at_open(tmp_path, preload):
    root = make_dataset(tmp_path / "data", side=16)
    path = root / "obj_01" / "rgb" / "000001.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=names(path)) as info:
        dataio.SceneClassDataset(str(root), preload=preload)
    assert "not a readable image" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["1 0 0 0 0 1 0 0 0 0 1 0 0 0 0", "1 0 0 0\n0 1 0 0\n0 0 1 inf\n0 0 0 1"])
def test_bad_pose(tmp_path, text):
    root = make_dataset(tmp_path / "data")
    path = root / "obj_00" / "pose" / "000001.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=names(path)):
        dataio.SceneClassDataset(str(root))


def test_malformed_or_missing_intrinsics(tmp_path):
    root = make_dataset(tmp_path / "data")
    path = root / "obj_01" / "intrinsics.txt"
    path.write_text("131.25 64 64 0.\n0. 0. 0.\n1.\n")
    with pytest.raises(ValueError, match=names(path)):
        dataio.SceneClassDataset(str(root))
    path.unlink()
    with pytest.raises(FileNotFoundError, match=names(path)):
        dataio.SceneClassDataset(str(root))


def test_observation_index_out_of_range(tmp_path):
    root = make_dataset(tmp_path / "data", num_views=3)
    with pytest.raises(ValueError, match=names(root / "obj_00")) as info:
        dataio.SceneClassDataset(str(root), specific_observation_idcs=[1, 3])
    assert "[3]" in str(info.value)


def test_preload_serves_workers_from_ram(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=2, num_views=3, side=8)
    dataset = dataio.SceneClassDataset(str(root), img_sidelength=4, samples_per_instance=1, preload=True)
    expected = [dataset[i][0][0]["rgb"] for i in range(len(dataset))]
    for instance in ("obj_00", "obj_01"):  # from here on, only the cache can serve the images
        for image in (root / instance / "rgb").iterdir():
            image.unlink()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=dataset.collate_fn)
    served = torch.cat([observations["rgb"] for observations, _ in loader])
    assert torch.equal(served, torch.stack(expected))


# --- Non-square images: the served pixels and the served camera describe the same rays ---------------

def coordinate_image(height, width):
    """uint8 (H, W, 3) whose red is 10·column and green is 10·row: a pixel's colour names its position."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack((10 * cols, 10 * rows, np.zeros_like(rows)), axis=-1).astype(np.uint8)


def rays(xy, cam2world, intrinsics):
    """(N, 3) float64 unit ray directions of pixel coordinates xy (N, 2), by geometry.py."""
    from geometry import get_ray_directions
    return get_ray_directions(torch.as_tensor(xy, dtype=torch.float64)[None], cam2world.double()[None],
                              intrinsics.double()[None])[0]


@pytest.mark.parametrize("height, width", [(20, 12), (12, 20)], ids=["portrait", "landscape"])
@pytest.mark.parametrize("side", [12, 6])
def test_non_square_image_gets_the_camera_of_its_crop(tmp_path, height, width, side):
    f, cx, cy = 15., 5.3, 11.7  # off-centre principal point, pixels of the full stored image
    inst = tmp_path / "data" / "obj"
    (inst / "rgb").mkdir(parents=True)
    (inst / "pose").mkdir()
    data_util.write_image(inst / "rgb" / "000000.png", coordinate_image(height, width))
    data_util.write_intrinsics(inst / "intrinsics.txt", f, cx, cy, height, width)
    cam2world = np.eye(4)
    cam2world[:3, :3] = np.array([[0., -1., 0.], [0.6, 0., -0.8], [0.8, 0., 0.6]])  # a rotation
    data_util.write_pose(inst / "pose" / "000000.txt", cam2world)
    obs = dataio.SceneClassDataset(str(tmp_path / "data"), img_sidelength=side, samples_per_instance=1)[0][0][0]

    full_intrinsics = torch.from_numpy(data_util.intrinsics_matrix_np(f, cx, cy))
    side_crop = min(height, width)
    top, left, scale = (height - side_crop) // 2, (width - side_crop) // 2, side_crop / side
    # the stored pixel each served pixel stands for (no half-pixel offset, SPEC section 4)
    full_xy = obs["uv"].double() * scale + torch.tensor([left, top], dtype=torch.float64)  # (N, 2)
    torch.testing.assert_close(rays(obs["uv"], obs["pose"], obs["intrinsics"]),
                               rays(full_xy, obs["pose"], full_intrinsics), rtol=0, atol=1e-6)
    # and the served colours come from there: area resizing averages a scale x scale block, whose mean
    # position is (scale − 1) / 2 past that pixel in both directions, whatever the aspect ratio
    colour_xy = ((obs["rgb"][:, :2].double() + 1) / 2 * 255 / 10)  # (N, 2) column, row
    torch.testing.assert_close(colour_xy, full_xy + (scale - 1) / 2, rtol=0, atol=1e-4)


# --- Entries of the root that cannot be read: an error, never a skipped (shifted) instance --------------

def test_broken_symlink_instance_is_an_error_not_a_shift(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=3)
    (root / "obj_00b").symlink_to(tmp_path / "unmounted" / "obj")  # sorts between obj_00 and obj_01
    with pytest.raises(FileNotFoundError, match=names(root / "obj_00b")) as info:
        dataio.SceneClassDataset(str(root))
    assert "broken symbolic link" in str(info.value) and "remove it" in str(info.value)


def test_symlink_to_a_file_in_the_root_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "data")
    (tmp_path / "notes.txt").write_text("not an instance")
    (root / "obj_05").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match=names(root / "obj_05")) as info:
        dataio.SceneClassDataset(str(root))
    assert "link to a file" in str(info.value)


def test_plain_files_and_linked_instances_in_the_root(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=2)
    (root / "README.txt").write_text("plain files are no instances (the reference globbed folders only)")
    (root / ".DS_Store").write_bytes(b"\0")
    make_dataset(tmp_path / "elsewhere", num_instances=1)
    (root / "obj_01a").symlink_to(tmp_path / "elsewhere" / "obj_00")  # a working link is an instance
    dataset = dataio.SceneClassDataset(str(root), samples_per_instance=1)
    assert [os.path.basename(d.rstrip(os.sep)) for d in dataset.instance_dirs] == ["obj_00", "obj_01", "obj_01a"]


def test_instance_folder_that_cannot_be_listed(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    instance = root / "obj_01"
    instance.chmod(0)
    try:
        if os.access(instance, os.R_OK | os.X_OK):  # root reads anything: pretend, as a user would see it
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode, **kw: os.fspath(path).rstrip(os.sep) !=
                                str(instance) and real_access(path, mode, **kw))
        with pytest.raises(PermissionError, match=names(instance)) as info:
            dataio.SceneClassDataset(str(root))
        assert "permission denied" in str(info.value)
    finally:
        instance.chmod(0o755)


@pytest.mark.parametrize("folder", ["rgb", "pose", "params"])
def test_broken_link_in_place_of_a_folder(tmp_path, folder):
    root = make_dataset(tmp_path / "data", params=True)
    target = root / "obj_01" / folder
    target.rename(tmp_path / "moved")
    target.symlink_to(tmp_path / "gone")  # a broken params/ must not read as "this instance has no params"
    with pytest.raises(FileNotFoundError, match=names(target)) as info:
        dataio.SceneClassDataset(str(root))
    assert "broken symbolic link" in str(info.value)


# --- Image headers are checked at open -------------------------------------------------------------------

def test_broken_image_link_fails_at_open(tmp_path):
    root = make_dataset(tmp_path / "data")
    path = root / "obj_01" / "rgb" / "000002.png"
    path.unlink()
    path.symlink_to(tmp_path / "renders" / "000002.png")
    with pytest.raises(FileNotFoundError, match=names(path)) as info:
        dataio.SceneClassDataset(str(root))
    assert "broken symbolic link" in str(info.value)


def test_empty_image_fails_at_open(tmp_path):
    root = make_dataset(tmp_path / "data")
    path = root / "obj_00" / "rgb" / "000001.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=names(path)) as info:
        dataio.SceneClassDataset(str(root))
    assert "empty image file (0 bytes)" in str(info.value)


def test_only_the_kept_views_are_checked(tmp_path):
    root = make_dataset(tmp_path / "data", num_views=3)
    (root / "obj_00" / "rgb" / "000001.png").write_bytes(b"")  # view 1 is not among the kept views
    dataset = dataio.SceneClassDataset(str(root), specific_observation_idcs=[0, 2], samples_per_instance=1)
    assert len(dataset) == 4


# --- Poses that cannot be a camera fail at open ------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("1 0 0 0\n0 1 0 0\n0 0 0 2\n0 0 0 1", "singular rotation part (det 0)"),  # a zero row
    (" ".join(["0"] * 16), "singular rotation part (det 0)"),  # an all-zero pose
    ("1 0 0 0\n0 1 0 0\n0 0 1 2\n0 0 1 1", "last row is 0 0 1 1, expected 0 0 0 1"),
], ids=["singular", "zero", "last_row"])
def test_pose_that_is_no_camera_fails_at_open(tmp_path, text, reason):
    root = make_dataset(tmp_path / "data")
    path = root / "obj_01" / "pose" / "000002.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=names(path) + ": not a camera pose: " + re.escape(reason)):
        dataio.SceneClassDataset(str(root))


def test_scaled_rotation_pose_is_accepted(tmp_path):
    root = make_dataset(tmp_path / "data")
    path = root / "obj_01" / "pose" / "000002.txt"
    path.write_text("0 -2.5 0 1\n1.5 0 -2 0\n2 0 1.5 3\n0 0 0 1")  # 2.5 x a rotation
    dataset = dataio.SceneClassDataset(str(root), samples_per_instance=1)
    assert dataset[5][0][0]["pose"][0, 1] == -2.5


# --- Warnings about image sizes: once per dataset, naming one file and the count -----------------------------

def test_tiny_images_warn_once_naming_an_example(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=2, num_views=3, side=8)
    with pytest.warns(UserWarning) as record:
        dataset = dataio.SceneClassDataset(str(root), img_sidelength=17)  # 8 < 17 / 2: upsampled 2x+
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert messages[0].startswith(str(root / "obj_00" / "rgb" / "000000.png")) and "6 of 6 images" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.set_img_sidelength(32)  # already warned for this dataset
        fine = dataio.SceneClassDataset(str(root), img_sidelength=16)  # exactly half: no warning
    with pytest.warns(UserWarning, match=names(root / "obj_00" / "rgb" / "000000.png") + ".*upsampled"):
        fine.set_img_sidelength(32)  # a later, larger stage warns then


def test_image_size_disagreeing_with_intrinsics_warns_once(tmp_path):
    root = make_dataset(tmp_path / "data", num_instances=2, num_views=3, side=8)
    intrinsics = root / "obj_01" / "intrinsics.txt"
    data_util.write_intrinsics(intrinsics, 8., 4., 4., 8, 10)
    with pytest.warns(UserWarning) as record:
        dataio.SceneClassDataset(str(root))
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert messages[0].startswith(str(root / "obj_01" / "rgb" / "000000.png") + ": image is 8x8")
    assert str(intrinsics) in messages[0] and "says 8 10" in messages[0] and "3 of 6 images" in messages[0]


def test_well_formed_dataset_opens_without_warnings(tmp_path):
    root = make_dataset(tmp_path / "data", side=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataio.SceneClassDataset(str(root), img_sidelength=4)
        dataio.SceneInstanceDataset(0, str(root / "obj_00"), img_sidelength=16)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_rays_hold_what_the_loader_serves(tmp_path, num_workers):
    """DeviceRays decodes the views in blocks (in worker processes or not) and stacks the other fields without
    decoding: the same tensors as collate_fn over every item, rgb rounded to float16, across block boundaries."""
    root = make_dataset(tmp_path / "data", num_instances=3, num_views=5, side=8, params=True)
    dataset = dataio.SceneClassDataset(str(root), img_sidelength=4, max_observations_per_instance=4,
                                       samples_per_instance=1)
    rays = dataio.DeviceRays(dataset, rays_per_view=5, device="cpu", num_workers=num_workers)
    rays.block_size = 5  # 12 views: blocks of 5, 5 and 2
    rays.set_img_sidelength(4)
    everything, _ = dataio.collate_fn([dataset[i] for i in range(len(dataset))])
    for key in ("pose", "intrinsics", "instance_idx", "param"):
        assert rays.tensors[key].dtype == everything[key].dtype and torch.equal(rays.tensors[key], everything[key])
    assert torch.equal(rays.tensors["rgb"], everything["rgb"].half())
    assert torch.equal(rays.tensors["uv"], everything["uv"][0])
    assert rays.tensors["instance_idx"].tolist() == [0.] * 4 + [1.] * 4 + [2.] * 4
