"""Twin refinement end to end on synthetic twinned data: a small crystal in P 4₃ (a = b, twin
law h,−k,−l), data twinned with α = 0.4 by hand, a start shaken by 0.3 Å."""
import json

import gemmi
import numpy as np
import pytest
from conftest import p212121_structure, rmsd, write_xray_case

from drefine.cli import main
from drefine.density.synthetic import synthetic_reflections
from drefine.io.models import read_model
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
    write_xray_case(d, table, truth)
    return d, truth


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
    assert rmsd(model.atoms.xyz[heavy], truth.atoms.xyz[heavy]) < rmsd(plain_model.atoms.xyz[heavy],
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


def test_ensemble_members_refine_with_the_twin_law(twinned_case, tmp_path):
    """`drefine ensemble --mode xray` on twinned data: the members refine with the twin law the
    tests find (their R values are the twinned model's, far below an untwinned refinement's)."""
    d, _ = twinned_case
    out = tmp_path / "ens"
    assert main(["ensemble", str(d / "start.cif"), str(d / "data.mtz"), "--mode", "xray", "--n", "2", "--rmsd", "0.2",
                 "--weight", "2", "--scheduler", "inprocess", "-o", str(out)]) == 0
    rep = json.loads((out / "summary.json").read_text())
    assert len(rep["members"]) == 2
    for m in rep["members"]:
        assert 0 < m["r_work"] < 0.1 and 0 < m["r_free"] < 0.1  # (an untwinned refinement: ~0.2)


def test_a_free_set_made_for_twinned_data_is_chosen_in_twin_pairs(twinned_case, tmp_path, capsys):
    """Data without free flags: the test set drefine makes is remade so that twin mates share
    their flag (written to the output MTZ), and the log says so."""
    d, _ = twinned_case
    mtz = gemmi.read_mtz_file(str(d / "data.mtz"))
    free_col = [c.label for c in mtz.columns if c.type == "I"]
    assert free_col
    mtz.remove_column(mtz.column_labels().index(free_col[0]))
    mtz.write_to_file(str(tmp_path / "noflags.mtz"))
    assert main(["xray", str(d / "start.cif"), str(tmp_path / "noflags.mtz"), "-o", str(tmp_path / "out"),
                 "--cycles", "1", "--esd", "none"]) == 0
    assert "chosen in twin pairs" in capsys.readouterr().out
    from drefine.io.reflections import read_reflections

    table = read_reflections(tmp_path / "out.mtz")
    mate = twin_mates(table, "h,-k,-l")
    ok = mate >= 0
    assert table.free.any() and np.array_equal(table.free[ok], table.free[mate[ok]])


def test_validate_reports_twinning_and_the_twinned_r(twinned_case, tmp_path):
    d, _ = twinned_case
    out = tmp_path / "v.json"
    assert main(["validate", str(d / "truth.pdb"), "--mtz", str(d / "data.mtz"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())["details"]["data"]
    assert data["twinning"]["suspected"]
    tw = data["twinned"]
    assert tw["law"] in ("h,-k,-l", "-h,k,-l") and tw["fraction"] == pytest.approx(ALPHA, abs=0.05)
    # the true model: R with the twin law is small, without it it is not
    assert tw["r_free"] < 0.05 < data["r_free"]


def test_esds_of_a_twin_refinement_use_the_detwinned_data(twinned_case, tmp_path):
    """The esds' goodness of fit is taken against detwinned F_obs: far below the untwinned
    refinement's, whose residuals carry the twinning."""
    d, _ = twinned_case
    gof = {}
    for twin in ("auto", "off"):
        assert main(["xray", str(d / "truth.pdb"), str(d / "data.mtz"), "-o", str(tmp_path / twin), "--cycles", "1",
                     "--esd", "diagonal", "--twin", twin]) == 0
        u = json.loads((tmp_path / f"{twin}.json").read_text())["details"]["uncertainties"]
        gof[twin] = u["goodness_of_fit"]
    assert 0 < gof["auto"] < 0.5 * gof["off"]


def test_twin_refinement_in_atom_chunks_equals_in_process(twinned_case, tmp_path):
    """`--chunks 2` (the atom-chunk layout a cluster runs) gives the same twin refinement."""
    d, _ = twinned_case
    reps = {}
    for name, extra in (("one", []), ("chunks", ["--chunks", "2"])):
        assert main(["xray", str(d / "start.cif"), str(d / "data.mtz"), "-o", str(tmp_path / name), "--cycles", "2",
                     "--esd", "none", *extra]) == 0
        reps[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reps["one"]["details"]["twin"]["law"] == reps["chunks"]["details"]["twin"]["law"]
    assert reps["chunks"]["final"]["r_free"] == pytest.approx(reps["one"]["final"]["r_free"], abs=2e-4)
    assert reps["chunks"]["details"]["twin"]["fraction"] == pytest.approx(reps["one"]["details"]["twin"]["fraction"],
                                                                          abs=1e-3)
