"""Reciprocal-space refinement: the symmetry-expanded FFT against direct summation, the amplitude
Jacobian, occupancy and ADP parametrisations against finite differences, map coefficients, and
`drefine xray` end to end on data made here (a 40-residue model in P 2₁2₁2₁) and on 6mw0."""
import copy
import dataclasses
import json

import gemmi
import numpy as np
import pytest
from conftest import need, p212121_structure, rmsd, write_xray_case

from drefine.cli import main
from drefine.density.crystal_fft import CrystalStructureFactors
from drefine.density.direct import direct_gradient, direct_structure_factors, scatterers_of_model
from drefine.density.model_map import REFINEMENT_ACCURACY
from drefine.density.synthetic import synthetic_reflections
from drefine.io.models import read_model, write_model
from drefine.io.reflections import read_reflections
from drefine.model.occupancy import occupancy_groups
from drefine.refine.uncertainty import amplitude_jacobian
from drefine.refine.xray import map_coefficients
from drefine.restraints.adp import ADPPairs, b_similarity_term, u_similarity_term
from drefine.targets.xray_targets import MLParameters


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def crystal_model(example_model_path, tmp_path_factory):
    """hth40 in P 2₁2₁2₁ with a doubled cell (symmetry mates in other octants), B 15–35 Å², one
    residue with two conformers."""
    st = p212121_structure(example_model_path)
    rng = np.random.default_rng(0)
    for cra in st[0].all():
        cra.atom.b_iso = float(rng.uniform(15, 35))
    res = st[0][0][10]
    for at in list(res):
        if at.name not in ("N", "CA", "C", "O"):
            at.altloc = "A"
            at.occ = 0.6
            twin = at.clone()
            twin.altloc = "B"
            twin.occ = 0.4
            twin.pos = gemmi.Position(at.pos.x + 0.3, at.pos.y, at.pos.z)
            res.add_atom(twin)
    path = tmp_path_factory.mktemp("xray") / "crystal.cif"
    st.setup_entities()
    st.make_mmcif_document().write_file(str(path))
    return path


def test_symmetry_expanded_fft_matches_direct(crystal_model):
    m = read_model(crystal_model)
    sc = scatterers_of_model(m)
    sc.is_aniso[::7] = True
    sc.u_cart[::7, 3] = 0.02  # a few anisotropic atoms
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 2.5, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    sub = np.arange(0, len(hkl), 37)
    calc = CrystalStructureFactors(sc, hkl, 2.5)
    f = calc.structure_factors(sc)
    f_dir = direct_structure_factors(sc, hkl[sub])
    assert rel(f[sub], f_dir) < 5e-5
    rng = np.random.default_rng(2)
    d = np.zeros(len(hkl), complex)
    d[sub] = rng.normal(size=len(sub)) + 1j * rng.normal(size=len(sub))
    g = calc.gradient(sc, d)
    gd = direct_gradient(sc, hkl[sub], d[sub])
    for name in ("xyz", "b_iso", "occ", "u"):
        assert rel(getattr(g, name), getattr(gd, name)) < 5e-4, name
    # positions and occupancies only (B, U fixed): the same numbers, no shape part
    g_occ = calc.gradient(sc, d, with_adp=False)
    assert rel(g_occ.occ, gd.occ) < 5e-4 and rel(g_occ.xyz, gd.xyz) < 5e-4
    assert not np.any(g_occ.u) and not np.any(g_occ.b_iso)
    # single-precision refinement grids: ~1e-3, and gradient consistent with its own F
    fast = CrystalStructureFactors(sc, hkl, 2.5, accuracy=REFINEMENT_ACCURACY)
    assert rel(fast.structure_factors(sc)[sub], f_dir) < 5e-3
    assert rel(fast.gradient(sc, d).xyz, gd.xyz) < 5e-3


def test_calculators_on_the_same_reflections_share_their_set_up(crystal_model, monkeypatch):
    """A second calculator on the same reflections and grid takes the kept set-up (read-only) and
    gives the same F and gradient as one made from scratch; another grid gets its own."""
    import drefine.density.crystal_fft as cf

    m = read_model(crystal_model)
    sc = scatterers_of_model(m)
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 3.0, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    monkeypatch.setattr(cf, "_SETUP_CACHE", {})
    first = CrystalStructureFactors(sc, hkl, 3.0)
    again = CrystalStructureFactors(sc, hkl.copy(), 3.0)
    assert again._g_order is first._g_order and not again.phase.flags.writeable
    other = CrystalStructureFactors(sc, hkl, 3.0, rate=1.25)
    assert other._g_order is not first._g_order and other.shape != first.shape
    monkeypatch.setattr(cf, "_SETUP_CACHE", {})
    fresh = CrystalStructureFactors(sc, hkl, 3.0)
    assert fresh._g_order is not first._g_order
    d = np.exp(1j * np.arange(len(hkl)))
    np.testing.assert_array_equal(again.structure_factors(sc), fresh.structure_factors(sc))
    np.testing.assert_array_equal(again.gradient(sc, d).xyz, fresh.gradient(sc, d).xyz)
    sub = hkl[::3]  # different reflections: a set-up of their own
    assert CrystalStructureFactors(sc, sub, 3.0).s2.shape == (len(sub),)
    monkeypatch.setattr(cf, "_SETUP_CACHE_BYTES", 1000)  # a set-up over the byte budget is not kept
    monkeypatch.setattr(cf, "_SETUP_CACHE", {})
    CrystalStructureFactors(sc, hkl, 3.0)
    assert not cf._SETUP_CACHE


