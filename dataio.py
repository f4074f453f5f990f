"""Datasets of posed images in the SRN format (SPEC section 5; paper section 4, "Experiments").

``SceneClassDataset`` serves every observation of a class of objects (one latent code per instance, in
sorted-folder order); ``SceneInstanceDataset`` serves the views of one object. Both keep the reference
semantics (instance order, ``max_num_instances``, ``max_observations_per_instance``,
``specific_observation_idcs``, ``samples_per_instance``, ``set_img_sidelength``, the collate function) and
fix its slow and silent parts (SPEC section 8):

- everything that can be checked without decoding images is checked at construction, and every error
  names the offending path and says what is wrong: unreadable entries of the root (never skipped, as that
  would shift the latent codes of the later instances), poses that cannot be a camera, and each kept
  image's header (exists, non-empty, an image); sizes that make training silently worse (images far
  below the side length, or disagreeing with intrinsics.txt) are warned about once per dataset;
- non-square images get the camera of their centre-square crop (``data_util.rescale_intrinsics``; the
  reference's intrinsics were right for square images only);
- ``intrinsics.txt``, poses and params are parsed once, at construction; item lookup is O(log n);
- ``preload=True`` decodes every selected image once (threads), centre-crops it and keeps it at full
  resolution in a single tensor. Resizing to the current side happens per item (a block mean
  for integer factors), so ``set_img_sidelength`` needs no rebuild, the memory held is bounded by the
  dataset's size on disk once decoded (uint8: H·W·3 bytes per view), and the one buffer is inherited by
  forked DataLoader workers without copies (or shared through shared memory when workers are spawned).

A sample (one observation) is a dict: ``instance_idx`` float scalar, ``rgb (N, 3)`` in [-1, 1] row-major,
``pose (4, 4)`` cam2world, ``uv (N, 2)`` int64 (column, row), ``param (P,)`` or ``[0.]``,
``intrinsics (4, 4)``; its ground truth is ``{'rgb': (N, 3)}``.
"""
import bisect
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

import data_util
from geometry import uv_grid


def _observation_positions(num_views, max_observations, specific_observation_idcs, instance_dir):
    """Which views (positions in the sorted pose list) an instance keeps, as a list of ints."""
    if specific_observation_idcs is not None:
        positions = [int(i) for i in specific_observation_idcs]
        bad = [i for i in positions if not 0 <= i < num_views]
        if bad:
            raise ValueError(f"{instance_dir}: observation indices {bad} out of range; this instance has "
                             f"{num_views} views (pose files), valid indices are 0..{num_views - 1}")
        return positions
    if max_observations is not None and max_observations != -1:
        if max_observations < 1:
            raise ValueError(f"{instance_dir}: max_observations_per_instance must be -1 or >= 1, "
                             f"got {max_observations}")
        # floor(i·n/k) in integers (SPEC section 5): evenly spread, views repeat when k > n
        return [(i * num_views) // max_observations for i in range(max_observations)]
    return list(range(num_views))


class _ImageCache:
    """Decoded, centre-cropped images of one dataset in one flat tensor (uint8, or uint16 if any is 16-bit).

    A single tensor keeps forked DataLoader workers on the parent's pages (no per-image Python objects whose
    reference counts would copy them) and crosses to spawned workers as one shared-memory segment.
    """

    def __init__(self, paths, num_threads=None):
        num_threads = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(num_threads) as pool:  # PNG/JPEG decoding releases the GIL
            images = list(pool.map(lambda p: data_util.square_crop(data_util.read_image_raw(p)), paths))
        self.is_16bit = any(img.dtype == np.uint16 for img in images)
        self.shapes = np.array([img.shape for img in images], dtype=np.int64).reshape(-1, 3)  # (K, 3)
        sizes = self.shapes.prod(axis=1)
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))  # (K + 1,)
        np_dtype = np.uint16 if self.is_16bit else np.uint8
        buffer = np.empty(int(self.offsets[-1]), dtype=np_dtype)
        for k, img in enumerate(images):
            if self.is_16bit and img.dtype == np.uint8:
                img = img.astype(np.uint16) * np.uint16(257)  # u/255 == 257·u/65535 exactly
            buffer[self.offsets[k]:self.offsets[k + 1]] = img.reshape(-1)
        del images
        # torch < 2.3 has no uint16 tensors: keep 16-bit data as int16 with the same bits (zero-copy view).
        # Not share_memory_()-ed here: forked workers inherit the pages for free, and /dev/shm is often tiny
        # in containers; spawned workers get it through torch's pickler, which moves it to shared memory.
        self.buffer = torch.from_numpy(buffer.view(np.int16) if self.is_16bit else buffer)

    def __len__(self):
        return len(self.shapes)

    def get(self, k):
        """The k-th image as stored: (H, W, 3) uint8 or uint16 (a view for uint8)."""
        flat = self.buffer[self.offsets[k]:self.offsets[k + 1]].numpy()
        if self.is_16bit:
            flat = flat.view(np.uint16)
        return flat.reshape(self.shapes[k])

    @property
    def nbytes(self):
        return self.buffer.numel() * self.buffer.element_size()


