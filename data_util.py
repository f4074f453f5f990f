"""Readers and writers for the SRN dataset format (SPEC section 5, "Data on disk").

The published SRN datasets (ShapeNet cars and chairs, rendered for Sitzmann et al. 2019) store every
object as a folder::

    <instance>/rgb/*.png|*.jpg        images (alpha ignored)
    <instance>/pose/*.txt             cam2world 4x4, four lines of four numbers or one line of sixteen
    <instance>/intrinsics.txt         "f cx cy 0." / "0. 0. 0." / "1." / "height width" [/ world2cam flag]
    <instance>/params/*.txt           optional, one vector per view on the first line
    <instance>/depth/*.png            optional (written by our generators), 16-bit depth, see below

Everything here is numpy-based and free of torch, so that DataLoader workers and dataset generators can
use it cheaply. Images are returned as ``(s, s, 3)`` float32 arrays in [-1, 1] (HWC, not flattened; the
datasets flatten them row-major to ``(N, 3)``).

Depth PNG convention (fixed): a single-channel 16-bit PNG whose value is ``round(depth * 1000)``, i.e.
millimetres of camera-space z (not distance along the ray) when the scene unit is the metre; the value 0
means "no surface" (background). The representable range is therefore (0, 65.535] scene units.
``load_depth`` returns float32 depth in scene units with 0 for background.

Camera of the served image: images are centre-square-cropped and resized to the side length s, and
``rescale_intrinsics`` moves f, cx, cy through the same crop and resize, so every aspect ratio gets the
right camera. The reference ignored the crop (exact for square images only, which is all the published
datasets have); for square images both give identical numbers.

Every reader fails with ``FileNotFoundError`` (missing, a broken link, a folder where a file belongs),
``ValueError`` (bad contents) or ``PermissionError`` (unreadable), whose message starts with the offending
path and says what is wrong and how to fix it; nothing is silently skipped or guessed. What is cheap is
checked when a dataset is opened: ``read_image_sizes`` (image headers) and ``check_cam2world`` (poses).
"""
import functools
import math
import os
import struct
import zlib
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image  # Pillow, installed with imageio: called directly, imageio's dispatch cost 1-2 ms per file

IMAGE_EXTENSIONS = ('.png', '.jpg', '.JPEG', '.JPG')  # the reference's glob patterns (SPEC section 5)


# --- Small helpers -----------------------------------------------------------------------------------

def _why_missing(path):
    """Why ``path`` cannot be opened: a broken symbolic link (with its target) or plain absence."""
    if os.path.islink(path):
        return (f"broken symbolic link (to {os.readlink(path)!r}, which does not exist); "
                f"fix the link or remove it")
    return "not found"