def test_moving_subset_structure_factors_equal_the_whole_calculation(crystal_model):
    """Fixed atoms' F once plus the moving atoms' F each call: the same F and gradients (position,
    B, occupancy) as transforming every atom, and the fixed part is redone when a fixed atom moves."""
    from drefine.density.crystal_fft import MovingSubsetStructureFactors

    m = read_model(crystal_model)
    sc = scatterers_of_model(m)
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 2.5, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    whole = CrystalStructureFactors(sc, hkl, 2.5)
    moving = np.arange(10, 40)
    part = MovingSubsetStructureFactors(CrystalStructureFactors(sc, hkl, 2.5), moving)
    rng = np.random.default_rng(5)
    d = rng.normal(size=len(hkl)) + 1j * rng.normal(size=len(hkl))
    for step in range(3):
        if step == 1:
            sc.frac[moving] += rng.normal(scale=0.003, size=(len(moving), 3))  # the moving atoms move
        if step == 2:
            sc.frac[100] += 0.01  # a fixed atom moves: the fixed part must follow
        f = whole.structure_factors(sc)
        assert rel(part.structure_factors(sc), f) < 2e-5
        g, gp = whole.gradient(sc, d, positions_only=True), part.gradient(sc, d, positions_only=True)
        assert rel(gp.xyz[moving], g.xyz[moving]) < 2e-4
        assert not np.any(np.delete(gp.xyz, moving, axis=0))
    # B and occupancy gradients of the moving atoms (a local refinement of their B), zero elsewhere
    g, gp = whole.gradient(sc, d), part.gradient(sc, d)
    assert rel(gp.b_iso[moving], g.b_iso[moving]) < 2e-4
    assert rel(gp.occ[moving], g.occ[moving]) < 2e-4
    assert not np.any(np.delete(gp.b_iso, moving)) and not np.any(np.delete(gp.occ, moving))


def test_neutron_structure_factors_use_scattering_lengths(crystal_model):
    """Neutron F by the FFT route equals Σ b_coh e^{−B s²/4} e^{2πi h·x} over all symmetry copies."""
    m = read_model(crystal_model)
    sc = scatterers_of_model(m, source="neutron")
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 3.0, 0, True))[::50]
    f = CrystalStructureFactors(sc, hkl, 3.0).structure_factors(sc)
    ops = m.spacegroup.operations()
    ref = np.zeros(len(hkl), complex)
    idx = m.model_atoms(0)
    b_coh = np.array([gemmi.Element(e).neutron92.get_coefs()[0] for e in m.atoms.element[idx]])
    frac = sc.frac
    s2 = ((hkl @ sc.frac_matrix) ** 2).sum(1)
    for op in ops:
        R = np.array(op.rot) / op.DEN
        t = np.array(op.tran) / op.DEN
        x = frac @ R.T + t
        ref += (np.exp(2j * np.pi * hkl @ x.T) * (b_coh * m.atoms.occupancy[idx]
                                                   * np.exp(-np.outer(s2, m.atoms.b_iso[idx]) / 4))).sum(1)
    assert rel(f, ref) < 5e-5


