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


# fine-tuning trainer -> its ``scratch_vanilla`` counterpart (nnU-Net's own lr and schedule at the same budget).
# The smoke trainer already is nnU-Net's trainer with nnU-Net's lr and schedule, so it is its own counterpart.
VANILLA_TRAINERS = {
    "nnUNetTrainer_SSLFinetune": "nnUNetTrainer_SSLVanilla",
    "nnUNetTrainer_SSLFinetune_CPU300": "nnUNetTrainer_SSLVanilla_CPU300",
    "nnUNetTrainer_SSLFinetune_CPU1000": "nnUNetTrainer_SSLVanilla_CPU1000",
    "nnUNetTrainer_SSLSmoke": "nnUNetTrainer_SSLSmoke",
    # Primus: nnunetv2's trainers and the CPU smoke variant already run nnunetv2's own Primus recipe
    "nnUNet_Primus_SSLSmoke_Trainer": "nnUNet_Primus_SSLSmoke_Trainer",
    "nnUNet_Primus_SSLFinetune_CPU1000": "nnUNet_Primus_SSLFinetune_CPU1000",
    "nnUNet_Primus_S_Trainer": "nnUNet_Primus_S_Trainer", "nnUNet_Primus_B_Trainer": "nnUNet_Primus_B_Trainer",
    "nnUNet_Primus_M_Trainer": "nnUNet_Primus_M_Trainer", "nnUNet_Primus_L_Trainer": "nnUNet_Primus_L_Trainer",
}


def vanilla_trainer(trainer: str) -> str:
    """The ``scratch_vanilla`` trainer for fine-tuning trainer ``trainer`` (see :data:`VANILLA_TRAINERS`)."""
    if trainer in VANILLA_TRAINERS:
        return VANILLA_TRAINERS[trainer]
    from ssl_nnunet.utilities.errors import SSLInputError
    raise SSLInputError(f"No vanilla scratch trainer known for -tr {trainer} (known: {sorted(VANILLA_TRAINERS)}); "
                        f"name one with -tr_vanilla (e.g. nnUNetTrainer for nnU-Net's full default).")
