"""ssl_nnunet: self-supervised pretraining for nnU-Net networks."""
from ssl_nnunet import paths as _paths  # noqa: F401  (must run before nnunetv2 is imported)

__version__ = "0.1.0"
