"""render_meshes: rendering our own SRN-format datasets from meshes built here, in tmp_path.

Known answers: the depth of a sphere against the analytic ray-sphere depth, the colours of a textured
cube's texture quadrants at the pixels where they should project, and the cube's silhouette against the
projection of its corners through the poses and intrinsics read back by ``dataio``; colours against the
sRGB encoding of linear values (glTF factors and vertex colours, MTL Kd, the default albedo under the light
rig), written out here independently. Plus texture paths as other tools write them, failure and warning
reports, resuming, splits and the ShapeNet folder layout. Tiny images and few views: the file runs in seconds.
"""
import math
import pathlib

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("PIL")
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data_util  # noqa: E402
import dataio  # noqa: E402
import render_meshes  # noqa: E402

# Texture quadrants (rows 0..31 are the top of the image, i.e. v > 0.5 in OBJ's v-up convention).
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
QUADRANTS = {(0.25, 0.75): RED, (0.75, 0.75): GREEN, (0.25, 0.25): BLUE, (0.75, 0.25): YELLOW}
UP_Y_TO_Z = np.array([[1., 0., 0.], [0., 0., -1.], [0., 1., 0.]])  # the documented --up y rotation
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def cube_faces():
    """The 6 faces of the unit cube [-0.5, 0.5]^3: (outward normal, corners c0..c3) with c0 at uv (0, 0),
    c1 at (1, 0), c2 at (1, 1), c3 at (0, 1)."""
    faces = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            normal = np.zeros(3)
            normal[axis] = sign
            a = np.zeros(3)
            a[(axis + 1) % 3] = 1.0
            b = np.cross(normal, a)
            faces.append((normal, [0.5 * (normal - a - b), 0.5 * (normal + a - b),
                                   0.5 * (normal + a + b), 0.5 * (normal - a + b)]))
    return faces


def write_textured_cube(folder, name='cube', texture_name='tex.png', texture_ref=None):
    """A unit cube as OBJ + MTL + PNG texture, every face showing the four quadrants of the texture."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texture = np.zeros((32, 32, 3), np.uint8)
    texture[:16, :16], texture[:16, 16:], texture[16:, :16], texture[16:, 16:] = RED, GREEN, BLUE, YELLOW
    texture_path = folder / texture_name
    texture_path.parent.mkdir(parents=True, exist_ok=True)
    data_util.write_image(str(texture_path), texture)
    lines = [f'mtllib {name}.mtl']
    for _, corners in cube_faces():
        lines += ['v %r %r %r' % tuple(float(c) for c in corner) for corner in corners]
    lines += ['vt 0 0', 'vt 1 0', 'vt 1 1', 'vt 0 1', f'usemtl {name}_material']
    for face in range(6):
        v = [4 * face + k + 1 for k in range(4)]
        lines += [f'f {v[0]}/1 {v[1]}/2 {v[2]}/3', f'f {v[0]}/1 {v[2]}/3 {v[3]}/4']
    (folder / f'{name}.obj').write_text('\n'.join(lines) + '\n')
    (folder / f'{name}.mtl').write_text(f'newmtl {name}_material\nKd 1 1 1\n'
                                        f'map_Kd {texture_ref or texture_name}\n')
    return folder / f'{name}.obj'


def write_sphere(folder, name='sphere', subdivisions=4, color=(200, 60, 40)):
    """An icosphere of radius 0.5 as PLY with per-vertex colours."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
    sphere.visual.vertex_colors = np.tile(np.array(color + (255,), np.uint8), (len(sphere.vertices), 1))
    path = pathlib.Path(folder) / f'{name}.ply'
    path.parent.mkdir(parents=True, exist_ok=True)
    sphere.export(path)
    return path, sphere


def render(mesh_dir, output_dir, **kwargs):
    options = dict(sidelength=48, num_train_views=3, num_val_views=0, num_test_views=0, split='by_view',
                   supersample=1, device='cpu', seed=1)
    options.update(kwargs)
    return render_meshes.render_mesh_dataset(mesh_dir, output_dir, **options)


def camera_rays(cam2world, sidelength):
    """Origins (3,) and directions (s*s, 3) with camera z = 1 for pixel (x, y) at its integer coordinates."""
    focal, cx, cy = render_meshes.camera_intrinsics(sidelength)
    uv = np.stack(np.meshgrid(np.arange(sidelength), np.arange(sidelength), indexing='xy'), -1).reshape(-1, 2)
    directions_cam = np.stack(((uv[:, 0] - cx) / focal, (uv[:, 1] - cy) / focal, np.ones(len(uv))), 1)
    return cam2world[:3, 3], directions_cam @ cam2world[:3, :3].T


