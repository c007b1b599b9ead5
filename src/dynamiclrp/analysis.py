"""Dataset-wide analysis of relevance: SpRAy and per-class mean relevance maps.

Spectral Relevance Analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing what
machines really learn", Nat. Commun. 10:1096) clusters the heatmaps of many samples of one class. Samples that a
model classifies *for the same reason* have similar heatmaps, so the clusters are the model's strategies; a small
cluster whose relevance sits on a spurious feature (a watermark, a frame, a copyright tag) exposes a "Clever Hans"
strategy without looking at thousands of heatmaps. The steps follow the paper:

1. heatmaps summed over channels, downsampled (area averaging) and normalised per sample;
2. a symmetric k-nearest-neighbour affinity graph between the heatmaps;
3. the eigenvalues of its normalised graph Laplacian; the largest gap among the first ones (the *eigengap*)
   picks the number of clusters;
4. spectral clustering (scikit-learn) with that number;
5. a 2-D embedding (t-SNE, or UMAP if installed) to look at the clusters.

Inputs are stores written by :func:`dynamiclrp.attribute_dataset` (or arrays of heatmaps). Needs scikit-learn
(``pip install 'dynamiclrp[analysis]'``); figures need matplotlib.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["SprayResult", "spray", "class_means", "plot_class_means", "heatmaps"]

def _sklearn() -> Any:
    from .extras import require
    return require("sklearn", "SpRAy (dynamiclrp.analysis)")


def _figure(figsize: tuple[float, float]) -> Any:
    from .extras import require
    require("matplotlib", "dynamiclrp.analysis figures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ==============================================================================================================
# reading heatmaps
# ==============================================================================================================
def _open(store: Any) -> Any:
    if isinstance(store, (str, os.PathLike)):
        from .dataset import open_store
        return open_store(store)
    return store


def heatmaps(relevance: Any, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Relevance ``(N, ...)`` as float64 maps: ``(N, C, H, W)`` summed over channels, area-downsampled to ``size``.

    Parameters
    ----------
    relevance : array-like
        ``(N, C, H, W)``, ``(N, H, W)`` (e.g. stored with ``reduce="channels"``) or ``(N, L)`` (tokens).
    size : int or (int, int), optional
        Target height and width of 2-D maps (area averaging, like ``torch.nn.functional.adaptive_avg_pool2d``);
        ``None`` keeps them.

    Returns
    -------
    numpy.ndarray
        ``(N, H', W')`` or ``(N, L)``.
    """
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 4:
        r = r.sum(1)
    if r.ndim not in (2, 3):
        raise ValueError(f"heatmaps need (N, C, H, W), (N, H, W) or (N, L) relevance, got shape {r.shape}; store "
                         "relevance with reduce='channels' or reduce='hidden'")
    if size is not None and r.ndim == 3:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(r.shape[1:]) != hw:
            r = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(r)[:, None], hw)[:, 0].numpy()
    return r


def _select(group: Any, by: str, label: int | None) -> np.ndarray:
    if by not in ("label", "target", "prediction"):
        raise ValueError(f"by must be 'label', 'target' or 'prediction', got {by!r}")
    values = np.asarray(group[by][:])
    if label is None:
        return np.arange(len(values))
    idx = np.flatnonzero(values == label)
    if len(idx) == 0:
        present = np.unique(values[values >= 0]).tolist()
        raise ValueError(f"no sample has {by} == {label}; {by}s in the store: {present[:20]}"
                         + (" (the store has no labels: use by='target' or by='prediction')"
                            if by == "label" and not present else ""))
    return idx


def _normalise(h: np.ndarray, how: str | None) -> np.ndarray:
    flat = h.reshape(len(h), -1)
    if how is None:
        return h
    if how == "max":
        scale = np.abs(flat).max(1)
    elif how == "l2":
        scale = np.linalg.norm(flat, axis=1)
    else:
        raise ValueError(f"normalise must be 'max', 'l2' or None, got {how!r}")
    scale = np.where(scale > 0, scale, 1.0)
    return h / scale.reshape(-1, *([1] * (h.ndim - 1)))


