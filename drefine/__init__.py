"""drefine: distributed, array-parallel refinement of atomic models against X-ray data and cryo-EM maps."""

__version__ = "0.1.0"
