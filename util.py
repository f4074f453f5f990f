"""Small shared helpers: checkpoints, run folders, image conversion.

Checkpoints keep the reference's format, ``{'model': state_dict, 'optimizer': Adam state}``, and may
carry more (``step``, ``stage``, ``epoch``, ``config``) so that a run resumes exactly. They are written
atomically (a temporary file in the same folder, then a rename), so an interrupted save never leaves a
truncated checkpoint behind; a failed write (a full disk) says so in one line and removes its temporary
file, and the temporary files of a killed process are removed at the next start
(``remove_stale_temporaries``). They are read with ``weights_only=True``: a checkpoint can hold tensors
and plain containers, never code.

A run folder (``--logging_root``) is used by one process at a time: ``RunLock`` holds an advisory lock
on it that the kernel releases when the process ends, however it ends (SIGKILL included).
"""
import errno
import os
import pathlib
import re
import shutil
import tempfile

import configargparse
import numpy as np
import torch

LATENT_CODES_KEY = 'latent_codes.weight'
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel, torch.compile


class ConfigFileParser(configargparse.DefaultConfigFileParser):
    """ConfigArgParse's ``key: value`` config files, except that an empty value leaves the option unset.

    ConfigArgParse passes ``checkpoint:`` on as '' and ``checkpoint:   # comment`` as the comment text;
    the reference's shipped test configs rely on such lines meaning "no value" (SPEC section 6).
    Used by train.py and test.py.
    """

    def parse(self, stream):
        items = super().parse(stream)
        return type(items)((key, value) for key, value in items.items()
                           if not (isinstance(value, str) and (not value.strip() or value.strip().startswith('#'))))


def cond_mkdir(path):
    """Create ``path`` (and its parents) if it does not exist."""
    os.makedirs(path, exist_ok=True)


def ensure_writable_folder(folder):
    """Create ``folder`` if needed and check that a file can be written in it (OSError if not), before a run
    writes anything there."""
    cond_mkdir(folder)
    probe = pathlib.Path(folder) / f'.write_test_{os.getpid()}'
    probe.write_text('')
    probe.unlink()


def unwrap_model(model):
    """The plain SRNsModel inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, 'module'):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict):
    """Remove ``module.`` / ``_orig_mod.`` key prefixes left by DDP or torch.compile."""
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        stripped[key] = value
    return stripped


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only or vanished folder); nothing was replaced."""


TEMPORARY_SUFFIX = '.tmp'


def _write_failure_reason(error, folder, partial):
    """Why a checkpoint write failed, in words: the OS error, or for torch's own writer, the free space."""
    code = getattr(error, 'errno', None)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] ... unexpected pos"
    # without the OS error: a full disk is what leaves no room at that moment.
    if code == errno.ENOSPC or (code is None and free is not None and free < 2 ** 20):
        written = f"; the checkpoint had reached {partial / 2 ** 20:.1f} MiB" if partial else ''
        return f"No space left on device ({(free or 0) / 2 ** 20:.1f} MiB free in {folder}{written})"
    if code:
        return os.strerror(code)
    return f"write failed ({str(error).strip().splitlines()[0]})"


def atomic_torch_save(obj, path):
    """torch.save to a temporary file beside ``path``, then rename it into place.

    Any failure removes the temporary file and leaves an existing ``path`` untouched. Failures to write
    (torch reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] ...``) become a
    ``CheckpointWriteError`` that names the file and says why (with the free space for a full disk).
    """
    path = pathlib.Path(path)
    tmp_path = None
    try:
        cond_mkdir(path.parent)
        fd, tmp_path = tempfile.mkstemp(prefix=path.name + '.', suffix=TEMPORARY_SUFFIX, dir=path.parent)
        with os.fdopen(fd, 'wb') as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
        tmp_path = None
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and 'inline_container' not in str(error) and 'write' not in str(error):
            raise  # not an I/O failure
        partial = os.path.getsize(tmp_path) if tmp_path is not None and os.path.exists(tmp_path) else 0
        reason = _write_failure_reason(error, path.parent, partial)
        raise CheckpointWriteError(f"{path}: could not write the checkpoint: {reason}") from None
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


