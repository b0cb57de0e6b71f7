"""The reference dataset: scikit-learn's handwritten digits, upsampled to 16×16.

It ships inside scikit-learn, so training, metrics and demos never download anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
IMAGE_SIZE = 16


def digits(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as [N, 1, 16, 16] float32, and labels [N] int64.

    `split` is ``"train"`` (the first 80 %, in a fixed shuffled order), ``"test"`` (the rest) or
    ``"all"``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # 8×8 in [0, 1]
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(order))
    if split == "train":
        order = order[:cut]
    elif split == "test":
        order = order[cut:]
    elif split != "all":
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    return images[order], labels[order]
