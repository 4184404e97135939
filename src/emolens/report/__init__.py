"""Figures (plotly) and the single self-contained HTML report."""
