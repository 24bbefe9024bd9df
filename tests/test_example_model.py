"""The helix-turn-helix example built from the built-in dictionary: layout, cell, B/occupancy, no clashes,
and ideal geometry by gemmi's topology (bond RMSD in Å, angle RMSD in degrees)."""

from __future__ import annotations

import io
from pathlib import Path

import gemmi
import numpy as np
import pytest

from drefine.examples import HELIX_PHI_PSI, MIN_RESIDUES, PADDING, build_helix_turn_helix, hth_sequence
from drefine.restraints.build_builtin_monlib import DEFAULT_OUT as BUILTIN

EXAMPLE_FILE = Path(__file__).resolve().parents[1] / "examples" / "hth40.cif"
MIN_NONBONDED = 2.2  # Å between heavy atoms that are neither bonded nor share an angle


@pytest.fixture(scope="module")
def model() -> gemmi.Structure:
    return build_helix_turn_helix()


def _topology(st: gemmi.Structure):
    """(topology, warnings, monlib); keep monlib alive while the topology is used."""
    monlib = gemmi.read_monomer_lib(str(BUILTIN), sorted({r.name for r in st[0][0]}))
    warnings = io.StringIO()
    topo = gemmi.prepare_topology(st, monlib, h_change=gemmi.HydrogenChange.NoChange, warnings=warnings)
    return topo, warnings.getvalue().splitlines(), monlib


def _rmsd(topo: gemmi.Topo) -> tuple[float, float]:
    bonds = np.array([b.calculate() - b.restr.value for b in topo.bonds])
    angles = np.array([np.degrees(a.calculate()) - a.restr.value for a in topo.angles])
    return float(np.sqrt(np.mean(bonds**2))), float(np.sqrt(np.mean(angles**2)))