@pytest.mark.parametrize('device', DEVICES)
def test_sphere_depth_matches_analytic(tmp_path, device):
    path, sphere = write_sphere(tmp_path / 'meshes')
    summary = render(tmp_path / 'meshes', tmp_path / 'out', device=device)
    assert summary['rendered'] == 3 and not summary['failures']
    # Normalisation: centred bounding box, diagonal 1.
    low, high = sphere.vertices.min(0), sphere.vertices.max(0)
    radius = 0.5 / np.linalg.norm(high - low)
    side = 48
    focal = render_meshes.camera_intrinsics(side)[0]
    instance = tmp_path / 'out' / 'train' / 'sphere'
    for index in range(3):
        cam2world = data_util.load_pose(instance / 'pose' / f'{index:06d}.txt').astype(np.float64)
        depth = data_util.load_depth(instance / 'depth' / f'{index:06d}.png').reshape(-1)
        origin, directions = camera_rays(cam2world, side)
        # |o + t d|^2 = r^2 with d's camera z = 1, so t is camera depth.
        a = (directions ** 2).sum(1)
        b = 2 * directions @ origin
        c = origin @ origin - radius ** 2
        disc = b ** 2 - 4 * a * c
        analytic = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), 0.0)
        # Distance of each ray from the centre, and a pixel's footprint at the object's distance.
        ray_distance = np.linalg.norm(np.cross(directions / np.sqrt(a)[:, None], -origin), axis=1)
        footprint = np.linalg.norm(origin) / focal
        hit = disc >= 0
        covered = depth > 0
        mismatch = hit != covered
        assert covered.sum() > 100
        assert np.all(np.abs(ray_distance[mismatch] - radius) < footprint), "silhouette off by > 1 pixel"
        interior = ray_distance < 0.9 * radius
        # Tessellation (an inscribed icosphere, 5120 faces) and 1 mm depth quantisation.
        np.testing.assert_allclose(depth[interior], analytic[interior], atol=2.5e-3)
        assert np.all(depth[interior] >= analytic[interior] - 1e-3)  # an inscribed mesh lies behind


def textured_cube_variants(tmp_path):
    """The same textured cube as OBJ+MTL+PNG and as GLB (exported by trimesh)."""
    obj = write_textured_cube(tmp_path / 'src')
    glb_dir = tmp_path / 'glb'
    glb_dir.mkdir()
    trimesh.load(obj, force='scene', process=False).export(glb_dir / 'cube.glb')
    return {'obj': obj.parent, 'glb': glb_dir}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('kind', ['obj', 'glb'])
def test_texture_colours_land_where_they_project(tmp_path, kind, device):
    mesh_dir = textured_cube_variants(tmp_path)[kind]
    side = 64
    render(mesh_dir, tmp_path / 'out', sidelength=side, num_train_views=4, shading='unlit', device=device)
    focal, cx, cy = render_meshes.camera_intrinsics(side)
    instance = tmp_path / 'out' / 'train' / 'cube'
    checked = 0
    for index in range(4):
        cam2world = data_util.load_pose(instance / 'pose' / f'{index:06d}.txt').astype(np.float64)
        rgb = np.round((data_util.load_rgb(instance / 'rgb' / f'{index:06d}.png') + 1) / 2 * 255)  # (s, s, 3)
        for normal, corners in cube_faces():
            # Normalised world frame: y-up -> z-up, diagonal sqrt(3) -> 1.
            world_normal = UP_Y_TO_Z @ normal
            center = UP_Y_TO_Z @ (0.5 * normal) / math.sqrt(3)
            view = cam2world[:3, 3] - center
            if world_normal @ view / np.linalg.norm(view) < 0.4:  # hidden, or seen at a grazing angle
                continue
            c0, c1, c3 = (np.asarray(corners[k]) for k in (0, 1, 3))
            for (u, v), color in QUADRANTS.items():
                point = UP_Y_TO_Z @ (c0 + u * (c1 - c0) + v * (c3 - c0)) / math.sqrt(3)
                camera = (point - cam2world[:3, 3]) @ cam2world[:3, :3]
                x, y = focal * camera[0] / camera[2] + cx, focal * camera[1] / camera[2] + cy
                np.testing.assert_allclose(rgb[int(round(y)), int(round(x))], color, atol=2,
                                           err_msg=f"view {index}, face {normal}, uv ({u}, {v})")
                checked += 1
    assert checked >= 12


