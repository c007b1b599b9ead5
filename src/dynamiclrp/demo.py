"""The README demo's ingredients, offline and in seconds: scikit-learn's 8×8 digits and a tiny CNN trained on them,
and a one-layer transformer trained on synthetic movie reviews. ``dynamiclrp demo`` (:mod:`dynamiclrp.cli.demo`) puts
them together."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DigitsCNN", "SentimentTransformer", "load_digits_split", "train_digits_cnn", "make_reviews",
           "train_sentiment", "encode_words"]


# ==============================================================================================================
# models
# ==============================================================================================================
class DigitsCNN(nn.Module):
    """Two 3×3 convolutions with ReLU, 2×2 max pooling and a two-layer classifier, for 1×8×8 digits."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SentimentTransformer(nn.Module):
    """Token embedding + learned positions → one transformer encoder layer → masked mean → linear (2 classes).

    ``forward`` takes ``input_ids`` or ``inputs_embeds`` (like a Hugging Face model) and an ``attention_mask``.
    """

    def __init__(self, vocab: int, d_model: int = 32, heads: int = 4, max_len: int = 16, n_classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model, padding_idx=0)
        self.positions = nn.Parameter(0.02 * torch.randn(1, max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embedding(input_ids)
        n, length = inputs_embeds.shape[:2]
        mask = (torch.ones(n, length, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None
                else attention_mask.bool())
        h = self.encoder(inputs_embeds + self.positions[:, :length], src_key_padding_mask=~mask)
        w = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


# ==============================================================================================================
# data and training
# ==============================================================================================================
def _bar(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return iterable
    return tqdm(iterable, leave=False, **kwargs)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` float tensors in ``[0, 1]``, split into train and test.

    Returns
    -------
    x_train, y_train, x_test, y_test : torch.Tensor
    """
    from .extras import require

    load_digits = require("sklearn.datasets", "dynamiclrp.demo.load_digits_split").load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _train(model: nn.Module, batches: Any, epochs: int, lr: float, seed: int, progress: bool, desc: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in _bar(range(epochs), progress, desc=desc, unit="epoch"):
        for args, y in batches(gen):
            opt.zero_grad()
            loss_fn(model(*args), y).backward()
            opt.step()
    model.eval()


def train_digits_cnn(x: Tensor, y: Tensor, *, epochs: int = 6, seed: int = 0, progress: bool = True) -> DigitsCNN:
    """Train :class:`DigitsCNN` with Adam (batch 64); a few seconds on a laptop CPU. Returns it in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN()

    def batches(gen: torch.Generator) -> Any:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            yield (x[idx],), y[idx]

    _train(model, batches, epochs, 5e-3, seed, progress, "training the digits CNN")
    return model


POSITIVE = ("great", "good", "excellent", "wonderful", "fun", "brilliant", "superb", "enjoyable")
NEGATIVE = ("bad", "awful", "boring", "terrible", "dull", "poor", "weak", "horrible")
NEUTRAL = ("the", "movie", "film", "plot", "acting", "was", "is", "and", "a", "very", "story", "cast", "ending",
           "really", "quite", "music", "it", "this", "but", "too")
VOCAB = ("[PAD]", *POSITIVE, *NEGATIVE, *NEUTRAL)


def make_reviews(n: int, seed: int = 0, max_len: int = 10) -> tuple[list[list[str]], Tensor]:
    """Synthetic reviews: neutral words with one to three sentiment words; the label is the majority sentiment.

    Returns
    -------
    sentences : list of list of str
    labels : torch.Tensor
        1 for positive, 0 for negative.
    """
    rng = np.random.default_rng(seed)
    sentences, labels = [], []
    while len(sentences) < n:
        n_pos, n_neg = rng.integers(0, 3, size=2)
        if n_pos == n_neg:
            continue
        length = int(rng.integers(max(4, n_pos + n_neg + 2), max_len + 1))
        words = list(rng.choice(NEUTRAL, size=length - n_pos - n_neg))
        for w in list(rng.choice(POSITIVE, size=n_pos)) + list(rng.choice(NEGATIVE, size=n_neg)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        sentences.append([str(w) for w in words])
        labels.append(int(n_pos > n_neg))
    return sentences, torch.tensor(labels)


def encode_words(sentences: list[list[str]], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Word ids (0 = padding) and attention mask for :data:`VOCAB`."""
    index = {w: i for i, w in enumerate(VOCAB)}
    length = length or max(len(s) for s in sentences)
    ids = torch.zeros(len(sentences), length, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, :len(s)] = torch.tensor([index[w] for w in s])
    return ids, (ids != 0).long()


def train_sentiment(*, n_train: int = 1000, epochs: int = 8, seed: int = 0, progress: bool = True
                    ) -> SentimentTransformer:
    """Train :class:`SentimentTransformer` on :func:`make_reviews`; a few seconds. Returns it in eval mode."""
    sentences, labels = make_reviews(n_train, seed=seed)
    ids, mask = encode_words(sentences)
    torch.manual_seed(seed)
    model = SentimentTransformer(len(VOCAB))

    def batches(gen: torch.Generator) -> Any:
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(labels), 50):
            idx = perm[i:i + 50]
            yield (ids[idx], mask[idx]), labels[idx]

    _train(model, batches, epochs, 5e-3, seed, progress, "training the sentiment transformer")
    return model
