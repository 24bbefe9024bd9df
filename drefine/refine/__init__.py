"""Minimisers and refinement drivers (macro-cycles, weight search, rigid body)."""
