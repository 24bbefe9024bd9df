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
