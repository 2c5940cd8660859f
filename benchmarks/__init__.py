"""Benchmark scripts: each prints its figures and ratios against a baseline run alongside."""
