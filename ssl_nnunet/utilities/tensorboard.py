"""Optional TensorBoard logging (``--tensorboard``; needs the ``tensorboard`` extra: ``pip install
ssl_nnunet[tensorboard]``).

Pretraining (``ssl_nnunet_pretrain --tensorboard``) writes to ``<run folder>/tensorboard``: the total loss of
every iteration (``iteration/loss``), every loss term per epoch (``train/<term>``, ``val/<term>``), the learning
rate, the data-wait fraction and the epoch time, and the preview images; the x axis is the iteration count, so a
resumed run continues its curves. Fine-tuning (``ssl_nnunet_finetune --tensorboard``) writes one run per arm and
fold, ``<comparison folder>/tensorboard/<arm>/fold_<F>``, with nnU-Net's epoch values (learning rate, train and
validation loss, pseudo Dice per class and mean, epoch time) read from the fold's training output. ``progress.png``
is written either way. View with ``tensorboard --logdir <folder>``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

from ssl_nnunet.utilities.errors import SSLInputError


class TensorBoardLog:
    """A thin sink over ``torch.utils.tensorboard.SummaryWriter``: scalars, a PNG as an image, flush/close."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch imports tensorboard lazily and raises ImportError without it
            raise SSLInputError("--tensorboard needs the tensorboard package: pip install 'ssl_nnunet[tensorboard]' "
                                "(or pip install tensorboard); progress.png is written without it.") from None
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self._writer.add_scalar(tag, float(value), step)

    def image_file(self, tag: str, png_path: str, step: int) -> None:
        """Adds the PNG written by the preview code (the same picture the run folder keeps)."""
        import matplotlib.image as mpimg
        picture = mpimg.imread(png_path)  # H x W x (3|4) floats in [0, 1]
        self._writer.add_image(tag, picture[..., :3], step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_log(log_dir: Optional[str]) -> Optional[TensorBoardLog]:
    """A :class:`TensorBoardLog` in ``log_dir``, or None when ``log_dir`` is None (TensorBoard off)."""
    return TensorBoardLog(log_dir) if log_dir else None
