"""Ordered solvent (`drefine xray --waters`): peaks of a periodic map found off the grid, the
picking rules (distance, hydrogen-bond partner, density, symmetry duplicates), pruning, the
model edits, and the whole update recovering waters deleted from the model that made the data."""
import json

import gemmi
import numpy as np
import pytest
from conftest import p212121_structure

from drefine.cli import main
from drefine.density.synthetic import synthetic_reflections
from drefine.io.models import read_model, write_model
from drefine.refine.waters import (
    WaterCriteria,
    map_peaks,
    new_water_b,
    pick_waters,
    waters_to_remove,
    with_waters,
    without_atoms,
)


def _grid_with_blobs(cell: gemmi.UnitCell, sg: str, centres, heights, spacing: float = 0.4, width: float = 0.6):
    """A periodic unit-cell map, zero but for a Gaussian of the given height (read as σ units) at
    each Cartesian centre (its nearest periodic image)."""
    shape = [int(np.ceil(x / spacing)) for x in (cell.a, cell.b, cell.c)]
    grid = gemmi.FloatGrid(*shape)
    grid.set_unit_cell(cell)
    grid.spacegroup = gemmi.SpaceGroup(sg)
    arr = np.zeros(shape, dtype=np.float32)
    frac_axes = [np.arange(n) / n for n in shape]
    fu, fv, fw = np.meshgrid(*frac_axes, indexing="ij")
    frac = np.stack([fu, fv, fw], axis=-1)
    orth = np.array(cell.orth.mat.tolist())
    for c, h in zip(centres, heights):
        f0 = np.array(cell.fractionalize(gemmi.Position(*c)).tolist())
        d = frac - f0
        d -= np.round(d)
        r2 = ((d @ orth.T) ** 2).sum(-1)
        arr += h * np.exp(-r2 / (2 * width**2))
    grid.array[:] = arr
    return grid


def test_map_peaks_finds_off_grid_maxima_across_the_cell_edge():
    cell = gemmi.UnitCell(20, 22, 24, 90, 90, 90)
    centres = [(5.13, 7.41, 9.77), (19.9, 0.05, 23.93)]  # the second wraps around the origin
    grid = _grid_with_blobs(cell, "P 1", centres, [5.0, 4.0])
    xyz, height = map_peaks(grid, 3.0)
    assert len(xyz) == 2 and height[0] > height[1]
    for c, p in zip(centres, xyz):
        d = np.array(cell.fractionalize(gemmi.Position(*p)).tolist()) - np.array(
            cell.fractionalize(gemmi.Position(*c)).tolist())
        d -= np.round(d)
        assert np.linalg.norm(np.array(cell.orth.mat.tolist()) @ d) < 0.08
    assert len(map_peaks(grid, 6.0)[0]) == 0


@pytest.fixture(scope="module")
def crystal(example_model_path):
    st = p212121_structure(example_model_path)
    st.setup_entities()
    return st


def _model_of(st, tmp_path, name="m.cif"):
    p = tmp_path / name
    st.make_mmcif_document().write_file(str(p))
    return read_model(p)


def _free_sites(st, n: int, rng, lo: float, hi: float, partner=("O", "N")):
    """Sites whose nearest atom (symmetry included) is between lo and hi Å away and, for a
    hydrogen-bond site, an N or O; mutually ≥ 3 Å apart (symmetry included)."""
    ns = gemmi.NeighborSearch(st[0], st.cell, 6).populate()
    polar = [cra.atom.pos for cra in st[0].all() if cra.atom.element.name in ("O", "N")]
    out = []
    for _ in range(20000):
        base = polar[rng.integers(len(polar))]
        v = rng.normal(size=3)
        p = gemmi.Position(*(np.array(base.tolist()) + v / np.linalg.norm(v) * rng.uniform(lo, hi)))
        m = ns.find_nearest_atom(p, radius=hi + 2)
        if m is None or not lo <= m.pos.dist(p) <= hi or (partner and m.element.name not in partner):
            continue
        if all(st.cell.find_nearest_image(q, p, gemmi.Asu.Any).dist() >= 3.0 for q in out):
            out.append(p)
        if len(out) == n:
            break
    return [q.tolist() for q in out]


