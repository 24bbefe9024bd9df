"""Shared fixtures: where the public reference data live, and skipping cleanly without them."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("DREFINE_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared reference data not found at {d} (set DREFINE_TEST_DATA)")
    return d


def need(data_dir: Path, rel: str) -> Path:
    """Path of a file in the shared data, or skip the test naming what is missing."""
    p = data_dir / rel
    if not p.exists():
        pytest.skip(f"{rel} not in the shared data at {data_dir}")
    return p


@pytest.fixture(scope="session")
def monlib_dir(data_dir) -> Path:
    return need(data_dir, "monlib")


@pytest.fixture(scope="session")
def example_model_path() -> Path:
    return REPO / "examples" / "hth40.cif"


def boxed_structure(path: Path, padding: float = 8.0, remove_hydrogens: bool = False):
    """A gemmi.Structure of the protein part of `path`, moved into a padded P 1 box (a cryo-EM case)."""
    import gemmi
    import numpy as np

    st = gemmi.read_structure(str(path))
    st.setup_entities()
    if remove_hydrogens:
        st.remove_hydrogens()
    st.remove_alternative_conformations()
    st.remove_ligands_and_waters()
    xyz = np.array([cra.atom.pos.tolist() for cra in st[0].all()])
    lo = xyz.min(0) - padding
    size = xyz.max(0) + padding - lo
    for cra in st[0].all():
        cra.atom.pos = gemmi.Position(*(np.array(cra.atom.pos.tolist()) - lo))
    st.cell = gemmi.UnitCell(*size, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st.setup_cell_images()
    return st


def p212121_structure(path: Path):
    """The model of `path` without hydrogens in P 2₁2₁2₁ with its cell doubled (symmetry mates in
    the other octants): a small crystal case."""
    import gemmi

    st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    a, b, c = st.cell.a, st.cell.b, st.cell.c
    st.cell = gemmi.UnitCell(2 * a, 2 * b, 2 * c, 90, 90, 90)
    st.spacegroup_hm = "P 21 21 21"
    st.setup_cell_images()
    return st


def gemmi_model_map(st, d_min: float, electron: bool = True, spacing: float | None = None, shape=None):
    """The independent reference model map: gemmi's density calculator, unblurred, cut at d_min
    (the recipe of shared/tools/make_case.py and metrics.py)."""
    import gemmi
    import numpy as np

    dc = gemmi.DensityCalculatorE() if electron else gemmi.DensityCalculatorX()
    dc.d_min = d_min
    dc.rate = 1.5
    dc.set_refmac_compatible_blur(st[0])
    dc.grid.setup_from(st, spacing=spacing or d_min / 3)
    dc.put_model_density_on_grid(st[0])
    f = gemmi.transform_map_to_f_phi(dc.grid).prepare_asu_data(dmin=d_min, unblur=dc.blur)
    size = list(shape) if shape is not None else [dc.grid.nu, dc.grid.nv, dc.grid.nw]
    return np.array(f.transform_f_phi_to_map(exact_size=size), copy=True)


def rmsd(a, b) -> float:
    """RMS distance (Å) between two N×3 coordinate arrays, row by row."""
    import numpy as np

    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


def write_xray_case(d: Path, table, truth, shake: float = 0.3, seed: int = 5) -> None:
    """An `xray` command's inputs in `d`: data.mtz (the table without its phases, as measured
    data come) and start.cif (`truth` shaken by `shake` Å RMS, seeded)."""
    from drefine.io.models import write_model
    from drefine.model.perturb import shake_coordinates

    table.phases_deg = None
    table.to_mtz(d / "data.mtz")
    shaken, _ = shake_coordinates(truth, shake, seed=seed)
    write_model(shaken, d / "start.cif")
