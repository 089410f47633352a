"""Export of pretrained networks for nnU-Net (``ssl_nnunet_export``) and target-dataset preparation.

``export_bundle`` and ``transfer_and_preprocess`` are imported lazily, so ``python -m
ssl_nnunet.export.exporter`` runs without the module being imported twice.
"""
__all__ = ["export_bundle", "transfer_and_preprocess"]


def __getattr__(name):
    if name == "export_bundle":
        from ssl_nnunet.export.exporter import export_bundle
        return export_bundle
    if name == "transfer_and_preprocess":
        from ssl_nnunet.export.transfer import transfer_and_preprocess
        return transfer_and_preprocess
    raise AttributeError(f"module 'ssl_nnunet.export' has no attribute {name!r}")
