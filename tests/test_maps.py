"""CCP4/MRC and zarr maps: geometry (axis order, start, ORIGIN), round trips, resampling, blurring, masks.

Independent references: gemmi's own reading of the files (MapSetup.Full places every value on
the full-cell grid from the header), header words read back by gemmi, analytic Gaussians for
blurring and resampling, brute-force distances for masks. Only the 3j6b tests need the shared
data; everything else makes its own small maps in tmp_path.
"""
import math

import dask.array as da
import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.density.interpolate import interpolate
from drefine.errors import InputError
from drefine.io.maps import (
    DensityMap,
    blur_sharpen,
    correlation,
    mask_around_atoms,
    nearest_atom_labels,
    read_map,
    read_zarr,
    resample,
    to_zarr,
    write_map,
    write_zarr,
)
from drefine.io.models import read_model

EM_MAP = "em/3j6b_chain9/2566_3J6B_9.mrc"
EM_MODEL = "em/3j6b_chain9/3J6B_9.pdb"
MONO = gemmi.UnitCell(24.0, 26.0, 28.0, 90.0, 104.0, 90.0)


# ---- helpers -----------------------------------------------------------------------------------
def write_with_gemmi(path, data_abc, cell, sampling, start_abc, axes=(1, 2, 3), origin=(0.0, 0.0, 0.0)):
    """A CCP4 file written by gemmi whose columns/rows/sections run along cell axes `axes` (MAPC/MAPR/MAPS).

    data_abc[u, v, w] is along a, b, c; the file holds it transposed to [c, r, s] with NC/NR/NSSTART
    and MX/MY/MZ set by hand, so the file's axis order really is the permuted one.
    """
    ax = np.asarray(axes) - 1  # cell axis of columns, rows, sections
    file_arr = np.ascontiguousarray(np.asarray(data_abc, dtype=np.float32).transpose(ax))
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = gemmi.FloatGrid(file_arr, cell, gemmi.SpaceGroup("P 1"))
    ccp4.update_ccp4_header(2, True)
    start_file = np.asarray(start_abc)[ax]
    for k in range(3):
        ccp4.set_header_i32(5 + k, int(start_file[k]))
        ccp4.set_header_i32(8 + k, int(sampling[k]))
        ccp4.set_header_i32(17 + k, int(axes[k]))
        ccp4.set_header_float(50 + k, float(origin[k]))
    ccp4.write_ccp4_map(str(path))
    return path


def gemmi_full_cell(path) -> np.ndarray:
    """The file's values on the full-cell grid as gemmi places them (NaN where the file has none)."""
    m = gemmi.read_ccp4_map(str(path))
    m.setup(float("nan"), gemmi.MapSetup.Full)
    return np.array(m.grid.array, copy=True)


def assert_same_geometry(a: DensityMap, b: DensityMap):
    assert a.shape == b.shape
    assert np.array_equal(a.start, b.start) and np.array_equal(a.sampling, b.sampling)
    assert np.array_equal(a.origin, b.origin)
    assert a.cell.parameters == b.cell.parameters


