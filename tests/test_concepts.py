"""Concept Relevance Propagation beyond zennit-crp: conditions on graph tensors of any architecture.

Per-head and per-MLP-neuron concept relevance of tiny random LLaMA, BERT and ViT models (``dynamiclrp.testing.zoo``,
float64, eager attention) with AttnLRP, named without hooks: ``Layer("…o_proj", at="input")`` is the concatenated
head outputs entering the attention output projection, ``Layer("…down_proj", at="input")`` the hidden neurons
entering the MLP's down projection — both found in the autograd graph by the identity of the module's weight.
The properties (the CNN/ResNet numbers against zennit-crp are in ``test_crp_parity.py``):

* a mask of all units with ``exclude_parallel=False`` changes nothing;
* conditional heatmaps are linear in the condition: over a partition of the heads (neurons) they sum to the heatmap
  of all of them, and the vectorised pass equals one pass per concept (``passes`` 1 vs n);
* a condition masks exactly its units: relevance captured at the conditioned tensor is the unconditioned one on
  the chosen head's slice and zero elsewhere, and the per-head scores of ``concept_relevance`` are those slices'
  sums;
* the ledger closes with conditions (what a condition removes is booked as ``condition`` sinks).

LLaMA's rule sets are linear in their seed only up to ~7e-8 (measured unconditioned: seeds 0.3·y and 0.7·y sum
to the heatmap of y within 6.7e-8, and the plain ledger leaves 1.7e-8 unaccounted), so sums are compared at 1e-6.
"""
from __future__ import annotations

import contextlib

import numpy as np

import pytest
import torch

import dynamiclrp
from dynamiclrp import concepts
from dynamiclrp.conditions import Layer, Units, as_units, channels, heads, layer_edge, neurons
from dynamiclrp.core.run import compute
from dynamiclrp.errors import ConditionError
from dynamiclrp.presets import resolve
from dynamiclrp.rules import Identity
from dynamiclrp.rules.elementwise import IdentityStep
from dynamiclrp.testing import zoo

LAYERS = {  # (attention output projection, MLP down projection)
    "llama": ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "bert": ("bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.0.output.dense"),
    "vit": ("vit.layers.1.attention.o_proj", "vit.layers.0.mlp.fc2"),
}
TOL = 1e-6


@contextlib.contextmanager
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


_BUILT: dict[str, zoo.ZooEntry] = {}


def build(name: str):
    if name not in _BUILT:
        with float64():
            entry = zoo.build(name, attn_implementation="eager")
            entry.model.double()
        _BUILT[name] = entry
    entry = _BUILT[name]
    with float64():
        out, inp = entry.run()
    return entry, out, inp


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(LAYERS))
def test_heads_and_neurons(name: str) -> None:
    entry, out, inp = build(name)
    model, n_heads = entry.model, entry.config.num_attention_heads
    attn, mlp = Layer(LAYERS[name][0], at="input"), Layer(LAYERS[name][1], at="input")
    plain = dynamiclrp.relevance(out, inp, rules="attnlrp", model=model)[0]
    every = dynamiclrp.relevance(out, inp, rules="attnlrp", model=model, exclude_parallel=False,
                                 conditions={attn: heads(list(range(n_heads)), n_heads)})[0]
    assert err(every, plain) <= 1e-12
    for layer, units, n in ((attn, lambda u: heads([u], n_heads), n_heads), (mlp, lambda u: neurons([u]), None)):
        if n is None:
            n = concepts.concept_relevance(out, layer, rules="attnlrp", model=model, unit="neuron").relevance.shape[1]
            groups = [list(range(k, n, 4)) for k in range(4)]  # four groups of neurons
            conds = [{layer: neurons(g)} for g in groups]
            all_units: Units = neurons(list(range(n)))
        else:
            conds = [{layer: units(u)} for u in range(n)]
            all_units = heads(list(range(n)), n)
        per = concepts.conditional_relevance(out, inp, conds, rules="attnlrp", model=model)[0]
        looped = concepts.conditional_relevance(out, inp, conds, rules="attnlrp", model=model, vectorize=False)[0]
        together = dynamiclrp.relevance(out, inp, rules="attnlrp", model=model, conditions={layer: all_units})[0]
        assert per.shape == (len(conds), *inp.shape)
        assert err(per, looped) <= 1e-12
        assert err(per.sum(0), together) <= TOL
        assert float(per.abs().sum()) > 0


