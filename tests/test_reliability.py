"""Reliability (issue 16): every bad input a clear error, every odd-but-valid input a correct answer.

Each test is one case of the issue, reproduced standalone with the issue's setup (``m = Sequential(Linear(4, 8),
ReLU(), Linear(8, 3))``, ``out = m(x)[:, 0]``) unless it needs another model. The property-based sweep over random
graphs is ``tests/test_fuzz.py``.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp import presets, rules
from dynamiclrp.errors import (DynamicLRPError, RuleError, UnsupportedOperationError, UnsupportedTensorError,
                               UnusedInputError)

DT = torch.float64
ALL_PRESETS = ["epsilon", "zero", "attnlrp", "cplrp", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
               "epsilon_alpha2_beta1_flat", "epsilon_gamma_box", "paper"]


def _rules(name: str):
    return presets.epsilon_gamma_box(-3.0, 3.0) if name == "epsilon_gamma_box" else name


def mlp(dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype).eval()


def _x(*shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _closes(ex: dynamiclrp.Explanation, tol: float = 1e-9) -> None:
    assert not ex.ledger.unmeasured, ex.ledger.unmeasured
    assert abs(ex.unaccounted) <= tol * max(1.0, abs(ex.ledger.seed_total)), ex.ledger.summary()


# -----------------------------------------------------------------------------------------------------------
# 1. inference_mode around the call, graph built outside it
# -----------------------------------------------------------------------------------------------------------
def test_relevance_inside_inference_mode_on_a_graph_built_outside() -> None:
    m = mlp()
    x = _x(5, 4)
    out = m(x)[:, 0]
    (ref,) = dynamiclrp.relevance(out, x)
    ex_ref = dynamiclrp.explain(out, x)
    with torch.inference_mode():
        seeds = torch.ones(5, dtype=DT)  # an inference tensor
        (got,) = dynamiclrp.relevance(out, x)
        ex = dynamiclrp.explain(out, x)
        (seeded,) = dynamiclrp.relevance(out, x, seeds=seeds)
        (batched,) = dynamiclrp.Explainer().relevance(out, x)
    assert torch.equal(got, ref) and torch.equal(ex.relevance[0], ex_ref.relevance[0]) and torch.equal(batched, ref)
    assert not got.is_inference()  # ordinary tensors: usable outside inference mode
    (ones,) = dynamiclrp.relevance(out, x, seeds=torch.ones(5, dtype=DT))
    assert torch.equal(seeded, ones)
    _closes(ex)


def test_a_forward_inside_inference_mode_still_gets_its_own_error() -> None:
    m = mlp()
    x = _x(5, 4)
    with torch.inference_mode():
        out = m(x)[:, 0]
    with pytest.raises(DynamicLRPError, match="inference_mode"):
        dynamiclrp.relevance(out, x)


# -----------------------------------------------------------------------------------------------------------
# 2. seeds as Python numbers
# -----------------------------------------------------------------------------------------------------------
def test_python_number_seeds() -> None:
    m = mlp()
    x = _x(5, 4)
    out = m(x)[:, 0]
    (ref,) = dynamiclrp.relevance(out, x, seeds=torch.full((5,), 2.5, dtype=DT))
    for seeds in (2.5, [2.5], (2.5,)):
        (got,) = dynamiclrp.relevance(out, x, seeds=seeds)
        assert torch.equal(got, ref)
    (one,) = dynamiclrp.relevance(out, x, seeds=1)  # an int too
    assert torch.equal(one, dynamiclrp.relevance(out, x, seeds=torch.ones(5, dtype=DT))[0])
    # one number for several outputs: each output seeded with it
    o2 = m(x)[:, 1]
    both = dynamiclrp.relevance([out, o2], x, seeds=2.5)[0]
    sep = dynamiclrp.relevance([out, o2], x, seeds=[torch.full((5,), 2.5, dtype=DT)] * 2)[0]
    assert torch.equal(both, sep)
    mixed = dynamiclrp.relevance([out, o2], x, seeds=[2.5, None])[0]
    assert torch.equal(mixed, dynamiclrp.relevance([out, o2], x, seeds=[torch.full((5,), 2.5, dtype=DT),
                                                                        o2.detach()])[0])


@pytest.mark.parametrize("bad, err, match", [
    (True, TypeError, "seeds must be"), ("1.0", TypeError, "seeds must be"), ({1: 2}, TypeError, "seeds must be"),
    (float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"), ([1.0, 2.0], ValueError, "2 seeds"),
    (["a"], TypeError, r"seeds\[0\] must be a tensor, a number or None"),
])
def test_bad_seeds_are_clear_errors(bad, err, match) -> None:
    m = mlp()
    x = _x(5, 4)
    with pytest.raises(err, match=match):
        dynamiclrp.relevance(m(x)[:, 0], x, seeds=bad)


# -----------------------------------------------------------------------------------------------------------
# 3. rule parameters validated at construction
# -----------------------------------------------------------------------------------------------------------
def test_alpha_beta_accepts_float_rounding_of_alpha_minus_beta() -> None:
    assert 2.2 - 1.2 != 1.0  # the case: exact comparison rejected a valid rule
    r = rules.AlphaBeta(2.2, 1.2)
    assert (r.alpha, r.beta) == (2.2, 1.2)
    rules.AlphaBeta(1, 0)  # ints
    m = mlp()
    x = _x(5, 4)
    ex = dynamiclrp.explain(m(x)[:, 0], x, rules=presets.epsilon().with_families(linear=r))
    assert torch.isfinite(ex.relevance[0]).all()


@pytest.mark.parametrize("make, match", [
    (lambda: rules.AlphaBeta("2", "1"), "alpha must be a real number"),
    (lambda: rules.AlphaBeta(2.0, None), "beta must be a real number"),
    (lambda: rules.AlphaBeta(True, False), "alpha must be a real number"),
    (lambda: rules.AlphaBeta(2.0, 1.5), "alpha - beta must equal 1"),
    (lambda: rules.AlphaBeta(float("inf"), float("inf")), "alpha must be finite"),
    (lambda: rules.AlphaBeta(0.5, -0.5), "alpha and beta must both be >= 0"),
    (lambda: rules.Gamma(float("nan")), "gamma must be >= 0 and finite, got nan"),
    (lambda: rules.Gamma(float("inf")), "gamma must be >= 0 and finite, got inf"),
    (lambda: rules.Gamma(-0.1), "gamma must be >= 0"),
    (lambda: rules.Gamma("0.25"), "gamma must be a number >= 0"),
    (lambda: rules.Epsilon(float("nan")), "stabilizer"),
    (lambda: rules.Epsilon(float("inf")), "stabilizer must be >= 0 and finite"),
    (lambda: rules.Epsilon("1e-6"), "stabilizer must be a float >= 0 or a callable"),
    (lambda: rules.Epsilon(-1e-6), "stabilizer must be >= 0"),
    (lambda: rules.ZPlus(stabilizer=True), "stabilizer must be a float >= 0 or a callable"),
    (lambda: rules.ZBox(float("nan"), 1.0), "low must be finite"),
    (lambda: rules.ZBox(0.0, float("inf")), "high must be finite"),
    (lambda: rules.ZBox(torch.tensor([0.0, float("nan")]), 1.0), "low must be finite"),
    (lambda: rules.ZBox(1.0, 0.0), "low <= high"),
    (lambda: rules.MagnitudeSplit(float("nan")), "stabilizer"),
    (lambda: rules.Product(normalisers="yes"), "normalisers"),
    (lambda: presets.epsilon(float("nan")), "stabilizer"),
    (lambda: presets.epsilon_gamma_box(-1.0, 1.0, gamma=float("nan")), "gamma must be >= 0 and finite"),
])
def test_rule_parameters_are_validated_at_construction(make, match) -> None:
    with pytest.raises(RuleError, match=match):
        make()


# -----------------------------------------------------------------------------------------------------------
# 4. sparse and complex tensors
# -----------------------------------------------------------------------------------------------------------
def test_sparse_input_is_a_clear_error() -> None:
    m = mlp(torch.float32)
    xs = torch.randn(5, 4).to_sparse().requires_grad_()
    with pytest.raises(UnsupportedTensorError, match=r"inputs\[0\] is a sparse_coo tensor.*to_dense"):
        dynamiclrp.relevance(m(xs)[:, 0], xs)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_complex_tensors_are_clear_errors() -> None:
    lin = nn.Linear(4, 3).to(torch.complex64)
    xc = torch.randn(5, 4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(UnsupportedTensorError, match=r"inputs\[0\] is complex.*real-valued"):
        dynamiclrp.relevance(lin(xc)[:, 0].abs(), xc)
    m = mlp(torch.float32)
    with pytest.raises(UnsupportedTensorError, match="complex"):
        dynamiclrp.relevance(m(xc.abs())[:, 0], xc)
    with pytest.raises(UnsupportedTensorError, match=r"outputs\[0\] is complex"):
        dynamiclrp.relevance(lin(xc)[:, 0], xc)
    x = _x(5, 4, dtype=torch.float32)
    with pytest.raises(UnsupportedTensorError, match=r"seeds\[0\] is complex"):
        dynamiclrp.relevance(m(x)[:, 0], x, seeds=torch.ones(5, dtype=torch.complex64))
    assert issubclass(UnsupportedTensorError, DynamicLRPError)


# -----------------------------------------------------------------------------------------------------------
# 5. in-place squeeze_(dims): SqueezeBackward5
# -----------------------------------------------------------------------------------------------------------
def test_inplace_squeeze_with_dims() -> None:
    lin = nn.Linear(4, 2).to(DT)
    x = _x(5, 1, 4, 1)
    h = x * 1.0
    h.squeeze_((1, 3))
    assert type(h.grad_fn).__name__ == "SqueezeBackward5"
    y = lin(h)[:, 0]
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    torch.testing.assert_close(r, g * x.detach(), rtol=1e-12, atol=1e-14)
    _closes(dynamiclrp.explain(y, x))


def test_inplace_squeeze_under_vmap() -> None:
    lin = nn.Linear(4, 2).to(DT)

    def f(row: torch.Tensor) -> torch.Tensor:
        h = row * 2.0
        h.squeeze_((0,))
        return lin(h)

    x = _x(5, 1, 4)
    y = torch.vmap(f)(x)[:, 0]
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    torch.testing.assert_close(r, g * x.detach(), rtol=1e-12, atol=1e-14)


def test_inplace_transpose_t_() -> None:
    x = _x(4, 5)
    w = torch.randn(4, 3, dtype=DT)
    h = x * 1.0
    h.t_()
    assert type(h.grad_fn).__name__ == "TBackward1"
    y = (h @ w)[:, 0]
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    torch.testing.assert_close(r, g * x.detach(), rtol=1e-12, atol=1e-14)


# -----------------------------------------------------------------------------------------------------------
# 6. inputs not in the graph; a whole logits matrix (issue 13, item 8)
# -----------------------------------------------------------------------------------------------------------
def test_an_input_sliced_after_the_forward_raises_like_autograd() -> None:
    m = mlp()
    x = _x(5, 4)
    out = m(x)[:, 0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out[0], x[0], retain_graph=True)
    with pytest.raises(UnusedInputError, match=r"inputs\[0\] is not in the graph.*slice.*x\[0\].*allow_unused"):
        dynamiclrp.relevance(out[0], x[0])
    with pytest.raises(UnusedInputError):
        dynamiclrp.explain(out[0], x[0])
    with pytest.raises(UnusedInputError):
        dynamiclrp.Explainer().relevance(out[0], x[0])
    with pytest.raises(UnusedInputError):
        dynamiclrp.Explainer().explain(out[0], x[0])
    (z,) = dynamiclrp.relevance(out[0], x[0], allow_unused=True)
    assert z.shape == (4,) and torch.count_nonzero(z) == 0
    # the fix the message suggests: the tensor the model saw, then index
    (full,) = dynamiclrp.relevance(out[0], x)
    assert torch.count_nonzero(full[1:]) == 0 and torch.count_nonzero(full[0]) > 0


def test_copies_and_unrelated_tensors_raise_and_allow_unused_gives_zeros() -> None:
    m = mlp()
    x = _x(5, 4)
    out = m(x)[:, 0]
    for t in (x.clone(), x.detach().clone().requires_grad_(), _x(3)):
        with pytest.raises(UnusedInputError):
            dynamiclrp.relevance(out, [x, t])
        rx, rt = dynamiclrp.relevance(out, [x, t], allow_unused=True)
        assert torch.count_nonzero(rt) == 0 and rt.shape == t.shape
        assert torch.equal(rx, dynamiclrp.relevance(out, x)[0])
    ex = dynamiclrp.explain(out, [x, _x(3)], allow_unused=True)
    _closes(ex)
    with pytest.raises(TypeError, match="allow_unused"):
        dynamiclrp.relevance(out, x, allow_unused="yes")


def test_a_whole_logits_matrix_with_the_default_seed_warns() -> None:
    m = mlp()
    x = _x(5, 4)
    logits = m(x)
    with pytest.warns(UserWarning, match=r"sum of all its 3 entries.*logits\[:, c\]"):
        (r,) = dynamiclrp.relevance(logits, x)
    (parts,) = dynamiclrp.relevance([logits[:, c] for c in range(3)], x)
    torch.testing.assert_close(r, parts, rtol=1e-12, atol=1e-14)  # it is the sum of the classes, as documented
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynamiclrp.relevance(logits[:, 0], x)
        dynamiclrp.relevance(logits.gather(1, torch.zeros(5, 1, dtype=torch.long)), x)
        dynamiclrp.relevance(logits, x, seeds=logits.detach())  # on purpose: no warning
        dynamiclrp.relevance(logits.sum(1), x)


# -----------------------------------------------------------------------------------------------------------
# 7. NaN in an input the model masks out
# -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_nan_in_a_masked_out_input_gets_zero_relevance(preset: str) -> None:
    m = mlp()
    raw = torch.randn(5, 4, dtype=DT)
    raw[0, 1] = float("nan")
    raw[3, 2] = float("inf")
    x = raw.clone().requires_grad_(True)
    bad = ~torch.isfinite(raw)
    out = m(torch.where(bad, 0, x))[:, 0]
    assert torch.isfinite(out).all()
    (r,) = dynamiclrp.relevance(out, x, rules=_rules(preset))
    assert torch.isfinite(r).all(), r
    assert (r[bad] == 0).all()
    # the same as explaining the cleaned input where it was finite
    clean = torch.where(bad, 0, raw).requires_grad_(True)
    (ref,) = dynamiclrp.relevance(m(clean)[:, 0], clean, rules=_rules(preset))
    torch.testing.assert_close(r[~bad], ref[~bad], rtol=1e-12, atol=1e-14)
    ex = dynamiclrp.explain(out, x, rules=_rules(preset))
    assert torch.equal(ex.relevance[0], r)
    assert math.isfinite(ex.unaccounted) and not ex.ledger.unmeasured


# -----------------------------------------------------------------------------------------------------------
# 8. weights passed as plain tensors (torch.func.functional_call)
# -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_functional_call_with_plain_tensor_weights_equals_eager(preset: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(15, 8), nn.ReLU(),
                      nn.Linear(8, 3)).to(DT).eval()
    x = _x(4, 2, 5)
    (ref,) = dynamiclrp.relevance(m(x)[:, 0], x, rules=_rules(preset))
    params = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    out = torch.func.functional_call(m, params, (x,))[:, 0]
    (got,) = dynamiclrp.relevance(out, x, rules=_rules(preset))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    ex = dynamiclrp.explain(out, x, rules=_rules(preset))
    torch.testing.assert_close(ex.relevance[0], ref, rtol=1e-12, atol=1e-14)
    _closes(ex)
    # nn.Parameter-wrapped tensors say it explicitly, and their relevance can be requested as for the model
    wrapped = {k: nn.Parameter(v.detach().clone()) for k, v in m.named_parameters()}
    out = torch.func.functional_call(m, wrapped, (x,))[:, 0]
    rx, rb = dynamiclrp.relevance(out, [x, wrapped["5.bias"]], rules=_rules(preset))
    ex_rx, ex_rb = dynamiclrp.relevance(m(x)[:, 0], [x, m[5].bias], rules=_rules(preset))
    torch.testing.assert_close(rx, ex_rx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rb, ex_rb, rtol=1e-12, atol=1e-14)


def test_plain_tensors_are_data_where_no_data_meets_them() -> None:
    # x @ y with both plain tensors requested: two inputs, the bilinear rule (half each), as before
    x, y = _x(3, 4), _x(4, 2)
    out = (x @ y)[:, 0]
    rx, ry = dynamiclrp.relevance(out, [x, y], rules="zero")
    torch.testing.assert_close(rx.sum() + ry.sum(), out.detach().sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rx.sum(), ry.sum(), rtol=1e-12, atol=1e-14)
    # a plain weight used by a layer whose other operand carries data is a weight: x gets all of it
    (r_only,) = dynamiclrp.relevance((x @ y)[:, 0], x, rules="zero")
    torch.testing.assert_close(r_only.sum(), out.detach().sum(), rtol=1e-12, atol=1e-14)
    # a constant times a plain tensor: the plain tensor is the data
    c = torch.randn(3, 4, dtype=DT)
    (ry,) = dynamiclrp.relevance((c @ y)[:, 0], y, rules="zero")
    torch.testing.assert_close(ry.sum(), (c @ y)[:, 0].detach().sum(), rtol=1e-12, atol=1e-14)


# -----------------------------------------------------------------------------------------------------------
# 9. full backward hooks
# -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_full_backward_hooks_are_identities_and_never_fire(preset: str) -> None:
    m = mlp()
    hooked = copy.deepcopy(m)
    fired: list[str] = []
    hooked[0].register_full_backward_hook(lambda *a: fired.append("full"))
    hooked[2].register_full_backward_pre_hook(lambda *a: fired.append("pre"))
    hooked.register_full_backward_hook(lambda *a: fired.append("outer"))
    x = _x(5, 4)
    (ref,) = dynamiclrp.relevance(m(x)[:, 0], x, rules=_rules(preset))
    out = hooked(x)[:, 0]
    assert "BackwardHookFunctionBackward" in {type(n).__name__ for n in _nodes(out)}
    (got,) = dynamiclrp.relevance(out, x, rules=_rules(preset))
    assert torch.equal(got, ref)
    _closes(dynamiclrp.explain(out, x, rules=_rules(preset)))
    frozen = copy.deepcopy(hooked).requires_grad_(False)
    out = frozen(x)[:, 0]
    (fr,) = dynamiclrp.relevance(out, x, rules=_rules(preset), model=frozen)
    torch.testing.assert_close(fr, ref, rtol=1e-12, atol=1e-14)
    _closes(dynamiclrp.explain(out, x, rules=_rules(preset), model=frozen))
    assert fired == []
    out.sum().backward()  # the hooks still work for the user's own backward
    assert fired


def _nodes(t: torch.Tensor) -> list:
    seen, todo = [], [t.grad_fn]
    while todo:
        n = todo.pop()
        if n is None or any(n is s for s in seen):
            continue
        seen.append(n)
        todo.extend(c for c, _ in n.next_functions)
    return seen


# -----------------------------------------------------------------------------------------------------------
# 10. reentrant checkpointing: supported now (issue 11: the checkpointed function is re-expressed), so registering
# Routing for it is never needed; both modes equal the plain model, frozen too
# -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_either_way_equals_the_plain_model(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    m = mlp()
    x = _x(5, 4)
    (ref,) = dynamiclrp.relevance(m(x)[:, 0], x)
    ex = dynamiclrp.explain(checkpoint(m, x, use_reentrant=reentrant)[:, 0], x)
    torch.testing.assert_close(ex.relevance[0], ref, rtol=1e-12, atol=1e-14)
    _closes(ex)
    frozen = copy.deepcopy(m).requires_grad_(False)
    exf = dynamiclrp.explain(checkpoint(frozen, x, use_reentrant=reentrant)[:, 0], x, model=frozen)
    torch.testing.assert_close(exf.relevance[0], ref, rtol=1e-12, atol=1e-14)
    _closes(exf)


# -----------------------------------------------------------------------------------------------------------
# 11-15. Ledgers that did not close
# -----------------------------------------------------------------------------------------------------------
def _both(out_fn, x, preset, model=None):
    """relevance() and explain() of ``out_fn()`` (a fresh forward each), checked equal; returns the explanation."""
    (r,) = dynamiclrp.relevance(out_fn(), x, rules=_rules(preset), model=model)
    ex = dynamiclrp.explain(out_fn(), x, rules=_rules(preset), model=model)
    torch.testing.assert_close(ex.relevance[0], r, rtol=1e-10, atol=1e-12)
    return ex


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_exact_cancellation(preset: str) -> None:
    torch.manual_seed(1)
    t0 = _x(3, 4)
    w1, w2 = torch.randn(5, 4, dtype=DT), torch.randn(5, 4, dtype=DT)

    def out():
        t1 = -t0
        return (F.linear(t1, w1) + F.linear(t1 + t0, w2))[:, 0]  # t1 + t0 is exactly 0

    ex = _both(out, t0, preset)
    _closes(ex)
    if preset == "zero":  # LRP-0: gradient × input, here -w1[0]·t0
        torch.testing.assert_close(ex.relevance[0], -(w1[0] * t0.detach()), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("preset", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon", "epsilon_alpha2_beta1_flat",
                                    "paper"])
@pytest.mark.parametrize("pad", ["ZeroPad2d", "F.pad", "F.pad value=0.5"])
def test_relevance_sent_to_a_padded_border_is_booked_as_padding(preset: str, pad: str) -> None:
    torch.manual_seed(0)
    padder = {"ZeroPad2d": nn.ZeroPad2d(1), "F.pad": lambda t: F.pad(t, (1, 1, 1, 1)),
              "F.pad value=0.5": lambda t: F.pad(t, (1, 1, 1, 1), value=0.5)}[pad]
    conv, head = nn.Conv2d(3, 4, 3).to(DT), nn.Linear(4 * 6 * 6, 2).to(DT)
    x = _x(2, 3, 6, 6)

    def out():
        return head(torch.relu(conv(padder(x))).flatten(1))[:, 0]

    ex = _both(out, x, preset)
    _closes(ex)
    kinds = ex.ledger.by_kind()
    if preset.endswith("flat") or preset == "epsilon_gamma_box" or pad.endswith("0.5"):
        # flat / z^B send explicit relevance to every input position, border included; a non-zero fill value holds
        # relevance even in gradient form
        assert abs(kinds.get("padding", 0.0)) > 1e-6, ex.ledger.summary()
        assert any(s.kind == "padding" and "ConstantPadNd" in s.where for s in ex.ledger.sinks)
    # the same with a frozen model: same relevance, closing ledger
    frozen = nn.ModuleList([conv, head]).requires_grad_(False)
    exf = _both(out, x, preset, model=frozen)
    torch.testing.assert_close(exf.relevance[0], ex.relevance[0], rtol=1e-9, atol=1e-12)
    _closes(exf)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_saturated_tanh_of_a_maximum(preset: str, dtype: torch.dtype) -> None:
    m = mlp(dtype)
    torch.manual_seed(2)
    a, b = _x(5, 4, dtype=dtype), _x(5, 4, dtype=dtype)

    def out():
        return m(torch.tanh(torch.maximum(a * 40, b * 40)))[:, 0]  # most of the tanh saturates at ±1

    assert (torch.tanh(torch.maximum(a * 40, b * 40)).abs() == 1).float().mean() > 0.5
    (r,) = dynamiclrp.relevance(out(), (a, b), rules=_rules(preset))[:1]
    ex = dynamiclrp.explain(out(), (a, b), rules=_rules(preset))
    torch.testing.assert_close(ex.relevance[0], r, rtol=1e-5, atol=1e-6)
    _closes(ex, 1e-9 if dtype == DT else 1e-5)


def test_a_saturated_activation_whose_input_is_lost_books_what_it_cannot_pass() -> None:
    # tanh(x·k + 0.5): the constant 0.5 is not kept, so tanh's input is known only by inverting its output, which is
    # impossible where tanh saturated: that relevance stops there, and the ledger names it
    m = mlp()
    x = _x(5, 4)
    out = m(torch.tanh(x * 40 + 0.5))[:, 0]
    ex = dynamiclrp.explain(out, x)
    _closes(ex)
    assert any(s.kind == "rule" and "TanhBackward0" in s.where and s.total != 0 for s in ex.ledger.sinks)
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(out, x)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_head_of_sigmoid_of_a_shifted_input_is_measured(preset: str) -> None:
    # the sigmoid saved its output, so its input x + 0.5 is known (its inverse), and the constant 0.5 with it
    torch.manual_seed(3)
    head = nn.Linear(4, 3).to(DT)
    x = _x(5, 4)
    ex = _both(lambda: head(torch.sigmoid(x + 0.5))[:, 0], x, preset)
    _closes(ex)
    frozen = copy.deepcopy(head).requires_grad_(False)
    exf = _both(lambda: frozen(torch.sigmoid(x + 0.5))[:, 0], x, preset, model=frozen)
    torch.testing.assert_close(exf.relevance[0], ex.relevance[0], rtol=1e-9, atol=1e-12)
    _closes(exf)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_shift_by_the_row_maximum(preset: str, frozen: bool) -> None:
    torch.manual_seed(4)
    head = nn.Linear(4, 3).to(DT)
    x = _x(5, 4)
    model = copy.deepcopy(head).requires_grad_(False) if frozen else head

    def out():
        z = x * 2.0
        return model(z - z.amax(1, keepdim=True))[:, 0]

    ex = _both(out, x, preset, model=model if frozen else None)
    _closes(ex)
    if frozen:
        ref = _both(lambda: head((x * 2.0) - (x * 2.0).amax(1, keepdim=True))[:, 0], x, preset)
        torch.testing.assert_close(ex.relevance[0], ref.relevance[0], rtol=1e-9, atol=1e-12)


class _RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _TinyLM(nn.Module):
    """Embedding, a hand-written RMSNorm (weight multiplied in), LayerNorm, a gated MLP, a layer scale."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = _RMSNorm(6)
        self.ln = nn.LayerNorm(6)
        self.up, self.gate, self.down = nn.Linear(6, 8), nn.Linear(6, 8, bias=False), nn.Linear(8, 6)
        self.scale = nn.Parameter(torch.rand(6))
        self.head = nn.Linear(6, 3)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.norm(e))
        h = h + self.scale * self.down(self.up(h) * F.silu(self.gate(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("preset", ["epsilon", "zero", "attnlrp", "cplrp", "epsilon_plus"])
def test_functional_call_with_norms_products_and_embeddings_equals_eager(preset: str) -> None:
    torch.manual_seed(5)
    m = _TinyLM().to(DT).eval()
    ids = torch.randint(0, 11, (2, 4))
    e = m.emb(ids).detach().requires_grad_(True)
    (ref,) = dynamiclrp.relevance(m(e)[:, 0], e, rules=preset)
    params = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    out = torch.func.functional_call(m, params, (e,))[:, 0]
    (got,) = dynamiclrp.relevance(out, e, rules=preset)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    _closes(dynamiclrp.explain(torch.func.functional_call(m, params, (e,))[:, 0], e, rules=preset))


def test_a_plain_tensor_that_meets_no_data_stays_data() -> None:
    # y + c: a plain leaf added to a constant (a decoder's input embeddings plus fixed positions) is data, so the
    # product with the network's activation is a product of two activations (the uniform rule), as before
    torch.manual_seed(6)
    lin = nn.Linear(4, 4).to(DT)
    x, y = _x(3, 4), _x(3, 4)
    c = torch.randn(3, 4, dtype=DT)
    out = (lin(x) * (y + c)).sum(1)
    rx, ry = dynamiclrp.relevance(out, [x, y], rules="zero")
    (rx_only,) = dynamiclrp.relevance(out, x, rules="zero")
    torch.testing.assert_close(rx_only, rx, rtol=1e-12, atol=1e-14)  # requesting y changes nothing for x
    assert ry.abs().sum() > 0