def test_amplitude_jacobian_matches_finite_differences(crystal_model):
    m = read_model(crystal_model)
    table = synthetic_reflections(m, 3.0, k_sol=0.0)
    table = table.select(np.arange(0, len(table), max(1, len(table) // 300)))
    sc = scatterers_of_model(m)
    k_total = np.full(len(table), 1.7)
    f = direct_structure_factors(sc, table.hkl) * k_total
    rows = np.arange(len(table))
    jac = amplitude_jacobian(m, table, f, k_total, rows)
    atom, h = 5, 1e-4
    for c in range(4):
        p, q = copy.deepcopy(sc), copy.deepcopy(sc)
        if c < 3:
            p.frac[atom] += sc.frac_matrix[:, c] * h
            q.frac[atom] -= sc.frac_matrix[:, c] * h
            step = h
        else:
            step = h * 8 * np.pi ** 2  # B by h·8π² Å² is U by h
            p.u_cart[atom, :3] += h
            q.u_cart[atom, :3] -= h
        fd = (np.abs(direct_structure_factors(p, table.hkl)) - np.abs(direct_structure_factors(q, table.hkl))) * 1.7
        fd /= 2 * step
        assert rel(jac[:, atom, c], fd) < 1e-4, c


def test_occupancy_groups_sum_to_one_and_chain_rule(crystal_model):
    m = read_model(crystal_model)
    g = occupancy_groups(m)
    assert g.n_groups == 1 and g.n_conformers == 2 and bool(g.sum_to_one[0])
    free = g.free_parameters(m.atoms.occupancy)
    assert free == pytest.approx([0.6])
    occ = g.expand(np.array([0.7]), m.atoms.occupancy)
    alt = m.atoms.altloc
    assert np.allclose(occ[alt == "A"], 0.7) and np.allclose(occ[alt == "B"], 0.3)
    assert np.allclose(occ[alt == ""], m.atoms.occupancy[alt == ""])
    # ∂T/∂q of T = Σ c·occ, by finite differences
    c = np.random.default_rng(1).normal(size=len(occ))
    analytic = g.chain_rule(c)[0]
    h = 1e-6
    fd = (c @ g.expand(np.array([0.7 + h]), occ) - c @ g.expand(np.array([0.7 - h]), occ)) / (2 * h)
    assert analytic == pytest.approx(fd, rel=1e-6)
    assert g.project(np.array([1.5]))[0] <= 0.99 + 1e-12


def test_occupancy_groups_with_three_conformers_and_an_at_most_one_group():
    """By hand: group 0 (sum to one) has conformers 0, 1 free and 2 dependent; group 1 (≤ 1) has
    conformers 3, 4, both free."""
    from drefine.model.occupancy import OccupancyGroups

    g = OccupancyGroups(atom=np.arange(7), conformer_of_atom=np.array([0, 0, 1, 2, 3, 4, 4]),
                        group_of_conformer=np.array([0, 0, 0, 1, 1]), sum_to_one=np.array([True, False]),
                        labels=["a", "b"])
    assert g.is_dependent().tolist() == [False, False, True, False, False]
    assert g.conformers_from_free(np.array([0.2, 0.3, 0.6, 0.7])) == pytest.approx([0.2, 0.3, 0.5, 0.6, 0.7])
    # ∂T/∂q for T = Σ c·occ with c = atom index: own sum minus the dependent conformer's (3)
    assert g.chain_rule(np.arange(7.0)).tolist() == [-2.0, -1.0, 4.0, 11.0]
    p = g.project(np.array([0.8, 0.5, 0.7, 0.6]))
    assert p[:2].sum() == pytest.approx(0.99) and p[2:].sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(0.8 / 0.5)


def test_adp_restraint_gradients():
    rng = np.random.default_rng(4)
    n = 12
    pairs = ADPPairs(np.array([0, 1, 2, 3, 5, 7]), np.array([1, 2, 3, 4, 6, 8]), np.array([10.0, 10, 15, 10, 15, 10]))
    b = rng.uniform(10, 40, n)
    g = np.zeros(n)
    v = b_similarity_term(b, pairs, g)
    h = 1e-5
    for i in (0, 3, 6):
        p, q = b.copy(), b.copy()
        p[i] += h
        q[i] -= h
        fd = (b_similarity_term(p, pairs, np.zeros(n)) - b_similarity_term(q, pairs, np.zeros(n))) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-6)
    assert v > 0
    u = rng.uniform(0.1, 0.3, (n, 6))
    u[:, 3:] *= 0.1
    aniso = np.ones(n, bool)
    aniso[11] = False
    gu = np.zeros((n, 6))
    u_similarity_term(u, pairs, gu, aniso)
    for i, k in ((0, 0), (3, 4), (7, 2)):
        p, q = u.copy(), u.copy()
        p[i, k] += h
        q[i, k] -= h
        fd = (u_similarity_term(p, pairs, np.zeros((n, 6)), aniso) - u_similarity_term(q, pairs, np.zeros((n, 6)), aniso))
        assert gu[i, k] == pytest.approx(fd / (2 * h), rel=1e-5)


def test_map_coefficients_of_a_perfect_model(crystal_model):
    m = read_model(crystal_model)
    table = synthetic_reflections(m, 3.0, k_sol=0.0)
    f_model = table.f_obs * np.exp(1j * np.radians(table.phases_deg))
    table.sigma_f = np.full(len(table), 1e-3)
    ml = MLParameters(d=np.ones(table.n_bins), s=np.full(table.n_bins, 1e-6))
    c = map_coefficients(table, f_model, ml)
    assert np.allclose(c["FOM"], 1.0, atol=1e-6)
    assert np.allclose(c["FWT"], table.f_obs, rtol=1e-5)  # 2mFo − DFc = Fo when the model is perfect
    assert np.allclose(c["DELFWT"], 0.0, atol=1e-3 * table.f_obs.mean())
    ok = table.f_obs > 1e-3 * table.f_obs.max()
    dphi = np.angle(np.exp(1j * np.radians(c["PHWT"][ok] - table.phases_deg[ok])))
    assert np.abs(dphi).max() < 1e-6


@pytest.fixture(scope="module")
def refinement_case(crystal_model, tmp_path_factory):
    """Data from the model (3 % noise, free set), and a start shaken by 0.3 Å RMS."""
    d = tmp_path_factory.mktemp("xcase")
    m = read_model(crystal_model)
    table = synthetic_reflections(m, 2.0, noise=0.03, seed=1)
    write_xray_case(d, table, m)
    return d, m


def test_xray_refines_a_shaken_model_and_writes_everything(refinement_case, capsys):
    d, truth = refinement_case
    out = d / "refined"
    rc = main(["xray", str(d / "start.cif"), str(d / "data.mtz"), "-o", str(out), "--cycles", "6",
               "--iterations", "10"])
    assert rc == 0
    start, refined = read_model(d / "start.cif"), read_model(f"{out}.cif")
    heavy = ~truth.atoms.is_hydrogen
    assert rmsd(refined.atoms.xyz[heavy], truth.atoms.xyz[heavy]) < 0.5 * rmsd(start.atoms.xyz[heavy],
                                                                              truth.atoms.xyz[heavy])
    rep = json.loads((d / "refined.json").read_text())
    assert rep["final"]["r_free"] < rep["start"]["r_free"] - 0.05
    assert rep["final"]["bonds_rmsd"] <= 0.015 and rep["final"]["angles_rmsd"] <= 1.5
    assert len(rep["cycles"]) >= 6 and {"r_work", "r_free", "weight", "target"} <= set(rep["cycles"][0])
    occ = rep["details"]["occupancy_groups"]
    assert len(occ) == 1 and sum(occ[0]["occupancies"]) == pytest.approx(1.0, abs=1e-3)
    mtz = gemmi.read_mtz_file(f"{out}.mtz")
    assert {"FWT", "PHWT", "DELFWT", "PHDELWT", "FreeR_flag", "F", "SIGF"} <= set(mtz.column_labels())
    for name in ("2mFo-DFc", "mFo-DFc"):
        mp = gemmi.read_ccp4_map(f"{out}_{name}.ccp4")
        assert mp.grid.spacegroup.hm == "P 21 21 21"
    # the 2mFo-DFc map is high at the refined atoms
    mp = gemmi.read_ccp4_map(f"{out}_2mFo-DFc.ccp4")
    vals = [mp.grid.interpolate_value(gemmi.Position(*x)) for x in refined.atoms.xyz[heavy][::5]]
    assert np.mean(vals) > 1.5
    doc = gemmi.cif.read(f"{out}.cif")
    esd = [float(v) for v in doc.sole_block().find_values("_atom_site.Cartn_x_esd") if v not in "?."]
    assert len(esd) == len(truth.atoms) and min(esd) > 0
    assert "R-free" in capsys.readouterr().out


def test_ml_and_ls_both_work_on_synthetic_data(refinement_case, tmp_path):
    d, _truth = refinement_case
    for target in ("ml", "ls"):
        rc = main(["xray", str(d / "start.cif"), str(d / "data.mtz"), "-o", str(tmp_path / target), "--cycles", "3",
                   "--target", target, "--esd", "none"])
        assert rc == 0
        rep = json.loads((tmp_path / f"{target}.json").read_text())
        assert rep["final"]["r_free"] < rep["start"]["r_free"], target


def test_bad_inputs_are_one_line_errors(refinement_case, tmp_path, capsys):
    d, _ = refinement_case
    # model cell differs from the data's
    st = gemmi.read_structure(str(d / "start.cif"))
    st.cell = gemmi.UnitCell(st.cell.a * 1.1, st.cell.b, st.cell.c, 90, 90, 90)
    st.setup_entities()
    st.make_mmcif_document().write_file(str(tmp_path / "other_cell.cif"))
    assert main(["xray", str(tmp_path / "other_cell.cif"), str(d / "data.mtz"), "-o", str(tmp_path / "x")]) == 1
    assert "cell" in capsys.readouterr().err
    assert main(["xray", str(d / "start.cif"), str(d / "data.mtz"), "--resolution", "1.0", "-o",
                 str(tmp_path / "x")]) == 1
    assert "beyond the data" in capsys.readouterr().err
    assert main(["xray", str(d / "start.cif"), str(tmp_path / "missing.mtz"), "-o", str(tmp_path / "x")]) == 1
    assert "missing.mtz" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))  # nothing written


