"""Structure factors: direct summation vs gemmi, FFT vs direct vs gemmi's FFT, dask vs in-process,
and gradients against finite differences and against each other."""
import copy

import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.density.direct import (
    direct_gradient,
    direct_structure_factors,
    direct_structure_factors_dask,
    scatterers_of_model,
)
from drefine.density.fft import fft_gradient, fft_structure_factors
from drefine.io.models import read_model


def rel(a, b):
    return float(np.abs(a - b).sum() / np.abs(b).sum())


def miller(model, d_min):
    return np.array(gemmi.make_miller_array(model.cell, model.spacegroup, d_min, 0, True))


@pytest.fixture(scope="module")
def truth(data_dir):
    return read_model(need(data_dir, "untangle/ground_truth.pdb"))


@pytest.fixture(scope="module")
def orl(data_dir):
    return read_model(need(data_dir, "xray/5orl/5orl.pdb"))


@pytest.mark.parametrize("source", ["xray", "electron"])
def test_direct_matches_gemmi_direct(truth, source):
    sc = scatterers_of_model(truth, source=source)
    hkl = miller(truth, 2.0)[::3]
    calc = (gemmi.StructureFactorCalculatorX if source == "xray" else gemmi.StructureFactorCalculatorE)(truth.cell)
    ref = np.array([calc.calculate_sf_from_model(truth.structure[0], [int(x) for x in h]) for h in hkl])
    assert rel(direct_structure_factors(sc, hkl), ref) < 1e-6


def test_direct_matches_gemmi_in_p6122_with_aniso(orl, data_dir):
    for m, d in ((orl, 3.0), (read_model(need(data_dir, "xray/6mw0/6mw0.cif")), 1.0)):
        sc = scatterers_of_model(m)
        hkl = miller(m, d)[::4]
        calc = gemmi.StructureFactorCalculatorX(m.cell)
        ref = np.array([calc.calculate_sf_from_model(m.structure[0], [int(x) for x in h]) for h in hkl])
        assert rel(direct_structure_factors(sc, hkl), ref) < 1e-6


@pytest.mark.parametrize("which,d_min", [("truth", 0.96), ("orl", 2.5)])
def test_fft_matches_direct_and_gemmi(truth, orl, which, d_min):
    m = truth if which == "truth" else orl
    sc = scatterers_of_model(m)
    hkl = miller(m, d_min)
    f_fft = fft_structure_factors(sc, hkl, d_min=d_min)
    sub = slice(None, None, 4 if which == "truth" else 1)
    f_dir = direct_structure_factors(sc, hkl[sub])
    assert rel(f_fft[sub], f_dir) < 1e-4
    st = m.structure
    dc = gemmi.DensityCalculatorX()
    dc.d_min = d_min
    dc.rate = 1.5
    dc.set_refmac_compatible_blur(st[0])
    dc.grid.setup_from(st)
    dc.put_model_density_on_grid(st[0])
    g = gemmi.transform_map_to_f_phi(dc.grid)
    s2 = ((hkl @ sc.frac_matrix) ** 2).sum(1)
    f_gemmi = np.array([g.get_value(*map(int, h)) for h in hkl]) * np.exp(dc.blur * s2 / 4)
    assert rel(f_fft, f_gemmi) < 1e-4


def test_dask_blocks_equal_in_process(truth):
    sc = scatterers_of_model(truth)
    hkl = miller(truth, 2.0)
    ref = direct_structure_factors(sc, hkl)
    for rc, ac in ((500, 300), (4096, 2050), (777, 1000)):
        f = direct_structure_factors_dask(sc, hkl, reflection_chunk=rc, atom_chunk=ac).compute(scheduler="threads")
        assert rel(f, ref) < 1e-10


def _ls_target(sc, hkl, fo):
    f = direct_structure_factors(sc, hkl)
    a = np.abs(f)
    return float(((a - fo) ** 2).sum()), 2 * (a - fo) * f / a


def test_direct_gradients_match_finite_differences(data_dir):
    m = read_model(need(data_dir, "xray/6mw0/6mw0.cif"))  # anisotropic U, altlocs, P 21 21 21
    sc = scatterers_of_model(m)
    hkl = miller(m, 1.2)
    rng = np.random.default_rng(1)
    fo = np.abs(direct_structure_factors(sc, hkl)) * (1 + 0.1 * rng.normal(size=len(hkl)))
    _, d = _ls_target(sc, hkl, fo)
    g = direct_gradient(sc, hkl, d)
    h = 1e-5
    for a in (0, 17, 44):
        for c in range(3):
            p, q = copy.deepcopy(sc), copy.deepcopy(sc)
            p.frac[a] += sc.frac_matrix[:, c] * h
            q.frac[a] -= sc.frac_matrix[:, c] * h
            fd = (_ls_target(p, hkl, fo)[0] - _ls_target(q, hkl, fo)[0]) / (2 * h)
            assert fd == pytest.approx(g.xyz[a, c], rel=1e-5, abs=1e-6)
        p, q = copy.deepcopy(sc), copy.deepcopy(sc)
        p.occ[a] += h
        q.occ[a] -= h
        assert (_ls_target(p, hkl, fo)[0] - _ls_target(q, hkl, fo)[0]) / (2 * h) == pytest.approx(g.occ[a], rel=1e-5)
        for j in (0, 4):
            p, q = copy.deepcopy(sc), copy.deepcopy(sc)
            p.u_cart[a, j] += h
            q.u_cart[a, j] -= h
            fd = (_ls_target(p, hkl, fo)[0] - _ls_target(q, hkl, fo)[0]) / (2 * h)
            assert fd == pytest.approx(g.u[a, j], rel=1e-5)