def _require_file(path, what):
    """FileNotFoundError naming ``path`` unless it is a readable regular file (links followed)."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise FileNotFoundError(f"{path}: {what} not found: this is a folder, not a file")
        raise FileNotFoundError(f"{path}: {what} {_why_missing(path)}")


def require_folder(path, what, fix=""):
    """FileNotFoundError naming ``path`` unless it is a folder (missing, a broken link, or a file), and
    PermissionError unless it can be listed.

    :param what: what the folder is for, e.g. "rgb/ folder"
    :param fix: appended to the message: what the user should do
    """
    if not os.path.isdir(path):
        if os.path.lexists(path) and not os.path.islink(path):
            reason = "is a file, not a folder"
        elif os.path.lexists(path) and os.path.exists(path):
            reason = f"is a symbolic link to a file ({os.readlink(path)!r}), not to a folder"
        else:
            reason = _why_missing(path)
        raise FileNotFoundError(f"{path}: {what} {reason}" + (f"; {fix}" if fix else ""))
    if not os.access(path, os.R_OK | os.X_OK):  # else its files look missing, which would mislead
        raise PermissionError(f"{path}: {what} cannot be listed (permission denied); fix its permissions "
                              f"(chmod u+rx) or remove it")


def list_dir(folder):
    """The entry names of ``folder``; PermissionError naming it (and the fix) when it cannot be listed."""
    try:
        return os.listdir(folder)
    except PermissionError:
        raise PermissionError(f"{folder}: folder cannot be listed (permission denied); fix its permissions "
                              f"(chmod u+rx) or remove it") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: folder {_why_missing(folder)}") from None


def _read_text(path, what, first_line_only=False):
    """The text of a small text file; clear errors for unreadable or binary files, naming the path."""
    _require_file(path, what)
    try:
        with open(path, 'r') as file:
            return file.readline() if first_line_only else file.read()
    except PermissionError:
        raise PermissionError(f"{path}: {what} cannot be read (permission denied); fix its permissions") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: {what} is not a text file (undecodable bytes)") from None


def _parse_numbers(tokens, path, what):
    """Floats from whitespace-separated tokens; ValueError naming the path when one is not a finite number."""
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: {what} must be numbers ({err})") from None
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: {what} contains non-finite values {values.tolist()}")
    return values


def list_images(folder):
    """Image files of ``folder`` (the reference's extensions), sorted by full path.

    Every matching name is listed, broken links included, so that a missing image is reported rather than
    silently shifting the pairing of the later images with their poses.
    """
    return sorted(os.path.join(folder, name) for name in list_dir(folder)
                  if name.endswith(IMAGE_EXTENSIONS) and not name.startswith('.'))


def list_files(folder, extension='.txt'):
    """Files of ``folder`` ending in ``extension``, sorted by full path (broken links included)."""
    return sorted(os.path.join(folder, name) for name in list_dir(folder)
                  if name.endswith(extension) and not name.startswith('.'))


# --- Images ------------------------------------------------------------------------------------------

def _decode(path, what):
    """Decode an image file with Pillow into a numpy array; ValueError naming the path on any failure."""
    try:
        with Image.open(path) as pil:
            if pil.mode in ('P', 'PA'):  # palette: the colours, not the indices
                pil = pil.convert('RGBA')
            elif pil.mode in ('1', 'CMYK', 'YCbCr', 'LAB', 'HSV'):
                pil = pil.convert('RGB')
            elif pil.mode == 'I;16B':
                pil = pil.convert('I;16')
            return np.asarray(pil)
    except PermissionError:
        raise PermissionError(f"{path}: {what} cannot be read (permission denied); fix its permissions") from None
    except Exception as err:  # Pillow raises many types for truncated or corrupt files
        reason = ' '.join(str(err).split())  # one line: the entry points print this message as the whole error
        raise ValueError(f"{path}: cannot decode {what} ({type(err).__name__}: {reason}); "
                         f"re-render or re-export this view, or remove it together with its pose") from None


def read_image_raw(path):
    """The first three channels of an image file, as stored: (H, W, 3) uint8 or uint16.

    Grayscale images are replicated to three channels; an alpha channel is dropped (the published
    datasets are RGBA PNGs on a white background, and the reference ignores alpha too).
    """
    _require_file(path, "image")
    img = _decode(path, "image")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{path}: expected an (H, W[, C]) image, got shape {img.shape}")
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: expected an 8- or 16-bit image, got dtype {img.dtype}")
    if img.shape[2] < 3:  # gray or gray+alpha
        img = np.repeat(img[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _png_size(head):
    """(height, width) from the first 33 bytes of a PNG (signature, then the IHDR chunk), or None.

    None when the bytes are not a well-formed PNG start (wrong signature, no IHDR first, bad CRC); the
    caller then lets Pillow decide. Reading these bytes ourselves measured ~4x faster than ``Image.open``
    (14 vs 40-60 us per file), which matters at 121k images (ShapeNet cars) checked at every start.
    """
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b'IHDR':
        return None
    if zlib.crc32(head[12:29]) != struct.unpack('>I', head[29:33])[0]:
        return None
    width, height = struct.unpack('>II', head[16:24])
    return height, width


def read_image_size(path):
    """(height, width) of an image file from its header, without decoding the pixels.

    Checks what is cheap: the file exists (not a broken link), is not empty, starts like an image Pillow
    can read, and has a positive size. A damaged body passes; ``read_image_raw`` finds it when decoding.
    Errors name the path: FileNotFoundError (missing, broken link, a folder), ValueError (empty, not an
    image, zero size), PermissionError (unreadable).
    """
    what = "image"
    try:
        with open(path, 'rb') as file:
            head = file.read(33)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} {_why_missing(path)}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"{path}: {what} not found: this is a folder, not a file") from None
    except PermissionError:
        raise PermissionError(f"{path}: {what} cannot be read (permission denied); fix its permissions") from None
    fix = "re-render or re-export this view, or remove it together with its pose"
    if not head:
        raise ValueError(f"{path}: empty image file (0 bytes); {fix}")
    size = _png_size(head)
    if size is None:  # JPEG, or anything odd: Pillow reads the header and identifies the format
        try:
            with Image.open(path) as pil:
                width, height = pil.size
            size = height, width
        except Exception as err:  # UnidentifiedImageError for non-images; others for malformed headers
            reason = ' '.join(str(err).split())
            raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {reason}); {fix}") from None
    if min(size) <= 0:
        raise ValueError(f"{path}: image header gives height {size[0]} and width {size[1]}; {fix}")
    return size


def read_image_sizes(paths, num_threads=None):
    """(K, 2) int64 (height, width) of each image, by ``read_image_size``; raises for the first bad path.

    Threads overlap the file opens (they release the GIL), which is what dominates on a cold or network
    file system; the work is split into chunks so that 100k files do not become 100k futures.
    """
    paths = list(paths)
    if not paths:
        return np.zeros((0, 2), dtype=np.int64)
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    chunk = max(1, min(1024, -(-len(paths) // num_threads)))

    def sizes_of(start):
        return [read_image_size(p) for p in paths[start:start + chunk]]

    with ThreadPoolExecutor(num_threads) as pool:
        # map yields in order, so the error raised is the first bad file in dataset order
        sizes = [size for part in pool.map(sizes_of, range(0, len(paths), chunk)) for size in part]
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


def to_unit_float(img):
    """uint8 / uint16 image to float32 in [0, 1] (÷255 or ÷65535, as skimage.img_as_float32)."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.)
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535.)
    return img.astype(np.float32)


