"""The Promise System recovers forward values autograd did not save — and they equal the true values.

True values are captured independently while the forward pass runs, with a ``TorchFunctionMode`` that records
every tensor an op returns, keyed by the autograd node that produced it. Each recovered value is compared with
the captured one to 1e-6 relative in float32 — except that a value recovered as a difference ``sum − other`` (a
layer's output read back from the residual sum a norm layer saved) is exact only to the rounding of that sum, so
its bound adds 8 units in the last place of ``max |sum|`` (``recover_all(..., scales=True)`` says which sums).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import dynamiclrp
from dynamiclrp.testing.recover import recover_all
from dynamiclrp import rules as L


class Capture(TorchFunctionMode):
    """Records ``{(grad_fn, output_nr): value}`` for every tensor produced during the forward pass."""

    def __init__(self):
        super().__init__()
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.keep: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.keep.append(t.grad_fn)
                self.values[(id(t.grad_fn), t.output_nr)] = t.detach().clone()
        return out


def _bound(ref: torch.Tensor, sums: float) -> float:
    """1e-6 of the value's own scale, plus the rounding of any sum it was recovered from by a difference."""
    return 1e-6 * float(ref.abs().max()) + 8 * torch.finfo(ref.dtype).eps * sums


def assert_matches(recovered, truth: Capture, min_checked: int) -> int:
    checked = 0
    for node, nr, how, value, *sums in recovered:
        ref = truth.values.get((id(node), nr))
        if ref is None:
            continue  # e.g. leaves, or ops whose output the mode did not see
        assert value.shape == ref.shape, (type(node).__name__, how)
        err = float((value.to(ref.dtype) - ref).abs().max())
        bound = max(_bound(ref, sums[0] if sums else 0.0), 1e-30)
        assert err <= bound, f"{type(node).__name__} ({how}): error {err:.2e} > {bound:.2e}"
        checked += 1
    assert checked >= min_checked, f"only {checked} values could be compared"
    return checked


class ResidualMLP(nn.Module):
    def __init__(self, d=8, depth=3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(),
                                                  nn.Linear(2 * d, d)) for _ in range(depth))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        h = torch.cat([h, h.flip(1)], dim=1).view(x.shape[0], 2, -1).mean(1)
        return self.out(torch.tanh(h))


def test_every_recoverable_value_of_a_residual_mlp_is_exact() -> None:
    torch.manual_seed(0)
    model = ResidualMLP()
    x = torch.randn(4, 5, requires_grad=True)
    with Capture() as cap:
        y = model(x)[:, 0]
    found = recover_all(y, [x])
    kinds = {how for _, _, how, _ in found}
    assert {"saved", "replay", "known", "leaf"} <= kinds
    assert_matches(found, cap, min_checked=20)


def test_frozen_model_values_come_from_arg_nodes() -> None:
    """With frozen weights autograd keeps no layer inputs; every activation is rebuilt or replayed."""
    torch.manual_seed(1)
    model = ResidualMLP().requires_grad_(False)
    x = torch.randn(4, 5, requires_grad=True)
    with Capture() as cap:
        y = model(x)[:, 1]
    found = recover_all(y, [x])
    assert "rebuild" in {how for _, _, how, _ in found}  # e.g. LayerNorm recomputed from its statistics
    assert_matches(found, cap, min_checked=10)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "t5", "vit"])
def test_every_recoverable_value_of_a_transformer_is_exact(model_type: str) -> None:
    from dynamiclrp.testing import zoo
    entry = zoo.build(model_type, attn_implementation="eager" if model_type != "vit" else None)
    with Capture() as cap:
        outputs, inputs = entry.run()
    found = recover_all(outputs, [inputs], scales=True)
    assert_matches(found, cap, min_checked=40)


def assert_support_matches(recovered, truth: Capture, min_checked: int) -> int:
    """Values on the support equal the true values wherever their mask says they are exact."""
    checked = 0
    for node, nr, how, value, *sums in recovered:
        ref = truth.values.get((id(node), nr))
        if ref is None:
            continue
        mask = None
        if how == "support":
            value, mask = value
        if mask is not None:
            if not bool(mask.any()):
                continue
            value, ref = value[mask], ref[mask]
        err = float((value.to(ref.dtype) - ref).abs().max())
        bound = max(_bound(ref, sums[0] if sums else 0.0), 1e-30)
        assert err <= bound, f"{type(node).__name__} ({how}): error {err:.2e} > {bound:.2e}"
        checked += 1
    assert checked >= min_checked, f"only {checked} values could be compared"
    return checked


