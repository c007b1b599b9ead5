"""Random graphs for property tests: small models of routing, linear, convolution, pooling, padding, residual,
element-wise and attention-like ops, explained with every preset, trainable and frozen.

:func:`build` turns a source of choices into a :class:`Case` (a model, an input and what to explain); :func:`check`
runs the properties every explanation must have and raises :class:`PropertyFailure` naming the first one that
does not hold:

* no exception other than a :class:`~dynamiclrp.errors.DynamicLRPError` that the case documents (none does today);
* relevance and ledger totals are finite;
* ``relevance()`` equals ``explain().relevance``;
* the ledger closes: ``unaccounted ≈ 0`` and nothing in ``ledger.unmeasured``;
* a frozen copy explained with ``model=`` gives the trainable model's relevance, and its ledger closes too;
* LRP-0 (``rules="zero"``) equals gradient × input on piecewise-linear graphs.

The same generator serves hypothesis (``tests/test_fuzz.py``, choices drawn by ``st.data()``) and long seeded runs
that count failures instead of stopping at the first::

    python -m dynamiclrp.testing.fuzz --graphs 20000 --seed 0
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import presets
from ..api import explain, relevance
from ..errors import DynamicLRPError, PropertyFailure, ValueUnavailableError

Tensor = torch.Tensor
DT = torch.float64

#: every preset (``epsilon_gamma_box`` with bounds that cover the inputs, ``paper`` included)
PRESETS = ("epsilon", "zero", "attnlrp", "cplrp", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
           "epsilon_alpha2_beta1_flat", "epsilon_gamma_box", "paper")


def preset(name: str) -> Any:
    """The rule set of a preset name (``epsilon_gamma_box`` with bounds ±4, wider than the fuzzed inputs)."""
    return presets.epsilon_gamma_box(-4.0, 4.0) if name == "epsilon_gamma_box" else presets.by_name(name)


# -----------------------------------------------------------------------------------------------------------
# Choices: a tiny interface that hypothesis and random.Random both implement
# -----------------------------------------------------------------------------------------------------------
class Choices:
    """Where a graph's random decisions come from."""

    def int(self, lo: int, hi: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def pick(self, options: Sequence[Any]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def flag(self, p: float = 0.5) -> bool:
        return self.int(0, 999) < int(p * 1000)


class RandomChoices(Choices):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]


class DrawChoices(Choices):
    """Choices drawn from hypothesis' ``st.data()`` (so failures shrink)."""

    def __init__(self, data: Any):
        from hypothesis import strategies as st  # test-only dependency
        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def pick(self, options: Sequence[Any]) -> Any:
        return self.data.draw(self.st.sampled_from(list(options)))


# -----------------------------------------------------------------------------------------------------------
# Blocks: each an nn.Module, so that models can be copied and frozen
# -----------------------------------------------------------------------------------------------------------
class Unary(nn.Module):
    FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu,
        "leaky_relu": F.leaky_relu, "softplus": F.softplus, "elu": F.elu,
        "scale": lambda x: x * -1.5, "shift": lambda x: x + 0.5, "neg": lambda x: -x, "div": lambda x: x / 3.0,
        "sigmoid_shift": lambda x: torch.sigmoid(x + 0.5),
    }
    LINEAR = frozenset({"relu", "leaky_relu", "scale", "neg", "div"})  # piecewise linear and through 0

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.FUNCS[self.name](x)


