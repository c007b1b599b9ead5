"""Zennit 0.5.1 parity harness: composites, canonizers, seeds, and the models the parity tests use.

This module must not import ``dynamiclrp``. It runs Zennit exactly as a user would and is what our engine's
composite presets are compared against.

Seed
----
:func:`zennit_attribution` seeds the backward pass with ``logit * one_hot(target)`` (Zennit's ``attr_output``),
so the returned input relevance sums to the explained logit minus whatever biases, stabilizers and
non-conservative rules (γ, α-β, flat) absorb or add.

Composites (Zennit defaults ``epsilon=1e-6``, ``stabilizer=1e-6``, ``gamma=0.25``)
-------------------------------------------------------------------------------
Every composite starts from the same base map (``zennit.composites.layer_map_base``), checked before the
composite-specific entries: activations (``zennit.types.Activation``: ReLU, GELU, SiLU, Tanh, ...) → ``Pass``;
``zennit.layer.Sum`` → ``Norm(stabilizer)``; ``AvgPool{1,2,3}d``/``AdaptiveAvgPool{1,2,3}d`` → ``Norm(stabilizer)``;
``BatchNorm{1,2,3}d`` → ``Pass``. Modules matched by nothing (MaxPool, Flatten, Dropout, Identity, and the plain
``+`` of an un-canonized residual) keep their ordinary gradient.

=============================  ===========================================  ==================  ===========
composite                      first layer                                  other convolutions  nn.Linear
=============================  ===========================================  ==================  ===========
``epsilon_gamma_box``          ``ZBox(low, high)`` on the first Convolution  ``Gamma(0.25)``     ``Epsilon``
``epsilon_plus``               –                                            ``ZPlus``           ``Epsilon``
``epsilon_plus_flat``          ``Flat`` on the first linear-type layer       ``ZPlus``           ``Epsilon``
``epsilon_alpha2_beta1``       –                                            ``AlphaBeta(2, 1)`` ``Epsilon``
``epsilon_alpha2_beta1_flat``  ``Flat`` on the first linear-type layer       ``AlphaBeta(2, 1)`` ``Epsilon``
=============================  ===========================================  ==================  ===========

"Convolution" is ``zennit.types.Convolution`` (Conv1/2/3d *and* ConvTranspose1/2/3d); "linear-type" is
``zennit.types.Linear`` (any Convolution or ``nn.Linear``). "First" means the first module in
``model.named_modules()`` order (registration order, not execution order) that matches the first-layer type;
it is marked as visited only when the first-layer map matches, so in ``epsilon_gamma_box`` a Linear that comes
before every convolution gets ``Epsilon`` and the first convolution after it still gets ``ZBox``. Consequences
for the models below (see :func:`zennit_rule_map` for the full per-module listing):

* ``mlp``: no convolutions, so ``epsilon_gamma_box``, ``epsilon_plus`` and ``epsilon_alpha2_beta1`` put
  ``Epsilon`` on every Linear (the "plus"/"alpha-beta" parts never apply to Linear layers); the ``*_flat``
  composites put ``Flat`` on ``0`` (the first Linear) and ``Epsilon`` on the rest.
* ``vgg_bn_cnn`` / ``vgg11``: ``features.0`` (first conv) gets ``ZBox``/``Flat``; other convs Gamma/ZPlus/AlphaBeta;
  the classifier Linears ``Epsilon``; AdaptiveAvgPool ``Norm``; MaxPool and Flatten plain gradient.
* ``resnet18``: ``conv1`` gets ``ZBox``/``Flat``; all other convs including ``layerN.0.downsample.0`` get the conv
  rule; ``fc`` gets ``Epsilon``; ``avgpool`` ``Norm``; ``ResNetCanonizer`` adds ``layerN.M.canonizer_sum``
  (``zennit.layer.Sum`` over a stacked ``[identity, residual]``) → ``Norm``, i.e. the z-rule on the residual add.

Canonizers
----------
``canonizers="auto"`` (default) picks ``[ResNetCanonizer()]`` for ``torchvision.models.ResNet``,
``[VGGCanonizer()]`` for ``torchvision.models.VGG`` and ``[SequentialMergeBatchNorm()]`` for any other model
containing BatchNorm; otherwise none. ``SequentialMergeBatchNorm`` merges a BatchNorm into the linear-type
module that *immediately precedes it in leaf order* (``collect_leaves``, depth-first registration order),
rewriting ``w' = w * γ/sqrt(var + eps)`` and ``b' = (b - mean) * γ/sqrt(var + eps) + β`` (creating a bias for
bias-free convs) and turning the BN into the identity; everything is reverted when the composite is removed.
Without merging, BN gets ``Pass`` and the conv rule sees the un-normalised conv, a different explanation.
Quirk: the "identity" BN left behind keeps its ``eps`` (mean 0, var 1, weight 1, bias 0), so it still divides
by ``sqrt(1 + eps)``; a canonized model's logits differ from the original by about ``eps/2`` per BatchNorm
(≈1e-4 relative for ResNet-18), and the relevance differs accordingly from an exact merge.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

import torchvision
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

__all__ = [
    "COMPOSITE_NAMES",
    "ZENNIT_DEFAULTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_canonizers",
    "make_composite",
    "zennit_attribution",
    "zennit_forward_and_attribution",
    "zennit_rule_map",
    "randomize_batchnorm",
    "mlp",
    "vgg_bn_cnn",
    "vgg11",
    "resnet18",
    "example_input",
    "image_bounds",
    "MODEL_BUILDERS",
]

COMPOSITE_NAMES: tuple[str, ...] = (
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
)

#: Zennit 0.5.1 composite defaults (``gamma`` only exists for ``epsilon_gamma_box``).
ZENNIT_DEFAULTS: dict[str, float] = {"epsilon": 1e-6, "stabilizer": 1e-6, "gamma": 0.25}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CanonizerSpec = Union[str, None, Sequence[Canonizer]]


# --------------------------------------------------------------------------------------------------------------
# Composites and attribution
# --------------------------------------------------------------------------------------------------------------
def default_canonizers(model: nn.Module) -> list[Canonizer]:
    """Canonizers Zennit recommends for ``model`` (fresh instances).

    Parameters
    ----------
    model : nn.Module
        The model.

    Returns
    -------
    list of Canonizer
        ``[ResNetCanonizer()]`` for torchvision ResNets, ``[VGGCanonizer()]`` for torchvision VGGs,
        ``[SequentialMergeBatchNorm()]`` for other models with BatchNorm, else ``[]``.
    """
    if isinstance(model, torchvision.models.ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, torchvision.models.VGG):
        return [VGGCanonizer()]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return [SequentialMergeBatchNorm()]
    return []


def _resolve_canonizers(model: nn.Module, canonizers: CanonizerSpec) -> list[Canonizer]:
    if canonizers == "auto":
        return default_canonizers(model)
    if canonizers is None:
        return []
    if isinstance(canonizers, str):
        raise ValueError(f"canonizers must be 'auto', None or a list, got {canonizers!r}")
    return list(canonizers)


def make_composite(composite_name: str, canonizers: Sequence[Canonizer] = (), **composite_kwargs: Any) -> Composite:
    """Instantiate a registered Zennit composite with Zennit's defaults unless overridden.

    Parameters
    ----------
    composite_name : str
        One of :data:`COMPOSITE_NAMES` (any key of ``zennit.composites.COMPOSITES`` works).
    canonizers : sequence of Canonizer
        Canonizer instances.
    **composite_kwargs
        Forwarded to the composite (``low``/``high`` are required for ``epsilon_gamma_box``;
        ``epsilon``, ``stabilizer``, ``gamma``, ``zero_params``, ``layer_map``, ...).

    Returns
    -------
    zennit.core.Composite
        The composite (not yet registered).
    """
    if composite_name not in COMPOSITES:
        raise KeyError(f"unknown composite {composite_name!r}; known: {sorted(COMPOSITES)}")
    if composite_name == "epsilon_gamma_box" and not {"low", "high"} <= set(composite_kwargs):
        raise TypeError("epsilon_gamma_box needs low= and high= (input bounds for ZBox)")
    return COMPOSITES[composite_name](canonizers=list(canonizers), **composite_kwargs)


def _seed(output: Tensor, target_index: Union[int, Sequence[int], Tensor]) -> Tensor:
    """``logit * one_hot(target)`` for a ``(B, C)`` output (one target per sample, or one for all)."""
    if output.ndim != 2:
        raise ValueError(f"expected a (batch, classes) output, got shape {tuple(output.shape)}")
    idx = torch.as_tensor(target_index, dtype=torch.long).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(output.shape[0])
    mask = torch.zeros_like(output)
    mask[torch.arange(output.shape[0]), idx] = 1.0
    return output.detach() * mask


def zennit_forward_and_attribution(
    model: nn.Module,
    x: Tensor,
    target_index: Union[int, Sequence[int], Tensor],
    composite_name: str,
    canonizers: CanonizerSpec = "auto",
    **composite_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Like :func:`zennit_attribution` but also returns the model output computed under the composite.

    Returns
    -------
    output : Tensor
        Model output ``(B, C)`` (canonized models compute the same function).
    relevance : Tensor
        Input relevance, shape of ``x``, float64.
    """
    params = list(model.parameters())
    if params and params[0].dtype != torch.float64:
        raise ValueError("the harness runs in float64: call model.double() first")
    if model.training:
        raise ValueError("put the model in eval mode first")
    composite = make_composite(composite_name, _resolve_canonizers(model, canonizers), **composite_kwargs)
    inp = x.detach().to(torch.float64).clone().requires_grad_(True)
    with composite.context(model) as modified:
        output = modified(inp)
        seed = _seed(output, target_index)
        (relevance,) = torch.autograd.grad(output, inp, grad_outputs=seed)
    return output.detach(), relevance.detach()