@pytest.mark.parametrize("name", list(LAYERS))
def test_one_vectorised_pass_over_heads(name: str) -> None:
    entry, out, inp = build(name)
    model, n_heads = entry.model, entry.config.num_attention_heads
    edge = layer_edge(out, Layer(LAYERS[name][0], at="input"), model)
    shape = edge.node._input_metadata[edge.output_nr].shape  # (batch, tokens, heads · head size)
    assert shape[-1] % n_heads == 0 and len(shape) == 3
    masks = torch.stack([heads([h], n_heads).mask(shape, torch.float64) for h in range(n_heads)])
    ex = compute(out, inp, rules=resolve("attnlrp"), model=model, conditions=[(edge, masks)], concepts=n_heads)
    assert ex.passes == 1 and ex.relevance[0].shape == (n_heads, *inp.shape)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_condition_masks_exactly_its_units(name: str) -> None:
    entry, out, inp = build(name)
    model, n_heads = entry.model, entry.config.num_attention_heads
    layer = Layer(LAYERS[name][0], at="input")
    edge = layer_edge(out, layer, model)
    (full,) = dynamiclrp.relevance(out, edge, rules="attnlrp", model=model)
    size = full.shape[-1] // n_heads
    scores = concepts.concept_relevance(out, layer, rules="attnlrp", model=model, unit="head", heads=n_heads)
    torch.testing.assert_close(scores.relevance, full.reshape(*full.shape[:2], n_heads, size).sum((1, 3)))
    assert scores.activation is not None and scores.activation.shape == scores.relevance.shape
    best = scores.top(1)[0][0]
    (masked,) = dynamiclrp.relevance(out, edge, rules="attnlrp", model=model,
                                     conditions={layer: heads([best], n_heads)})
    keep = torch.zeros(full.shape[-1], dtype=torch.bool)
    keep[best * size:(best + 1) * size] = True
    torch.testing.assert_close(masked[..., keep], full[..., keep], rtol=0, atol=0)
    assert bool((masked[..., ~keep] == 0).all())
    ranked = [u for u, _ in scores.ranked()]
    assert sorted(ranked) == list(range(n_heads)) and ranked[0] == best


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_ledger_closes_with_conditions(name: str) -> None:
    entry, out, inp = build(name)
    model, n_heads = entry.model, entry.config.num_attention_heads
    layer = Layer(LAYERS[name][0], at="input")
    for exclude in (True, False):
        ex = dynamiclrp.explain(out, inp, rules="attnlrp", model=model, exclude_parallel=exclude,
                                conditions={layer: heads([0], n_heads)})
        seed = ex.ledger.seed_total
        assert abs(ex.unaccounted) <= 1e-6 * max(abs(seed), 1.0), ex.ledger.summary()
        assert not ex.ledger.unmeasured, ex.ledger.unmeasured
        assert any(s.kind == "condition" for s in ex.ledger.sinks)


# ----------------------------------------------------------------------------------------------------------------
# CNN: hierarchy, names, errors
# ----------------------------------------------------------------------------------------------------------------
def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 3)).double().eval().requires_grad_(False)


def test_decomposition_and_hierarchy() -> None:
    """A concept's sub-concepts: the relevance of the lower layer's channels through it (one "and" condition per
    level of the tree); over all upper channels they add up to the lower layer's unconditioned relevance."""
    net = small_cnn()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    out = net(x)[:, 1]
    lower = concepts.concept_relevance(out, "0", model=net)
    parts = [concepts.decompose(out, "2", [c], "0", model=net).relevance for c in range(6)]
    torch.testing.assert_close(sum(parts), lower.relevance, rtol=1e-10, atol=1e-14)
    tree = concepts.hierarchy(out, ["2", "0"], concept=3, k=2, model=net)
    assert tree.layer == "2" and tree.unit == 3 and len(tree.children) == 2
    want = concepts.decompose(out, "2", [3], "0", model=net).top(2)
    assert [(c.unit, pytest.approx(c.relevance)) for c in tree.children] == [(u, pytest.approx(v)) for u, v in want]
    assert "2[3]" in str(tree)


