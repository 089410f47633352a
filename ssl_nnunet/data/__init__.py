"""Data helpers for ssl_nnunet (demo dataset generation)."""