def zennit_attribution(
    model: nn.Module,
    x: Tensor,
    target_index: Union[int, Sequence[int], Tensor],
    composite_name: str,
    canonizers: CanonizerSpec = "auto",
    **composite_kwargs: Any,
) -> Tensor:
    """Input relevance of ``model(x)[:, target_index]`` under a Zennit composite, in float64.

    The composite (with its canonizers) is registered for one forward/backward pass and removed afterwards, so
    the model's parameters are unchanged on return. The seed is ``logit * one_hot(target)``.

    Parameters
    ----------
    model : nn.Module
        A float64 model in eval mode, output ``(B, C)``.
    x : Tensor
        Input batch.
    target_index : int, sequence of int or Tensor
        Explained class (one for all samples or one per sample).
    composite_name : str
        One of :data:`COMPOSITE_NAMES`.
    canonizers : "auto", None or list of Canonizer
        ``"auto"`` uses :func:`default_canonizers`; ``None`` disables canonizers.
    **composite_kwargs
        Forwarded to the composite, e.g. ``low``/``high`` for ``epsilon_gamma_box``, ``epsilon``,
        ``stabilizer``, ``gamma``, ``zero_params``.

    Returns
    -------
    Tensor
        Relevance with the shape of ``x`` (float64).
    """
    return zennit_forward_and_attribution(model, x, target_index, composite_name, canonizers, **composite_kwargs)[1]


