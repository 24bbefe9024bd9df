"""Restraint arrays and kernels against independent references: finite differences and gemmi."""
import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.io.models import read_model
from drefine.model.perturb import shake_coordinates
from drefine.restraints.nonbonded import find_nonbonded_pairs
from drefine.restraints.target import GeometryTarget
from drefine.restraints.topology import build_restraints
from drefine.validate.geometry import angles_deg, bond_lengths, geometry_statistics


def _restrained(data_dir, rel):
    m = read_model(need(data_dir, rel))
    return m, build_restraints(m, need(data_dir, "monlib"), unknown_residues="skip")


def _fd_check(target, xyz, name, atoms, h=1e-5):
    """Relative error of the analytic gradient of one term against central differences."""
    vals, grads = target.terms(xyz)
    g = grads[name][atoms]
    fd = np.zeros_like(g)
    for a_i, a in enumerate(atoms):
        for c in range(3):
            x = xyz.copy()
            x[a, c] += h
            fp = target.terms(x)[0][name]
            x[a, c] -= 2 * h
            fm = target.terms(x)[0][name]
            fd[a_i, c] = (fp - fm) / (2 * h)
    return np.linalg.norm(fd - g) / np.linalg.norm(g), vals[name]


@pytest.mark.parametrize("rel", ["untangle/otw39.pdb", "xray/5orl/5orl.pdb"])
def test_every_term_gradient_matches_finite_differences(data_dir, rel):
    m, r = _restrained(data_dir, rel)
    rng = np.random.default_rng(3)
    # Move the model off its minimum a little so every term has a sizeable gradient.
    xyz = m.atoms.xyz + rng.normal(scale=0.05, size=m.atoms.xyz.shape)
    target = GeometryTarget(m, r)
    target.update(xyz)
    pairs = target.pairs
    d = pairs.distances(xyz)
    active = np.flatnonzero(d < pairs.d_min)
    assert (pairs.op[active] > 0).any(), "the test needs an active symmetry contact"
    atoms_for = {
        "bonds": r.bond_atoms[:: max(1, len(r.bond_atoms) // 15)].ravel(),
        "angles": r.angle_atoms[:: max(1, len(r.angle_atoms) // 12)].ravel(),
        "torsions": r.torsion_atoms[:: max(1, len(r.torsion_atoms) // 10)].ravel(),
        "chirals": r.chiral_atoms[:: max(1, len(r.chiral_atoms) // 10)].ravel(),
        "planes": r.plane_atoms[r.plane_start[:: max(1, len(r.plane_sigma) // 10)][:-1]],
        "nonbonded": np.concatenate([pairs.i[active[:15]], pairs.j[active[:15]],
                                     pairs.i[active[pairs.op[active] > 0][:10]]]),
    }
    for name, atoms in atoms_for.items():
        err, value = _fd_check(target, xyz, name, np.unique(atoms))
        assert value > 0, name
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


def test_total_gradient_is_sum_of_terms(data_dir):
    m, r = _restrained(data_dir, "xray/4hg7/4hg7.pdb")
    t = GeometryTarget(m, r)
    f, g = t.value_and_gradient(m.atoms.xyz)
    vals, grads = t.terms(m.atoms.xyz)
    assert f == pytest.approx(sum(vals.values()), rel=1e-12)
    np.testing.assert_allclose(g, sum(grads.values()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rel", ["untangle/otw39.pdb", "xray/5orl/5orl.pdb"])
def test_bond_angle_rmsd_agree_with_gemmi(data_dir, rel):
    """Our arrays and numpy deviations against gemmi's own restraint objects (t.calculate()).

    Disulfide-link restraints are left out on both sides: for otw39 gemmi ties both SSBOND
    copies to conformer A, where we restrain each conformer's own disulfides.
    """
    m, r = _restrained(data_dir, rel)
    st = m.structure.clone()
    for ch in st[0]:
        for k in range(len(ch) - 1, -1, -1):
            if ch[k].name in r.monlib.missing:
                del ch[k]
    topo = gemmi.prepare_topology(st, r.monlib.monlib, h_change=gemmi.HydrogenChange.NoChange,
                                  warnings=None, ignore_unknown_links=True)

    def keep(t):
        return not any(a.is_hydrogen() for a in t.atoms) and sum(a.name == "SG" for a in t.atoms) < 2

    ref_b = np.array([t.calculate() - t.restr.value for t in topo.bonds if keep(t)])
    ref_a = np.array([np.degrees(t.calculate()) - t.restr.value for t in topo.angles if keep(t)])
    names, is_h = m.atoms.name, m.atoms.is_hydrogen
    kb = ~is_h[r.bond_atoms].any(1) & ((names[r.bond_atoms] == "SG").sum(1) < 2)
    ka = ~is_h[r.angle_atoms].any(1) & ((names[r.angle_atoms] == "SG").sum(1) < 2)
    our_b = bond_lengths(m.atoms.xyz, r.bond_atoms[kb]) - r.bond_ideal[kb]
    our_a = angles_deg(m.atoms.xyz, r.angle_atoms[ka]) - np.degrees(r.angle_ideal[ka])
    assert len(our_b) == len(ref_b) and len(our_a) == len(ref_a)
    assert np.sqrt(np.mean(our_b ** 2)) == pytest.approx(np.sqrt(np.mean(ref_b ** 2)), abs=1e-4)
    assert np.sqrt(np.mean(our_a ** 2)) == pytest.approx(np.sqrt(np.mean(ref_a ** 2)), abs=1e-4)
    if rel.startswith("xray/5orl"):  # no altloc disulfides: the report's own numbers must agree too
        ours = geometry_statistics(m, r)
        assert ours["bonds_rmsd"] == pytest.approx(np.sqrt(np.mean(ref_b ** 2)), abs=1e-4)
        assert ours["angles_rmsd"] == pytest.approx(np.sqrt(np.mean(ref_a ** 2)), abs=1e-4)


def test_ala39_is_the_worst_bond_of_otw39(data_dir):
    m, r = _restrained(data_dir, "untangle/otw39.pdb")
    worst = geometry_statistics(m, r)["worst_bonds"]
    top = {(tuple(w["atoms"]), w["value"]) for w in worst[:2]}
    assert (("A/ALA 39/N.A", "A/ALA 39/CA.A"), 1.622) in top
    assert (("A/ALA 39/N.B", "A/ALA 39/CA.B"), 1.336) in top


def test_disulfides_bond_in_every_conformer(data_dir):
    m, r = _restrained(data_dir, "untangle/otw39.pdb")
    sg = m.atoms.name[r.bond_atoms] == "SG"
    ss = r.bond_atoms[sg.all(axis=1)]
    assert len(ss) == 8  # four disulfides in each of the two conformers
    assert sorted(set(m.atoms.altloc[ss].ravel())) == ["A", "B"]
    assert (m.atoms.altloc[ss[:, 0]] == m.atoms.altloc[ss[:, 1]]).all()


def test_shaken_start_keeps_every_link(data_dir):
    """gemmi alone would drop peptide links stretched beyond 2.01 Å; we must not."""
    m, r0 = _restrained(data_dir, "xray/4hg7/4hg7.pdb")
    shaken, _ = shake_coordinates(m, 0.8, seed=11)
    cn = m.atoms.name
    r1 = build_restraints(shaken, r0.monlib.source if r0.monlib.source != "built-in" else None,
                          monlib=r0.monlib)
    assert len(r1.bond_ideal) == len(r0.bond_ideal)
    assert r1.links == r0.links and len(r1.chain_breaks) == len(r0.chain_breaks)
    # and the shake did stretch some C–N beyond gemmi's 2.01 Å criterion
    pep = r1.bond_atoms[(cn[r1.bond_atoms[:, 0]] == "C") & (cn[r1.bond_atoms[:, 1]] == "N")]
    assert (np.linalg.norm(shaken.atoms.xyz[pep[:, 0]] - shaken.atoms.xyz[pep[:, 1]], axis=1) > 2.01).any()


def _two_atom_model(tmp_path, spacegroup, xyz_list, altlocs=("", "")):
    lines = [f"CRYST1   20.000   20.000   20.000  90.00  90.00  90.00 {spacegroup:<11s}"]
    for k, (xyz, alt) in enumerate(zip(xyz_list, altlocs), start=1):
        lines.append(f"HETATM{k:5d}  O  {alt or ' '}HOH A{k:4d}    {xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}"
                     f"  0.50 20.00           O")
    p = tmp_path / "w.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    return read_model(p)


def test_nonbonded_honours_symmetry(data_dir, tmp_path):
    # One water 0.9 Å from a 2-fold axis of P 1 2 1 (x=0, z=0): its mate is 1.8 Å away.
    m = _two_atom_model(tmp_path, "P 1 2 1", [(0.9, 5.0, 0.0)])
    r = build_restraints(m, need(data_dir, "monlib"))
    pairs = find_nonbonded_pairs(m, r)
    d = pairs.distances(m.atoms.xyz)
    close = d < 2.0
    assert close.any() and (pairs.op[close] > 0).all()
    assert d[close].min() == pytest.approx(1.8, abs=1e-3)
    t = GeometryTarget(m, r)
    f, g = t.value_and_gradient(m.atoms.xyz)
    assert f > 0 and g[0, 0] < 0 and abs(g[0, 1]) < 1e-12  # pushed away from the axis, along x only


def test_membership_in_sorted_keys_equals_isin():
    from drefine.restraints.nonbonded import _in_sorted

    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 1000, 300))
    values = rng.integers(-50, 1100, 2000)  # below, among and above the keys
    np.testing.assert_array_equal(_in_sorted(values, keys), np.isin(values, keys))
    assert not _in_sorted(values, keys[:0]).any()


def test_nonbonded_different_altlocs_never_meet(data_dir, tmp_path):
    m = _two_atom_model(tmp_path, "P 1", [(5.0, 5.0, 5.0), (7.0, 5.0, 5.0)], altlocs=("A", "B"))
    r = build_restraints(m, need(data_dir, "monlib"))
    assert len(find_nonbonded_pairs(m, r)) == 0
    m2 = _two_atom_model(tmp_path, "P 1", [(5.0, 5.0, 5.0), (7.0, 5.0, 5.0)], altlocs=("", "B"))
    r2 = build_restraints(m2, need(data_dir, "monlib"))
    assert len(find_nonbonded_pairs(m2, r2)) == 1


def test_closed_form_plane_normal_matches_eigh():
    """The plane term's closed-form normal is LAPACK's smallest eigenvector, also for nearly flat,
    nearly collinear and offset point sets; a coplanar set has zero distance to its plane."""
    from drefine.restraints.kernels import plane_normal

    rng = np.random.default_rng(11)
    for flatness in (1e-4, 0.05, 0.5, 1.0):
        for elongation in (1.0, 20.0):
            pts = rng.normal(size=(7, 3)) * [elongation, 1.0, flatness]
            rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            pts = pts @ rot.T + rng.normal(size=3) * 40.0
            *cen, nx, ny, nz = plane_normal(pts, np.arange(7), 0, 7)
            nrm = np.array([nx, ny, nz])
            assert np.allclose(cen, pts.mean(0), rtol=0, atol=1e-12)
            d = pts - pts.mean(0)
            ref = np.linalg.eigh(d.T @ d)[1][:, 0]
            assert abs(abs(nrm @ ref) - 1.0) < 1e-10
    flat = np.c_[rng.normal(size=(6, 2)), np.zeros(6)]
    *_, nz = plane_normal(flat, np.arange(6), 0, 6)
    assert abs(abs(nz) - 1.0) < 1e-12