def test_zero_sigmas_and_missing_free_flags_have_stated_fallbacks(refinement_case, tmp_path, capsys):
    d, _truth = refinement_case
    mtz = gemmi.read_mtz_file(str(d / "data.mtz"))
    arr = np.array(mtz.array)
    labels = mtz.column_labels()
    arr[:, labels.index("SIGF")] = 0.0
    out = gemmi.Mtz(with_base=True)
    out.spacegroup, out.cell = mtz.spacegroup, mtz.cell
    out.add_dataset("x")
    for lab in ("F", "SIGF"):
        out.add_column(lab, "F" if lab == "F" else "Q")
    out.set_data(np.ascontiguousarray(arr[:, [0, 1, 2, labels.index("F"), labels.index("SIGF")]], dtype=np.float32))
    out.write_to_file(str(tmp_path / "nofree.mtz"))
    rc = main(["xray", str(d / "start.cif"), str(tmp_path / "nofree.mtz"), "--target", "ls", "--cycles", "1",
               "-o", str(tmp_path / "fb"), "--esd", "none"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "free set made with seed 0" in text and "unit weights" in text
    assert "the data had no free set" in text and "fb.mtz as FreeR_flag" in text
    written = gemmi.read_mtz_file(str(tmp_path / "fb.mtz"))
    assert "FreeR_flag" in written.column_labels()


def test_esds_of_6mw0_are_positive_and_follow_b(data_dir, tmp_path):
    """0.78 Å, 91 atoms: full normal-matrix esds finite, positive, smaller for well-ordered atoms
    (low B, full occupancy), and the diagonal approximation ranks atoms alike."""
    from drefine.refine.uncertainty import standard_uncertainties
    from drefine.refine.xray import XrayOptions, refine_xray
    from drefine.restraints.topology import build_restraints

    m = read_model(need(data_dir, "xray/6mw0/6mw0.cif"))
    table = read_reflections(need(data_dir, "xray/6mw0/6mw0-sf.cif.gz"))
    rs = build_restraints(m, need(data_dir, "monlib"), unknown_residues="skip")
    res = refine_xray(m, table, rs, XrayOptions(cycles=2, adp="fixed"), log=lambda s: None)
    full = standard_uncertainties(m, table, res, mode="full", log=lambda s: None)
    diag = standard_uncertainties(m, table, res, mode="diagonal", log=lambda s: None)
    idx = m.model_atoms(0)
    e_full = np.sqrt((full.xyz[idx] ** 2).sum(1))
    e_diag = np.sqrt((diag.xyz[idx] ** 2).sum(1))
    assert np.all(np.isfinite(e_full)) and np.all(e_full > 0)
    b_eq = np.where(m.atoms.has_aniso[idx], m.atoms.u_aniso[idx, :3].mean(1) * 8 * np.pi ** 2, m.atoms.b_iso[idx])

    def spearman(x, y):
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        return float(np.corrcoef(rx, ry)[0, 1])

    # most atoms are in alternate conformers: "disorder" is B over occupancy
    disorder = b_eq / m.atoms.occupancy[idx]
    assert spearman(e_full, disorder) > 0.3
    ordered = disorder <= np.median(disorder)
    assert e_full[ordered].mean() < 0.8 * e_full[~ordered].mean()
    assert spearman(e_full, e_diag) > 0.5
    assert 0.3 < np.median(e_full / e_diag) < 5


def test_chunked_structure_factors_identical_on_a_dask_cluster(crystal_model):
    """Atom-chunk tasks on two dask workers give bitwise the result of the same chunks in-process,
    and agree with the one-grid calculator to its accuracy."""
    from drefine.density.crystal_fft import ChunkedStructureFactors
    from drefine.parallel.cluster import task_client

    m = read_model(crystal_model)
    sc = scatterers_of_model(m)
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 2.5, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    d = np.random.default_rng(3).normal(size=len(hkl)) * (1 + 0j)
    local = ChunkedStructureFactors(sc, hkl, 2.5, n_chunks=3)
    f_local, g_local = local.structure_factors(sc), local.gradient(sc, d)
    with task_client(None, workers=2) as client:
        remote = ChunkedStructureFactors(sc, hkl, 2.5, n_chunks=3, client=client)
        f_remote, g_remote = remote.structure_factors(sc), remote.gradient(sc, d)
    assert np.array_equal(f_local, f_remote)
    assert np.array_equal(g_local.xyz, g_remote.xyz) and np.array_equal(g_local.b_iso, g_remote.b_iso)
    whole = CrystalStructureFactors(sc, hkl, 2.5)
    assert rel(f_local, whole.structure_factors(sc)) < 1e-5
    assert rel(g_local.xyz, whole.gradient(sc, d).xyz) < 1e-4


def test_polar_space_group_origin_is_held(data_dir):
    """P2₁ (5e5z): the floating origin along b is projected out of the normal matrix, so the esds
    along b are not inflated by it."""
    from drefine.refine.uncertainty import standard_uncertainties
    from drefine.refine.xray import XrayOptions, refine_xray
    from drefine.restraints.topology import build_restraints

    m = read_model(need(data_dir, "xray/5e5z/5e5z.pdb.gz"))
    table = read_reflections(need(data_dir, "xray/5e5z/5e5z.mtz.gz"))
    rs = build_restraints(m, need(data_dir, "monlib"))
    res = refine_xray(m, table, rs, XrayOptions(cycles=1), log=lambda s: None)
    esd = standard_uncertainties(m, table, res, mode="full", log=lambda s: None)
    assert any("floating origin along 1 polar axis" in n for n in esd.notes)
    e = esd.xyz[m.model_atoms(0)]
    assert np.all(np.isfinite(e)) and np.all(e > 0)
    # without the projection the b-axis esds were several times the others; now comparable
    assert np.median(e[:, 1]) < 2 * np.median(e[:, [0, 2]])


def test_local_refinement_moves_only_the_masked_atoms_and_reports_its_objective(refinement_case, monkeypatch):
    from drefine.io.reflections import read_reflections
    from drefine.refine.xray import XrayOptions, refine_xray
    from drefine.restraints.topology import build_restraints

    d, _ = refinement_case
    start = read_model(d / "start.cif")
    table = read_reflections(d / "data.mtz")
    restraints = build_restraints(start)
    mask = start.atoms.residue_index == start.atoms.residue_index[len(start.atoms) // 2]
    opt = XrayOptions(target="ls", cycles=1, weight=1.0, adp="fixed", occupancies=False, geometry_rescue=False)
    res = refine_xray(start, table, restraints, opt, log=lambda s: None, movable=mask)
    moved = np.linalg.norm(res.xyz - start.atoms.xyz, axis=1)
    assert moved[~mask].max() == 0.0 and moved[mask].max() > 0.01
    c = res.cycles[-1]
    assert c.objective == pytest.approx(c.weight * c.target + c.geometry_target, rel=1e-12)
    whole = refine_xray(start, table, restraints, opt, log=lambda s: None)
    assert whole.cycles[-1].objective < c.objective  # more freedom, lower objective
    # the local path transforms only the movable atoms: the same refinement as transforming all
    import drefine.refine.xray as xray_module

    monkeypatch.setattr(xray_module, "MovingSubsetStructureFactors", lambda calc, moving: calc)
    every = refine_xray(start, table, restraints, opt, log=lambda s: None, movable=mask)
    # (the objective is what the crossing search compares; the unconverged 10-iteration paths
    # themselves drift apart by ~0.01 Å with F accurate to ~1e-3)
    assert every.cycles[-1].objective == pytest.approx(c.objective, rel=1e-4)
    assert every.scale.r_work == pytest.approx(res.scale.r_work, abs=2e-4)


def test_diagonal_curvature_matches_the_gauss_newton_diagonal(crystal_model):
    """The Fisher step's per-atom curvature (binned, random-phase average) against the exact
    Gauss-Newton diagonal Σ_h c_h (∂|F|/∂p)² from the direct-summation Jacobian, P 2₁2₁2₁ at 2 Å.
    A wrong factor (½, the operator count, 4π²/3) would put the ratio far outside the band; the
    ~10 % excess is real (centric zones and bonded neighbours the diagonal leaves out)."""
    from drefine.targets.curvature import diagonal_curvature

    m = read_model(crystal_model)
    sc = scatterers_of_model(m)
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 2.0, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    rows = np.arange(0, len(hkl), 3)
    f = direct_structure_factors(sc, hkl)

    class Table:
        pass

    t = Table()
    t.hkl, t.cell, t.spacegroup = hkl, m.cell, m.spacegroup
    c = np.random.default_rng(1).uniform(0.5, 1.5, len(rows))  # any positive per-reflection curvature
    jac = amplitude_jacobian(m, t, f, np.ones(len(hkl)), rows, sc=sc)
    gauss_newton = np.einsum("n,nap->ap", c, jac ** 2)
    h_x, h_b, _ = diagonal_curvature(sc, ((hkl[rows] @ sc.frac_matrix) ** 2).sum(1), c)
    ratio_x = gauss_newton[:, :3].mean(1) / h_x
    ratio_b = gauss_newton[:, 3] / h_b
    assert 0.95 < ratio_x.min() and ratio_x.max() < 1.3
    assert 0.95 < ratio_b.min() and ratio_b.max() < 1.3


def test_pair_coupling_matches_the_gauss_newton_blocks_and_stays_semidefinite(crystal_model):
    """Curvature between neighbouring atoms' coordinates and B against the exact Gauss-Newton
    blocks Σ_h c_h (∂|F|/∂p_i)(∂|F|/∂p_j); and the tapered, cut-off matrix with its diagonal is
    positive semi-definite (the minimiser needs a model bounded below)."""
    from drefine.targets.curvature import diagonal_curvature, pair_coupling

    m = read_model(crystal_model)
    sc = scatterers_of_model(m)
    hkl = np.array(gemmi.make_miller_array(m.cell, m.spacegroup, 2.0, 0, True))
    hkl = hkl[np.any(hkl != 0, axis=1)][::3]
    f = direct_structure_factors(sc, hkl)

    class Table:
        pass

    t = Table()
    t.hkl, t.cell, t.spacegroup = hkl, m.cell, m.spacegroup
    c = np.ones(len(hkl))
    s2 = ((hkl @ sc.frac_matrix) ** 2).sum(1)
    xyz = m.atoms.xyz[sc.atom_index]
    sel = np.arange(0, 200)  # the first 200 atoms: the exact blocks of all pairs among them
    jac = amplitude_jacobian(m, t, f, np.ones(len(hkl)), np.arange(len(hkl)), sc=sc)[:, sel]
    i, j, xx, bb, xb = pair_coupling(sc, xyz, s2, c, 6.0)
    keep = (i < 200) & (j < 200)
    i, j, xx, bb, xb = i[keep], j[keep], xx[keep], bb[keep], xb[keep]
    # the taper (1 at r = 0, 0 at the cut-off) is part of the model: compare where it is ≥ 0.5
    x = np.linalg.norm(xyz[j] - xyz[i], axis=1) / 6.0
    taper = (1 - x) ** 4 * (4 * x + 1)
    near = taper > 0.5
    exact_xx = np.einsum("hkp,hkq->kpq", jac[:, i[near], :3], jac[:, j[near], :3])  # c = 1
    exact_bb = np.einsum("hk,hk->k", jac[:, i[near], 3], jac[:, j[near], 3])
    exact_xb = np.einsum("hkp,hk->kp", jac[:, i[near], :3], jac[:, j[near], 3])
    for est, exact in ((xx[near] / taper[near, None, None], exact_xx), (bb[near] / taper[near], exact_bb),
                       (xb[near] / taper[near, None], exact_xb)):
        est, exact = est.ravel(), exact.ravel()
        assert np.corrcoef(est, exact)[0, 1] > 0.95
        assert 0.9 < (est @ exact) / (est @ est) < 1.35  # the same ~10 % excess as the diagonal
    h_x, h_b, _ = diagonal_curvature(sc, s2, c)
    n = len(sc)
    full = np.zeros((4 * n, 4 * n))
    i, j, xx, bb, xb = pair_coupling(sc, xyz, s2, c, 6.0)
    for k in range(len(i)):
        a, b = i[k], j[k]
        full[3 * a:3 * a + 3, 3 * b:3 * b + 3] = xx[k]
        full[3 * b:3 * b + 3, 3 * a:3 * a + 3] = xx[k].T
        full[3 * n + a, 3 * n + b] = full[3 * n + b, 3 * n + a] = bb[k]
        full[3 * a:3 * a + 3, 3 * n + b] = full[3 * n + b, 3 * a:3 * a + 3] = xb[k]
        full[3 * n + a, 3 * b:3 * b + 3] = full[3 * b:3 * b + 3, 3 * n + a] = -xb[k]
    diag = np.concatenate([np.repeat(h_x, 3), h_b])
    full[np.diag_indices(4 * n)] = diag
    assert np.linalg.eigvalsh(full / np.sqrt(np.outer(diag, diag)))[0] > 0


def test_fisher_steps_refine_like_lbfgs_with_far_fewer_evaluations(refinement_case, monkeypatch):
    """From a 0.3 Å shake, 6 cycles: scoring steps with the diagonal model get most of the way
    with a third of the structure-factor evaluations, and with the neighbour coupling about as
    far as L-BFGS (RMSD to the truth, R-free). With the data curvature made 100× too soft the
    damping rejects the overshooting steps and the refinement still converges. Anisotropic U
    fall back to L-BFGS."""
    from drefine.io.reflections import read_reflections
    from drefine.refine.xray import XrayOptions, refine_xray
    from drefine.restraints.topology import build_restraints

    d, truth = refinement_case
    start = read_model(d / "start.cif")
    table = read_reflections(d / "data.mtz")
    restraints = build_restraints(start)
    heavy = ~truth.atoms.is_hydrogen
    start_rmsd = rmsd(start.atoms.xyz[heavy], truth.atoms.xyz[heavy])
    runs = {}
    for name, opt in {"lbfgs": XrayOptions(cycles=6, minimiser="lbfgs", adp="iso"),
                      "diagonal": XrayOptions(cycles=6, adp="iso"),
                      "coupled": XrayOptions(cycles=6, adp="iso", coupling_cutoff=6.0)}.items():
        runs[name] = refine_xray(start, table, restraints, opt, log=lambda s: None)
    to_truth = {k: rmsd(r.xyz[heavy], truth.atoms.xyz[heavy]) for k, r in runs.items()}
    assert to_truth["diagonal"] < 0.15 * start_rmsd
    assert to_truth["coupled"] < to_truth["lbfgs"] + 0.003 < to_truth["diagonal"]
    for k in ("diagonal", "coupled"):
        assert runs[k].scale.r_free < runs["lbfgs"].scale.r_free + 0.003
        assert 3 * runs[k].timing["evaluations"] < runs["lbfgs"].timing["evaluations"]

    import drefine.refine.xray as xray_module

    real = xray_module.diagonal_curvature
    monkeypatch.setattr(xray_module, "diagonal_curvature", lambda *a, **k: tuple(h / 100 for h in real(*a, **k)))
    soft = refine_xray(start, table, restraints, XrayOptions(cycles=6, adp="iso"), log=lambda s: None)
    assert rmsd(soft.xyz[heavy], truth.atoms.xyz[heavy]) < 0.15 * start_rmsd
    assert soft.timing["evaluations"] > runs["diagonal"].timing["evaluations"]  # rejected steps were retried
    monkeypatch.setattr(xray_module, "diagonal_curvature", real)

    logged: list[str] = []
    aniso = refine_xray(start, table, restraints, XrayOptions(cycles=1, adp="aniso"), log=logged.append)
    assert any("anisotropic U: L-BFGS" in line for line in logged) and aniso.cycles[0].evaluations > 4


def test_cholesky_parametrisation_of_u():
    """U = L Lᵀ: the round trip, the chain rule against finite differences, and the projection
    that raises a non-positive-definite U's eigenvalues."""
    from drefine.refine.xray import cholesky_gradient, cholesky_u6, positive_definite_u6, u6_of_cholesky

    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 3, 3)) * 0.2
    u33 = a @ a.transpose(0, 2, 1) + 0.01 * np.eye(3)
    u6 = np.stack([u33[:, 0, 0], u33[:, 1, 1], u33[:, 2, 2], u33[:, 0, 1], u33[:, 0, 2], u33[:, 1, 2]], 1)
    l6 = cholesky_u6(u6)
    np.testing.assert_allclose(u6_of_cholesky(l6), u6, rtol=1e-12, atol=1e-15)
    assert (l6[:, :3] > 0).all()
    # T(U) = Σ c·U + Σ d·U²: ∂T/∂L by the chain rule against central differences in L
    c, d = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))

    def t(l):
        u = u6_of_cholesky(l)
        return float((c * u + d * u * u).sum())

    g = cholesky_gradient(l6, c + 2 * d * u6_of_cholesky(l6))
    h = 1e-6
    for i in range(5):
        for k in range(6):
            lp, lm = l6.copy(), l6.copy()
            lp[i, k] += h
            lm[i, k] -= h
            assert (t(lp) - t(lm)) / (2 * h) == pytest.approx(g[i, k], rel=1e-6, abs=1e-9)
    bad = u6.copy()
    bad[0, 3] = 2.0 * np.sqrt(bad[0, 0] * bad[0, 1])  # |U12| beyond √(U11 U22): not positive definite
    fixed = positive_definite_u6(bad, 0.005)
    assert np.linalg.eigvalsh(np.array([[fixed[0, 0], fixed[0, 3], fixed[0, 4]], [fixed[0, 3], fixed[0, 1], fixed[0, 5]],
                                        [fixed[0, 4], fixed[0, 5], fixed[0, 2]]])).min() >= 0.005 - 1e-12
    np.testing.assert_allclose(positive_definite_u6(u6[1:], 1e-6), u6[1:], atol=1e-12)


