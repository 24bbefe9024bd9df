"""Untangling building blocks: the tangled-residue scorer on the Untangle challenge models, and
every divide projection idempotent and nearest against random points of its set."""
import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.io.models import read_model
from drefine.untangle.projections import (
    concur_positions,
    kabsch_placement,
    match_disulfides,
    project_bonds,
    project_exclusion,
    project_rigid_motifs,
    project_structure_factor,
    project_structure_factor_dask,
)
from drefine.untangle.tangling import tangled_residues

RNG = np.random.default_rng(7)


@pytest.mark.parametrize(("name", "expected"), [("best", []), ("otw39", ["A/ALA 39", "A/SER 40"]), ("otw1", 1),
                                                ("lotswrong", 29)])
def test_tangled_residue_counts(data_dir, name, expected):
    truth = read_model(need(data_dir, "untangle/ground_truth.pdb"))
    found = tangled_residues(read_model(need(data_dir, f"untangle/{name}.pdb")), truth)
    if isinstance(expected, int):
        assert len(found) == expected
    else:
        assert found == expected


def test_lotswrong_tyr5_is_tangled_by_names_only(data_dir):
    """1AHO's truth names Tyr 5's ring atoms one way in conformer A and the other in B (χ2 −81° and
    99°); lotswrong.pdb's Tyr 5 is whole in each conformer, but its ring named against its backbone."""
    from drefine.untangle.tangling import naming_only

    truth = read_model(need(data_dir, "untangle/ground_truth.pdb"))
    assert naming_only(read_model(need(data_dir, "untangle/lotswrong.pdb")), truth) == ["A/TYR 5"]
    assert naming_only(read_model(need(data_dir, "untangle/otw39.pdb")), truth) == []


def _random_rotation(n):
    q = RNG.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)


