"""Multi-conformer untangling by iterative projections (divide and concur, RRR): building blocks."""