class _ImageSizeWarnings:
    """Warnings about image sizes, each at most once per dataset, naming one example file and the count.

    Two things in the image headers make training silently worse without being errors: images far smaller
    than the side length they are served at (upsampling invents detail), and images whose size disagrees
    with their instance's intrinsics.txt (f, cx, cy are pixels of the size written there).
    """

    def __init__(self, instances):
        self.instances = instances
        self.num_images = sum(len(obj.color_paths) for obj in instances)
        self.warned_small = False
        self._warn_mismatched_intrinsics()

    def _first_and_count(self, is_bad):
        """(instance, view position) of the first image where ``is_bad(instance)`` (a (V,) mask) holds,
        and how many images it holds for."""
        first, count = None, 0
        for obj in self.instances:
            bad = np.flatnonzero(is_bad(obj))
            if len(bad) and first is None:
                first = obj, int(bad[0])
            count += len(bad)
        return first, count

    def _warn_mismatched_intrinsics(self):
        def mismatched(obj):
            stated = np.array([obj.intrinsics_file.height, obj.intrinsics_file.width])
            return (obj.image_sizes != stated).any(axis=1)

        first, count = self._first_and_count(mismatched)
        if first is not None:
            obj, k = first
            height, width = obj.image_sizes[k]
            warnings.warn(
                f"{obj.color_paths[k]}: image is {height}x{width} (height x width) but "
                f"{os.path.join(obj.instance_dir, 'intrinsics.txt')} line 4 says "
                f"{obj.intrinsics_file.height:g} {obj.intrinsics_file.width:g}; f, cx, cy are pixels of that "
                f"size, so the camera is wrong unless the image is an exact rescale of it "
                f"({count} of {self.num_images} images disagree); write intrinsics.txt for the stored images")

    def warn(self, sidelength):
        """Warn (once) when images are served at more than twice their centre square's side."""
        if sidelength is None or self.warned_small:
            return
        first, count = self._first_and_count(lambda obj: 2 * obj.image_sizes.min(axis=1) < sidelength)
        if first is not None:
            obj, k = first
            side = int(obj.image_sizes[k].min())
            warnings.warn(
                f"{obj.color_paths[k]}: centre square of {side} px is upsampled to the side length "
                f"{sidelength}, which invents detail ({count} of {self.num_images} images are below half of "
                f"it); train at a smaller side length or provide larger images")
            self.warned_small = True