@pytest.fixture
def permuted_map(tmp_path):
    """A 6×7×8 map (a, b, c) on a 12×14×16 grid, start (3, −2, 5), file axes z, x, y, ORIGIN set."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8)).astype(np.float32)
    path = write_with_gemmi(tmp_path / "perm.ccp4", data, MONO, (12, 14, 16), (3, -2, 5), axes=(3, 1, 2),
                            origin=(1.5, -2.25, 3.0))
    return path, data


# ---- 3j6b: ORIGIN decides whether the model sits in its density ------------------------------------
def test_3j6b_origin_places_the_model_in_the_density(data_dir):
    dmap = read_map(need(data_dir, EM_MAP))
    xyz = read_model(need(data_dir, EM_MODEL)).atoms.xyz
    hdr = gemmi.read_ccp4_map(str(need(data_dir, EM_MAP)), setup=False)
    assert [hdr.header_i32(w) for w in (5, 6, 7)] == [0, 0, 0]
    assert np.allclose(dmap.origin, [hdr.header_float(w) for w in (50, 51, 52)])
    assert np.abs(dmap.origin).min() > 100.0  # a real shift, larger than the box
    assert dmap.is_full_cell and np.array_equal(dmap.start, [0, 0, 0])

    values = np.asarray(dmap.data, dtype=np.float64)
    mean, sd = values.mean(), values.std()
    ignored = DensityMap(dmap.data, dmap.cell, dmap.sampling, dmap.start, origin=np.zeros(3))

    # the box holds the model only when ORIGIN is honoured
    assert dmap.covers(xyz) == 1.0
    assert ignored.covers(xyz) == 0.0

    at_atoms = interpolate(dmap, xyz).values.mean()
    at_atoms_ignored = interpolate(ignored, xyz).values.mean()  # wrapped into the box: unrelated voxels
    assert at_atoms > mean + 2.0 * sd, (at_atoms, mean, sd)
    assert abs(at_atoms_ignored - mean) < 0.5 * sd, (at_atoms_ignored, mean, sd)

    # the same without the interpolation code: nearest voxel from the header numbers alone
    voxel = np.array([hdr.header_float(w) for w in (11, 12, 13)]) / [hdr.header_i32(w) for w in (8, 9, 10)]
    nearest = np.rint((xyz - dmap.origin) / voxel).astype(int)
    assert ((nearest >= 0) & (nearest < dmap.shape)).all()
    assert values[tuple(nearest.T)].mean() > mean + 2.0 * sd


def test_3j6b_round_trip(data_dir, tmp_path):
    src = need(data_dir, EM_MAP)
    m = read_map(src)
    out = write_map(m, tmp_path / "copy.mrc")
    back = read_map(out)
    assert back.data.dtype == np.float32 and np.array_equal(back.data, m.data)
    assert_same_geometry(back, m)
    # gemmi reads the written file the same way and sees ORIGIN in words 50-52
    g = gemmi.read_ccp4_map(str(out))
    assert np.allclose([g.header_float(w) for w in (50, 51, 52)], m.origin, rtol=0, atol=0)
    assert np.array_equal(np.array(g.grid.array), m.data)
    assert np.array_equal(gemmi_full_cell(out), gemmi_full_cell(src))
    # and to zarr, chunk-wise from the file
    z = read_map(to_zarr(src, tmp_path / "em.zarr", chunks=(16, 16, 16)))
    assert z.is_chunked and z.data.chunksize == (16, 16, 16)
    assert np.array_equal(z.data.compute(), m.data)
    assert_same_geometry(z, m)


# ---- axis order, start, origin -------------------------------------------------------------------
def test_permuted_axis_order_and_start(permuted_map):
    path, data = permuted_map
    m = read_map(path)
    assert m.shape == (6, 7, 8)
    assert np.array_equal(m.data, data)
    assert m.start.tolist() == [3, -2, 5] and m.sampling.tolist() == [12, 14, 16]
    assert m.origin.tolist() == [1.5, -2.25, 3.0]
    assert not m.is_full_cell
    # gemmi's own placement of the file's values on the full-cell grid agrees with start + index
    full = gemmi_full_cell(path)
    assert full.shape == (12, 14, 16)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in m.shape], indexing="ij"), -1).reshape(-1, 3)
    absolute = np.mod(idx + m.start, m.sampling)
    assert np.array_equal(full[tuple(absolute.T)], data[tuple(idx.T)])
    assert np.isnan(full).sum() == full.size - data.size


def test_permuted_map_round_trips_through_write_map(permuted_map, tmp_path):
    path, _ = permuted_map
    m = read_map(path)
    back = read_map(write_map(m, tmp_path / "out.mrc"))
    assert np.array_equal(back.data, m.data)
    assert_same_geometry(back, m)
    assert np.array_equal(gemmi_full_cell(tmp_path / "out.mrc"), gemmi_full_cell(path), equal_nan=True)


def test_big_endian_file(permuted_map, tmp_path):
    """The same map written big-endian (machine stamp 0x11 0x11) reads the same, also through to_zarr."""
    path, data = permuted_map
    raw = path.read_bytes()
    header = bytearray(np.frombuffer(raw[:1024], "<i4").astype(">i4").tobytes())
    header[208:212] = b"MAP "
    header[212:216] = bytes((0x11, 0x11, 0, 0))
    header[224:1024] = raw[224:1024]  # labels are text
    body = np.frombuffer(raw[1024:], "<f4").astype(">f4").tobytes()
    (tmp_path / "be.map").write_bytes(bytes(header) + body)
    m, ref = read_map(tmp_path / "be.map"), read_map(path)
    assert np.array_equal(m.data, data)
    assert_same_geometry(m, ref)
    assert np.array_equal(read_zarr(to_zarr(tmp_path / "be.map", tmp_path / "be.zarr")).data.compute(), data)


def test_integer_mode_file(tmp_path):
    data = np.random.default_rng(1).integers(-300, 300, size=(5, 6, 7)).astype(np.float32)
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = gemmi.FloatGrid(data, MONO, gemmi.SpaceGroup("P 1"))
    ccp4.update_ccp4_header(1, True)  # mode 1: int16
    ccp4.write_ccp4_map(str(tmp_path / "i16.map"))
    hdr = gemmi.read_ccp4_map(str(tmp_path / "i16.map"), setup=False)
    nsymbt = hdr.header_i32(24)  # gemmi writes the P 1 symmetry record as an extended header
    assert hdr.header_i32(4) == 1 and nsymbt > 0
    assert (tmp_path / "i16.map").stat().st_size == 1024 + nsymbt + 2 * data.size
    assert np.array_equal(read_map(tmp_path / "i16.map").data, data)
    assert np.array_equal(read_zarr(to_zarr(tmp_path / "i16.map", tmp_path / "i16.zarr")).data.compute(), data)


def test_geometry_helpers():
    m = DensityMap(np.zeros((6, 7, 8), np.float32), MONO, (12, 14, 16), (3, -2, 5), origin=(1.0, 2.0, -3.0))
    idx = np.array([[0, 0, 0], [1.5, 2.25, 7.0], [-4, 10, 3]])
    assert np.allclose(m.frac_of_index(idx), (idx + [3, -2, 5]) / [12, 14, 16])
    xyz = m.xyz_of_index(idx)
    O = np.array(MONO.orth.mat.tolist())
    assert np.allclose(xyz, ((idx + [3, -2, 5]) / [12, 14, 16]) @ O.T + [1.0, 2.0, -3.0])
    assert np.allclose(m.index_of_xyz(xyz), idx)
    assert np.allclose(m.voxel_size, [2.0, 26 / 14, 1.75])
    assert m.covers(m.xyz_of_index([[0, 0, 0], [5, 6, 7], [6, 0, 0], [2, 2, -1]])) == 0.5
    full = DensityMap(np.zeros((12, 14, 16)), MONO, (12, 14, 16), (0, 0, 0))
    assert full.is_full_cell and full.covers([[1e3, -1e3, 0.0]], periodic=True) == 1.0
    assert full.covers([[1e3, -1e3, 0.0]]) == 0.0  # the box itself, as for a cryo-EM map


# ---- zarr -------------------------------------------------------------------------------------------
def test_zarr_round_trip_and_chunked_reading(permuted_map, tmp_path):
    m = read_map(permuted_map[0])
    store = write_zarr(m, tmp_path / "m.zarr", chunks=(4, 3, 5))
    z = read_zarr(store)
    assert isinstance(z.data, da.Array) and z.is_chunked
    assert z.data.chunks == ((4, 2), (3, 3, 1), (5, 3))
    assert_same_geometry(z, m)
    assert z.spacegroup.hm == m.spacegroup.hm
    assert np.array_equal(z.data.blocks[1, 2, 0].compute(), m.data[4:6, 6:7, 0:5])
    assert np.array_equal(z.load().data, m.data)
    assert np.array_equal(read_map(store).data.compute(), m.data)  # read_map dispatches on the store
    # overwrite atomically, with other chunks
    write_zarr(m, store, chunks=(2, 2, 2))
    assert read_zarr(store).data.chunksize == (2, 2, 2)
    # a chunked map writes back to CCP4 slab by slab
    back = read_map(write_map(read_zarr(store), tmp_path / "from_zarr.mrc"))
    assert np.array_equal(back.data, m.data)
    assert_same_geometry(back, m)


def test_to_zarr_undoes_axis_order_slab_by_slab(permuted_map, tmp_path):
    path, data = permuted_map
    ref = read_map(path)
    # sections run along a here; chunk 4 along a gives two slabs (4 + 2 sections)
    z = read_zarr(to_zarr(path, tmp_path / "p.zarr", chunks=(4, 5, 3)))
    assert z.data.chunks == ((4, 2), (5, 2), (3, 3, 2))
    assert np.array_equal(z.data.compute(), data)
    assert_same_geometry(z, ref)


# ---- resampling, blurring, masks, correlation ------------------------------------------------------
def gaussian_map(cell=MONO, spacing=0.5, centre_frac=(0.5, 0.5, 0.5), sigma=1.5, height=1.0) -> DensityMap:
    sampling = np.rint(np.array([cell.a, cell.b, cell.c]) / spacing).astype(int)
    m = DensityMap(np.zeros(tuple(sampling)), cell, sampling, (0, 0, 0))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in m.shape], indexing="ij"), -1).reshape(-1, 3)
    centre = np.asarray(centre_frac) @ m.orth_matrix.T
    r2 = ((m.xyz_of_index(idx) - centre) ** 2).sum(axis=1)
    return m.with_data((height * np.exp(-r2 / (2 * sigma**2))).reshape(m.shape))


def test_blur_matches_the_analytic_gaussian_and_sharpen_undoes_it():
    sigma, b = 1.5, 40.0
    m = gaussian_map(sigma=sigma)
    blurred = blur_sharpen(m, b)
    # a Gaussian of variance σ² blurred by B is a Gaussian of variance σ² + B/8π², same integral
    s2 = sigma**2 + b / (8 * math.pi**2)
    expect = gaussian_map(sigma=math.sqrt(s2), height=(sigma**2 / s2) ** 1.5)
    assert np.abs(blurred.data - expect.data).max() < 1e-8
    assert blurred.data.max() < m.data.max()
    # sharpening multiplies by exp(B s²/4), up to e^30 at this grid's corner for B = 40: round off
    # would be amplified past 1e-6, so the round trip uses a B for which it stays below
    back = blur_sharpen(blur_sharpen(m, 20.0), -20.0)
    assert np.abs(back.data - m.data).max() < 1e-6 * np.abs(m.data).max()
    sharp = blur_sharpen(m, -20.0)
    assert sharp.data.max() > m.data.max()


def test_blur_then_sharpen_restores_a_noisy_float32_map(permuted_map):
    m = read_map(permuted_map[0])
    back = blur_sharpen(blur_sharpen(m, 30.0), -30.0)
    assert back.data.dtype == np.float64
    assert np.abs(back.data - m.data).max() < 1e-6 * np.abs(m.data).max()
    assert blur_sharpen(m, 0.0).data == pytest.approx(m.data, abs=1e-6)


def test_resample_to_a_finer_grid_and_back():
    m = gaussian_map(spacing=1.0)
    fine = resample(m, spacing=0.5)
    assert fine.is_full_cell and np.array_equal(fine.sampling, 2 * m.sampling)
    assert np.allclose(fine.voxel_size, m.voxel_size / 2)
    assert np.allclose(fine.data[::2, ::2, ::2], m.data, atol=1e-12)  # shared grid points are samples
    exact = gaussian_map(spacing=0.5)
    assert np.abs(fine.data - exact.data).max() < 0.03
    assert np.allclose(resample(fine, m).data, m.data, atol=1e-12)


def test_resample_into_an_orthogonal_p1_box():
    m = gaussian_map(cell=MONO, spacing=0.5, centre_frac=(0.4, 0.5, 0.6))
    centre = np.array([0.4, 0.5, 0.6]) @ m.orth_matrix.T
    box = resample(m, (12.0, 12.0, 12.0), spacing=0.4, origin=centre - 6.0)
    assert box.shape == (30, 30, 30) and box.is_full_cell and box.cell.beta == 90.0
    idx = np.stack(np.meshgrid(*[np.arange(30)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r2 = ((box.xyz_of_index(idx) - centre) ** 2).sum(axis=1)
    exact = np.exp(-r2 / (2 * 1.5**2)).reshape(box.shape)
    assert np.abs(box.data - exact).max() < 0.01
    assert np.unravel_index(np.argmax(box.data), box.shape) == (15, 15, 15)
    linear = resample(m, (12.0, 12.0, 12.0), spacing=0.4, origin=centre - 6.0, order=1)
    assert 0.005 < np.abs(linear.data - exact).max() < 0.06


def test_resample_a_box_keeps_its_region():
    m = DensityMap(np.zeros((10, 11, 12)), MONO, (48, 52, 56), (5, 7, 9), origin=(1.0, 1.0, 1.0))
    m = m.with_data(np.arange(m.data.size, dtype=np.float64).reshape(m.shape))
    fine = resample(m, spacing=0.25)
    assert np.array_equal(fine.sampling, [96, 104, 112])
    assert np.array_equal(fine.start, [10, 14, 18]) and fine.shape == (19, 21, 23)
    assert np.allclose(fine.xyz_of_index([[0, 0, 0]]), m.xyz_of_index([[0, 0, 0]]))
    assert np.allclose(fine.data[::2, ::2, ::2], m.data)


def brute_force_nearest(m: DensityMap, xyz, radius, periodic):
    """Per grid point, the nearest atom (over the 27 nearest images when periodic) within radius, or −1."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in m.shape], indexing="ij"), -1).reshape(-1, 3)
    pts = m.xyz_of_index(idx)
    if periodic:  # atoms into the cell first, then the 27 nearest images
        xyz = np.mod((xyz - m.origin) @ m.frac_matrix.T, 1.0) @ m.orth_matrix.T + m.origin
    shifts = [np.array(s) for s in np.ndindex(3, 3, 3)] if periodic else [np.ones(3, int)]
    best = np.full(len(pts), np.inf)
    label = np.full(len(pts), -1)
    for s in shifts:
        lattice = (s - 1) @ m.orth_matrix.T
        d = np.linalg.norm(pts[:, None, :] - (xyz[None, :, :] + lattice), axis=2)
        near, dn = d.argmin(axis=1), d.min(axis=1)
        better = (dn <= radius) & (dn < best)
        best[better], label[better] = dn[better], near[better]
    return label.reshape(m.shape)