def test_anisotropic_refinement_keeps_going(refinement_case, tmp_path):
    """--adp aniso refines every atom's U through its Cholesky factor: from a start whose U the
    overall-B hand-over makes non-positive-definite (before: an internal error here, and a
    stall at 3 evaluations a cycle on 4hg7) every cycle takes its full share of evaluations,
    U stays positive definite and R-free improves."""
    d, _ = refinement_case
    # a hard start: every atom a flat ellipsoid (smallest eigenvalue 2e-4 Å²) the data disagree with
    start = read_model(d / "start.cif")
    rng = np.random.default_rng(8)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    # B_eq ≈ 45 Å², above the data's: the overall B handed to the atoms is negative
    flat = rot @ np.diag([0.9, 0.8, 2e-4]) @ rot.T
    start.atoms.u_aniso[:] = [flat[0, 0], flat[1, 1], flat[2, 2], flat[0, 1], flat[0, 2], flat[1, 2]]
    start.atoms.has_aniso[:] = True
    write_model(start, tmp_path / "flat.cif")
    out = tmp_path / "aniso"
    assert main(["xray", str(tmp_path / "flat.cif"), str(d / "data.mtz"), "-o", str(out), "--cycles", "4",
                 "--iterations", "10", "--adp", "aniso"]) == 0
    rep = json.loads((tmp_path / "aniso.json").read_text())
    assert all(c["evaluations"] >= 8 for c in rep["cycles"]), [c["evaluations"] for c in rep["cycles"]]
    assert rep["final"]["r_free"] < rep["start"]["r_free"] - 0.02
    m = read_model(f"{out}.cif")
    heavy = ~m.atoms.is_hydrogen
    assert m.atoms.has_aniso[heavy].all()
    u = m.atoms.u_aniso[heavy]
    u33 = np.stack([np.stack([u[:, 0], u[:, 3], u[:, 4]], 1), np.stack([u[:, 3], u[:, 1], u[:, 5]], 1),
                    np.stack([u[:, 4], u[:, 5], u[:, 2]], 1)], 1)
    assert np.linalg.eigvalsh(u33).min() > 0