class SceneInstanceDataset(Dataset):
    """The views of one object (one folder of SPEC section 5), as observation dicts.

    :param instance_idx: the object's latent-code index (its position among the class's instances)
    :param instance_dir: folder with rgb/, pose/, intrinsics.txt and optionally params/
    :param specific_observation_idcs: keep exactly these views (positions in the sorted pose list)
    :param img_sidelength: side length s of the served images (None: the stored, centre-cropped side)
    :param num_images: keep views floor(i·n/k), i < k = num_images (-1: all)
    :param preload: decode the kept images once and serve them from RAM
    :param check_images: read the kept images' headers now (errors name the file) and warn about their sizes
    """

    def __init__(self, instance_idx, instance_dir, specific_observation_idcs=None, img_sidelength=None,
                 num_images=-1, preload=False, check_images=True, _cache=None, _cache_start=0):
        self.instance_idx = instance_idx
        self.instance_dir = instance_dir
        self.img_sidelength = img_sidelength

        color_dir = os.path.join(instance_dir, "rgb")
        pose_dir = os.path.join(instance_dir, "pose")
        param_dir = os.path.join(instance_dir, "params")
        data_util.require_folder(instance_dir, "instance folder")
        for folder in (color_dir, pose_dir):
            data_util.require_folder(
                folder, f"{os.path.basename(folder)}/ folder",
                "every subfolder of the dataset root must be an instance with rgb/, pose/ and intrinsics.txt "
                "(move other folders out of the root)")
        color_paths = data_util.list_images(color_dir)
        pose_paths = data_util.list_files(pose_dir, '.txt')
        if not pose_paths:
            raise FileNotFoundError(f"{pose_dir}: no pose files (*.txt); an instance needs at least one view")
        if len(color_paths) != len(pose_paths):
            raise ValueError(f"{instance_dir}: {len(color_paths)} images in rgb/ but {len(pose_paths)} poses "
                             f"in pose/; views pair images and poses by sorted position, so the counts must match")
        param_paths = None
        if os.path.lexists(param_dir):  # a broken params/ link is an error, not "no params"
            data_util.require_folder(param_dir, "params/ folder", "fix it, or remove it if the views have none")
            param_paths = data_util.list_files(param_dir, '.txt')
            if len(param_paths) != len(pose_paths):
                raise ValueError(f"{param_dir}: {len(param_paths)} params files for {len(pose_paths)} poses; "
                                 f"provide one per view or remove params/")

        self.num_views_on_disk = len(pose_paths)
        self.positions = _observation_positions(len(pose_paths), num_images, specific_observation_idcs,
                                                instance_dir)
        self.color_paths = [color_paths[i] for i in self.positions]
        self.pose_paths = [pose_paths[i] for i in self.positions]
        self.param_paths = None if param_paths is None else [param_paths[i] for i in self.positions]

        # parsed once here (the reference re-read intrinsics.txt for every image)
        self.intrinsics_file = data_util.read_intrinsics(os.path.join(instance_dir, "intrinsics.txt"))
        poses = np.stack([data_util.load_pose(p) for p in self.pose_paths])  # (V, 4, 4)
        data_util.check_cam2world(poses, self.pose_paths)  # here, not when a batch first draws a bad one
        self.poses = torch.from_numpy(poses)
        if self.param_paths is None:
            self.params = None
        else:
            self.params = [torch.from_numpy(data_util.load_params(p)) for p in self.param_paths]  # V x (P,)
        self._intrinsics_by_side = {}

        # (V, 2) (height, width) from the image headers; a SceneClassDataset reads all of its instances'
        # headers in one pass instead, and warns for them together
        self.image_sizes = None
        self._image_warnings = None
        if check_images:
            self.image_sizes = data_util.read_image_sizes(self.color_paths)
            self._image_warnings = _ImageSizeWarnings([self])
            self._image_warnings.warn(img_sidelength)

        self._cache, self._cache_start = _cache, _cache_start
        if preload and _cache is None:
            self._cache, self._cache_start = _ImageCache(self.color_paths), 0

    def set_img_sidelength(self, new_img_sidelength):
        """Serve images (and intrinsics, uv) at a new side length; the preloaded cache stays valid."""
        self.img_sidelength = new_img_sidelength
        if self._image_warnings is not None:
            self._image_warnings.warn(new_img_sidelength)

    def __len__(self):
        return len(self.pose_paths)

    def _intrinsics(self, sidelength):
        """(4, 4) float32 intrinsics for images of side ``sidelength`` (None: as stored), cached."""
        if sidelength not in self._intrinsics_by_side:
            f, cx, cy = data_util.rescale_intrinsics(self.intrinsics_file, sidelength)
            self._intrinsics_by_side[sidelength] = torch.from_numpy(data_util.intrinsics_matrix_np(f, cx, cy))
        return self._intrinsics_by_side[sidelength]

    def _rgb(self, idx):
        """float32 (s, s, 3) in [-1, 1]."""
        if self._cache is not None:
            return data_util.prepare_rgb(self._cache.get(self._cache_start + idx), self.img_sidelength)
        return data_util.load_rgb(self.color_paths[idx], sidelength=self.img_sidelength)

    def __getitem__(self, idx):
        rgb = self._rgb(idx)  # (s, s, 3)
        sidelength = rgb.shape[0]
        return {
            "instance_idx": torch.tensor(float(self.instance_idx)),
            "rgb": torch.from_numpy(np.ascontiguousarray(rgb.reshape(-1, 3))),  # (N, 3), row-major
            "pose": self.poses[idx].clone(),  # (4, 4) cam2world
            "uv": _uv(sidelength).clone(),  # (N, 2) int64
            "param": self.params[idx].clone() if self.params is not None else torch.tensor([0.]),
            "intrinsics": self._intrinsics(self.img_sidelength).clone(),  # (4, 4)
        }


