"""Activation Beacon inside other libraries' models (optional dependencies, imported on demand)."""