class Route(nn.Module):
    """Selection/permutation/copy ops that keep the tensor's rank; ``shape`` maps the input shape to the output's."""

    def __init__(self, name: str, dim: int, arg: Any = None):
        super().__init__()
        self.name, self.dim, self.arg = name, dim, arg

    def forward(self, x: Tensor) -> Tensor:
        d, a = self.dim, self.arg
        if self.name == "flip":
            return x.flip(d)
        if self.name == "roll":
            return x.roll(1, d)
        if self.name == "slice":
            return x.narrow(d, a[0], a[1])
        if self.name == "step":
            return x[(slice(None),) * d + (slice(None, None, 2),)]
        if self.name == "index":
            return x.index_select(d, torch.tensor(a))
        if self.name == "cat":
            return torch.cat([x, x.flip(d)], d)
        if self.name == "stack_sum":
            return torch.stack([x, 2 * x], 0).sum(0)
        if self.name == "transpose":
            return x.transpose(d, d + 1).contiguous().transpose(d, d + 1)
        if self.name == "where":
            return torch.where(x > 0.3, x, torch.zeros(()).to(x))
        if self.name == "masked_fill":
            return x.masked_fill(x < -1.0, 0.0)
        if self.name == "clone_view":
            return x.clone().reshape(x.shape)
        raise AssertionError(self.name)


class Pad(nn.Module):
    def __init__(self, kind: str, p: int):
        super().__init__()
        self.kind, self.p = kind, p

    def forward(self, x: Tensor) -> Tensor:
        p = self.p
        if self.kind == "zero":
            return F.pad(x, (p,) * (2 * (x.dim() - 2)))
        if self.kind == "value":
            return F.pad(x, (p,) * (2 * (x.dim() - 2)), value=0.5)
        if self.kind == "reflect":
            return F.pad(x, (p,) * (2 * (x.dim() - 2)), mode="reflect")
        if self.kind == "replicate":
            return F.pad(x, (p,) * (2 * (x.dim() - 2)), mode="replicate")
        raise AssertionError(self.kind)


class Residual(nn.Module):
    def __init__(self, body: nn.Module, scale: float = 1.0):
        super().__init__()
        self.body, self.scale = body, scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.body(x)


class Pair(nn.Module):
    """Two branches combined: ``max`` (``torch.maximum``), ``min``, ``mul`` (a product of two activations),
    ``gate`` (``a * sigmoid(b)``), ``sub``, ``cat``."""

    def __init__(self, a: nn.Module, b: nn.Module, how: str, dim: int = 1):
        super().__init__()
        self.a, self.b, self.how, self.dim = a, b, how, dim

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a(x), self.b(x)
        if self.how == "max":
            return torch.maximum(a, b)
        if self.how == "min":
            return torch.minimum(a, b)
        if self.how == "mul":
            return a * b
        if self.how == "gate":
            return a * torch.sigmoid(b)
        if self.how == "sub":
            return a - b
        if self.how == "cat":
            return torch.cat([a, b], self.dim)
        raise AssertionError(self.how)


class Reduce(nn.Module):
    """Statistics: ``x − max`` per row (a stable softmax's shift), a mean over a dim, a softmax, a log-softmax."""

    def __init__(self, name: str, dim: int):
        super().__init__()
        self.name, self.dim = name, dim

    def forward(self, x: Tensor) -> Tensor:
        if self.name == "sub_amax":
            return x - x.amax(self.dim, keepdim=True)
        if self.name == "sub_max":
            return x - x.max(self.dim, keepdim=True).values
        if self.name == "sub_mean":
            return x - x.mean(self.dim, keepdim=True)
        if self.name == "softmax":
            return x.softmax(self.dim) * x.shape[self.dim]
        if self.name == "log_softmax":
            return x.log_softmax(self.dim)
        raise AssertionError(self.name)


class Attention(nn.Module):
    """Single-head self-attention over ``(N, T, D)``: softmax(q kᵀ/√d + mask) v, written out or with SDPA."""

    def __init__(self, d: int, bias: bool, sdpa: bool, causal: bool):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = nn.Linear(d, d, bias=bias)
        self.sdpa, self.causal = sdpa, causal

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
            if self.causal:
                t = s.shape[-1]
                s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            a = s.softmax(-1) @ v
        return self.o(a)


class ToSeq(nn.Module):
    def __init__(self, t: int):
        super().__init__()
        self.t = t

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.t, -1)


