"""The command line as a user meets it: reports, outputs, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, need

from drefine.cli import main
from drefine.io.models import read_model


def run_cli(*args, env=None):
    """Run `drefine` in a fresh interpreter, as a user would; returns (code, stdout, stderr)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "drefine.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=REPO, timeout=300, check=False)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, out, err, *words):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def test_validate_example_json_shape(example_model_path, tmp_path):
    out = tmp_path / "report.json"
    code = main(["validate", str(example_model_path), "--json", str(out), "-o", str(tmp_path / "report.txt")])
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["program"] == "drefine validate" and rep["version"]
    assert set(rep) >= {"program", "version", "inputs", "final", "timing"}
    for key in ("bonds_rmsd", "angles_rmsd", "bonds_rmsz", "angles_rmsz", "clashscore", "rama_outliers",
                "rotamer_outliers"):
        assert key in rep["final"]
    assert 0 < rep["final"]["bonds_rmsd"] < 0.05
    assert rep["timing"]["wall_s"] > 0
    assert (tmp_path / "report.txt").read_text().startswith("drefine validate")


def test_validate_otw39_lists_ala39(data_dir, tmp_path, capsys):
    out = tmp_path / "v.json"
    code = main(["validate", str(need(data_dir, "untangle/otw39.pdb")), "--monlib", str(need(data_dir, "monlib")),
                 "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "A/ALA 39/N.A - A/ALA 39/CA.A  1.622" in text
    assert "A/ALA 39/N.B - A/ALA 39/CA.B  1.336" in text
    rep = json.loads(out.read_text())
    assert rep["final"]["rama_outliers"] is not None
    assert rep["details"]["occupancies"]["n_residues_with_altlocs"] > 0


def test_validate_without_tables_says_not_computed(example_model_path, tmp_path):
    out = tmp_path / "v.json"
    code, stdout, _ = run_cli("validate", example_model_path, "--json", out,
                              env={"DREFINE_TEST_DATA": str(tmp_path / "nowhere"), "DREFINE_RAMA_DATA": ""})
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["final"]["rama_outliers"] is None and rep["details"]["ramachandran"]["computed"] is False
    assert "Ramachandran not computed" in stdout


def test_validate_nmr_models_on_a_local_cluster(data_dir, tmp_path):
    out = tmp_path / "nmr.json"
    code = main(["validate", str(need(data_dir, "models/1LVZ.pdb")), "--monlib", str(need(data_dir, "monlib")),
                 "--json", str(out), "--workers", "2"])
    assert code == 0
    rep = json.loads(out.read_text())
    assert len(rep["models"]) == 20
    assert len({round(m["bonds_rmsd"], 6) for m in rep["models"]}) > 1  # the models differ


def test_shake_is_seeded_and_exact(example_model_path, tmp_path):
    a, b, c = tmp_path / "a.cif", tmp_path / "b.cif", tmp_path / "c.pdb"
    assert main(["shake", str(example_model_path), "--rms", "0.5", "--seed", "7", "-o", str(a),
                 "--no-validate"]) == 0
    assert main(["shake", str(example_model_path), "--rms", "0.5", "--seed", "7", "-o", str(b),
                 "--json", str(tmp_path / "s.json")]) == 0
    assert main(["shake", str(example_model_path), "--rms", "0.5", "--seed", "8", "-o", str(c),
                 "--no-validate"]) == 0
    m0, ma, mb, mc = (read_model(p) for p in (example_model_path, a, b, c))
    d = np.sqrt(((ma.atoms.xyz - m0.atoms.xyz) ** 2).sum(1).mean())
    assert d == pytest.approx(0.5, abs=1e-3)  # written with 3 decimals
    np.testing.assert_array_equal(ma.atoms.xyz, mb.atoms.xyz)
    assert not np.allclose(ma.atoms.xyz, mc.atoms.xyz)
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["final"]["rms_shift"] == pytest.approx(0.5) and rep["final"]["bonds_rmsd"] > 0.1


def test_shake_selection(example_model_path, tmp_path):
    out = tmp_path / "sel.cif"
    assert main(["shake", str(example_model_path), "--rms", "1.0", "--selection", "A/1-5", "-o", str(out),
                 "--no-validate"]) == 0
    m0, m1 = read_model(example_model_path), read_model(out)
    moved = np.linalg.norm(m1.atoms.xyz - m0.atoms.xyz, axis=1) > 1e-6
    assert moved.any() and (m0.residues.seqnum[m0.atoms.residue_index[moved]] <= 5).all()


# --- bad input: one line naming the problem, non-zero exit, no traceback, nothing half-written ----

def test_missing_file():
    assert_one_line_error(*run_cli("validate", "no/such/model.pdb"), "not found", "no/such/model.pdb")


@pytest.mark.parametrize("command", ["ensemble", "weight-scan"])
def test_batch_command_missing_data(command, example_model_path, tmp_path):
    extra = ["--n", "2"] if command == "ensemble" else ["--weights", "1,2"]
    code, out, err = run_cli(command, example_model_path, tmp_path / "no.mrc", "--resolution", "3", *extra,
                             "-o", tmp_path / "out")
    assert_one_line_error(code, out, err, "data file not found", "no.mrc")
    assert not (tmp_path / "out").exists()


def test_truncated_pdb(tmp_path, example_model_path):
    st_text = read_model(example_model_path).structure.make_pdb_string()
    cut = st_text[: st_text.index("ATOM") + 81 * 20 + 40]
    (tmp_path / "cut.pdb").write_text(cut)
    assert_one_line_error(*run_cli("validate", tmp_path / "cut.pdb"), "truncated")


def test_map_is_not_a_model(tmp_path):
    (tmp_path / "map.mrc").write_bytes(np.zeros(256, dtype=np.float32).tobytes())
    assert_one_line_error(*run_cli("validate", tmp_path / "map.mrc"), "map.mrc")


def test_unknown_residue_without_dictionary(tmp_path):
    (tmp_path / "lig.pdb").write_text(
        "CRYST1   20.000   20.000   20.000  90.00  90.00  90.00 P 1\n"
        "HETATM    1  C1  XYZ A   1       5.000   5.000   5.000  1.00 20.00           C\n"
        "HETATM    2  C2  XYZ A   1       6.500   5.000   5.000  1.00 20.00           C\nEND\n")
    code, out, err = run_cli("validate", tmp_path / "lig.pdb", env={"DREFINE_MONLIB": "", "CLIBD_MON": ""})
    assert_one_line_error(code, out, err, "XYZ", "--monlib")


def test_non_numeric_option_leaves_existing_output_alone(tmp_path, example_model_path):
    out = tmp_path / "keep.cif"
    out.write_text("precious\n")
    assert_one_line_error(*run_cli("shake", example_model_path, "--rms", "abc", "-o", out), "--rms", "abc")
    assert out.read_text() == "precious\n"


def test_bad_monlib_directory(tmp_path, example_model_path):
    assert_one_line_error(*run_cli("validate", example_model_path, "--monlib", tmp_path), "monomer library")


def test_empty_selection(tmp_path, example_model_path):
    assert_one_line_error(*run_cli("shake", example_model_path, "--selection", "Z/999", "-o", tmp_path / "x.cif"),
                          "matches no atoms")
    assert not (tmp_path / "x.cif").exists()


def test_help_lists_only_working_subcommands():
    code, out, _ = run_cli("--help")
    assert code == 0 and "validate" in out and "shake" in out
    for sub in ("validate", "shake"):
        code, out, _ = run_cli(sub, "--help")
        assert code == 0 and "--json" in out and "--monlib" in out and "-o" in out


# --- fmodel and validate against data -------------------------------------------------------------

def test_fmodel_mtz_then_validate_against_it(example_model_path, tmp_path):
    mtz, js = tmp_path / "hth.mtz", tmp_path / "v.json"
    assert main(["fmodel", str(example_model_path), "--resolution", "2.5", "--mtz", str(mtz), "--noise", "0.02",
                 "--seed", "3"]) == 0
    assert main(["validate", str(example_model_path), "--mtz", str(mtz), "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert 0.005 < rep["final"]["r_work"] < 0.03  # 2 % noise on |F|
    assert rep["details"]["data"]["k_sol"] == pytest.approx(0.35, abs=0.05)


def test_fmodel_map_of_a_model_without_cell(data_dir, tmp_path):
    from drefine.io.maps import read_map

    out = tmp_path / "m.mrc"
    assert main(["fmodel", str(need(data_dir, "em/3j6b_chain9/3J6B_9.pdb")), "--resolution", "3.2", "--electron",
                 "--map", str(out)]) == 0
    m = read_map(out)
    xyz = read_model(need(data_dir, "em/3j6b_chain9/3J6B_9.pdb")).atoms.xyz
    assert m.covers(xyz) == 1.0  # the box's corner is the map ORIGIN: the model sits inside it


def test_validate_against_the_3j6b_map(data_dir, tmp_path):
    js = tmp_path / "v.json"
    assert main(["validate", str(need(data_dir, "em/3j6b_chain9/3J6B_9.pdb")), "--monlib",
                 str(need(data_dir, "monlib")), "--map", str(need(data_dir, "em/3j6b_chain9/2566_3J6B_9.mrc")),
                 "--resolution", "3.2", "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["final"]["cc_mask"] > 0.6 and rep["details"]["map_fit"]["scattering"] == "electron"


def test_cell_mismatch_between_model_and_data(data_dir):
    assert_one_line_error(*run_cli("validate", need(data_dir, "untangle/best.pdb"), "--monlib",
                                   need(data_dir, "monlib"), "--mtz", need(data_dir, "xray/5orl/5orl_phases.mtz")),
                          "cell")


def test_map_that_is_not_a_map(tmp_path, example_model_path):
    (tmp_path / "bad.mrc").write_text("this is text, not a map\n" * 50)
    assert_one_line_error(*run_cli("validate", example_model_path, "--map", tmp_path / "bad.mrc",
                                   "--resolution", "3"), "bad.mrc")


def test_map_resolution_beyond_nyquist_and_not_a_number(data_dir, example_model_path):
    mrc = need(data_dir, "em/3j6b_chain9/2566_3J6B_9.mrc")
    assert_one_line_error(*run_cli("validate", need(data_dir, "em/3j6b_chain9/3J6B_9.pdb"), "--map", mrc,
                                   "--resolution", "1.0"), "Nyquist")
    assert_one_line_error(*run_cli("validate", example_model_path, "--map", mrc, "--resolution", "x"), "resolution")


def test_map_that_does_not_cover_the_model(data_dir, example_model_path):
    assert_one_line_error(*run_cli("validate", example_model_path, "--map",
                                   need(data_dir, "em/3j6b_chain9/2566_3J6B_9.mrc"), "--resolution", "3.2"),
                          "does not cover")


def test_nan_in_reflection_data_is_reported(tmp_path, example_model_path):
    import gemmi

    mtz = tmp_path / "nan.mtz"
    assert main(["fmodel", str(example_model_path), "--resolution", "3", "--mtz", str(mtz)]) == 0
    m = gemmi.read_mtz_file(str(mtz))
    data = np.array(m, copy=True)
    data[:, m.column_labels().index("F")] = np.nan
    m.set_data(data)
    m.write_to_file(str(mtz))
    assert_one_line_error(*run_cli("validate", example_model_path, "--mtz", mtz), "finite value")


def test_readme_example_script(tmp_path):
    """The README's first command's job: map, shake, refine the bundled example."""
    p = subprocess.run(["bash", str(REPO / "examples" / "rsr_example.sh"), str(tmp_path / "ex")],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "ex" / "refined.json").read_text())
    assert rep["final"]["cc_mask"] > rep["start"]["cc_mask"] and rep["final"]["bonds_rmsd"] < 0.012
