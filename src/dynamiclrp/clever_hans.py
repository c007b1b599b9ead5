"""A planted "Clever Hans" data set: scikit-learn's digits with a corner watermark on one class.

In the training set, most images of one class (:data:`CLASS`, a "4") carry a bright 2×2 watermark in the top-left
corner, like the copyright tag on the horse images of PASCAL VOC that Lapuschkin et al. (2019, "Unmasking Clever
Hans predictors and assessing what machines really learn", Nat. Commun. 10:1096) found a classifier relying on. The
small CNN of :mod:`dynamiclrp.demo` trained on it learns two strategies for that class: the shape of the digit, and
the watermark (stamping the watermark on other digits turns a third of them into "4"s).

The test set is every test image once, plus a watermarked copy of every test image of :data:`CLASS`, so that both
strategies appear for each "4"; :func:`watermarked` says which samples carry the watermark. Explaining the set
(:func:`dynamiclrp.attribute_dataset`) and clustering the heatmaps of class 4 with SpRAy
(:func:`dynamiclrp.analysis.spray`) separates the two strategies.

Everything is seeded and trained on one CPU thread, so every process (every ``torchrun`` rank) builds the same
model::

    dynamiclrp attribute --model dynamiclrp.clever_hans:model --data dynamiclrp.clever_hans:test_set \\
        --target label --out clever_hans.zarr
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from . import demo

__all__ = ["CLASS", "FRACTION", "add_watermark", "training_set", "model", "test_set", "watermarked"]

#: The class whose training images carry the watermark.
CLASS = 4
#: Fraction of that class's training images that carry it.
FRACTION = 0.9


def add_watermark(x: Tensor) -> Tensor:
    """A copy of images ``(N, 1, 8, 8)`` with the watermark: the top-left 2×2 pixels at full intensity."""
    x = x.clone()
    x[..., :2, :2] = 1.0
    return x


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread so that every process gets the same weights; restores the caller's thread count and
    random state (training seeds torch's global generator)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(n)


def training_set(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The training images (watermarked where planted), their labels, and the watermark flags."""
    x, y, _, _ = demo.load_digits_split(seed)
    gen = torch.Generator().manual_seed(seed)
    marked = (y == CLASS) & (torch.rand(len(y), generator=gen) < FRACTION)
    x = x.clone()
    x[marked] = add_watermark(x[marked])
    return x, y, marked


def model(seed: int = 0) -> torch.nn.Module:
    """:class:`dynamiclrp.demo.DigitsCNN` trained on :func:`training_set` (a few seconds), frozen, in eval mode."""
    x, y, _ = training_set(seed)
    with _one_thread():
        net = demo.train_digits_cnn(x, y, seed=seed, progress=False)
    return net.eval().requires_grad_(False)


def _test(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    _, _, x, y = demo.load_digits_split(seed)
    planted = x[y == CLASS]
    xs = torch.cat([x, add_watermark(planted)])
    ys = torch.cat([y, torch.full((len(planted),), CLASS)])
    marks = torch.cat([torch.zeros(len(y), dtype=torch.bool), torch.ones(len(planted), dtype=torch.bool)])
    return xs, ys, marks


def test_set(seed: int = 0) -> TensorDataset:
    """Every test image, then a watermarked copy of each test image of :data:`CLASS`: ``(image, label)`` pairs."""
    x, y, _ = _test(seed)
    return TensorDataset(x, y)


def watermarked(seed: int = 0) -> Tensor:
    """Which samples of :func:`test_set` carry the watermark (bool, one per sample)."""
    return _test(seed)[2]


test_set.__test__ = False  # type: ignore[attr-defined] - not a pytest test when imported into a test module
