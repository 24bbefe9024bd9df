"""Tricubic (Keys) interpolation at atom positions, in memory and chunked, against independent references.

References: an analytic sum of Gaussians sampled on the grid (values, analytic gradient), central
finite differences of the interpolated field, gemmi's own Catmull–Rom tricubic
(Grid.tricubic_interpolation_der), scipy.ndimage.map_coordinates (order=1) as a sanity bound.
None of these tests needs the shared data.
"""
import dask.array as da
import gemmi
import numpy as np
import pytest
from scipy import ndimage

from drefine.density.interpolate import interpolate, interpolate_chunked, trilinear
from drefine.errors import InputError
from drefine.io.maps import DensityMap, read_zarr, write_zarr

TRICLINIC = gemmi.UnitCell(18.0, 20.0, 22.0, 80.0, 95.0, 105.0)
CENTRES = np.array([[0.30, 0.40, 0.50], [0.55, 0.35, 0.62], [0.42, 0.66, 0.38], [0.70, 0.70, 0.30],
                    [0.05, 0.50, 0.50]])  # fractional; the last one straddles the a edge
HEIGHTS = np.array([1.0, 0.7, -0.4, 0.9, 0.8])
SIGMA = 1.6  # Å


def gaussians(cell: gemmi.UnitCell, xyz: np.ndarray, periodic: bool = True):
    """Σ heights·exp(−r²/2σ²) over the centres and (if periodic) their 26 neighbouring images; value, gradient."""
    O = np.array(cell.orth.mat.tolist())
    shifts = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]) if periodic \
        else np.zeros((1, 3))
    val = np.zeros(len(xyz))
    grad = np.zeros((len(xyz), 3))
    for c, h in zip(CENTRES, HEIGHTS):
        for s in shifts:
            d = xyz - (c + s) @ O.T
            e = h * np.exp(-(d * d).sum(axis=1) / (2 * SIGMA**2))
            val += e
            grad += -e[:, None] * d / SIGMA**2
    return val, grad


def sampled_map(cell=TRICLINIC, spacing=0.5, periodic=True, start=(0, 0, 0), shape=None, origin=(0.0, 0.0, 0.0)):
    """A DensityMap of the Gaussian field on the grid of `cell` at about `spacing` Å (float64 data)."""
    sampling = np.rint(np.array([cell.a, cell.b, cell.c]) / spacing).astype(int)
    shape = tuple(sampling) if shape is None else tuple(shape)
    geom = DensityMap(np.zeros(shape), cell, sampling, start, origin)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = geom.xyz_of_index(idx)
    val, _ = gaussians(cell, xyz - geom.origin, periodic)
    return geom.with_data(val.reshape(shape))


@pytest.fixture(scope="module")
def field():
    return sampled_map()