class SeqTo(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "mean":
            return x.mean(1)
        if self.how == "first":
            return x[:, 0]
        return x.flatten(1)


# -----------------------------------------------------------------------------------------------------------
# The generator
# -----------------------------------------------------------------------------------------------------------
#: ops whose output the graph does not hold in full when no consumer saved it, because they combine their input with
#: a constant autograd does not keep: ``x + 0.5`` (the scalar), ``where``/``masked_fill`` (the fill value), and
#: ``softmax``/``log_softmax`` (their saved output hides each row's offset). A rule that needs such a value (the input
#: of a frozen linear layer for γ/z⁺/α-β/flat, an exact sum for the ``Norm`` and magnitude rules) raises
#: ValueUnavailableError there: the README's "Known limits" and docs/pitfalls.md. (``F.pad`` keeps no fill value
#: either; it is rebuilt with its default, 0, which the generator's zero pads use.)
LOSSY = frozenset({"shift", "where", "masked_fill", "softmax", "log_softmax"})

@dataclass
class Case:
    """A random model, its input and what to explain."""

    model: nn.Module
    x: Tensor
    target: int
    preset: str
    frozen: bool
    piecewise_linear: bool
    ops: list[str] = field(default_factory=list)
    seed: int = 0
    lossy: list[str] = field(default_factory=list)
    extra: int = 0  # parameters requested besides the input (trainable models)

    def describe(self) -> str:
        return (f"preset={self.preset} frozen={self.frozen} pl={self.piecewise_linear} x={tuple(self.x.shape)} "
                f"target={self.target} seed={self.seed} lossy={self.lossy} params requested={self.extra}\n  ops: "
                + " -> ".join(self.ops))


class _Builder:
    def __init__(self, c: Choices, pl_only: bool = False):
        self.c = c
        self.pl_only = pl_only  # piecewise-linear ops only (for the LRP-0 = gradient × input property)
        self.blocks: list[nn.Module] = []
        self.ops: list[str] = []
        self.pl = True  # piecewise linear so far

        self.lossy: list[str] = []  # ops whose output autograd cannot give back in full (see LOSSY)

    def add(self, block: nn.Module, name: str, pl: bool) -> None:
        self.blocks.append(block)
        self.ops.append(name)
        self.pl = self.pl and pl
        if name.split("@")[0] in LOSSY:
            self.lossy.append(name)

    def _pairs(self) -> tuple[str, ...]:
        return ("max", "min", "sub", "cat") if self.pl_only else ("max", "min", "mul", "gate", "sub", "cat")

    # -- image stage (N, C, H, W) ----------------------------------------------------------------------------
    def image(self, ch: int, h: int, w: int, steps: int) -> tuple[int, int, int]:
        c = self.c
        for _ in range(steps):
            kind = c.pick(("conv", "conv", "relu", "unary", "pool", "pad", "residual", "route", "bn", "pair"))
            if kind == "conv":
                k = c.pick((1, 2, 3)) if min(h, w) >= 3 else 1
                p = c.int(0, 1) if k > 1 else c.int(0, 1)
                out = c.int(1, 4)
                bias = c.flag(0.7)
                stride = c.pick((1, 1, 2)) if min(h, w) >= 4 else 1
                if (h + 2 * p - k) // stride + 1 < 1 or (w + 2 * p - k) // stride + 1 < 1:
                    continue
                self.add(nn.Conv2d(ch, out, k, stride=stride, padding=p, bias=bias), f"conv{k}s{stride}p{p}b{int(bias)}",
                         True)
                ch, h, w = out, (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
            elif kind == "relu":
                self.add(nn.ReLU(), "relu", True)
            elif kind == "unary":
                name = c.pick(sorted(Unary.LINEAR if self.pl_only else Unary.FUNCS))
                self.add(Unary(name), name, name in Unary.LINEAR)
            elif kind == "pool":
                how = c.pick(("max", "avg", "adaptive_avg", "adaptive_max"))
                if how in ("max", "avg") and min(h, w) >= 2:
                    self.add(nn.MaxPool2d(2) if how == "max" else nn.AvgPool2d(2), f"{how}pool", True)
                    h, w = h // 2, w // 2
                elif how.startswith("adaptive"):
                    size = c.int(1, 2) if min(h, w) >= 2 else 1
                    mod = nn.AdaptiveAvgPool2d(size) if how == "adaptive_avg" else nn.AdaptiveMaxPool2d(size)
                    self.add(mod, f"{how}pool{size}", True)
                    h = w = size
            elif kind == "pad":
                how = c.pick(("zero", "zero", "reflect", "replicate", "zeropad_module", *(
                    () if self.pl_only else ("value",))))
                p = 1
                if how == "reflect" and min(h, w) < 2:
                    continue
                if how == "zeropad_module":
                    self.add(nn.ZeroPad2d(p), "ZeroPad2d", True)
                elif how == "value":
                    # a non-zero fill is rebuilt as 0 where no op keeps the padded tensor (README, "Known limits"):
                    # generated as it is used, before a convolution, which keeps its input
                    out = c.int(1, 4)
                    self.add(nn.Sequential(Pad("value", p), nn.Conv2d(ch, out, 3, bias=c.flag(0.7))),
                             "pad_value+conv3", False)
                    ch = out
                    continue
                else:
                    self.add(Pad(how, p), f"pad_{how}", True)
                h, w = h + 2 * p, w + 2 * p
            elif kind == "residual":
                bias = c.flag(0.6)
                body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, bias=bias), nn.ReLU()) if min(h, w) >= 1 \
                    else nn.Identity()
                self.add(Residual(body, c.pick((1.0, 0.5))), f"residual_conv(b{int(bias)})", True)
            elif kind == "route":
                name = c.pick(("flip", "roll", "slice", "index", "cat", "transpose", "where", "masked_fill",
                               "clone_view", "stack_sum", "step"))
                d = c.int(1, 3)
                size = (ch, h, w)[d - 1]
                arg = None
                if name == "slice":
                    if size < 2:
                        continue
                    arg = (c.int(0, 1), size - 1)
                elif name == "index":
                    arg = [c.int(0, size - 1) for _ in range(c.int(1, size + 1))]
                elif name == "transpose":
                    d = c.int(1, 2)
                elif name == "step" and size < 2:
                    continue
                self.add(Route(name, d, arg), f"{name}@{d}", True)
                dims = [ch, h, w]
                if name == "slice":
                    dims[d - 1] = arg[1]
                elif name == "index":
                    dims[d - 1] = len(arg)
                elif name == "cat":
                    dims[d - 1] *= 2
                elif name == "step":
                    dims[d - 1] = (dims[d - 1] + 1) // 2
                ch, h, w = dims
            elif kind == "bn":
                bn = nn.BatchNorm2d(ch)
                with torch.no_grad():
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.3, 0.3)
                self.add(bn, "batchnorm", True)
            elif kind == "pair":
                how = c.pick(self._pairs())
                a = nn.Conv2d(ch, ch, 1, bias=c.flag(0.5))
                b = nn.Conv2d(ch, ch, 1, bias=c.flag(0.5))
                self.add(Pair(a, b, how), f"pair_{how}", how in ("max", "min", "sub", "cat"))
                if how == "cat":
                    ch *= 2
        return ch, h, w

    # -- vector stage (N, D) ---------------------------------------------------------------------------------
    def vector(self, d: int, steps: int) -> int:
        c = self.c
        for _ in range(steps):
            kind = c.pick(("linear", "linear", "relu", "unary", "residual", "route", "pair", "reduce", "seq"))
            if kind == "linear":
                out = c.int(2, 8)
                bias = c.flag(0.7)
                self.add(nn.Linear(d, out, bias=bias), f"linear{d}x{out}b{int(bias)}", True)
                d = out
            elif kind == "relu":
                self.add(nn.ReLU(), "relu", True)
            elif kind == "unary":
                name = c.pick(sorted(Unary.LINEAR if self.pl_only else Unary.FUNCS))
                self.add(Unary(name), name, name in Unary.LINEAR)
            elif kind == "residual":
                bias = c.flag(0.6)
                body = nn.Sequential(nn.Linear(d, d, bias=bias), nn.ReLU(), nn.Linear(d, d, bias=c.flag(0.5)))
                self.add(Residual(body), f"residual_mlp(b{int(bias)})", True)
            elif kind == "route":
                name = c.pick(("flip", "roll", "slice", "index", "cat", "where", "masked_fill", "clone_view"))
                arg = None
                if name == "slice":
                    if d < 2:
                        continue
                    arg = (c.int(0, 1), d - 1)
                elif name == "index":
                    arg = [c.int(0, d - 1) for _ in range(c.int(1, d + 1))]
                self.add(Route(name, 1, arg), f"{name}", True)
                d = arg[1] if name == "slice" else len(arg) if name == "index" else 2 * d if name == "cat" else d
            elif kind == "pair":
                how = c.pick(self._pairs())
                a = nn.Linear(d, d, bias=c.flag(0.5))
                b = nn.Linear(d, d, bias=c.flag(0.5))
                self.add(Pair(a, b, how), f"pair_{how}", how in ("max", "min", "sub", "cat"))
                d = 2 * d if how == "cat" else d
            elif kind == "reduce":
                name = c.pick(("sub_amax", "sub_max", "sub_mean", *(() if self.pl_only else ("softmax", "log_softmax"))))
                self.add(Reduce(name, 1), name, name in ("sub_max", "sub_amax", "sub_mean"))
            elif kind == "seq":
                t = c.pick([k for k in (2, 3, 4) if d % k == 0 and d // k >= 1] or [1])
                dh = d // t
                self.add(ToSeq(t), f"to_seq{t}", True)
                for _ in range(c.int(1, 2)):
                    what = c.pick(("linear", "relu") if self.pl_only else ("attention", "attention", "linear", "norm",
                                                                            "relu"))
                    if what == "attention":
                        sdpa, causal = c.flag(), c.flag()
                        self.add(Residual(Attention(dh, c.flag(0.6), sdpa, causal)),
                                 f"attention(sdpa={int(sdpa)},causal={int(causal)})", False)
                    elif what == "linear":
                        out = c.int(1, 4)
                        self.add(nn.Linear(dh, out, bias=c.flag(0.6)), f"seq_linear{dh}x{out}", True)
                        dh = out
                    elif what == "norm":
                        self.add(nn.LayerNorm(dh), "layernorm", False)
                    else:
                        self.add(nn.ReLU(), "relu", True)
                how = c.pick(("mean", "first", "flatten"))
                self.add(SeqTo(how), f"seq_{how}", True)
                d = dh * t if how == "flatten" else dh
        return d


def build(c: Choices, seed: int = 0, presets: Sequence[str] = PRESETS, pl_only: bool = False) -> Case:
    """A random model, input, target, preset and frozen flag from the choices ``c`` (weights from ``seed``);
    ``presets`` to choose from; ``pl_only``: piecewise-linear ops only."""
    b = _Builder(c, pl_only)
    n = 2
    if c.flag(0.5):
        ch, h, w = c.int(1, 3), c.int(2, 6), c.int(2, 6)
        shape: tuple[int, ...] = (n, ch, h, w)
        ch, h, w = b.image(ch, h, w, c.int(1, 5))
        b.add(nn.Flatten(), "flatten", True)
        d = ch * h * w
    else:
        d = c.int(2, 8)
        shape = (n, d)
    d = b.vector(d, c.int(0, 4))
    k = c.int(1, 3)
    head_bias = c.flag(0.7)
    b.add(nn.Linear(d, k, bias=head_bias), f"head{d}x{k}b{int(head_bias)}", True)
    name = c.pick(tuple(presets))
    frozen = c.flag(0.5)
    target = c.int(0, k - 1)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*b.blocks).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * (0.8 if p.dim() > 1 else 0.3))
    x = (torch.randn(shape, generator=g, dtype=DT) * c.pick((1.0, 1.0, 3.0))).requires_grad_(True)
    extra = 0 if frozen else c.pick((0, 0, 1, 3))
    return Case(model, x, target, name, frozen, b.pl, b.ops, seed, b.lossy, extra)


