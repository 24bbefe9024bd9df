"""Paths every benchmark uses: the shared data and scorers, the peers' virtualenv, and the
drefine command to time."""
import os
import sys
from pathlib import Path

DATA = Path(os.environ.get("DREFINE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TOOLS = DATA.parent / "tools"
MONLIB = DATA / "monlib"
PEERS_BIN = Path(os.environ.get("PEERS_DIR", "/tmp/peers")) / "venv" / "bin"
SERVALCAT = PEERS_BIN / "servalcat"
# the installed command next to this interpreter: a version manager's shim in front of it (pyenv's
# here) would add ~0.1 s to every timed run; else the one on PATH
DREFINE = next((str(p) for p in [Path(sys.executable).with_name("drefine")] if p.exists()), "drefine")
