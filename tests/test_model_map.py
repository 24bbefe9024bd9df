"""Model maps against gemmi's recipe (DensityCalculatorE, unblur, sharp resolution cut)."""
import numpy as np
import pytest
from conftest import boxed_structure, gemmi_model_map, need

from drefine.density.model_map import model_map
from drefine.io.models import read_model


@pytest.mark.parametrize("d_min,electron", [(3.0, True), (2.0, False)])
def test_model_map_matches_gemmi(data_dir, tmp_path, d_min, electron):
    st = boxed_structure(need(data_dir, "xray/4hg7/4hg7.pdb"))
    st.write_pdb(str(tmp_path / "box.pdb"))
    ref = gemmi_model_map(st, d_min, electron)
    ours = model_map(read_model(tmp_path / "box.pdb"), st.cell, ref.shape, d_min,
                     source="electron" if electron else "xray")
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99999
    assert (ours * ref).sum() / (ref * ref).sum() == pytest.approx(1.0, abs=1e-3)