# -----------------------------------------------------------------------------------------------------------
# The properties
# -----------------------------------------------------------------------------------------------------------
def documented(err: DynamicLRPError, case: Case) -> bool:
    """Whether ``err`` is a documented limit for ``case``: a value the graph does not hold (ValueUnavailableError)
    in a graph with an op of :data:`LOSSY`, or the input of a saturated activation that only its output gives (a
    ``tanh`` or ``sigmoid`` at ±1 in the dtype's precision). Everything else is a failure. (Likewise a ledger entry in
    ``unmeasured`` is accepted only in a graph with an op of :data:`LOSSY`, where it names relevance on a constant
    autograd did not keep.)"""
    if not isinstance(err, ValueUnavailableError):
        return False
    # sigmoid(x + 0.5): x + 0.5 is known only by inverting the sigmoid, which fails where it (nearly) saturates
    inverted = "sigmoid_shift" in case.ops and "cannot be recovered" in str(err)
    return bool(case.lossy) or "where it saturates" in str(err) or inverted

REL_TOL = 1e-8  # relative to the scale of the relevance involved (float64)


def _scale(*ts: Any) -> float:
    s = 1.0
    for t in ts:
        if isinstance(t, Tensor):
            s = max(s, float(t.abs().sum()))
        elif t is not None:
            s = max(s, abs(float(t)))
    return s


