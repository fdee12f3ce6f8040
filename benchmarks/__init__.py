"""Benchmark scripts: each measures against a baseline in one run and writes a section of docs/benchmarks.md."""