def test_ensemble_of_xray_refinements(refinement_case, tmp_path):
    """`drefine ensemble --mode xray`: each member a seeded shake refined against the reflections,
    its R values in the summary and its refined model (coordinates and B from the refinement)."""
    d, _truth = refinement_case
    out = tmp_path / "ens"
    assert main(["ensemble", str(d / "start.cif"), str(d / "data.mtz"), "--mode", "xray", "--n", "2", "--rmsd", "0.2",
                 "--weight", "2", "--scheduler", "inprocess", "-o", str(out)]) == 0
    rep = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in rep["members"]] == ["member_0000", "member_0001"]
    start = read_model(d / "start.cif")
    for m in rep["members"]:
        assert 0 < m["r_work"] <= m["r_free"] < 0.3
        refined = read_model(out / "members" / f"{m['name']}.cif")
        assert not np.allclose(refined.atoms.xyz, start.atoms.xyz, atol=0.01)
        assert not np.allclose(refined.atoms.b_iso, start.atoms.b_iso)
    assert rep["final"]["mean_rmsf"] > 0


def test_a_run_continued_in_parts_starts_from_the_scale_reached(refinement_case, monkeypatch):
    """The parts of a run (`--waters`): the first keeps the cycles' F_calc accuracy at its end (no
    report-accuracy pass), the second starts its bulk-solvent fit from the first's scale (no grid
    search) and reports at full accuracy."""
    import drefine.refine.xray as xray_module
    from drefine.density.crystal_fft import CrystalStructureFactors
    from drefine.io.reflections import read_reflections
    from drefine.refine.xray import XrayOptions, refine_xray
    from drefine.restraints.topology import build_restraints

    d, _ = refinement_case
    start = read_model(d / "start.cif")
    table = read_reflections(d / "data.mtz")
    restraints = build_restraints(start)
    starts, report_calls = [], []
    fit = xray_module.fit_bulk_solvent
    monkeypatch.setattr(xray_module, "fit_bulk_solvent",
                        lambda *a, **k: starts.append(k.get("start")) or fit(*a, **k))
    calc = CrystalStructureFactors.structure_factors

    def counted(self, sc):
        report_calls.append(self.dtype == np.float64)
        return calc(self, sc)

    monkeypatch.setattr(CrystalStructureFactors, "structure_factors", counted)
    opt = XrayOptions(target="ml", cycles=1, adp="iso", occupancies=False, geometry_rescue=False)
    first = refine_xray(start, table, restraints, dataclasses.replace(opt, final_accuracy=False), log=lambda s: None)
    assert starts[0] is None and not any(report_calls)  # grid search; never the report accuracy
    n_fits = len(starts)
    second = refine_xray(first.applied_to(start), table, restraints,
                         dataclasses.replace(opt, initial_scale=first.scale, first_cycle=2), log=lambda s: None)
    assert starts[n_fits] is not None and starts[n_fits].k_sol == pytest.approx(first.scale.k_sol)
    assert report_calls[-1]  # the end of the run is reported at full accuracy
    assert first.scale.k_sol == starts[n_fits].k_sol  # the first part's scale is not changed by the second
    assert second.cycles[0].cycle == 2 and second.cycles[0].r_free <= first.cycles[0].r_free + 0.01