def brute_force_mask(m: DensityMap, xyz, radius, periodic):
    return brute_force_nearest(m, xyz, radius, periodic) >= 0


def test_mask_around_atoms_matches_brute_force():
    cell = gemmi.UnitCell(15.0, 16.0, 17.0, 75.0, 100.0, 110.0)
    rng = np.random.default_rng(3)
    full = DensityMap(np.zeros((20, 21, 22)), cell, (20, 21, 22), (0, 0, 0), origin=(2.0, -1.0, 0.5))
    xyz = rng.uniform(0, 1, (12, 3)) @ full.orth_matrix.T + full.origin
    xyz[0] = full.xyz_of_index([[0.3, 10, 21.6]])[0]  # near faces: its sphere wraps
    xyz[1] += 3 * full.orth_matrix[:, 1]  # three cells away
    got = mask_around_atoms(full, xyz, 2.3)
    assert np.array_equal(got, brute_force_mask(full, xyz, 2.3, periodic=True))
    assert got[-1, 10, 0] or got[0, 10, 0]
    box = DensityMap(np.zeros((14, 12, 13)), cell, (40, 42, 44), (4, 5, 6), origin=(2.0, -1.0, 0.5))
    xyz_box = box.xyz_of_index(rng.uniform(-2, 14, (10, 3)))
    got_box = mask_around_atoms(box, xyz_box, 1.8)
    assert np.array_equal(got_box, brute_force_mask(box, xyz_box, 1.8, periodic=False))
    assert got_box.any() and not got_box.all()
    assert not mask_around_atoms(box, np.zeros((0, 3)), 2.0).any()
    # the nearest atom of each point, as map_model_fit's per-residue CC uses it
    assert np.array_equal(nearest_atom_labels(full, xyz, 2.3), brute_force_nearest(full, xyz, 2.3, periodic=True))
    assert np.array_equal(nearest_atom_labels(box, xyz_box, 1.8), brute_force_nearest(box, xyz_box, 1.8, False))
    assert (nearest_atom_labels(box, xyz_box, 1.8) >= 0).sum() > 50