@pytest.mark.parametrize("rel_path,d_min", [("xray/6mw0/6mw0.cif", 1.0), ("untangle/ground_truth.pdb", 1.5)])
def test_fft_gradients_match_direct(data_dir, rel_path, d_min):
    m = read_model(need(data_dir, rel_path))
    sc = scatterers_of_model(m)
    hkl = miller(m, d_min)
    rng = np.random.default_rng(2)
    fo = np.abs(direct_structure_factors(sc, hkl)) * (1 + 0.1 * rng.normal(size=len(hkl)))
    _, d = _ls_target(sc, hkl, fo)
    gd, gf = direct_gradient(sc, hkl, d), fft_gradient(sc, hkl, d, d_min=d_min)
    for k in ("xyz", "occ", "u", "b_iso"):
        a, b = getattr(gd, k), getattr(gf, k)
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4, k


@pytest.mark.parametrize("with_aniso,cell", [(False, "orthorhombic"), (True, "orthorhombic"), (False, "hexagonal"),
                                             (True, "hexagonal")])
def test_factorised_kernels_equal_the_row_recurrence(example_model_path, with_aniso, cell, monkeypatch):
    """Isotropic atoms on a cell with c ⟂ a, b are spread and gathered by factorised Gaussians;
    the density and every gradient part (position, B/U, occupancy) equal the general
    row-recurrence kernels', also with anisotropic atoms mixed in (those take the general path)
    and symmetry (P 2₁2₁2₁, and P 6₁22 on a hexagonal cell where only c factorises)."""
    from drefine.density import fft

    m = read_model(example_model_path)
    st = m.structure.clone()
    if cell == "orthorhombic":
        st.cell = gemmi.UnitCell(60.0, 64.0, 58.0, 90, 90, 90)
        st.spacegroup_hm = "P 21 21 21"
    else:
        st.cell = gemmi.UnitCell(62.0, 62.0, 70.0, 90, 90, 120)
        st.spacegroup_hm = "P 61 2 2"
    st.setup_cell_images()
    m = read_model_from(st)
    rng = np.random.default_rng(4)
    m.atoms.b_iso[:] = rng.uniform(8, 60, len(m.atoms))
    m.atoms.occupancy[::5] = 0.6
    if with_aniso:
        u = np.zeros((len(m.atoms), 6))
        u[:, :3] = rng.uniform(0.1, 0.5, (len(m.atoms), 3))
        u[:, 3] = 0.03
        m.atoms.u_aniso[::3] = u[::3]
        m.atoms.has_aniso[::3] = True
    sc = scatterers_of_model(m)
    assert len(sc.rot) == (4 if cell == "orthorhombic" else 12) and fft._c_perpendicular(sc.orth_matrix)
    assert fft._is_orthogonal(sc.orth_matrix) == (cell == "orthorhombic")
    shape = (64, 72, 64)
    b_add = fft.choose_blur(sc, shape, 2.5)
    gmap = rng.normal(size=shape)
    out = {}
    for factorised in (True, False):
        monkeypatch.setattr(fft, "FACTORISED_KERNELS", factorised)
        for threads in (1, 2):
            rho = fft.atom_density_grid(sc, shape, b_add, 1e-6, threads)
            gr = fft.gather_gradient(sc, gmap, b_add, 0.7, 1e-6, threads)
            out[factorised, threads] = (rho, gr)
    ref_rho, ref = out[False, 1]
    for key, (rho, gr) in out.items():
        assert np.abs(rho - ref_rho).max() <= 1e-12 * np.abs(ref_rho).max(), key
        for part in ("xyz", "b_iso", "occ", "u"):
            a, b = getattr(gr, part), getattr(ref, part)
            assert np.abs(a - b).max() <= 1e-10 * np.abs(b).max(), (key, part)


def read_model_from(st: gemmi.Structure):
    from drefine.model.arrays import Model, arrays_from_structure

    atoms, residues = arrays_from_structure(st)
    return Model(structure=st, atoms=atoms, residues=residues, source="test")