def test_the_solvent_mask_is_made_again_when_enough_atoms_have_moved():
    from drefine.refine.xray import MASK_REBUILD_SHIFT, MASK_REUSE_SHIFT, mask_is_stale

    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 30, (1000, 3))
    moved = xyz.copy()
    moved[:, 0] += 0.9 * MASK_REUSE_SHIFT  # everything a little: the mask still serves
    assert not mask_is_stale(moved, xyz)
    moved[:10, 1] += MASK_REUSE_SHIFT  # 1 % of the atoms beyond the shift: still
    assert not mask_is_stale(moved, xyz)
    moved[10, 1] += MASK_REUSE_SHIFT  # one more: made again
    assert mask_is_stale(moved, xyz)
    far = xyz.copy()
    far[3, 2] += 1.01 * MASK_REBUILD_SHIFT  # one atom far: made again
    assert mask_is_stale(far, xyz)
    assert mask_is_stale(xyz[:-1], xyz)  # atoms added or removed


def test_local_refinement_refines_only_the_movable_atoms_b(crystal_model):
    """A local refinement (`movable`) with ADP refinement moves and re-fits B of the movable atoms
    only (the residue swap search judges swaps so); the other atoms keep positions and B."""
    from drefine.refine.xray import XrayOptions, refine_xray
    from drefine.restraints.topology import build_restraints

    m = read_model(crystal_model)
    table = synthetic_reflections(m, 2.0, noise=0.02, seed=3)
    start = m.copy()
    rng = np.random.default_rng(1)
    start.atoms.b_iso = start.atoms.b_iso * rng.uniform(0.7, 1.3, len(start.atoms))
    mask = np.zeros(len(m.atoms), dtype=bool)
    mask[20:40] = True
    r = refine_xray(start, table, build_restraints(start), XrayOptions(cycles=1, adp="iso", occupancies=False,
                                                                       minimiser="lbfgs"), log=lambda s: None,
                    movable=mask)
    assert np.array_equal(r.b_iso[~mask], start.atoms.b_iso[~mask])
    assert np.array_equal(r.xyz[~mask], start.atoms.xyz[~mask])
    assert np.abs(r.b_iso[mask] - start.atoms.b_iso[mask]).max() > 0.1
    err_before = np.abs(start.atoms.b_iso[mask] - m.atoms.b_iso[mask]).mean()
    assert np.abs(r.b_iso[mask] - m.atoms.b_iso[mask]).mean() < err_before
