"""Preview PNGs: middle slices (along axis a0) of 3D tensors, one row per title."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import torch


def save_preview_png(rows: Dict[str, Sequence[torch.Tensor]], path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    n_rows = len(rows)
    n_cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.4 * n_cols, 2.4 * n_rows), squeeze=False)
    for r, (row_title, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                vol = images[c].detach().float().cpu()
                ax.imshow(vol[vol.shape[0] // 2].numpy(), cmap="gray")
        axes[r][0].set_title(row_title, fontsize=8, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), ".tmp_" + os.path.basename(path))
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
