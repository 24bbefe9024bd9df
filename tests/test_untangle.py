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


def test_rrr_with_data_pulls_a_shaken_fragment_towards_the_truth(example_model_path, tmp_path):
    """Positions and density variables together (P 1 box, true phases, 1.2 Å data, reflections
    beyond 2.5 Å used): a 0.4 Å shaken three-residue fragment moves most of the way back, with
    the gap closing; without the data (g = 0) it does not."""
    from drefine.density.direct import scatterers_of_model
    from drefine.model.perturb import shake_coordinates
    from drefine.restraints.topology import build_restraints
    from drefine.untangle.constraints import DivideAndConcur
    from drefine.untangle.density import DensityManifold, atom_amplitudes
    from drefine.untangle.rrr import RRRSolver

    st = gemmi.read_structure(str(example_model_path))
    ch = st[0][0]
    for i in range(len(ch) - 1, 2, -1):
        del ch[i]
    xyz = np.array([a.pos.tolist() for r in ch for a in r])
    lo = xyz.min(0) - 4.0
    for r in ch:
        for a in r:
            a.pos = gemmi.Position(*(np.array(a.pos.tolist()) - lo))
    st.cell = gemmi.UnitCell(*(xyz.max(0) - xyz.min(0) + 8.0), 90, 90, 90)
    st.setup_entities()
    st.make_mmcif_document().write_file(str(tmp_path / "frag.cif"))
    m = read_model(tmp_path / "frag.cif")
    rs = build_restraints(m)
    sc = scatterers_of_model(m)
    hkl = np.array(gemmi.make_miller_array(m.cell, gemmi.SpaceGroup("P 1"), 1.2, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    s2 = ((hkl @ sc.frac_matrix) ** 2).sum(1)
    keep = np.sqrt(s2) >= 0.4  # |k| = 2π|s| ≥ 0.4·2π Å⁻¹: the default cut; the others carry no weight
    hkl, s2 = hkl[keep], s2[keep]
    amp = atom_amplitudes(sc.types.a, sc.types.b, sc.types.type_of_atom, m.atoms.b_iso[sc.atom_index], s2)
    man = DensityManifold(hkl, sc.rot, sc.trans, sc.frac_matrix)
    atoms = sc.atom_index
    occ = m.atoms.occupancy[atoms]
    f = (man.values(m.atoms.xyz[atoms], amp) * occ[:, None, None]).sum(axis=(0, 1))
    start, _ = shake_coordinates(m, 0.4, 2)

    def run(g):
        solver = RRRSolver(DivideAndConcur(start, rs), man, amp, occ, f, np.ones(len(hkl)), atoms, g=g)
        x = solver.start(start.atoms.xyz)
        gaps = []
        for _ in range(40):
            x, gap, pos = solver.step(x, start.atoms.xyz)
            gaps.append(gap)
        return np.sqrt(((pos - m.atoms.xyz) ** 2).sum(1).mean()), gaps

    rmsd, gaps = run(0.1)
    rmsd_geometry_only, _ = run(0.0)
    assert rmsd < 0.5 * rmsd_geometry_only and rmsd < 0.15 and gaps[-1] < 0.2 * gaps[0]
