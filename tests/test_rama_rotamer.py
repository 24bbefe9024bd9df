"""Ramachandran / rotamer validation against the Top500 tables (drefine.validate)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from drefine.validate.ramachandran import (
    GENERAL,
    GLY,
    PREPRO,
    PRO,
    RAMA_FILES,
    RamachandranTables,
    dihedral_deg,
    find_rama_data,
    rama_kind,
)
from drefine.validate.rotamers import CHI_ATOMS, TABLE_FILES, RotamerTables

DATA = find_rama_data()
needs_data = pytest.mark.skipif(
    DATA is None, reason="Top500 rama-data tables not found (set DREFINE_RAMA_DATA or DREFINE_TEST_DATA)"
)


def _test_data_root() -> Path:
    env = os.environ.get("DREFINE_TEST_DATA")
    if env:
        return Path(env)
    if DATA is not None:
        return DATA.parents[1]
    return Path.cwd() / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def rama() -> RamachandranTables:
    return RamachandranTables.load(DATA)


@pytest.fixture(scope="module")
def rota() -> RotamerTables:
    return RotamerTables.load(DATA)


def _read_rows(path: Path) -> np.ndarray:
    """Independent plain-Python parse of a table file's data rows."""
    rows = [
        [float(x) for x in line.split()]
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return np.array(rows)


# --------------------------------------------------------------------------- no data needed


def test_find_rama_data_sources(tmp_path, monkeypatch):
    good = tmp_path / "tables"
    good.mkdir()
    (good / "rama500-general.data").write_text("# empty\n")
    monkeypatch.delenv("DREFINE_RAMA_DATA", raising=False)
    assert find_rama_data(good) == good.resolve()
    assert find_rama_data(tmp_path / "nowhere") is None
    monkeypatch.setenv("DREFINE_RAMA_DATA", str(good))
    assert find_rama_data() == good.resolve()
    monkeypatch.setenv("DREFINE_RAMA_DATA", str(tmp_path / "nowhere"))
    assert find_rama_data() is None
    monkeypatch.delenv("DREFINE_RAMA_DATA")
    root = tmp_path / "td"
    (root / "validation").mkdir(parents=True)
    good.rename(root / "validation" / "rama-data")
    monkeypatch.setenv("DREFINE_TEST_DATA", str(root))
    assert find_rama_data() == (root / "validation" / "rama-data").resolve()
    monkeypatch.setenv("DREFINE_TEST_DATA", str(tmp_path / "empty"))
    assert find_rama_data() is None


_SMALL_TABLE = """# Number of dimensions: 2
# description: "toy table"
# x1: -180.0 180.0 4 true
# x2: -180.0 180.0 2 true
-135.0 -90.0 0.5
-45.0 90.0 0.25
135.0 -90.0 1.0
"""


def test_table_disk_cache(tmp_path, monkeypatch):
    """A parsed table is kept on disk and read back equal; an edited file is parsed again; with
    the cache off nothing is written."""
    from drefine.validate import ramachandran as R

    src = tmp_path / "toy.data"
    src.write_text(_SMALL_TABLE)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DREFINE_CACHE", str(cache))
    monkeypatch.setattr(R, "_TABLE_CACHE", {})
    first = R.GridTable.read(src)
    stored = list((cache / "tables").glob("toy-*.npz"))
    assert len(stored) == 1
    monkeypatch.setattr(R, "_TABLE_CACHE", {})
    monkeypatch.setattr(R.GridTable, "_parse", classmethod(lambda cls, p: pytest.fail("parsed again")))
    again = R.GridTable.read(src)
    assert again.name == first.name == "toy table"
    for f in ("lower", "upper", "nbins", "wrap", "values"):
        np.testing.assert_array_equal(getattr(again, f), getattr(first, f))
        assert not getattr(again, f).flags.writeable
    assert again.values[0, 0] == 0.5 and again.values[3, 0] == 1.0 and again.values[1, 1] == 0.25
    monkeypatch.undo()

    # an edited table gets its own entry, with the new values
    monkeypatch.setenv("DREFINE_CACHE", str(cache))
    monkeypatch.setattr(R, "_TABLE_CACHE", {})
    src.write_text(_SMALL_TABLE.replace("-45.0 90.0 0.25", "-45.0 90.0 0.75"))
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert R.GridTable.read(src).values[1, 1] == 0.75
    assert len(list((cache / "tables").glob("toy-*.npz"))) == 2

    # a damaged or empty cache entry is parsed again, not trusted
    for damage in (b"not a zip", b""):
        for f in (cache / "tables").glob("toy-*.npz"):
            f.write_bytes(damage)
        monkeypatch.setattr(R, "_TABLE_CACHE", {})
        assert R.GridTable.read(src).values[1, 1] == 0.75

    monkeypatch.setenv("DREFINE_CACHE", "off")
    monkeypatch.setattr(R, "_TABLE_CACHE", {})
    assert R.table_cache_dir() is None
    src.write_text(_SMALL_TABLE)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 2 * 10**9))
    assert R.GridTable.read(src).values[1, 1] == 0.25
    assert len(list((cache / "tables").glob("toy-*.npz"))) == 2