def test_bond_projection_is_idempotent_and_nearest():
    n = 200
    a, b = RNG.normal(size=(n, 3)) * 2, RNG.normal(size=(n, 3)) * 2
    ideal, tol = np.full(n, 1.5), np.full(n, 0.05)
    pa, pb = project_bonds(a, b, ideal, tol)
    d = np.linalg.norm(pa - pb, axis=1)
    assert np.all(d >= 1.45 - 1e-12) and np.all(d <= 1.55 + 1e-12)
    qa, qb = project_bonds(pa, pb, ideal, tol)
    assert np.array_equal(qa, pa) and np.array_equal(qb, pb)
    moved = np.sqrt(((pa - a) ** 2).sum(1) + ((pb - b) ** 2).sum(1))
    # the exact nearest distance: each end moves half the length error along the bond
    d0 = np.linalg.norm(a - b, axis=1)
    assert np.allclose(moved, np.abs(d0 - np.clip(d0, 1.45, 1.55)) / np.sqrt(2), atol=1e-12)
    for _ in range(200):  # random points of the set are never nearer
        ya = RNG.normal(size=(n, 3)) * 2
        u = RNG.normal(size=(n, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        yb = ya + u * RNG.uniform(1.45, 1.55, n)[:, None]
        trial = np.sqrt(((ya - a) ** 2).sum(1) + ((yb - b) ** 2).sum(1))
        assert np.all(trial >= moved - 1e-9)


def test_exclusion_projection_is_idempotent_and_nearest():
    n = 100
    a = RNG.normal(size=(n, 3))
    b = a + RNG.normal(size=(n, 3)) * 1.5
    r_min = np.full(n, 2.8)
    pa, pb = project_exclusion(a, b, r_min)
    assert np.all(np.linalg.norm(pa - pb, axis=1) >= 2.8 - 1e-12)
    assert all(np.array_equal(x, y) for x, y in zip(project_exclusion(pa, pb, r_min), (pa, pb)))
    far = np.linalg.norm(a - b, axis=1) >= 2.8
    assert np.array_equal(pa[far], a[far])
    moved = np.sqrt(((pa - a) ** 2).sum(1) + ((pb - b) ** 2).sum(1))
    for _ in range(200):
        ya = a + RNG.normal(size=(n, 3)) * 0.5
        u = RNG.normal(size=(n, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        yb = ya + u * RNG.uniform(2.8, 4.0, n)[:, None]
        assert np.all(np.sqrt(((ya - a) ** 2).sum(1) + ((yb - b) ** 2).sum(1)) >= moved - 1e-9)


def test_kabsch_recovers_a_placement_and_refuses_mirrors():
    n, k = 50, 5
    motif = RNG.normal(size=(n, k, 3))
    rot = _random_rotation(n)
    x = np.einsum("nij,nkj->nki", rot, motif) + RNG.normal(size=(n, 1, 3)) * 5
    placed, d2 = kabsch_placement(x, motif)
    assert np.allclose(placed, x, atol=1e-9) and np.all(d2 < 1e-16)
    mirror = x * np.array([-1.0, 1.0, 1.0])
    _, d2m = kabsch_placement(mirror, motif)
    assert np.all(d2m > 1e-3)  # a chiral (non-planar) motif cannot be superposed on its mirror image


def test_rigid_motif_projection_is_idempotent_and_nearest():
    n, k = 40, 4
    motifs = RNG.normal(size=(n, 2, k, 3))  # two allowed motifs per constraint (e.g. trans/cis)
    x = RNG.normal(size=(n, k, 3)) * 1.5
    tol = np.full(n, 0.1)
    p, which = project_rigid_motifs(x, motifs, tol)
    p2, which2 = project_rigid_motifs(p, motifs, tol)
    assert np.allclose(p2, p, atol=1e-10) and np.array_equal(which, which2)
    moved = np.sqrt(((p - x) ** 2).sum(axis=(1, 2)))
    for _ in range(300):
        j = RNG.integers(0, 2, n)
        rot = _random_rotation(n)
        centre = x.mean(1, keepdims=True) + RNG.normal(size=(n, 1, 3)) * 0.3
        m = motifs[np.arange(n), j]
        y = np.einsum("nij,nkj->nki", rot, m - m.mean(1, keepdims=True)) + centre
        ball = RNG.normal(size=(n, k, 3))
        ball *= (tol * RNG.uniform(0, 1, n))[:, None, None] / np.sqrt((ball ** 2).sum(axis=(1, 2)))[:, None, None]
        trial = np.sqrt(((y + ball - x) ** 2).sum(axis=(1, 2)))
        assert np.all(trial >= moved - 1e-9)


def test_structure_factor_projection_satisfies_the_constraint_and_is_nearest():
    n_refl, n_var = 64, 30
    rho = RNG.normal(size=(n_refl, n_var)) + 1j * RNG.normal(size=(n_refl, n_var))
    p = RNG.uniform(0.3, 1.0, (n_refl, n_var)) * np.exp(1j * RNG.uniform(0, 2 * np.pi, (n_refl, n_var)))
    f = RNG.normal(size=n_refl) * 5 + 1j * RNG.normal(size=n_refl) * 5
    q = project_structure_factor(rho, p, f)
    assert np.allclose((p * q).sum(1), f, atol=1e-12)
    assert np.allclose(project_structure_factor(q, p, f), q, atol=1e-12)
    moved = np.sqrt((np.abs(q - rho) ** 2).sum(1))
    for _ in range(100):  # other points of the affine set: q plus a null-space direction
        z = RNG.normal(size=(n_refl, n_var)) + 1j * RNG.normal(size=(n_refl, n_var))
        z -= np.conj(p) * ((p * z).sum(1) / (np.abs(p) ** 2).sum(1))[:, None]
        y = q + z
        assert np.allclose((p * y).sum(1), f, atol=1e-10)
        assert np.all(np.sqrt((np.abs(y - rho) ** 2).sum(1)) >= moved - 1e-9)
    import dask.array as da

    out = project_structure_factor_dask(da.from_array(rho, chunks=(16, n_var)), da.from_array(p, chunks=(16, n_var)),
                                        da.from_array(f, chunks=16)).compute()
    assert np.array_equal(out, q)


def test_concur_on_a_two_atom_toy():
    # atom 0: replicas at x = 0 (geometry, η 10) and x = 1.1 (exclusion, η 1); atom 1: one replica
    replicas = np.array([[0.0, 0, 0], [1.1, 0, 0], [3.0, 1, 0]])
    mean = concur_positions(replicas, np.array([0, 0, 1]), np.array([10.0, 1.0, 10.0]), 3)
    assert mean[0] == pytest.approx([0.1, 0, 0]) and mean[1] == pytest.approx([3.0, 1, 0])
    assert np.all(np.isnan(mean[2]))


def test_disulfide_matching_pairs_the_nearest_partners():
    a = np.array([[0.0, 0, 0], [10.0, 0, 0]])
    b = np.array([[10.0, 2.0, 0], [0.0, 2.1, 0]])
    assert match_disulfides(a, b).tolist() == [[0, 1], [1, 0]]


def test_motifs_from_the_dictionary_have_ideal_geometry_and_hand(example_model_path):
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import DivideAndConcur

    m = read_model(example_model_path)
    rs = build_restraints(m)
    dc = DivideAndConcur(m, rs)
    kinds = [g for g in dc.groups if g.kind == "motif"]
    angles, chirals = kinds[0], kinds[1]
    # angle motifs: the ideal angle between the two arms
    mo = angles.motifs[:, 0]
    a, b = mo[:, 0] - mo[:, 1], mo[:, 2] - mo[:, 1]
    theta = np.arccos((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    ideal = {tuple(t): v for t, v in zip(rs.angle_atoms.tolist(), rs.angle_ideal)}
    assert np.allclose(theta, [ideal[tuple(t)] for t in angles.atoms.tolist()], atol=1e-9)
    # chiral motifs: the signed volume has the dictionary's sign, and |volume| matches gemmi's ideal
    mo = chirals.motifs[:, 0]
    vol = np.einsum("ni,ni->n", mo[:, 1] - mo[:, 0], np.cross(mo[:, 2] - mo[:, 0], mo[:, 3] - mo[:, 0]))
    want = {tuple(t): v for t, v in zip(rs.chiral_atoms.tolist(), rs.chiral_ideal)}
    ref = np.array([want[tuple(t)] for t in chirals.atoms.tolist()])
    assert np.all(np.sign(vol) == np.sign(ref))
    assert np.allclose(np.abs(vol), np.abs(ref), rtol=0.03)


def test_torsion_motifs_have_the_ideal_bonds_and_every_allowed_dihedral(example_model_path):
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import _angle_lookup, _bond_lookup, _torsion_motifs
    from drefine.untangle.projections import project_rigid_motifs
    from drefine.validate.ramachandran import dihedral_deg

    m = read_model(example_model_path)
    rs = build_restraints(m)
    length = _bond_lookup(rs)
    groups = _torsion_motifs(m, rs, length, _angle_lookup(rs))
    assert sum(len(a) for a, _, _ in groups) > 10 and any(mo.shape[1] > 1 for _, mo, _ in groups)
    want = {tuple(t): (v, p) for t, v, p in zip(rs.torsion_atoms.tolist(), rs.torsion_ideal, rs.torsion_period)}
    res = m.atoms.residue_index
    rng = np.random.default_rng(3)
    for atoms, motifs, tol in groups:
        assert np.all(res[atoms] == res[atoms[:, :1]])  # inside one residue: no link torsions
        ideal, period = map(np.array, zip(*[want[tuple(t)] for t in atoms.tolist()]))
        assert np.all(motifs.shape[1] == period)
        bonds = np.stack([length(atoms[:, q], atoms[:, q + 1]) for q in range(3)], axis=1)
        for k in range(motifs.shape[1]):
            mo = motifs[:, k]
            got = dihedral_deg(mo[:, 0], mo[:, 1], mo[:, 2], mo[:, 3])
            diff = (got - np.degrees(ideal + 2 * np.pi * k / period) + 180.0) % 360.0 - 180.0
            assert np.abs(diff).max() < 1e-6
            assert np.allclose(np.linalg.norm(mo[:, 1:] - mo[:, :-1], axis=2), bonds, atol=1e-9)
        assert np.all(tol >= 0.05) and np.all(tol < 1.0)
        # the projection takes the nearest allowed value: the last motif, moved rigidly and
        # disturbed a little, comes back with the last motif's dihedral, not the first's
        last = motifs.shape[1] - 1
        rot = _random_rotation(len(atoms))
        x = np.einsum("nij,nkj->nki", rot, motifs[:, last]) + rng.normal(0, 5, (len(atoms), 1, 3))
        proj, _ = project_rigid_motifs(x + rng.normal(0, 0.02, x.shape), motifs, np.zeros(len(atoms)))
        got = dihedral_deg(proj[:, 0], proj[:, 1], proj[:, 2], proj[:, 3])
        diff = (got - np.degrees(ideal + 2 * np.pi * last / period) + 180.0) % 360.0 - 180.0
        assert np.abs(diff).max() < 1e-6


def test_planar_figure_is_fitted_where_the_distances_fix_it_and_refused_where_they_do_not():
    """A trigonal centre with three bonds and the three 1–3 distances of 120° angles, and a square
    with its four sides and one diagonal, come back with every given distance; a four-atom chain
    with bonds only (it can fold in the plane) and a figure whose distances cannot all be met are
    refused."""
    from drefine.untangle.constraints import _planar_figure

    rng = np.random.default_rng(11)
    star = np.array([[0, 0, 0], [1.3, 0, 0], [-0.65, 1.126, 0], [-0.65, -1.126, 0]], float)
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    want = np.linalg.norm(star[pairs[:, 0]] - star[pairs[:, 1]], axis=1)
    bent = star + rng.normal(0, 0.1, star.shape)  # a distorted, non-planar start
    fig = _planar_figure(bent, pairs, want, np.full(6, 0.02))
    assert fig is not None and np.allclose(fig[:, 2], 0.0) and np.allclose(fig.mean(0), 0.0, atol=1e-12)
    assert np.allclose(np.linalg.norm(fig[pairs[:, 0]] - fig[pairs[:, 1]], axis=1), want, atol=1e-6)
    collapsed = _planar_figure(rng.normal(0, 1e-3, star.shape), pairs, want, np.full(6, 0.02))  # from ~a point
    assert np.allclose(np.linalg.norm(collapsed[pairs[:, 0]] - collapsed[pairs[:, 1]], axis=1), want, atol=1e-6)
    square = np.array([[0, 0, 0], [1.4, 0, 0], [1.4, 1.4, 0], [0, 1.4, 0]], float)
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    want = np.linalg.norm(square[pairs[:, 0]] - square[pairs[:, 1]], axis=1)
    fig = _planar_figure(square + rng.normal(0, 0.1, (4, 3)), pairs, want, np.full(5, 0.02))
    assert fig is not None
    assert np.allclose(np.linalg.norm(fig[pairs[:, 0]] - fig[pairs[:, 1]], axis=1), want, atol=1e-6)
    assert _planar_figure(square, pairs[:3], want[:3], np.full(3, 0.02)) is None  # a floppy chain
    # a diagonal longer than two sides together: no figure meets it
    assert _planar_figure(square, pairs, want * np.array([1, 1, 1, 1, 1.6]), np.full(5, 0.02)) is None


def test_rigid_groups_match_the_monomer_librarys_own_ideal_coordinates(data_dir):
    """Planes inside a residue become rigid planar motifs (rings, guanidinium, carboxylates, amides);
    planes across residues stay coplanarity sets. Independent check: the
    heavy atoms of a fitted figure superpose on the same atoms of the monomer library's ideal
    coordinates (_chem_comp_atom.x/y/z, which the fit never sees) within 0.02 Å rms."""
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import DivideAndConcur, _bond_lookup, _rigid_groups

    monlib = need(data_dir, "monlib")
    m = read_model(need(data_dir, "untangle/best.pdb"))
    rs = build_restraints(m, monlib)
    groups, replaced = _rigid_groups(m, rs, _bond_lookup(rs))
    at, res = m.atoms, m.atoms.residue_index
    sizes = np.diff(rs.plane_start)
    plane_res = [set(res[rs.plane_atoms[a:b]].tolist()) for a, b in zip(rs.plane_start[:-1], rs.plane_start[1:])]
    one_residue = np.array([len(p) == 1 for p in plane_res])
    assert np.all(replaced <= one_residue) and replaced[one_residue & (sizes >= 4)].all()
    assert (~replaced & (sizes >= 4)).sum() > 100  # the peptide link planes remain
    names = {str(n) for a, _, _ in groups for n in m.residues.name[res[a[:, 0]]]}
    assert {"TYR", "PHE", "TRP", "HIS", "ARG", "ASP", "GLU", "ASN", "GLN"} <= names
    checked = 0
    for atoms, motifs, tol in groups:
        assert motifs.shape[1] == 1 and np.allclose(motifs[..., 2], 0.0)
        assert np.allclose(tol, 0.02 * np.sqrt(atoms.shape[1]))
        for t in {str(n) for n in m.residues.name[res[atoms[:, 0]]]}:
            row = next(k for k in range(len(atoms)) if m.residues.name[res[atoms[k, 0]]] == t)
            heavy = ~at.is_hydrogen[atoms[row]]
            block = gemmi.cif.read(str(monlib / t[0].lower() / f"{t}.cif"))[f"comp_{t}"]
            table = block.find("_chem_comp_atom.", ["atom_id", "x", "y", "z"])
            ideal = {r[0]: np.array([float(r[1]), float(r[2]), float(r[3])]) for r in table}
            ref = np.array([ideal[str(n)] for n in at.name[atoms[row]][heavy]])
            _, d2 = kabsch_placement(ref[None], motifs[row, 0][heavy][None])
            assert np.sqrt(d2[0] / heavy.sum()) < 0.02, t  # TYR's library coordinates: 0.018 Å; others < 0.01
            checked += 1
    assert checked >= 10
    # the divide-and-concur sets: the rigid groups replace those planes (or not, when switched off)
    plain = DivideAndConcur(m, rs, rigid_groups=False)
    rigid = DivideAndConcur(m, rs)
    n_plane = lambda dc: sum(len(g.atoms) for g in dc.groups if g.kind == "plane")
    assert n_plane(plain) - n_plane(rigid) == replaced.sum() == sum(len(a) for a, _, _ in groups)


def test_rrr_finds_a_point_satisfying_every_geometry_constraint(example_model_path):
    """Geometry-only divide and concur from a 0.3 Å shaken start: the gap closes and every bond,
    angle/chirality motif and exclusion is then satisfied by the concurred positions."""
    from drefine.model.perturb import shake_coordinates
    from drefine.restraints.nonbonded import find_nonbonded_pairs
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import DivideAndConcur

    m = read_model(example_model_path)
    rs = build_restraints(m)
    start, _ = shake_coordinates(m, 0.3, 1)
    dc = DivideAndConcur(start, rs, find_nonbonded_pairs(start, rs, start.atoms.xyz, buffer=1.0))
    x = dc.replicas(start.atoms.xyz)
    gaps = []
    for _ in range(150):
        x, gap = dc.rrr_step(x)
        gaps.append(gap)
    assert gaps[0] > 0.05 and gaps[-1] < 1e-6
    pos = dc.positions(dc.divide(x), start.atoms.xyz)
    # at the fixed point the concurred positions lie in every divide set
    again = dc.divide(dc.replicas(pos))
    assert np.abs(again - dc.replicas(pos)).max() < 1e-5
    d = np.linalg.norm(pos[rs.bond_atoms[:, 0]] - pos[rs.bond_atoms[:, 1]], axis=1)
    assert np.all(np.abs(d - rs.bond_ideal) <= rs.bond_sigma + 1e-5)


def test_rrr_with_torsion_motifs_closes_most_of_the_gap_but_not_all(example_model_path):
    """The same with the (experimental) torsion motifs: they join the sets, and RRR closes the gap
    only slowly, to < 2 % of its start in 300 steps, not to zero: on this model a Leu χ2 stays
    frustrated between its CD1 torsion motif and the other sets (1.3e-3 Å after 400 steps). That
    is what this test holds; it documents why the option is off, not a feasible fixed point."""
    from drefine.model.perturb import shake_coordinates
    from drefine.restraints.nonbonded import find_nonbonded_pairs
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import DivideAndConcur

    m = read_model(example_model_path)
    rs = build_restraints(m)
    start, _ = shake_coordinates(m, 0.3, 1)
    nb = find_nonbonded_pairs(start, rs, start.atoms.xyz, buffer=1.0)
    plain, dc = DivideAndConcur(start, rs, nb), DivideAndConcur(start, rs, nb, torsions=True)
    assert len(dc.groups) > len(plain.groups)
    assert any(g.motifs is not None and g.motifs.shape[1:3] == (3, 4) for g in dc.groups)
    x = dc.replicas(start.atoms.xyz)
    gaps = []
    for _ in range(300):
        x, gap = dc.rrr_step(x)
        gaps.append(gap)
    assert gaps[0] > 0.05 and gaps[-1] < 0.02 * gaps[0]


def test_validate_reports_tangled_residues_against_a_truth(data_dir, capsys, tmp_path):
    from drefine.cli import main

    rc = main(["validate", str(need(data_dir, "untangle/otw39.pdb")), "--truth",
               str(need(data_dir, "untangle/ground_truth.pdb")), "--monlib", str(need(data_dir, "monlib")),
               "--json", str(tmp_path / "v.json")])
    assert rc == 0
    assert "tangled residues against" in capsys.readouterr().out
    import json

    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["final"]["n_tangled"] == 2 and rep["details"]["tangled_residues"] == ["A/ALA 39", "A/SER 40"]
    assert rep["details"]["tangled_by_names_only"] == []


def _toy_manifold():
    from drefine.density.direct import symmetry_operators
    from drefine.untangle.density import DensityManifold, atom_amplitudes

    cell = gemmi.UnitCell(20, 24, 28, 90, 90, 90)
    sg = gemmi.SpaceGroup("P 21 21 21")
    hkl = np.array(gemmi.make_miller_array(cell, sg, 2.5, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    rot, trans = symmetry_operators(sg)
    fmat = np.array(cell.frac.mat.tolist())
    s2 = ((hkl @ fmat) ** 2).sum(1)
    el = gemmi.Element("C").it92
    ga = np.array([[*el.a, el.c]])
    gb = np.array([[*el.b, 0.0]])
    amp = atom_amplitudes(ga, gb, np.array([0, 0]), np.array([12.0, 20.0]), s2)
    return DensityManifold(hkl, rot, trans, fmat), amp, s2


def test_density_concur_on_a_two_atom_toy():
    """Density variables on the manifold at r*, replicas pulled elsewhere: Gauss–Newton concur
    agrees with a direct minimisation of E(r), and tends to r* as the density weight grows."""
    from scipy.optimize import minimize

    man, amp, s2 = _toy_manifold()
    true = np.array([[3.0, 4.0, 5.0], [9.0, 11.0, 13.0]])
    rho = man.values(true, amp)
    replicas = true + np.array([[0.3, -0.2, 0.1], [-0.1, 0.25, 0.2]])
    eta = np.array([10.0, 10.0])
    w = np.where(np.sqrt(s2) >= 0.4 / 2.5, 1.0, 0.0)  # low-resolution reflections carry no weight
    for g, tol in ((1e-3, 1e-5), (1.0, 1e-5)):
        r = man.concur(rho, amp, eta[:, None] * replicas, eta, replicas.copy(), g, w, steps=8)
        for j in range(2):
            def energy(x, j=j, g=g):
                m = man.values(x[None], amp[j:j + 1])[0]
                return eta[j] * ((replicas[j] - x) ** 2).sum() + g * (w[None] * np.abs(rho[j] - m) ** 2).sum()
            ref = minimize(energy, replicas[j], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12,
                                                                                "maxiter": 20000}).x
            assert np.allclose(r[j], ref, atol=max(tol, 1e-4)), (g, j)
    far = man.concur(rho, amp, eta[:, None] * replicas, eta, replicas.copy(), 1e3, w, steps=8)
    assert np.abs(far - true).max() < 5e-3
    near = man.concur(rho, amp, eta[:, None] * replicas, eta, replicas.copy(), 0.0, w, steps=2)
    assert np.allclose(near, replicas)


# -- the production engine: density kernels, representations, chunks, checkpoints, the command -----

def _two_conformer_case(example_model_path, out_dir, swap=("CA",), swap_before=0, occ_a=0.55, residue=3):
    """Residues 5–12 of hth40 (no H) in P 2₁2₁2₁, conformer A (occ `occ_a`) and B (the rest) = A turned by
    5° about the fragment's centre and shifted 0.25 Å; `swap` atoms of the `residue`-th residue (Lys 8),
    and every atom of the first `swap_before` residues, exchanged between the conformers in the tangled copy. Returns
    (truth path, tangled path)."""
    st = gemmi.read_structure(str(example_model_path))
    st.remove_hydrogens()
    ch = st[0][0]
    for i in range(len(ch) - 1, -1, -1):
        if not 4 <= i <= 11:
            del ch[i]
    xyz = np.array([a.pos.tolist() for r in ch for a in r])
    c = xyz.mean(0)
    th = np.radians(5.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    st.cell = gemmi.UnitCell(*(xyz.max(0) - xyz.min(0) + 14.0), 90, 90, 90)
    st.spacegroup_hm = "P 21 21 21"
    shift = np.array([st.cell.a, st.cell.b, st.cell.c]) / 4 - c
    for r in ch:
        originals = [a.clone() for a in r]  # add_atom reallocates: no atom references held across it
        while len(r):
            del r[0]
        for a in originals:
            p = np.array(a.pos.tolist())
            a.pos = gemmi.Position(*(p + shift))
            a.altloc, a.occ, a.b_iso = "A", occ_a, 12.0
            b = a.clone()
            b.altloc, b.occ = "B", 1.0 - occ_a
            b.pos = gemmi.Position(*(rot @ (p - c) + c + shift + np.array([0.25, 0, 0])))
            r.add_atom(a)
            r.add_atom(b)
    st.setup_entities()
    truth = out_dir / "truth.pdb"
    st.write_pdb(str(truth))
    swaps = [(ch[residue], name) for name in swap] + [(ch[k], at.name) for k in range(swap_before) for at in ch[k]
                                                if at.altloc == "A"]
    for r, name in swaps:
        a, b = r.find_atom(name, "A"), r.find_atom(name, "B")
        pa, pb = gemmi.Position(a.pos), gemmi.Position(b.pos)
        a.pos, b.pos = pb, pa
    tangled = out_dir / "tangled.pdb"
    st.write_pdb(str(tangled))
    return truth, tangled


@pytest.fixture(scope="module")
def tangled_case(example_model_path, tmp_path_factory):
    from drefine.density.synthetic import synthetic_reflections

    out = tmp_path_factory.mktemp("untangle")
    truth, tangled = _two_conformer_case(example_model_path, out)
    table = synthetic_reflections(read_model(truth), 1.2, noise=0.02, seed=1)
    mtz = out / "data.mtz"
    table.to_mtz(mtz)
    return truth, tangled, table, mtz


def test_tangled_atoms_name_the_swapped_atom(tangled_case):
    """Per-atom labels of the toy (Lys 8's Cα exchanged between conformers): the one tangled residue,
    its Cα nearer the other conformer's truth in both conformers, every other scored atom its own."""
    from drefine.untangle.tangling import tangled_atoms, tangled_residues

    truth, tangled, _, _ = tangled_case
    t, m = read_model(truth), read_model(tangled)
    atoms = tangled_atoms(m, t)
    assert list(atoms) == tangled_residues(m, t) and len(atoms) == 1
    (rows,) = atoms.values()
    for alt, other in (("A", "B"), ("B", "A")):
        near = dict(entry.split(" ")[0].split("→") for entry in rows[alt].split(", "))
        assert len(near) > 5 and near.pop("CA") == other and set(near.values()) == {alt}
    assert tangled_atoms(t, t) == {}


def test_naming_only_tangles_are_told_apart(tangled_case, tmp_path):
    """A truth whose conformer B names Glu 5's OE1/OE2 and Arg 9's NH1/NH2 the other way round (as
    1AHO's truth does Tyr 5's ring): the toy then scores those two residues tangled as well as Lys 8,
    and only those two are tangles of names alone."""
    from drefine.untangle.tangling import naming_only, tangled_residues

    truth, tangled, _, _ = tangled_case
    st = gemmi.read_structure(str(truth))
    residues = {r.seqid.num: r for r in st[0][0]}
    for num, (p, q) in ((5, ("OE1", "OE2")), (9, ("NH1", "NH2"))):
        a, b = residues[num].find_atom(p, "B"), residues[num].find_atom(q, "B")
        pa, pb = gemmi.Position(a.pos), gemmi.Position(b.pos)
        a.pos, b.pos = pb, pa
    renamed = tmp_path / "renamed_truth.pdb"
    st.write_pdb(str(renamed))
    t, m = read_model(renamed), read_model(tangled)
    assert tangled_residues(m, t) == ["A/GLU 5", "A/LYS 8", "A/ARG 9"]
    assert naming_only(m, t) == ["A/GLU 5", "A/ARG 9"]
    assert naming_only(m, read_model(truth)) == []  # Lys 8's swapped Cα is a real tangle
    assert tangled_residues(read_model(truth), t) == naming_only(read_model(truth), t) == ["A/GLU 5", "A/ARG 9"]


def _untangler(path, table, **kw):
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.rrr import UntangleOptions, Untangler

    m = read_model(path)
    client, workdir = kw.pop("client", None), kw.pop("workdir", None)
    return Untangler(m, build_restraints(m), table, UntangleOptions(**kw), phases_deg=table.phases_deg, client=client,
                     workdir=workdir)


def test_density_kernel_matches_the_whole_array_reference():
    """The one-pass numba concur (table phases, fixed normal matrix, chunks) gives the positions of
    the whole-array Gauss–Newton reference, in single and double precision and as a series."""
    from drefine.untangle.density_engine import DensityEngine, DensitySpec

    man, amp, s2 = _toy_manifold()
    true = np.array([[3.0, 4.0, 5.0], [9.0, 11.0, 13.0]])
    rho = man.values(true, amp)
    replicas = true + np.array([[0.3, -0.2, 0.1], [-0.1, 0.25, 0.2]])
    eta = np.array([10.0, 4.0])
    w = np.ones(len(s2))
    ref = man.concur(rho, amp, eta[:, None] * replicas, eta, replicas.copy(), 0.01, w, steps=3)
    spec = DensitySpec(man.hr[0].astype(np.int64), *_ops_and_cell())
    for rep, dtype, tol in (("array", np.complex128, 1e-9), ("array", np.complex64, 1e-6), ("series", np.complex128, 1e-9)):
        eng = DensityEngine(spec, np.zeros(2, int), np.array([12.0, 20.0]), np.ones(2), n_chunks=2,
                            representation=rep, dtype=dtype)
        f = eng.start(true)
        assert np.allclose(f, rho.sum(axis=(0, 1)), rtol=1e-6)
        pos, _, _ = eng.step(f, eta[:, None] * replicas, eta, replicas, 0.01, 3)
        assert np.abs(pos - ref).max() < tol, rep


def _ops_and_cell():
    from drefine.density.direct import symmetry_operators
    from drefine.density.form_factors import scattering_types

    cell = gemmi.UnitCell(20, 24, 28, 90, 90, 90)
    rot, trans = symmetry_operators(gemmi.SpaceGroup("P 21 21 21"))
    hkl = np.array(gemmi.make_miller_array(cell, gemmi.SpaceGroup("P 21 21 21"), 2.5, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    return rot, trans, np.array(cell.frac.mat.tolist()), np.ones(len(hkl)), scattering_types(np.array(["C"]))


def test_untangle_swaps_a_tangled_ca_back_on_a_toy(tangled_case):
    """A Cα swapped between conformers (P 2₁2₁2₁, 1.2 Å, 2 % noise, true phases): a few RRR
    iterations untangle it, land within 0.03 Å of the truth, and R ends within 0.3 % of the truth's
    (RRR's end point sits where the geometry sets hold exactly, a little off the data's optimum)."""
    from drefine.density.fmodel import compute_fmodel
    from drefine.untangle.tangling import tangled_residues

    truth_path, tangled, table, _ = tangled_case
    truth = read_model(truth_path)
    assert tangled_residues(read_model(tangled), truth) == ["A/LYS 8"]
    u = _untangler(tangled, table, iterations=(20,))
    start = u.r_factors(u.xyz)
    u.run()
    out = u.model_at(u.xyz)
    assert tangled_residues(out, truth) == []
    assert np.sqrt(((out.atoms.xyz - truth.atoms.xyz) ** 2).sum(1).mean()) < 0.03
    assert u.r_factors(u.xyz)["r_work"] < compute_fmodel(truth, table).r_work + 0.003
    assert start["r_work"] < 0.03
    gaps = [h["gap"] for h in u.history]
    assert gaps[-1] < 0.2 * gaps[0]


def test_series_and_array_representations_agree(tangled_case):
    _, tangled, table, _ = tangled_case
    runs = {}
    for rep in ("array", "series"):
        u = _untangler(tangled, table, iterations=(6,), representation=rep, double_precision=True)
        u.run()
        runs[rep] = u
    assert np.abs(runs["array"].xyz - runs["series"].xyz).max() < 1e-8
    assert np.allclose([h["gap"] for h in runs["array"].history], [h["gap"] for h in runs["series"].history],
                       rtol=1e-7)


def test_running_structure_factor_sum_matches_the_stored_variables(tangled_case):
    _, tangled, table, _ = tangled_case
    u = _untangler(tangled, table, iterations=(3,), double_precision=True, chunks=2)
    u.start_stage()
    for _ in range(3):
        u.step()
    total = sum((ch.rho * ch.p[:, None, None]).sum(axis=(0, 1)) for ch in u.engine.chunks)
    assert np.allclose(u.engine.s, total, rtol=1e-12, atol=1e-9)
    # the divide: after the projection Σ p ρ_D = F_target exactly, for every used reflection
    c = u.engine.correction(u.data.f_target)
    projected = sum(((ch.rho + ch.p[:, None, None] * c) * ch.p[:, None, None]).sum(axis=(0, 1)) for ch in u.engine.chunks)
    assert np.allclose(projected, u.data.f_target, rtol=1e-10, atol=1e-8)
    # the solution estimate (concur of P_D(x)) leaves the iterate alone and lies near the step's positions
    before = [ch.rho.copy() for ch in u.engine.chunks]
    est = u.estimate()
    assert all(np.array_equal(a, ch.rho) for a, ch in zip(before, u.engine.chunks))
    assert 0 < np.abs(est - u.xyz).max() < 0.05


def test_same_result_on_threads_chunks_in_process_and_dask_actors(tangled_case):
    import numba
    from distributed import Client, LocalCluster

    _, tangled, table, _ = tangled_case
    ref = _untangler(tangled, table, iterations=(4,), chunks=2)
    ref.run()
    numba.set_num_threads(1)
    try:
        one = _untangler(tangled, table, iterations=(4,), chunks=2)
        one.run()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(one.xyz, ref.xyz)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dist = _untangler(tangled, table, iterations=(4,), chunks=2, client=client)
        dist.run()
    assert np.array_equal(dist.xyz, ref.xyz)


def test_memory_mapped_density_variables_give_the_same_run(tangled_case, tmp_path):
    _, tangled, table, _ = tangled_case
    ref = _untangler(tangled, table, iterations=(3,))
    ref.run()
    u = _untangler(tangled, table, iterations=(3,), memmap=True, workdir=tmp_path / "density")
    u.run()
    assert isinstance(u.engine.chunks[0].rho, np.memmap) and (tmp_path / "density" / "density_000.npy").exists()
    assert np.array_equal(u.xyz, ref.xyz)


def test_checkpoint_resume_continues_exactly(tangled_case, tmp_path):
    _, tangled, table, _ = tangled_case
    straight = _untangler(tangled, table, iterations=(3, 3))
    straight.run()
    first = _untangler(tangled, table, iterations=(3, 3))
    first.start_stage()
    for _ in range(2):
        first.step()
    first.save_checkpoint(tmp_path / "ck")
    second = _untangler(tangled, table, iterations=(3, 3))
    second.load_checkpoint(tmp_path / "ck")
    second.run(resumed=True)
    assert np.array_equal(second.xyz, straight.xyz)
    assert [h["gap"] for h in second.history] == [h["gap"] for h in straight.history]
    other = _untangler(tangled, table, iterations=(5,))
    with pytest.raises(Exception, match="other inputs or options"):
        other.load_checkpoint(tmp_path / "ck")


def test_coplanar_projection_is_idempotent_and_nearest():
    from drefine.untangle.projections import project_coplanar

    n, k = 60, 6
    x = RNG.normal(size=(n, k, 3))
    x[:, :, 2] *= 0.2
    tol = np.full(n, 0.05)
    p = project_coplanar(x, tol)
    assert np.allclose(project_coplanar(p, tol), p, atol=1e-12)
    # within tol of a plane: the smallest singular value of the centred points
    assert np.all(np.linalg.svd(p - p.mean(1, keepdims=True), compute_uv=False)[:, 2] <= 0.05 + 1e-9)
    moved = np.sqrt(((p - x) ** 2).sum(axis=(1, 2)))
    for _ in range(200):  # random points of the set near x (coplanar, plus a step inside the tolerance) are never nearer
        normal = RNG.normal(size=(n, 3))
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        y = p + RNG.normal(size=(n, k, 3)) * 0.05
        off = np.einsum("nki,ni->nk", y - y.mean(1, keepdims=True), normal)
        y = y - off[:, :, None] * normal[:, None, :]
        ball = RNG.normal(size=(n, k, 3))
        ball *= (tol * RNG.uniform(0, 1, n))[:, None, None] / np.sqrt((ball ** 2).sum(axis=(1, 2)))[:, None, None]
        assert np.all(np.sqrt(((y + ball - x) ** 2).sum(axis=(1, 2))) >= moved - 1e-9)


def test_disulfide_projection_takes_the_nearer_pairing():
    from drefine.untangle.projections import project_disulfides

    # conformer 1 of cysteine i sits next to conformer 2 of cysteine j, and the other way round
    x = np.array([[[0.0, 0, 0], [5.0, 0, 0], [5.0, 2.2, 0], [0.0, 1.9, 0]]])
    p = project_disulfides(x, 2.03, 0.02)
    assert np.linalg.norm(p[0, 0] - p[0, 3]) == pytest.approx(2.01, abs=1e-9)
    assert np.linalg.norm(p[0, 1] - p[0, 2]) == pytest.approx(2.05, abs=1e-9)
    assert np.allclose(project_disulfides(p, 2.03, 0.02), p)


def test_later_stages_hold_bonds_in_tighter_windows_and_resume_with_them(tangled_case, tmp_path):
    _, tangled, table, _ = tangled_case

    def bond_z(u):
        r = u.geometry.restraints
        d = np.linalg.norm(u.xyz[r.bond_atoms[:, 0]] - u.xyz[r.bond_atoms[:, 1]], axis=1)
        return (d - r.bond_ideal) / r.bond_sigma

    loose = _untangler(tangled, table, iterations=(15, 15), bond_tolerance=1.0, bond_tolerance_final=1.0)
    loose.run()
    tight = _untangler(tangled, table, iterations=(15, 15), bond_tolerance=1.0, bond_tolerance_final=0.3)
    tight.run()
    assert [h["gap"] for h in tight.history[:15]] == [h["gap"] for h in loose.history[:15]]  # stage 1 alike
    z_loose, z_tight = bond_z(loose), bond_z(tight)
    assert np.sqrt(np.mean(z_tight ** 2)) < 0.8 * np.sqrt(np.mean(z_loose ** 2))
    assert np.abs(z_tight).max() < np.abs(z_loose).max()
    # a checkpoint taken in stage 2 resumes with stage 2's windows: the run continues exactly
    first = _untangler(tangled, table, iterations=(15, 15), bond_tolerance=1.0, bond_tolerance_final=0.3)
    first.start_stage()
    for _ in range(15):
        first.step()
    first.stage, first.iteration = 1, 0
    first.start_stage()
    first.step()
    first.save_checkpoint(tmp_path / "ck")
    second = _untangler(tangled, table, iterations=(15, 15), bond_tolerance=1.0, bond_tolerance_final=0.3)
    second.load_checkpoint(tmp_path / "ck")
    second.run(resumed=True)
    assert np.array_equal(second.xyz, tight.xyz)


def test_untangle_command_writes_model_report_plot_and_handles_bad_input(tangled_case, tmp_path, capsys):
    import json

    from drefine.cli import main

    truth, tangled, _, mtz = tangled_case
    prefix = tmp_path / "out"
    rc = main(["untangle", str(tangled), str(mtz), "--phases", "PHI", "--iterations", "8,4", "--truth", str(truth),
               "-o", str(prefix)])
    assert rc == 0
    rep = json.loads((tmp_path / "out.json").read_text())
    assert rep["start"]["n_tangled"] == 1 and rep["final"]["n_tangled"] == 0
    assert rep["details_tangled"]["final_atoms"] == {}
    # the crossing search before RRR and the residue swap search after it are on by default
    assert set(rep["crossings"]) == {"before_rrr", "residue_swaps"}
    # B factors and occupancies refined after RRR: R no worse than after RRR, coordinates untouched
    assert rep["final"]["r_work"] <= rep["after_rrr"]["r_work"] + 1e-4
    assert len(rep["trajectory"]) == 12 and [s["stage"] for s in rep["stages"]] == [1, 2]
    assert (tmp_path / "out.png").stat().st_size > 1000 and (tmp_path / "out.cif").exists()
    assert not (tmp_path / "out_checkpoint").exists()
    assert rep["options"]["rigid_groups"] is True
    # the second crossing search after RRR runs only when asked for (and the rigid groups can be left out)
    assert main(["untangle", str(tangled), str(mtz), "--phases", "PHI", "--iterations", "2", "--adp-cycles", "0",
                 "--crossings-after-rrr", "--residue-swaps", "--no-rigid-groups", "-o", str(tmp_path / "twice")]) == 0
    twice = json.loads((tmp_path / "twice.json").read_text())
    assert set(twice["crossings"]) == {"before_rrr", "after_rrr", "residue_swaps"}
    assert twice["crossings"]["residue_swaps"]["rounds"][0]["candidates"] and twice["options"]["rigid_groups"] is False
    # one RRR step without either search (--crossing-cycles 0 --no-residue-swaps) leaves the toy tangled:
    # the log names the swapped atom per conformer
    assert main(["untangle", str(tangled), str(mtz), "--phases", "PHI", "--iterations", "1", "--crossing-cycles", "0",
                 "--no-residue-swaps", "--adp-cycles", "0", "--truth", str(truth), "-o", str(tmp_path / "one")]) == 0
    assert "crossings" not in json.loads((tmp_path / "one.json").read_text())  # neither search ran
    one = json.loads((tmp_path / "one.json").read_text())["details_tangled"]
    assert one["final"] == ["A/LYS 8"] and one["final_atoms"]["A/LYS 8"]["A"].startswith("CA→B")
    assert "  A/LYS 8: A: CA→B" in (tmp_path / "one.log").read_text()
    capsys.readouterr()
    (tmp_path / "busy_checkpoint").mkdir()
    assert main(["untangle", str(tangled), str(mtz), "-o", str(tmp_path / "busy")]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["untangle", str(tangled), str(mtz), "--phases", "NOPE", "-o", str(tmp_path / "x")]) == 1
    assert "NOPE" in capsys.readouterr().err
    assert main(["untangle", str(tangled), str(mtz), "--resume", "-o", str(tmp_path / "y")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "torn_crossings.npz").write_bytes(b"not a zip")  # a damaged saved search: one clear line
    assert main(["untangle", str(tangled), str(mtz), "--resume", "-o", str(tmp_path / "torn")]) == 1
    err = capsys.readouterr().err
    assert "torn_crossings.npz" in err and "Traceback" not in err
    assert main(["untangle", str(tangled), str(mtz), "--iterations", "0", "-o", str(tmp_path / "z")]) == 1
    for bad in ("0,0.3", "1,x", "1,0.5,0.3"):
        assert main(["untangle", str(tangled), str(mtz), "--bond-tolerance", bad, "-o", str(tmp_path / "z")]) == 1
        assert "--bond-tolerance" in capsys.readouterr().err
    assert not list(tmp_path.glob("[xyz].*"))


def test_peptide_motifs_are_planar_ideal_and_take_the_nearer_form(example_model_path):
    """Peptide units from the dictionary: bonds and angles ideal, all atoms in one plane, ω = 180°
    (trans) or 0° (cis); the deposited-like example's peptides are nearer their trans motif."""
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import DivideAndConcur, _bond_lookup
    from drefine.untangle.projections import kabsch_placement

    m = read_model(example_model_path)
    rs = build_restraints(m)
    dc = DivideAndConcur(m, rs)
    length = _bond_lookup(rs)
    peptide = [g for g in dc.groups if g.kind == "motif" and g.motifs.shape[1] == 2 and g.atoms.shape[1] in (5, 6)]
    assert sum(len(g.atoms) for g in peptide) == 39  # 40 residues, one chain
    for g in peptide:
        a = g.atoms
        for form in (0, 1):
            mot = g.motifs[:, form]
            assert np.allclose(np.linalg.norm(mot[:, 1] - mot[:, 3], axis=1), length(a[:, 1], a[:, 3]))
            assert np.allclose(np.linalg.norm(mot[:, 3] - mot[:, 4], axis=1), length(a[:, 3], a[:, 4]))
            assert np.allclose(mot[..., 2], 0.0)
            b1, b2, b3 = mot[:, 1] - mot[:, 0], mot[:, 3] - mot[:, 1], mot[:, 4] - mot[:, 3]
            n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
            omega = np.degrees(np.arctan2(np.einsum("ij,ij->i", np.cross(n1, n2), b2 / np.linalg.norm(b2, axis=1)[:, None]),
                                          np.einsum("ij,ij->i", n1, n2)))
            assert np.allclose(np.abs(omega), 180.0 if form == 0 else 0.0, atol=1e-6)
        _, d_trans = kabsch_placement(m.atoms.xyz[a], g.motifs[:, 0])
        _, d_cis = kabsch_placement(m.atoms.xyz[a], g.motifs[:, 1])
        assert np.all(d_trans < d_cis)


def test_untangle_command_interrupted_then_resumed_matches_a_straight_run(tangled_case, tmp_path, monkeypatch,
                                                                          capsys):
    """Ctrl-C (a real SIGINT) in the middle of a step: the step finishes, a checkpoint is written,
    exit 130; the same command with --resume takes the saved crossing search instead of repeating
    it and ends exactly where an uninterrupted run does; likewise when stopped before RRR's first
    checkpoint, or in the residue swap search after RRR."""
    import json
    import os
    import signal

    from drefine.cli import main
    from drefine.untangle.rrr import Untangler

    _, tangled, _, mtz = tangled_case
    # memory-mapped density variables, so the resume also restores into the maps
    args = [str(tangled), str(mtz), "--phases", "PHI", "--iterations", "4,3", "--adp-cycles", "0", "--memmap",
            "--no-residue-swaps"]
    assert main(["untangle", *args, "-o", str(tmp_path / "straight")]) == 0
    real_step = Untangler.step
    calls = {"n": 0}

    def interrupted_step(self):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the step is under way
        return real_step(self)

    monkeypatch.setattr(Untangler, "step", interrupted_step)
    assert main(["untangle", *args, "-o", str(tmp_path / "cut")]) == 130
    assert (tmp_path / "cut_checkpoint" / "meta.json").exists() and not (tmp_path / "cut.cif").exists()
    assert (tmp_path / "cut_crossings.npz").exists()
    monkeypatch.setattr(Untangler, "step", real_step)
    capsys.readouterr()
    assert main(["untangle", *args, "--resume", "-o", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "taken from" in out and "candidate swap" not in out
    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads((tmp_path / "cut.json").read_text())
    assert [h["gap"] for h in a["trajectory"]] == [h["gap"] for h in b["trajectory"]]
    assert (tmp_path / "straight.cif").read_text().split("_atom_site")[-1] == \
        (tmp_path / "cut.cif").read_text().split("_atom_site")[-1]
    assert not list(tmp_path.glob("*_density")) and not list(tmp_path.glob("*_checkpoint"))
    assert not list(tmp_path.glob("*_crossings.npz"))
    assert a["crossings"]["before_rrr"]["accepted"] == b["crossings"]["before_rrr"]["accepted"]
    # stopped after the search, before RRR's first checkpoint (say, killed): --resume takes the
    # saved search and runs RRR from its start, to the same end
    real_run = Untangler.run

    def killed(self, *a, **k):
        raise SystemExit(137)

    monkeypatch.setattr(Untangler, "run", killed)
    with pytest.raises(SystemExit):
        main(["untangle", *args, "-o", str(tmp_path / "early")])
    assert (tmp_path / "early_crossings.npz").exists() and not (tmp_path / "early_checkpoint").exists()
    monkeypatch.setattr(Untangler, "run", real_run)
    assert main(["untangle", *args, "--resume", "-o", str(tmp_path / "early")]) == 0
    c = json.loads((tmp_path / "early.json").read_text())
    assert [h["gap"] for h in a["trajectory"]] == [h["gap"] for h in c["trajectory"]]
    # Ctrl-C in the residue swap search after RRR: exit 130, RRR's end is checkpointed (though 3 is
    # no multiple of --checkpoint-every), and --resume repeats only the search, from RRR's end. (The
    # search is a stand-in that leaves the model as it is: the real one is tested above and below.)
    from drefine.untangle import crossings

    searched_at = []

    def interrupted_search(*a, **k):
        raise KeyboardInterrupt

    def no_swap(model, *a, **k):
        searched_at.append(model.atoms.xyz.copy())
        return model, crossings.CrossingReport()

    late = [*args, "--residue-swaps"]  # the last of --no-residue-swaps / --residue-swaps wins
    monkeypatch.setattr(crossings, "resolve_residue_swaps", interrupted_search)
    assert main(["untangle", *late, "-o", str(tmp_path / "late")]) == 130
    assert "repeats only the search" in (tmp_path / "late.log").read_text()
    monkeypatch.setattr(crossings, "resolve_residue_swaps", no_swap)
    capsys.readouterr()
    assert main(["untangle", *late, "--resume", "-o", str(tmp_path / "late")]) == 0
    assert "stage 2, iteration 3" in capsys.readouterr().out and len(searched_at) == 1
    d = json.loads((tmp_path / "late.json").read_text())
    assert [h["gap"] for h in a["trajectory"]] == [h["gap"] for h in d["trajectory"]]
    assert d["crossings"]["residue_swaps"]["accepted"] == []
    assert (tmp_path / "straight.cif").read_text().split("_atom_site")[-1] == \
        (tmp_path / "late.cif").read_text().split("_atom_site")[-1]
    assert not list(tmp_path.glob("*_checkpoint")) and not list(tmp_path.glob("*_crossings.npz"))
    assert "after_closing_stage" not in d and [s["stage"] for s in d["stages"]] == [1, 2]
    # a search after RRR that makes a swap is followed by one more RRR stage (the last stage's 3
    # iterations), which holds the geometry to its windows again: here the stand-in search stretches
    # a bond by 0.2 Å, as a loose refinement of a swapped region might
    from drefine.io.models import read_model
    from drefine.restraints.topology import build_restraints

    restraints = build_restraints(read_model(tangled))
    heavy = ~read_model(tangled).atoms.is_hydrogen[restraints.bond_atoms].any(axis=1)
    k = int(np.flatnonzero(heavy)[0])
    i, j = restraints.bond_atoms[k]

    def stretching_search(model, *a, **kw):
        m = model.copy()
        v = m.atoms.xyz[i] - m.atoms.xyz[j]
        m.atoms.xyz[i] += 0.2 * v / np.linalg.norm(v)
        rep = crossings.CrossingReport()
        rep.accepted.append("stand-in")
        return m, rep

    def stretch(path):
        xyz = read_model(path).atoms.xyz
        return float(np.linalg.norm(xyz[i] - xyz[j]) - restraints.bond_ideal[k])

    monkeypatch.setattr(crossings, "resolve_residue_swaps", stretching_search)
    assert main(["untangle", *late, "-o", str(tmp_path / "closed")]) == 0
    e = json.loads((tmp_path / "closed.json").read_text())
    assert [s["stage"] for s in e["stages"]] == [1, 2, 3] and len(e["trajectory"]) == len(a["trajectory"]) + 3
    assert [h["stage"] for h in e["trajectory"][-3:]] == [3, 3, 3] and "after_closing_stage" in e
    assert "closing RRR stage" in (tmp_path / "closed.log").read_text()
    assert abs(stretch(tmp_path / "straight.cif")) < 0.05 and abs(stretch(tmp_path / "closed.cif")) < 0.05


@pytest.mark.parametrize("labin", [None, "F,SIGF,FreeR_flag"])
def test_phases_option_takes_the_named_column(tangled_case, tmp_path, labin):
    """--phases picks its column even when another phase column would be chosen automatically."""
    import argparse

    from drefine.cli import _read_phased_reflections

    _, _, table, mtz = tangled_case
    m = gemmi.read_mtz_file(str(mtz))
    data = np.array(m, copy=True)
    col = m.column_labels().index("PHI")
    m.add_column("PHI2", "P")
    m.set_data(np.column_stack([data, (data[:, col] + 90.0 + 180.0) % 360.0 - 180.0]))
    path = tmp_path / "two_phases.mtz"
    m.write_to_file(str(path))
    t = _read_phased_reflections(argparse.Namespace(data=str(path), labin=labin, phases="PHI2"))
    assert t.columns_used["PHI"] == "PHI2" and t.columns_used["F"] == "F"
    shift = (t.phases_deg - table.phases_deg + 540.0) % 360.0 - 180.0
    assert np.allclose(shift, 90.0, atol=0.01)


@pytest.mark.parametrize("occ_a", [0.5, 0.6])
def test_crossing_search_undoes_a_conformer_crossing_and_keeps_the_truth(example_model_path, tmp_path, occ_a):
    """Residues 5–6 and N of Ile 7 with conformers swapped: the conformers cross at Ile 7 (tangled by
    the rule). With equal occupancies the density cannot tell; only the strained crossing can. The
    search must find the crossing, swap it back and leave the truth alone."""
    from drefine.density.synthetic import synthetic_reflections
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.crossings import find_crossings, resolve_crossings

    truth_path, tangled_path = _two_conformer_case(example_model_path, tmp_path, swap=("N",), swap_before=2,
                                                   occ_a=occ_a, residue=2)
    truth, tangled = read_model(truth_path), read_model(tangled_path)
    table = synthetic_reflections(truth, 1.2, noise=0.02, seed=1)
    restraints = build_restraints(tangled)
    assert tangled_residues(tangled, truth) == ["A/ILE 7"]
    sides = [set(tangled.atoms.residue_index[c.side]) for c in find_crossings(tangled, restraints)]
    assert any({0, 1} <= side for side in sides)  # a candidate cuts off the swapped residues
    fixed, report = resolve_crossings(tangled, table, restraints, log=lambda s: None)
    assert len(report.accepted) == 1 and "ILE 7" in report.accepted[0]
    if occ_a == 0.5:  # a wrong swap was judged and refused
        assert any(c["gain"] < 0 for r in report.rounds for c in r["candidates"])
    assert tangled_residues(fixed, truth) == []
    rmsd = np.sqrt(((fixed.atoms.xyz - truth.atoms.xyz) ** 2).sum(1).mean())
    assert rmsd < 0.05
    same, report = resolve_crossings(truth, table, restraints, log=lambda s: None)
    assert report.accepted == []
    assert tangled_residues(same, truth) == []


def test_crossing_search_refuses_a_swap_that_breaks_the_geometry(example_model_path, tmp_path, monkeypatch):
    """The geometry guard: every judged candidate reports the worst bond/angle |z| near it, swapped
    and unswapped; a swap leaving a bond at 10σ where the model has 3σ is refused, one that only
    reaches 3.5σ or improves on the model's 7σ is not; the accepted swap of the toy meets it; and
    with the guard refusing everything, the swap the data and restraints prefer is not made."""
    from drefine.density.synthetic import synthetic_reflections
    from drefine.restraints.topology import build_restraints
    from drefine.untangle import crossings

    def cand(z, z_model):
        return crossings.Crossing(0, 1, -0.9, np.array([0]), np.array([1]), "x", 1e-3, z, z_model)

    assert not crossings.geometry_acceptable(cand(10.0, 3.0))
    assert crossings.geometry_acceptable(cand(3.5, 2.0)) and crossings.geometry_acceptable(cand(6.0, 7.0))
    truth_path, tangled_path = _two_conformer_case(example_model_path, tmp_path, swap=("N",), swap_before=2,
                                                   occ_a=0.6, residue=2)
    tangled = read_model(tangled_path)
    table = synthetic_reflections(read_model(truth_path), 1.2, noise=0.02, seed=1)
    restraints = build_restraints(tangled)
    _, report = crossings.resolve_crossings(tangled, table, restraints, log=lambda s: None)
    first = report.rounds[0]["candidates"]
    taken = [c for c in first if c["bond"] in report.rounds[0]["accepted"]]
    assert len(taken) == 1 and taken[0]["worst_z"] <= max(crossings.GEOMETRY_Z_MAX, taken[0]["worst_z_model"])
    assert all(np.isfinite(c["worst_z"]) and np.isfinite(c["worst_z_model"]) for c in first)
    monkeypatch.setattr(crossings, "geometry_acceptable", lambda c: False)
    _, refused = crossings.resolve_crossings(tangled, table, restraints, log=lambda s: None)
    assert refused.accepted == [] and any(c["gain"] > crossings.MIN_GAIN for c in refused.rounds[0]["candidates"])


def test_crossing_search_on_dask_workers_matches_in_process(example_model_path, tmp_path):
    from distributed import Client, LocalCluster

    from drefine.density.synthetic import synthetic_reflections
    from drefine.restraints.topology import build_restraints
    from drefine.threads import single_threaded
    from drefine.untangle.crossings import resolve_crossings

    truth_path, tangled_path = _two_conformer_case(example_model_path, tmp_path, swap=("N",), swap_before=2,
                                                   occ_a=0.5, residue=2)
    tangled = read_model(tangled_path)
    table = synthetic_reflections(read_model(truth_path), 1.2, noise=0.02, seed=1)
    restraints = build_restraints(tangled)
    with single_threaded():  # the workers' refinements run single-threaded
        ref, ref_report = resolve_crossings(tangled, table, restraints, log=lambda s: None)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            dist, dist_report = resolve_crossings(tangled, table, restraints, log=lambda s: None, client=client)
    assert dist_report.rounds == ref_report.rounds and len(ref_report.accepted) == 1
    assert np.array_equal(dist.atoms.xyz, ref.atoms.xyz)


def test_residue_swap_search_relabels_a_lone_carbonyl_oxygen(example_model_path, tmp_path):
    """Lys 8's carbonyl O alone in the other conformer (the conformers 0.25–0.5 Å apart, equal
    occupancies: the density cannot tell). The crossing search's candidates need opposed offsets;
    the residue swap search proposes every terminal atom, N, C=O and side chain of each residue,
    finds this one, and leaves the truth as it is."""
    from drefine.density.synthetic import synthetic_reflections
    from drefine.restraints.topology import build_restraints
    from drefine.untangle import crossings

    truth_path, tangled_path = _two_conformer_case(example_model_path, tmp_path, swap=("O",), occ_a=0.5)
    truth, tangled = read_model(truth_path), read_model(tangled_path)
    table = synthetic_reflections(truth, 1.2, noise=0.02, seed=1)
    restraints = build_restraints(tangled)
    assert tangled_residues(tangled, truth) == ["A/LYS 8"]
    cands = crossings.residue_swap_candidates(tangled, restraints)
    at = tangled.atoms
    for c in cands:  # one residue, one conformer per side, each atom with its partner of the same name
        assert len(set(at.residue_index[c.side])) == 1 and set(at.conformer[c.side]) == {at.conformer[c.side[0]]}
        assert np.array_equal(at.name[c.side], at.name[c.partners]) and not (at.conformer[c.partners] ==
                                                                             at.conformer[c.side[0]]).any()
    kinds = {c.label.split(" (")[0].split()[-1] for c in cands if "LYS 8" in c.label}
    assert {"N", "O", "C,O", "NZ"} <= kinds and any(k.startswith("CB,") for k in kinds)
    fixed, report = crossings.resolve_residue_swaps(tangled, table, restraints, log=lambda s: None)
    assert report.accepted and all("LYS 8" in a for a in report.accepted)
    assert tangled_residues(fixed, truth) == []
    # each round with swaps reports the R the model has with them made. At equal occupancies the data
    # cannot tell the swap (the geometry does), so R stays where it was; a round that broke the
    # model (lotswrong, BENCHMARKS session 27) would show here
    from drefine.density.fmodel import compute_fmodel

    assert abs(report.rounds[0]["r_work"] - compute_fmodel(tangled, table).r_work) < 5e-4
    same, report = crossings.resolve_residue_swaps(truth, table, restraints, log=lambda s: None)
    assert report.accepted == [] and tangled_residues(same, truth) == []