# --- Colour: linear shading, sRGB in and out -------------------------------------------------------

def srgb8(linear):
    """The 8-bit sRGB code of a linear value (IEC 61966-2-1), written out here independently of the module."""
    linear = np.asarray(linear, np.float64)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255).astype(int)


def srgb_decode8(code):
    """Linear value of an 8-bit sRGB code."""
    value = np.asarray(code, np.float64) / 255
    return np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)


def cube_arrays():
    """The unit cube as positions (24, 3), triangles (12, 3) and UVs (24, 2): one quad per side, c0..c3
    of ``cube_faces`` at uv (0, 0), (1, 0), (1, 1), (0, 1)."""
    positions = np.array([corner for _, corners in cube_faces() for corner in corners], np.float64)
    faces = np.array([(4 * f, 4 * f + 1, 4 * f + 2) for f in range(6)]
                     + [(4 * f, 4 * f + 2, 4 * f + 3) for f in range(6)])
    uv = np.tile(np.array([[0., 0.], [1., 0.], [1., 1.], [0., 1.]]), (6, 1))
    return positions, faces, uv


def write_obj_cube(path, uv=False, mtl=None, material='material'):
    """The unit cube as OBJ, with texture coordinates if ``uv``; ``mtl`` (text) is written next to it and
    used as the cube's material library."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    positions, faces, uvs = cube_arrays()
    lines = [f'mtllib {path.stem}.mtl'] if mtl is not None else []
    lines += ['v %r %r %r' % tuple(map(float, p)) for p in positions]
    lines += ['vt %r %r' % tuple(map(float, t)) for t in uvs] if uv else []
    lines += [f'usemtl {material}'] if mtl is not None else []
    lines += ['f ' + ' '.join(f'{i + 1}/{i + 1}' if uv else f'{i + 1}' for i in face) for face in faces]
    path.write_text('\n'.join(lines) + '\n')
    if mtl is not None:
        path.with_suffix('.mtl').write_text(mtl)
    return path


def write_glb(path, positions, faces, uv=None, colors=None, factor=None, texture=None):
    """A binary glTF 2.0 file written byte by byte, so that its numbers are exactly the ones given (trimesh's
    exporter rounds baseColorFactor to 8 bits). ``colors``: (V, 3) float COLOR_0; ``factor``: RGBA
    baseColorFactor; ``texture``: (H, W, 3) uint8 baseColorTexture, which needs ``uv`` (v up, OBJ style)."""
    import io
    import json
    import struct
    blob, views, accessors = bytearray(), [], []

    def add_view(data):
        views.append({'buffer': 0, 'byteOffset': len(blob), 'byteLength': len(data)})
        blob.extend(data)
        blob.extend(b'\0' * (-len(blob) % 4))
        return len(views) - 1

    def add_accessor(array, kind, component, **extra):
        view = add_view(np.ascontiguousarray(array).tobytes())
        accessors.append({'bufferView': view, 'componentType': component, 'count': len(array), 'type': kind,
                          **extra})
        return len(accessors) - 1

    positions = np.asarray(positions, np.float32)
    attributes = {'POSITION': add_accessor(positions, 'VEC3', 5126, min=positions.min(0).tolist(),
                                           max=positions.max(0).tolist())}  # min and max: required there
    if uv is not None:
        gltf_uv = np.asarray(uv, np.float32).copy()
        gltf_uv[:, 1] = 1 - gltf_uv[:, 1]  # glTF's v points down the image
        attributes['TEXCOORD_0'] = add_accessor(gltf_uv, 'VEC2', 5126)
    if colors is not None:
        attributes['COLOR_0'] = add_accessor(np.asarray(colors, np.float32), 'VEC3', 5126)
    primitive = {'attributes': attributes, 'mode': 4,
                 'indices': add_accessor(np.asarray(faces, np.uint32).reshape(-1), 'SCALAR', 5125)}
    header = {'asset': {'version': '2.0'}, 'scene': 0, 'scenes': [{'nodes': [0]}], 'nodes': [{'mesh': 0}],
              'meshes': [{'primitives': [primitive]}]}
    if factor is not None or texture is not None:
        pbr = {} if factor is None else {'baseColorFactor': list(factor)}
        if texture is not None:
            png = io.BytesIO()
            Image.fromarray(np.asarray(texture, np.uint8)).save(png, format='PNG')
            header['images'] = [{'bufferView': add_view(png.getvalue()), 'mimeType': 'image/png'}]
            header['textures'] = [{'source': 0}]
            pbr['baseColorTexture'] = {'index': 0}
        header['materials'] = [{'name': 'material', 'pbrMetallicRoughness': pbr}]
        primitive['material'] = 0
    header.update(accessors=accessors, bufferViews=views, buffers=[{'byteLength': len(blob)}])
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 4)
    chunks = (struct.pack('<I4s', len(text), b'JSON') + text
              + struct.pack('<I4s', len(blob), b'BIN\0') + bytes(blob))
    pathlib.Path(path).write_bytes(struct.pack('<4sII', b'glTF', 2, 12 + len(chunks)) + chunks)
    return path


def load_png(path):
    """An 8-bit PNG as written, (H, W, 3) ints."""
    return np.asarray(Image.open(path).convert('RGB')).astype(int)


def covered_colours(out_dir, instance, index=0):
    """The distinct colours of the covered pixels (depth > 0) of one rendered frame, as (N, 3) ints."""
    frame = pathlib.Path(out_dir) / 'train' / instance
    rgb = load_png(frame / 'rgb' / f'{index:06d}.png')
    depth = data_util.load_depth(frame / 'depth' / f'{index:06d}.png')
    return np.unique(rgb[depth > 0].reshape(-1, 3).astype(int), axis=0)


def test_colours_are_linear_where_the_formats_say_so(tmp_path):
    """Unlit, so each covered pixel is the surface's base colour encoded to sRGB: linear sources (glTF
    baseColorFactor and COLOR_0, MTL Kd) are encoded, sRGB ones (textures, 8-bit PLY colours) come back as
    they were, and a glTF texture is multiplied by its factor in linear space."""
    mesh_dir = tmp_path / 'meshes'
    mesh_dir.mkdir()
    positions, faces, uv = cube_arrays()
    write_glb(mesh_dir / 'factor.glb', positions, faces, factor=(0.85, 0.25, 0.05, 1.0))
    write_glb(mesh_dir / 'texture_times_factor.glb', positions, faces, uv=uv, factor=(0.4, 0.4, 0.4, 1.0),
              texture=np.full((4, 4, 3), (128, 200, 30), np.uint8))
    vertex_linear = np.array([64, 102, 26]) / 255  # 8-bit steps: trimesh stores these colours as bytes
    write_glb(mesh_dir / 'vertex_colors.glb', positions, faces, colors=np.tile(vertex_linear, (24, 1)))
    write_glb(mesh_dir / 'vertex_colors_times_factor.glb', positions, faces,
              colors=np.tile([0.4, 0.4, 0.4], (24, 1)), factor=(0.6, 0.6, 0.6, 1.0))
    write_obj_cube(mesh_dir / 'kd.obj', mtl='newmtl material\nKd 0.85 0.25 0.05\n')
    write_sphere(mesh_dir, name='ply_colors', subdivisions=2, color=(200, 60, 40))
    summary = render(mesh_dir, tmp_path / 'out', sidelength=16, num_train_views=1, shading='unlit')
    assert not summary['failures'] and not summary['warnings']
    expected = {
        # Linear 0.85 is sRGB 237 (217 if taken as sRGB); 0.05 is 63 (64 after trimesh's 8-bit rounding).
        'factor': [237, 137, 63],
        'texture_times_factor': srgb8(srgb_decode8([128, 200, 30]) * 0.4),
        'vertex_colors': srgb8(vertex_linear),
        'vertex_colors_times_factor': srgb8([0.24, 0.24, 0.24]),
        'kd': [237, 137, 63],
        'ply_colors': [200, 60, 40],
    }
    assert list(expected['factor']) == list(srgb8([0.85, 0.25, 0.05]))
    for instance, colour in expected.items():
        colours = covered_colours(tmp_path / 'out', instance)
        assert len(colours) == 1 and list(colours[0]) == list(colour), f"{instance}: {colours} != {colour}"


def visible_face_pixels(cam2world, side, min_cosine=0.4):
    """(outward world normal, (row, column)) of the centre of each unit-cube face that the camera sees
    head-on enough, in the normalised world frame (y-up -> z-up, diagonal 1)."""
    focal, cx, cy = render_meshes.camera_intrinsics(side)
    for normal, _ in cube_faces():
        world_normal = UP_Y_TO_Z @ normal
        center = UP_Y_TO_Z @ (0.5 * normal) / math.sqrt(3)
        view = cam2world[:3, 3] - center
        if world_normal @ view / np.linalg.norm(view) < min_cosine:
            continue
        camera = (center - cam2world[:3, 3]) @ cam2world[:3, :3]
        row, column = focal * camera[1] / camera[2] + cy, focal * camera[0] / camera[2] + cx
        yield world_normal, (int(round(row)), int(round(column)))


def test_uv_without_material_renders_at_default_albedo(tmp_path):
    """A mesh with UVs but no material is grey DEFAULT_ALBEDO (0.7, linear) under the light rig, exactly
    like the same mesh without UVs -- not trimesh's 2 x 2 grey stand-in texture (0.39)."""
    side = 48
    for variant, uv in (('with_uv', True), ('without_uv', False)):
        # The same file name in two folders, so that both get the same views.
        write_obj_cube(tmp_path / variant / 'cube.obj', uv=uv)
        summary = render(tmp_path / variant, tmp_path / 'out' / variant, sidelength=side, num_train_views=2)
        assert not summary['failures'] and not summary['warnings']
    assert render_meshes.DEFAULT_ALBEDO == (0.7, 0.7, 0.7)
    directions = np.array([d for d, _ in render_meshes.LIGHTS])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    power = np.array([p for _, p in render_meshes.LIGHTS])
    checked = 0
    for index in range(2):
        frames = [tmp_path / 'out' / variant / 'train' / 'cube' / 'rgb' / f'{index:06d}.png'
                  for variant in ('with_uv', 'without_uv')]
        with_uv, without_uv = (load_png(frame) for frame in frames)
        np.testing.assert_array_equal(with_uv, without_uv)
        cam2world = data_util.load_pose(frames[0].parent.parent / 'pose' / f'{index:06d}.txt').astype(np.float64)
        for normal, (row, column) in visible_face_pixels(cam2world, side):
            irradiance = min(1.0, render_meshes.AMBIENT + (power * np.maximum(directions @ normal, 0)).sum())
            expected = srgb8(0.7 * irradiance)
            np.testing.assert_allclose(with_uv[row, column], [expected] * 3, atol=1,
                                       err_msg=f"view {index}, face {normal}")
            checked += 1
    assert checked >= 3