def remove_stale_temporaries(folder):
    """Delete the temporary checkpoint files (``*.pth.*.tmp``) a killed process left in ``folder``.

    Only call this while holding the folder's ``RunLock``: a running process's temporary file is not stale.
    :return: the paths removed
    """
    removed = []
    for tmp in pathlib.Path(folder).glob('*.pth.*' + TEMPORARY_SUFFIX):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive advisory lock on a run folder (``<folder>/.lock``), held while the process lives.

    ``flock`` locks belong to the open file: the kernel drops them when the process exits or is killed,
    so a crashed or SIGKILLed run never leaves a stale lock behind. The file records the holder's pid
    and command for the error message. Where ``fcntl`` is missing (Windows) the lock is a no-op.
    """

    def __init__(self, folder, what='train.py'):
        self.path = pathlib.Path(folder) / '.lock'
        self.what = what
        self.file = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:
            return self
        cond_mkdir(self.path.parent)
        file = open(self.path, 'a+')
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                file.close()
                raise
            file.seek(0)
            holder = file.read().strip() or 'another process'
            file.close()
            raise RunLockedError(f"{self.path.parent}: in use by {holder}; two runs in one folder would "
                                 f"overwrite each other's checkpoints. Wait for it to finish (or stop it), or "
                                 f"choose another --logging_root") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} ({self.what})\n")
        file.flush()
        self.file = file
        return self

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the file drops the flock
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def save_checkpoint(path, model, optimizer=None, **extra):
    """Write ``{'model', 'optimizer', **extra}`` atomically; keys are saved without wrapper prefixes."""
    checkpoint = {'model': unwrap_model(model).state_dict()}
    if optimizer is not None:
        checkpoint['optimizer'] = optimizer.state_dict()
    checkpoint.update(extra)
    atomic_torch_save(checkpoint, path)


def resolve_checkpoint_path(path):
    """A checkpoint file, or the last ``*.pth`` by name in a folder (as the reference does)."""
    path = pathlib.Path(path)
    if path.is_dir():
        candidates = sorted(path.glob('*.pth'))
        if not candidates:
            raise FileNotFoundError(f"{path}: no *.pth checkpoint in this folder")
        return candidates[-1]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return path


def read_checkpoint(path, map_location='cpu'):
    """Load a checkpoint dict from a file or folder. A bare state dict is wrapped as ``{'model': ...}``."""
    path = resolve_checkpoint_path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, not a torch file, pickled code, ...
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({_load_error_reason(error)})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict with a 'model' entry, got {type(checkpoint).__name__}")
    if 'model' not in checkpoint:
        if checkpoint and all(torch.is_tensor(value) for value in checkpoint.values()):
            checkpoint = {'model': checkpoint}
        else:
            raise ValueError(f"{path}: no 'model' entry in this checkpoint (keys: {sorted(checkpoint)})")
    checkpoint['model'] = strip_wrapper_prefixes(checkpoint['model'])
    checkpoint['path'] = str(path)
    return checkpoint


def _load_error_reason(error):
    """One line on why torch.load failed; torch's own message spans many lines."""
    text = str(error)
    unsupported = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if unsupported:
        return (f"it holds a pickled object ({unsupported.group(1)}), not only tensors; loading it could run "
                f"code, so it is refused")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'unreadable'}"


def num_latent_codes(checkpoint):
    """Number of latent codes stored in a checkpoint dict (None for a single-scene model)."""
    codes = checkpoint['model'].get(LATENT_CODES_KEY)
    return None if codes is None else int(codes.shape[0])


def load_checkpoint(path, model, optimizer=None, overwrite_embeddings=False, map_location='cpu'):
    """Load a checkpoint into ``model`` (and ``optimizer``), the reference's way, with clear errors.

    The stored entries are merged into the model's own state and loaded strictly. With
    ``overwrite_embeddings`` the latent codes are dropped first, so a model with a different number of
    scenes can be fitted from the trained networks. Keys the model does not have, and entries whose
    shape differs, raise a ValueError that names them and the file.

    :param path: a file, a folder (its last ``*.pth``), or a checkpoint dict already read by ``read_checkpoint``
    :return: the checkpoint dict (with ``path``), for resuming step, stage and config
    """
    checkpoint = path if isinstance(path, dict) else read_checkpoint(path, map_location=map_location)
    stored = dict(checkpoint['model'])
    if overwrite_embeddings:
        stored.pop(LATENT_CODES_KEY, None)

    model = unwrap_model(model)
    state = model.state_dict()
    unexpected = sorted(key for key in stored if key not in state)
    mismatched = sorted(key for key in stored if key in state and tuple(stored[key].shape) != tuple(state[key].shape))
    if unexpected or mismatched:
        lines = [f"{checkpoint['path']}: checkpoint does not fit the model"]
        if LATENT_CODES_KEY in mismatched:
            lines.append(f"  it holds {stored[LATENT_CODES_KEY].shape[0]} latent codes of size "
                         f"{stored[LATENT_CODES_KEY].shape[1]}, the model {state[LATENT_CODES_KEY].shape[0]} of size "
                         f"{state[LATENT_CODES_KEY].shape[1]}: set the number of instances (and --embedding_size) "
                         f"to match, or drop the codes with --overwrite_embeddings")
        for key in mismatched:
            lines.append(f"  shape mismatch {key}: checkpoint {tuple(stored[key].shape)}, model {tuple(state[key].shape)}")
        if unexpected:
            shown = ', '.join(unexpected[:8]) + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 8 else '')
            lines.append(f"  keys the model does not have: {shown} (a model of another kind: single-scene, "
                         f"U-Net renderer, hypernetwork?)")
        raise ValueError('\n'.join(lines))
    state.update(stored)
    model.load_state_dict(state, strict=True)

    if optimizer is not None and 'optimizer' in checkpoint:
        try:
            optimizer.load_state_dict(checkpoint['optimizer'])
        except ValueError as error:
            raise ValueError(f"{checkpoint['path']}: optimizer state does not fit ({error})") from error
    return checkpoint


