#!/usr/bin/env python3
"""Regenerate the figures of docs/concepts.md and docs/training.md from the planted Clever-Hans digits (about 20 s
on a CPU).

    python scripts/concept_figures.py    # docs/img/crp_conditional.png, crp_references.png, clever_hans_finetune.png

Prints the numbers the pages quote: the watermark concept's relevance on watermarked vs clean "4"s, and the
fine-tuning's before/after/control accuracy on clean "4"s and watermark relevance share.
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
from dynamiclrp import clever_hans, concepts, viz  # noqa: E402

LAYER = "features.2"  # the second convolution of DigitsCNN: 16 channels


def conditional_figure(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """One watermarked "4": its heatmap, and the conditional heatmaps of the four most relevant channels."""
    x = x.clone().requires_grad_(True)
    out = model(x)[:, clever_hans.CLASS]
    scores = concepts.concept_relevance(out, LAYER, model=model)
    top = scores.top(4)
    (full,) = dynamiclrp.relevance(out, x, model=model)
    (per,) = concepts.conditional_relevance(out, x, [{LAYER: [u]} for u, _ in top], model=model)
    share = scores.normalized()[0]
    images = [x[0, 0].detach(), viz.heatmap(full[0])] + [viz.heatmap(per[k, 0]) for k in range(len(top))]
    titles = ["input", f"heatmap (R = {float(out.detach()):.2f})"] + [
        f"channel {u}: {float(share[u]):.0%}" for u, _ in top]
    viz.grid(images, ncols=len(images), titles=titles, cell_size=1.9, path=path,
             suptitle=f"Conditional heatmaps of a watermarked \"4\" through channels of {LAYER}")
    print(f"concept relevance of {LAYER} for this sample: {[(u, round(v, 3)) for u, v in top]}")


def reference_figure(model: torch.nn.Module, path: Path) -> None:
    data = clever_hans.test_set()
    marks = clever_hans.watermarked().numpy()
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "clever_hans.zarr"
        dynamiclrp.attribute_dataset(model, data, target="label", out=store, concepts=[LAYER], progress=False)
        group = dynamiclrp.dataset.open_store(store)
        rel = np.asarray(group[f"concepts/{LAYER}/relevance"][:])
        target = np.asarray(group["target"][:])
        fours = target == clever_hans.CLASS
        gap = rel[marks].mean(0) - rel[fours & ~marks].mean(0)
        mark_unit = int(np.argmax(gap))
        shape_unit = int(np.argmax(rel[fours & ~marks].mean(0) - np.maximum(gap, 0)))
        print(f"watermark concept: channel {mark_unit} (mean relevance {rel[marks].mean(0)[mark_unit]:.2f} on "
              f"watermarked 4s, {rel[fours & ~marks].mean(0)[mark_unit]:.2f} on clean 4s); shape concept: channel "
              f"{shape_unit}")
        rows = {}
        for unit in (mark_unit, shape_unit):
            for by in ("relevance", "activation"):
                refs = concepts.reference_samples(store, LAYER, k=6, by=by)
                got = concepts.reference_heatmaps(model, data, refs, [unit], store=store, frac=0.5)[unit]
                share = float(marks[[r.index for r in got]].mean())
                rows[f"ch {unit}, {by}\n({share:.0%} marked)"] = got
        concepts.plot_references(rows, path=path, cell_size=1.5,
                                 title=f"Reference samples of two channels of {LAYER} (cropped conditional heatmaps)")


def finetune_figure(path: Path) -> None:
    model = clever_hans.model(fraction=1.0)
    tuned = clever_hans.fine_tune(model, penalty=1.0)
    control = clever_hans.fine_tune(model, penalty=0.0)
    numbers = {name: clever_hans.evaluate(m) for name, m in (("before", model), ("after", tuned),
                                                               ("control", control))}
    for name, v in numbers.items():
        print(f"{name:8s} clean-4 accuracy {v['accuracy_clean']:.3f}  test accuracy {v['accuracy']:.3f}  "
              f"watermark share {v['watermark_share']:+.3f}")
    _, _, xt, yt = dynamiclrp.demo.load_digits_split(0)
    x = clever_hans.add_watermark(xt[yt == clever_hans.CLASS][:5])
    images, titles = [], []
    for name, m in (("before", model), ("after", tuned)):
        xi = x.clone().requires_grad_(True)
        logits = m(xi)
        (r,) = dynamiclrp.relevance(logits[:, clever_hans.CLASS], xi, model=m)
        share = r[..., :2, :2].sum((1, 2, 3)) / r.sum((1, 2, 3))
        for k in range(len(x)):
            images.append(viz.overlay(x[k, 0], r[k, 0], alpha=0.7))
            titles.append(f"{name}: {float(share[k]):+.0%} on mark")
    b, a = numbers["before"], numbers["after"]
    viz.grid(images, ncols=len(x), titles=titles, cell_size=1.7, path=path,
             suptitle=(f"Watermarked 4s before and after fine-tuning with a relevance penalty\nclean-4 accuracy "
                       f"{b['accuracy_clean']:.0%} → {a['accuracy_clean']:.0%}, watermark share "
                       f"{b['watermark_share']:.0%} → {a['watermark_share']:.0%}"))


def main() -> int:
    torch.set_num_threads(1)
    out = ROOT / "docs" / "img"
    model = clever_hans.model()
    data = clever_hans.test_set()
    sample = data.tensors[0][clever_hans.watermarked()][:1]
    conditional_figure(model, sample, out / "crp_conditional.png")
    reference_figure(model, out / "crp_references.png")
    finetune_figure(out / "clever_hans_finetune.png")
    print(f"wrote {out}/crp_conditional.png, crp_references.png, clever_hans_finetune.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