# --- Texture paths as other tools write them -------------------------------------------------------

@pytest.mark.parametrize('reference, location', [
    ('.\\tex.png', 'tex.png'),                               # Windows relative path
    ('textures\\tex.png', 'textures/tex.png'),
    ('Textures\\TEX.png', 'textures/tex.png'),               # written on a case-insensitive file system
    ('-s 1 1 1 -bm 0.5 tex.png', 'tex.png'),                 # MTL options before the file name
    ('C:\\Users\\artist\\Desktop\\car\\tex.png', 'tex.png'),  # absolute, on the author's machine
    ('/home/artist/car/maps/tex.png', 'tex.png'),
])
def test_texture_paths_as_written_by_other_tools_are_found(tmp_path, reference, location):
    write_textured_cube(tmp_path / 'meshes', texture_name=location, texture_ref=reference)
    summary = render(tmp_path / 'meshes', tmp_path / 'out', sidelength=32, num_train_views=1, shading='unlit')
    assert not summary['failures'] and not summary['warnings']
    rgb = load_png(tmp_path / 'out' / 'train' / 'cube' / 'rgb' / '000000.png').reshape(-1, 3)
    # Rendered with the texture (its four colours), not with the material's Kd 1 1 1 (white).
    for colour in (RED, GREEN, BLUE, YELLOW):
        assert (rgb == colour).all(1).sum() >= 5, f"{colour} not rendered"


