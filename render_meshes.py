"""Render SRN-format datasets from your own meshes, headless, with no Blender.

The published SRN datasets (paper section 4: ShapeNet cars and chairs) were rendered with a separate
Blender script. This module renders the same format from a folder of meshes -- OBJ with MTL and
textures, GLB/GLTF, PLY, or a ShapeNetCore category folder as it is
(``<synset>/<model_id>/models/model_normalized.obj``) -- on the CPU, or faster on a GPU, with a
rasteriser written in PyTorch (no OpenGL, no display). Meshes are read with ``trimesh``.

One instance per mesh (SPEC section 5)::

    <output_dir>/<split>/<instance>/rgb/%06d.png      8-bit RGB, white background, no alpha
    <output_dir>/<split>/<instance>/depth/%06d.png    16-bit, round(camera z * 1000), 0 = background
    <output_dir>/<split>/<instance>/pose/%06d.txt     cam2world (OpenCV), one line of 16 numbers
    <output_dir>/<split>/<instance>/intrinsics.txt    "f cx cy 0." / "0. 0. 0." / "1." / "s s"

Conventions of the published datasets and of our Shepard-Metzler generator:
- side ``s`` = 128 by default, focal f = 525/512 * s, principal point (s/2, s/2), pixel (x, y) sampled at
  its integer coordinates (SPEC section 4: no half-pixel offset);
- the world is z-up. A mesh is first turned z-up (``up='y'`` rotates +y onto +z: ShapeNet, glTF and most
  OBJ exporters are y-up), then its bounding box is centred at the origin and it is scaled so that the
  box's diagonal is 1 -- the normalisation of ShapeNetCore v2's ``model_normalized.obj``, which therefore
  passes through unchanged (up to its own rounding). The object then lies inside a sphere of radius 0.5;
- cameras look at the origin from ``radius`` (default 1.3: that sphere spans 45 of the 52 degrees of the
  field of view), built by ``geometry.look_at`` with world up +z; training views uniform on the sphere,
  test views on an Archimedean spiral over the upper hemisphere (``geometry.spiral_positions``);
- a fixed light rig in world space (ambient plus three directional lights, Lambertian), so an object's
  colours do not change with the viewpoint -- the multi-view consistency that SRNs assume. Surfaces are
  two-sided (ShapeNet meshes have inconsistent winding); normals are smoothed across edges sharper than
  ``crease_angle`` degrees apart, as Blender's auto-smooth;
- colour is computed in linear RGB and encoded to sRGB in the PNGs, as Blender does. glTF's
  baseColorFactor and vertex colours and OBJ's ``Kd`` are linear, textures and 8-bit vertex colours of
  other formats (PLY) are sRGB (details at "Colour" below). A mesh without colours or materials of its
  own -- also one with UV coordinates but no material -- gets ``DEFAULT_ALBEDO``, linear 0.7 (sRGB 218);
- anti-aliasing by ``supersample`` x ``supersample`` samples per pixel, averaged (area filter); depth is
  the sample at the pixel's own coordinates (``supersample`` is odd), so it is exact, not blended.

Splits: ``by_instance`` puts each mesh in one of train/val/test (seeded, fractions ``val_fraction`` and
``test_fraction``); train instances get ``num_train_views`` sphere views, val and test instances
``num_test_views`` spiral views. ``by_view`` renders every mesh into all three splits: sphere views for
train, other sphere views (``num_val_views``) for val, the spiral for test.

Views are a function of (seed, split, instance name) only, so an interrupted run resumes: frames whose
rgb, depth and pose files exist are skipped (the pose is written last), and a mesh whose frames all
exist is not even loaded. A mesh that cannot be read or rendered is reported, the others go on, and
``main`` exits non-zero after a summary. Texture and material files are looked for as other tools write
their names (``find_asset``: MTL options, Windows paths, letter case, absolute paths from elsewhere); a
mesh rendered without one it names (not found, or not decodable) is listed in the summary as a warning.

Shape vocabulary here: ``V`` vertices, ``F`` triangles, ``P`` covered pixels (samples), ``K`` fragments
(candidate pixel-triangle pairs), ``s`` side length, ``S = s * supersample``.
"""
import argparse
import dataclasses
import fnmatch
import json
import math
import os
import pathlib
import re
import struct
import sys
import urllib.parse
import zlib

import numpy as np
import torch

import data_util
import geometry
import util

# The published SRN datasets: 128 px with f = 131.25 = 525/512 * 128 (SPEC section 5).
FOCAL_PER_SIDE = 525.0 / 512.0
DEFAULT_RADIUS = 1.3
DEFAULT_PATTERNS = ('*.obj', '*.glb', '*.gltf', '*.ply')
SPLITS = ('train', 'val', 'test')

# Fixed light rig, world space (z-up): direction *towards* the light and intensity. Ambient plus a key
# light from above, a fill from the opposite side and a weak light from below, so that no side of an
# object seen from anywhere on the sphere is black. In linear RGB (see "Colour" below):
# colour = albedo * min(1, ambient + sum I max(0, n.l)).
AMBIENT = 0.35
LIGHTS = ((( 0.4, -0.5, 0.77), 0.55),
          ((-0.6,  0.6, 0.3), 0.30),
          (( 0.2,  0.4, -0.9), 0.15))
DEFAULT_ALBEDO = (0.7, 0.7, 0.7)  # linear albedo of meshes without colours or materials of their own

_MAX_FRAGMENTS = 1 << 21  # fragments rasterised per chunk: bounds memory at about 150 MB


# --- Colour --------------------------------------------------------------------------------------
#
# The renderer works in linear RGB -- texture filtering, lighting and the anti-aliasing average -- and
# encodes the result to sRGB for the PNGs, as Blender's Cycles does with its "Standard" view transform.
# What a colour read from a file means follows the glTF 2.0 specification and Blender's importers:
# - glTF baseColorFactor and COLOR_0 vertex colours are linear;
# - OBJ/MTL Kd is linear: Blender's OBJ importer uses it as the Base Color as it is;
# - texture images (map_Kd, baseColorTexture) are sRGB-encoded, decoded to linear before use; a glTF
#   texture is then multiplied by the linear baseColorFactor;
# - 8-bit vertex and face colours of PLY, OBJ and other formats are display values (sRGB), like texels.