# ==============================================================================================================
# SpRAy
# ==============================================================================================================
@dataclass
class SprayResult:
    """The result of :func:`spray`.

    Attributes
    ----------
    indices : numpy.ndarray
        Store index of each analysed sample.
    heatmaps : numpy.ndarray
        Their downsampled, normalised heatmaps (what was clustered), ``(n, H, W)`` or ``(n, L)``.
    clusters : numpy.ndarray
        Cluster of each sample, ``0 .. n_clusters-1``, numbered by decreasing size.
    n_clusters : int
        Number of clusters (the eigengap's choice unless given).
    eigenvalues : numpy.ndarray
        Smallest eigenvalues of the normalised Laplacian of the affinity graph, ascending.
    eigengap : numpy.ndarray
        ``eigengap[k-1] = eigenvalues[k] - eigenvalues[k-1]``; without ``n_clusters`` the number of clusters is the
        ``k`` in ``2 .. max_clusters`` with the largest gap.
    embedding : numpy.ndarray or None
        2-D embedding ``(n, 2)`` (t-SNE or UMAP), ``None`` if not asked for.
    label : int or None
        The analysed class.
    by : str
        Which array selected it (``"label"``, ``"target"`` or ``"prediction"``).
    """

    indices: np.ndarray
    heatmaps: np.ndarray
    clusters: np.ndarray
    n_clusters: int
    eigenvalues: np.ndarray
    eigengap: np.ndarray
    embedding: np.ndarray | None
    label: int | None
    by: str

    @property
    def cluster_sizes(self) -> np.ndarray:
        """Samples per cluster."""
        return np.bincount(self.clusters, minlength=self.n_clusters)

    @property
    def cluster_means(self) -> np.ndarray:
        """Mean heatmap of each cluster, ``(n_clusters, ...)``."""
        return np.stack([self.heatmaps[self.clusters == c].mean(0) for c in range(self.n_clusters)])

    def members(self, cluster: int) -> np.ndarray:
        """Store indices of the samples of ``cluster``, the most typical first (closest to the cluster mean)."""
        mask = self.clusters == cluster
        h = self.heatmaps[mask].reshape(int(mask.sum()), -1)
        dist = np.linalg.norm(h - h.mean(0), axis=1)
        return self.indices[mask][np.argsort(dist, kind="stable")]

    def figure(self, path: str | os.PathLike | None = None, *, examples: int = 6, images: Any = None,
               cmap: str = "bwr", title: str | None = None) -> Any:
        """Plot the analysis: eigenvalues, the embedding, and per cluster its mean heatmap and example members.

        Parameters
        ----------
        path : path-like, optional
            Save the figure there (PNG by extension).
        examples : int
            Members shown per cluster (the most typical ones).
        images : array-like, optional
            The inputs, indexed by store sample index (``(N, H, W)`` or ``(N, C, H, W)``); shown in grey under the
            members' heatmaps.
        cmap : str
            Diverging matplotlib colour map (red: relevance for the class, blue: against).
        title : str, optional
            Figure title.

        Returns
        -------
        matplotlib.figure.Figure
        """
        k = self.n_clusters
        is_map = self.heatmaps.ndim == 3
        rows = k * (2 if images is not None and is_map else 1)
        cols = 1 + examples
        fig = _figure((max(7.0, 1.25 * cols), 2.8 + 1.3 * rows))
        top, bottom = fig.subfigures(2, 1, height_ratios=[2.6, 1.3 * rows])
        ax_e, ax_m = top.subplots(1, 2)
        n_ev = len(self.eigenvalues)
        ax_e.plot(np.arange(1, n_ev + 1), self.eigenvalues, "o-", color="black", markersize=4)
        ax_e.axvline(k + 0.5, color="#d62728", linestyle="--", linewidth=1)
        ax_e.set_xlabel("index")
        ax_e.set_ylabel("eigenvalue")
        ax_e.set_title(f"Laplacian spectrum (eigengap: {k} clusters)", fontsize=9)
        colours = [f"C{c % 10}" for c in range(k)]
        if self.embedding is not None:
            for c in range(k):
                e = self.embedding[self.clusters == c]
                ax_m.scatter(e[:, 0], e[:, 1], s=10, color=colours[c], label=f"cluster {c} ({len(e)})")
            ax_m.legend(fontsize=7, loc="best")
            ax_m.set_xticks([])
            ax_m.set_yticks([])
            ax_m.set_title("2-D embedding of the heatmaps", fontsize=9)
        else:
            ax_m.axis("off")
        axes = np.atleast_2d(bottom.subplots(rows, cols, squeeze=False))
        means = self.cluster_means
        for c in range(k):
            r = c * (2 if images is not None and is_map else 1)
            members = self.members(c)[:examples]
            pos = {int(i): j for j, i in enumerate(self.indices)}
            cells = [(means[c], f"cluster {c}: mean\n{self.cluster_sizes[c]} samples")]
            cells += [(self.heatmaps[pos[int(i)]], f"#{int(i)}") for i in members]
            for j in range(cols):
                ax = axes[r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(cells):
                    ax.axis("off")
                    continue
                h, name = cells[j]
                _show(ax, h, cmap)
                ax.set_title(name, fontsize=7, color=colours[c] if j == 0 else "black")
            if images is not None and is_map:
                axes[r + 1, 0].axis("off")
                for j, i in enumerate(members, start=1):
                    img = np.asarray(images[int(i)], dtype=np.float64)
                    img = img.mean(0) if img.ndim == 3 else img
                    axes[r + 1, j].imshow(img, cmap="gray_r" if img.mean() < 0.5 else "gray")
                    axes[r + 1, j].set_xticks([])
                    axes[r + 1, j].set_yticks([])
                for j in range(len(members) + 1, cols):
                    axes[r + 1, j].axis("off")
        what = f"{self.by} {self.label}" if self.label is not None else "all samples"
        fig.suptitle(title or f"SpRAy: {len(self.indices)} heatmaps of {what}", fontsize=10)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
        return fig


def _show(ax: Any, h: np.ndarray, cmap: str) -> None:
    v = float(np.abs(h).max()) or 1.0
    if h.ndim == 1:
        ax.imshow(h[None], cmap=cmap, vmin=-v, vmax=v, aspect="auto")
    else:
        ax.imshow(h, cmap=cmap, vmin=-v, vmax=v)


def _affinity(x: np.ndarray, n_neighbors: int) -> Any:
    from sklearn.neighbors import kneighbors_graph
    knn = kneighbors_graph(x, n_neighbors=n_neighbors, mode="connectivity", include_self=False)
    return 0.5 * (knn + knn.T)  # symmetric, as in the paper


def _spectrum(affinity: Any, count: int) -> np.ndarray:
    from scipy.sparse.csgraph import laplacian
    lap = laplacian(affinity, normed=True)
    n = lap.shape[0]
    if n <= 2000:
        ev = np.linalg.eigvalsh(lap.toarray())
    else:  # the smallest few of a large sparse graph
        from scipy.sparse.linalg import eigsh
        ev = eigsh(lap.tocsc(), k=min(count, n - 1), sigma=-1e-3, which="LM", return_eigenvectors=False)
    return np.sort(np.clip(ev, 0.0, None))[:count]


def spray(store: Any, label: int | None = None, *, by: Literal["label", "target", "prediction"] = "label",
          size: int | tuple[int, int] | None = None, normalise: Literal["max", "l2"] | None = "max",
          n_clusters: int | None = None, max_clusters: int = 8, n_neighbors: int | None = None,
          embedding: Literal["tsne", "umap"] | None = "tsne", seed: int = 0) -> SprayResult:
    """Spectral Relevance Analysis (SpRAy) of the heatmaps of one class.

    Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing what machines really learn",
    Nat. Commun. 10:1096: cluster the heatmaps with spectral clustering on a k-nearest-neighbour graph, choose the
    number of clusters by the eigengap of the graph Laplacian, and embed them in 2-D. Each cluster is a strategy
    of the model; small clusters with relevance on unexpected features are candidates for "Clever Hans"
    behaviour.

    Parameters
    ----------
    store : path, zarr.Group or array-like
        A store of :func:`dynamiclrp.attribute_dataset`, or relevance ``(N, ...)`` (then ``label`` must be
        ``None``: every row is analysed).
    label : int, optional
        The class to analyse: samples whose ``by`` equals it. ``None``: every sample.
    by : {"label", "target", "prediction"}
        Which stored array selects the samples.
    size : int or (int, int), optional
        Downsample 2-D heatmaps to this size first (the paper uses small maps, e.g. 32×32); default: as stored.
    normalise : {"max", "l2"} or None
        Scale each heatmap by its largest absolute value (default) or its norm, so the clustering compares
        where relevance is, not how much.
    n_clusters : int, optional
        Number of clusters; default: the eigengap's choice among ``2 .. max_clusters``.
    max_clusters : int
        Largest number of clusters the eigengap considers.
    n_neighbors : int, optional
        Neighbours in the affinity graph (default ``max(5, round(sqrt(n)))``, at most ``n - 1``).
    embedding : {"tsne", "umap"} or None
        2-D embedding for the figure: scikit-learn's t-SNE, or UMAP (``pip install umap-learn``).
    seed : int
        Seed of the clustering and the embedding.

    Returns
    -------
    SprayResult
        Clusters, spectrum, embedding; ``result.figure(path)`` draws them.

    Raises
    ------
    ValueError
        No sample selected, too few samples, or invalid options.
    ImportError
        scikit-learn (or umap-learn for ``embedding="umap"``) is missing.

    Examples
    --------
    >>> from dynamiclrp import analysis
    >>> result = analysis.spray("relevance.zarr", label=4, size=16)        # doctest: +SKIP
    >>> result.n_clusters, result.cluster_sizes                            # doctest: +SKIP
    >>> result.figure("spray_class4.png")                                  # doctest: +SKIP
    """
    _sklearn()
    from sklearn.cluster import SpectralClustering

    if isinstance(store, (np.ndarray, torch.Tensor)):
        if label is not None:
            raise ValueError("label selects samples of a store; with an array of relevance pass label=None")
        rel = store.detach().cpu().numpy() if isinstance(store, torch.Tensor) else store
        idx = np.arange(len(rel))
    else:
        group = _open(store)
        idx = _select(group, by, label)
        rel = group["relevance"].get_orthogonal_selection((idx,)) if len(idx) < group["relevance"].shape[0] \
            else group["relevance"][:]
    h = _normalise(heatmaps(rel, size), normalise)
    n = len(h)
    if n < 4:
        raise ValueError(f"SpRAy needs at least 4 heatmaps, got {n}")
    if max_clusters < 2:
        raise ValueError(f"max_clusters must be >= 2, got {max_clusters}")
    x = h.reshape(n, -1)
    k_nn = n_neighbors if n_neighbors is not None else max(5, int(round(np.sqrt(n))))
    k_nn = max(1, min(k_nn, n - 1))
    affinity = _affinity(x, k_nn)
    ev = _spectrum(affinity, min(max_clusters + 1, n))
    gap = np.diff(ev)
    if n_clusters is None:
        candidates = gap[1:max_clusters]  # gaps after 2 .. max_clusters eigenvalues
        k = int(np.argmax(candidates)) + 2 if len(candidates) else 2
    else:
        if not 1 <= n_clusters <= n:
            raise ValueError(f"n_clusters must be between 1 and the number of samples ({n}), got {n_clusters}")
        k = int(n_clusters)
    if k == 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        with warnings.catch_warnings():  # a disconnected graph means well separated strategies: fine here
            warnings.filterwarnings("ignore", message="Graph is not fully connected")
            labels = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                        assign_labels="kmeans", n_init=10).fit_predict(affinity)
    # number clusters by decreasing size (ties: by first member), so results read the same run after run
    sizes = np.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], int(np.flatnonzero(labels == c)[0]) if sizes[c] else n))
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    labels = relabel[labels]
    emb = _embed(x, embedding, seed) if embedding is not None else None
    return SprayResult(indices=idx, heatmaps=h, clusters=labels, n_clusters=k, eigenvalues=ev, eigengap=gap,
                       embedding=emb, label=label, by=by)


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count: numba (UMAP) sets the OpenMP thread count of the whole process."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _embed(x: np.ndarray, how: str, seed: int) -> np.ndarray:
    with _torch_threads_kept():
        return _embed_2d(x, how, seed)


