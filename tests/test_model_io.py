"""Model I/O: every model in the shared data survives read → write → read, in mmCIF and PDB."""
from dataclasses import fields

import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.errors import InputError
from drefine.io.models import pdb_fits, read_model, write_model

MODELS = [
    "untangle/otw39.pdb", "untangle/best.pdb", "untangle/otw1.pdb", "untangle/lotswrong.pdb",
    "untangle/ground_truth.pdb", "models/4e3y.pdb", "models/1LVZ.pdb", "models/pdb5fuu.ent",
    "em/3j6b_chain9/3J6B_9.pdb", "xray/4hg7/4hg7.pdb", "xray/5orl/5orl.pdb", "xray/6mw0/6mw0.cif",
    "xray/5e5z/5e5z.pdb.gz", "xray/1l2h/1l2h.cif.gz",
]
# What each format stores: PDB has 3 decimals for xyz, 2 for B and occupancy, 4 for U (×10⁴ integers).
TOL = {"cif": {"xyz": 1e-6, "b_iso": 1e-6, "occupancy": 1e-6, "u_aniso": 1e-6},
       "pdb": {"xyz": 5e-4, "b_iso": 5e-3, "occupancy": 5e-3, "u_aniso": 5e-5}}


def compare_models(m1, m2, tol):
    for f in fields(m1.atoms):
        a, b = getattr(m1.atoms, f.name), getattr(m2.atoms, f.name)
        assert a.shape == b.shape, f.name
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=0, atol=tol[f.name], err_msg=f.name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=f.name)
    for f in fields(m1.residues):
        np.testing.assert_array_equal(getattr(m1.residues, f.name), getattr(m2.residues, f.name), err_msg=f.name)
    assert m1.n_models == m2.n_models
    assert m1.cell.parameters == pytest.approx(m2.cell.parameters, abs=1e-3)
    assert (m1.spacegroup.xhm() if m1.spacegroup else None) == (m2.spacegroup.xhm() if m2.spacegroup else None)


@pytest.mark.parametrize("rel", MODELS)
@pytest.mark.parametrize("fmt", ["cif", "pdb"])
def test_round_trip_loses_nothing(data_dir, tmp_path, rel, fmt):
    m = read_model(need(data_dir, rel))
    if fmt == "pdb" and not pdb_fits(m)[0]:
        pytest.skip(f"{rel} does not fit the PDB format: {pdb_fits(m)[1]}")
    out = write_model(m, tmp_path / f"out.{fmt}")
    compare_models(m, read_model(out), TOL[fmt])


def test_arrays_carry_what_refinement_needs(data_dir):
    path = need(data_dir, "xray/6mw0/6mw0.cif")
    m = read_model(path)
    a = m.atoms
    # U values equal the raw _atom_site_anisotrop table, read independently with gemmi.cif.
    block = gemmi.cif.read(str(path)).sole_block()
    raw = block.find("_atom_site_anisotrop.", ["U[1][1]", "U[2][2]", "U[3][3]", "U[1][2]", "U[1][3]", "U[2][3]"])
    u_raw = np.array([[float(row[k]) for k in range(6)] for row in raw])
    assert a.has_aniso.sum() == len(u_raw)
    np.testing.assert_allclose(a.u_aniso[a.has_aniso], u_raw, atol=1e-6)
    assert set(a.altloc) >= {"", "A", "B"}
    assert (a.conformer[a.altloc == ""] == 0).all() and (a.conformer[a.altloc != ""] > 0).all()
    nmr = read_model(need(data_dir, "models/1LVZ.pdb"))
    assert nmr.n_models == 20 and set(np.unique(nmr.atoms.model_index)) == set(range(20))
    assert nmr.atoms.is_hydrogen.any()


def test_modified_values_are_written(example_model_path, tmp_path):
    m = read_model(example_model_path)
    m.atoms.xyz += 1.25
    m.atoms.b_iso[:] = 33.0
    m2 = read_model(write_model(m, tmp_path / "moved.cif"))
    np.testing.assert_allclose(m2.atoms.xyz, m.atoms.xyz, atol=1e-6)
    assert (m2.atoms.b_iso == 33.0).all()


def test_bad_model_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_model(tmp_path / "missing.pdb")
    (tmp_path / "junk.pdb").write_text("hello\nthis is not a model\n")
    with pytest.raises(InputError, match="no atoms"):
        read_model(tmp_path / "junk.pdb")
    (tmp_path / "cut.pdb").write_text(
        "CRYST1   10.000   10.000   10.000  90.00  90.00  90.00 P 1\n"
        "ATOM      1  N   ALA A   1       1.000   2.000   3.000  1.00 20.00           N\n"
        "ATOM      2  CA  ALA A   1       2.000   2.")
    with pytest.raises(InputError, match="truncated"):
        read_model(tmp_path / "cut.pdb")
    (tmp_path / "bin.cif").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(InputError, match="binary"):
        read_model(tmp_path / "bin.cif")
