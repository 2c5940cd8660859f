"""Tests of the optimiser: hand cases, properties, the seed fleet, overrides, baselines."""
