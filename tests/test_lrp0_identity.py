"""Analytic cases and the LRP-0 ≡ gradient × input identity on bias-free piecewise-linear graphs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamiclrp

DT = torch.float64


def grad_x_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    return g * x.detach()


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().clamp_min(1e-300)
    err = (a - b).abs().max() / scale
    assert err <= rel, f"relative error {err:.3e} > {rel:.1e}"


# ------------------------------------------------------------------------------------------------------------
# a single linear layer: the exact ε formula, batched
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.3])
def test_single_linear_matches_closed_form(bias: bool, eps: float) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(7, 4, bias=bias).to(DT)
    x = torch.randn(5, 7, dtype=DT, requires_grad=True)
    c = 2
    f = lin(x)[:, c]
    rules = dynamiclrp.presets.epsilon(eps) if eps else "zero"
    (r,) = dynamiclrp.relevance(f, x, rules=rules)
    fd = f.detach()
    sign = torch.where(fd >= 0, 1.0, -1.0).to(DT)
    expected = lin.weight[c].detach() * x.detach() * (fd / (fd + eps * sign))[:, None]
    assert torch.allclose(r, expected, rtol=1e-12, atol=1e-14)


def test_linear_bias_is_a_sink_with_the_right_share() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(6, 3).to(DT)
    x = torch.randn(4, 6, dtype=DT, requires_grad=True)
    f = lin(x)[:, 0]
    ex = dynamiclrp.explain(f, x, rules="zero")
    fd = f.detach()
    # LRP-0: inputs get w·x, the bias gets b, and together they are f
    assert torch.allclose(ex.relevance[0].sum(1), fd - lin.bias[0].detach(), rtol=1e-12)
    bias_total = sum(s.total for s in ex.ledger.sinks if s.kind == "bias")
    assert bias_total == pytest.approx(4 * lin.bias[0].item(), rel=1e-12)
    assert abs(ex.unaccounted) < 1e-12


def test_dtype_device_and_shape_follow_inputs() -> None:
    lin = nn.Linear(3, 2)
    x = torch.randn(2, 3, requires_grad=True)
    (r,) = dynamiclrp.relevance(lin(x)[:, 1], x)
    assert r.shape == x.shape and r.dtype == x.dtype and r.device == x.device and r.grad_fn is None


# ------------------------------------------------------------------------------------------------------------
# LRP-0 ≡ gradient × input on bias-free piecewise-linear graphs
# ------------------------------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)

    def forward(self, x):
        h = F.relu(self.a(x)) + x
        return self.b(h) + h + h


class Routing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8, bias=False)

    def forward(self, x):                                   # x: (B, 4, 8)
        h = F.leaky_relu(self.lin(x), 0.1)
        u, v = h.split([3, 5], dim=2)
        p, q = h.chunk(2, dim=1)
        cat = torch.cat([u, v[..., :3], p.mean(1, keepdim=True)[..., :3].expand(-1, 2, 3)], dim=1)
        st = torch.stack([cat[:, 0], cat[:, 1]], dim=0).permute(1, 0, 2)
        rows = torch.unbind(q, dim=1)
        idx = torch.tensor([2, 0, 1])
        g = torch.gather(h, 2, idx.view(1, 1, 3).expand(h.shape[0], 4, 3))
        flat = h.transpose(1, 2).reshape(h.shape[0], -1)[:, ::3]
        sel = h[:, [0, 2], 1:4]
        return (st.sum((1, 2)) + rows[0].sum(-1) + g.amax(-1).sum(-1) + flat.sum(-1) + sel.sum((1, 2))
                - torch.max(cat, dim=2).values.mean(-1))


def cnn(dim: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    maxp = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dim]
    avgp = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dim]
    adapt = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    m = nn.Sequential(
        conv(2, 4, 3, padding=1, bias=False), nn.ReLU(), maxp(2),
        conv(4, 4, 3, padding=1, bias=False), bn(4), nn.LeakyReLU(0.2), avgp(2),
        conv(4, 3, 1, bias=False), adapt(2), nn.Flatten(), nn.Linear(3 * 2 ** dim, 2, bias=False))
    norm = m[4]
    with torch.no_grad():
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.zero_()
        norm.running_mean.zero_()  # zero shift: BN is a per-channel scale, bias-free
    return m.eval()


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 9, bias=False), nn.ReLU(), nn.Linear(9, 9, bias=False),
                                  nn.LeakyReLU(0.05), nn.Linear(9, 3, bias=False)), (5, 6)),
    "residual": (lambda: Residual(5), (3, 5)),
    "routing": (Routing, (2, 4, 8)),
    "conv1d": (lambda: cnn(1), (2, 2, 16)),
    "conv2d": (lambda: cnn(2), (2, 2, 12, 12)),
    "conv3d": (lambda: cnn(3), (1, 2, 8, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lrp0_equals_gradient_times_input(name: str) -> None:
    torch.manual_seed(3)
    build, shape = CASES[name]
    model = build().to(DT)
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    out = model(x)
    y = out[:, 0] if out.dim() > 1 else out
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    assert_close_rel(r, grad_x_input(y, x), 1e-5)
    # and everything arrives: the ledger closes with no bias to absorb anything
    ex = dynamiclrp.explain(y, x, rules="zero")
    assert abs(ex.unaccounted) <= 1e-6 * max(1.0, abs(ex.ledger.seed_total))


# ------------------------------------------------------------------------------------------------------------
# hypothesis: random small DAGs of piecewise-linear ops
# ------------------------------------------------------------------------------------------------------------
D = 6
UNARY = ["relu", "leaky", "linear", "neg", "scale", "maxpool", "slice_pad", "permute", "index", "avg"]
BINARY = ["add", "sub", "cat_split", "stack_mean", "max"]


class RandomDAG(nn.Module):
    """A DAG of piecewise-linear homogeneous ops on (B, D) tensors; every node may feed several later ones."""

    def __init__(self, program: list[tuple], seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.program = program
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(D, D, generator=g, dtype=DT) / D ** 0.5) for _ in program])

    def forward(self, x):
        vals = [x]
        for k, (op, a, b) in enumerate(self.program):
            u, v = vals[a % len(vals)], vals[b % len(vals)]
            if op == "relu":
                out = F.relu(u)
            elif op == "leaky":
                out = F.leaky_relu(u, 0.3)
            elif op == "linear":
                out = u @ self.weights[k]
            elif op == "neg":
                out = -u
            elif op == "scale":
                out = u * 1.5
            elif op == "maxpool":
                out = F.max_pool1d(u.unsqueeze(1), 2, 1, padding=1).squeeze(1)[:, :D]
            elif op == "slice_pad":
                out = F.pad(u[:, 1:], (0, 1))
            elif op == "permute":
                out = u.flip(1)
            elif op == "index":
                out = u[:, torch.tensor([1, 0, 3, 2, 5, 4])]
            elif op == "avg":
                out = F.avg_pool1d(u.unsqueeze(1), 3, 1, padding=1, count_include_pad=True).squeeze(1)
            elif op == "add":
                out = u + v
            elif op == "sub":
                out = u - 0.5 * v
            elif op == "cat_split":
                out = torch.cat([u, v], 1).reshape(-1, 2, D).sum(1)
            elif op == "stack_mean":
                out = torch.stack([u, v], 0).mean(0)
            else:
                out = torch.maximum(u, v)
            vals.append(out)
        return vals[-1].sum(1) + vals[len(vals) // 2].sum(1)


op_strategy = st.tuples(st.sampled_from(UNARY + BINARY), st.integers(0, 50), st.integers(0, 50))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(op_strategy, min_size=1, max_size=10), seed=st.integers(0, 2 ** 16))
def test_lrp0_equals_gradient_times_input_on_random_dags(program, seed) -> None:
    model = RandomDAG(program, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, D, generator=g, dtype=DT, requires_grad=True)
    y = model(x)
    (r,) = dynamiclrp.relevance(y, x, rules="zero")
    ref = grad_x_input(y, x)
    assert torch.allclose(r, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max().clamp_min(1)))
