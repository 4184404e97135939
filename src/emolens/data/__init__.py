"""Inputs: the corpus and its readers, the labels, the one prompt specification, tokenization."""
