"""Benchmarks of mnv3-serve: load generator, in-process ceiling, naive baseline, report."""
