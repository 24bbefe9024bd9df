"""Twin refinement end to end on synthetic twinned data: a small crystal in P 4₃ (a = b, twin
law h,−k,−l), data twinned with α = 0.4 by hand, a start shaken by 0.3 Å."""
import json

import gemmi
import numpy as np
import pytest
from conftest import p212121_structure

from drefine.cli import main
from drefine.density.synthetic import synthetic_reflections
from drefine.io.models import read_model, write_model
from drefine.model.perturb import shake_coordinates
from drefine.validate.twinning import twin_mates

ALPHA = 0.4


@pytest.fixture(scope="module")
def twinned_case(example_model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("twin")
    st = p212121_structure(example_model_path)
    a = max(st.cell.a, st.cell.b)
    st.cell = gemmi.UnitCell(a, a, st.cell.c, 90, 90, 90)
    st.spacegroup_hm = "P 43"
    st.setup_cell_images()
    st.write_pdb(str(d / "truth.pdb"))
    truth = read_model(d / "truth.pdb")
    table = synthetic_reflections(truth, 2.0, noise=0.02, seed=1)
    mate = twin_mates(table, "h,-k,-l")
    i = table.f_obs ** 2
    table.f_obs = np.sqrt((1 - ALPHA) * i + ALPHA * i[np.maximum(mate, 0)])
    table.phases_deg = None
    table.to_mtz(d / "data.mtz")
    shaken, _ = shake_coordinates(truth, 0.3, seed=5)
    write_model(shaken, d / "start.cif")
    return d, truth


def _rmsd(a, b):
    return float(np.sqrt(((a - b) ** 2).sum(1).mean()))


def test_twin_refinement_beats_untwinned_on_twinned_data(twinned_case, capsys):
    d, truth = twinned_case
    runs = {}
    for name, twin in (("twin", "auto"), ("plain", "off")):
        rc = main(["xray", str(d / "start.cif"), str(d / "data.mtz"), "-o", str(d / name), "--cycles", "4",
                   "--esd", "none", "--twin", twin])
        assert rc == 0
        runs[name] = json.loads((d / f"{name}.json").read_text()), read_model(d / f"{name}.cif")
    rep, model = runs["twin"]
    assert rep["details"]["twinning"]["suspected"]  # found by the tests, used by default
    assert rep["details"]["twin"]["law"] in ("h,-k,-l", "-h,k,-l")
    assert rep["details"]["twin"]["fraction"] == pytest.approx(ALPHA, abs=0.04)
    plain, plain_model = runs["plain"]
    assert plain["details"]["twin"] is None
    assert rep["final"]["r_free"] < plain["final"]["r_free"] - 0.03
    heavy = ~truth.atoms.is_hydrogen
    assert _rmsd(model.atoms.xyz[heavy], truth.atoms.xyz[heavy]) < _rmsd(plain_model.atoms.xyz[heavy],
                                                                        truth.atoms.xyz[heavy])
    # detwinned 2mFo-DFc: high at the refined atoms
    mp = gemmi.read_ccp4_map(str(d / "twin_2mFo-DFc.ccp4"))
    vals = [mp.grid.interpolate_value(gemmi.Position(*x)) for x in model.atoms.xyz[heavy][::5]]
    assert np.mean(vals) > 1.5
    assert "twin law" in capsys.readouterr().out


def test_bad_twin_law_is_one_line_error(twinned_case, capsys):
    d, _ = twinned_case
    for law in ("h,k,-l+1/2", "-k,h,l", "k,h"):  # a translation; P 4₃'s own 4-fold; not an operator
        rc = main(["xray", str(d / "start.cif"), str(d / "data.mtz"), "-o", str(d / "bad"), f"--twin={law}"])
        assert rc != 0
        err = capsys.readouterr().err
        assert "--twin" in err and "Traceback" not in err
