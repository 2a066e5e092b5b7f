"""Measured comparisons: the serving benchmark (``python -m benchmarks.serving``)."""