_UV_BY_SIDE = {}


def _uv(sidelength):
    if sidelength not in _UV_BY_SIDE:
        _UV_BY_SIDE[sidelength] = uv_grid(sidelength)
    return _UV_BY_SIDE[sidelength]


def list_instance_dirs(root_dir):
    """The instance folders of a dataset root, sorted as full paths with a trailing separator (SPEC 5).

    An instance's position in this list is its latent-code index, so an entry that cannot be read must not
    be skipped: every later instance would move to another code (and test.py would render each with a
    wrong one). A broken symbolic link or a link to a file therefore raises, naming the entry. Plain files
    (README.txt, .DS_Store) and hidden entries are ignored, as in the reference, whose glob matched
    folders only: they cannot have been meant as instances.
    """
    if not os.path.isdir(root_dir):
        raise FileNotFoundError(f"{root_dir}: dataset root not found (expected root/<instance>/rgb/ and pose/)")
    instance_dirs = []
    for name in data_util.list_dir(root_dir):
        if name.startswith('.'):
            continue
        path = os.path.join(root_dir, name)
        if os.path.islink(path) and not os.path.isdir(path):
            data_util.require_folder(path, "entry of the dataset root",
                                     "every link in the root must lead to an instance folder; fix the link or "
                                     "remove it (a skipped entry would shift the later instances' latent codes)")
        if os.path.isdir(path):
            instance_dirs.append(path + os.sep)
    if not instance_dirs:
        raise FileNotFoundError(f"{root_dir}: no instance folders with rgb/ and pose/ "
                                f"(expected root/<instance>/rgb/*.png, pose/*.txt, intrinsics.txt)")
    return sorted(instance_dirs)


def collate_fn(batch_list):
    """Flatten a batch of (observations, ground truths) pairs into two dicts of stacked tensors.

    :param batch_list: b pairs, each two lists of samples_per_instance dicts
    :return: (observation dict with tensors (b·samples_per_instance, ...), ground-truth dict likewise)
    """
    observations = [obs for item in batch_list for obs in item[0]]
    ground_truths = [gt for item in batch_list for gt in item[1]]
    return _stack_dicts(observations), _stack_dicts(ground_truths)