def test_rama_kind():
    assert rama_kind("GLY", "PRO") == "gly"
    assert rama_kind("PRO", "PRO") == "pro"
    assert rama_kind("ALA", "PRO") == "prepro"
    assert rama_kind("ALA", "SER") == "general"
    assert rama_kind("ALA", None) == "general"
    assert list(RamachandranTables.kinds(["GLY", "ALA", "PRO", "LEU"], ["ALA", "PRO", "LEU", None])) == [
        GLY,
        PREPRO,
        PRO,
        GENERAL,
    ]


def test_dihedral_deg():
    gemmi = pytest.importorskip("gemmi")
    rng = np.random.default_rng(0)
    p = rng.normal(size=(4, 50, 3)) * 2.0
    ours = dihedral_deg(*p)
    ref = [
        np.degrees(gemmi.calculate_dihedral(*(gemmi.Position(*p[k, i]) for k in range(4)))) for i in range(50)
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    # trans, cis and the sign convention (clockwise looking down p1→p2 is positive)
    a, b, c = [1.0, 0, 0], [0.0, 0, 0], [0.0, 0, 1]
    assert dihedral_deg(a, b, c, [-1.0, 0, 1]) == pytest.approx(180.0)
    assert dihedral_deg(a, b, c, [1.0, 0, 1]) == pytest.approx(0.0)
    assert dihedral_deg(a, b, c, [0.0, 1, 1]) == pytest.approx(90.0)
    assert dihedral_deg(a, b, c, [0.0, -1, 1]) == pytest.approx(-90.0)


# --------------------------------------------------------------------------- Ramachandran


@needs_data
@pytest.mark.parametrize("kind", [GENERAL, GLY, PRO, PREPRO])
def test_rama_bin_centres_exact(rama, kind):
    rows = _read_rows(DATA / RAMA_FILES[kind])
    got = rama.score(rows[:, 0], rows[:, 1], kind)
    assert np.array_equal(got, rows[:, 2])
    # bins absent from the file are exactly zero
    present = {(round(a), round(b)) for a, b in rows[:, :2]}
    centres = np.arange(-179, 180, 2)
    absent = np.array([(a, b) for a in centres for b in centres if (a, b) not in present], dtype=float)
    if len(absent):
        assert np.all(rama.score(absent[:, 0], absent[:, 1], kind) == 0.0)


@needs_data
def test_rama_interpolation_is_periodic_bilinear(rama):
    t = rama.tables[GENERAL].values  # [phi_bin, psi_bin], centres -179, -177, ...
    # halfway between centres -63 and -61 (phi) at psi centre -43
    i, j = (-63 + 179) // 2, (-43 + 179) // 2
    assert rama.score(-62.0, -43.0) == pytest.approx(0.5 * (t[i, j] + t[i + 1, j]), abs=1e-15)
    # across the ±180 seam: -180 lies halfway between centres 179 and -179
    assert rama.score(-180.0, -43.0) == pytest.approx(0.5 * (t[-1, j] + t[0, j]), abs=1e-15)
    phi = np.array([-63.3, -120.7, 55.1, 179.9])
    psi = np.array([-41.2, 131.9, 40.4, -179.9])
    np.testing.assert_allclose(rama.score(phi + 360, psi - 720), rama.score(phi, psi), atol=1e-14)
    # names, integer codes and per-residue arrays agree
    kinds = np.array([GENERAL, GLY, PRO, PREPRO])
    np.testing.assert_array_equal(
        rama.score(phi, psi, kinds), rama.score(phi, psi, ["general", "gly", "pro", "prepro"])
    )
    assert np.isnan(rama.score(np.nan, 0.0))


@needs_data
def test_rama_regions(rama):
    cls = rama.classify([-63, -120], [-43, 130], "general")
    assert list(cls) == ["favored", "favored"]
    # left-handed region with positive phi and psi~-120 / +100: outliers for non-Gly
    assert rama.classify(100, -120, "general") == "outlier"
    assert rama.classify(90, 150, "general") == "outlier"
    # (60, -120) is rare but present in Top500 general (score ~0.0066): not favoured
    assert rama.classify(60, -120, "general") != "favored"
    # glycine's left-handed alpha region
    assert rama.classify(80, 10, "gly") in ("favored", "allowed")
    assert rama.classify(80, 10, "gly") == "favored"
    # proline with phi=+60 is impossible (ring closure)
    psi = np.arange(-180, 180, 30)
    assert set(rama.classify(np.full(psi.shape, 60.0), psi, "pro")) == {"outlier"}
    assert rama.classify(-65, 140, "pro") == "favored"
    assert rama.classify(np.nan, 10, "pro") == "not computed"


@needs_data
def test_rama_cutoffs(rama):
    s = np.array([0.02, 0.0199, 0.002, 0.0019, 0.0005, 0.00049])
    assert list(rama.classify_scores(s, "general")) == [
        "favored",
        "allowed",
        "allowed",
        "allowed",
        "allowed",
        "outlier",
    ]
    for kind in ("gly", "pro", "prepro"):
        assert list(rama.classify_scores(s, kind)) == [
            "favored",
            "allowed",
            "allowed",
            "outlier",
            "outlier",
            "outlier",
        ]


# --------------------------------------------------------------------------- rotamers


@needs_data
def test_rotamer_tables_inventory(rota):
    present = {p.name for p in DATA.glob("rota500-*.data")}
    for res, stem in TABLE_FILES.items():
        assert rota.has_table(res) == (f"rota500-{stem}.data" in present)
        if rota.has_table(res):
            assert len(CHI_ATOMS[res]) >= rota.n_chi(res) >= 1
    assert rota.tables["PHE"] is rota.tables["TYR"]
    print(f"\nrotamer tables: {', '.join(rota.available)}; not computed: {', '.join(rota.missing)}")


@needs_data
def test_rotamer_bin_centres_exact(rota):
    for res in rota.available:
        rows = _read_rows(DATA / f"rota500-{TABLE_FILES[res]}.data")
        n = rota.n_chi(res)
        assert np.array_equal(rota.score(res, rows[:, :n]), rows[:, n]), res


@needs_data
def test_rotamer_values(rota):
    assert not rota.is_outlier(rota.score("VAL", [175.0]))
    assert rota.is_outlier(rota.score("VAL", [120.0]))
    assert rota.score("VAL", [175.0 - 360.0]) == rota.score("VAL", [175.0])
    # PHE/TYR chi2, ASP chi2 and GLU chi3 are symmetric under +180
    rng = np.random.default_rng(1)
    for res, n in (("PHE", 2), ("TYR", 2), ("ASP", 2), ("GLU", 3)):
        chis = rng.uniform(-180, 180, size=(200, n))
        flipped = chis.copy()
        flipped[:, -1] += 180.0
        a, b = rota.score(res, chis), rota.score(res, flipped)
        np.testing.assert_allclose(a, b, atol=1e-12)
        assert a.max() > 0.1, res  # the samples hit populated regions, so the check has teeth
    for chi1, chi2 in ((-65.0, 95.0), (180.0, 80.0), (60.0, 90.0)):
        s = rota.score("PHE", [chi1, chi2])
        assert s == pytest.approx(rota.score("PHE", [chi1, chi2 + 180.0]), abs=1e-12)
        assert s == pytest.approx(rota.score("PHE", [chi1, chi2 - 180.0]), abs=1e-12)
        assert not rota.is_outlier(s)
    # HIS is not symmetric: a 180 flip of chi2 changes the score somewhere
    chis = rng.uniform(-180, 180, size=(200, 2))
    assert not np.allclose(rota.score("HIS", chis), rota.score("HIS", chis + [0.0, 180.0]))
    # PRO uses chi1 only
    assert rota.score("PRO", [30.0, -35.0]) == rota.score("PRO", [30.0])
    # residues without a table are "not computed", never outliers
    for res in rota.missing:
        s = rota.score(res, [-65.0, 180.0, 180.0, 180.0])
        assert np.isnan(s) and not rota.is_outlier(s) and rota.classify(s) == "not computed"
    with pytest.raises(ValueError):
        rota.score("LEU", [60.0])


# --------------------------------------------------------------------------- real structure


def _protein_chains(path: Path):
    gemmi = pytest.importorskip("gemmi")
    st = gemmi.read_structure(str(path))
    st.remove_alternative_conformations()  # keeps the first conformer
    st.remove_hydrogens()
    chains = []
    for chain in st[0]:
        res = []
        for r in chain:
            info = gemmi.find_tabulated_residue(r.name)
            if info is not None and info.is_amino_acid():
                res.append(r)
        chains.append(res)
    return chains


def _xyz(res, name):
    a = res.find_atom(name, "*")
    return None if a is None else np.array(a.pos.tolist())


@needs_data
def test_5orl_rama_and_rotamers(rama, rota):
    path = _test_data_root() / "xray" / "5orl" / "5orl.pdb"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    quads, names, nexts = [], [], []
    sidechains = defaultdict(list)
    for chain in _protein_chains(path):
        bb = [{k: _xyz(r, k) for k in ("N", "CA", "C")} for r in chain]
        for i, r in enumerate(chain):
            atoms = {a.name: np.array(a.pos.tolist()) for a in r}
            quad = [atoms.get(n) for q in CHI_ATOMS.get(r.name, ()) for n in q]
            if r.name in CHI_ATOMS and rota.has_table(r.name) and all(x is not None for x in quad):
                sidechains[r.name].append(np.array(quad).reshape(-1, 4, 3))
            if i == 0 or i == len(chain) - 1:
                continue
            prev_c, nxt_n = bb[i - 1]["C"], bb[i + 1]["N"]
            here = bb[i]
            if any(x is None for x in (prev_c, nxt_n, *here.values())):
                continue
            if np.linalg.norm(here["N"] - prev_c) > 2.0 or np.linalg.norm(nxt_n - here["C"]) > 2.0:
                continue  # chain break
            quads.append([prev_c, here["N"], here["CA"], here["C"], nxt_n])
            names.append(r.name)
            nexts.append(chain[i + 1].name)
    q = np.array(quads)
    phi = dihedral_deg(q[:, 0], q[:, 1], q[:, 2], q[:, 3])
    psi = dihedral_deg(q[:, 1], q[:, 2], q[:, 3], q[:, 4])
    kinds = RamachandranTables.kinds(names, nexts)
    cls = rama.classify(phi, psi, kinds)
    n = len(cls)
    n_fav, n_all, n_out = (int(np.sum(cls == c)) for c in ("favored", "allowed", "outlier"))
    print(
        f"\n5orl Ramachandran: {n} residues, favored {n_fav} ({100 * n_fav / n:.1f}%), "
        f"allowed {n_all}, outliers {n_out} ({100 * n_out / n:.2f}%)"
    )
    for k, name in enumerate(("general", "gly", "pro", "prepro")):
        print(f"  {name}: {int(np.sum(kinds == k))}")
    assert n > 200 and n_fav + n_all + n_out == n
    assert n_fav / n > 0.95
    assert n_out / n <= 0.01

    n_rot = n_rot_out = 0
    for res, quads_res in sorted(sidechains.items()):
        x = np.stack(quads_res)  # (n, nchi, 4, 3)
        chis = np.stack([dihedral_deg(*x[:, k].transpose(1, 0, 2)) for k in range(x.shape[1])], axis=1)
        scores = rota.score(res, chis)
        out = rota.is_outlier(scores)
        n_rot += len(scores)
        n_rot_out += int(out.sum())
    n_missing = sum(1 for chain in _protein_chains(path) for r in chain if r.name in rota.missing)
    print(
        f"5orl rotamers: {n_rot} scored, outliers {n_rot_out} ({100 * n_rot_out / n_rot:.2f}%), "
        f"not computed (no table: {', '.join(rota.missing)}) {n_missing}"
    )
    assert n_rot > 150
    assert n_rot_out / n_rot < 0.05
