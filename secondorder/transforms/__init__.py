"""Gradient transformations: one file per method family (primitive, state and alias)."""
