"""Benchmarks: caedfkd-jax against PyTorch (see dfkd_benchmark.py)."""