def _embed_2d(x: np.ndarray, how: str, seed: int) -> np.ndarray:
    n = len(x)
    if how == "tsne":
        from sklearn.manifold import TSNE
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if how == "umap":
        from .extras import require
        umap = require("umap", "embedding='umap' (or use embedding='tsne')")
        return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed).fit_transform(x)
    raise ValueError(f"embedding must be 'tsne', 'umap' or None, got {how!r}")


# ==============================================================================================================
# class means
# ==============================================================================================================
def class_means(store: Any, *, by: Literal["label", "target", "prediction"] = "label",
                size: int | tuple[int, int] | None = None, normalise: Literal["max", "l2"] | None = None,
                chunk: int = 4096) -> dict[int, np.ndarray]:
    """Mean relevance map of each class (summed over channels), read chunk by chunk.

    Parameters
    ----------
    store : path or zarr.Group
        A store of :func:`dynamiclrp.attribute_dataset`.
    by : {"label", "target", "prediction"}
        Which stored array defines the classes (samples with ``-1`` there are skipped).
    size : int or (int, int), optional
        Downsample the maps (area averaging).
    normalise : {"max", "l2"} or None
        Normalise each heatmap before averaging (``None``: plain mean of the relevance).
    chunk : int
        Samples read at a time.

    Returns
    -------
    dict of int to numpy.ndarray
        Class -> mean map, in class order.
    """
    group = _open(store)
    if by not in ("label", "target", "prediction"):
        raise ValueError(f"by must be 'label', 'target' or 'prediction', got {by!r}")
    classes = np.asarray(group[by][:])
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    rel = group["relevance"]
    for start in range(0, len(classes), chunk):
        h = _normalise(heatmaps(rel[start:start + chunk], size), normalise)
        cls = classes[start:start + chunk]
        for c in np.unique(cls):
            if c < 0:
                continue
            m = cls == c
            sums[int(c)] = sums.get(int(c), 0.0) + h[m].sum(0)
            counts[int(c)] = counts.get(int(c), 0) + int(m.sum())
    if not sums:
        raise ValueError(f"no sample has a {by} (all are -1): use by='target' or by='prediction'")
    return {c: sums[c] / counts[c] for c in sorted(sums)}


def plot_class_means(means: dict[int, np.ndarray], path: str | os.PathLike | None = None, *,
                     names: Sequence[str] | None = None, cmap: str = "bwr", ncols: int = 10) -> Any:
    """Plot :func:`class_means` side by side (each map on its own symmetric colour scale).

    Returns
    -------
    matplotlib.figure.Figure
    """
    keys = list(means)
    ncols = max(1, min(ncols, len(keys)))
    nrows = -(-len(keys) // ncols)
    fig = _figure((1.3 * ncols, 1.5 * nrows + 0.4))
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    for j, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= len(keys):
            ax.axis("off")
            continue
        _show(ax, np.asarray(means[keys[j]]), cmap)
        ax.set_title(names[j] if names is not None else f"class {keys[j]}", fontsize=8)
    fig.suptitle("mean relevance per class", fontsize=9)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
