"""Benchmarks of nuwa-kernels' 3D nearby attention against full, axial, masked and peer implementations.

Run ``python -m benchmarks.run --quick`` (see ``docs/benchmarks.md``).
"""
