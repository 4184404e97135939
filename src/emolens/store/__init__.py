"""The results folder on disk: atomic writes, tensors, CSV and JSON with provenance, the lock."""
