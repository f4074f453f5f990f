"""Readers and writers of the SRN format (SPEC section 5): known answers and round trips."""
import re

import numpy as np
import pytest

import data_util


def test_area_resize_integer_factor_is_block_mean():
    img = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    out = data_util.area_resize(img, 2)
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[0, 0], img[:2, :2].mean(axis=(0, 1)))
    np.testing.assert_allclose(out[1, 0], img[2:, :2].mean(axis=(0, 1)))


def test_area_resize_non_integer_factor_weights_partial_pixels():
    # 3 -> 2: output pixel 0 covers input [0, 1.5): 2/3 of pixel 0 and 1/3 of pixel 1
    np.testing.assert_allclose(data_util._area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    img = np.random.default_rng(0).random((9, 9, 3)).astype(np.float32)
    out = data_util.area_resize(img, 6)
    assert out.shape == (6, 6, 3)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), img.mean(axis=(0, 1)), rtol=1e-5)  # area is conserved
    const = np.full((10, 10, 3), 0.25, np.float32)
    np.testing.assert_allclose(data_util.area_resize(const, 7), 0.25, rtol=1e-6)
    np.testing.assert_allclose(data_util.area_resize(const, 13), 0.25, rtol=1e-6)  # enlarging


def test_load_rgb_drops_alpha_crops_centre_and_maps_to_unit_range(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, 1:5, 0] = 255  # the centre 4x4 square is red
    rgba[..., 3] = 7  # alpha must be ignored
    data_util.write_image(tmp_path / "a.png", rgba)
    img = data_util.load_rgb(tmp_path / "a.png")
    assert img.shape == (4, 4, 3) and img.dtype == np.float32
    np.testing.assert_array_equal(img[..., 0], 1.0)
    np.testing.assert_array_equal(img[..., 1:], -1.0)
    assert data_util.load_rgb(tmp_path / "a.png", sidelength=2).shape == (2, 2, 3)


def test_load_rgb_16_bit_and_gray(tmp_path):
    import imageio.v3 as iio
    iio.imwrite(tmp_path / "g16.png", np.full((2, 2), 65535, np.uint16))
    np.testing.assert_array_equal(data_util.load_rgb(tmp_path / "g16.png"), np.ones((2, 2, 3), np.float32))


def test_pose_round_trip_one_line_and_four_lines(tmp_path):
    cam2world = np.random.default_rng(1).normal(size=(4, 4))
    data_util.write_pose(tmp_path / "p.txt", cam2world)
    assert len((tmp_path / "p.txt").read_text().strip().splitlines()) == 1
    np.testing.assert_array_equal(data_util.load_pose(tmp_path / "p.txt"), cam2world.astype(np.float32))
    (tmp_path / "q.txt").write_text("\n".join(" ".join(str(v) for v in row) for row in cam2world) + "\n")
    np.testing.assert_array_equal(data_util.load_pose(tmp_path / "q.txt"), cam2world.astype(np.float32))


