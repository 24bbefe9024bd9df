"""Density and structure factors: form factors, atom density on grids, Fcalc, bulk solvent, maps."""
