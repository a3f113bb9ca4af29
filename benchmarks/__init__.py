"""Benchmark scripts (print tables, write JSON). Never run as tests. See docs/benchmarks.md."""