def test_picking_rules_and_symmetry_duplicates(crystal, tmp_path):
    model = _model_of(crystal, tmp_path)
    rng = np.random.default_rng(3)
    good = _free_sites(crystal, 2, rng, 2.7, 3.0)
    too_close = _free_sites(crystal, 1, rng, 1.6, 1.9, partner=None)
    # the first good site also through a 2-fold screw of P 2₁2₁2₁ (one site, two peaks in the cell)
    op = gemmi.SpaceGroup("P 21 21 21").operations().sym_ops[1]
    f = crystal.cell.fractionalize(gemmi.Position(*good[0]))
    image = crystal.cell.orthogonalize(gemmi.Fractional(*op.apply_to_xyz(f.tolist()))).tolist()
    centres = [*good, *too_close, image]
    grid = _grid_with_blobs(crystal.cell, "P 21 21 21", centres, [6.0, 5.0, 8.0, 6.0])
    sites, _ = pick_waters(model, grid, grid, WaterCriteria())
    assert len(sites) == 2
    for g in good:
        assert min(np.linalg.norm(sites - np.array(g), axis=1)) < 0.1
    # below the peak threshold nothing is picked; with the density map empty nothing either
    assert len(pick_waters(model, grid, grid, WaterCriteria(peak_sigma=9.0))[0]) == 0
    empty = _grid_with_blobs(crystal.cell, "P 21 21 21", [], [])
    assert len(pick_waters(model, grid, empty)[0]) == 0


def test_adding_pruning_and_removing_waters(crystal, tmp_path):
    model = _model_of(crystal, tmp_path)
    rng = np.random.default_rng(4)
    sites = np.array(_free_sites(crystal, 3, rng, 2.7, 3.0))
    wet = with_waters(model, sites, 25.0)
    water = np.flatnonzero(np.asarray(wet.residues.name)[wet.atoms.residue_index] == "HOH")
    assert len(wet.atoms) == len(model.atoms) + 3 and len(water) == 3
    np.testing.assert_allclose(wet.atoms.xyz[water], sites, atol=1e-6)
    assert set(np.asarray(wet.residues.entity_type)[wet.atoms.residue_index[water]]) == {"water"}
    write_model(wet, tmp_path / "wet.cif")
    assert len(read_model(tmp_path / "wet.cif").atoms) == len(wet.atoms)
    # density at two of the three: the third is pruned; then a B above 80 Å² prunes another
    grid = _grid_with_blobs(crystal.cell, "P 21 21 21", sites[:2], [3.0, 3.0])
    assert waters_to_remove(wet, grid).tolist() == [water[2]]
    wet.atoms.b_iso[water[0]] = 95.0
    assert waters_to_remove(wet, grid).tolist() == [water[0], water[2]]
    # the second water split into two conformers 1.5 Å apart: its A copy (where it was) does not
    # clash with its B copy; the same two as plain waters do
    removed = {}
    for altlocs in (("A", "B"), ("", "")):
        st = wet.to_structure()
        split = st[0][len(st[0]) - 1][1]
        other = split[0].clone()
        if altlocs[0]:
            split[0].altloc, other.altloc = altlocs
        other.pos = gemmi.Position(split[0].pos.x + 1.5, split[0].pos.y, split[0].pos.z)
        split.add_atom(other)
        st.setup_entities()
        st.make_mmcif_document().write_file(str(tmp_path / "alt.cif"))
        alt = read_model(tmp_path / "alt.cif")
        both = _grid_with_blobs(crystal.cell, "P 21 21 21", [*sites[:2], np.array(other.pos.tolist())], [3.0] * 3)
        removed[altlocs[0]] = waters_to_remove(alt, both).tolist()
    assert water[1] not in removed["A"] and water[1] in removed[""]
    dry = without_atoms(wet, water[[0, 2]])
    assert len(dry.atoms) == len(model.atoms) + 1
    np.testing.assert_allclose(dry.atoms.xyz[-1], sites[1], atol=1e-6)
    np.testing.assert_array_equal(dry.atoms.xyz[:len(model.atoms)], model.atoms.xyz)


