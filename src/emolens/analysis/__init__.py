"""Tables across steps from stored measurements: geometry, probes, change tests, sweeps. No
model."""
