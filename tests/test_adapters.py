"""Adapters: the Captum-style ``dynamiclrp.LRP`` against Captum's own LRP, and the Quantus explain function."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.adapters import LRP, quantus_explain


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


class _CNN(nn.Module):
    """Only layers Captum's LRP supports (no nn.Flatten: Captum rejects it)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.ap = nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ap(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
        return self.fc(h.view(x.shape[0], -1))


class _TwoInputs(nn.Module):
    """Two inputs joined by concatenation (Captum treats an unmodelled ``+`` as two full copies of the relevance,
    so an addition of the branches would not be comparable)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.r, self.out = nn.Linear(4, 8), nn.Linear(3, 8), nn.ReLU(), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.out(self.r(torch.cat([self.a(x), self.b(y)], 1))) * scale


try:
    import captum.attr as captum_attr
except ImportError:  # pragma: no cover - captum is in the test extra
    captum_attr = None
needs_captum = pytest.mark.skipif(captum_attr is None, reason="captum is not installed (pip install .[test])")
pytestmark = [pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients"),
              pytest.mark.filterwarnings("ignore:The settings for perturbing input")]


# --------------------------------------------------------------------------------------------------------------
# numbers: where the rules coincide, dynamiclrp.LRP equals captum.attr.LRP
# --------------------------------------------------------------------------------------------------------------
@needs_captum
def test_equals_captum_epsilon_on_mlp_with_biases():
    """Captum's default EpsilonRule (eps=1e-9, bias in the denominator, sign(0)=+1) is dynamiclrp's ε-rule; both
    seed with the target output, so the numbers agree to rounding."""
    net = _mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    target = [0, 1, 2, 0, 1]
    ours = LRP(net, rules=presets.epsilon(1e-9)).attribute(x, target=target)
    theirs = captum_attr.LRP(net).attribute(x.clone(), target=target)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-9)
    # the library default (eps = 1e-6) is close but not identical
    default = LRP(net).attribute(x, target=target)
    torch.testing.assert_close(default, theirs, atol=1e-4, rtol=1e-3)


@needs_captum
def test_equals_captum_on_cnn_with_pooling_and_convergence_delta():
    torch.manual_seed(1)
    net = _CNN().double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    ours, d_ours = LRP(net, rules=presets.epsilon(1e-9)).attribute(x, target=1, return_convergence_delta=True)
    theirs, d_theirs = captum_attr.LRP(net).attribute(x.clone(), target=1, return_convergence_delta=True)
    assert ours.shape == theirs.shape == x.shape
    torch.testing.assert_close(ours, theirs, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(d_ours, d_theirs.detach(), atol=1e-8, rtol=1e-6)
    with torch.no_grad():
        out = net(x)[:, 1]
    torch.testing.assert_close(d_ours, out - ours.flatten(1).sum(1))


@needs_captum
def test_tuple_inputs_and_additional_forward_args_like_captum():
    torch.manual_seed(2)
    net = _TwoInputs().double().eval()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 0])
    ours = LRP(net, rules=presets.epsilon(1e-9)).attribute((x, y), target=target, additional_forward_args=(1.0,))
    theirs = captum_attr.LRP(net).attribute((x.clone(), y.clone()), target=target, additional_forward_args=(1.0,))
    assert isinstance(ours, tuple) and len(ours) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
    # the extra argument reaches the model: scaling the output by 2 scales every relevance by 2 (Captum, whose
    # hooks do not see the multiplication, would give 4x: it re-multiplies its normalised relevance by the output)
    doubled = LRP(net, rules=presets.epsilon(1e-9)).attribute((x, y), target=target, additional_forward_args=2.0)
    for a, b in zip(doubled, ours):
        torch.testing.assert_close(a, 2 * b, atol=1e-12, rtol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# semantics
# --------------------------------------------------------------------------------------------------------------
def test_inputs_and_model_are_not_modified():
    net = _mlp()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 6, dtype=torch.float64)
    x0 = x.clone()
    LRP(net).attribute(x, target=0)
    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_target_forms():
    torch.manual_seed(3)
    w = torch.randn(4, 2, 3, dtype=torch.float64)

    def seq_model(x):  # (N, 4) -> (N, 2, 3): outputs with more than two dimensions take tuple targets
        return torch.einsum("ni,ijk->njk", x, w)

    x = torch.randn(3, 4, dtype=torch.float64)
    lrp = LRP(seq_model, rules="zero")
    a = lrp.attribute(x, target=(1, 2))
    expected = x * w[:, 1, 2]  # LRP-0 on a linear map: x_i * w_i
    torch.testing.assert_close(a, expected)
    per_example = lrp.attribute(x, target=[(0, 0), (1, 2), (0, 1)])
    torch.testing.assert_close(per_example[1], expected[1])
    torch.testing.assert_close(per_example[0], x[0] * w[:, 0, 0])
    with pytest.raises(ValueError, match="has 1 index"):
        lrp.attribute(x, target=1)
    with pytest.raises(ValueError, match="out of range"):
        lrp.attribute(x, target=(2, 0))
    scalar = LRP(lambda x: (x * 2).sum(1), rules="zero")
    torch.testing.assert_close(scalar.attribute(x), 2 * x)
    with pytest.raises(ValueError, match="pass target=None"):
        scalar.attribute(x, target=0)
    with pytest.raises(ValueError, match="pass target=<index>"):
        LRP(_mlp()).attribute(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="got 3 targets for 2 examples"):
        LRP(_mlp()).attribute(torch.randn(2, 6, dtype=torch.float64), target=[0, 1, 2])


def test_integer_inputs_are_refused_with_a_hint():
    with pytest.raises(TypeError, match="attribute to the embeddings"):
        LRP(nn.Embedding(10, 4)).attribute(torch.tensor([[1, 2]]), target=0)


@needs_captum
def test_models_captum_cannot_explain_work():
    """A reused module and nn.Flatten: Captum's LRP raises, dynamiclrp.LRP explains (and conserves)."""
    torch.manual_seed(4)
    lin = nn.Linear(5, 5, bias=False)
    net = nn.Sequential(nn.Flatten(), lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(5, 2, bias=False)).double().eval()
    x = torch.rand(3, 1, 5, dtype=torch.float64)
    with pytest.raises((TypeError, RuntimeError)):
        captum_attr.LRP(net).attribute(x.clone(), target=0)
    attr, delta = LRP(net, rules="zero").attribute(x, target=0, return_convergence_delta=True)
    assert attr.shape == x.shape
    assert delta.abs().max() < 1e-10  # bias-free ReLU net, LRP-0: fully conservative