def test_mtl_map_options(tmp_path):
    assert render_meshes.parse_map_statement('-s 2 3 1 -o 0.5 -clamp on -bm 0.2 my tex.png') == (
        'my tex.png', {'-s': ['2', '3', '1'], '-o': ['0.5'], '-clamp': ['on'], '-bm': ['0.2']})
    assert render_meshes.parse_map_statement('-o.png') == ('-o.png', {})  # a name, not an option
    # -s and -o scale and shift the texture coordinates, as in Blender's importer.
    path = write_textured_cube(tmp_path, texture_ref='-s 2 3 1 -o 0.5 0.25 tex.png')
    mesh = render_meshes.load_mesh(path)
    _, faces, uv = cube_arrays()
    assert len(mesh.textures) == 1 and not mesh.warnings
    np.testing.assert_allclose(np.sort(mesh.corner_uv.reshape(-1, 2), axis=0),
                               np.sort((uv * [2, 3] + [0.5, 0.25])[faces].reshape(-1, 2), axis=0), atol=1e-6)


def test_textures_that_cannot_be_loaded_are_reported_per_mesh(tmp_path, capsys):
    mesh_dir = tmp_path / 'meshes'
    kd = 'newmtl material\nKd 0.85 0.25 0.05\n'
    write_obj_cube(mesh_dir / 'missing.obj', uv=True, mtl=kd + 'map_Kd .\\maps\\paint.png\n')
    write_obj_cube(mesh_dir / 'garbage.obj', uv=True, mtl=kd + 'map_Kd garbage.png\n')
    (mesh_dir / 'garbage.png').write_bytes(b'not a PNG at all')
    write_obj_cube(mesh_dir / 'truncated.obj', uv=True, mtl=kd + 'map_Kd truncated.png\n')
    write_textured_cube(tmp_path / 'scratch')  # a valid PNG, cut short: its header reads, its pixels do not
    (mesh_dir / 'truncated.png').write_bytes((tmp_path / 'scratch' / 'tex.png').read_bytes()[:-40])
    write_obj_cube(mesh_dir / 'no_uv.obj', uv=False, mtl=kd + 'map_Kd good.png\n')  # nowhere to apply it
    (mesh_dir / 'good.png').write_bytes((tmp_path / 'scratch' / 'tex.png').read_bytes())
    write_obj_cube(mesh_dir / 'no_library.obj', uv=True, mtl=None)
    (mesh_dir / 'no_library.obj').write_text('mtllib elsewhere.mtl\n' + (mesh_dir / 'no_library.obj').read_text())
    write_sphere(mesh_dir, name='fine', subdivisions=1)
    summary = render(mesh_dir, tmp_path / 'out', sidelength=16, num_train_views=1, shading='unlit')
    assert not summary['failures']
    warnings = dict(summary['warnings'])
    assert sorted(warnings) == sorted(str(mesh_dir / f'{name}.obj')
                                      for name in ('missing', 'garbage', 'truncated', 'no_uv', 'no_library'))
    assert "texture '.\\maps\\paint.png' not found" in warnings[str(mesh_dir / 'missing.obj')]
    assert "texture 'garbage.png'" in warnings[str(mesh_dir / 'garbage.obj')]
    assert "cannot be read" in warnings[str(mesh_dir / 'garbage.obj')]
    assert "texture 'truncated.png' cannot be decoded" in warnings[str(mesh_dir / 'truncated.obj')]
    assert "texture 'good.png' not applied: no UV coordinates" in warnings[str(mesh_dir / 'no_uv.obj')]
    assert "material library 'elsewhere.mtl' not found" in warnings[str(mesh_dir / 'no_library.obj')]
    # What stands in: the material's Kd (linear, so 237 137 63), or the default grey without a material.
    for name in ('missing', 'garbage', 'truncated', 'no_uv', 'no_library'):
        colour = [218] * 3 if name == 'no_library' else [237, 137, 63]
        assert covered_colours(tmp_path / 'out', name).tolist() == [colour], name
    # The command line lists them after the run, one line per mesh, and still succeeds.
    status = render_meshes.main(['--mesh_dir', str(mesh_dir), '--output_dir', str(tmp_path / 'out2'),
                                 '--sidelength', '16', '--num_train_views', '1', '--split', 'by_view',
                                 '--num_val_views', '0', '--num_test_views', '0', '--supersample', '1',
                                 '--device', 'cpu', '--no_progress'])
    assert status == 0
    errors = capsys.readouterr().err.splitlines()
    assert any(line.startswith('5 mesh(es) rendered with warnings') for line in errors)
    assert sum(str(mesh_dir / 'missing.obj') in line and 'paint.png' in line for line in errors) == 1


