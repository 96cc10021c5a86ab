"""Benchmarks (``dualrpo bench NAME``): each prints a table of ratios against named baselines
measured in the same run, and can write its results as JSON."""
