"""Fingerprinting, SSL planning and preprocessing on top of nnunetv2's experiment planning."""
import ssl_nnunet  # noqa: F401  (sets nnU-Net paths before nnunetv2 is imported)