def _ledger_scale(ex: Any) -> float:
    led = ex.ledger
    return _scale(led.seed_total, *ex.relevance, sum(abs(v) for v in led.inputs.values()),
                  sum(abs(s.total) for s in led.sinks))


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    return bool(((a - b).abs().max() <= tol * _scale(a, b)).item()) if a.numel() else True


def check(case: Case) -> dict[str, Any]:
    """Run every property on ``case``; raises :class:`PropertyFailure` on the first that fails. Returns facts
    about the run (for counting)."""
    rules = preset(case.preset)
    model, x = case.model, case.x
    facts: dict[str, Any] = {}
    # besides the input, some parameters (biases first) are requested: relevance() = explain() for each of them
    params = [p for n, p in model.named_parameters() if n.endswith("bias")][: case.extra]
    params += [p for n, p in model.named_parameters() if not n.endswith("bias")][: max(0, case.extra - len(params))]
    wanted = [x, *params]
    try:
        out = model(x)[:, case.target]
        rels = relevance(out, wanted, rules=rules)
        rel = rels[0]
        ex = explain(out, wanted, rules=rules)
        if case.frozen:
            fz = copy.deepcopy(model).requires_grad_(False)
            out_f = fz(x)[:, case.target]
            (rel_f,) = relevance(out_f, x, rules=rules, model=fz)
            ex_f = explain(out_f, x, rules=rules, model=fz)
    except DynamicLRPError as err:
        if documented(err, case):
            facts["documented"] = type(err).__name__
            return facts
        raise PropertyFailure(f"error:{type(err).__name__}", f"{err}\n{case.describe()}") from err
    except Exception as err:  # noqa: BLE001 - any other exception is the failure being looked for
        raise PropertyFailure(f"crash:{type(err).__name__}",
                              f"{err}\n{traceback.format_exc(limit=-4)}\n{case.describe()}") from err
    for k, (r, e) in enumerate(zip(rels, ex.relevance)):
        if not bool(torch.isfinite(r).all()):
            raise PropertyFailure("non-finite", f"inputs[{k}]\n{case.describe()}")
        if not _close(r, e, REL_TOL):
            d = float((r - e).abs().max())
            raise PropertyFailure("relevance!=explain", f"inputs[{k}]: max diff {d:.3g}\n{case.describe()}")
    _ledger(ex, case, "", facts)
    if case.frozen:
        if not _close(rel_f, rel, 1e-7):
            d = float((rel_f - rel).abs().max())
            raise PropertyFailure("frozen!=trainable", f"max diff {d:.3g} (scale {_scale(rel):.3g})\n{case.describe()}")
        if not _close(ex_f.relevance[0], rel_f, REL_TOL):
            raise PropertyFailure("relevance!=explain(frozen)", case.describe())
        _ledger(ex_f, case, "frozen ", facts)
    if case.piecewise_linear and case.preset == "zero":
        (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
        if not _close(rel, g * x.detach(), 1e-9):
            d = float((rel - g * x.detach()).abs().max())
            raise PropertyFailure("lrp0!=x*grad", f"max diff {d:.3g}\n{case.describe()}")
        facts["lrp0_checked"] = True
    return facts


def _ledger(ex: Any, case: Case, what: str, facts: dict[str, Any]) -> None:
    led = ex.ledger
    if led.unmeasured:
        if case.lossy:  # named, not silent: relevance on a constant autograd did not keep cannot be measured
            facts["unmeasured"] = True
            return
        raise PropertyFailure(f"{what}unmeasured", f"{led.unmeasured}\n{led.summary()}\n{case.describe()}")
    if not math.isfinite(led.unaccounted):
        raise PropertyFailure(f"{what}ledger-non-finite", f"{led.summary()}\n{case.describe()}")
    if abs(led.unaccounted) > REL_TOL * _ledger_scale(ex):
        raise PropertyFailure(f"{what}ledger-leak", f"unaccounted {led.unaccounted:.3g}\n{led.summary()}\n"
                              f"{case.describe()}")


# -----------------------------------------------------------------------------------------------------------
# Long runs
# -----------------------------------------------------------------------------------------------------------
def run(graphs: int, seed: int = 0, show: int = 3, stop: bool = False, out: Any = sys.stdout) -> Counter:
    """Check ``graphs`` random graphs (graph ``i`` from seed ``seed + i``); returns counts per outcome."""
    counts: Counter = Counter()
    shown: Counter = Counter()
    t0 = time.perf_counter()
    for i in range(graphs):
        s = seed + i
        case = build(RandomChoices(s), seed=s)
        counts["graphs"] += 1
        counts["frozen" if case.frozen else "trainable"] += 1
        counts[f"preset:{case.preset}"] += 1
        try:
            facts = check(case)
        except PropertyFailure as err:
            counts[f"FAIL {err.kind}"] += 1
            counts["failures"] += 1
            if shown[err.kind] < show:
                shown[err.kind] += 1
                print(f"--- graph {i} (seed {s}) {err}", file=out)
            if stop:
                break
            continue
        counts["passed"] += 1
        if facts.get("lrp0_checked"):
            counts["lrp0=x*grad checked"] += 1
        if facts.get("documented"):
            counts[f"documented:{facts['documented']} (lossy graph)"] += 1
        if facts.get("unmeasured"):
            counts["documented:unmeasured (lossy graph)"] += 1
    counts["seconds"] = int(time.perf_counter() - t0)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamiclrp.testing.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="failures printed per kind")
    parser.add_argument("--stop", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts = run(args.graphs, args.seed, args.show, args.stop)
    for k in sorted(counts):
        print(f"{k:<40} {counts[k]}")
    return 1 if counts["failures"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