def _closest_nonbonded(st: gemmi.Structure, topo: gemmi.Topo) -> tuple[float, str]:
    """Shortest heavy-atom distance (Å) over pairs not in one bond or angle restraint."""
    atoms = [(r, a) for r in st[0][0] for a in r if not a.is_hydrogen()]
    index = {a.serial: k for k, (_, a) in enumerate(atoms)}
    xyz = np.array([a.pos.tolist() for _, a in atoms])
    d = np.linalg.norm(xyz[:, None, :] - xyz[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    for group in [b.atoms for b in topo.bonds] + [(a.atoms[0], a.atoms[2]) for a in topo.angles]:
        i, j = index.get(group[0].serial), index.get(group[-1].serial)
        if i is not None and j is not None:
            d[i, j] = d[j, i] = np.inf
    i, j = np.unravel_index(np.argmin(d), d.shape)
    (ri, ai), (rj, aj) = atoms[i], atoms[j]
    return float(d[i, j]), f"{ri.name}{ri.seqid.num}:{ai.name}-{rj.name}{rj.seqid.num}:{aj.name}"


def test_sequence_chain_and_entity(model):
    chain = model[0]["A"]
    assert len(model) == 1 and len(model[0]) == 1 and len(chain) == 40
    seq = gemmi.one_letter_code([r.name for r in chain])
    assert seq == hth_sequence(40) and set(seq) == set("ACDEFGHIKLMNPQRSTVWY")
    [entity] = model.entities
    assert entity.entity_type == gemmi.EntityType.Polymer
    assert entity.polymer_type == gemmi.PolymerType.PeptideL
    assert list(entity.full_sequence) == [r.name for r in chain]
    assert model.get_entity_of(chain.get_polymer()) is not None


def test_two_helices_joined_by_a_turn(model):
    chain = model[0]["A"]
    phi_psi = np.degrees([gemmi.calculate_phi_psi(chain[i - 1], chain[i], chain[i + 1])
                          for i in range(1, len(chain) - 1)])
    helical = np.all(np.abs(phi_psi - HELIX_PHI_PSI) < 1.0, axis=1)
    runs = sorted(len(r) for r in "".join("h" if h else "-" for h in helical).split("-") if r)
    assert len(runs) == 2 and min(runs) >= 14  # two helices (15 and 18 residues) and nothing else
    omega = [np.degrees(gemmi.calculate_omega(chain[i], chain[i + 1])) for i in range(len(chain) - 1)]
    assert max(abs(abs(w) - 180.0) for w in omega) < 1.0  # all trans


def test_cell_padding_b_factors_and_occupancies(model):
    assert model.spacegroup_hm == "P 1"
    cell = model.cell
    assert (cell.alpha, cell.beta, cell.gamma) == (90.0, 90.0, 90.0)
    xyz = np.array([a.pos.tolist() for r in model[0]["A"] for a in r])
    assert np.all(xyz.min(axis=0) >= PADDING - 1e-3)
    assert np.all(np.array([cell.a, cell.b, cell.c]) - xyz.max(axis=0) >= PADDING - 1e-3)
    chain = model[0]["A"]
    assert all(a.occ == 1.0 for r in chain for a in r)
    b = np.array([r[0].b_iso for r in chain])
    assert all(len({a.b_iso for a in r}) == 1 for r in chain)
    assert np.all(b[3:-3] == 20.0)
    assert b[0] == b[-1] == 30.0 and np.all(np.diff(b[:4]) < 0) and np.all(np.diff(b[-4:]) > 0)


def test_hydrogens_and_termini(model):
    chain = model[0]["A"]
    first, last = chain[0], chain[len(chain) - 1]
    assert {"H", "H2", "H3"} <= {a.name for a in first}
    assert "OXT" in {a.name for a in last}
    for r in list(chain)[1:]:
        names = {a.name for a in r}
        assert "H2" not in names and ("H" in names) == (r.name != "PRO")
    bare = build_helix_turn_helix(with_hydrogens=False)
    assert not any(a.is_hydrogen() for r in bare[0]["A"] for a in r)
    assert bare[0].count_atom_sites() == sum(not a.is_hydrogen() for r in chain for a in r)


@pytest.mark.parametrize("with_hydrogens", [True, False])
def test_ideal_geometry_by_gemmi_topology(with_hydrogens):
    st = build_helix_turn_helix(with_hydrogens=with_hydrogens)
    topo, warnings, _monlib = _topology(st)
    assert warnings == []
    bond_rmsd, angle_rmsd = _rmsd(topo)
    assert bond_rmsd < 0.02
    assert angle_rmsd < 2.5
    assert len(topo.bonds) > st[0].count_atom_sites() - 1  # every atom restrained (chain: n-1 bonds)


def test_no_clashes(model):
    topo, _warnings, _monlib = _topology(model)
    closest, pair = _closest_nonbonded(model, topo)
    assert closest >= MIN_NONBONDED, pair


def test_too_short_is_refused():
    with pytest.raises(ValueError, match="at least"):
        build_helix_turn_helix(n_residues=MIN_RESIDUES - 1)


@pytest.mark.parametrize("n", [MIN_RESIDUES, 60])
def test_other_lengths(n):
    st = build_helix_turn_helix(n_residues=n, with_hydrogens=False)
    assert len(st[0]["A"]) == n
    topo, warnings, _monlib = _topology(st)
    assert warnings == []
    bond_rmsd, angle_rmsd = _rmsd(topo)
    assert bond_rmsd < 0.02 and angle_rmsd < 2.5
    assert _closest_nonbonded(st, topo)[0] >= MIN_NONBONDED


def test_example_file_matches_the_builder(model):
    st = gemmi.read_structure(str(EXAMPLE_FILE))
    assert st.spacegroup_hm == "P 1"
    assert st.cell.parameters == pytest.approx(model.cell.parameters, abs=1e-3)
    read = [(r.name, r.seqid.num, a.name, a.pos.tolist(), a.b_iso, a.occ) for r in st[0]["A"] for a in r]
    built = [(r.name, r.seqid.num, a.name, a.pos.tolist(), a.b_iso, a.occ) for r in model[0]["A"] for a in r]
    assert [x[:3] for x in read] == [x[:3] for x in built]
    assert np.allclose([x[3] for x in read], [x[3] for x in built], atol=1e-3)
    np.testing.assert_allclose([x[4:] for x in read], [x[4:] for x in built], atol=1e-2)  # B, occupancy
    st.setup_entities()
    assert len(st.entities) == 1 and st.entities[0].polymer_type == gemmi.PolymerType.PeptideL
