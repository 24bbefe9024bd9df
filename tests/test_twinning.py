"""Twinning tests against intensities twinned by hand, with gemmi's per-reflection ASU mapping as
the independent reference for twin mates."""
from types import SimpleNamespace

import gemmi
import numpy as np
import pytest

from drefine.io.reflections import resolution_bins
from drefine.validate.twinning import (
    equivalent_rows,
    h_test,
    hkl_rotation,
    l_test,
    law_matrix,
    law_text,
    twin_laws,
    twinning_note,
    twinning_report,
)

CELL = gemmi.UnitCell(60.0, 60.0, 80.0, 90, 90, 90)
SG = gemmi.SpaceGroup("P 43")


@pytest.mark.parametrize("hm", ["P 43", "P 61 2 2", "C 1 2 1", "P 21 21 21", "P 3"])
def test_hkl_rotation_matches_gemmi(hm):
    sg = gemmi.SpaceGroup(hm)
    rng = np.random.default_rng(0)
    hkl = rng.integers(-9, 10, size=(20, 3))
    ops = list(sg.operations())
    if hm == "P 3":
        ops += twin_laws(gemmi.UnitCell(50, 50, 70, 90, 90, 120), sg)
    for op in ops:
        mine = hkl @ hkl_rotation(op)
        ref = np.array([op.apply_to_hkl([int(x) for x in h]) for h in hkl])
        assert np.array_equal(mine, ref), op.triplet()


def test_twin_law_notations():
    assert np.array_equal(law_matrix("h,-k,-l"), np.diag([1, -1, -1]))
    assert law_text(law_matrix("h,-k,-l")) == "h,-k,-l"
    # an oblique one: h' = (k, h, −l) and (−h−k, k, −l) (trigonal lattices)
    for text in ("k,h,-l", "-h-k,k,-l"):
        m = law_matrix(text)
        assert law_text(m) == text
        ref = gemmi.Op(text.replace("h", "x").replace("k", "y").replace("l", "z"))
        assert np.array_equal(np.array([[1, 2, 3]]) @ m, np.array([ref.apply_to_xyz([1, 2, 3])]).astype(int))
    op = gemmi.Op("-x,y,-z")
    assert np.array_equal(np.array([[1, 2, 3]]) @ law_matrix("-x,y,-z"), [op.apply_to_hkl([1, 2, 3])])
    with pytest.raises(ValueError):
        law_matrix("h,k,l+1/2")


def _asu_table(cell, sg, d_min):
    hkl = np.array(gemmi.make_miller_array(cell, sg, d_min, 0, True), dtype=np.int64)
    centric = np.asarray(sg.operations().centric_flag_array(hkl), dtype=bool)
    return hkl, centric


def _asu_row_reference(hkl, sg, targets):
    """Row of each target's ASU equivalent, one reflection at a time with gemmi's ReciprocalAsu."""
    asu = gemmi.ReciprocalAsu(sg)
    gops = sg.operations()
    index = {tuple(h): i for i, h in enumerate(hkl.tolist())}
    return np.array([index.get(tuple(asu.to_asu([int(x) for x in t], gops)[0]), -1) for t in targets])


def test_equivalent_rows_match_gemmi_asu():
    hkl, _ = _asu_table(CELL, SG, 4.0)
    law = twin_laws(CELL, SG)[0]
    targets = hkl @ hkl_rotation(law)
    mine = equivalent_rows(hkl, targets, SG)
    assert np.array_equal(mine, _asu_row_reference(hkl, SG, targets))
    shifted = equivalent_rows(hkl, hkl + np.array([0, 0, 2]), SG)
    ref = _asu_row_reference(hkl, SG, hkl + np.array([0, 0, 2]))
    assert np.array_equal(shifted, ref) and (shifted < 0).any()  # the edge of the sphere has no partner


