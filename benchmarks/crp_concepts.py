#!/usr/bin/env python3
"""Many concepts at once: conditional heatmaps of N channels of one ResNet-18 layer for one image (issue 15).

    python benchmarks/crp_concepts.py                   # 32 channels of layer3.0.conv2, 64x64 input, 3 repeats
    python benchmarks/crp_concepts.py --concepts 64 --size 128

Three ways, one intra-op thread, random weights, EpsilonPlusFlat, best of ``--repeats``:

* ``vmap``: ``dynamiclrp.concepts.conditional_relevance`` — one forward pass, one relevance pass vectorised over the
  concepts (the part of the graph above the conditioned layer runs once);
* ``loop``: the same with ``vectorize=False`` — one relevance pass per concept over the same graph;
* ``repeat batch``: zennit-crp's way — the input repeated once per concept, one concept per batch row (forward
  pass included, since it is a new batch).

All three give the same heatmaps (checked: max difference printed relative to the largest value).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torchvision  # noqa: E402

import dynamiclrp  # noqa: E402
from dynamiclrp import concepts, presets  # noqa: E402
from dynamiclrp.conditions import channels  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--layer", default="layer3.0.conv2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    x = torch.randn(1, 3, args.size, args.size)
    rules = presets.epsilon_plus_flat()
    n, layer = args.concepts, args.layer

    def ours(vectorize: bool) -> tuple[float, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        out = net(xi)[:, 3]
        t = time.perf_counter()
        (h,) = concepts.conditional_relevance(out, xi, [{layer: [k]} for k in range(n)], rules=rules, model=net,
                                              vectorize=vectorize)
        return time.perf_counter() - t, h[:, 0]

    def repeat_batch() -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        xi = x.repeat(n, 1, 1, 1).requires_grad_(True)
        out = net(xi)[:, 3]
        (h,) = dynamiclrp.relevance(out, xi, rules=rules, model=net,
                                    conditions={layer: channels([[k] for k in range(n)])})
        return time.perf_counter() - t, h

    results = {}
    for name, f in (("vmap", lambda: ours(True)), ("loop", lambda: ours(False)), ("repeat batch", repeat_batch)):
        times = []
        for _ in range(args.repeats):
            dt, h = f()
            times.append(dt)
        results[name] = (min(times), h)
    ref = results["vmap"][1]
    print(f"{n} channels of {layer}, ResNet-18, 1x3x{args.size}x{args.size}, one thread")
    for name, (dt, h) in results.items():
        diff = float((h - ref).abs().max() / ref.abs().max())
        print(f"  {name:13s} {dt:7.3f} s   {n / dt:7.1f} concepts/s   max rel. difference to vmap {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
