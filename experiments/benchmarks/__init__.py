"""The suites of experiments/benchmark.py, one module per kind."""