def _twinned_case(alpha, seed=1):
    """Wilson-distributed intensities (random complex F; real for centric) twinned by the law."""
    hkl, centric = _asu_table(CELL, SG, 2.0)
    rng = np.random.default_rng(seed)
    f = rng.normal(size=len(hkl)) + 1j * np.where(centric, 0.0, rng.normal(size=len(hkl)))
    intensity = np.abs(f) ** 2 * np.exp(-0.5 * (1.0 / np.array([CELL.calculate_d(list(h)) for h in hkl])) ** 2)
    law = twin_laws(CELL, SG)[0]
    mate = _asu_row_reference(hkl, SG, hkl @ hkl_rotation(law))
    assert (mate >= 0).all()
    twinned = (1 - alpha) * intensity + alpha * intensity[mate]
    d = np.array([CELL.calculate_d(list(h)) for h in hkl])
    return SimpleNamespace(hkl=hkl, centric=centric, i_obs=twinned, f_obs=np.sqrt(twinned), cell=CELL, spacegroup=SG,
                           bin=resolution_bins(d, 10)), law


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.4])
def test_h_test_recovers_the_twin_fraction(alpha):
    table, law = _twinned_case(alpha)
    h = h_test(table.hkl, table.i_obs, table.centric, SG, law)
    assert h["pairs"] > 1000
    assert h["twin_fraction"] == pytest.approx(alpha, abs=0.04)


def test_l_test_and_second_moment_untwinned_and_perfect_twin():
    untwinned, _ = _twinned_case(0.0)
    perfect, _ = _twinned_case(0.5)
    lu = l_test(untwinned.hkl, untwinned.i_obs, untwinned.centric, SG)
    lp = l_test(perfect.hkl, perfect.i_obs, perfect.centric, SG)
    assert lu["mean_abs_l"] == pytest.approx(0.5, abs=0.015) and lu["mean_l2"] == pytest.approx(1 / 3, abs=0.015)
    assert lp["mean_abs_l"] == pytest.approx(0.375, abs=0.015) and lp["mean_l2"] == pytest.approx(0.2, abs=0.015)
    ru, rp = twinning_report(untwinned), twinning_report(perfect)
    assert ru["second_moment"] == pytest.approx(2.0, abs=0.1) and rp["second_moment"] == pytest.approx(1.5, abs=0.1)
    assert not ru["suspected"] and twinning_note(ru) is None
    assert rp["suspected"] and rp["twin_law"] == law_text(hkl_rotation(twin_laws(CELL, SG)[0]))
    assert rp["twin_fraction"] == pytest.approx(0.5, abs=0.05)
    assert "twin law" in twinning_note(rp)


def test_real_data(data_dir):
    from drefine.io.reflections import read_reflections

    twinned = data_dir / "xray/1l2h/1l2h.mtz.gz"
    plain = data_dir / "xray/4hg7/4hg7.mtz"
    if not twinned.exists() or not plain.exists():
        pytest.skip("xray/1l2h or xray/4hg7 not in DREFINE_TEST_DATA")
    r = twinning_report(read_reflections(twinned))
    # phenix.xtriage on the same file: H-test α 0.35, <|L|> 0.39 (with its resolution cut)
    assert r["suspected"] and r["twin_fraction"] == pytest.approx(0.35, abs=0.04)
    assert not twinning_report(read_reflections(plain))["suspected"]


def test_free_set_in_twin_pairs():
    from drefine.validate.twinning import free_set_in_twin_pairs

    rng = np.random.default_rng(0)
    n = 2001
    perm = rng.permutation(n - 1)
    mate = np.full(n, -1)
    mate[perm[0::2]], mate[perm[1::2]] = perm[1::2], perm[0::2]
    free = rng.random(n) < 0.05
    paired = free_set_in_twin_pairs(free, mate)
    ok = mate >= 0
    assert np.array_equal(paired[ok], paired[mate[ok]]) and paired[-1] == free[-1]
    assert abs(paired.mean() - 0.05) < 0.02
