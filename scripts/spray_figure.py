#!/usr/bin/env python3
"""Regenerate the SpRAy figures of docs/dataset.md from the planted Clever-Hans digits (about 15 s on a CPU).

    python scripts/spray_figure.py            # writes docs/img/spray_clever_hans.png and docs/img/class_means.png

Prints the clustering's agreement with the planted watermark (purity, adjusted Rand index).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dynamiclrp  # noqa: E402
from dynamiclrp import analysis, clever_hans  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    out = ROOT / "docs" / "img"
    model = clever_hans.model()
    data = clever_hans.test_set()
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "clever_hans.zarr"
        dynamiclrp.attribute_dataset(model, data, target="label", out=store, progress=False)
        result = analysis.spray(store, label=clever_hans.CLASS)
        means = analysis.class_means(store)
    marks = clever_hans.watermarked().numpy().astype(int)[result.indices]
    purity = sum(np.bincount(marks[result.clusters == c]).max() for c in range(result.n_clusters)) / len(marks)
    from sklearn.metrics import adjusted_rand_score
    print(f"{result.n_clusters} clusters of sizes {result.cluster_sizes.tolist()}; watermark share per cluster "
          f"{[round(float(marks[result.clusters == c].mean()), 2) for c in range(result.n_clusters)]}; "
          f"purity {purity:.3f}; adjusted Rand index {adjusted_rand_score(marks, result.clusters):.3f}")
    images = data.tensors[0][:, 0].numpy()
    result.figure(out / "spray_clever_hans.png", images=images, examples=5,
                  title=f"SpRAy on the heatmaps of class {clever_hans.CLASS} (half of them carry the watermark)")
    analysis.plot_class_means(means, out / "class_means.png")
    print(f"wrote {out / 'spray_clever_hans.png'} and {out / 'class_means.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
