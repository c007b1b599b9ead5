"""AttnLRP and CP-LRP against the explicit references of ``tests/reference/attention.py``, and on HF models.

The reference propagates explicit relevance op by op, exactly as the rules are written (AttnLRP: Achtibat et al.,
ICML 2024, Eqs. 7-9 and Props. 3.1-3.4; CP-LRP: Ali et al., ICML 2022); it never uses gradients. Our engine runs the
same blocks written as ordinary torch modules (``nn.Linear`` projections, explicit softmax or
``F.scaled_dot_product_attention`` on the CPU-flash and math backends, additive masks with ``-inf`` entries, causal
masking, grouped-query attention, gated and plain MLPs, RMSNorm/LayerNorm, a pre-norm layer).

Stabilizers: the ``attnlrp``/``cplrp`` presets use LXT's convention, ε = 0 on linear layers (LRP-0, bias as a sink)
and exact (ε = 0) rules on normalisers, products and sums, i.e. ``Eps(linear=0, norm=0, product=0, add=0)`` in the
reference; ``attnlrp(epsilon=1e-6)`` is checked against ``Eps(linear=1e-6, ...)``. CP-LRP: ``presets.cplrp()`` treats the activated gate of a gated MLP as a constant, as LXT's CP-LRP does
(``cp_gated_mlp_forward`` detaches the gate projection; ``docs/dev/lxt-notes.md``), which is the reference's default
``gate_constant=None → True`` in CP mode; ``presets.cplrp(gate_constant=False)`` gives the uniform rule there.

HF models: LXT itself cannot be imported here (LXT 2.1 does not support transformers 5), so "LXT's AttnLRP" is
represented by the reference, which re-derives LXT's rules (``docs/dev/lxt-notes.md``). We compare a real
``LlamaDecoderLayer`` (with the identity rotary embedding cos = 1, sin = 0, so the layer is the reference's pre-norm
layer) and a real ``BertLayer`` (post-norm, composed from the reference's pieces). HF Llama upcasts softmax and
RMSNorm to float32 even in a float64 model, so that comparison agrees to ~3e-6 rather than to rounding.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.testing import zoo
from reference import attention as at

DT = torch.float64
EPS = at.Eps(linear=0.0, norm=0.0, product=0.0, add=0.0)
EPS6 = at.Eps(linear=1e-6, norm=0.0, product=0.0, add=0.0)



# --------------------------------------------------------------------------------------------------------------
# The reference blocks as ordinary torch modules
# --------------------------------------------------------------------------------------------------------------
def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(DT)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


class Attention(nn.Module):
    """Multi-head / grouped-query attention; ``impl`` is ``"explicit"`` (matmul + softmax), ``"sdpa"`` (fused CPU
    flash node) or ``"math"`` (SDPA's decomposed math backend)."""

    def __init__(self, w: at.AttentionWeights, impl: str = "explicit"):
        super().__init__()
        self.q, self.k, self.v, self.o = (_linear(w.wq, w.bq), _linear(w.wk, w.bk), _linear(w.wv, w.bv),
                                          _linear(w.wo, w.bo))
        self.h, self.hkv, self.dh, self.scale, self.impl = w.n_heads, w.n_kv_heads, w.head_dim, w.scale, impl

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, t, self.hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(b, t, self.hkv, self.dh).transpose(1, 2)
        if self.impl == "explicit":
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
            s = (q @ k.transpose(-1, -2)) * self.scale
            if mask is not None:
                s = s + mask
            if causal:
                s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.softmax(s, dim=-1) @ v
        else:
            if causal and mask is not None:  # SDPA takes one or the other: fold the causal mask in
                mask = mask.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
                causal = False
            backend = SDPBackend.MATH if self.impl == "math" else SDPBackend.FLASH_ATTENTION
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   enable_gqa=self.h != self.hkv)
        return self.o(o.transpose(1, 2).reshape(b, t, self.h * self.dh))


class MLP(nn.Module):
    def __init__(self, w: at.MLPWeights):
        super().__init__()
        self.up, self.down = _linear(w.w_up, w.b_up), _linear(w.w_down, w.b_down)
        self.gate = _linear(w.w_gate, w.b_gate) if w.gated else None
        self.act = nn.SiLU() if w.act == "silu" else nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class RMSNorm(nn.Module):
    """RMSNorm written out (``x * rsqrt(mean(x²) + eps) * w``): the normaliser is found from the graph."""

    def __init__(self, w: at.NormWeights):
        super().__init__()
        self.weight = nn.Parameter(w.weight.clone())
        self.eps = w.eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _norm(w: at.NormWeights) -> nn.Module:
    if w.kind == "rms":
        return RMSNorm(w)
    m = nn.LayerNorm(w.weight.shape[0], eps=w.eps).to(DT)
    with torch.no_grad():
        m.weight.copy_(w.weight)
        m.bias.copy_(w.bias)
    return m


