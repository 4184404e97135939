"""Wiring a study: fine-tuning, the loop over checkpoints (analyze, merge), study files."""
