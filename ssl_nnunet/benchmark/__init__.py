"""Benchmarks (``ssl_nnunet_benchmark``): measured, never asserted in tests."""
