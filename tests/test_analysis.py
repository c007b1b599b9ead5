"""SpRAy finds the strategies planted in a Clever-Hans data set; the eigengap counts clusters; class means."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dynamiclrp
from dynamiclrp import analysis, clever_hans

pytest.importorskip("sklearn")
pytest.importorskip("zarr")
from sklearn.metrics import adjusted_rand_score  # noqa: E402


def _purity(truth: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of samples in the majority kind of their cluster (1: every cluster is pure)."""
    return sum(np.bincount(truth[clusters == c]).max() for c in np.unique(clusters)) / len(truth)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return clever_hans.model()  # a few seconds; frozen and in eval mode, as users run it


@pytest.fixture(scope="module")
def planted(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    out = tmp_path_factory.mktemp("spray") / "clever_hans.zarr"
    dynamiclrp.attribute_dataset(model, clever_hans.test_set(), target="label", out=out, progress=False)
    return out, model


def test_the_planted_model_is_a_clever_hans(model: torch.nn.Module) -> None:
    """The premise: stamping the watermark on other digits turns many of them into the planted class."""
    x, y = clever_hans.test_set().tensors
    others = x[y != clever_hans.CLASS]
    clean = model(others).argmax(1) == clever_hans.CLASS
    stamped = model(clever_hans.add_watermark(others)).argmax(1) == clever_hans.CLASS
    assert clean.float().mean() < 0.02 and stamped.float().mean() > 0.15  # measured: 0.3 %, 36 %


def test_spray_separates_watermark_from_shape_strategy(planted: tuple[Path, torch.nn.Module],
                                                       tmp_path: Path) -> None:
    store, _ = planted
    marks = clever_hans.watermarked().numpy().astype(int)
    result = analysis.spray(store, label=clever_hans.CLASS)
    truth = marks[result.indices]
    assert len(result.indices) == 2 * int((1 - marks[result.indices]).sum())  # each "4" clean and stamped
    # the eigengap finds several strategies, and no cluster mixes watermark and shape samples
    # (measured on seeds 0-3: 2 to 6 clusters, purity 1.0 each time)
    assert result.n_clusters >= 2
    assert _purity(truth, result.clusters) >= 0.9
    stamped_clusters = {c for c in range(result.n_clusters) if truth[result.clusters == c].mean() > 0.5}
    assert 0 < len(stamped_clusters) < result.n_clusters
    # the watermark clusters put their relevance on the watermark, the shape clusters do not
    corner = np.zeros((8, 8), dtype=bool)
    corner[:2, :2] = True
    for c, mean in enumerate(result.cluster_means):
        share = np.abs(mean[corner]).sum() / np.abs(mean).sum()
        assert (share > 0.1) if c in stamped_clusters else (share < 0.02), (c, share)
    # two clusters: exactly the two strategies (measured adjusted Rand index 1.0 on seeds 0-3)
    two = analysis.spray(store, label=clever_hans.CLASS, n_clusters=2, embedding=None)
    assert adjusted_rand_score(truth, two.clusters) >= 0.8
    assert result.embedding is not None and result.embedding.shape == (len(truth), 2)
    images = clever_hans.test_set().tensors[0][:, 0].numpy()
    fig = result.figure(tmp_path / "spray.png", images=images)
    assert (tmp_path / "spray.png").stat().st_size > 10_000 and len(fig.axes) > 2 * result.n_clusters


def test_class_means_are_the_mean_heatmap_per_class(planted: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    store, _ = planted
    g = dynamiclrp.dataset.open_store(store)
    rel = g["relevance"][:].astype(np.float64).sum(1)
    labels = g["label"][:]
    means = analysis.class_means(store, chunk=100)  # several reads
    assert sorted(means) == list(range(10))
    for c, m in means.items():
        np.testing.assert_allclose(m, rel[labels == c].mean(0), rtol=1e-12, atol=1e-12)
    analysis.plot_class_means(means, tmp_path / "means.png")
    assert (tmp_path / "means.png").stat().st_size > 5_000


def _blobs(n_per: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps of three planted strategies: relevance in the top-left, the centre, or the bottom row."""
    rng = np.random.default_rng(seed)
    maps, kinds = [], []
    for kind, (rows, cols) in enumerate([(slice(0, 3), slice(0, 3)), (slice(3, 5), slice(3, 5)),
                                         (slice(7, 8), slice(0, 8))]):
        for _ in range(n_per):
            h = 0.05 * rng.standard_normal((8, 8))
            h[rows, cols] += 1 + 0.2 * rng.standard_normal()
            maps.append(h)
            kinds.append(kind)
    return np.stack(maps)[:, None], np.array(kinds)


def test_eigengap_counts_planted_strategies() -> None:
    maps, kinds = _blobs()
    result = analysis.spray(maps, embedding=None)
    assert result.n_clusters == 3
    assert adjusted_rand_score(kinds, result.clusters) == 1.0
    assert result.eigenvalues[:3].max() < 0.05 < result.eigenvalues[3]  # three (near) zero eigenvalues
    assert int(np.argmax(result.eigengap[1:8])) + 2 == 3
    assert result.cluster_sizes.tolist() == [30, 30, 30]
    # the most typical member of a cluster is closest to its mean
    m = result.members(0)
    assert len(m) == 30 and set(kinds[m]) == {kinds[m[0]]}


def test_spray_downsampling_and_errors() -> None:
    maps, _ = _blobs(10)
    assert analysis.heatmaps(maps, size=4).shape == (30, 4, 4)
    np.testing.assert_allclose(analysis.heatmaps(maps, size=4).sum((1, 2)) * 4, maps.sum((1, 2, 3)))
    with pytest.raises(ValueError, match="label selects"):
        analysis.spray(maps, label=1)
    with pytest.raises(ValueError, match="at least 4"):
        analysis.spray(maps[:3])


@pytest.mark.slow  # numba compiles UMAP for about a minute
def test_umap_embedding() -> None:
    pytest.importorskip("umap")
    maps, _ = _blobs(10)
    threads = torch.get_num_threads()
    result = analysis.spray(maps, embedding="umap")
    assert result.embedding.shape == (30, 2) and np.isfinite(result.embedding).all()
    assert torch.get_num_threads() == threads  # numba sets the process's OpenMP threads; spray restores torch's
