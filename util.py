"""Small shared helpers: checkpoints, folders, image conversion.

Checkpoints keep the reference's format, ``{'model': state_dict, 'optimizer': Adam state}``, and may
carry more (``step``, ``stage``, ``epoch``, ``config``) so that a run resumes exactly. They are written
atomically (a temporary file in the same folder, then a rename), so an interrupted save never leaves a
truncated checkpoint behind.
"""
import os
import pathlib
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


def atomic_torch_save(obj, path):
    """torch.save to a temporary file beside ``path``, then rename it into place."""
    path = pathlib.Path(path)
    cond_mkdir(path.parent)
    fd, tmp_path = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


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
    except Exception as error:  # truncated file, not a torch file, ...
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({error})") from error
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

    :return: the checkpoint dict (with ``path``), for resuming step, stage and config
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
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
    """[-1, 1] float image (H, W, C) or tensor -> uint8, round((x + 1) / 2 * 255) clipped to [0, 255]."""
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    image = np.round((np.asarray(image, dtype=np.float64) + 1.) / 2. * 255.)
    return np.clip(image, 0, 255).astype(np.uint8)


def set_tf32(enabled):
    """Let (``True``) or forbid (``False``) TF32 matrix units in float32 matmuls *and* cuDNN convolutions.

    The exact path runs with ``False``: PyTorch forbids TF32 matmuls by default but allows it in cuDNN
    convolutions, which on an H200 moved the U-Net renderer's output by 2.4e-4 from the reference's (1.9e-7 with
    TF32 off). The fast path (``train.py --fast``) sets ``True``. Process-wide; a no-op without CUDA.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_model(model, activation_memory_budget=0.5, mode=None):
    """``torch.compile`` with activation recomputation, the fast path's compiler settings.

    ``activation_memory_budget`` < 1 lets the compiler recompute cheap activations (LayerNorm, ReLU) in the
    backward pass instead of saving them. Measured on one H100 with the cars-size model at 64 px x 64 (see
    benchmarks/NOTES.md): 0.5 cut peak training memory from 16.8 to 7.7 GiB and the step from 43.5 to 41.2 ms,
    since the saved activations' memory traffic is what bounds SRN training. It is a process-wide setting.
    """
    import torch._functorch.config as functorch_config
    functorch_config.activation_memory_budget = activation_memory_budget
    return torch.compile(model, mode=mode)