def srgb_to_linear(values):
    """sRGB-encoded values in [0, 1] to linear ones (IEC 61966-2-1), numpy."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(values):
    """Linear values in [0, 1] (a torch tensor) to sRGB-encoded ones (IEC 61966-2-1)."""
    values = values.clamp(0.0, 1.0)
    return torch.where(values <= 0.0031308, values * 12.92, 1.055 * values ** (1 / 2.4) - 0.055)


_SRGB8_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)  # decoding table of 8-bit values


def _unit_range(values):
    """Colour values as stored (floats in [0, 1], or integers scaled to their type's range) to floats."""
    values = np.asarray(values)
    if values.dtype.kind in 'ui':
        return values.astype(np.float64) / np.iinfo(values.dtype).max
    return np.clip(values.astype(np.float64), 0.0, 1.0)


def _texture_linear(image):
    """A PIL image (any mode; sRGB-encoded, as colour textures are) to (H, W, 3) float32 linear RGB."""
    return _SRGB8_TO_LINEAR[np.asarray(image.convert('RGB'), dtype=np.uint8)]


def _gltf_base_color_factors(path):
    """[(material name, (3,) float64 baseColorFactor)] as written in a .gltf or .glb file, else [].

    trimesh keeps baseColorFactor rounded to 8 bits, too coarse for a linear value: a dark factor would
    be off by several levels once encoded to sRGB. Reading the numbers back from the file's JSON gives
    them exactly; ``_exact_gltf_factor`` matches them to trimesh's materials.
    """
    path = pathlib.Path(path)
    try:
        with open(path, 'rb') as file:
            if path.suffix.lower() == '.glb':
                magic, _, _, chunk_length, chunk_type = struct.unpack('<4sIIII', file.read(20))
                if magic != b'glTF' or chunk_type != 0x4E4F534A:  # the first chunk must be JSON
                    return []
                header = json.loads(file.read(chunk_length))
            elif path.suffix.lower() == '.gltf':
                header = json.loads(file.read())
            else:
                return []
    except (OSError, ValueError, struct.error):  # trimesh reports unreadable files; this is a refinement
        return []
    factors = []
    for material in header.get('materials', []):
        factor = material.get('pbrMetallicRoughness', {}).get('baseColorFactor')
        if factor is not None and len(factor) >= 3:
            factors.append((material.get('name'), np.asarray(factor[:3], np.float64)))
    return factors


def _exact_gltf_factor(rounded, name, exact_factors):
    """The file's exact baseColorFactor for trimesh's 8-bit one (RGBA uint8), when unambiguous."""
    rounded = np.asarray(rounded[:3], np.float64)
    candidates = [(other, factor) for other, factor in exact_factors
                  if np.array_equal(np.round(np.clip(factor, 0, 1) * 255), rounded)]
    same_name = [factor for other, factor in candidates if other == name]
    values = {tuple(factor) for factor in (same_name or [factor for _, factor in candidates])}
    if len(values) == 1:
        return np.clip(np.array(values.pop()), 0.0, 1.0)
    return rounded / 255.0


def _is_stand_in(material):
    """Whether ``material`` is the placeholder trimesh gives a mesh that has UV coordinates but no
    material (a tiny grey texture made up in memory): such a mesh has no colour of its own."""
    import trimesh
    image = getattr(material, 'image', None)
    if (not isinstance(material, trimesh.visual.material.SimpleMaterial) or image is None
            or 'kd' in (getattr(material, 'kwargs', None) or {}) or image.info.get('file_path')):
        return False
    make_image = getattr(trimesh.visual.material, 'color_image', None)  # absent in older trimesh
    reference = make_image() if make_image is not None else trimesh.visual.material.empty_material().image
    return (reference is not None and image.size == reference.size and image.mode == reference.mode
            and image.tobytes() == reference.tobytes())


# --- Files that meshes name ----------------------------------------------------------------------
#
# MTL and glTF files name their textures as their authors' tools wrote them: with MTL options in front
# ('-s 1 1 1 tex.jpg'), with Windows separators ('.\textures\tex.jpg'), in another letter case than the
# file on disk, or as absolute paths on the author's machine. Blender loads the Windows-style ones; this
# module finds all of these.

_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tga', '.tif', '.tiff', '.gif', '.webp')
# MTL map statement options ('map_Kd [-option values ...] file') and their number of values;
# -o, -s and -t take one to three numbers.
_MAP_OPTIONS = {'-blendu': 1, '-blendv': 1, '-bm': 1, '-boost': 1, '-cc': 1, '-clamp': 1,
                '-imfchan': 1, '-mm': 2, '-o': 3, '-s': 3, '-t': 3, '-texres': 1, '-type': 1}


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_map_statement(text):
    """Split the argument of an MTL map statement into its file name and options.

    '-s 2 2 1 -bm 0.5 my tex.png' -> ('my tex.png', {'-s': ['2', '2', '1'], '-bm': ['0.5']}). The
    file name is the rest of the line after the options, so it may contain spaces.
    """
    tokens = list(re.finditer(r'\S+', text))
    options, index = {}, 0
    # The last token is always the file name, even if it looks like an option.
    while index < len(tokens) - 1 and tokens[index].group().lower() in _MAP_OPTIONS:
        key = tokens[index].group().lower()
        index += 1
        values = []
        while (len(values) < _MAP_OPTIONS[key] and index < len(tokens) - 1
               and (key not in ('-o', '-s', '-t') or _is_number(tokens[index].group()))):
            values.append(tokens[index].group())
            index += 1
        options[key] = values
    return (text[tokens[index].start():].strip() if tokens else ''), options


def _case_insensitive(folder, relative):
    """The existing file that the relative POSIX path ``relative`` names below ``folder`` when letter
    case is ignored (files made on Windows or macOS), else None. Exact matches are preferred."""
    path = pathlib.Path(folder)
    for part in pathlib.PurePosixPath(relative).parts:
        if part in ('.', '..') or (path / part).exists():
            path = path / part
            continue
        try:
            matches = sorted(entry for entry in os.listdir(path) if entry.lower() == part.lower())
        except OSError:  # not a folder
            return None
        if not matches:
            return None
        path = path / matches[0]
    return path if path.is_file() else None


def find_asset(folder, name):
    """The file that ``name`` -- a texture, MTL library or glTF buffer as written in a mesh file --
    refers to, looked up from ``folder`` (the mesh's); None if there is none.

    Tried in turn: the name as written; without MTL options, with backslashes as separators and
    %-escapes decoded; the same, ignoring letter case; its last component alone in ``folder`` (an
    absolute path from another machine, 'C:\\Users\\me\\car\\paint.jpg'), also ignoring case.
    """
    folder = pathlib.Path(folder)
    written = name.strip()
    file_name = parse_map_statement(written)[0].replace('\\', '/')
    candidates = list(dict.fromkeys((written, file_name, urllib.parse.unquote(file_name))))
    for candidate in candidates:
        if candidate and (folder / candidate).is_file():  # an absolute candidate replaces folder
            return folder / candidate
    for candidate in candidates:
        if candidate and not pathlib.PurePosixPath(candidate).is_absolute():
            match = _case_insensitive(folder, candidate)
            if match is not None:
                return match
    base = file_name.rsplit('/', 1)[-1]
    if base and (folder / base).is_file():
        return folder / base
    return _case_insensitive(folder, base) if base else None


def _image_problem(data):
    """Why ``data`` is not an image Pillow can open, or None."""
    import io
    from PIL import Image, UnidentifiedImageError
    try:
        Image.open(io.BytesIO(data))
        return None
    except UnidentifiedImageError:
        return "not an image format Pillow reads"
    except Exception as error:  # Pillow raises many types for damaged files
        return f"{type(error).__name__}: {error}"


class _AssetResolver:
    """A trimesh resolver (trimesh calls ``get`` or ``[]`` with the name as written in the file) that
    finds files with ``find_asset`` and records what it could not find or read, for the summary.
    Everything else is delegated to trimesh's own file resolver."""

    def __init__(self, mesh_path, base):
        self._base = base
        self.folder = pathlib.Path(mesh_path).absolute().parent
        self.problems = []  # messages, in the order met

    def __getattr__(self, attribute):  # only called for attributes not found on self
        if attribute.startswith('_'):  # e.g. while copying, before _base exists
            raise AttributeError(attribute)
        return getattr(self._base, attribute)

    def __getitem__(self, name):
        return self.get(name)

    def get(self, name):
        path = find_asset(self.folder, name)
        suffix = pathlib.PurePosixPath(parse_map_statement(name)[0].replace('\\', '/')).suffix.lower()
        kind = ('texture' if suffix in _IMAGE_SUFFIXES else 'material library' if suffix == '.mtl'
                else 'file')
        # Names are quoted as written, backslashes and all, so they can be found in the file.
        if path is None:
            self.problems.append(f"{kind} '{name.strip()}' not found in {self.folder}")
            raise FileNotFoundError(f"{name}: not found in {self.folder}")
        data = path.read_bytes()
        if kind == 'texture':
            problem = _image_problem(data)
            if problem is not None:
                self.problems.append(f"texture '{name.strip()}' ({path}) cannot be read: {problem}")
        return data


# --- Meshes --------------------------------------------------------------------------------------

@dataclasses.dataclass
class MeshData:
    """A triangle soup with its appearance, in the normalised z-up world frame (numpy).

    ``corner_*`` arrays hold one entry per triangle corner, so seams in UVs or colours need no
    duplicated vertices. ``face_texture`` indexes ``textures`` (-1: no texture); a texel colour is
    multiplied by the interpolated corner colour. Colours and texels are linear RGB.
    """
    positions: np.ndarray       # (V, 3) float64
    faces: np.ndarray           # (F, 3) int64
    corner_uv: np.ndarray       # (F, 3, 2) float32, v up (OBJ / trimesh convention)
    corner_color: np.ndarray    # (F, 3, 3) float32 in [0, 1], linear
    face_texture: np.ndarray    # (F,) int64
    textures: list              # of (H, W, 3) float32 in [0, 1], linear
    corner_normal: np.ndarray = None  # (F, 3, 3) float32, unit; set by normalize_mesh
    warnings: list = dataclasses.field(default_factory=list)  # what could not be used, for the summary


@dataclasses.dataclass
class _BaseColor:
    """A material's base colour, linear RGB: ``color`` times the texture where it applies, else ``fallback``."""
    color: np.ndarray           # (3,) the flat colour, or the texture's multiplier
    fallback: np.ndarray        # (3,) the colour used when the texture cannot be (no UVs, unreadable)
    image: object = None        # PIL image of the base colour texture, sRGB-encoded
    uv_scale: tuple = (1.0, 1.0)    # texture coordinates are uv * uv_scale + uv_offset (MTL -s, -o)
    uv_offset: tuple = (0.0, 0.0)


def _uv_transform(options):
    """(scale, offset) of the texture coordinates from MTL map options -s and -o (u, v; w is unused)."""
    def first_two(values, default):
        numbers = [float(value) for value in values[:2]]
        return tuple(numbers + [default] * (2 - len(numbers)))
    return first_two(options.get('-s', []), 1.0), first_two(options.get('-o', []), 0.0)


def _base_color(material, context):
    """The _BaseColor of a trimesh material (PBRMaterial from glTF, SimpleMaterial from OBJ/MTL)."""
    import trimesh
    default = np.asarray(DEFAULT_ALBEDO, np.float64)
    if material is None or _is_stand_in(material):
        return _BaseColor(default, default)
    if isinstance(material, trimesh.visual.material.PBRMaterial):
        # glTF: base colour = factor (linear, default white) * texture (sRGB).
        color = np.ones(3)
        if material.baseColorFactor is not None:
            color = _exact_gltf_factor(material.baseColorFactor, material.name, context.gltf_factors)
        return _BaseColor(color, color, material.baseColorTexture)
    # OBJ/MTL: Blender's importer (which rendered the published datasets) shows map_Kd alone,
    # and Kd only where there is no texture. trimesh rounds Kd to 8 bits in ``diffuse`` but keeps
    # the MTL's numbers in ``kwargs``.
    kd = (getattr(material, 'kwargs', None) or {}).get('kd')
    if kd is not None:
        flat = np.clip(np.resize(np.asarray(kd, np.float64).reshape(-1), 3), 0.0, 1.0)  # 'Kd 0.5' is grey
    elif getattr(material, 'diffuse', None) is not None and not np.array_equal(
            material.diffuse, trimesh.visual.color.DEFAULT_COLOR):
        flat = _unit_range(material.diffuse)[:3]
    else:
        flat = default
    image = getattr(material, 'image', None)
    if image is None:
        return _BaseColor(flat, flat)
    # trimesh keeps the map_Kd statement's argument, options included.
    scale, offset = _uv_transform(parse_map_statement(image.info.get('file_path') or '')[1])
    return _BaseColor(np.ones(3), flat, image, scale, offset)


@dataclasses.dataclass
class _LoadContext:
    """What ``_appearance`` needs to know about the file a part comes from, and the notes it leaves."""
    linear_vertex_colors: bool  # glTF: vertex colours are linear; elsewhere 8-bit display values
    gltf_factors: list          # _gltf_base_color_factors of the file
    warnings: list              # messages for the summary, one entry per problem


def _vertex_colors_linear(colors, context):
    """Stored vertex or face colours (N, 3 or 4) to linear RGB (N, 3)."""
    values = _unit_range(np.asarray(colors)[:, :3])
    return values if context.linear_vertex_colors else srgb_to_linear(values)


def _appearance(mesh, textures, texture_ids, context):
    """Linear corner colours (F, 3, 3), corner UVs (F, 3, 2) and face texture ids (F,) of one
    trimesh.Trimesh; textures it uses are appended to ``textures`` (linear), once per image."""
    import trimesh
    faces = np.asarray(mesh.faces, dtype=np.int64)
    num_faces = len(faces)
    corner_color = np.broadcast_to(np.asarray(DEFAULT_ALBEDO, np.float32), (num_faces, 3, 3)).copy()
    corner_uv = np.zeros((num_faces, 3, 2), np.float32)
    face_texture = np.full(num_faces, -1, np.int64)
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        base = _base_color(visual.material, context)
        color = base.color
        if base.image is not None:
            texture_id = _texture_id(base.image, textures, texture_ids, context)
            uv = visual.uv
            if texture_id is not None and (uv is None or len(uv) != len(mesh.vertices)):
                context.warnings.append(f"texture {_image_name(base.image)} not applied: no UV coordinates")
                texture_id = None
            if texture_id is None:
                color = base.fallback
            else:
                face_texture[:] = texture_id
                uv = np.asarray(uv, np.float64) * base.uv_scale + base.uv_offset
                corner_uv = uv.astype(np.float32)[faces]
        corner_color[:] = color
        # glTF: COLOR_0 multiplies the material's base colour (trimesh keeps it aside when there is one).
        vertex_colors = visual.vertex_attributes.get('color')
        if vertex_colors is not None and len(vertex_colors) == len(mesh.vertices):
            corner_color *= _vertex_colors_linear(vertex_colors, context)[faces].astype(np.float32)
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == 'vertex':
        corner_color = _vertex_colors_linear(visual.vertex_colors, context)[faces].astype(np.float32)
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == 'face':
        colors = _vertex_colors_linear(visual.face_colors, context).astype(np.float32)
        corner_color = np.repeat(colors[:, None, :], 3, axis=1)
    return corner_color, corner_uv, face_texture


def _image_name(image):
    """How to name a texture in a message: its file as the material names it, else '(embedded)'."""
    written = image.info.get('file_path') if hasattr(image, 'info') else None
    return f"'{parse_map_statement(written)[0]}'" if written else '(embedded)'


def _texture_id(image, textures, texture_ids, context):
    """Index of ``image`` in ``textures`` (decoded to linear on first use), or None if it cannot be decoded."""
    key = id(image)
    if key not in texture_ids:
        try:
            textures.append(_texture_linear(image))
            texture_ids[key] = len(textures) - 1
        except Exception as error:  # PIL raises many types for truncated or unsupported files
            context.warnings.append(f"texture {_image_name(image)} cannot be decoded "
                                    f"({type(error).__name__}: {error})")
            texture_ids[key] = None
    return texture_ids[key]


def _scene_parts(scene):
    """(vertices (V, 3) float64 in the scene's frame, trimesh.Trimesh) for every placement of a mesh
    with triangles in a trimesh.Scene. (Scene.dump would do this but copies each mesh and drops the
    glTF vertex colours that trimesh keeps beside a material.)"""
    import trimesh
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geometry = scene.geometry.get(name)
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
            vertices = np.asarray(geometry.vertices, np.float64)
            yield vertices @ transform[:3, :3].T + transform[:3, 3], geometry


def load_mesh(path):
    """Read a mesh file (anything trimesh reads: OBJ+MTL+textures, GLB/GLTF, PLY, ...) as MeshData.

    Scenes are flattened with their node transforms; every part keeps its own material. The result
    is in the file's own frame; ``normalize_mesh`` turns it z-up, centres and scales it. Colours are
    linear RGB (see "Colour" above). Files the mesh names are found as ``find_asset`` says. Problems
    that leave the mesh renderable -- a texture or material library that is not found, a texture that
    cannot be decoded or applied -- are listed in ``MeshData.warnings``; the material's flat colour
    stands in for a missing texture (Kd for OBJ, baseColorFactor for glTF).
    Raises ValueError naming the file when it cannot be read or holds no triangles.
    """
    import trimesh
    path = str(path)
    try:
        # process=False: keep the file's vertices as they are (merging is slow on big meshes and we
        # smooth normals by position anyway).
        # ShapeNet's MTL files name their textures as ../images/*.jpg: let the resolver leave the
        # mesh's folder (an option of trimesh >= 4.6; earlier versions allow it by default).
        try:
            resolver = trimesh.resolvers.FilePathResolver(path, allow_anywhere=True)
        except TypeError:
            resolver = trimesh.resolvers.FilePathResolver(path)
        # trimesh skips what it cannot find in silence; ours finds more and keeps a list.
        resolver = _AssetResolver(path, resolver)
        scene = trimesh.load(path, force='scene', process=False, resolver=resolver)
        parts = list(_scene_parts(scene))
    except Exception as error:  # trimesh raises many types; the caller wants the file and the reason
        raise ValueError(f"{path}: cannot read mesh ({type(error).__name__}: {error})") from error
    if not parts:
        raise ValueError(f"{path}: no triangles in the file")
    suffix = pathlib.Path(path).suffix.lower()
    context = _LoadContext(linear_vertex_colors=suffix in ('.gltf', '.glb'),
                           gltf_factors=_gltf_base_color_factors(path), warnings=list(resolver.problems))
    positions, faces, colors, uvs, face_textures = [], [], [], [], []
    textures, texture_ids = [], {}
    offset = 0
    for vertices, part in parts:
        corner_color, corner_uv, face_texture = _appearance(part, textures, texture_ids, context)
        positions.append(vertices)
        faces.append(np.asarray(part.faces, np.int64) + offset)
        offset += len(part.vertices)
        colors.append(corner_color)
        uvs.append(corner_uv)
        face_textures.append(face_texture)
    positions = np.concatenate(positions)
    if not np.isfinite(positions).all():
        raise ValueError(f"{path}: vertex positions are not all finite")
    return MeshData(positions=positions, faces=np.concatenate(faces),
                    corner_uv=np.concatenate(uvs), corner_color=np.concatenate(colors),
                    face_texture=np.concatenate(face_textures), textures=textures,
                    warnings=list(dict.fromkeys(context.warnings)))  # each problem once


def up_to_z(up):
    """(3, 3) rotation taking the mesh's up axis ('y' or 'z') onto the world's +z."""
    if up == 'z':
        return np.eye(3)
    if up == 'y':
        # +90 degrees about x: (x, y, z) -> (x, -z, y); a proper rotation, so winding is kept.
        return np.array([[1., 0., 0.], [0., 0., -1.], [0., 1., 0.]])
    raise ValueError(f"up must be 'y' or 'z', got {up!r}")


def smooth_corner_normals(positions, faces, crease_angle=45.0):
    """Per-corner normals (F, 3, 3): angle-weighted averages of the normals of the faces that share the
    corner's position, leaving out faces more than ``crease_angle`` degrees away (sharp edges stay sharp).

    Vertices are matched by position, so UV seams and unmerged files still smooth. crease_angle <= 0
    gives flat (face) normals.
    """
    triangles = positions[faces]  # (F, 3, 3)
    cross = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])  # (F, 3)
    area2 = np.linalg.norm(cross, axis=1)
    face_normal = cross / np.maximum(area2, 1e-30)[:, None]  # (F, 3)
    flat = np.repeat(face_normal[:, None, :], 3, axis=1)
    if crease_angle <= 0:
        return flat.astype(np.float32)
    num_faces = len(faces)
    edge_next = np.roll(triangles, -1, axis=1) - triangles  # (F, 3, 3): corner k to k+1
    edge_prev = np.roll(triangles, 1, axis=1) - triangles   # corner k to k-1
    cosine = (edge_next * edge_prev).sum(2) / np.maximum(
        np.linalg.norm(edge_next, axis=2) * np.linalg.norm(edge_prev, axis=2), 1e-30)
    corner_angle = np.arccos(np.clip(cosine, -1.0, 1.0)).reshape(-1)  # (3F,)
    # Corners grouped by vertex position.
    scale = max(np.abs(positions).max(), 1e-12)
    _, position_id = np.unique(np.round(positions / scale * 1e6).astype(np.int64), axis=0,
                               return_inverse=True)
    corner_vertex = position_id.reshape(-1)[faces.reshape(-1)]  # (3F,)
    corner_face = np.repeat(np.arange(num_faces), 3)
    order = np.argsort(corner_vertex, kind='stable')
    sorted_vertex = corner_vertex[order]
    group_start = np.flatnonzero(np.r_[True, sorted_vertex[1:] != sorted_vertex[:-1]])
    group_size = np.diff(np.r_[group_start, len(order)])
    size_per_corner = np.repeat(group_size, group_size)   # (3F,) in sorted order
    start_per_corner = np.repeat(group_start, group_size)
    # All (corner, neighbour corner) pairs within each group: sum of size^2 pairs.
    pair_corner = np.repeat(np.arange(len(order)), size_per_corner)
    pair_offset = np.arange(len(pair_corner)) - np.repeat(np.cumsum(size_per_corner) - size_per_corner,
                                                          size_per_corner)
    pair_neighbour = start_per_corner[pair_corner] + pair_offset
    own_face = corner_face[order[pair_corner]]
    other_face = corner_face[order[pair_neighbour]]
    keep = (face_normal[own_face] * face_normal[other_face]).sum(1) >= math.cos(math.radians(crease_angle))
    # Weighted by the corner's angle (not the face's area), so how a face is split into triangles
    # does not matter.
    weighted = face_normal[other_face[keep]] * corner_angle[order[pair_neighbour[keep]], None]  # (pairs, 3)
    target = order[pair_corner[keep]]  # flat corner index f * 3 + k
    summed = np.stack([np.bincount(target, weights=weighted[:, i], minlength=3 * num_faces)
                       for i in range(3)], axis=1).reshape(num_faces, 3, 3)
    length = np.linalg.norm(summed, axis=2, keepdims=True)
    normals = np.where(length > 1e-12, summed / np.maximum(length, 1e-30), flat)
    return normals.astype(np.float32)


