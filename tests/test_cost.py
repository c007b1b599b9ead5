"""The cost of an explanation, counted in operations (load-independent): the matrix products and convolutions
an explanation runs, against those of a plain backward pass w.r.t. the input of the same frozen model.

Timings live in ``benchmarks/``; these tests pin the structural choices that make them: forward values are read
where autograd kept them instead of recomputed (the Promise System's cost preference), and the linear rules run
the fewest products their algebra allows.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dynamiclrp

HEAVY = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward")


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def heavy(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in HEAVY}


def _counts(forward, x: torch.Tensor, **kw) -> tuple[dict[str, int], dict[str, int]]:
    y = forward(x)
    with Count() as base:
        torch.autograd.grad(y.sum(), x)
    y = forward(x)
    with Count() as ours:
        dynamiclrp.relevance(y, x, **kw)
    return base.heavy(), ours.heavy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frozen_gpt2_epsilon_recomputes_no_matrix_product_it_can_read(dtype: torch.dtype) -> None:
    """Every linear layer's output z (the ε denominator) is read back where autograd kept it: q/k/v from the
    attention op that saved them (through the split and the views), the MLP's from the activation, the logits on
    the gathered entry, and the two projections into each residual sum as ``sum − residual`` (in float32 too: the
    ε rule's messages depend on z only through ``z / (z + ε)``, so the sum's rounding does not reach the relevance,
    see ``test_float32_differences_do_not_change_relevance``). The products are exactly the backward's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg).to(dtype).eval().requires_grad_(False)
    x = torch.randn(1, 8, 32, dtype=dtype, requires_grad=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=x).logits[:, -1]
        return logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)

    base, ours = _counts(forward, x, rules="epsilon", model=model)
    assert sum(ours.values()) == sum(base.values()), (base, ours)


class _ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("preset", ["epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1"])
def test_cnn_rules_run_the_fewest_convolutions_their_algebra_allows(preset: str) -> None:
    """Per convolution after a ReLU: γ (relevance only where z > 0) and z⁺ one forward and one transposed product
    with a modified weight; α-β one forward and two transposed. The first layer (signed input) stacks its terms
    (z^B's x·W, l·W⁺, h·W⁻; z⁺'s x⁺·W⁺, x⁻·W⁻) into one call of each kind."""
    model = _ConvReLU().eval().requires_grad_(False)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    rules = (dynamiclrp.presets.epsilon_gamma_box(-3.0, 3.0) if preset == "epsilon_gamma_box"
             else dynamiclrp.presets.parse(preset))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)[:, 1]

    base, ours = _counts(forward, x, rules=rules, model=model)
    assert base.get("convolution_backward") == 3
    forward_ops = {"epsilon_gamma_box": 3, "epsilon_plus": 3, "epsilon_alpha2_beta1": 4}[preset]
    transposed = {"epsilon_gamma_box": 3, "epsilon_plus": 3, "epsilon_alpha2_beta1": 6}[preset]
    assert ours.get("convolution", 0) == forward_ops, ours
    assert ours.get("convolution_backward", 0) == transposed, ours


def test_stacked_terms_equal_the_separate_terms() -> None:
    """The stacked first-layer call is the same arithmetic: z^B and signed z⁺ on a convolution equal the sum of
    their terms computed one by one (a grouped convolution, which cannot be stacked, takes that path), in float64."""
    torch.manual_seed(1)
    for groups in (1, 3):
        conv = nn.Conv2d(3, 6, 3, padding=1, groups=groups).double().requires_grad_(False)
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        rules = dynamiclrp.presets.epsilon_gamma_box(-2.0, 2.0)
        y = torch.relu(conv(x))  # every output explained with its own value as seed
        (r,) = dynamiclrp.relevance(y, x, rules=rules)
        # z^B by hand: R = x·Wᵀs − l·W⁺ᵀs − h·W⁻ᵀs, s = R_out / (x·W − l·W⁺ − h·W⁻)
        w = conv.weight
        lo, hi = torch.full_like(x, -2.0), torch.full_like(x, 2.0)

        def f(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(a, k, None, 1, 1, 1, groups)

        z = f(x, w) + conv.bias.view(1, -1, 1, 1)
        den = f(x, w) - f(lo, w.clamp(min=0)) - f(hi, w.clamp(max=0))
        s = torch.relu(z) / (den + 1e-6 * torch.where(den >= 0, 1.0, -1.0))
        xs = [t.detach().requires_grad_(True) for t in (x, lo, hi)]
        out = (f(xs[0], w) * s).sum() - (f(xs[1], w.clamp(min=0)) * s).sum() - (f(xs[2], w.clamp(max=0)) * s).sum()
        gs = torch.autograd.grad(out, xs)
        ref = x * gs[0] + lo * gs[1] + hi * gs[2]
        assert torch.allclose(r, ref, rtol=1e-10, atol=1e-12), (groups, (r - ref).abs().max())
