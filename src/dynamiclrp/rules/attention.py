"""Softmax and attention: the AttnLRP softmax rule on the true logits, fused scaled-dot-product attention, and
CP-LRP (attention weights constant)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.graph import call_backward, output_meta, saved
from ..core.messages import Msg, gmsg
from ..core.step import Step
from ..errors import RuleError
from ..ops.attention import LogsumexpKernel, SoftmaxKernel
from .base import Rule, _child_meta, _fit, _wrong_family
from .products import _bind_product

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor


class SoftmaxStep(Step):
    """AttnLRP softmax rule ``R_x = x ⊙ (R − s ⊙ Σ_j R_j)``: in gradient form exactly the softmax's backward."""

    __slots__ = ("meta", "dim")

    def __init__(self, site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        return [gmsg(_fit(t, m)) for t, m in zip(call_backward(node, gs), self.meta)]

    conservative = False

    def input_totals(self, run, ins):
        """``Σ x·G_x`` with ``x = log s + c`` per row: the rule's ``G_x`` sums to zero per row, so ``c`` drops
        out and the total is measured exactly from the saved output alone."""
        m = ins[0] if ins else None
        if m is None or self.in_edges[0] < 0:
            return [None] * len(ins)
        s = saved(run.graph.nodes[self.index], "result")
        logs = torch.where(s > 0, torch.log(torch.where(s > 0, s, 1)), 0)
        t = None
        if m.g is not None:
            t = (logs.reshape(m.g.shape).to(m.g.dtype) * m.g).sum()
        if m.r is not None:
            t = m.r.sum() if t is None else t + m.r.sum()
        return [t] + [None] * (len(ins) - 1)


class Softmax(Rule):
    """The AttnLRP softmax rule (Achtibat et al. 2024), applied to the true (masked) logits: ``R_x = x ⊙ (R −
    s ⊙ Σ_j R_j)``. Not conservative (the per-row bias of the logits absorbs relevance)."""

    families = frozenset({"softmax"})

    def bind(self, site):
        if isinstance(site.spec.kernel, LogsumexpKernel):
            return LogsumexpStep(site)
        if not isinstance(site.spec.kernel, SoftmaxKernel):
            raise _wrong_family(self, site, site.spec.family)
        if site.spec.kernel.log:
            return LogSoftmaxStep(site)
        return SoftmaxStep(site)


class LogsumexpStep(Step):
    """``y = log Σ_j exp(x_j)``, a smooth maximum: relevance in proportion to the softmax weights, ``R_i =
    softmax(x)_i · R`` — the smooth form of max pooling's winner-take-all rule, as in the neuralized soft
    min/max-pooling layers of Kauffmann et al. (2022, "From clustering to cluster explanations via neural
    networks"). The weights sum to one, so the rule is exactly conservative; ``softmax(x)·R`` is the node's backward
    applied to the explicit relevance ``R = G·y``. (Held constant as a normaliser, ``x − logsumexp(x)`` gives all
    relevance to ``x``, as the log-softmax rule does.)"""

    __slots__ = ("meta",)
    handles_r = True

    def __init__(self, site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def _route(self, run, R):
        node = run.graph.nodes[self.index]
        return [Msg(r=_fit(t, m)) if t is not None and m is not None else None
                for t, m in zip(call_backward(node, [R]), self.meta)]

    def g(self, run, gs):
        g = gs[0]
        y = saved(run.graph.nodes[self.index], "result")
        return self._route(run, torch.where(g == 0, torch.zeros((), dtype=g.dtype, device=g.device), g * y))

    def r(self, run, rs):
        return self._route(run, rs[0])


class LogSoftmaxStep(Step):
    """``log_softmax(x) = x − logsumexp(x)`` with the normaliser constant: all relevance to ``x``."""

    __slots__ = ("meta",)
    handles_r = False

    def __init__(self, site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def g(self, run, gs):
        return [gmsg(_fit(gs[0], self.meta[0]))]

    conservative = False


class AttentionStep(Step):
    """Fused scaled-dot-product attention: the node's backward rescaled per operand.

    AttnLRP: uniform rule on ``A·V`` and ``Q·Kᵀ`` plus the softmax rule gives ``G_q = ∇_q / 4``,
    ``G_k = ∇_k / 4``, ``G_v = ∇_v / 2`` and ``G_mask = ∇_mask / 2`` (derived, not tuned). CP-LRP: the
    attention weights are constants, so ``G_v = ∇_v`` and nothing else. One backward of the fused kernel, no
    S×S matrix materialised beyond what the kernel itself uses.
    """

    __slots__ = ("factors", "meta", "conservative")

    def __init__(self, site, factors: tuple[float, ...]):
        super().__init__(site)
        self.factors = factors
        self.meta = _child_meta(site)
        # CP-LRP (values only) is exactly conservative; AttnLRP's softmax rule is not
        self.conservative = tuple(factors[:3]) == (0.0, 0.0, 1.0)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        metas = output_meta(node)
        # the fused kernels' backwards expect the gradient the autograd engine would pass: the output's dtype and,
        # for the CUDA kernels (cuDNN's checks it), the output's memory layout
        g0 = gs[0].to(metas[0].dtype)
        out = saved(node, "output")
        g0 = torch.empty_like(out).copy_(g0) if out is not None and out.shape == g0.shape else g0.contiguous()
        grads_in = [g0] + [None] * (len(metas) - 1)
        grads = call_backward(node, grads_in)
        res: list[Msg | None] = []
        for k, t in enumerate(grads[:self.n_in]):
            f = self.factors[k] if k < len(self.factors) else 0.0
            if t is None or f == 0 or self.in_edges[k] < 0:
                res.append(None)
            else:
                res.append(Msg(g=_fit(t * f, self.meta[k])))
        res += [None] * (self.n_in - len(res))
        return res

    def constant_share_zero(self, run, outs):
        return self.conservative  # CP-LRP sends nothing to a constant mask


class AttnLRP(Rule):
    """AttnLRP (Achtibat et al., ICML 2024) for fused attention nodes and softmax: uniform rule on the two
    matmuls and the softmax rule on the true logits."""

    families = frozenset({"attention", "softmax", "matmul", "product"})

    def bind(self, site):
        fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
        if fam == "attention":
            return AttentionStep(site, (0.25, 0.25, 0.5, 0.5))
        if fam == "softmax":
            return Softmax().bind(site)
        return _bind_product(self, site, detect=True)


class CPLRP(Rule):
    """CP-LRP (Ali et al., ICML 2022, "XAI for Transformers: Better Explanations through Conservative
    Propagation"): attention weights treated as constants, so attention relevance flows to the values only.
    Conservative by construction. Applies to fused attention, to products with a softmax output, and to softmax
    itself (which then receives nothing).

    Parameters
    ----------
    gate_constant : bool, optional
        Also treat the activated gate of a gated MLP (``act(gate(x)) * up(x)``: the operand produced by an
        element-wise non-linearity, when the other operand is not) as a constant, so that the product's relevance
        goes to ``up`` — what LXT's CP-LRP does (``cp_gated_mlp_forward`` detaches the gate projection; Ali et al.
        predate gated MLPs). Default ``True``. With ``False`` such products get the uniform rule (½ each), as in
        AttnLRP. Other products follow :class:`Product` (normalisers and sigmoid gates constant, self-gating
        products all to the signal).

    Examples
    --------
    >>> from dynamiclrp import presets
    >>> rules = presets.cplrp(gate_constant=False)   # CP-LRP on attention only
    """

    families = frozenset({"attention", "softmax", "matmul", "product"})

    def __init__(self, gate_constant: bool = True):
        if not isinstance(gate_constant, bool):
            raise RuleError(f"gate_constant must be True or False, got {gate_constant!r}")
        self.gate_constant = gate_constant

    def bind(self, site):
        fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
        if fam == "attention":
            return AttentionStep(site, (0.0, 0.0, 1.0, 0.0))
        if fam == "softmax":
            return Softmax().bind(site)
        return _bind_product(self, site, detect=True, softmax_constant=True)