class Layer(nn.Module):
    def __init__(self, w: at.TransformerLayerWeights, impl: str):
        super().__init__()
        self.n1, self.attn, self.n2, self.mlp = _norm(w.norm1), Attention(w.attn, impl), _norm(w.norm2), MLP(w.mlp)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        h = x + self.attn(self.n1(x), mask, causal)
        return h + self.mlp(self.n2(h))


def _err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


#: the bound the README states for AttnLRP/CP-LRP against the independent references (measured: <= 3.1e-13, the
#: attention block through SDPA with an additive mask; <= 1e-13 elsewhere) and for a real HF BertLayer (9.7e-15)
REF = 1e-12
BERT = 1e-13


def _inputs(seed: int, shape=(2, 5, 16)) -> tuple[torch.Generator, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(*shape, generator=g, dtype=DT, requires_grad=True)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["none", "additive", "causal", "both"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("impl", ["explicit", "sdpa", "math"])
@pytest.mark.parametrize("mode", ["attnlrp", "cplrp", "attnlrp_eps", "cplrp_eps"])
def test_attention_block(mode: str, impl: str, heads: tuple[int, int], mask_kind: str) -> None:
    w = at.make_attention(16, heads[0], heads[1], bias=True, seed=1)
    g, x = _inputs(0)
    mask = None
    if mask_kind in ("additive", "both"):
        mask = 0.5 * torch.randn(2, 1, 5, 5, generator=g, dtype=DT)
        mask[0, 0, 1, 3] = float("-inf")  # a masked key
    causal = mask_kind in ("causal", "both")
    y = Attention(w, impl)(x, mask, causal)
    seed = torch.randn(y.shape, generator=g, dtype=DT)
    eps = mode.endswith("_eps")
    mode = mode.removesuffix("_eps")
    rules = getattr(presets, mode)(epsilon=1e-6) if eps else mode
    ex = dynamiclrp.explain(y, x, seed, rules=rules)
    ref = at.attention_relevance(x.detach(), w, seed, mode, EPS6 if eps else EPS, mask, causal)
    assert _err(ex.relevance[0], ref["x"]) <= REF
    assert abs(ex.unaccounted) <= 1e-9 * float(seed.abs().sum())
    kinds = ex.ledger.by_kind()
    if mode == "cplrp":  # attention weights constant: nothing is lost to the softmax rule
        assert kinds.get("rule", 0.0) == 0.0
    else:
        assert abs(kinds["rule"]) > 1e-6  # the softmax rule absorbs relevance (AttnLRP Prop. 3.1)


def test_bidirectional_attention_is_not_causally_masked() -> None:
    """The softmax rule runs on the true logits: with no mask, later tokens get relevance for position 0."""
    w = at.make_attention(16, 4, 4, bias=True, seed=3)
    g, x = _inputs(1)
    for impl in ("explicit", "sdpa"):
        y = Attention(w, impl)(x)
        seed = torch.zeros_like(y)
        seed[:, 0] = y[:, 0].detach()
        x_rel = dynamiclrp.relevance(y, x, seed, rules="attnlrp")[0]
        ref = at.attention_relevance(x.detach(), w, seed, "attnlrp", EPS)["x"]
        assert _err(x_rel, ref) <= REF
        # relevance of later tokens through q/k (x_from_k) is non-zero
        assert ref[:, 1:].abs().sum() > 1e-3 and x_rel[:, 1:].abs().sum() > 1e-3


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("mode", ["attnlrp", "cplrp", "cplrp_uniform_gate"])
def test_mlp_block(mode: str, gated: bool, act: str) -> None:
    w = at.make_mlp(16, 32, gated=gated, act=act, seed=2)
    g, x = _inputs(2)
    y = MLP(w)(x)
    seed = torch.randn(y.shape, generator=g, dtype=DT)
    rules = presets.cplrp(gate_constant=False) if mode == "cplrp_uniform_gate" else mode
    ex = dynamiclrp.explain(y, x, seed, rules=rules)
    ref_mode = "attnlrp" if mode == "attnlrp" else "cplrp"
    ref = at.mlp_relevance(x.detach(), w, seed, ref_mode, EPS, gate_constant=(mode == "cplrp") if gated else None)
    assert _err(ex.relevance[0], ref["x"]) <= REF
    assert abs(ex.unaccounted) <= 1e-9 * float(seed.abs().sum())
    if mode == "cplrp":
        assert ex.ledger.by_kind().get("rule", 0.0) == 0.0


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("mode", ["attnlrp", "cplrp"])
def test_norm_block(mode: str, kind: str) -> None:
    w = at.make_norm(kind, 16, seed=3)
    g, x = _inputs(3)
    y = _norm(w)(x)
    seed = torch.randn(y.shape, generator=g, dtype=DT)
    ex = dynamiclrp.explain(y, x, seed, rules=mode)
    assert _err(ex.relevance[0], at.norm_relevance(x.detach(), w, seed, EPS)["x"]) <= REF
    assert abs(ex.unaccounted) <= 1e-9 * float(seed.abs().sum())


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("mode", ["attnlrp", "cplrp"])
def test_prenorm_transformer_layer(mode: str, kind: str, impl: str) -> None:
    w = at.make_transformer_layer(16, 4, 2, 32, norm=kind, seed=4)
    g, x = _inputs(4)
    y = Layer(w, impl)(x, None, True)
    seed = torch.randn(y.shape, generator=g, dtype=DT)
    ex = dynamiclrp.explain(y, x, seed, rules=mode)
    ref = at.transformer_layer_relevance(x.detach(), w, seed, mode, EPS, None, True)
    assert _err(ex.relevance[0], ref["x"]) <= REF
    assert abs(ex.unaccounted) <= 1e-9 * float(seed.abs().sum())


# --------------------------------------------------------------------------------------------------------------
# Hugging Face layers
# --------------------------------------------------------------------------------------------------------------
def _weights(lin: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()


def _perturb_vectors(module: nn.Module) -> None:
    """Random norm weights and biases so that none is the identity / zero."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_llama_decoder_layer_equals_reference(impl: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = zoo.tiny_hf_config("llama", num_key_value_heads=2)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(cfg, 0).to(DT).eval()
    _perturb_vectors(layer)
    a, m = layer.self_attn, layer.mlp
    aw = at.AttentionWeights(*_weights(a.q_proj), *_weights(a.k_proj), *_weights(a.v_proj), *_weights(a.o_proj),
                             cfg.num_attention_heads, cfg.num_key_value_heads)
    assert aw.scale == pytest.approx(a.scaling)
    mw = at.MLPWeights(*_weights(m.up_proj), *_weights(m.down_proj), *_weights(m.gate_proj), act="silu")
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    lw = at.TransformerLayerWeights(at.NormWeights("rms", n1.weight.detach().clone(), None, n1.variance_epsilon), aw,
                                    at.NormWeights("rms", n2.weight.detach().clone(), None, n2.variance_epsilon), mw)
    g, x = _inputs(6, (2, 5, cfg.hidden_size))
    t = x.shape[1]
    mask = torch.zeros(2, 1, t, t, dtype=DT).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    identity_rope = (torch.ones(2, t, head_dim, dtype=DT), torch.zeros(2, t, head_dim, dtype=DT))
    y = layer(x, attention_mask=mask, position_embeddings=identity_rope)
    y = y[0] if isinstance(y, tuple) else y
    seed = torch.randn(y.shape, generator=g, dtype=DT)
    for mode in ("attnlrp", "cplrp"):
        ex = dynamiclrp.explain(y, x, seed, rules=mode)
        ref = at.transformer_layer_relevance(x.detach(), lw, seed, mode, EPS, mask, False)
        assert _err(ex.relevance[0], ref["x"]) <= 1e-5, mode  # measured ~3e-6: HF's float32 softmax/RMSNorm


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_bert_layer_equals_reference(impl: str) -> None:
    """Post-norm BERT layer ``y = LN2(m + h)``, ``h = LN1(attn(x) + x)``, reference composed from its pieces."""
    transformers = pytest.importorskip("transformers")
    cfg = zoo.tiny_hf_config("bert")
    cfg._attn_implementation = impl
    cfg.hidden_act = "gelu"
    torch.manual_seed(0)
    layer = transformers.models.bert.modeling_bert.BertLayer(cfg).to(DT).eval()
    _perturb_vectors(layer)
    sa, so = layer.attention.self, layer.attention.output
    h = cfg.num_attention_heads
    aw = at.AttentionWeights(*_weights(sa.query), *_weights(sa.key), *_weights(sa.value), *_weights(so.dense), h, h)
    mw = at.MLPWeights(*_weights(layer.intermediate.dense), *_weights(layer.output.dense), act="gelu")
    ln1, ln2 = so.LayerNorm, layer.output.LayerNorm
    g, x = _inputs(7, (2, 5, cfg.hidden_size))
    mask = torch.zeros(2, 1, 5, 5, dtype=DT)
    mask[1, :, :, -2:] = torch.finfo(DT).min  # padding of the second sequence, as HF writes it
    y = layer(x, attention_mask=mask)
    y = y[0] if isinstance(y, tuple) else y
    seed = torch.randn(y.shape, generator=g, dtype=DT)
    xd = x.detach()
    a = at.attention_forward(xd, aw, mask)["y"]
    u1 = a + xd
    h1 = F.layer_norm(u1, (cfg.hidden_size,), ln1.weight.detach(), ln1.bias.detach(), ln1.eps)
    m = at.mlp_forward(h1, mw)["y"]
    u2 = m + h1
    for mode in ("attnlrp", "cplrp"):
        ex = dynamiclrp.explain(y, x, seed, rules=mode)
        r_u2 = at.layernorm_relevance(u2, ln2.weight.detach(), ln2.bias.detach(), seed, EPS.norm, ln2.eps)
        r_m, r_h1 = at.add_relevance(m, h1, r_u2, EPS.add)
        r_h1 = r_h1 + at.mlp_relevance(h1, mw, r_m, mode, EPS)["x"]
        r_u1 = at.layernorm_relevance(u1, ln1.weight.detach(), ln1.bias.detach(), r_h1, EPS.norm, ln1.eps)
        r_a, r_x = at.add_relevance(a, xd, r_u1, EPS.add)
        r_x = r_x + at.attention_relevance(xd, aw, r_a, mode, EPS, mask)["x"]
        assert _err(ex.relevance[0], r_x) <= BERT, mode


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_cplrp_conserves_on_tiny_hf_models(name: str, impl: str) -> None:
    """CP-LRP is conservative by construction: the ledger accounts for every unit of seed relevance with no
    non-conservative rule sink (only ε stabilizers, biases and the position/type-embedding tables)."""
    pytest.importorskip("transformers")
    entry = zoo.build(name, attn_implementation=impl)
    outputs, inputs = entry.run()
    ex = dynamiclrp.explain(outputs, inputs, rules="cplrp")
    led = ex.ledger
    scale = abs(led.seed_total)
    assert abs(led.unaccounted) <= 1e-5 * scale
    assert not led.unmeasured
    assert led.by_kind().get("rule", 0.0) == 0.0
    assert abs(led.by_kind().get("stabilizer", 0.0)) <= 1e-3 * scale
    # AttnLRP on the same model: the softmax rule is not conservative, and the ledger names it
    ex_attn = dynamiclrp.explain(outputs, inputs, rules="attnlrp")
    assert abs(ex_attn.ledger.unaccounted) <= 1e-5 * scale
    assert abs(ex_attn.ledger.by_kind().get("rule", 0.0)) > 1e-4 * scale


# --------------------------------------------------------------------------------------------------------------
# The paper preset
# --------------------------------------------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x + torch.relu(self.a(x))
        h = h + torch.relu(self.b(h)) * h.sigmoid()
        return self.c(h.mean(0, keepdim=True) + h)


def test_paper_preset_magnitude_split_on_an_add() -> None:
    """``c = a + b``: ``R_a = |a| / (|a| + |b|) · R`` (the paper's §2.2 rule), recovered through promises."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4, 6, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(4, 6, generator=g, dtype=DT, requires_grad=True)
    c = torch.tanh(a) * 2 + torch.exp(b)  # operands of the add are not saved by autograd
    seed = torch.randn(c.shape, generator=g, dtype=DT)
    ta, tb = torch.tanh(a.detach()) * 2, torch.exp(b.detach())
    ra, rb = dynamiclrp.relevance(c, [a, b], seed, rules="paper")
    torch.testing.assert_close(ra, ta.abs() / (ta.abs() + tb.abs() + 1e-11) * seed)
    torch.testing.assert_close(rb, tb.abs() / (ta.abs() + tb.abs() + 1e-11) * seed)
    # the same split on a product of two tensors
    p = torch.tanh(a) * torch.exp(b)
    ra, rb = dynamiclrp.relevance(p, [a, b], seed, rules="paper")
    ta, tb = torch.tanh(a.detach()), torch.exp(b.detach())
    torch.testing.assert_close(ra, ta.abs() / (ta.abs() + tb.abs() + 1e-11) * seed)


def test_paper_preset_runs_on_residual_mlp_and_tiny_bert() -> None:
    model = ResidualMLP().to(DT)
    x = torch.randn(4, 8, dtype=DT, requires_grad=True)
    y = model(x)[:, 0]
    ex = dynamiclrp.explain(y, x, rules="paper")
    assert torch.isfinite(ex.relevance[0]).all() and ex.relevance[0].abs().sum() > 0
    assert abs(ex.unaccounted) <= 1e-9 * float(y.detach().abs().sum())
    pytest.importorskip("transformers")
    outputs, inputs = zoo.build("bert").run()
    ex = dynamiclrp.explain(outputs, inputs, rules="paper")
    assert torch.isfinite(ex.relevance[0]).all() and ex.relevance[0].abs().sum() > 0
    assert abs(ex.unaccounted) <= 1e-5 * abs(ex.ledger.seed_total)
    assert not ex.ledger.unmeasured