def zennit_rule_map(
    model: nn.Module,
    composite_name: str,
    canonizers: CanonizerSpec = "auto",
    **composite_kwargs: Any,
) -> dict[str, str]:
    """Which Zennit rule each module gets (module name → rule class name), canonizers applied.

    Uses the composite's own ``module_map`` over ``named_modules()`` after applying the canonizers (so modules a
    canonizer adds, like ResNet's ``canonizer_sum``, are listed) and reverts the canonizers afterwards. Modules
    without a rule are omitted.

    Parameters
    ----------
    model : nn.Module
        The model.
    composite_name : str
        Composite name.
    canonizers : "auto", None or list of Canonizer
        As in :func:`zennit_attribution`.
    **composite_kwargs
        Composite arguments (``low``/``high`` for ``epsilon_gamma_box``; their values do not matter here).

    Returns
    -------
    dict
        ``{module_name: rule_class_name}`` in ``named_modules()`` order.
    """
    if composite_name == "epsilon_gamma_box":
        composite_kwargs.setdefault("low", 0.0)
        composite_kwargs.setdefault("high", 1.0)
    composite = make_composite(composite_name, (), **composite_kwargs)
    handles = []
    try:
        for canonizer in _resolve_canonizers(model, canonizers):
            handles += canonizer.apply(model)
        ctx: dict = {}
        result = {}
        for name, module in model.named_modules():
            hook = composite.module_map(ctx, name, module)
            if hook is not None:
                result[name] = type(hook).__name__
        return result
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Models (random init, float64, eval mode)
# --------------------------------------------------------------------------------------------------------------
def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters so that it is not the identity.

    ``running_mean ~ N(0, 0.1²)``, ``running_var ~ U(0.5, 1.5)``, ``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.1²)``.

    Parameters
    ----------
    model : nn.Module
        Model modified in place.
    generator : torch.Generator
        Source of randomness.

    Returns
    -------
    nn.Module
        ``model``.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
                    m.bias.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
    return model


