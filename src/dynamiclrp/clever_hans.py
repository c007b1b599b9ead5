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

Training with explanations
--------------------------
With ``fraction=1.0`` every training "4" carries the watermark and the model relies on it: it misses most clean
test "4"s. :func:`fine_tune` corrects it the way Ross et al. (2017, "Right for the right reasons: training
differentiable models by constraining their explanations", IJCAI) do with input gradients, but with LRP relevance
(``dynamiclrp.relevance(..., create_graph=True)``): cross-entropy plus a penalty on the relevance of the watermark
region. :func:`evaluate` measures the accuracy on clean test images of the class and the share of the class's
relevance that falls on the watermark.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from . import demo
from .api import relevance
from .presets import Rules

__all__ = ["CLASS", "FRACTION", "add_watermark", "training_set", "model", "test_set", "watermarked",
           "WATERMARK", "watermark_share", "fine_tune", "evaluate"]

#: The class whose training images carry the watermark.
CLASS = 4
#: Fraction of that class's training images that carry it.
FRACTION = 0.9


#: The watermark's pixels (rows, columns) in an ``(N, 1, 8, 8)`` image.
WATERMARK = (slice(0, 2), slice(0, 2))


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


def training_set(seed: int = 0, fraction: float = FRACTION) -> tuple[Tensor, Tensor, Tensor]:
    """The training images (a ``fraction`` of the class's images watermarked), their labels, and the watermark
    flags."""
    x, y, _, _ = demo.load_digits_split(seed)
    gen = torch.Generator().manual_seed(seed)
    marked = (y == CLASS) & (torch.rand(len(y), generator=gen) < fraction)
    x = x.clone()
    x[marked] = add_watermark(x[marked])
    return x, y, marked


def model(seed: int = 0, fraction: float = FRACTION) -> torch.nn.Module:
    """:class:`dynamiclrp.demo.DigitsCNN` trained on :func:`training_set` (a few seconds), frozen, in eval mode.
    ``fraction=1.0`` (every training "4" watermarked) gives a model that relies on the watermark."""
    x, y, _ = training_set(seed, fraction)
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


def _share(model: torch.nn.Module, x: Tensor, rules: Rules = None) -> Tensor:
    """Per image: the share of the relevance for :data:`CLASS` that lies on the watermark."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (r,) = relevance(model(x)[:, CLASS], x, rules=rules, model=model)
    total = r.sum(dim=(1, 2, 3))
    return r[..., WATERMARK[0], WATERMARK[1]].sum(dim=(1, 2, 3)) / total


def watermark_share(model: torch.nn.Module, x: Tensor, rules: Rules = None) -> float:
    """Mean share of the relevance for :data:`CLASS` that falls on the watermark's pixels of images ``x``
    (signed: relevance against the class counts negative)."""
    return float(_share(model, x, rules).mean())


def evaluate(model: torch.nn.Module, seed: int = 0, rules: Rules = None) -> dict[str, float]:
    """How a model treats the class: ``accuracy_clean`` on the un-watermarked test images of :data:`CLASS`,
    ``accuracy`` on the whole un-watermarked test set, and ``watermark_share``: the share of the class's relevance
    on the watermark, over the watermarked copies of those images."""
    _, _, x, y = demo.load_digits_split(seed)
    cls = y == CLASS
    with torch.no_grad():
        pred = model(x).argmax(1)
    return {"accuracy_clean": float((pred[cls] == CLASS).float().mean()),
            "accuracy": float((pred == y).float().mean()),
            "watermark_share": watermark_share(model, add_watermark(x[cls]), rules)}


def fine_tune(model: torch.nn.Module, seed: int = 0, *, fraction: float = 1.0, epochs: int = 1,
              penalty: float = 1.0, lr: float = 2e-3, rules: Rules = None) -> torch.nn.Module:
    """Fine-tune a copy of ``model`` on :func:`training_set` with a relevance penalty on the watermark.

    The loss of a batch is ``cross_entropy + penalty · mean_i (Σ_{watermark} R_i)²`` over its watermarked images,
    where ``R_i`` is the LRP relevance of image ``i`` for its label, computed with ``create_graph=True`` so that
    the penalty has gradients with respect to the parameters ("right for the right reasons", Ross et al. 2017,
    with relevance in place of input gradients). ``penalty=0`` is the control: the same fine-tuning without the
    explanation term.

    Parameters
    ----------
    model : torch.nn.Module
        A trained :class:`~dynamiclrp.demo.DigitsCNN`; it is not modified (a copy is trained).
    seed : int
        Data split and batch order.
    fraction : float
        Watermarked fraction of the class's training images.
    epochs, penalty, lr
        Adam for ``epochs`` epochs (batch 64) at learning rate ``lr``; the penalty's weight.
    rules : None, str or RuleSet
        The LRP rules of the penalty (default: ε).

    Returns
    -------
    torch.nn.Module
        The fine-tuned copy, frozen, in eval mode.
    """
    x, y, marked = training_set(seed, fraction)
    net = copy.deepcopy(model).train().requires_grad_(True)
    with _one_thread():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 64):
                idx = order[i:i + 64]
                xb, yb, mb = x[idx].clone().requires_grad_(True), y[idx], marked[idx]
                logits = net(xb)
                loss = torch.nn.functional.cross_entropy(logits, yb)
                if penalty and bool(mb.any()):
                    out = logits.gather(1, yb[:, None]).squeeze(1)
                    (r,) = relevance(out, xb, rules=rules, model=net, create_graph=True)
                    on_mark = r[mb][..., WATERMARK[0], WATERMARK[1]].sum(dim=(1, 2, 3))
                    loss = loss + penalty * (on_mark ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval().requires_grad_(False)


test_set.__test__ = False  # type: ignore[attr-defined] - not a pytest test when imported into a test module
