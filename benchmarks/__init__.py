"""Benchmarks that run against a real broker (the pipeline and its plain-relay baseline)."""
