"""Multi-conformer untangling by iterative projections (divide and concur, RRR): `drefine untangle`."""
