"""``nnUNet_Primus_SSLSmoke_Trainer``: nnunetv2's Primus trainer shortened to a CPU smoke run (tests, demos).

nnunetv2's ``nnUNet_Primus_S/B/M/L_Trainer`` hard-code their sizes; this one builds the Primus of the plan
(``-arch primus_* -profile cpu_smoke|cpu_bench`` writes a tiny one: the same class, ``Primus(**arch_kwargs)``,
so the key names and shapes are those of the pretraining export) and runs one epoch of 2 training and 1
validation iteration without mirroring. Optimiser (AdamW 3e-4, warm-up), loss, gradient clipping, checkpoint
format and the final validation are nnunetv2's own (``AbstractPrimus``).

``nnUNet_Primus_SSLFinetune_CPU1000`` is the transfer benchmark's CPU budget for a Primus (``--budget
cpu-small-primus``): the same trainer for 20 epochs × 50 iterations (the CNN's ``_CPU1000`` length) with a
2-epoch warm-up (nnunetv2's 50-epoch warm-up would outlast the budget) and 5 validation iterations per epoch.
It is nnunetv2's own Primus recipe at that length, so it is also its own ``scratch_vanilla`` arm. Imported by nnunetv2 as a top-level
module from the ``nnUNet_extTrainer`` folder, hence absolute imports only.
"""
import torch
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import AbstractPrimus

from ssl_nnunet.utilities.cpu_inference import CPUValidationMixin


class nnUNet_Primus_SSLSmoke_Trainer(CPUValidationMixin, AbstractPrimus):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # the parameter names must equal nnUNetTrainer's: it records them as init_args for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        from ssl_nnunet.backbones.primus import build_primus
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        kwargs["input_shape"] = list(configuration_manager.patch_size)
        return build_primus(kwargs, num_input_channels, num_output_channels)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, do_dummy_2d, initial_patch_size, _ = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, do_dummy_2d, initial_patch_size, None


class nnUNet_Primus_SSLFinetune_CPU1000(nnUNet_Primus_SSLSmoke_Trainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 5
        self.warmup_duration_whole_net = 2