def test_names_tensors_and_edges_agree() -> None:
    net = small_cnn()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    h = net[1](net[0](x))  # held: the first ReLU's output
    out = net[5](net[4](net[3](net[2](h))))[:, 0]
    by_tensor = dynamiclrp.relevance(out, x, model=net, conditions={h: {"channel": [1, 3]}})[0]
    by_name = dynamiclrp.relevance(out, x, model=net, conditions={"0": channels([1, 3])})[0]
    by_edge = dynamiclrp.relevance(out, x, model=net, conditions={layer_edge(out, "0", net): [1, 3]})[0]
    torch.testing.assert_close(by_tensor, by_name, rtol=0, atol=0)  # a channel mask commutes with the ReLU
    torch.testing.assert_close(by_edge, by_name, rtol=0, atol=0)
    explainer = dynamiclrp.Explainer(model=net)
    for _ in range(2):  # the second call reuses the plan
        torch.testing.assert_close(explainer.relevance(out, x, conditions={"0": [1, 3]})[0], by_name)
    assert explainer.cache_info()["hits"] == 1
    mask = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    mask[0, [1, 3]] = 1
    torch.testing.assert_close(dynamiclrp.relevance(out, x, model=net, conditions={h: mask})[0], by_tensor)


def test_units_and_helpful_errors() -> None:
    assert as_units({"head": [1], "heads": 4}) == Units([1], dim=-1, groups=4)
    assert heads([1], 4).mask((2, 3, 8)).reshape(-1).tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert channels([[0], [2]]).mask((2, 3, 4, 4)).shape == (2, 3, 1, 1)
    net = small_cnn()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    out = net(x)[:, 0]
    with pytest.raises(ConditionError, match="no module 'features.0'"):
        dynamiclrp.relevance(out, x, model=net, conditions={"features.0": [1]})
    with pytest.raises(ConditionError, match="owns no parameters"):
        dynamiclrp.relevance(out, x, model=net, conditions={"1": [1]})
    with pytest.raises(ConditionError, match="pass model=model"):
        dynamiclrp.relevance(out, x, conditions={"0": [1]})
    with pytest.raises(ConditionError, match="out of range"):
        dynamiclrp.relevance(out, x, model=net, conditions={"0": [9]})
    with pytest.raises(ConditionError, match="not in the autograd graph"):
        dynamiclrp.relevance(out, x, conditions={torch.ones(2, 3, requires_grad=True): [0]})


def test_parallel_conditions_need_exclude_parallel_false() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 5).double(), torch.nn.Linear(4, 5).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    ha, hb = a(x), b(x)
    out = (ha * 2 + hb).sum(1)
    with pytest.raises(ConditionError, match="parallel branches"):
        dynamiclrp.relevance(out, x, conditions={ha: [0], hb: [1]})
    r = dynamiclrp.relevance(out, x, conditions={ha: [0], hb: [1]}, exclude_parallel=False)[0]
    ra = dynamiclrp.relevance(out, x, conditions={ha: [0]}, exclude_parallel=True)[0]
    rb = dynamiclrp.relevance(out, x, conditions={hb: [1]}, exclude_parallel=True)[0]
    torch.testing.assert_close(r, ra + rb)