class FrozenHead(nn.Module):
    """Frozen layers whose outputs only their consumers tell: a residual stream, a one-hot pick, max pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x, t):
        h = torch.relu(self.conv(x)).amax((2, 3))
        h = self.fc1(h)
        h = self.norm(h + self.fc2(torch.tanh(h)))        # the sum is saved by the norm: h recovered upwards
        logits = self.head(h)
        return (logits * nn.functional.one_hot(t, 5).to(logits.dtype)).sum(1)


@pytest.mark.parametrize("with_model", [False, True])
def test_values_recovered_upwards_and_on_the_support_are_true_values(with_model: bool) -> None:
    torch.manual_seed(4)
    model = FrozenHead().double().requires_grad_(False)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 4, 0])
    with Capture() as cap:
        y = model(x, t)
    found = recover_all(y, [x], model=model if with_model else None, support=True)
    kinds = {how for _, _, how, _ in found}
    assert "support" in kinds or with_model
    assert_support_matches(found, cap, min_checked=8)
    # every linear layer's output is known at least on its support, so ε runs without the model
    rel = dynamiclrp.relevance(y, x, model=model if with_model else None)[0]
    trainable = FrozenHead().double()
    trainable.load_state_dict(model.state_dict())
    ref = dynamiclrp.relevance(trainable(x, t), x)[0]
    assert torch.allclose(rel, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "t5"])
def test_frozen_transformer_values_on_the_support_are_true_values(model_type: str) -> None:
    from dynamiclrp.testing import zoo
    entry = zoo.build(model_type, attn_implementation="eager")
    entry.model.requires_grad_(False)
    with Capture() as cap:
        outputs, inputs = entry.run()
    found = recover_all(outputs, [inputs], model=entry.model, support=True, scales=True)
    assert_support_matches(found, cap, min_checked=40)


def test_promises_of_the_paper_rules_recover_add_operands() -> None:
    """The paper's magnitude split needs both operands of every Add/Sum/Mean; they are promised, recovered
    through branches (pass-through ops), Arg Nodes and nested promises, and equal the forward values."""
    torch.manual_seed(2)
    model = ResidualMLP()
    x = torch.randn(3, 5, requires_grad=True)
    with Capture() as cap:
        y = model(x)[:, 2]
    ex = dynamiclrp.explain(y, x, rules="paper", trace_promises=True)
    assert ex.promises, "the paper's rules must make promises"
    origins = {p.origin for p in ex.promises}
    assert any(o.startswith("AddBackward0") for o in origins) or any("magnitude" in o for o in origins)
    nested = [p for p in ex.promises if p.nested > 0]
    assert nested, "residual adds over adds make promise trees"
    checked = 0
    for p in ex.promises:
        ref = cap.values.get((id(p.node), p.output_nr))
        if ref is None:
            continue
        value = p.value
        if p.mask is not None:  # a value on the support (the logits, from the entry the gather picked): exact there
            assert bool(p.mask.any())
            value, ref = value[p.mask.expand_as(value)], ref[p.mask.expand_as(ref)]
        err = ((value - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-6, (p.path, err)
        checked += 1
    assert checked >= 6
    assert torch.isfinite(ex.relevance[0]).all()
    assert abs(ex.unaccounted) <= 1e-5 * abs(ex.ledger.seed_total) + 1e-6


def test_residual_diamond_resolves_without_deadlock() -> None:
    """The paper's deadlock example: A -> B -> C -> E and A -> D -> E with a promise at A. Branches reach
    ahead of the traversal, so the shared node E is resolved once (aggregation) and nothing waits."""
    torch.manual_seed(3)
    w1, w2, w3 = (torch.randn(6, 6) for _ in range(3))
    x = torch.randn(2, 6, requires_grad=True)
    with Capture() as cap:
        e = torch.relu(x @ w1)                 # E: an Arg Node (saves its result)
        c = e @ w2                             # C
        b = torch.relu(c)                      # B
        d = e.flip(1)                          # D: pass-through to E
        a = b + d                              # A: needs both operands (a promise)
        y = (a + a * 0.5).sum(1)
    rules = dynamiclrp.presets.epsilon().with_families(add=L.Norm(1e-6))  # stabilized sum rule needs z = b + d
    ex = dynamiclrp.explain(y, x, rules=rules, trace_promises=True)
    recovered = {(id(p.node), p.output_nr): p for p in ex.promises}
    assert recovered, "the stabilized sum rule needs the adds' outputs"
    # the branch to E passes a node that two consumers share: the paper's pre-promise site
    assert any(p.pre_promises for p in ex.promises)
    assert max(p.depth for p in ex.promises) >= 2
    for key, p in recovered.items():
        ref = cap.values.get(key)
        if ref is not None:
            if p.mask is not None:  # a value on the support (a ReLU's saved output): exact on its mask
                ref = torch.where(p.mask, ref, 0)
            assert torch.allclose(p.value, ref, rtol=1e-6, atol=1e-7)
    # the ε-stabilized rule changes relevance by O(ε) only
    (r0,) = dynamiclrp.relevance(y, x)
    assert torch.allclose(ex.relevance[0], r0, rtol=1e-4, atol=1e-5)


def test_aggregation_computes_a_shared_value_once() -> None:
    """Two promises on the same slot share one retrieval."""
    from dynamiclrp.core import graph as G
    from dynamiclrp.core.promises import PromiseResolver, ValueStore

    torch.manual_seed(4)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    h = torch.relu(x @ w) + x        # an Add: not saved anywhere
    y = (h.exp() + h.sin()).sum()    # two consumers; exp saves its result, sin its input (h!)
    graph = G.GraphView([(y.grad_fn, 0)])
    rules = dynamiclrp.presets.epsilon()
    specs = [rules.spec_for(t) for t in graph.types]
    resolver = PromiseResolver(graph, specs, {})
    add_slot = next(s for s in range(len(graph.slot_node)) if graph.types[graph.slot_node[s]] == "AddBackward0"
                    and any(graph.types[c] == "ExpBackward0" for c, _ in graph.consumers[s]))
    resolver.request(add_slot)
    resolver.request(add_slot)
    store = ValueStore(graph, specs, resolver, [])
    v1 = store.get(add_slot)
    v2 = store.get(add_slot)
    assert v1 is v2  # memoised, not recomputed
    assert torch.allclose(v1, (torch.relu(x @ w) + x).detach())
    assert add_slot not in store.memo  # freed after its last registered use


def test_unrecoverable_value_raises_a_clear_error() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    z = (x + 1.0) * 2.0               # the scalar 1.0 is not kept by autograd
    y = z.sum(1)
    rules = dynamiclrp.presets.epsilon().with_families(reduce=L.Norm(1e-6))  # needs the Sum's output: known
    (r,) = dynamiclrp.relevance(y, x, rules=rules)
    assert torch.isfinite(r).all()
    rules2 = dynamiclrp.presets.epsilon().with_families(add=L.Norm(1e-6))   # needs x + 1.0: unrecoverable
    with pytest.raises(dynamiclrp.ValueUnavailableError, match="cannot be recovered"):
        dynamiclrp.relevance(y, x, rules=rules2)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_float32_differences_do_not_change_relevance(model_type: str) -> None:
    """In float32 a layer's output read back as ``sum − residual`` carries the sum's rounding, not its own; the ε
    rule's messages depend on that output only through ``z / (z + ε)``, so the frozen float32 relevance still
    equals the float64 one (same weights, same inputs) to float32 accuracy."""
    import copy

    from dynamiclrp.testing import zoo
    entry = zoo.build(model_type, attn_implementation="eager")
    model32 = entry.model.eval().requires_grad_(False)
    model64 = copy.deepcopy(model32).double()
    outputs, inputs = entry.run()
    found = recover_all(outputs, [inputs], model=model32)
    assert any(how == "total" for _, _, how, _ in found)  # differences are taken in float32
    for rules in ("epsilon", "attnlrp"):
        (r32,) = dynamiclrp.relevance(outputs, inputs, rules=rules, model=model32)
        entry.model = model64
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            out64, in64 = entry.run()
        finally:
            torch.set_default_dtype(old)
            entry.model = model32
        (r64,) = dynamiclrp.relevance(out64, in64, rules=rules, model=model64)
        err = float((r32.double() - r64).abs().max() / r64.abs().max())
        assert err <= 1e-5, (rules, err)
        outputs, inputs = entry.run()
