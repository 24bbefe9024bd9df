"""Data targets with one small interface: update(xyz), value_and_gradient(xyz), statistics(xyz)."""
