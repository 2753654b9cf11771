"""Orchestration side of the benchmark: standard library only, runs in any Python 3.11."""
