"""Map-model fit and map-target gradients against independent computations."""
import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.density.map_fit import map_model_fit
from drefine.density.model_map import model_map, model_map_gradient
from drefine.io.maps import DensityMap
from drefine.io.models import read_model
from drefine.model.perturb import shake_coordinates


def test_model_map_gradient_matches_finite_differences(data_dir):
    m = read_model(need(data_dir, "xray/6mw0/6mw0.cif"))  # anisotropic atoms, P 21 21 21
    shape, d = (24, 60, 64), 1.5
    rng = np.random.default_rng(0)
    target = model_map(m, m.cell, shape, d, source="xray", spacegroup=m.spacegroup) * (1 + 0.2 * rng.normal(size=shape))

    def t(model):
        r = model_map(model, m.cell, shape, d, source="xray", spacegroup=m.spacegroup)
        return 0.5 * ((r - target) ** 2).sum(), r - target

    _, g_map = t(m)
    g = model_map_gradient(m, m.cell, shape, d, g_map, source="xray", spacegroup=m.spacegroup)
    h = 1e-4
    for a in (3, 40, 77):
        for c in range(3):
            p, q = m.copy(), m.copy()
            p.atoms.xyz[a, c] += h
            q.atoms.xyz[a, c] -= h
            assert (t(p)[0] - t(q)[0]) / (2 * h) == pytest.approx(g.xyz[a, c], rel=1e-3, abs=1e-3)
        p, q = m.copy(), m.copy()
        p.atoms.occupancy[a] += h
        q.atoms.occupancy[a] -= h
        assert (t(p)[0] - t(q)[0]) / (2 * h) == pytest.approx(g.occ[a], rel=1e-3)


def _synthetic_case(data_dir, tmp_path, d_min=3.0):
    """The shared make_case recipe: 4hg7 in a padded P 1 box, gemmi's electron model map."""
    st = gemmi.read_structure(str(need(data_dir, "xray/4hg7/4hg7.pdb")))
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    st.remove_ligands_and_waters()
    xyz = np.array([cra.atom.pos.tolist() for cra in st[0].all()])
    lo = xyz.min(0) - 10
    size = xyz.max(0) + 10 - lo
    for cra in st[0].all():
        cra.atom.pos = gemmi.Position(*(np.array(cra.atom.pos.tolist()) - lo))
    st.cell = gemmi.UnitCell(*size, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st.setup_cell_images()
    st.write_pdb(str(tmp_path / "truth.pdb"))
    dc = gemmi.DensityCalculatorE()
    dc.d_min = d_min
    dc.rate = 1.5
    dc.set_refmac_compatible_blur(st[0])
    dc.grid.setup_from(st, spacing=d_min / 3)
    dc.put_model_density_on_grid(st[0])
    f = gemmi.transform_map_to_f_phi(dc.grid).prepare_asu_data(dmin=d_min, unblur=dc.blur)
    data = np.array(f.transform_f_phi_to_map(exact_size=[dc.grid.nu, dc.grid.nv, dc.grid.nw]), copy=True)
    dmap = DensityMap(data=data, cell=st.cell, sampling=np.array(data.shape), start=np.zeros(3, int))
    return st, dmap


def test_cc_mask_matches_an_independent_computation(data_dir, tmp_path):
    st, dmap = _synthetic_case(data_dir, tmp_path)
    truth = read_model(tmp_path / "truth.pdb")
    shaken, _ = shake_coordinates(truth, 0.5, seed=7)
    ours = map_model_fit(shaken, dmap, 3.0)
    # independent: gemmi model map of the shaken model + gemmi's 2.5 Å atom mask (as tools/metrics.py)
    sst = shaken.to_structure()
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 3.0
    dc.rate = 1.5
    dc.set_refmac_compatible_blur(sst[0])
    dc.grid.setup_from(sst, spacing=1.0)
    dc.put_model_density_on_grid(sst[0])
    f = gemmi.transform_map_to_f_phi(dc.grid).prepare_asu_data(dmin=3.0, unblur=dc.blur)
    calc = np.array(f.transform_f_phi_to_map(exact_size=list(dmap.data.shape)), copy=True)
    mask = gemmi.FloatGrid(*dmap.data.shape)
    mask.set_unit_cell(st.cell)
    for cra in sst[0].all():
        mask.set_points_around(cra.atom.pos, 2.5, 1.0)
    msk = np.array(mask, copy=False) > 0.5
    assert ours["mask_points"] == int(msk.sum())
    assert ours["cc_mask"] == pytest.approx(np.corrcoef(calc[msk], dmap.data[msk])[0, 1], abs=1e-4)
    assert ours["cc_box"] == pytest.approx(np.corrcoef(calc.ravel(), dmap.data.ravel())[0, 1], abs=1e-4)
    # the truth fits its own map perfectly; every residue of it correlates almost perfectly
    perfect = map_model_fit(truth, dmap, 3.0)
    assert perfect["cc_mask"] > 0.999 and perfect["per_residue"]["mean"] > 0.99
    assert ours["cc_mask"] < perfect["cc_mask"]
