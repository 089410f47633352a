"""``nnUNetTrainer_SSLSmoke``: nnU-Net's trainer shortened to a smoke run (tests, CPU demos).

One epoch of 2 training and 1 validation iteration, no mirroring in data augmentation and none at
inference (inherited from nnunetv2's ``nnUNetTrainerNoMirroring``); on CPU its final validation runs
the network's 3D convolutions through oneDNN (``ssl_nnunet.utilities.cpu_inference``). Everything else -
network from the plans, loss, optimiser, checkpoint format, final validation - is nnU-Net's own. Imported
by nnunetv2 as a top-level module from the ``nnUNet_extTrainer`` folder, hence absolute imports only.
"""
import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from ssl_nnunet.utilities.cpu_inference import CPUValidationMixin


class nnUNetTrainer_SSLSmoke(CPUValidationMixin, nnUNetTrainerNoMirroring):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # the parameter names must equal nnUNetTrainer's: it records them as init_args for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
