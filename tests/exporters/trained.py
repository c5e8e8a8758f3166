"""Models trained on scikit-learn's digits for the exporter tests, each fitted once per run.

The first 1400 rows train and calibrate; the rest are held out to measure accuracy.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from tests.models import digits_data

__all__ = ["TRAIN_ROWS", "digits_cnn", "digits_mlp", "held_out", "train_rows"]

TRAIN_ROWS = 1400


def train_rows() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_data()
    return x[:TRAIN_ROWS], y[:TRAIN_ROWS]


def held_out() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_data()
    return x[TRAIN_ROWS:], y[TRAIN_ROWS:]


@lru_cache(maxsize=1)
def digits_mlp() -> Any:
    """An MLPClassifier (64 → 32 → 10): MatMul and Add in ONNX, which INT8 can quantize."""
    from sklearn.neural_network import MLPClassifier

    x, y = train_rows()
    return MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, tol=1e-3, random_state=0).fit(x, y)


@lru_cache(maxsize=1)
def digits_cnn() -> Any:
    """A small CNN on 8×8 images [N, 1, 8, 8]: conv 1→4 3×3, ReLU, flatten, linear to 10."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x, y = train_rows()
    images = torch.from_numpy(x.reshape(-1, 1, 8, 8))
    labels = torch.from_numpy(y)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    for step in range(80):
        rows = slice((step * 64) % TRAIN_ROWS, (step * 64) % TRAIN_ROWS + 64)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(images[rows]), labels[rows])
        loss.backward()
        optimizer.step()
    return net.eval()