def convex_hull(points):
    """Counter-clockwise convex hull (monotone chain) of (n, 2) points."""
    points = sorted(map(tuple, points))

    def half(sequence):
        hull = []
        for p in sequence:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull[:-1]
    return np.array(half(points) + half(reversed(points)))


def signed_distance_to_hull(hull, pixels):
    """(N,) distance of pixels (N, 2) to a convex polygon's boundary, positive inside."""
    distances = []
    for start, end in zip(hull, np.roll(hull, -1, axis=0)):
        edge = end - start
        inward = np.array([-edge[1], edge[0]]) / np.linalg.norm(edge)  # left of a CCW edge
        distances.append((pixels - start) @ inward)
    return np.min(distances, axis=0)


def test_poses_and_intrinsics_through_dataio_reproduce_projection(tmp_path):
    write_textured_cube(tmp_path / 'meshes')
    side = 48
    render(tmp_path / 'meshes', tmp_path / 'out', sidelength=side, num_train_views=3)
    dataset = dataio.SceneClassDataset(str(tmp_path / 'out' / 'train'), img_sidelength=side,
                                       samples_per_instance=1)
    assert len(dataset) == 3
    corners = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)]) / math.sqrt(3)
    for index in range(3):
        observation = dataset[index][0][0]
        cam2world = observation['pose'].double()[None]         # (1, 4, 4)
        intrinsics = observation['intrinsics'].double()[None]  # (1, 4, 4)
        world2cam = torch.inverse(cam2world)
        points = torch.cat((torch.from_numpy(corners), torch.ones(8, 1, dtype=torch.float64)), 1)
        camera = (world2cam @ points.T[None])[0].T            # (8, 4)
        from geometry import project
        projected = project(camera[None, :, 0], camera[None, :, 1], camera[None, :, 2], intrinsics)[0]
        hull = convex_hull(projected[:, :2].numpy())
        uv = observation['uv'].numpy().astype(np.float64)      # (N, 2) column, row
        inside = signed_distance_to_hull(hull, uv)
        depth = data_util.load_depth(tmp_path / 'out' / 'train' / 'cube' / 'depth' / f'{index:06d}.png')
        covered = depth.reshape(-1) > 0
        # Every pixel more than half a pixel from the projected silhouette is classified as it predicts.
        clear = np.abs(inside) > 0.5
        assert np.array_equal(covered[clear], inside[clear] > 0), f"view {index}: silhouette off by > 0.5 px"
        # Lifting the rendered depth through the read-back camera lands on the cube's surface.
        from geometry import world_from_xy_depth
        interior = (inside > 1.0) & covered
        world = world_from_xy_depth(torch.from_numpy(uv)[None], torch.from_numpy(depth.reshape(-1)).double()[None],
                                    cam2world, intrinsics)[0].numpy()[interior]
        np.testing.assert_allclose(np.abs(world).max(1), 0.5 / math.sqrt(3), atol=3e-3)
        # The rgb the loader serves is the rendered image, white outside the silhouette.
        rgb = observation['rgb'].numpy()
        assert np.all(rgb[~covered & (inside < -0.5)] == 1.0)


