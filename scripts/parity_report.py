"""Print the Zennit parity numbers quoted in the README and the issue notes.

For each of the five composites and each model of ``tests/reference/zennit_harness.py`` (float64): the maximum
relative error max|ours - Zennit| / max|Zennit| against Zennit with an exact BatchNorm merge and against stock
Zennit. Usage: ``.venv/bin/python scripts/parity_report.py`` (about a minute on 2 cores).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_zennit_parity as T  # noqa: E402  (the parity tests' own helpers)
from reference import zennit_harness as zh  # noqa: E402

COMPOSITES = ("epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat")


def main() -> int:
    torch.set_num_threads(1)
    print(f"{'model':12s} {'composite':28s} {'vs exact merge':>15s} {'vs stock Zennit':>16s}")
    for model_name in T.MODELS:
        for composite in COMPOSITES:
            model, x = T.model_and_input(model_name)
            got = T.ours(model, x, T.preset(composite, model_name))
            kw = T.composite_kwargs(composite)
            _, exact = zh.zennit_forward_and_attribution(model, x, T.TARGET, composite,
                                                         canonizers=T.exact_canonizers(model), **kw)
            _, stock = zh.zennit_forward_and_attribution(model, x, T.TARGET, composite, **kw)
            print(f"{model_name:12s} {composite:28s} {T.rel_err(got, exact):15.2e} {T.rel_err(got, stock):16.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