def test_is_exported_from_the_package():
    assert dynamiclrp.LRP is LRP and "LRP" in dynamiclrp.__all__
    assert LRP(_mlp()).has_convergence_delta() and LRP(_mlp()).multiplies_by_inputs


# --------------------------------------------------------------------------------------------------------------
# Quantus
# --------------------------------------------------------------------------------------------------------------
def test_quantus_explain_contract():
    torch.manual_seed(5)
    net = _CNN().eval()
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    a = quantus_explain(net, x, y)
    assert isinstance(a, np.ndarray) and a.shape == (4, 1, 8, 8) and a.dtype == np.float32
    direct = LRP(net, rules="epsilon").attribute(torch.from_numpy(x), target=torch.from_numpy(y)).sum(1, keepdim=True)
    np.testing.assert_allclose(a, direct.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(quantus_explain(net, x, y, reduce_axes=(), rules="zero"),
                               LRP(net, rules="zero").attribute(torch.from_numpy(x), target=list(y)).numpy(),
                               rtol=1e-5, atol=1e-7)
    last = quantus_explain(net, x.transpose(0, 2, 3, 1), y, channel_first=False, keepdims=False)
    np.testing.assert_allclose(last, a[:, 0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="explains logits"):
        quantus_explain(net, x, y, softmax=True)


def test_quantus_pixel_flipping_prefers_lrp_to_random(monkeypatch):
    """A real Quantus metric with dynamiclrp as its explain_func: on a trained digits CNN, LRP's pixel-flipping
    AUC (probability of the class while the most relevant pixels are removed) is far below a random ranking's."""
    quantus = pytest.importorskip("quantus")
    if not hasattr(np, "trapz"):  # Quantus 0.6 calls np.trapz, removed in NumPy 2; patched for this test only
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    from dynamiclrp import demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_tr, y_tr, x_te, y_te = demo.load_digits_split(0)
        model = demo.train_digits_cnn(x_tr, y_tr, epochs=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    x, y = x_te[:32].numpy(), y_te[:32].numpy()
    metric = quantus.PixelFlipping(features_in_step=4, perturb_baseline="black", return_auc_per_sample=True,
                                   disable_warnings=True, display_progressbar=False)
    lrp = metric(model=model, x_batch=x, y_batch=y, explain_func=quantus_explain,
                 explain_func_kwargs={"rules": "epsilon"}, device="cpu")
    rng = np.random.default_rng(0)

    def random_explain(model, inputs, targets, **kwargs):
        return rng.standard_normal((len(inputs), 1, 8, 8)).astype(np.float32)

    rnd = metric(model=model, x_batch=x, y_batch=y, explain_func=random_explain, device="cpu")
    assert len(lrp) == len(rnd) == 32
    assert np.mean(lrp) < 0.5 * np.mean(rnd)