def test_water_update_finds_the_waters_the_data_were_made_with(crystal, tmp_path):
    """Data from the model with 8 waters; refined from the model without them: `--waters` puts
    most of them back where they were and R-free ends lower than without the update."""
    dry = _model_of(crystal, tmp_path, "dry.cif")
    rng = np.random.default_rng(5)
    true_sites = np.array(_free_sites(crystal, 8, rng, 2.7, 3.0))
    truth = with_waters(dry, true_sites, 20.0)
    table = synthetic_reflections(truth, 2.0, noise=0.03, seed=1)
    table.phases_deg = None
    table.to_mtz(tmp_path / "data.mtz")
    write_model(dry, tmp_path / "start.cif")
    reports = {}
    for tag, extra in (("plain", []), ("waters", ["--waters"])):
        assert main(["xray", str(tmp_path / "start.cif"), str(tmp_path / "data.mtz"), "-o", str(tmp_path / tag),
                     "--cycles", "4", "--esd", "none", *extra]) == 0
        reports[tag] = json.loads((tmp_path / f"{tag}.json").read_text())
    added = reports["waters"]["details"]["waters"]["added"]
    assert 6 <= added <= 10
    out = read_model(tmp_path / "waters.cif")
    got = out.atoms.xyz[np.asarray(out.residues.name)[out.atoms.residue_index] == "HOH"]
    near = [np.linalg.norm(true_sites - g, axis=1).min() < 0.5 for g in got]
    assert sum(near) >= 6
    assert reports["waters"]["final"]["r_free"] < reports["plain"]["final"]["r_free"] - 0.01
    assert [c["cycle"] for c in reports["waters"]["cycles"]][:4] == [1, 2, 3, 4]


def test_no_water_update_from_low_resolution_data(crystal, tmp_path):
    model = _model_of(crystal, tmp_path, "start.cif")
    table = synthetic_reflections(model, 3.5, noise=0.03, seed=1)
    table.phases_deg = None
    table.to_mtz(tmp_path / "low.mtz")
    assert main(["xray", str(tmp_path / "start.cif"), str(tmp_path / "low.mtz"), "-o", str(tmp_path / "low"),
                 "--cycles", "2", "--esd", "none", "--waters"]) == 0
    rep = json.loads((tmp_path / "low.json").read_text())
    assert "skipped" in rep["details"]["waters"] and len(rep["cycles"]) >= 2
    assert len(read_model(tmp_path / "low.cif").atoms) == len(model.atoms)
    # one cycle leaves none to refine the waters in: refused before anything is read or written
    assert main(["xray", str(tmp_path / "start.cif"), str(tmp_path / "low.mtz"), "-o", str(tmp_path / "one"),
                 "--cycles", "1", "--waters"]) == 1
    assert not list(tmp_path.glob("one*"))


def test_local_maxima_are_those_of_scipys_maximum_filter():
    """The compiled peak search equals maximum_filter(size=3, mode="wrap") == map above the
    threshold, with plateaus (ties) and peaks on the cell's faces."""
    from scipy.ndimage import maximum_filter

    from drefine.refine.waters import _local_maxima

    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        arr = np.round(rng.normal(size=(17, 12, 20)), 1).astype(dtype)  # rounding makes ties
        arr[0, 5, 19] = arr[16, 0, 0] = 9.0
        for threshold in (0.5, 2.0):
            expected = np.argwhere((arr >= threshold) & (maximum_filter(arr, size=3, mode="wrap") == arr))
            got = _local_maxima(arr, dtype(threshold))
            np.testing.assert_array_equal(got, expected)
        assert len(expected) > 3


def test_new_waters_start_from_the_waters_b_or_a_multiple_of_the_models(crystal, tmp_path):
    """Without waters (or with few) the start is b_start_ratio × the mean B of the other heavy
    atoms; with enough waters, their mean B."""
    dry = _model_of(crystal, tmp_path, "dry.cif")
    heavy = dry.model_atoms(0)
    criteria = WaterCriteria()
    expected = criteria.b_start_ratio * float(np.mean(dry.atoms.b_iso[heavy]))
    assert new_water_b(dry, criteria) == pytest.approx(expected)
    rng = np.random.default_rng(1)
    sites = rng.uniform(0, 20, (criteria.b_start_min_waters, 3))
    wet = with_waters(dry, sites, 55.0)
    assert new_water_b(wet, criteria) == pytest.approx(55.0)
    few = with_waters(dry, sites[: criteria.b_start_min_waters - 1], 55.0)
    assert new_water_b(few, criteria) == pytest.approx(expected)  # too few waters: the model's rule
