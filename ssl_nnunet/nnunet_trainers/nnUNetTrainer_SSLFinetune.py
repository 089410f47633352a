"""Fine-tuning trainers for pretrained ssl_nnunet weights (``nnUNetv2_train -tr <name>``).

``nnUNetTrainer_SSLFinetune`` is the default schedule for pretrained weights: nnunetv2's warm-up trainer
(SGD, Nesterov 0.99, a linear learning-rate warm-up over the first 50 epochs, then nnU-Net's poly decay)
with the nnssl fine-tuning learning rate 1e-3 and nnU-Net's 1000 epochs x 250 iterations.

The ``_CPU300`` / ``_CPU1000`` variants are short CPU budgets (300 / 1000 training iterations, a 2-epoch
warm-up, learning rate 1e-2 because the budget is short, 5 validation iterations per epoch) without
mirroring in augmentation and inference (nnunetv2's ``nnUNetTrainerNoMirroring``) so nnU-Net's final
validation stays cheap.

``nnUNetTrainer_SSLVanilla`` (and ``_CPU300`` / ``_CPU1000``) are the ``scratch_vanilla`` arm of each: nnU-Net's
own learning rate 1e-2 and poly schedule without warm-up at the same budget (same epochs, iterations,
validation iterations and mirroring), so a scratch baseline is not handicapped by the fine-tuning recipe's
low learning rate and warm-up. On CPU, every trainer here runs nnU-Net's final validation with the network's 3D
convolutions on oneDNN (``ssl_nnunet.utilities.cpu_inference``: batch-1 patches otherwise take PyTorch's
~10x slower generic kernel). The pretrained and ``scratch`` arms of a comparison always use the same trainer.

Imported by nnunetv2 as a top-level module from the ``nnUNet_extTrainer`` folder: absolute imports only
(``ssl_nnunet`` is installed, so its modules import as usual).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

from ssl_nnunet.utilities.cpu_inference import CPUValidationMixin
from ssl_nnunet.utilities.trainer_budget import TrainingBudgetMixin


class _FullCheckpointLoading:
    """nnunetv2's warm-up trainer loads checkpoints with ``torch.load`` defaults; torch >= 2.6 defaults to
    ``weights_only=True``, which rejects nnU-Net's own checkpoints (numpy scalars in the log), so ``--c``
    would fail. Load them as nnU-Net's base trainer does (``weights_only=False``)."""

    def load_checkpoint(self, filename_or_checkpoint):
        if not isinstance(filename_or_checkpoint, str):
            return super().load_checkpoint(filename_or_checkpoint)
        original = torch.load
        torch.load = lambda *args, **kwargs: original(*args, **{**kwargs, "weights_only": False})
        try:
            return super().load_checkpoint(filename_or_checkpoint)
        finally:
            torch.load = original


class nnUNetTrainer_SSLFinetune(CPUValidationMixin, _FullCheckpointLoading, nnUNetTrainer_warmup):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.warmup_duration_whole_net = 50
        self.num_epochs = 1000


class _SSLFinetuneCPUBudget(TrainingBudgetMixin, CPUValidationMixin, _FullCheckpointLoading, nnUNetTrainer_warmup,
                            nnUNetTrainerNoMirroring):
    """Short CPU fine-tuning: ``budget_epochs`` x ``budget_iterations`` training iterations (set by each
    subclass), a 2-epoch warm-up, learning rate 1e-2, 5 validation iterations per epoch, no mirroring."""
    budget_val_iterations, budget_lr, budget_warmup_epochs = 5, 1e-2, 2


class nnUNetTrainer_SSLFinetune_CPU300(_SSLFinetuneCPUBudget):
    budget_epochs, budget_iterations = 10, 30


class nnUNetTrainer_SSLFinetune_CPU1000(_SSLFinetuneCPUBudget):
    budget_epochs, budget_iterations = 20, 50


class nnUNetTrainer_SSLVanilla(CPUValidationMixin, nnUNetTrainer):
    """The ``scratch_vanilla`` arm of ``nnUNetTrainer_SSLFinetune``: nnU-Net's own trainer unchanged (lr 1e-2,
    poly schedule without warm-up, 1000 x 250 iterations), with the oneDNN validation on CPU only."""


class _SSLVanillaCPUBudget(TrainingBudgetMixin, CPUValidationMixin, nnUNetTrainerNoMirroring):
    """The ``scratch_vanilla`` arm of a CPU budget: nnU-Net's own learning rate (1e-2) and poly schedule
    (no warm-up) for the same ``budget_epochs`` x ``budget_iterations`` as the fine-tuning budget, with its
    5 validation iterations per epoch and no mirroring (so both arms are validated alike)."""
    budget_val_iterations = 5


class nnUNetTrainer_SSLVanilla_CPU300(_SSLVanillaCPUBudget):
    budget_epochs, budget_iterations = nnUNetTrainer_SSLFinetune_CPU300.budget_epochs, \
        nnUNetTrainer_SSLFinetune_CPU300.budget_iterations


class nnUNetTrainer_SSLVanilla_CPU1000(_SSLVanillaCPUBudget):
    budget_epochs, budget_iterations = nnUNetTrainer_SSLFinetune_CPU1000.budget_epochs, \
        nnUNetTrainer_SSLFinetune_CPU1000.budget_iterations
