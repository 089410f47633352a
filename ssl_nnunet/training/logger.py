"""Per-epoch logging of every loss term, with nnU-Net-style progress.png."""
from __future__ import annotations

import os
from typing import Dict, List


class SSLLogger:
    """Stores one value per epoch for any key (``train_<term>``, ``val_<term>``, ``lr``, ``epoch_time``, ...)."""

    def __init__(self):
        self.values: Dict[str, List[float]] = {}

    def log(self, key: str, value: float, epoch: int) -> None:
        series = self.values.setdefault(key, [])
        if len(series) > epoch:
            series[epoch] = float(value)
        else:
            series.extend([float("nan")] * (epoch - len(series)))
            series.append(float(value))

    def get_value(self, key: str, step=None):
        series = self.values.get(key, [])
        return series if step is None else series[step]

    def get_checkpoint(self) -> dict:
        return {k: list(v) for k, v in self.values.items()}

    def load_checkpoint(self, checkpoint: dict) -> None:
        self.values = {k: list(v) for k, v in checkpoint.items()}

    def truncate(self, num_epochs: int) -> None:
        """Drop entries of epochs >= num_epochs (used when resuming from an earlier checkpoint)."""
        for k in self.values:
            self.values[k] = self.values[k][:num_epochs]

    def loss_terms(self) -> List[str]:
        return sorted({k.split("_", 1)[1] for k in self.values if k.startswith(("train_", "val_"))})

    def plot_progress_png(self, output_folder: str) -> str:
        """One panel per loss term (train and val), then learning rate and epoch time."""
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        terms = self.loss_terms()
        n = len(terms) + 2
        fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n))
        for ax, term in zip(axes, terms):
            for split, colour in (("train", "b"), ("val", "r")):
                series = self.values.get(f"{split}_{term}")
                if series:
                    ax.plot(range(len(series)), series, color=colour, label=f"{split} {term}")
            ax.set_ylabel(term)
            ax.legend(loc="upper right")
        axes[-2].plot(self.values.get("lr", []), color="g")
        axes[-2].set_ylabel("learning rate")
        axes[-1].plot(self.values.get("epoch_time", []), color="k")
        axes[-1].set_ylabel("epoch time [s]")
        axes[-1].set_xlabel("epoch")
        fig.tight_layout()
        path = os.path.join(output_folder, "progress.png")
        tmp = os.path.join(output_folder, ".tmp_progress.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path
