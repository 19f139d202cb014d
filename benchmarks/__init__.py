"""Benchmarks for harmont-exec: synthetic workloads and the timing scripts that use them.

Not part of the installed package; run from a checkout (``python -m benchmarks.<module>``).
Speed and memory are measured here, never asserted in ``tests/``.
"""