# ----------------------------------------------------------------------------------------------------------------
# reference samples: the dataset store
# ----------------------------------------------------------------------------------------------------------------
def test_reference_samples_from_a_dataset_store(tmp_path) -> None:
    """``attribute_dataset(concepts=...)`` stores every unit's relevance and activation from the same pass (the
    heatmaps are bit for bit those of a store without concepts); Relevance Maximization reads them back."""
    net = small_cnn().float()
    gen = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.rand(40, 1, 6, 6, generator=gen),
                                          torch.randint(0, 3, (40,), generator=gen))
    plain = dynamiclrp.attribute_dataset(net, data, target="label", batch_size=16, out=tmp_path / "a.zarr",
                                         progress=False)
    dynamiclrp.attribute_dataset(net, data, target="label", batch_size=16, out=tmp_path / "b.zarr", progress=False,
                                 concepts=["2"])
    a, b = dynamiclrp.dataset.open_store(tmp_path / "a.zarr"), dynamiclrp.dataset.open_store(tmp_path / "b.zarr")
    assert plain.n_samples == 40
    assert np.array_equal(a["relevance"][:], b["relevance"][:])
    rel, act = np.asarray(b["concepts/2/relevance"][:]), np.asarray(b["concepts/2/activation"][:])
    assert rel.shape == act.shape == (40, 6)
    x = data.tensors[0][:16].clone().requires_grad_(True)
    out = net(x).gather(1, data.tensors[1][:16, None]).squeeze(1)
    want = concepts.concept_relevance(out, "2", model=net)
    np.testing.assert_allclose(rel[:16], want.relevance.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(act[:16], want.activation.numpy(), rtol=1e-6, atol=1e-7)

    refs = concepts.reference_samples(tmp_path / "b.zarr", "2", k=5)
    share = rel / (np.abs(rel).sum(1, keepdims=True) + 1e-10)
    for u in range(6):
        idx = [i for i, _ in refs.of(u)]
        assert idx == list(np.argsort(-share[:, u], kind="stable")[:5])
    by_act = concepts.reference_samples(tmp_path / "b.zarr", "2", k=3, by="activation")
    assert [i for i, _ in by_act.of(0)] == list(np.argsort(-act[:, 0], kind="stable")[:3])
    only = concepts.reference_samples(tmp_path / "b.zarr", "2", k=40, target=1)
    labels = data.tensors[1].numpy()
    assert set(i for i, _ in only.of(0)) == set(np.flatnonzero(labels == 1))
    with pytest.raises(ConditionError, match="no concept arrays"):
        concepts.reference_samples(tmp_path / "a.zarr", "2")

    heat = concepts.reference_heatmaps(net, data, refs, [0, 4], store=tmp_path / "b.zarr", frac=0.5)
    assert sorted(heat) == [0, 4] and len(heat[0]) == 5
    r = heat[0][0]
    top, left, bottom, right = r.box
    assert r.image.shape[-2:] == r.heatmap.shape[-2:] == (bottom - top, right - left)
    assert 3 <= bottom - top <= 6 and 3 <= right - left <= 6
    # the uncropped heatmap is the conditional relevance of the stored target through the unit
    full = concepts.reference_heatmaps(net, data, refs, [0], store=tmp_path / "b.zarr", crop=False)[0][0]
    i = full.index
    xi = data.tensors[0][i:i + 1].clone().requires_grad_(True)
    out = net(xi)[:, int(b["target"][i])]
    (want_heat,) = dynamiclrp.relevance(out, xi, model=net, conditions={"2": [0]})
    torch.testing.assert_close(full.heatmap, want_heat[0])
    pytest.importorskip("matplotlib")
    fig = concepts.plot_references({"unit 0": heat[0], "unit 4": heat[4]}, path=tmp_path / "refs.png")
    assert (tmp_path / "refs.png").stat().st_size > 0 and fig is not None


class _BranchingStep(IdentityStep):
    """The identity rule, but deciding something from the values of the relevance it receives (which a
    vectorised pass cannot: ``bool`` of a batched tensor)."""

    def __call__(self, run, outs):
        m = outs[0]
        if m is not None and m.g is not None and bool((m.g != 0).any()):
            return super().__call__(run, outs)
        return super().__call__(run, outs)


class _Branching(Identity):
    def bind(self, site):
        super().bind(site)
        return _BranchingStep(site)


def test_steps_that_cannot_be_vectorised_get_one_pass_per_concept() -> None:
    net = small_cnn()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    out = net(x)[:, 1]
    edge = layer_edge(out, "2", net)
    masks = torch.stack([channels([u]).mask((2, 6, 6, 6), torch.float64) for u in range(6)])
    plain = compute(out, x, rules=resolve(None), conditions=[(edge, masks)], concepts=6, model=net)
    rules = resolve(None).with_families(activation=_Branching())
    got = compute(out, x, rules=rules, conditions=[(edge, masks)], concepts=6, model=net)
    assert plain.passes == 1 and got.passes == 6
    torch.testing.assert_close(got.relevance[0], plain.relevance[0], rtol=1e-12, atol=1e-15)