def test_intrinsics_round_trip_and_rescale(tmp_path):
    path = tmp_path / "intrinsics.txt"
    data_util.write_intrinsics(path, 131.25, 64., 64., 128, 128)
    assert path.read_text().splitlines()[1:] == ["0. 0. 0.", "1.", "128 128"]
    parsed = data_util.read_intrinsics(path)
    assert (parsed.f, parsed.cx, parsed.cy, parsed.height, parsed.width) == (131.25, 64., 64., 128., 128.)
    np.testing.assert_array_equal(data_util.parse_intrinsics(path, 64),
                                  [[65.625, 0, 32, 0], [0, 65.625, 32, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    full, barycenter, scale, near_plane, world2cam = data_util.parse_intrinsics_legacy(path, 32)
    assert full[0, 0] == 32.8125 and scale == 1.0 and world2cam is False and barycenter.shape == (3,)


def test_depth_round_trip_in_millimetres(tmp_path):
    depth = np.array([[0.0, 1.2344], [2.5, 65.535]], np.float32)
    data_util.write_depth(tmp_path / "d.png", depth)
    back = data_util.load_depth(tmp_path / "d.png")
    np.testing.assert_allclose(back, [[0.0, 1.234], [2.5, 65.535]], atol=1e-6)
    assert back[0, 0] == 0.0  # background stays exactly 0
    with pytest.raises(ValueError, match="d2.png"):
        data_util.write_depth(tmp_path / "d2.png", np.full((2, 2), 70.0))


def test_params_round_trip(tmp_path):
    data_util.write_params(tmp_path / "p.txt", [0.5, -1.0, 3.25])
    np.testing.assert_array_equal(data_util.load_params(tmp_path / "p.txt"), [0.5, -1.0, 3.25])


@pytest.mark.parametrize("text", ["1 2 3", "1 2 3 4\n5 6 7 8\n9 10 11 12\n13 14 15 16 17",
                                  " ".join(["1"] * 15 + ["nan"]), " ".join(["1"] * 15 + ["x"])])
def test_bad_pose_names_the_file(tmp_path, text):
    path = tmp_path / "000000.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data_util.load_pose(path)


@pytest.mark.parametrize("text", ["131.25 64 64 0.\n0. 0. 0.\n1.\n", "131.25 64\n0. 0. 0.\n1.\n128 128\n",
                                  "131.25 64 64 0.\n0. 0. 0.\n1.\n128\n", "f 64 64 0.\n0. 0. 0.\n1.\n128 128\n",
                                  "131.25 64 64 0.\n0. 0.\n1.\n128 128\n", "-1 64 64 0.\n0. 0. 0.\n1.\n128 128\n"])
def test_bad_intrinsics_names_the_file(tmp_path, text):
    path = tmp_path / "intrinsics.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data_util.parse_intrinsics(path)


def test_missing_files_raise_file_not_found_with_path(tmp_path):
    for reader in (data_util.load_rgb, data_util.load_pose, data_util.parse_intrinsics, data_util.load_depth,
                   data_util.load_params):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
            reader(tmp_path / "nope")


def test_missing_file_behind_broken_link_says_so(tmp_path):
    (tmp_path / "intrinsics.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "intrinsics.txt"))) as info:
        data_util.read_intrinsics(tmp_path / "intrinsics.txt")
    assert "broken symbolic link" in str(info.value)
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "p.txt")) + ".*not a text file"):
        data_util.load_pose(tmp_path / "p.txt")


# --- Image headers (read at dataset open): errors name the file --------------------------------------

def test_read_image_size_png_and_jpeg(tmp_path):
    data_util.write_image(tmp_path / "a.png", np.zeros((5, 7, 3), np.uint8))
    data_util.write_image(tmp_path / "b.jpg", np.zeros((6, 3, 3), np.uint8))  # Pillow reads JPEG headers
    assert data_util.read_image_size(tmp_path / "a.png") == (5, 7)
    assert data_util.read_image_size(tmp_path / "b.jpg") == (6, 3)
    np.testing.assert_array_equal(data_util.read_image_sizes([tmp_path / "b.jpg", tmp_path / "a.png"]),
                                  [[6, 3], [5, 7]])


def test_read_image_size_broken_link_empty_garbage_folder(tmp_path):
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "broken.png"))) as info:
        data_util.read_image_size(tmp_path / "broken.png")
    assert "broken symbolic link" in str(info.value) and "gone.png" in str(info.value)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty.png")) + ".*0 bytes"):
        data_util.read_image_size(tmp_path / "empty.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really an image")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "garbage.png")) + ".*not a readable image"):
        data_util.read_image_size(tmp_path / "garbage.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "folder.png")) + ".*folder"):
        data_util.read_image_size(tmp_path / "folder.png")
    # in a batch, the first bad file in order is the one reported
    good = tmp_path / "good.png"
    data_util.write_image(good, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty.png"))):
        data_util.read_image_sizes([good] * 5 + [tmp_path / "empty.png", tmp_path / "garbage.png"], num_threads=2)


def test_decode_error_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "t.png"
    data_util.write_image(path, np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not
    assert data_util.read_image_size(path) == (32, 32)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        data_util.load_rgb(path)
    assert "\n" not in str(info.value)


# --- Poses that cannot be a camera ------------------------------------------------------------------

def rotation(seed):
    """A random rotation (3, 3), det +1."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.sign(np.linalg.det(q))


def pose_with(rot, translation=(0.5, -1.0, 2.0), last_row=(0., 0., 0., 1.)):
    cam2world = np.zeros((4, 4))
    cam2world[:3, :3], cam2world[:3, 3], cam2world[3] = rot, translation, last_row
    return cam2world


@pytest.mark.parametrize("case, reason", [
    ("zero", "singular rotation part (det 0)"),
    ("zero_row", "singular rotation part (det 0)"),
    ("nearly_singular", "badly conditioned rotation part"),
    ("last_row", "last row is 0 0 0 2, expected 0 0 0 1"),
    ("last_row_xyz", "last row is 0.1 0 0 1, expected 0 0 0 1"),
])
def test_check_cam2world_rejects_non_cameras_naming_the_file(case, reason):
    poses = {"zero": np.zeros((4, 4)),
             "zero_row": pose_with(np.diag([1., 0., 1.]) @ rotation(0)),
             "nearly_singular": pose_with(rotation(0) @ np.diag([1., 1., 1e-6])),
             "last_row": pose_with(rotation(0), last_row=(0, 0, 0, 2)),
             "last_row_xyz": pose_with(rotation(0), last_row=(0.1, 0, 0, 1))}
    paths = ["pose/000000.txt", "pose/000001.txt"]
    with pytest.raises(ValueError, match=re.escape(f"pose/000001.txt: not a camera pose: {reason}")):
        data_util.check_cam2world(np.stack([pose_with(rotation(1)), poses[case]]), paths)


def test_check_cam2world_accepts_scaled_and_rounded_rotations(tmp_path):
    poses = [pose_with(rotation(2)), pose_with(3.7 * rotation(3)), pose_with(0.01 * rotation(4))]
    rounded = tmp_path / "rounded.txt"  # four decimals: orthonormal to ~1e-4 only
    rounded.write_text(" ".join(f"{v:.4f}" for v in pose_with(rotation(5)).reshape(-1)))
    poses.append(data_util.load_pose(rounded))
    data_util.check_cam2world(np.stack(poses).astype(np.float32), [f"{i}.txt" for i in range(4)])


# --- Intrinsics of non-square images: the camera of the centre-square crop --------------------------

@pytest.mark.parametrize("height, width, side, expected", [
    (20, 12, 6, (7.5, 2.65, 3.85)),  # portrait: m = 12, top = 4; f·6/12, 5.3·6/12, (11.7 − 4)·6/12
    (12, 20, 6, (7.5, 0.65, 5.85)),  # landscape: m = 12, left = 4; (5.3 − 4)·6/12, 11.7·6/12
    (20, 12, None, (15., 5.3, 7.7)),  # as stored: only the crop offset
    (128, 128, 64, (65.625, 32., 32.)),  # square: the reference's f·s/H, cx·s/W, cy·s/H
])
def test_rescale_intrinsics_known_answers(tmp_path, height, width, side, expected):
    path = tmp_path / "intrinsics.txt"
    f, cx, cy = (131.25, 64., 64.) if height == 128 else (15., 5.3, 11.7)
    data_util.write_intrinsics(path, f, cx, cy, height, width)
    np.testing.assert_allclose(data_util.rescale_intrinsics(data_util.read_intrinsics(path), side), expected,
                               rtol=1e-12)
    full = data_util.parse_intrinsics_legacy(path, side)[0]  # the reference's API, the same camera
    np.testing.assert_allclose([full[0, 0], full[0, 2], full[1, 2]], expected, rtol=1e-12)