def square_crop(img):
    """Centre square crop of an (H, W, ...) array: the min(H, W) rows and columns around the centre.

    ``crop_box`` gives the same box from intrinsics.txt's size, for ``rescale_intrinsics``.
    """
    top, left, side = crop_box(*img.shape[:2])
    return img[top:top + side, left:left + side]


@functools.lru_cache(maxsize=64)
def _area_weights(in_size, out_size):
    """(out_size, in_size) float64 resampling matrix with OpenCV INTER_AREA semantics.

    Shrinking: each output pixel is the average of the input interval it covers, partial pixels weighted by
    their overlap. Enlarging: OpenCV's INTER_AREA rule, nearest neighbour with a linear blend only where an
    output pixel straddles two input pixels.
    """
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    if out_size <= in_size:
        for i in range(out_size):
            start, end = i * scale, (i + 1) * scale
            for j in range(int(math.floor(start)), min(int(math.ceil(end)), in_size)):
                overlap = min(end, j + 1) - max(start, j)
                if overlap > 0:
                    weights[i, j] = overlap / scale
    else:
        inv_scale = out_size / in_size
        for i in range(out_size):
            src = int(math.floor(i * scale))
            frac = (i + 1) - (src + 1) * inv_scale
            frac = 0.0 if frac <= 0 else frac - math.floor(frac)
            if src >= in_size - 1:
                src, frac = in_size - 1, 0.0
            weights[i, src] += 1.0 - frac
            if frac > 0:
                weights[i, src + 1] += frac
    return weights