def test_unreadable_mesh_is_reported_and_others_render(tmp_path, capsys):
    mesh_dir = tmp_path / 'meshes'
    write_sphere(mesh_dir, subdivisions=2)
    (mesh_dir / 'broken.glb').write_bytes(b'glTF this is not a binary gltf file')
    (mesh_dir / 'empty.obj').write_text('# no geometry here\n')
    status = render_meshes.main(['--mesh_dir', str(mesh_dir), '--output_dir', str(tmp_path / 'out'),
                                 '--sidelength', '32', '--num_train_views', '2', '--split', 'by_view',
                                 '--num_val_views', '0', '--num_test_views', '1', '--supersample', '1',
                                 '--device', 'cpu', '--no_progress'])
    assert status == 1
    captured = capsys.readouterr()
    errors = captured.err
    assert '2 mesh(es) failed' in errors
    # The closing summary counts only the mesh that rendered as an instance of each split.
    assert 'instances: train 1, val 0, test 1; 2 mesh(es) failed' in captured.out
    assert '3 frames rendered' in captured.out
    assert str(mesh_dir / 'broken.glb') in errors and str(mesh_dir / 'empty.obj') in errors
    for split, count in (('train', 2), ('test', 1)):
        assert len(list((tmp_path / 'out' / split / 'sphere' / 'rgb').glob('*.png'))) == count
        assert len(list((tmp_path / 'out' / split / 'sphere' / 'pose').glob('*.txt'))) == count
    assert not (tmp_path / 'out' / 'train' / 'broken').exists()


def test_summary_counts_failed_meshes_as_failed(tmp_path):
    mesh_dir = tmp_path / 'meshes'
    write_sphere(mesh_dir, subdivisions=1)
    (mesh_dir / 'broken.ply').write_text('ply\nformat nonsense\n')
    summary = render(mesh_dir, tmp_path / 'out', sidelength=16, num_train_views=2, num_test_views=1)
    assert summary['instances'] == {'sphere': ['train', 'test']}
    assert [path for path, _ in summary['failures']] == [str(mesh_dir / 'broken.ply')]
    assert summary['rendered'] == 3


