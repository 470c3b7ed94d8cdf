"""Benchmarks: speed and memory targets, measured against reference tools run side by side."""
