"""Tiny random models of the study's shape families, for tests and quick runs."""