def _stack_dicts(dicts):
    stacked = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts]
        stacked[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return stacked


class SceneClassDataset(Dataset):
    """Every observation of every instance under ``root_dir`` (SPEC section 5).

    Item i is ``(observations, ground_truths)``: two lists of ``samples_per_instance`` dicts whose first
    entry is the i-th observation in instance-then-view order and whose others are random views of the same
    instance. Every script uses ``samples_per_instance=1``.
    """

    def __init__(self, root_dir, img_sidelength=None, max_num_instances=-1, max_observations_per_instance=-1,
                 specific_observation_idcs=None, samples_per_instance=2, preload=False):
        self.root_dir = root_dir
        self.img_sidelength = img_sidelength
        self.samples_per_instance = samples_per_instance
        if samples_per_instance < 1:
            raise ValueError(f"{root_dir}: samples_per_instance must be >= 1, got {samples_per_instance}")

        self.instance_dirs = list_instance_dirs(root_dir)
        if max_num_instances is not None and max_num_instances != -1:
            self.instance_dirs = self.instance_dirs[:max_num_instances]

        self.all_instances = [SceneInstanceDataset(instance_idx=idx, instance_dir=instance_dir,
                                                   specific_observation_idcs=specific_observation_idcs,
                                                   img_sidelength=img_sidelength,
                                                   num_images=max_observations_per_instance, check_images=False)
                              for idx, instance_dir in enumerate(self.instance_dirs)]
        # every kept image's header, in one threaded pass: 15-25 us per PNG measured (warm cache, two busy
        # cores), so ShapeNet cars' 121k training images cost 2-3 s here instead of an error hours into training
        sizes = data_util.read_image_sizes([p for obj in self.all_instances for p in obj.color_paths])
        start = 0
        for obj in self.all_instances:
            obj.image_sizes, start = sizes[start:start + len(obj)], start + len(obj)
        self._image_warnings = _ImageSizeWarnings(self.all_instances)
        self._image_warnings.warn(img_sidelength)
        self.num_per_instance_observations = [len(obj) for obj in self.all_instances]
        self.num_instances = len(self.all_instances)
        # first global observation index of each instance: item -> instance by bisection, O(log n)
        self._instance_starts = np.concatenate(([0], np.cumsum(self.num_per_instance_observations)[:-1]))
        self._length = int(sum(self.num_per_instance_observations))

        self.preloaded = False
        if preload:
            self.preload()

    def preload(self, num_threads=None):
        """Decode every kept image once into one shared RAM buffer (see the module docstring)."""
        paths = [p for obj in self.all_instances for p in obj.color_paths]
        cache = _ImageCache(paths, num_threads)
        for obj, start in zip(self.all_instances, self._instance_starts):
            obj._cache, obj._cache_start = cache, int(start)
        self.preloaded = True
        return cache.nbytes

    def set_img_sidelength(self, new_img_sidelength):
        """Serve all instances at a new side length (the stages of multi-resolution training)."""
        self.img_sidelength = new_img_sidelength
        for obj in self.all_instances:
            obj.set_img_sidelength(new_img_sidelength)
        self._image_warnings.warn(new_img_sidelength)

    def __len__(self):
        return self._length

    def get_instance_idx(self, idx):
        """(instance position, view position within it) of global observation ``idx``."""
        if not 0 <= idx < self._length:
            raise IndexError(f"{self.root_dir}: observation {idx} out of range for {self._length} observations")
        obj_idx = bisect.bisect_right(self._instance_starts, idx) - 1
        return obj_idx, idx - int(self._instance_starts[obj_idx])

    collate_fn = staticmethod(collate_fn)

    def rgb(self, idx):
        """The image of observation ``idx`` as served: float32 (s, s, 3) in [-1, 1], an item's ``rgb`` unflattened."""
        obj_idx, rel_idx = self.get_instance_idx(idx)
        return self.all_instances[obj_idx]._rgb(rel_idx)

    def observation_fields(self):
        """Every observation's fields but ``rgb`` and ``uv``, stacked in item order without decoding an image:
        ``instance_idx (V,)``, ``pose (V, 4, 4)``, ``param (V, P)``, ``intrinsics (V, 4, 4)``, each equal to
        ``collate_fn`` over all items (with ``samples_per_instance=1``)."""
        no_param = torch.tensor([0.])
        fields = {'instance_idx': [], 'pose': [], 'param': [], 'intrinsics': []}
        for obj in self.all_instances:
            fields['instance_idx'].append(torch.full((len(obj),), float(obj.instance_idx)))
            fields['pose'].append(obj.poses)
            fields['param'].append(torch.stack(obj.params) if obj.params is not None and len(obj)
                                   else no_param.expand(len(obj), 1))
            fields['intrinsics'].append(obj._intrinsics(obj.img_sidelength).expand(len(obj), 4, 4))
        return {key: torch.cat(values) for key, values in fields.items()}

    def __getitem__(self, idx):
        obj_idx, rel_idx = self.get_instance_idx(idx)
        instance = self.all_instances[obj_idx]
        observations = [instance[rel_idx]]
        # torch's generator is reseeded per DataLoader worker, so workers draw different views
        for extra in torch.randint(len(instance), (self.samples_per_instance - 1,)).tolist():
            observations.append(instance[extra])
        ground_truth = [{"rgb": obs["rgb"]} for obs in observations]
        return observations, ground_truth


class RandomRays(Dataset):
    """The observations of a dataset, each with a random subset of its rays (pixels): a training sampler.

    With the MLP pixel generator every ray is rendered independently, so a batch need not be made of whole
    images: ``rays_per_view`` random pixels from each of many views give the gradient of many objects and
    viewpoints for the cost of a few whole images (the batches NeRF and its successors train on). The U-Net
    renderer convolves over whole images and cannot use this.

    Items are keyed, not indexed: key ``k`` serves observation ``k % len(dataset)`` with the pixels drawn by a
    generator seeded from (``seed``, k). ``train.EpochSampler`` hands out keys that differ from epoch to epoch,
    so the draws are new every epoch yet a function of the data order alone: the same in DataLoader workers as
    in the main process, and again after resuming.

    An item is the base dataset's, with ``uv (N', 2)`` and ``rgb (N', 3)`` (observation and ground truth)
    restricted to the N' = ``rays_per_view`` drawn pixels, in increasing pixel order.
    """

    def __init__(self, dataset, rays_per_view, seed=0):
        if rays_per_view < 1:
            raise ValueError(f"rays_per_view must be >= 1, got {rays_per_view}")
        self.dataset, self.rays_per_view, self.seed = dataset, rays_per_view, seed

    def __len__(self):
        return len(self.dataset)

    def set_img_sidelength(self, new_img_sidelength):
        self.dataset.set_img_sidelength(new_img_sidelength)

    def __getitem__(self, key):
        observations, ground_truths = self.dataset[key % len(self.dataset)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(key))
        for observation, ground_truth in zip(observations, ground_truths):
            num_pixels = observation['uv'].shape[0]
            if self.rays_per_view >= num_pixels:
                continue
            pixels = torch.randperm(num_pixels, generator=generator)[:self.rays_per_view].sort().values  # (N',)
            observation['uv'] = observation['uv'][pixels]  # (N', 2)
            observation['rgb'] = ground_truth['rgb'] = observation['rgb'][pixels]  # (N', 3)
        return observations, ground_truths


def shutdown_workers(loader_iter):
    """Stop a DataLoader iterator's worker processes now, as its destructor would.

    train.py's workers ignore SIGTERM (``train.ignore_interrupts``), so they must be told to exit through their
    queues: if an exception kept the iterator alive until interpreter exit, multiprocessing's exit handler would
    send them SIGTERM and wait for them forever.
    """
    shutdown = getattr(loader_iter, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()


class _ImageBlocks(Dataset):
    """The images of a ``SceneClassDataset`` as served, in blocks of ``block_size`` consecutive observations:
    item b is float32 (n, s, s, 3) of observations b·block_size onwards. What DataLoader workers return when
    ``DeviceRays`` decodes a dataset: one tensor per block crosses to the main process, not seven per view."""

    def __init__(self, dataset, block_size):
        self.dataset, self.block_size = dataset, block_size

    def __len__(self):
        return -(-len(self.dataset) // self.block_size)

    def __getitem__(self, b):
        views = range(b * self.block_size, min((b + 1) * self.block_size, len(self.dataset)))
        return torch.from_numpy(np.stack([self.dataset.rgb(i) for i in views]))


class DeviceRays:
    """``RandomRays`` batches drawn on the training device from the whole dataset held there.

    A DataLoader builds a ``--rays_per_view`` batch view by view on the host (decode, crop, draw pixels,
    collate, copy); with many views a step, that costs more than the GPU's step. Here every observation of
    the current side length is decoded once (``set_img_sidelength``) into device tensors, and a batch is a
    few gathers on the device that never wait for the host. Images are kept in float16 (2 bytes per value;
    the rounding, < 5e-4, is a sixteenth of an 8-bit image's quantisation step).

    ``batches(keys, batch_size)`` takes the keys of ``train.EpochSampler`` (keyed): view ``key % len``, and
    the pixels of a batch are drawn by a generator seeded from (``seed``, its first key), so the draws are a
    function of the data order alone and a resumed run sees the same batches. They differ from
    ``RandomRays``' draws (one generator per batch instead of per view), not in distribution: N distinct
    pixels of each view, uniformly, in increasing pixel order.

    :param dataset: a ``SceneClassDataset`` with ``samples_per_instance=1``
    :param rays_per_view: N pixels per view (all of them when N >= the view's pixel count)
    :param device: where the tensors live and the batches are drawn
    :param num_workers: DataLoader workers that decode the images when the tensors are (re)built
    :param worker_init_fn: passed to that DataLoader
    """

    block_size = 64  # views per DataLoader item when decoding

    def __init__(self, dataset, rays_per_view, device, seed=0, num_workers=0, worker_init_fn=None):
        if rays_per_view < 1:
            raise ValueError(f"rays_per_view must be >= 1, got {rays_per_view}")
        self.dataset, self.rays_per_view, self.seed = dataset, rays_per_view, seed
        self.device, self.num_workers, self.worker_init_fn = torch.device(device), num_workers, worker_init_fn
        self.tensors = None

    def __len__(self):
        return len(self.dataset)

    @staticmethod
    def nbytes(num_views, sidelength):
        """Device memory the tensors of ``num_views`` views at ``sidelength`` take (the images dominate)."""
        return num_views * (sidelength ** 2 * 3 * 2 + 2 * 16 * 4 + 8)

    def set_img_sidelength(self, new_img_sidelength):
        """Decode every observation at the new side length into device tensors (the old ones are freed first)."""
        self.dataset.set_img_sidelength(new_img_sidelength)
        self.tensors = None
        if not len(self):
            raise ValueError(f"{self.dataset.root_dir}: no observations to draw rays from")
        tensors = {key: value.to(self.device) for key, value in self.dataset.observation_fields().items()}
        blocks = _ImageBlocks(self.dataset, self.block_size)
        loader = torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=self.num_workers,
                                             worker_init_fn=self.worker_init_fn if self.num_workers else None,
                                             generator=torch.Generator())  # leaves the global RNG untouched
        rgb, views = None, iter(loader)
        try:
            for b, images in enumerate(views):  # (n, s, s, 3) float32, in order
                if rgb is None:
                    side = images.shape[1]
                    rgb = torch.empty(len(self), side * side, 3, dtype=torch.float16, device=self.device)
                    tensors['uv'] = _uv(side).to(self.device)
                start = b * blocks.block_size
                rgb[start:start + len(images)] = images.flatten(1, 2).to(self.device)
        finally:  # also on a corrupt image: workers that ignore SIGTERM would otherwise hang the exit
            shutdown_workers(views)
        tensors['rgb'] = rgb
        self.tensors = tensors

    def batch(self, keys, first_key):
        """One batch: (observation dict, ground-truth dict) on the device.

        :param keys: (B,) int64 keys on the device
        :param first_key: the first of them as a Python int (seeds the pixel draw without a host sync)
        """
        t = self.tensors
        views = keys % len(self)  # (B,)
        num_pixels = t['rgb'].shape[1]
        if self.rays_per_view >= num_pixels:
            pixels = torch.arange(num_pixels, device=self.device).expand(len(keys), -1)  # (B, P)
        else:  # N distinct pixels per view: the N largest of P uniform scores
            generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + int(first_key))
            scores = torch.rand(len(keys), num_pixels, generator=generator, device=self.device)
            pixels = scores.topk(self.rays_per_view, dim=1, sorted=False).indices.sort(dim=1).values  # (B, N)
        rgb = t['rgb'][views[:, None], pixels].float()  # (B, N, 3)
        observations = {'instance_idx': t['instance_idx'][views], 'rgb': rgb, 'pose': t['pose'][views],
                        'uv': t['uv'][pixels], 'param': t['param'][views], 'intrinsics': t['intrinsics'][views]}
        return observations, {'rgb': rgb}

    def batches(self, keys, batch_size):
        """The batches of an epoch: ``keys`` (an EpochSampler, keyed) in consecutive groups of ``batch_size``,
        the last partial group dropped. The keys cross to the device once, from pinned memory, asynchronously."""
        keys = list(keys)
        num_batches = len(keys) // batch_size
        if num_batches == 0:
            return
        host = torch.tensor(keys[:num_batches * batch_size], dtype=torch.int64)
        if self.device.type == 'cuda':
            host = host.pin_memory()
        on_device = host.to(self.device, non_blocking=True)
        for b in range(num_batches):
            yield self.batch(on_device[b * batch_size:(b + 1) * batch_size], keys[b * batch_size])