def test_correlation_is_pearson():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(8, 9, 10)), rng.normal(size=(8, 9, 10))
    b += 0.5 * a
    m = DensityMap(a, MONO, (8, 9, 10), (0, 0, 0))
    assert correlation(m, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    mask = a > 0
    assert correlation(a, m.with_data(b), mask) == pytest.approx(np.corrcoef(a[mask], b[mask])[0, 1], abs=1e-12)
    assert correlation(m, m) == pytest.approx(1.0)


# ---- bad inputs --------------------------------------------------------------------------------------
def _one_line_error(path, match):
    with pytest.raises(InputError, match=match) as e:
        read_map(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.mrc", "map file not found")


def test_text_file_named_mrc(tmp_path):
    short = tmp_path / "short.mrc"
    short.write_text("ATOM      1  N   VAL A  29     374.004 218.320 164.211  1.00125.99\n")
    _one_line_error(short, "not a CCP4/MRC map")
    long = tmp_path / "long.mrc"
    long.write_text("ATOM      1  N   VAL A  29     374.004 218.320 164.211  1.00125.99\n" * 50)
    _one_line_error(long, "not a CCP4/MRC map: no 'MAP ' stamp")


def test_zero_size_map(tmp_path):
    good = write_map(DensityMap(np.ones((2, 2, 2), np.float32), MONO, (2, 2, 2), (0, 0, 0)), tmp_path / "g.mrc")
    raw = bytearray(good.read_bytes()[:1024])
    raw[0:12] = np.zeros(3, "<i4").tobytes()
    (tmp_path / "empty.mrc").write_bytes(bytes(raw))
    _one_line_error(tmp_path / "empty.mrc", "zero-size map")


def test_truncated_and_padded_files(permuted_map, tmp_path):
    raw = permuted_map[0].read_bytes()
    (tmp_path / "cut.mrc").write_bytes(raw[:-100])
    _one_line_error(tmp_path / "cut.mrc", "truncated")
    (tmp_path / "long.mrc").write_bytes(raw + b"\0" * 8)
    _one_line_error(tmp_path / "long.mrc", "longer than its header says")


def test_nan_in_data(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    path = write_with_gemmi(tmp_path / "nan.map", data, MONO, (4, 5, 6), (0, 0, 0))
    _one_line_error(path, "1 NaN value")
    with pytest.raises(InputError, match="NaN"):
        to_zarr(path, tmp_path / "nan.zarr")
    assert not (tmp_path / "nan.zarr").exists()


def test_zarr_store_without_map_geometry(tmp_path):
    import zarr

    zarr.create_array(store=str(tmp_path / "plain.zarr"), shape=(4, 4, 4), chunks=(2, 2, 2), dtype="f4")
    _one_line_error(tmp_path / "plain.zarr", "without drefine map geometry")
