"""Property-based fuzzing (issue 16): random graphs of routing, linear, convolution, pooling, padding, residual,
element-wise and attention-like ops, with and without biases, trainable and frozen, under every preset.

For every graph (:mod:`dynamiclrp.testing.fuzz`, which documents each property):

* no exception other than a documented :class:`~dynamiclrp.errors.DynamicLRPError` — a value the graph truly does
  not hold (``ValueUnavailableError``: a constant autograd did not keep, ``x + 0.5``, a ``where``/``masked_fill``/
  ``F.pad`` fill value, a softmax's row offset; or the input of a saturated activation);
* ``relevance()`` = ``explain().relevance`` for the input and for the parameters requested with it;
* the ledger closes: ``unaccounted ≈ 0`` (1e-8 of the relevance involved, float64) with nothing in
  ``ledger.unmeasured`` (entries there are accepted only in graphs with such a constant, where they name it);
* a frozen copy explained with ``model=`` gives the trainable model's relevance (1e-7), and closes too;
* LRP-0 = gradient × input on piecewise-linear graphs (1e-9).

The default run checks 200 + 60 graphs with a fixed seed (deterministic, about 10 s). The slow test draws fresh
graphs (``DYNAMICLRP_FUZZ_EXAMPLES``, default 2000). Long runs that count failures instead of stopping at the
first::

    python -m dynamiclrp.testing.fuzz --graphs 20000 --seed 100000
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamiclrp.testing import fuzz

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check(data: st.DataObject, **kw) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1), label="weights seed")
    case = fuzz.build(fuzz.DrawChoices(data), seed=seed, **kw)
    fuzz.check(case)


@settings(max_examples=200, derandomize=True, **_COMMON)
@given(st.data())
def test_random_graphs_every_preset_trainable_and_frozen(data: st.DataObject) -> None:
    _check(data)


@settings(max_examples=60, derandomize=True, **_COMMON)
@given(st.data())
def test_lrp0_is_gradient_times_input_on_random_piecewise_linear_graphs(data: st.DataObject) -> None:
    _check(data, presets=("zero",), pl_only=True)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("DYNAMICLRP_FUZZ_EXAMPLES", "2000")), **_COMMON)
@given(st.data())
def test_random_graphs_long_run(data: st.DataObject) -> None:
    _check(data)


def test_the_generator_covers_what_the_issue_lists() -> None:
    """Over a few hundred graphs the generator produces every op family the issue names, biases with and without,
    frozen and trainable models, every preset, and piecewise-linear graphs for the LRP-0 property."""
    seen: set[str] = set()
    presets, frozen, pl = set(), set(), 0
    for s in range(400):
        case = fuzz.build(fuzz.RandomChoices(s), seed=s)
        seen.update(op.split("@")[0].split("(")[0] for op in case.ops)
        presets.add(case.preset)
        frozen.add(case.frozen)
        pl += case.piecewise_linear
    ops = " ".join(sorted(seen))
    for family in ("flip", "slice", "index", "cat", "linear", "conv", "maxpool", "avgpool", "pad_zero", "ZeroPad2d",
                   "residual_conv", "residual_mlp", "relu", "tanh", "sigmoid", "attention", "batchnorm", "pair_max",
                   "sub_amax", "softmax", "layernorm"):
        assert family in ops, family
    assert any("b1" in op for op in seen) and any("b0" in op for op in seen)  # biases and no biases
    assert presets == set(fuzz.PRESETS) and frozen == {True, False} and pl > 40


def test_a_failure_is_reported_with_the_case() -> None:
    case = fuzz.build(fuzz.RandomChoices(0), seed=0)
    case.x = case.x.detach()  # no graph: an undocumented error must be reported, not swallowed
    with pytest.raises(fuzz.PropertyFailure, match="error:DynamicLRPError") as err:
        fuzz.check(case)
    assert "ops:" in str(err.value)
