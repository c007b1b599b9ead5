"""Model and data of the dataset-attribution tests, loaded by ``dynamiclrp attribute --model/--data`` in
subprocesses (plain and under torchrun) and imported by the tests, so every process explains the same job."""
from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset, TensorDataset

from dynamiclrp import demo


def model() -> torch.nn.Module:
    """The digits CNN with seeded random weights, in eval mode and frozen, as users run it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = demo.DigitsCNN()
    return net.eval().requires_grad_(False)


def data(n: int = 300) -> TensorDataset:
    """The first ``n`` of scikit-learn's digits (images and labels)."""
    x, y, xt, yt = demo.load_digits_split()
    return TensorDataset(torch.cat([x, xt])[:n], torch.cat([y, yt])[:n])


class Slow(Dataset):
    """:func:`data`, read slowly (``DLRP_TEST_DELAY`` seconds per sample) so that a test can kill the job mid-run."""

    def __init__(self) -> None:
        self.inner = data()
        self.delay = float(os.environ.get("DLRP_TEST_DELAY", "0.004"))

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return self.inner[i]