def to_uint8_image(image):
    """[-1, 1] float image (H, W, C) or tensor -> uint8, round((x + 1) / 2 * 255) clipped to [0, 255].
    NaN (a diverged model's output) comes out black, +-inf as the end of the range it lies past."""
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    image = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=-1., posinf=1., neginf=-1.)
    return np.clip(np.round((image + 1.) / 2. * 255.), 0, 255).astype(np.uint8)


# Anchors of the perceptually uniform 'viridis' colour map (near = dark purple, far = yellow).
_VIRIDIS = np.array([[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
                     [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]], dtype=np.float64) / 255.


def viridis(t):
    """Values in [0, 1] (any shape) -> RGB in [0, 1] (shape + (3,)), linear between the colour map's anchors."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0., 1.) * (len(_VIRIDIS) - 1)
    low = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (t - low)[..., None]
    return _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac


def foreground_mask(rgb, threshold=0.05):
    """(..., N, 3) colours in [-1, 1] -> (..., N) bool: not the white background (some channel darker than
    1 - threshold in [0, 1])."""
    return ((rgb + 1.) / 2. < 1. - threshold).any(dim=-1)


def colorize_depth(depth, foreground, colorbar=True):
    """(s, s) depth -> uint8 preview: viridis over the foreground's depth range, white background, and a
    colour bar on the right labelled with the near and far depths (scene units of camera z).

    :param foreground: (s, s) bool, the object's pixels; the rest is painted white, and foreground pixels
        whose depth is not finite (a diverged model's) black, outside the depth range
    :return: (s, s, 3), or (s, s + bar, 3) with the colour bar
    """
    depth, foreground = np.asarray(depth, dtype=np.float64), np.asarray(foreground, dtype=bool)
    image = np.ones(depth.shape + (3,))
    finite = np.isfinite(depth)
    image[foreground & ~finite] = 0.
    foreground = foreground & finite
    near = far = None
    if foreground.any():
        near, far = np.percentile(depth[foreground], 1), np.percentile(depth[foreground], 99)
        image[foreground] = viridis((depth[foreground] - near) / max(far - near, 1e-8))
    image = np.round(image * 255).astype(np.uint8)
    return _with_colorbar(image, near, far) if colorbar else image


def _with_colorbar(image, near, far, min_height=128):
    """Append a vertical viridis bar (near at the top, far at the bottom) labelled with the two depths.

    Small images are enlarged by an integer factor (nearest neighbour) to ``min_height`` first, so that the
    labels, in Pillow's built-in 11-pixel font, stay legible beside them.
    """
    from PIL import Image, ImageDraw
    side = image.shape[0]
    zoom = -(-min_height // side)
    height = side * zoom
    left = Image.fromarray(image).resize((image.shape[1] * zoom, height), Image.NEAREST)
    bar_width, label_width, margin = max(6, height // 16), 46, 8
    canvas = Image.new('RGB', (left.width + bar_width + label_width + 4, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    ramp = viridis(np.linspace(0., 1., height - 2 * margin))[:, None].repeat(bar_width, axis=1)  # (h, w, 3)
    canvas.paste(Image.fromarray(np.round(ramp * 255).astype(np.uint8)), (left.width + 2, margin))
    labels = (f"{near:.3g}", f"{far:.3g}") if near is not None else ("no", "object")
    draw = ImageDraw.Draw(canvas)
    x = left.width + bar_width + 5
    draw.text((x, margin - 5), labels[0], fill=(0, 0, 0))
    draw.text((x, height - margin - 6), labels[1], fill=(0, 0, 0))
    return np.asarray(canvas)


def run_command(main, name, argv=None):
    """Run a command line's ``main(argv)`` and give ``sys.exit`` its outcome: main's exit status (0 if none);
    for a user error (ValueError, OSError: a bad file, a full disk, a read-only folder; a locked run folder) the
    one line ``<name>: error: ...``, which ``sys.exit`` prints to stderr with status 1; 130 for Ctrl-C. Never
    a traceback for those. Usage: ``sys.exit(util.run_command(main, 'test.py'))``."""
    try:
        status = main(argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RunLockedError) as error:
        return f"{name}: error: {error}"
    return status if isinstance(status, int) else 0


def set_tf32(enabled):
    """Let (``True``) or forbid (``False``) TF32 matrix units in float32 matmuls *and* cuDNN convolutions.

    The exact path runs with ``False``: PyTorch forbids TF32 matmuls by default but allows it in cuDNN
    convolutions, which on an H200 moved the U-Net renderer's output by 2.4e-4 from the reference's (1.9e-7 with
    TF32 off). The fast path (``train.py --fast``) sets ``True``. Process-wide; a no-op without CUDA.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def autocast(device_type, amp_dtype=None):
    """``torch.autocast`` to ``amp_dtype`` on ``device_type``, or a disabled one (float32) for ``None``."""
    return torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


KERNEL_CHOICES = ('torch', 'render', 'triton')
KERNELS_HELP = ('phi under --amp bf16 / --fast: on the fused Triton kernels of kernels.py where no gradients are '
                'taken (rendering, validation) and on PyTorch layers where they are (training, fitting): render, '
                'the default, which keeps to the PyTorch layers where the kernels cannot run (the CPU, float32, '
                'GPUs of compute capability below 8.0); on the kernels for gradients too: triton; on PyTorch layers '
                'everywhere: torch '
                '(benchmarks/NOTES.md)')


def fused_kernels_mode(choice, amp, device):
    """``--kernels`` (torch, render or triton) -> the model's switch (``SRNsModel.use_fused_kernels``): False,
    'render' or True. The kernels only ever serve bf16 autocast on a CUDA device with Triton: where they cannot
    run, ``render`` gives False, and ``triton`` is refused (ValueError)."""
    if choice == 'torch':
        return False
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"--kernels {choice}: expected one of {', '.join(KERNEL_CHOICES)}")
    if choice == 'render' and (amp != 'bf16' or device.type != 'cuda'):
        return False
    import kernels  # only here: importing Triton costs seconds
    if choice == 'render':
        return 'render' if kernels.available(device) else False
    if amp != 'bf16':
        raise ValueError("--kernels triton: the fused kernels serve the mixed-precision path; add --fast or --amp "
                         "bf16 (the float32 path is the reference's and stays on PyTorch)")
    if device.type != 'cuda' or not kernels.available(device):
        here = f'device {device}'
        if device.type == 'cuda' and torch.cuda.is_available():
            here += ', compute capability {}.{}'.format(*torch.cuda.get_device_capability(device))
        needs = '{}.{}'.format(*kernels.MIN_CAPABILITY)
        raise ValueError(f"--kernels triton: the fused kernels need Triton and a CUDA device of compute capability "
                         f"{needs} or later ({here}, Triton {'installed' if kernels.triton else 'not installed'}); "
                         "use --kernels render or torch")
    return True


def compile_model(model, activation_memory_budget=0.5, mode=None):
    """``torch.compile`` with activation recomputation, the fast path's compiler settings.

    ``activation_memory_budget`` < 1 lets the compiler recompute cheap activations (LayerNorm, ReLU) in the
    backward pass instead of saving them. Measured on one H100 with the cars-size model at 64 px x 64 (see
    benchmarks/NOTES.md): 0.5 cut peak training memory from 16.8 to 7.7 GiB and the step from 43.5 to 41.2 ms,
    since the saved activations' memory traffic is what bounds SRN training. It is a process-wide setting.
    """
    import torch._functorch.config as functorch_config
    functorch_config.activation_memory_budget = activation_memory_budget
    allow_compile_cache()
    return torch.compile(model, mode=mode)


# The two autocast calls the model's float32 regions (geometry, the step length, phi's input layer) trace to.
AUTOCAST_CALLS = ('torch.amp.autocast_mode._enter_autocast', 'torch.amp.autocast_mode._exit_autocast')


def allow_compile_cache():
    """Let torch.compile's on-disk cache hold the whole compiled training step, so a second start skips tracing.

    Out of the box AOT autograd's cache passes over graphs that call functions outside its allowlist, and the
    SRN step has two kinds: the ``torch.autocast(enabled=False)`` regions that keep geometry in float32 under
    bf16, and ``custom_layers.ClampGrad`` (a custom autograd function). Both are pure, and the graph that holds
    them, arguments and backward body included, is the cache key, so they are marked cacheable. Measured on the
    CPU (full-size model, second start): first step 23.8 -> 7.7 s. Process-wide; a no-op on PyTorch versions
    without these settings.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    if hasattr(functorch_config, 'autograd_cache_allow_custom_autograd_functions'):
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    if hasattr(inductor_config, 'unsafe_marked_cacheable_functions'):
        inductor_config.unsafe_marked_cacheable_functions = {
            **inductor_config.unsafe_marked_cacheable_functions, **{name: torch.__version__ for name in AUTOCAST_CALLS}}
