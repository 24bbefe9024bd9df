"""Map-model fit and map-target gradients against independent computations."""
import gemmi
import numpy as np
import pytest
from conftest import boxed_structure, gemmi_model_map, need

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
    st = boxed_structure(need(data_dir, "xray/4hg7/4hg7.pdb"), padding=10.0, remove_hydrogens=True)
    st.write_pdb(str(tmp_path / "truth.pdb"))
    data = gemmi_model_map(st, d_min)
    dmap = DensityMap(data=data, cell=st.cell, sampling=np.array(data.shape), start=np.zeros(3, int))
    return st, dmap


def test_cc_mask_matches_an_independent_computation(data_dir, tmp_path):
    st, dmap = _synthetic_case(data_dir, tmp_path)
    truth = read_model(tmp_path / "truth.pdb")
    shaken, _ = shake_coordinates(truth, 0.5, seed=7)
    ours = map_model_fit(shaken, dmap, 3.0)
    # independent: gemmi model map of the shaken model + gemmi's 2.5 Å atom mask (as tools/metrics.py)
    sst = shaken.to_structure()
    calc = gemmi_model_map(sst, 3.0, spacing=1.0, shape=dmap.data.shape)
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
