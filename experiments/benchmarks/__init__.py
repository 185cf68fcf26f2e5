"""Benchmark scripts: each prints markdown tables and writes JSON."""