def random_points(m: DensityMap, n: int, seed: int = 0, lo=0.0, hi=1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frac = rng.uniform(lo, hi, size=(n, 3))
    return frac @ m.orth_matrix.T + m.origin


def test_grid_points_reproduce_exactly(field):
    rng = np.random.default_rng(1)
    idx = rng.integers(0, field.shape, size=(300, 3))
    res = interpolate(field, field.xyz_of_index(idx))
    expect = field.data[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert np.allclose(res.values, expect, rtol=0, atol=1e-12 * np.abs(field.data).max())
    # at a grid point the weights are (0, 1, 0, 0): exactly the sample, with integral grid coordinates
    assert interpolate(field, field.xyz_of_index([[3, 4, 5]])).values[0] == pytest.approx(field.data[3, 4, 5],
                                                                                          abs=1e-12)


def test_values_between_points_converge_at_third_order():
    """Max error against the analytic field drops ~8× when the spacing halves (cubic convergence)."""
    errs = []
    for spacing in (0.8, 0.4):
        m = sampled_map(spacing=spacing)
        xyz = random_points(m, 2000, seed=2)
        exact, _ = gaussians(m.cell, xyz)
        errs.append(np.abs(interpolate(m, xyz).values - exact).max())
    assert errs[1] < 0.02 * np.abs(HEIGHTS).max()
    assert errs[0] / errs[1] > 5.0, errs


def test_tricubic_beats_trilinear_and_agrees_with_scipy_linear(field):
    xyz = random_points(field, 3000, seed=3)
    exact, _ = gaussians(field.cell, xyz)
    cubic = interpolate(field, xyz).values
    g = np.mod(field.index_of_xyz(xyz), field.shape)
    lin_scipy = ndimage.map_coordinates(field.data, g.T, order=1, mode="grid-wrap")
    lin = trilinear(field, xyz)
    assert np.allclose(lin, lin_scipy, atol=1e-12)
    err_cubic = np.abs(cubic - exact).max()
    err_lin = np.abs(lin_scipy - exact).max()
    assert err_cubic < 0.25 * err_lin
    # sanity bound: the two interpolants differ by no more than their errors allow
    assert np.abs(cubic - lin_scipy).max() <= err_cubic + err_lin


def test_gradient_matches_finite_differences_of_the_interpolated_field(field):
    xyz = random_points(field, 400, seed=4)
    res = interpolate(field, xyz)
    h = 1e-5
    fd = np.empty_like(xyz)
    for ax in range(3):
        step = np.zeros(3)
        step[ax] = h
        fd[:, ax] = (interpolate(field, xyz + step).values - interpolate(field, xyz - step).values) / (2 * h)
    scale = np.abs(res.gradient).max()
    assert np.abs(fd - res.gradient).max() <= 1e-6 * scale


def test_gradient_approximates_the_analytic_gradient(field):
    xyz = random_points(field, 1000, seed=5)
    _, exact = gaussians(field.cell, xyz)
    res = interpolate(field, xyz)
    scale = np.abs(exact).max()
    assert np.abs(res.gradient - exact).max() < 0.05 * scale
    assert np.linalg.norm(res.gradient - exact) < 0.02 * np.linalg.norm(exact)


def test_agrees_with_gemmi_catmull_rom():
    """gemmi's Grid.tricubic_interpolation_der is the same interpolant, written independently."""
    rng = np.random.default_rng(6)
    data = rng.normal(size=(20, 24, 18)).astype(np.float32)
    m = DensityMap(data, TRICLINIC, data.shape, (0, 0, 0))
    grid = gemmi.FloatGrid(data, TRICLINIC, gemmi.SpaceGroup("P 1"))
    frac = rng.uniform(-0.2, 1.2, size=(200, 3))
    xyz = frac @ m.orth_matrix.T
    res = interpolate(m, xyz)
    ref = np.array([grid.tricubic_interpolation_der(gemmi.Fractional(*f)) for f in frac])
    assert np.allclose(res.values, ref[:, 0], rtol=0, atol=1e-9)
    # gemmi gives ∂/∂(fractional); ours is ∂/∂xyz = Fᵀ ∂/∂frac
    assert np.allclose(res.gradient, ref[:, 1:] @ m.frac_matrix, rtol=0, atol=1e-8)


def test_periodic_wrap_across_the_cell_edge(field):
    O = field.orth_matrix
    xyz = random_points(field, 200, seed=7)
    base = interpolate(field, xyz)
    for shift in ([1, 0, 0], [0, -1, 0], [2, 1, -3]):
        moved = interpolate(field, xyz + np.asarray(shift, float) @ O.T)
        assert np.allclose(moved.values, base.values, atol=1e-10)
        assert np.allclose(moved.gradient, base.gradient, atol=1e-9)
    # points between the last grid plane and the first: the same field as a map rolled by half a cell
    k = field.shape[0] // 2
    rolled = DensityMap(np.roll(field.data, -k, axis=0), field.cell, field.sampling, (k, 0, 0))
    rng = np.random.default_rng(8)
    frac = np.column_stack([rng.uniform(-0.02, 0.02, 100), rng.uniform(0, 1, 100), rng.uniform(0, 1, 100)])
    p = frac @ O.T
    a, b = interpolate(field, p), interpolate(rolled, p)
    assert np.allclose(a.values, b.values, atol=1e-12)
    assert np.allclose(a.gradient, b.gradient, atol=1e-10)
    exact, _ = gaussians(field.cell, p)  # the Gaussian at fractional a = 0.05 straddles this edge
    assert np.abs(a.values - exact).max() < 0.02


def test_outside_a_box_gives_nan_and_a_count():
    box = sampled_map(cell=gemmi.UnitCell(20, 22, 24, 90, 90, 90), spacing=0.5, start=(4, 6, 8),
                      shape=(20, 22, 24), origin=(1.5, -2.0, 0.25), periodic=False)
    assert not box.is_full_cell
    inside = box.xyz_of_index(np.array([[0, 0, 0], [19, 21, 23], [0.2, 10.5, 23.0], [10.3, 0.0, 5.5]]))
    outside = box.xyz_of_index(np.array([[-0.01, 5, 5], [5, 21.2, 5], [30, 30, 30], [5, 5, -4]]))
    res = interpolate(box, np.vstack([inside, outside]))
    assert np.isfinite(res.values[:4]).all() and np.isfinite(res.gradient[:4]).all()
    assert np.isnan(res.values[4:]).all() and np.isnan(res.gradient[4:]).all()
    assert res.n_outside == 4
    assert res.outside.tolist() == [False] * 4 + [True] * 4
    assert box.covers(np.vstack([inside, outside])) == 0.5
    # on a face up to round-off is inside, with the face value
    face = box.xyz_of_index(np.array([[-1e-9, 3, 4], [19 + 1e-9, 3, 4]]))
    assert interpolate(box, face).values == pytest.approx(box.data[[0, 19], 3, 4], abs=1e-6)
    with pytest.raises(InputError, match="4 of 8 atoms outside the map"):
        interpolate(box, np.vstack([inside, outside]), on_outside="error")
    # inside and away from the faces the box interpolates the field like a full cell would
    p = box.xyz_of_index(np.random.default_rng(9).uniform(2, 17, size=(100, 3)))
    exact, _ = gaussians(box.cell, p - box.origin, periodic=False)
    assert np.abs(interpolate(box, p).values - exact).max() < 0.02


def test_full_cell_can_be_treated_as_a_box(field):
    p = field.xyz_of_index(np.array([[-0.5, 3, 3], [3, 3, 3]]))
    assert np.isfinite(interpolate(field, p).values).all()
    res = interpolate(field, p, periodic=False)
    assert res.n_outside == 1 and np.isnan(res.values[0]) and np.isfinite(res.values[1])
    with pytest.raises(ValueError, match="full cell"):
        interpolate(DensityMap(field.data[:10], field.cell, field.sampling, (0, 0, 0)), p, periodic=True)


# ---- chunked evaluation ----------------------------------------------------------------------
def _chunked(m: DensityMap, chunks) -> DensityMap:
    return m.with_data(da.from_array(m.data, chunks=chunks))


def _border_points(m: DensityMap, chunks) -> np.ndarray:
    """Positions exactly on chunk borders (integer grid coordinates at chunk starts and ends)."""
    rng = np.random.default_rng(10)
    borders = [np.unique(np.r_[np.arange(0, n, c), np.arange(c - 1, n, c), n - 1]) for n, c in zip(m.shape, chunks)]
    idx = np.column_stack([rng.choice(b, 200) for b in borders]).astype(float)
    idx[::3, 1] += rng.uniform(0, 0.99, len(idx[::3]))  # on a border plane in two axes only
    idx[:, 1] = np.minimum(idx[:, 1], m.shape[1] - 1)
    return m.xyz_of_index(idx)


@pytest.mark.parametrize("chunks", [(3, 4, 5), (7, 7, 7), (16, 9, 40), (64, 64, 64)])
def test_chunked_identical_to_in_memory_full_cell(field, chunks):
    rng = np.random.default_rng(11)
    xyz = np.vstack([random_points(field, 500, seed=12, lo=-0.3, hi=1.3), _border_points(field, chunks)])
    xyz = xyz[rng.permutation(len(xyz))]
    ref = interpolate(field, xyz)
    res = interpolate_chunked(_chunked(field, chunks), xyz)
    assert np.abs(res.values - ref.values).max() <= 1e-12
    assert np.abs(res.gradient - ref.gradient).max() <= 1e-12


@pytest.mark.parametrize("chunks", [(3, 4, 5), (8, 5, 24), (2, 2, 2)])
def test_chunked_identical_to_in_memory_box(chunks):
    box = sampled_map(cell=gemmi.UnitCell(12, 13, 14, 90, 100, 90), spacing=0.5, start=(3, 2, 1),
                      shape=(14, 15, 16), origin=(0.5, 0.5, -0.5), periodic=False)
    rng = np.random.default_rng(13)
    idx = np.vstack([rng.uniform(-1, np.array(box.shape), size=(400, 3)),  # some outside
                     np.array([[0, 0, 0], [13, 14, 15], [13, 0, 15], [0, 7.5, 15]])])
    xyz = np.vstack([box.xyz_of_index(idx), _border_points(box, chunks)])
    ref = interpolate(box, xyz)
    res = interpolate_chunked(_chunked(box, chunks), xyz)
    assert ref.n_outside > 0 and res.n_outside == ref.n_outside
    assert np.array_equal(np.isnan(res.values), np.isnan(ref.values))
    ok = ~ref.outside
    assert np.abs(res.values[ok] - ref.values[ok]).max() <= 1e-12
    assert np.abs(res.gradient[ok] - ref.gradient[ok]).max() <= 1e-12


def test_chunked_from_a_zarr_store(tmp_path, field):
    write_zarr(field, tmp_path / "f.zarr", chunks=(6, 11, 8))
    z = read_zarr(tmp_path / "f.zarr")
    assert z.is_chunked and z.data.chunksize == (6, 11, 8)
    xyz = random_points(field, 700, seed=14, lo=-0.5, hi=1.5)
    ref = interpolate(field, xyz)
    res = interpolate_chunked(z, xyz, compute_kwargs={"scheduler": "synchronous"})
    assert np.abs(res.values - ref.values).max() <= 1e-12
    assert np.abs(res.gradient - ref.gradient).max() <= 1e-12
    # interpolate() hands a chunked map to the chunked path
    assert np.array_equal(interpolate(z, xyz).values, res.values)


def test_chunked_reads_only_the_chunks_near_atoms(tmp_path):
    """Chunks of the store that no atom's stencil reaches are never read: corrupt them and still succeed."""
    rng = np.random.default_rng(16)
    m = DensityMap(rng.normal(size=(24, 24, 24)), gemmi.UnitCell(24, 24, 24, 90, 90, 90), (24, 24, 24), (0, 0, 0))
    store = write_zarr(m, tmp_path / "c.zarr", chunks=(6, 6, 6))
    needed = {3, 0, 1}  # atoms in chunk 0 of every axis: it, its neighbour and the wrapped one (3)
    for i, j, k in np.ndindex(4, 4, 4):
        if not {i, j, k} <= needed:
            (store / "c" / str(i) / str(j) / str(k)).write_bytes(b"not a chunk")
    z = read_zarr(store)
    with pytest.raises((RuntimeError, ValueError, OSError)):  # the corruption is detectable
        z.data.blocks[2, 2, 2].compute()
    xyz = m.xyz_of_index(rng.uniform(0, 5.99, size=(50, 3)))
    res = interpolate_chunked(z, xyz)
    assert np.abs(res.values - interpolate(m, xyz).values).max() <= 1e-12


def test_chunked_rejects_a_too_small_halo(field):
    with pytest.raises(ValueError, match="halo"):
        interpolate_chunked(_chunked(field, 8), random_points(field, 5), halo=1)


def test_float32_data_and_serial_kernel_agree(field):
    m32 = field.with_data(field.data.astype(np.float32))
    xyz = random_points(field, 300, seed=15)
    a = interpolate(m32, xyz)
    b = interpolate(m32, xyz, parallel=False)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.gradient, b.gradient)
    assert np.abs(a.values - interpolate(field, xyz).values).max() < 1e-6


@pytest.mark.parametrize("periodic", [True, False])
def test_prepared_interpolator_gives_interpolate_s_numbers(field, periodic):
    """TricubicInterpolator (prepared once for a minimiser's many calls) returns exactly what
    `interpolate` does: on a full cell with wrapping, and on a box with positions outside it."""
    from drefine.density.interpolate import TricubicInterpolator

    if periodic:
        m = field
        xyz = random_points(field, 300, seed=11, lo=-0.5, hi=1.5)  # across the cell's edges
    else:
        m = sampled_map(cell=gemmi.UnitCell(20, 22, 24, 90, 90, 90), spacing=0.5, start=(4, 6, 8),
                        shape=(20, 22, 24), origin=(1.5, -2.0, 0.25), periodic=False)
        xyz = m.xyz_of_index(np.random.default_rng(12).uniform(-2, 25, size=(300, 3)))
    expected = interpolate(m, xyz, periodic=periodic)
    for parallel in (True, False):
        got = TricubicInterpolator(m, periodic, parallel)(xyz)
        assert np.array_equal(got.values, expected.values, equal_nan=True)
        assert np.array_equal(got.gradient, expected.gradient, equal_nan=True)
    if not periodic:
        assert 0 < got.n_outside < len(xyz)
