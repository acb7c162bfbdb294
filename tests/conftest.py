"""Lucid's own tests use the same fixtures plugin authors get from ``lucid.testing``."""
