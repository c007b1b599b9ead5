#!/usr/bin/env python3
"""Frozen = trainable: relevance of every zoo model with all parameters frozen vs trainable, per preset.

For each zoo entry (and attention implementation) and each preset, in float64: the relevance of the top-class
output w.r.t. the input with trainable parameters (the reference) and with ``model.requires_grad_(False)``
(inputs requiring grad, as users run explanations), the max-normalised difference, and the frozen ledger
(unaccounted share of the seed, unmeasured entries). Usage::

    .venv/bin/python scripts/frozen_parity.py [--entries llama,resnet] [--presets epsilon,attnlrp] [--model]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.testing import zoo

VISION = {"convnext", "resnet", "tv_vgg16", "tv_resnet50", "tv_densenet121", "tv_mobilenet_v3_small",
          "tv_efficientnet_b0", "tv_efficientnet_v2_s", "unet", "cnn_bn"}


def preset_list(name: str) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("epsilon", "epsilon"), ("zero", "zero"), ("attnlrp", "attnlrp"),
                                     ("cplrp", "cplrp")]
    if name in VISION:
        out += [(n, n) for n in ("epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
                                 "epsilon_alpha2_beta1_flat")]
        out.append(("epsilon_gamma_box", presets.epsilon_gamma_box(-3.0, 3.0)))
    return out


def run(entry_name: str, impl: str | None, wanted: set[str] | None, pass_model: bool) -> list[str]:
    rows = []
    entry = zoo.build(entry_name, attn_implementation=impl)
    model = entry.model.double().eval()
    frozen = copy.deepcopy(model).requires_grad_(False)
    for pname, rules in preset_list(entry_name):
        if wanted and pname not in wanted:
            continue
        tag = f"{entry_name}{'/' + impl if impl else ''} {pname}"
        try:
            entry.model = model
            out, x = entry.run()
            (ref,) = dynamiclrp.relevance(out, x, rules=rules)
        except Exception as err:  # noqa: BLE001
            rows.append(f"{tag:42s} trainable FAILS {type(err).__name__}: {str(err)[:120]}")
            continue
        try:
            entry.model = frozen
            out, x = entry.run()
            kw = {"model": frozen} if pass_model else {}
            t0 = time.perf_counter()
            ex = dynamiclrp.explain(out, x, rules=rules, **kw)
            got = ex.relevance[0]
            dt = time.perf_counter() - t0
            (got2,) = dynamiclrp.relevance(out, x, rules=rules, **kw) if pass_model else dynamiclrp.relevance(
                out, x, rules=rules)
        except Exception as err:  # noqa: BLE001
            rows.append(f"{tag:42s} frozen FAILS {type(err).__name__}: {str(err)[:160]}")
            continue
        scale = ref.abs().max().item() or 1.0
        diff = (got - ref).abs().max().item() / scale
        diff2 = (got2 - ref).abs().max().item() / scale
        seed = float(ex.ledger.seed_total)
        unacc = float(ex.unaccounted) / (abs(seed) or 1.0)
        um = len(ex.ledger.unmeasured)
        rows.append(f"{tag:42s} diff {max(diff, diff2):.1e}  unaccounted {unacc:+.1e}  unmeasured {um}  "
                    f"({dt:.2f}s)")
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", default="")
    ap.add_argument("--presets", default="")
    ap.add_argument("--model", action="store_true", help="pass model= to explain/relevance")
    args = ap.parse_args(argv)
    names = args.entries.split(",") if args.entries else zoo.names()
    wanted = set(args.presets.split(",")) if args.presets else None
    torch.set_default_dtype(torch.float64)
    for name in names:
        impls = zoo.attention_implementations(name) or [None]
        for impl in impls:
            try:
                for row in run(name, impl, wanted, args.model):
                    print(row, flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"{name}/{impl} BUILD FAILS {type(err).__name__}: {err}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
