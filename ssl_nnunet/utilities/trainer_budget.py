"""The length (and, where a budget needs it, learning rate and warm-up) of ssl_nnunet's nnU-Net trainer variants.

nnU-Net's trainer variants change a few attributes after ``nnUNetTrainer.__init__``; our budgets (smoke runs, the
CPU fine-tuning lengths, their vanilla arms, the Primus ones) all change the same ones, so they declare them as
class attributes and this mixin sets them. Put it first among the bases::

    class nnUNetTrainer_SSLSmoke(TrainingBudgetMixin, CPUValidationMixin, nnUNetTrainerNoMirroring):
        budget_epochs, budget_iterations, budget_val_iterations = 1, 2, 1
"""
from typing import Optional

import torch


class TrainingBudgetMixin:
    """Sets ``num_epochs``, ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` from
    ``budget_epochs`` / ``budget_iterations`` / ``budget_val_iterations``, and ``initial_lr`` /
    ``warmup_duration_whole_net`` from ``budget_lr`` / ``budget_warmup_epochs`` where those are not None."""
    budget_epochs: int
    budget_iterations: int
    budget_val_iterations: int
    budget_lr: Optional[float] = None
    budget_warmup_epochs: Optional[int] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # the parameter names must equal nnUNetTrainer's: it records them as init_args for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.budget_epochs
        self.num_iterations_per_epoch = self.budget_iterations
        self.num_val_iterations_per_epoch = self.budget_val_iterations
        if self.budget_lr is not None:
            self.initial_lr = self.budget_lr
        if self.budget_warmup_epochs is not None:
            self.warmup_duration_whole_net = self.budget_warmup_epochs