def _randomize_biases(model: nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Replace (torchvision's zero-initialised) conv/linear biases by ``U(-scale, scale)`` so bias sinks matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is not None:
                m.bias.copy_(scale * (2 * torch.rand(m.bias.shape, generator=generator, dtype=torch.float64) - 1))


def _finish(model: nn.Module, generator: torch.Generator) -> nn.Module:
    model = model.double()
    randomize_batchnorm(model, generator)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def mlp(seed: int = 0, in_features: int = 16, hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """Three Linear layers with biases and ReLUs: ``Linear-ReLU-Linear-ReLU-Linear`` (float64, eval).

    Module names are ``"0"`` … ``"4"``; input ``(B, in_features)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        gen = torch.Generator().manual_seed(seed + 1)
        _randomize_biases(model, gen)
        return _finish(model, gen)


def vgg_bn_cnn(seed: int = 0, num_classes: int = 10) -> nn.Sequential:
    """Small VGG-style CNN for 3×32×32 inputs (float64, eval, random BN statistics).

    ``Conv(3,8)-BN-ReLU-MaxPool-Conv(8,16)-BN-ReLU-MaxPool-Conv(16,16)-BN-ReLU-AdaptiveAvgPool(2)-Flatten-
    Linear(64,32)-ReLU-Linear(32,num_classes)``; all convs 3×3, padding 1, with biases.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(),
            nn.Linear(32, num_classes),
        )
        gen = torch.Generator().manual_seed(seed + 1)
        _randomize_biases(model, gen)
        return _finish(model, gen)


def vgg11(seed: int = 0, batch_norm: bool = True, num_classes: int = 10, hidden: int = 64) -> nn.Module:
    """torchvision VGG-11 (``vgg11_bn`` when ``batch_norm``), random init, with a slimmer classifier.

    The feature extractor is torchvision's ``make_layers(cfgs["A"], batch_norm)`` initialised as torchvision does
    (Kaiming-normal convs), then given random biases and random BN statistics. The model is a real
    ``torchvision.models.VGG`` (same module names ``features.*``, ``avgpool``, ``classifier.*``), but the
    classifier's hidden width is ``hidden`` instead of 4096 (``Linear(25088, hidden)-ReLU-Dropout-
    Linear(hidden, hidden)-ReLU-Dropout-Linear(hidden, num_classes)``) to keep float64 tests small and fast;
    the 4096-wide original would be about 1 GB in float64. Works with 32×32 inputs (the 1×1 feature map is
    replicated to 7×7 by the adaptive average pool).
    """
    from torchvision.models.vgg import VGG, cfgs, make_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = make_layers(cfgs["A"], batch_norm=batch_norm)
        with torch.device("meta"):  # skip allocating the 100M-parameter torchvision classifier
            model = VGG(features, num_classes=num_classes, init_weights=False)
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        for m in model.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        gen = torch.Generator().manual_seed(seed + 1)
        _randomize_biases(model, gen)
        return _finish(model, gen)


def resnet18(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18, random init (torchvision's own), random BN statistics, float64, eval.

    Convolutions have no biases (as in torchvision); ``fc`` gets a random bias. Works with 32×32 inputs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        gen = torch.Generator().manual_seed(seed + 1)
        _randomize_biases(model, gen)
        return _finish(model, gen)


#: name -> builder
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "vgg_bn_cnn": vgg_bn_cnn,
    "vgg11": vgg11,
    "resnet18": resnet18,
}


def image_bounds() -> tuple[Tensor, Tensor]:
    """Per-channel ZBox bounds of ImageNet-normalised [0, 1] images, ``((0-μ)/σ, (1-μ)/σ)``, each (1, 3, 1, 1)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).reshape(1, 3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def example_input(model_name: str, batch: int = 1, seed: int = 0, size: int = 32) -> Tensor:
    """Example input for a model from :data:`MODEL_BUILDERS` (float64).

    ``mlp``: ``(batch, 16)`` standard normal. Image models: uniform ``[0, 1]`` pixels of shape
    ``(batch, 3, size, size)`` normalised with the ImageNet mean/std, so they lie within :func:`image_bounds`.
    """
    gen = torch.Generator().manual_seed(seed)
    if model_name == "mlp":
        return torch.randn(batch, 16, generator=gen, dtype=torch.float64)
    if model_name not in MODEL_BUILDERS:
        raise KeyError(model_name)
    u = torch.rand(batch, 3, size, size, generator=gen, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).reshape(1, 3, 1, 1)
    return (u - mean) / std
