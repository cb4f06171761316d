"""Benchmarks behind ``python -m beacon_ops bench`` (one module per kind)."""