def normalize_mesh(mesh, up='y', crease_angle=45.0):
    """Turn ``mesh`` z-up, centre its bounding box at the origin, scale its diagonal to 1, set normals.

    Returns the same MeshData, modified in place.
    """
    positions = mesh.positions @ up_to_z(up).T
    low, high = positions.min(0), positions.max(0)
    diagonal = np.linalg.norm(high - low)
    if not diagonal > 0:
        raise ValueError("mesh has zero extent")
    mesh.positions = (positions - (low + high) / 2) / diagonal
    mesh.corner_normal = smooth_corner_normals(mesh.positions, mesh.faces, crease_angle)
    return mesh


# --- Rasteriser ----------------------------------------------------------------------------------

def _depth_test(key, row, x, y, tri, ids, side, eps):
    """Z-buffer samples into ``key`` (s*s,) int64: keeps, per pixel, the nearest (depth bits << 32 | face id).

    :param row: (K, >=9) per-sample triangle rows: barycentric planes b1 (0-2), b2 (3-5), 1/z at the corners (6-8)
    :param x, y: (K,) sample column and row; tri: (K,) triangle of each sample; ids: its int64 face ids
    """
    b1 = row[:, 0] * x + row[:, 1] * y + row[:, 2]
    b2 = row[:, 3] * x + row[:, 4] * y + row[:, 5]
    b0 = 1.0 - b1 - b2
    inside = (b0 >= eps) & (b1 >= eps) & (b2 >= eps)
    # Screen-space linear 1/z: perspective-correct depth.
    depth = 1.0 / (b0 * row[:, 6] + b1 * row[:, 7] + b2 * row[:, 8])
    inside &= depth > 0
    depth_bits = depth[inside].float().view(torch.int32).long()
    fragment_key = (depth_bits << 32) | ids[tri[inside]]
    pixel = y[inside].long() * side + x[inside].long()
    key.scatter_reduce_(0, pixel, fragment_key, reduce='amin')


