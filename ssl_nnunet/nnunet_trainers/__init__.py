"""nnU-Net trainer variants shipped with ssl_nnunet, for ``nnUNetv2_train -tr <name>``.

nnunetv2 finds trainers outside its own package through the ``nnUNet_extTrainer`` environment variable: it
puts that folder on ``sys.path`` and imports every module in it by its bare file name (not as
``ssl_nnunet.nnunet_trainers.<module>``). Modules here therefore use absolute imports only. Point the
variable at :func:`trainer_dir`::

    export nnUNet_extTrainer=$(python -c "import ssl_nnunet.nnunet_trainers as t; print(t.trainer_dir())")
    nnUNetv2_train TGT 3d_fullres 0 -p sslFinetunePlans -tr nnUNetTrainer_SSLSmoke -device cpu ...
"""
import os


def trainer_dir() -> str:
    """Absolute path of this folder (the value for ``nnUNet_extTrainer``)."""
    return os.path.dirname(os.path.abspath(__file__))