def _block_sum(img, factor, dtype):
    """Sum of each factor x factor block of an (H, W, C) array, (H/factor, W/factor, C), in ``dtype``.

    Strided adds of whole rows, then whole columns: measured ~6x faster than ``reshape(...).mean((1, 3))``,
    whose multi-axis reduction is slow in numpy.
    """
    height, width, channels = img.shape
    rows = img.reshape(height // factor, factor, width, channels)
    acc = rows[:, 0].astype(dtype)  # (H/f, W, C)
    for i in range(1, factor):
        acc += rows[:, i]
    cols = acc.reshape(height // factor, width // factor, factor, channels)
    out = cols[:, :, 0].copy()  # (H/f, W/f, C)
    for j in range(1, factor):
        out += cols[:, :, j]
    return out


def area_resize(img, sidelength):
    """Resize a square (s, s, C) float image to (sidelength, sidelength, C) like cv2.INTER_AREA.

    Integer shrink factors are plain block averages (the common 128 -> 64 case); other factors apply the
    separable area weights, rows then columns.
    """
    in_size, _, channels = img.shape
    if img.shape[1] != in_size:
        raise ValueError(f"area_resize expects a square image, got shape {img.shape}")
    if sidelength == in_size:
        return img
    if sidelength < in_size and in_size % sidelength == 0:
        factor = in_size // sidelength
        return _block_sum(img, factor, np.float32) / np.float32(factor * factor)
    index, weights = _area_taps(in_size, sidelength)  # (s_out, T) each
    # gathers and multiply-adds over the few nonzero taps: no BLAS call, whose threads oversubscribe
    # DataLoader workers (a dense matmul measured 100x slower on a busy machine)
    rows = sum(weights[:, t, None, None] * img[index[:, t]] for t in range(index.shape[1]))  # (s_out, s, C)
    return sum(weights[None, :, t, None] * rows[:, index[:, t]] for t in range(index.shape[1]))  # (s_out, s_out, C)


@functools.lru_cache(maxsize=64)
def _area_taps(in_size, out_size):
    """The nonzero entries of ``_area_weights`` as (index, weight) arrays, each (out_size, T), T taps."""
    dense = _area_weights(in_size, out_size)
    num_taps = int((dense > 0).sum(axis=1).max())
    index = np.zeros((out_size, num_taps), dtype=np.int64)
    weights = np.zeros((out_size, num_taps), dtype=np.float32)
    for i, row in enumerate(dense):
        nonzero = np.flatnonzero(row)
        index[i, :len(nonzero)], weights[i, :len(nonzero)] = nonzero, row[nonzero]
    return index, weights


def prepare_rgb(raw, sidelength=None):
    """Stored image (H, W, 3) uint8/uint16 -> float32 (s, s, 3) in [-1, 1]: crop, area-resize, x2-1.

    For integer shrink factors the block sums are taken on the integers and divided once by
    (255 or 65535)·factor² — equal to the reference's float path within float32 rounding (~1e-7), and
    white stays exactly 1. This is the per-item cost of a preloaded dataset, hence the care.
    """
    img = square_crop(raw)
    side = img.shape[0]
    target = side if sidelength is None else int(sidelength)
    if img.dtype in (np.uint8, np.uint16) and target <= side and side % target == 0:
        factor = side // target
        maxval = 255 if img.dtype == np.uint8 else 65535
        out = _block_sum(img, factor, np.uint32).astype(np.float32) if factor > 1 else img.astype(np.float32)
        out /= np.float32(maxval * factor * factor)
    else:
        out = np.array(area_resize(to_unit_float(img), target), dtype=np.float32)
    out *= np.float32(2.)
    out -= np.float32(1.)
    return out


def load_rgb(path, sidelength=None):
    """An SRN image: float32 (s, s, 3) in [-1, 1], HWC (flatten row-major for the (N, 3) sample layout).

    First three channels -> [0, 1] (÷255 or ÷65535) -> centre square crop -> area resize to ``sidelength``
    (kept at the cropped size when None) -> ×2−1 (SPEC section 5).
    """
    return prepare_rgb(read_image_raw(path), sidelength)


def write_image(path, rgb):
    """Write an RGB image as 8-bit PNG (or JPEG by extension): uint8 (H, W, 3), or float in [0, 1]."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"{path}: write_image expects an (H, W, 3) array, got shape {rgb.shape}")
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


# --- Depth -------------------------------------------------------------------------------------------

DEPTH_SCALE = 1000.0  # uint16 value per scene unit: millimetres when the unit is the metre (module docstring)


def write_depth(path, depth):
    """Write float depth (H, W) (camera z, 0 = background) as a 16-bit PNG of round(depth * 1000)."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"{path}: write_depth expects an (H, W) array, got shape {depth.shape}")
    if not np.all(np.isfinite(depth)) or depth.min(initial=0.0) < 0:
        raise ValueError(f"{path}: depth must be finite and >= 0 (0 marks background)")
    scaled = np.round(depth * DEPTH_SCALE)
    if scaled.max(initial=0.0) > 65535:
        raise ValueError(f"{path}: depth {depth.max():.3f} exceeds the 16-bit range "
                         f"({65535 / DEPTH_SCALE:.3f} scene units); scale the scene down")
    Image.fromarray(scaled.astype(np.uint16)).save(path)  # Pillow stores uint16 as a 16-bit gray PNG


def load_depth(path):
    """Read a depth PNG written by ``write_depth``: float32 (H, W) camera z, 0 for background."""
    _require_file(path, "depth image")
    raw = _decode(path, "depth image")
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise ValueError(f"{path}: expected a single-channel 16-bit depth PNG, got shape {raw.shape} "
                         f"dtype {raw.dtype}")
    return raw.astype(np.float32) / np.float32(DEPTH_SCALE)


# --- Poses -------------------------------------------------------------------------------------------

def load_pose(path):
    """cam2world (4, 4) float32 from a pose file: four lines of four numbers, or one line of sixteen.

    The reference reads the float64 values and casts them to float32; so do we.
    """
    tokens = _read_text(path, "pose file").split()
    if len(tokens) != 16:
        raise ValueError(f"{path}: a pose must be 16 numbers (4 lines of 4, or one line of 16, row-major "
                         f"cam2world), found {len(tokens)}")
    return _parse_numbers(tokens, path, "pose").reshape(4, 4).astype(np.float32)


# A camera's 3x3 part is a rotation, possibly uniformly scaled: condition number 1. Beyond this it is no
# camera (and float32 inverses lose most digits); any real pose, even written with 4 decimals, is near 1.
MAX_POSE_CONDITION = 1e4
POSE_LAST_ROW_ATOL = 1e-4  # the row [0 0 0 1] is never divided by, so any other value is silently wrong


def check_cam2world(cam2world, paths):
    """ValueError naming the first pose file whose matrix cannot be a camera's cam2world.

    A cam2world is ``[[R, t], [0, 0, 0, 1]]`` with R a rotation. Accepted: R uniformly scaled, or written
    with limited precision. Rejected: a singular or badly conditioned R (e.g. all zeros, a zero row), whose
    inverse fails or is meaningless hours into training, and a last row other than 0 0 0 1 (within
    ``POSE_LAST_ROW_ATOL``), which our geometry ignores where it lifts points but not where it inverts.

    :param cam2world: (V, 4, 4) poses as loaded by ``load_pose``
    :param paths: the V files they came from
    """
    cam2world = np.asarray(cam2world, dtype=np.float64).reshape(-1, 4, 4)
    rotation = cam2world[:, :3, :3]  # (V, 3, 3)
    singular_values = np.linalg.svd(rotation, compute_uv=False)  # (V, 3), descending
    largest, smallest = singular_values[:, 0], singular_values[:, 2]
    exactly_singular = ~(smallest > 1e-12 * largest)  # zero up to float64 rounding (all zeros included)
    singular = exactly_singular | (largest > MAX_POSE_CONDITION * smallest)
    last_row_error = np.abs(cam2world[:, 3, :] - np.array([0., 0., 0., 1.])).max(axis=1)  # (V,)
    bad = np.flatnonzero(singular | (last_row_error > POSE_LAST_ROW_ATOL))
    if not len(bad):
        return
    k = int(bad[0])
    problems = []
    if exactly_singular[k]:
        problems.append("singular rotation part (det 0)")
    elif singular[k]:
        problems.append(f"badly conditioned rotation part (singular values "
                        f"{' '.join(f'{v:.3g}' for v in singular_values[k])}, "
                        f"det {np.linalg.det(rotation[k]):.3g})")
    if last_row_error[k] > POSE_LAST_ROW_ATOL:
        problems.append(f"last row is {' '.join(f'{v:g}' for v in cam2world[k, 3])}, expected 0 0 0 1")
    raise ValueError(f"{paths[k]}: not a camera pose: {'; '.join(problems)}. A pose is the cam2world matrix "
                     f"[[R, t], [0 0 0 1]] with R a rotation; fix this file, or remove it together with its "
                     f"image (views pair by sorted position)")


def write_pose(path, cam2world):
    """Write cam2world (4, 4) as ONE line of 16 numbers, row-major (the published datasets' layout)."""
    cam2world = np.asarray(cam2world, dtype=np.float64)
    if cam2world.shape != (4, 4):
        raise ValueError(f"{path}: write_pose expects a (4, 4) matrix, got shape {cam2world.shape}")
    with open(path, 'w') as file:
        # repr: the shortest text that reads back to the same float64, so poses round-trip exactly
        file.write(' '.join(repr(float(v)) for v in cam2world.reshape(-1)) + '\n')


# --- Params ------------------------------------------------------------------------------------------

def load_params(path):
    """A per-view parameter vector: float32 (P,) from the first line of ``path``."""
    tokens = _read_text(path, "params file", first_line_only=True).split()
    if not tokens:
        raise ValueError(f"{path}: the first line must hold the parameter vector, found it empty")
    return _parse_numbers(tokens, path, "params").astype(np.float32)


def write_params(path, params):
    """Write a parameter vector (P,) on one line."""
    params = np.asarray(params, dtype=np.float64).reshape(-1)
    with open(path, 'w') as file:
        file.write(' '.join(repr(float(v)) for v in params) + '\n')


# --- Intrinsics --------------------------------------------------------------------------------------

Intrinsics = namedtuple('Intrinsics', ['f', 'cx', 'cy', 'grid_barycenter', 'scale', 'near_plane',
                                       'height', 'width', 'world2cam_poses'])
Intrinsics.__doc__ = """The contents of an ``intrinsics.txt`` (pixels of the stored images)."""


def read_intrinsics(path):
    """Parse an SRN ``intrinsics.txt`` into an ``Intrinsics`` tuple, checking every line.

    Line 1: ``f cx cy [0.]``; line 2: the grid barycenter (3 numbers); line 3: the scale (one number; an
    optional second number is read as the near plane, else 0); line 4: ``height width``; optional line 5:
    an integer world2cam flag (anything else there counts as absent, as in the reference). The barycenter,
    scale, near plane and flag are returned for completeness; SRNs ignore them (SPEC section 5).
    """
    lines = _read_text(path, "intrinsics.txt").splitlines()
    fix = "expected 'f cx cy 0.' / '0. 0. 0.' / '1.' / 'height width'"
    if len(lines) < 4:
        raise ValueError(f"{path}: intrinsics need 4 lines, found {len(lines)}; {fix}")
    first = _parse_numbers(lines[0].split(), path, "line 1 (f cx cy)")
    if len(first) not in (3, 4):
        raise ValueError(f"{path}: line 1 must be 'f cx cy [0.]', found {len(first)} numbers; {fix}")
    barycenter = _parse_numbers(lines[1].split(), path, "line 2 (grid barycenter)")
    if len(barycenter) != 3:
        raise ValueError(f"{path}: line 2 must be the 3-number grid barycenter, found {len(barycenter)}; {fix}")
    third = _parse_numbers(lines[2].split(), path, "line 3 (scale)")
    if len(third) not in (1, 2):
        raise ValueError(f"{path}: line 3 must be the scale (one number), found {len(third)}; {fix}")
    size = _parse_numbers(lines[3].split(), path, "line 4 (height width)")
    if len(size) != 2 or size.min() <= 0:
        raise ValueError(f"{path}: line 4 must be 'height width' (two positive numbers), "
                         f"found {lines[3]!r}; {fix}")
    f, cx, cy = first[:3]
    if f <= 0:
        raise ValueError(f"{path}: focal length must be positive, found {f}")
    world2cam_poses = False
    if len(lines) > 4:
        try:
            world2cam_poses = bool(int(lines[4]))
        except ValueError:
            world2cam_poses = False
    return Intrinsics(float(f), float(cx), float(cy), barycenter, float(third[0]),
                      float(third[1]) if len(third) == 2 else 0.0, float(size[0]), float(size[1]),
                      world2cam_poses)


def intrinsics_matrix_np(f, cx, cy):
    """The (4, 4) float32 intrinsics matrix of SPEC section 4."""
    return np.array([[f, 0., cx, 0.],
                     [0., f, cy, 0.],
                     [0., 0., 1., 0.],
                     [0., 0., 0., 1.]], dtype=np.float32)


def crop_box(height, width):
    """(top, left, side) of the centre square crop of an image of ``height`` x ``width`` (``square_crop``)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def rescale_intrinsics(intrinsics, trgt_sidelength=None):
    """(f, cx, cy) in pixels of the served image: the stored one centre-cropped, then resized to s.

    With height H and width W from intrinsics.txt's line 4, ``square_crop`` keeps the m = min(H, W) square
    at (top, left) = ((H − m) // 2, (W − m) // 2) and the resize scales it by s / m, so a stored pixel
    (x, y) becomes ((x − left)·s/m, (y − top)·s/m):

        f' = f·s/m,   cx' = (cx − left)·s/m,   cy' = (cy − top)·s/m      (s = m when trgt_sidelength is None)

    Where we differ from the reference: it computes f·s/H, cx·s/W, cy·s/H, which ignores the crop and is
    exact for square images only; for those (m = H = W, no offset) the two agree to the last bit, in the
    same order of operations. Non-square images now get the camera their pixels were cropped from.
    """
    f, cx, cy = intrinsics.f, intrinsics.cx, intrinsics.cy
    top, left, side = crop_box(intrinsics.height, intrinsics.width)
    cx, cy = cx - left, cy - top  # exact, and a no-op for square images
    if trgt_sidelength is not None:
        # the reference's order of operations, so that square images are bit-identical to it
        cx = cx / side * trgt_sidelength
        cy = cy / side * trgt_sidelength
        f = trgt_sidelength / side * f
    return f, cx, cy


def parse_intrinsics(path, trgt_sidelength=None):
    """The (4, 4) float32 intrinsics matrix of ``intrinsics.txt``, rescaled to ``trgt_sidelength`` pixels."""
    return intrinsics_matrix_np(*rescale_intrinsics(read_intrinsics(path), trgt_sidelength))


def parse_intrinsics_legacy(path, trgt_sidelength=None, invert_y=False):
    """The reference's 5-tuple: (full_intrinsic (4, 4) float64, grid_barycenter (3,), scale, near_plane,
    world2cam_poses), for scripts written against the original code.

    The API is the reference's; f, cx, cy come from ``rescale_intrinsics``, so for non-square images they
    account for the centre crop where the reference's did not (identical for square images).
    """
    intrinsics = read_intrinsics(path)
    f, cx, cy = rescale_intrinsics(intrinsics, trgt_sidelength)
    full_intrinsic = intrinsics_matrix_np(f, cx, cy).astype(np.float64)
    full_intrinsic[:3, :3] = [[f, 0., cx], [0., -f if invert_y else f, cy], [0., 0., 1.]]
    return (full_intrinsic, intrinsics.grid_barycenter, intrinsics.scale, intrinsics.near_plane,
            intrinsics.world2cam_poses)


def write_intrinsics(path, f, cx, cy, height, width):
    """Write the 4-line SRN ``intrinsics.txt``: "f cx cy 0." / "0. 0. 0." / "1." / "height width"."""
    with open(path, 'w') as file:
        file.write(f"{float(f)!r} {float(cx)!r} {float(cy)!r} 0.\n0. 0. 0.\n1.\n{int(height)} {int(width)}\n")
