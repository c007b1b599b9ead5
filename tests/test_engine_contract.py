"""The public contract of relevance()/explain(): arguments, seeds, batches, side effects, graph shapes, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from dynamiclrp import GraphFreedError, UnsupportedOperationError

DT = torch.float64


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8, bias=bias), nn.ReLU(), nn.Linear(8, 8, bias=bias), nn.ReLU(),
                         nn.Linear(8, 3, bias=bias)).to(DT)


# ------------------------------------------------------------------------------------------------------------
# seeds, multiple outputs, batches
# ------------------------------------------------------------------------------------------------------------
def test_default_seed_is_the_output_and_conservative_rules_sum_to_it() -> None:
    model = mlp(bias=False)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    y = model(x)[:, 1]
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    assert torch.allclose(r.sum(1), y.detach(), rtol=1e-10)


def test_explicit_seed_scales_relevance_linearly() -> None:
    model = mlp()
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    y = model(x)[:, 1]
    (r1,) = dynamiclrp.relevance(y, x)
    (r2,) = dynamiclrp.relevance(y, x, seeds=3.0 * y.detach())
    (r3,) = dynamiclrp.relevance(y, x, seeds=torch.ones_like(y))
    assert torch.allclose(r2, 3.0 * r1, rtol=1e-10)
    # a seed of 1 per row is the default seed divided by the output
    assert torch.allclose(r3, r1 / y.detach()[:, None], rtol=1e-8)


def test_several_outputs_and_inputs() -> None:
    model = mlp()
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    out = model(x)
    a, b = out[:, 0], out[:, 2]
    ra, = dynamiclrp.relevance(a, x)
    rb, = dynamiclrp.relevance(b, x)
    rab, w = dynamiclrp.relevance([a, b], [x, model[0].weight])
    assert torch.allclose(rab, ra + rb, rtol=1e-10, atol=1e-14)
    assert w.shape == model[0].weight.shape


def test_batch_rows_are_explained_independently() -> None:
    model = mlp()
    x = torch.randn(6, 5, dtype=DT)
    xb = x.clone().requires_grad_(True)
    (rb,) = dynamiclrp.relevance(model(xb)[:, 2], xb)
    for i in range(6):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (ri,) = dynamiclrp.relevance(model(xi)[:, 2], xi)
        assert torch.allclose(rb[i:i + 1], ri, rtol=1e-10, atol=1e-14)


def test_explaining_a_class_via_gather() -> None:
    model = mlp()
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    logits = model(x)
    target = torch.tensor([0, 2, 1, 1])
    (r1,) = dynamiclrp.relevance(logits.gather(1, target[:, None]), x)
    (r2,) = dynamiclrp.relevance(logits[torch.arange(4), target], x)
    assert torch.allclose(r1, r2, rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# nothing is modified, explanations repeat, gradients still work
# ------------------------------------------------------------------------------------------------------------
def test_model_params_grads_and_graph_are_untouched() -> None:
    model = mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = copy.deepcopy(model.state_dict())
    grads_before = [p.grad.clone() for p in model.parameters()]
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    x_before = x.detach().clone()
    y = model(x)[:, 0]
    r1 = dynamiclrp.explain(y, [x, model[2].weight]).relevance
    r2 = dynamiclrp.explain(y, [x, model[2].weight]).relevance
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, g in zip(model.parameters(), grads_before):
        assert torch.equal(p.grad, g)
    assert x.grad is None and torch.equal(x.detach(), x_before)
    # the graph still works for an ordinary backward, giving the ordinary gradient
    ref_model = copy.deepcopy(model)
    xr = x_before.clone().requires_grad_(True)
    ref_model(xr)[:, 0].sum().backward()
    y.sum().backward()
    assert torch.allclose(x.grad, xr.grad)


def test_graph_freed_by_backward_raises_a_helpful_error() -> None:
    model = mlp()
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    y = model(x)[:, 0]
    y.sum().backward()
    with pytest.raises(GraphFreedError, match="retain_graph=True"):
        dynamiclrp.relevance(y, x)


def test_after_retain_graph_backward_explaining_still_works() -> None:
    model = mlp()
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    y = model(x)[:, 0]
    (before,) = dynamiclrp.relevance(y, x)
    y.sum().backward(retain_graph=True)
    (after,) = dynamiclrp.relevance(y, x)
    assert torch.equal(before, after)


# ------------------------------------------------------------------------------------------------------------
# graph shapes
# ------------------------------------------------------------------------------------------------------------
def test_a_tensor_used_twice_gets_the_sum_of_both_paths() -> None:
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    w = torch.randn(4, 4, dtype=DT)
    y = ((x + x) @ w).sum(1)
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(r, g * x.detach(), rtol=1e-12)


def test_inputs_the_outputs_do_not_depend_on_raise_unless_allowed() -> None:
    model = mlp()
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    other = torch.randn(7, dtype=DT, requires_grad=True)
    y = model(x)[:, 0]
    with pytest.raises(dynamiclrp.UnusedInputError, match=r"inputs\[1\] is not in the graph.*allow_unused=True"):
        dynamiclrp.relevance(y, [x, other])
    with pytest.raises(RuntimeError):  # what autograd does
        torch.autograd.grad(y.sum(), [x, other], retain_graph=True)
    rx, ro = dynamiclrp.relevance(y, [x, other], allow_unused=True)
    assert torch.count_nonzero(ro) == 0 and ro.shape == other.shape
    assert torch.count_nonzero(rx) > 0
    (rx_only,) = dynamiclrp.relevance(y, x)
    assert torch.equal(rx, rx_only)


def test_output_that_never_reaches_the_input() -> None:
    model = mlp()
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    z = model(torch.randn(2, 5, dtype=DT))[:, 0]  # depends on parameters only
    with pytest.raises(dynamiclrp.UnusedInputError):
        dynamiclrp.relevance(z, x)
    (r,) = dynamiclrp.relevance(z, x, allow_unused=True)
    assert torch.count_nonzero(r) == 0
    ex = dynamiclrp.explain(z, x, allow_unused=True)
    assert torch.count_nonzero(ex.relevance[0]) == 0 and abs(ex.unaccounted) < 1e-12


def test_intermediate_tensor_as_input() -> None:
    model = mlp()
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    h = model[1](model[0](x))
    y = model[4](model[3](model[2](h)))[:, 0]
    rh, rx = dynamiclrp.relevance(y, [h, x])
    # relevance reaching h continues to x; with ε at the first layer x gets h's relevance minus bias/ε shares
    assert rh.shape == h.shape and rx.shape == x.shape
    ex = dynamiclrp.explain(y, [h, x])
    assert abs(ex.unaccounted) < 1e-10
    (rh_only,) = dynamiclrp.relevance(y, h)
    assert torch.allclose(rh, rh_only, rtol=1e-12)


def test_thousand_layer_mlp_needs_no_recursion() -> None:
    torch.manual_seed(0)
    layers = []
    for _ in range(1000):
        layers += [nn.Linear(4, 4), nn.ReLU()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.eye(4) + 0.01 * torch.randn(4, 4))
                m.bias.fill_(0.001)
    x = torch.rand(2, 4, requires_grad=True)
    y = model(x).sum(1)
    (r,) = dynamiclrp.relevance(y, x)
    assert torch.isfinite(r).all() and r.abs().sum() > 0


def test_none_edges_constants_and_frozen_parameters() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).to(DT)
    c = torch.randn(4, dtype=DT)  # a constant operand
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    y = (torch.relu(lin(x)) * c + 0.5).sum(1)
    ex = dynamiclrp.explain(y, x)
    assert torch.isfinite(ex.relevance[0]).all()
    assert abs(ex.unaccounted) < 1e-10
    assert any(s.kind == "constant" for s in ex.ledger.sinks)
    # frozen weights: autograd keeps neither the input of the linear layers nor their biases; the input is
    # rebuilt by the Promise System and z is read from the ReLU's saved output where relevance arrives
    (ref,) = dynamiclrp.relevance(torch.relu(lin(torch.relu(lin(x)))).sum(1), x)
    lin.requires_grad_(False)
    y2 = torch.relu(lin(torch.relu(lin(x)))).sum(1)
    (r2,) = dynamiclrp.relevance(y2, x)
    assert torch.allclose(r2, ref, rtol=1e-12)
    # but a frozen bias whose output nothing saved or selects cannot be recovered: a clear error
    y3 = lin(x).sum(1)
    with pytest.raises(dynamiclrp.DynamicLRPError, match="requires_grad|require grad"):
        dynamiclrp.relevance(y3, x)
    (r0,) = dynamiclrp.relevance(y3, x, rules="zero")  # LRP-0 needs no z
    assert torch.allclose(r0, x.detach() * lin.weight.sum(0), rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------
class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_unknown_op_names_the_node_type_and_how_to_register_a_rule() -> None:
    x = torch.randn(3, requires_grad=True)
    y = Twice.apply(x).sum()
    with pytest.raises(UnsupportedOperationError) as info:
        dynamiclrp.relevance(y, x)
    msg = str(info.value)
    assert "TwiceBackward" in msg and "Twice" in msg and "with_ops" in msg
    rules = dynamiclrp.presets.epsilon().with_ops({"TwiceBackward": dynamiclrp.rules.Routing()})
    (r,) = dynamiclrp.relevance(y, x, rules=rules)
    assert torch.allclose(r, 2 * x.detach())


@pytest.mark.parametrize("bad, exc, match", [
    (dict(outputs="nope"), TypeError, "tensor"),
    (dict(outputs=[]), ValueError, "empty"),
    (dict(rules="no-such-preset"), dynamiclrp.RuleError, "valid names"),
    (dict(rules=42), dynamiclrp.RuleError, "preset name"),
    (dict(seeds=torch.ones(7)), ValueError, "shape"),
    (dict(seeds=[None, None]), ValueError, "one seed per output"),
])
def test_bad_arguments_raise_clear_errors(bad, exc, match) -> None:
    model = mlp()
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    args = dict(outputs=model(x)[:, 0], inputs=x, seeds=None, rules=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        dynamiclrp.relevance(args["outputs"], args["inputs"], args["seeds"], rules=args["rules"])


def test_output_without_graph_and_input_without_grad() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(dynamiclrp.DynamicLRPError, match="grad_fn"):
        dynamiclrp.relevance(x.sum(1), x)
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(dynamiclrp.DynamicLRPError, match="requires_grad"):
        dynamiclrp.relevance((x @ w).sum(1), x)


def test_a_graph_edge_can_be_requested_without_holding_its_tensor() -> None:
    """``torch.autograd.graph.GradientEdge`` inputs, as torch.autograd.grad accepts: relevance of an intermediate
    output the caller never held (e.g. an embedding lookup inside a model run on token ids); its value comes
    from the Promise System."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6).to(DT)
    lin = nn.Linear(6, 2).to(DT)
    ids = torch.tensor([[1, 4, 7], [2, 2, 9]])
    h = emb(ids)
    y = lin(torch.tanh(h)).sum(1)[:, 0]
    (by_tensor,) = dynamiclrp.relevance(y, h)
    edge = torch.autograd.graph.GradientEdge(h.grad_fn, 0)
    (by_edge,) = dynamiclrp.relevance(y, edge)
    assert by_edge.shape == h.shape and torch.allclose(by_edge, by_tensor, rtol=1e-12)
    ex = dynamiclrp.explain(y, edge)
    assert abs(ex.unaccounted) < 1e-10
