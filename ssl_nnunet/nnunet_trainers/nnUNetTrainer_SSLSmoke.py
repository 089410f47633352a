"""``nnUNetTrainer_SSLSmoke``: nnU-Net's trainer shortened to a smoke run (tests, CPU demos).

One epoch of 2 training and 1 validation iteration, no mirroring in data augmentation and none at
inference (inherited from nnunetv2's ``nnUNetTrainerNoMirroring``); on CPU its final validation runs
the network's 3D convolutions through oneDNN (``ssl_nnunet.utilities.cpu_inference``). Everything else -
network from the plans, loss, optimiser, checkpoint format, final validation - is nnU-Net's own. Imported
by nnunetv2 as a top-level module from the ``nnUNet_extTrainer`` folder, hence absolute imports only.
"""
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from ssl_nnunet.utilities.cpu_inference import CPUValidationMixin
from ssl_nnunet.utilities.trainer_budget import TrainingBudgetMixin


class nnUNetTrainer_SSLSmoke(TrainingBudgetMixin, CPUValidationMixin, nnUNetTrainerNoMirroring):
    budget_epochs, budget_iterations, budget_val_iterations = 1, 2, 1