def test_resume_skips_existing_frames(tmp_path):
    write_sphere(tmp_path / 'meshes', subdivisions=2)
    first = render(tmp_path / 'meshes', tmp_path / 'out', num_train_views=4, sidelength=32)
    assert (first['rendered'], first['skipped']) == (4, 0)
    instance = tmp_path / 'out' / 'train' / 'sphere'
    pose_text = (instance / 'pose' / '000002.txt').read_text()
    stamps = {p: p.stat().st_mtime_ns for p in instance.rglob('*.png')}
    (instance / 'rgb' / '000002.png').unlink()
    (instance / 'pose' / '000002.txt').unlink()
    second = render(tmp_path / 'meshes', tmp_path / 'out', num_train_views=4, sidelength=32)
    assert (second['rendered'], second['skipped']) == (1, 3)
    assert (instance / 'pose' / '000002.txt').read_text() == pose_text  # same view as before
    for path, stamp in stamps.items():
        if path.name != '000002.png':
            assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"
    third = render(tmp_path / 'meshes', tmp_path / 'out', num_train_views=4, sidelength=32)
    assert (third['rendered'], third['skipped']) == (0, 4)
    forced = render(tmp_path / 'meshes', tmp_path / 'out', num_train_views=4, sidelength=32, overwrite=True)
    assert forced['rendered'] == 4


def test_shapenet_layout_renders_as_is(tmp_path):
    category = tmp_path / '02958343'
    for model_id in ('1a2b', '3c4d'):
        write_textured_cube(category / model_id / 'models', name='model_normalized',
                            texture_name='../images/texture0.png', texture_ref='../images/texture0.png')
    summary = render(category, tmp_path / 'out', sidelength=32, num_train_views=1)
    assert not summary['failures']
    assert sorted(summary['instances']) == ['1a2b', '3c4d']
    rgb = data_util.load_rgb(tmp_path / 'out' / 'train' / '1a2b' / 'rgb' / '000000.png')
    rgb = (rgb.reshape(-1, 3) + 1) / 2
    # The texture found through the MTL's relative path: saturated colours, not the default grey.
    assert (rgb.max(1) - rgb.min(1)).max() > 0.5
    intrinsics = data_util.read_intrinsics(tmp_path / 'out' / 'train' / '1a2b' / 'intrinsics.txt')
    assert (intrinsics.f, intrinsics.cx, intrinsics.height) == (32 * 525 / 512, 16.0, 32)


def test_splits():
    names = [f'model{i:02d}' for i in range(20)]
    jobs = render_meshes.assign_splits(names, 'by_instance', val_fraction=0.1, test_fraction=0.2, seed=3,
                                       num_train_views=50, num_test_views=251)
    split_of = {name: split for name, split, _, _ in jobs}
    assert sorted(split_of) == names
    assert [list(split_of.values()).count(s) for s in ('train', 'val', 'test')] == [14, 2, 4]
    assert all((kind, views) == (('sphere', 50) if split == 'train' else ('spiral', 251))
               for _, split, kind, views in jobs)
    assert jobs == render_meshes.assign_splits(names, 'by_instance', 0.1, 0.2, seed=3)
    assert jobs != render_meshes.assign_splits(names, 'by_instance', 0.1, 0.2, seed=4)
    by_view = render_meshes.assign_splits(names[:2], 'by_view', num_train_views=5, num_val_views=2,
                                          num_test_views=7)
    assert by_view == [('model00', 'train', 'sphere', 5), ('model00', 'val', 'sphere', 2),
                       ('model00', 'test', 'spiral', 7), ('model01', 'train', 'sphere', 5),
                       ('model01', 'val', 'sphere', 2), ('model01', 'test', 'spiral', 7)]
    # Test views: a spiral over the upper hemisphere at the chosen radius, looking at the origin.
    poses = render_meshes.camera_poses('spiral', 11, 1.3)
    assert np.allclose(np.linalg.norm(poses[:, :3, 3], axis=1), 1.3)
    assert np.all(poses[:, 2, 3] >= 0)
    forward = poses[:, :3, 2]
    assert np.allclose(forward, -poses[:, :3, 3] / 1.3)


def test_smooth_normals_keep_cube_edges_sharp():
    faces = []
    positions = []
    for normal, corners in cube_faces():
        base = len(positions)
        positions += corners
        faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    positions, faces = np.array(positions), np.array(faces)
    normals = render_meshes.smooth_corner_normals(positions, faces, crease_angle=45)
    face_normals = np.repeat(np.array([n for n, _ in cube_faces()]), 2, axis=0)  # (12, 3)
    np.testing.assert_allclose(normals, np.repeat(face_normals[:, None], 3, axis=1), atol=1e-6)
    rounded = render_meshes.smooth_corner_normals(positions, faces, crease_angle=100)
    np.testing.assert_allclose(np.abs(rounded), 1 / math.sqrt(3), atol=1e-6)  # corners average 3 faces