class MeshRenderer:
    """Rasterises one normalised MeshData on a torch device; ``render`` gives rgb and depth of a view.

    The z-buffer is a ``scatter_reduce(amin)`` over fragments keyed by (depth bits << 32 | triangle id):
    positive float32 depths order like their bit patterns, so one integer minimum finds the nearest
    triangle per sample. Fragments are the sample points inside each triangle's pixel bounding box,
    enumerated vectorised; attributes are interpolated afterwards, once per covered sample,
    perspective-correct.
    """

    def __init__(self, mesh, device='cpu', shading='lit'):
        if shading not in ('lit', 'unlit'):
            raise ValueError(f"shading must be 'lit' or 'unlit', got {shading!r}")
        self.device = torch.device(device)
        self.shading = shading
        as_tensor = lambda array, dtype: torch.as_tensor(np.ascontiguousarray(array), dtype=dtype,  # noqa: E731
                                                         device=self.device)
        self.positions = as_tensor(mesh.positions, torch.float64)    # (V, 3)
        self.faces = as_tensor(mesh.faces, torch.int64)              # (F, 3)
        self.corner_uv = as_tensor(mesh.corner_uv, torch.float32)    # (F, 3, 2)
        self.corner_color = as_tensor(mesh.corner_color, torch.float32)  # (F, 3, 3)
        self.corner_normal = as_tensor(mesh.corner_normal, torch.float32)  # (F, 3, 3)
        self.face_texture = as_tensor(mesh.face_texture, torch.int64)  # (F,)
        self.textures = [as_tensor(texture, torch.float32) for texture in mesh.textures]
        self.light_dirs = torch.nn.functional.normalize(
            torch.tensor([d for d, _ in LIGHTS], dtype=torch.float32, device=self.device), dim=1)  # (3, 3)
        self.light_power = torch.tensor([p for _, p in LIGHTS], dtype=torch.float32, device=self.device)

    def _fragments(self, screen, inv_depth, side):
        """Nearest triangle per sample. screen (F, 3, 2) pixel coordinates, inv_depth (F, 3).

        :return: key (side*side,) int64: (float32 depth bits << 32 | triangle id), or int64 max = empty
        """
        device = screen.device
        low = torch.ceil(screen.amin(1)).clamp(min=0)                 # (F, 2)
        high = torch.floor(screen.amax(1)).clamp(max=side - 1)       # (F, 2)
        extent = (high - low + 1).clamp(min=0).long()                # (F, 2): columns, rows
        # Affine barycentrics: b1 = a1 x + c1 y + d1, b2 = a2 x + c2 y + d2 (b0 = 1 - b1 - b2).
        p0, p1, p2 = screen[:, 0], screen[:, 1], screen[:, 2]
        e1, e2 = p1 - p0, p2 - p0
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]              # (F,), twice the signed area
        count = extent[:, 0] * extent[:, 1]
        valid = (count > 0) & (det.abs() > 1e-12)
        ids = torch.nonzero(valid).squeeze(1)                         # (F',)
        key = torch.full((side * side,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        if len(ids) == 0:
            return key
        inv_det = 1.0 / det[ids]
        a1, c1 = e2[ids, 1] * inv_det, -e2[ids, 0] * inv_det
        a2, c2 = -e1[ids, 1] * inv_det, e1[ids, 0] * inv_det
        d1 = -(a1 * p0[ids, 0] + c1 * p0[ids, 1])
        d2 = -(a2 * p0[ids, 0] + c2 * p0[ids, 1])
        # Per triangle: 6 barycentric coefficients and 3 inverse depths.
        table = torch.stack((a1, c1, d1, a2, c2, d2, inv_depth[ids, 0], inv_depth[ids, 1],
                             inv_depth[ids, 2]), dim=1)               # (F', 9)
        rect_tri, rect_origin, rect_size = self._rectangles(table, low[ids].long(), extent[ids], high[ids].long())
        rect_count = rect_size[:, 0] * rect_size[:, 1]               # (R,)
        ends = torch.cumsum(rect_count, 0)
        # Chunks of rectangles holding at most _MAX_FRAGMENTS candidate samples.
        bounds = [0]
        total = int(ends[-1]) if len(ends) else 0
        if total > _MAX_FRAGMENTS:
            cuts = torch.searchsorted(ends, torch.arange(_MAX_FRAGMENTS, total, _MAX_FRAGMENTS,
                                                         device=device), right=True)
            bounds += sorted(set(int(c) for c in cuts.tolist()) - {0, len(rect_tri)})
        bounds.append(len(rect_tri))
        eps = -1e-6  # samples exactly on a shared edge must not fall between its two triangles
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop <= start:
                continue
            chunk_count = rect_count[start:stop]
            rect = torch.repeat_interleave(torch.arange(start, stop, device=device), chunk_count)  # (K,)
            first = torch.cumsum(chunk_count, 0) - chunk_count
            local = torch.arange(len(rect), device=device) - torch.repeat_interleave(first, chunk_count)
            width = rect_size[rect, 0]
            local_y = torch.div(local, width, rounding_mode='floor')
            x = (rect_origin[rect, 0] + local - local_y * width).to(screen.dtype)   # (K,) sample column
            y = (rect_origin[rect, 1] + local_y).to(screen.dtype)                   # (K,) sample row
            tri = rect_tri[rect]
            row = table[tri]                                          # (K, 9)
            _depth_test(key, row, x, y, tri, ids, side, eps)
        return key

    @staticmethod
    def _rectangles(table, low, extent, high, tile=8):
        """Sample rectangles to test per triangle: its bounding box when small, else the tile x tile
        tiles of the box that the triangle may touch. A long thin diagonal triangle (common in ShapeNet
        meshes) covers a small part of its box, so testing every sample of the box would waste most work.

        :param table: (F', 9) barycentric coefficients; low, extent, high: (F', 2) int64 boxes
        :return: rect_tri (R,) rows of table, rect_origin (R, 2), rect_size (R, 2), all int64
        """
        device = table.device
        count = extent[:, 0] * extent[:, 1]
        big = count > 4 * tile * tile
        small = torch.nonzero(~big).squeeze(1)
        big = torch.nonzero(big).squeeze(1)
        if len(big) == 0:
            return small, low[small], extent[small]
        num_tiles = (extent[big] + tile - 1) // tile                 # (Fb, 2)
        per_triangle = num_tiles[:, 0] * num_tiles[:, 1]
        tri = torch.repeat_interleave(big, per_triangle)            # (T,)
        local = torch.arange(len(tri), device=device) - torch.repeat_interleave(
            torch.cumsum(per_triangle, 0) - per_triangle, per_triangle)
        columns = torch.repeat_interleave(num_tiles[:, 0], per_triangle)
        tile_y = torch.div(local, columns, rounding_mode='floor')
        origin = low[tri] + torch.stack((local - tile_y * columns, tile_y), 1) * tile   # (T, 2)
        size = torch.minimum(high[tri] - origin + 1, torch.full_like(origin, tile))
        # Keep a tile unless one barycentric is negative at all four of its corners (conservative).
        corner_x = torch.stack((origin[:, 0], origin[:, 0] + size[:, 0] - 1), 1).to(table.dtype)  # (T, 2)
        corner_y = torch.stack((origin[:, 1], origin[:, 1] + size[:, 1] - 1), 1).to(table.dtype)
        row = table[tri]
        cx, cy = corner_x[:, :, None], corner_y[:, None, :]        # all four (x, y) combinations
        b1 = row[:, 0, None, None] * cx + row[:, 1, None, None] * cy + row[:, 2, None, None]  # (T, 2, 2)
        b2 = row[:, 3, None, None] * cx + row[:, 4, None, None] * cy + row[:, 5, None, None]
        b0 = 1.0 - b1 - b2
        touch = ((b0.amax((1, 2)) >= -1e-6) & (b1.amax((1, 2)) >= -1e-6) & (b2.amax((1, 2)) >= -1e-6))
        return (torch.cat((small, tri[touch])), torch.cat((low[small], origin[touch])),
                torch.cat((extent[small], size[touch])))

    def _sample_texture(self, texture, uv):
        """Bilinear, repeating, texel centres at (i + 0.5) / W; uv (P, 2) with v up -> (P, 3)."""
        height, width = texture.shape[:2]
        x = torch.remainder(uv[:, 0], 1.0) * width - 0.5
        y = (1.0 - torch.remainder(uv[:, 1], 1.0)) * height - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        fx, fy = (x - x0)[:, None], (y - y0)[:, None]
        x0, y0 = x0.long(), y0.long()
        x1, y1 = torch.remainder(x0 + 1, width), torch.remainder(y0 + 1, height)
        x0, y0 = torch.remainder(x0, width), torch.remainder(y0, height)
        return ((texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx) * (1 - fy)
                + (texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx) * fy)

    @torch.no_grad()
    def render(self, cam2world, focal, cx, cy, sidelength, supersample=1):
        """Render one view.

        :param cam2world: (4, 4) OpenCV camera-to-world pose
        :param focal, cx, cy: intrinsics in pixels of the s x s image (pixel x sampled at x, SPEC section 4)
        :param supersample: odd number of samples per pixel along each axis (area-averaged colour)
        :return: rgb (s, s, 3) float32 in [0, 1], sRGB-encoded, on white; depth (s, s) float32 camera z,
            0 = background
        """
        if supersample < 1 or supersample % 2 == 0:
            raise ValueError(f"supersample must be a positive odd number, got {supersample}")
        k = supersample
        side = sidelength * k
        cam2world = torch.as_tensor(np.asarray(cam2world), dtype=torch.float64, device=self.device)
        rotation, center = cam2world[:3, :3], cam2world[:3, 3]
        points = (self.positions - center) @ rotation                 # (V, 3) camera space
        z = points[:, 2]
        # Sample (i, j) of the fine grid sits at pixel coordinate (i - (k-1)/2) / k: the centre sample
        # of each k x k block lies exactly on the pixel's integer coordinate.
        screen_x = k * (focal * points[:, 0] / z + cx) + (k - 1) / 2
        screen_y = k * (focal * points[:, 1] / z + cy) + (k - 1) / 2
        screen = torch.stack((screen_x, screen_y), 1)[self.faces]     # (F, 3, 2) float64
        corner_z = z[self.faces]                                      # (F, 3)
        # Triangles reaching behind the camera plane are dropped (objects sit well in front of it).
        behind = (corner_z <= 1e-4).any(1)
        screen = torch.where(behind[:, None, None], torch.full_like(screen, -1.0), screen)
        key = self._fragments(screen.float(), (1.0 / corner_z.clamp(min=1e-4)).float(), side)

        covered = torch.nonzero(key != torch.iinfo(torch.int64).max).squeeze(1)  # (P,)
        face = key[covered] & 0xFFFFFFFF                              # (P,)
        y = torch.div(covered, side, rounding_mode='floor').to(torch.float64)
        x = (covered - y.long() * side).to(torch.float64)
        # Barycentrics of each covered sample in its triangle, then perspective-correct weights.
        tri = screen[face]                                            # (P, 3, 2)
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        dx, dy = x - tri[:, 0, 0], y - tri[:, 0, 1]
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        b1 = (dx * e2[:, 1] - dy * e2[:, 0]) / det
        b2 = (e1[:, 0] * dy - e1[:, 1] * dx) / det
        bary = torch.stack((1 - b1 - b2, b1, b2), 1) / corner_z[face]   # (P, 3)
        inv_depth = bary.sum(1, keepdim=True)
        weight = (bary / inv_depth).float()                           # (P, 3)
        depth_samples = (1.0 / inv_depth.squeeze(1)).float()         # (P,)

        def interpolate(corner_values):
            """(F, 3, C) -> (P, C)."""
            return (corner_values[face] * weight[:, :, None]).sum(1)

        albedo = interpolate(self.corner_color)                        # (P, 3)
        texture_of = self.face_texture[face]                          # (P,)
        if self.textures:
            uv = interpolate(self.corner_uv)                          # (P, 2)
            for index, texture in enumerate(self.textures):
                mask = texture_of == index
                if mask.any():
                    albedo[mask] = albedo[mask] * self._sample_texture(texture, uv[mask])
        if self.shading == 'lit':
            normal = torch.nn.functional.normalize(interpolate(self.corner_normal), dim=1)  # (P, 3)
            # Two-sided: turn each normal towards the camera, decided per triangle by its geometry.
            corners = self.positions[self.faces[face]]                # (P, 3, 3) float64
            geometric = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=1)
            facing = ((center - corners[:, 0]) * geometric).sum(1) >= 0
            normal = torch.where(facing[:, None], normal, -normal)
            irradiance = AMBIENT + (torch.clamp(normal @ self.light_dirs.T, min=0) * self.light_power).sum(1)
            albedo = albedo * irradiance.clamp(max=1.0)[:, None]
        rgb = torch.ones(side * side, 3, dtype=torch.float32, device=self.device)
        rgb[covered] = albedo.clamp(0, 1)
        depth = torch.zeros(side * side, dtype=torch.float32, device=self.device)
        depth[covered] = depth_samples
        rgb = rgb.view(side, side, 3)
        depth = depth.view(side, side)
        if k > 1:  # the area filter averages light, so in linear RGB
            rgb = torch.nn.functional.avg_pool2d(rgb.permute(2, 0, 1)[None], k)[0].permute(1, 2, 0)
            depth = depth[(k - 1) // 2::k, (k - 1) // 2::k]
        return linear_to_srgb(rgb), depth


# --- Cameras and splits --------------------------------------------------------------------------

def camera_intrinsics(sidelength):
    """(focal, cx, cy) of the published datasets at side ``sidelength``: 131.25, 64, 64 at 128 px."""
    return FOCAL_PER_SIDE * sidelength, sidelength / 2.0, sidelength / 2.0


def _view_rng(seed, split, name):
    """A generator that depends on (seed, split, instance name) only, so reruns draw the same views."""
    return np.random.default_rng([seed, SPLITS.index(split), zlib.crc32(name.encode('utf-8'))])


def camera_poses(kind, num_views, radius, rng=None, upper_hemisphere=False):
    """(num_views, 4, 4) cam2world poses looking at the origin, world up +z.

    kind 'sphere': positions uniform on the sphere (training views of the published sets);
    kind 'spiral': an Archimedean spiral over the upper hemisphere (their test views).
    """
    if kind == 'sphere':
        positions = geometry.sphere_positions(num_views, radius, rng, upper_hemisphere=upper_hemisphere)
    elif kind == 'spiral':
        positions = geometry.spiral_positions(num_views, radius)
    else:
        raise ValueError(f"unknown camera kind {kind!r}")
    return np.stack([geometry.look_at(position, (0., 0., 0.), (0., 0., 1.)) for position in positions])


def find_meshes(mesh_dir, patterns=DEFAULT_PATTERNS):
    """Sorted mesh files under ``mesh_dir`` (recursively) whose file name matches one of ``patterns``."""
    mesh_dir = pathlib.Path(mesh_dir)
    if not mesh_dir.is_dir():
        raise FileNotFoundError(f"{mesh_dir}: mesh folder not found")
    found = []
    for dirpath, _, filenames in os.walk(mesh_dir, followlinks=True):
        for filename in filenames:
            if any(fnmatch.fnmatch(filename.lower(), pattern.lower()) for pattern in patterns):
                found.append(pathlib.Path(dirpath) / filename)
    return sorted(found)


def instance_names(mesh_paths, mesh_dir):
    """One folder name per mesh: the model id for ShapeNet's ``<id>/models/model_normalized.obj``,
    otherwise the path below ``mesh_dir`` without its suffix, '/' turned into '_'; the suffix is kept
    where two files would otherwise share a name (chair.obj, chair.ply)."""
    mesh_dir = pathlib.Path(mesh_dir)
    names = []
    for path in mesh_paths:
        parts = path.relative_to(mesh_dir).parts
        if len(parts) >= 3 and parts[-2] == 'models':
            names.append(parts[-3])
        else:
            names.append('_'.join(parts[:-1] + (path.stem,)))
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    names = [name + '_' + path.suffix.lstrip('.').lower() if counts[name] > 1 else name
             for name, path in zip(names, mesh_paths)]
    if len(set(names)) != len(names):
        raise ValueError(f"{mesh_dir}: meshes that map to the same instance name; "
                         "rename them or render the folders separately")
    return names


def assign_splits(names, split='by_instance', val_fraction=0.1, test_fraction=0.1, seed=0,
                  num_train_views=50, num_val_views=10, num_test_views=251):
    """The jobs to render: a list of (instance name, split, camera kind, number of views).

    'by_instance': a seeded permutation of the sorted names gives round(n * test_fraction) test and
    round(n * val_fraction) val instances (spiral views), the rest train (sphere views).
    'by_view': every instance in train (sphere), val (other sphere views) and test (spiral).
    """
    if split == 'by_view':
        jobs = []
        for name in names:
            jobs += [(name, 'train', 'sphere', num_train_views), (name, 'val', 'sphere', num_val_views),
                     (name, 'test', 'spiral', num_test_views)]
        return [job for job in jobs if job[3] > 0]
    if split != 'by_instance':
        raise ValueError(f"split must be 'by_instance' or 'by_view', got {split!r}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(names))
    num_test = int(round(len(names) * test_fraction))
    num_val = int(round(len(names) * val_fraction))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[names[index]] = 'test' if rank < num_test else 'val' if rank < num_test + num_val else 'train'
    return [(name, split_of[name], 'sphere' if split_of[name] == 'train' else 'spiral',
             num_train_views if split_of[name] == 'train' else num_test_views) for name in sorted(names)]


# --- Dataset -------------------------------------------------------------------------------------

def _frame_paths(instance_dir, index):
    """rgb, depth and pose paths of frame ``index``."""
    return (instance_dir / 'rgb' / f'{index:06d}.png', instance_dir / 'depth' / f'{index:06d}.png',
            instance_dir / 'pose' / f'{index:06d}.txt')


def _frame_done(instance_dir, index):
    return all(path.is_file() for path in _frame_paths(instance_dir, index))


def render_mesh_dataset(mesh_dir, output_dir, sidelength=128, num_train_views=50, num_val_views=10,
                        num_test_views=251, radius=DEFAULT_RADIUS, split='by_instance', val_fraction=0.1,
                        test_fraction=0.1, seed=0, device='cpu', up='y', patterns=DEFAULT_PATTERNS,
                        overwrite=False, supersample=3, crease_angle=45.0, shading='lit',
                        upper_hemisphere=False, progress=False):
    """Render every mesh under ``mesh_dir`` into SRN-format instances under ``output_dir/<split>/``.

    Arguments are those of the command line (see ``get_parser``). A mesh that fails is recorded and
    skipped. Returns a dict: ``rendered`` and ``skipped`` frame counts, ``instances`` (name -> list of
    its splits; meshes that failed are left out), ``failures``, a list of (mesh path, error message), and
    ``warnings``, a list of (mesh path, message) for meshes rendered without part of their appearance
    (a texture that was not found or cannot be decoded), one entry per mesh.
    """
    mesh_dir, output_dir = pathlib.Path(mesh_dir), pathlib.Path(output_dir)
    mesh_paths = find_meshes(mesh_dir, patterns)
    if not mesh_paths:
        raise FileNotFoundError(f"{mesh_dir}: no mesh files matching {', '.join(patterns)}")
    names = instance_names(mesh_paths, mesh_dir)
    path_of = dict(zip(names, mesh_paths))
    jobs = assign_splits(names, split, val_fraction, test_fraction, seed,
                         num_train_views, num_val_views, num_test_views)
    focal, cx, cy = camera_intrinsics(sidelength)
    summary = {'rendered': 0, 'skipped': 0, 'failures': [], 'warnings': [], 'instances': {}}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(job[3] for job in jobs), unit='img', dynamic_ncols=True)
    jobs_of = {}
    for job in jobs:  # one mesh load serves all of its splits
        jobs_of.setdefault(job[0], []).append(job)
    for name in sorted(jobs_of):
        mesh_path = path_of[name]
        renderer = None
        try:
            for _, split_name, kind, num_views in jobs_of[name]:
                summary['instances'].setdefault(name, []).append(split_name)
                instance_dir = output_dir / split_name / name
                poses = camera_poses(kind, num_views, radius, _view_rng(seed, split_name, name),
                                     upper_hemisphere=upper_hemisphere)
                todo = [i for i in range(num_views) if overwrite or not _frame_done(instance_dir, i)]
                summary['skipped'] += num_views - len(todo)
                if bar is not None:
                    bar.update(num_views - len(todo))
                if not todo:
                    continue
                if renderer is None:
                    if bar is not None:
                        bar.set_postfix_str(f'loading {name}')
                    mesh = normalize_mesh(load_mesh(mesh_path), up=up, crease_angle=crease_angle)
                    if mesh.warnings:
                        summary['warnings'].append((str(mesh_path),
                                                    f"{mesh_path}: " + '; '.join(mesh.warnings)))
                    renderer = MeshRenderer(mesh, device=device, shading=shading)
                    if bar is not None:
                        bar.set_postfix_str(f'{name} ({len(mesh.faces)} triangles)')
                for sub in ('rgb', 'depth', 'pose'):
                    (instance_dir / sub).mkdir(parents=True, exist_ok=True)
                data_util.write_intrinsics(str(instance_dir / 'intrinsics.txt'), focal, cx, cy,
                                           sidelength, sidelength)
                for index in todo:
                    rgb, depth = renderer.render(poses[index], focal, cx, cy, sidelength, supersample)
                    rgb_path, depth_path, pose_path = _frame_paths(instance_dir, index)
                    rgb = np.round(rgb.cpu().numpy() * 255).astype(np.uint8)  # (s, s, 3)
                    data_util.write_image(str(rgb_path), rgb)
                    data_util.write_depth(str(depth_path), depth.cpu().numpy())
                    # The pose is written last: a frame counts as done once its pose exists.
                    data_util.write_pose(str(pose_path), poses[index])
                    summary['rendered'] += 1
                    if bar is not None:
                        bar.update(1)
        except Exception as error:  # one bad mesh must not stop the others; reported at the end
            message = str(error)
            if str(mesh_path) not in message:
                message = f"{mesh_path}: {type(error).__name__}: {message}"
            summary['failures'].append((str(mesh_path), message))
            # A failed mesh is not an instance of the dataset, even if some of its frames were written.
            summary['instances'].pop(name, None)
    if bar is not None:
        bar.close()
    return summary


def get_parser():
    parser = argparse.ArgumentParser(
        description="Render a folder of meshes (OBJ+MTL, GLB/GLTF, PLY, or a ShapeNetCore category "
                    "folder) into an SRN-format dataset: rgb/, depth/, pose/, intrinsics.txt per instance.")
    parser.add_argument('--mesh_dir', required=True, help='folder searched recursively for meshes')
    parser.add_argument('--output_dir', required=True, help='gets train/, val/ and test/ subfolders')
    parser.add_argument('--sidelength', type=int, default=128, help='image side in pixels')
    parser.add_argument('--num_train_views', type=int, default=50, help='sphere views per train instance')
    parser.add_argument('--num_val_views', type=int, default=10,
                        help='sphere views per val instance with --split by_view')
    parser.add_argument('--num_test_views', type=int, default=251,
                        help='spiral views per test (and, with --split by_instance, val) instance')
    parser.add_argument('--radius', type=float, default=DEFAULT_RADIUS,
                        help='camera distance; the object is scaled to a bounding-box diagonal of 1')
    parser.add_argument('--split', choices=('by_instance', 'by_view'), default='by_instance')
    parser.add_argument('--val_fraction', type=float, default=0.1)
    parser.add_argument('--test_fraction', type=float, default=0.1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default=None, help='torch device; default cuda when available')
    parser.add_argument('--up', choices=('y', 'z'), default='y',
                        help="the meshes' up axis: y for ShapeNet, glTF and most OBJ exporters")
    parser.add_argument('--pattern', default=','.join(DEFAULT_PATTERNS),
                        help='comma-separated file-name patterns of the meshes to render')
    parser.add_argument('--supersample', type=int, default=3,
                        help='odd number of anti-aliasing samples per pixel along each axis (1: none)')
    parser.add_argument('--crease_angle', type=float, default=45.0,
                        help='normals are smoothed across edges flatter than this (degrees); 0: flat')
    parser.add_argument('--shading', choices=('lit', 'unlit'), default='lit',
                        help='lit: the fixed light rig; unlit: plain albedo')
    parser.add_argument('--upper_hemisphere', action='store_true',
                        help='training views on the upper hemisphere only')
    parser.add_argument('--overwrite', action='store_true', help='re-render frames that exist')
    parser.add_argument('--no_progress', action='store_true', help='no progress bar')
    return parser


def main(argv=None):
    """Command line entry point; returns the exit status (1 if any mesh failed)."""
    opt = get_parser().parse_args(argv)
    device = opt.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    patterns = tuple(p.strip() for p in opt.pattern.split(',') if p.strip())
    summary = render_mesh_dataset(
        opt.mesh_dir, opt.output_dir, sidelength=opt.sidelength, num_train_views=opt.num_train_views,
        num_val_views=opt.num_val_views, num_test_views=opt.num_test_views, radius=opt.radius,
        split=opt.split, val_fraction=opt.val_fraction, test_fraction=opt.test_fraction, seed=opt.seed,
        device=device, up=opt.up, patterns=patterns, overwrite=opt.overwrite,
        supersample=opt.supersample, crease_angle=opt.crease_angle, shading=opt.shading,
        upper_hemisphere=opt.upper_hemisphere, progress=not opt.no_progress)
    counts = {s: sum(s in splits for splits in summary['instances'].values()) for s in SPLITS}
    print(f"{summary['rendered']} frames rendered, {summary['skipped']} already there; instances: "
          + ', '.join(f'{s} {counts[s]}' for s in SPLITS)
          + f"; {len(summary['failures'])} mesh(es) failed; written to {opt.output_dir}")
    if summary['warnings']:
        print(f"{len(summary['warnings'])} mesh(es) rendered with warnings (flat colours stand in for what "
              "was not loaded):", file=sys.stderr)
        for _, message in summary['warnings']:
            print(f"  {message}", file=sys.stderr)
    if summary['failures']:
        print(f"{len(summary['failures'])} mesh(es) failed:", file=sys.stderr)
        for _, message in summary['failures']:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(util.run_command(main, 'render_meshes.py'))
