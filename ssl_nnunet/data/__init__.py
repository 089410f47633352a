"""Data helpers for ssl_nnunet: unlabeled samplers, the prefetching loader, per-case body geometry, demo datasets."""
