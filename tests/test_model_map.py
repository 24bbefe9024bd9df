"""Model maps against gemmi's recipe (DensityCalculatorE, unblur, sharp resolution cut)."""
import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.density.model_map import model_map
from drefine.io.models import read_model


@pytest.mark.parametrize("d_min,electron", [(3.0, True), (2.0, False)])
def test_model_map_matches_gemmi(data_dir, tmp_path, d_min, electron):
    st = gemmi.read_structure(str(need(data_dir, "xray/4hg7/4hg7.pdb")))
    st.setup_entities()
    st.remove_alternative_conformations()
    st.remove_ligands_and_waters()
    # in a P 1 box, as for a cryo-EM map
    xyz = np.array([cra.atom.pos.tolist() for cra in st[0].all()])
    lo = xyz.min(0) - 8
    size = xyz.max(0) + 8 - lo
    for cra in st[0].all():
        cra.atom.pos = gemmi.Position(*(np.array(cra.atom.pos.tolist()) - lo))
    st.cell = gemmi.UnitCell(*size, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st.setup_cell_images()
    st.write_pdb(str(tmp_path / "box.pdb"))
    dc = gemmi.DensityCalculatorE() if electron else gemmi.DensityCalculatorX()
    dc.d_min = d_min
    dc.rate = 1.5
    dc.set_refmac_compatible_blur(st[0])
    dc.grid.setup_from(st, spacing=d_min / 3)
    dc.put_model_density_on_grid(st[0])
    f = gemmi.transform_map_to_f_phi(dc.grid).prepare_asu_data(dmin=d_min, unblur=dc.blur)
    ref = np.array(f.transform_f_phi_to_map(exact_size=[dc.grid.nu, dc.grid.nv, dc.grid.nw]), copy=True)
    ours = model_map(read_model(tmp_path / "box.pdb"), st.cell, ref.shape, d_min,
                     source="electron" if electron else "xray")
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99999
    assert (ours * ref).sum() / (ref * ref).sum() == pytest.approx(1.0, abs=1e-3)
