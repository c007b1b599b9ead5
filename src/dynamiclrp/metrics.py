"""Faithfulness metrics and sanity checks for attribution methods.

Everything here takes a model and attributions as plain tensors, so it works with dynamiclrp and
with any other explainer. Nothing here changes the model, its parameters, or the tensors passed in.

Perturbation metrics
    :func:`pixel_flipping` (pixel flipping and, with ``patch_size > 1``, region perturbation) and
    :func:`token_deletion` / :func:`token_insertion` for text. They return a
    :class:`PerturbationResult` with per-sample MoRF/LeRF curves, AUCs, ABPC and AOPC.

    * Samek, Binder, Montavon, Lapuschkin, Müller (2017). Evaluating the visualization of what a
      deep neural network has learned. IEEE TNNLS 28(11). (pixel flipping, region perturbation,
      MoRF, AOPC)
    * Blücher, Vielhaben, Strodthoff (2024). Decoupling pixel flipping and occlusion strategy for
      consistent XAI benchmarks. TMLR. (use MoRF *and* LeRF and score their difference,
      AUC(LeRF) - AUC(MoRF), called "symmetric relevance gain" there and ABPC here)

Sanity checks
    :func:`linear_model_check`, :func:`input_invariance_check` (Kindermans et al. 2017) and
    :func:`model_parameter_randomisation` (Adebayo et al. 2018).

Optional dependency: a progress bar is shown with tqdm when it is installed
(``pip install dynamiclrp[progress]``); without tqdm the functions run silently.

Put the model in evaluation mode (``model.eval()``) before measuring: these functions do not
change the mode themselves, and dropout would make the curves random.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from .extras import require
from torch import Tensor, nn

__all__ = [
    "PerturbationResult",
    "pixel_flipping",
    "token_deletion",
    "token_insertion",
    "gaussian_blur",
    "spearman_rank_correlation",
    "linear_model_check",
    "input_invariance_check",
    "InputInvarianceResult",
    "model_parameter_randomisation",
    "RandomisationResult",
]

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
Targets = Union[int, Sequence[int], Tensor, None]
ScoreFn = Callable[[Tensor, Tensor], Tensor]

_OCCLUDERS = ("blur", "zero", "mean")
_SCORES = ("probability", "logit")
_ORDERS = ("morf", "lerf", "both")
_CHANNEL_REDUCE = ("sum", "abs_sum")


# ============================================================================================
# result
# ============================================================================================
@dataclass(frozen=True, eq=False)
class PerturbationResult:
    """Perturbation curves of a batch of explanations.

    Attributes
    ----------
    fractions : numpy.ndarray, shape (steps + 1,)
        x-axis in ``[0, 1]``: fraction of the features (pixels, patches, tokens) removed
        (deletion) or inserted (insertion); ``fractions[0] == 0`` is the unperturbed (deletion) or
        fully removed (insertion) input.
    morf, lerf : numpy.ndarray of shape (N, steps + 1), or None
        Model score per sample after each step, features taken most relevant first (MoRF) or least
        relevant first (LeRF). ``None`` for an order that was not requested.
    mode : {"deletion", "insertion"}
        Whether features are removed from the input or inserted into an empty input.
    n_features : numpy.ndarray, shape (N,)
        Number of ranked features per sample (patches for region perturbation; tokens other than
        special and padding tokens for text). At step ``k``, ``floor(k * n / steps)`` of them are
        removed (or inserted).
    ranking : numpy.ndarray, shape (N, P)
        Feature indices in MoRF order (LeRF is the exact reverse); ``-1`` pads samples with fewer
        ranked features (text).

    Notes
    -----
    Per-sample scores are properties (``auc_morf``, ``auc_lerf``, ``abpc``, ``aopc_morf``,
    ``aopc_lerf``, arrays of shape ``(N,)``); the batch averages have the suffix ``_mean``
    (``abpc_mean``...) and are collected by :meth:`summary`.

    * AUC: trapezoidal area under the curve over ``fractions``.
    * ABPC (area between perturbation curves): ``AUC(LeRF) - AUC(MoRF)`` for deletion and
      ``AUC(MoRF) - AUC(LeRF)`` for insertion, so that larger is more faithful in both cases. This
      is the symmetric relevance gain of Blücher et al. (2024), which pairs MoRF with LeRF to make
      the score robust to the occlusion strategy.
    * AOPC (Samek et al. 2017): ``mean_k (f(x^(0)) - f(x^(k)))`` over the ``steps + 1`` points,
      i.e. the average score drop; for insertion the average gain ``mean_k (f(x^(k)) - f(x^(0)))``.
    """

    fractions: np.ndarray
    morf: np.ndarray | None
    lerf: np.ndarray | None
    mode: str
    n_features: np.ndarray
    ranking: np.ndarray

    def _curve(self, order: str) -> np.ndarray:
        curve = self.morf if order == "morf" else self.lerf
        if curve is None:
            raise ValueError(f"no {order.upper()} curve: it was not requested (order=...)")
        return curve

    def _auc(self, order: str) -> np.ndarray:
        return np.trapezoid(self._curve(order), self.fractions, axis=1)

    def _aopc(self, order: str) -> np.ndarray:
        c = self._curve(order)
        diff = c[:, :1] - c if self.mode == "deletion" else c - c[:, :1]
        return diff.mean(axis=1)

    @property
    def auc_morf(self) -> np.ndarray:
        """Area under the MoRF curve per sample (deletion: lower is better)."""
        return self._auc("morf")

    @property
    def auc_lerf(self) -> np.ndarray:
        """Area under the LeRF curve per sample (deletion: higher is better)."""
        return self._auc("lerf")

    @property
    def abpc(self) -> np.ndarray:
        """Area between the LeRF and MoRF curves per sample (higher is better)."""
        diff = self.auc_lerf - self.auc_morf
        return diff if self.mode == "deletion" else -diff

    @property
    def aopc_morf(self) -> np.ndarray:
        """AOPC of the MoRF curve per sample (Samek et al. 2017; higher is better)."""
        return self._aopc("morf")

    @property
    def aopc_lerf(self) -> np.ndarray:
        """AOPC of the LeRF curve per sample (lower is better)."""
        return self._aopc("lerf")

    @property
    def auc_morf_mean(self) -> float:
        """Batch mean of :attr:`auc_morf`."""
        return float(self.auc_morf.mean())

    @property
    def auc_lerf_mean(self) -> float:
        """Batch mean of :attr:`auc_lerf`."""
        return float(self.auc_lerf.mean())

    @property
    def abpc_mean(self) -> float:
        """Batch mean of :attr:`abpc`."""
        return float(self.abpc.mean())

    @property
    def aopc_morf_mean(self) -> float:
        """Batch mean of :attr:`aopc_morf`."""
        return float(self.aopc_morf.mean())

    @property
    def aopc_lerf_mean(self) -> float:
        """Batch mean of :attr:`aopc_lerf`."""
        return float(self.aopc_lerf.mean())

    def mean_curve(self, order: str = "morf") -> np.ndarray:
        """Batch-averaged curve, shape ``(steps + 1,)``, for ``order`` in ``{"morf", "lerf"}``."""
        if order not in ("morf", "lerf"):
            raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
        return self._curve(order).mean(axis=0)

    def summary(self) -> dict[str, float]:
        """Batch means of every score available for the requested orders."""
        out: dict[str, float] = {}
        if self.morf is not None:
            out.update(auc_morf=self.auc_morf_mean, aopc_morf=self.aopc_morf_mean)
        if self.lerf is not None:
            out.update(auc_lerf=self.auc_lerf_mean, aopc_lerf=self.aopc_lerf_mean)
        if self.morf is not None and self.lerf is not None:
            out["abpc"] = self.abpc_mean
        return out

    def __repr__(self) -> str:
        curve = self.morf if self.morf is not None else self.lerf
        n = 0 if curve is None else curve.shape[0]
        scores = ", ".join(f"{k}={v:.4g}" for k, v in self.summary().items())
        return f"PerturbationResult(mode={self.mode!r}, samples={n}, steps={len(self.fractions) - 1}, {scores})"


# ============================================================================================
# shared machinery
# ============================================================================================
def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar, or a no-op stand-in when disabled or tqdm is not installed."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="batch", leave=False)
        except ImportError:  # optional: pip install dynamiclrp[progress]
            pass
    return contextlib.nullcontext(_NoBar())


class _NoBar:
    def update(self, n: int = 1) -> None:  # noqa: D401 - mimic tqdm
        pass


def _check_choice(name: str, value: Any, valid: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


_TRAIN_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def _warn_if_training(model: Any) -> None:
    """Warn when dropout / batch norm would behave differently from evaluation mode."""
    if isinstance(model, nn.Module) and any(m.training and isinstance(m, _TRAIN_DEPENDENT) for m in model.modules()):
        warnings.warn(
            "model has dropout/batch-norm layers in training mode, which makes the metric random; "
            "call model.eval() first",
            stacklevel=3,
        )


def _model_output(out: Any) -> Tensor:
    """Logits from a plain tensor, a tuple/list (first item), or an object/dict with ``logits``."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot read logits from a model output of type {type(out).__name__}")


def _score(outputs: Any, targets: Tensor, score: str | ScoreFn) -> Tensor:
    """Score per sample: class probability / logit of the target, or a user callable."""
    if callable(score):
        s = torch.as_tensor(score(outputs, targets))
        if s.shape != (targets.shape[0],):
            raise ValueError(f"score callable must return shape ({targets.shape[0]},), got {tuple(s.shape)}")
        return s
    logits = _model_output(outputs)
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        # single-output model (regression / binary logit): targets are ignored
        v = logits.reshape(-1)
        return torch.sigmoid(v) if score == "probability" else v
    if logits.ndim != 2:
        raise ValueError(
            f"expected model outputs of shape (N, classes), got {tuple(logits.shape)}; pass score=callable"
        )
    if score == "probability":
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits = logits.softmax(dim=1)
    return logits.gather(1, targets.view(-1, 1).to(logits.device)).squeeze(1)


def _resolve_targets(targets: Targets, n: int, clean_logits: Callable[[], Tensor]) -> Tensor:
    if targets is None:
        logits = _model_output(clean_logits())
        if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
            return torch.zeros(n, dtype=torch.long)
        return logits.argmax(dim=1).cpu()
    t = torch.as_tensor(targets, dtype=torch.long).cpu()
    if t.ndim == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"targets must be an int or have shape ({n},), got {tuple(t.shape)}")
    return t


def _rank_features(values: Tensor, valid: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """MoRF order with seeded random tie-breaking.

    Returns ``order`` (N, P): feature indices, valid ones by decreasing value first; and ``ranks``
    (N, P): position of each feature in ``order``.
    """
    n, p = values.shape
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.rand(n, p, generator=gen, dtype=torch.float64).argsort(dim=1)
    v = values.gather(1, perm)
    ok = valid.gather(1, perm)
    idx = torch.argsort(v, dim=1, descending=True, stable=True)
    idx = idx.gather(1, torch.argsort((~ok.gather(1, idx)).to(torch.int8), dim=1, stable=True))
    order = perm.gather(1, idx)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(p).expand(n, p).contiguous())
    return order, ranks


def _run_curves(
    evaluate: Callable[[Tensor, Tensor], Tensor],
    ranks: Tensor,
    valid: Tensor,
    *,
    steps: int,
    order: str,
    mode: str,
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[str, np.ndarray]:
    """Evaluate all (order, sample, step) perturbations in batches of ``batch_size`` model inputs.

    ``evaluate(sample_idx (B,), removed (B, P) bool) -> scores (B,)``.
    """
    orders = ["morf", "lerf"] if order == "both" else [order]
    n, _ = ranks.shape
    n_valid = valid.sum(dim=1)
    per_order = n * (steps + 1)
    total = len(orders) * per_order
    curves = torch.empty(total, dtype=torch.float64)
    lerf_flags = torch.tensor([o == "lerf" for o in orders])
    n_batches = math.ceil(total / batch_size)
    with _progress(n_batches, progress, desc) as bar:
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total))
            is_lerf = lerf_flags[j // per_order]
            sample = (j // (steps + 1)) % n
            k = j % (steps + 1)
            nv = n_valid[sample]
            count = ((k * nv) // steps)[:, None]
            r, ok, nv = ranks[sample], valid[sample], nv[:, None]
            if mode == "deletion":
                morf_removed, lerf_removed = r < count, ok & (r >= nv - count)
            else:  # insertion: everything valid is removed except what has been inserted
                morf_removed, lerf_removed = ok & (r >= count), r < nv - count
            removed = torch.where(is_lerf[:, None], lerf_removed, morf_removed)
            curves[j] = evaluate(sample, removed).detach().to(device="cpu", dtype=torch.float64)
            bar.update(1)
    curves = curves.view(len(orders), n, steps + 1).numpy()
    return {o: curves[i] for i, o in enumerate(orders)}


def _default_steps(steps: int | None, n_max: int) -> int:
    if steps is None:
        return max(1, min(n_max, 100))
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return int(steps)


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


# ============================================================================================
# occluders
# ============================================================================================
def gaussian_blur(x: Tensor, sigma: float = 5.0, kernel_size: int | None = None) -> Tensor:
    """Separable Gaussian blur over the spatial dimensions of a batch.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, *spatial)`` (e.g. ``(N, C, H, W)``); a 2-D ``(N, D)`` input is blurred along ``D``.
    sigma : float, default 5.0
        Standard deviation of the Gaussian in pixels.
    kernel_size : int, optional
        Odd kernel size; by default ``2 * ceil(3 * sigma) + 1``.

    Returns
    -------
    torch.Tensor
        Blurred copy of ``x`` (same shape, dtype and device). Borders are reflect-padded (replicate
        where a dimension is too small to reflect), so constant images stay constant.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3.0 * sigma) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if not x.is_floating_point():
        raise TypeError(f"gaussian_blur needs a floating point tensor, got {x.dtype}")
    t = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    kernel = torch.exp(-(t**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(dtype=x.dtype, device=x.device).view(1, 1, -1)
    pad = kernel_size // 2
    y = x.unsqueeze(1) if x.ndim == 2 else x
    for dim in range(2, y.ndim):
        moved = y.movedim(dim, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.pad(flat, (pad, pad), mode="reflect" if pad < shape[-1] else "replicate")
        y = F.conv1d(flat, kernel).reshape(shape).movedim(-1, dim)
    return y.squeeze(1) if x.ndim == 2 else y


def _baseline(
    inputs: Tensor,
    occluder: str | Tensor | Callable[[Tensor], Tensor],
    blur_sigma: float,
    blur_kernel_size: int | None,
) -> Tensor:
    if isinstance(occluder, str):
        if occluder == "zero":
            return torch.zeros_like(inputs)
        if occluder == "mean":
            dims = tuple(range(2, inputs.ndim)) if inputs.ndim > 2 else (1,)
            return inputs.mean(dim=dims, keepdim=True).expand_as(inputs)
        if occluder == "blur":
            return gaussian_blur(inputs, blur_sigma, blur_kernel_size)
        raise ValueError(
            f"unknown occluder {occluder!r}; valid: {', '.join(map(repr, _OCCLUDERS))}, a tensor "
            "broadcastable to the inputs, or a callable(inputs) -> tensor of the inputs' shape"
        )
    if isinstance(occluder, (Tensor, np.ndarray)):
        base = _as_tensor(occluder, "occluder").to(device=inputs.device, dtype=inputs.dtype)
    elif callable(occluder):
        base = torch.as_tensor(occluder(inputs.clone())).detach().to(device=inputs.device, dtype=inputs.dtype)
        if base.shape != inputs.shape:
            raise ValueError(f"occluder callable returned shape {tuple(base.shape)}, expected {tuple(inputs.shape)}")
    else:
        raise TypeError(f"occluder must be a name, a tensor or a callable, got {type(occluder).__name__}")
    try:
        return base.expand_as(inputs)
    except RuntimeError:
        raise ValueError(
            f"occluder tensor of shape {tuple(base.shape)} does not broadcast to the inputs {tuple(inputs.shape)}"
        ) from None


# ============================================================================================
# pixel flipping / region perturbation
# ============================================================================================
def _patch_ids(spatial: Sequence[int], patch_size: int | Sequence[int]) -> tuple[Tensor, int]:
    """Patch index of every spatial position (flattened), and the number of patches."""
    sizes = (patch_size,) * len(spatial) if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
    if len(sizes) != len(spatial) or any(int(s) < 1 for s in sizes):
        raise ValueError(
            f"patch_size must be a positive int or a tuple of {len(spatial)} positive ints, got {patch_size!r}"
        )
    counts = [math.ceil(n / int(s)) for n, s in zip(spatial, sizes)]
    ids = torch.zeros((), dtype=torch.long)
    for n, s, c in zip(spatial, sizes, counts):
        ids = ids.unsqueeze(-1) * c + torch.arange(n) // int(s)
    return ids.reshape(-1), math.prod(counts)


def pixel_flipping(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    attributions: Tensor | np.ndarray,
    targets: Targets = None,
    *,
    occluder: str | Tensor | Callable[[Tensor], Tensor] = "blur",
    patch_size: int | Sequence[int] = 1,
    patch_reduce: str = "sum",
    steps: int | None = None,
    order: str = "both",
    channel_reduce: str = "sum",
    batch_size: int = 64,
    seed: int = 0,
    score: str | ScoreFn = "probability",
    progress: bool = True,
    blur_sigma: float = 5.0,
    blur_kernel_size: int | None = None,
) -> PerturbationResult:
    """Pixel flipping / region perturbation with MoRF and LeRF orders.

    Features (pixels, or square patches for region perturbation) are ranked by their relevance and
    removed cumulatively, most relevant first (MoRF) and least relevant first (LeRF), recording the
    model's score for the target after each step (Samek et al. 2017). A faithful explanation makes
    the MoRF curve fall fast and the LeRF curve stay high; their difference, ABPC, is robust to the
    choice of occluder (Blücher et al. 2024).

    Parameters
    ----------
    model : callable
        ``model(x)`` returning logits ``(N, classes)`` or a single output ``(N,)`` / ``(N, 1)``;
        objects with ``.logits`` and tuples (first item) are understood. Called under
        :func:`torch.no_grad`, never modified.
    inputs : torch.Tensor
        ``(N, C, H, W)`` images (or ``(N, C, L)`` signals): all channels of a position are removed
        together. A 2-D ``(N, D)`` input has ``D`` individual features.
    attributions : torch.Tensor or numpy.ndarray
        Same shape as ``inputs``, or without the channel dimension (``(N, H, W)``).
    targets : int, sequence of int, torch.Tensor or None
        Class per sample whose score is tracked; by default the predicted class on the clean input.
        Ignored for single-output models.
    occluder : {"blur", "zero", "mean"}, torch.Tensor or callable, default "blur"
        Value that replaces removed features: a Gaussian blur of the input (see
        :func:`gaussian_blur`, ``blur_sigma``, ``blur_kernel_size``), zeros, the per-sample,
        per-channel mean, a tensor broadcastable to ``inputs`` (e.g. dataset means ``(C, 1, 1)``),
        or ``callable(inputs) -> tensor`` of the inputs' shape.
    patch_size : int or tuple of int, default 1
        ``1`` ranks single pixels (pixel flipping); larger values rank non-overlapping patches
        (region perturbation; edge patches may be smaller).
    patch_reduce : {"sum", "max"}, default "sum"
        How relevance inside a patch is aggregated to rank patches.
    steps : int, optional
        Number of perturbation steps; at step ``k`` ``floor(k * P / steps)`` of the ``P`` features
        are removed. Default ``min(P, 100)``; clipped to ``P``.
    order : {"both", "morf", "lerf"}, default "both"
        Which curves to compute. ABPC needs both.
    channel_reduce : {"sum", "abs_sum"}, default "sum"
        How channel relevances are combined per position before ranking.
    batch_size : int, default 64
        Number of perturbed inputs per forward pass (steps of several samples are batched).
    seed : int, default 0
        Seed of the random tie-breaking between equally relevant features; results are
        deterministic for a given seed.
    score : {"probability", "logit"} or callable, default "probability"
        Softmax probability or logit of the target (sigmoid / raw value for single-output models),
        or ``callable(outputs, targets) -> (B,)`` tensor.
    progress : bool, default True
        Show a tqdm progress bar if tqdm is installed.
    blur_sigma : float, default 5.0
        Standard deviation (pixels) of the blur occluder.
    blur_kernel_size : int, optional
        Odd kernel size of the blur occluder; default ``2 * ceil(3 * sigma) + 1``.

    Returns
    -------
    PerturbationResult
        Curves of shape ``(N, steps + 1)`` over ``fractions`` in ``[0, 1]`` and the AUC, ABPC and
        AOPC scores per sample and averaged.

    Raises
    ------
    ValueError
        On mismatched shapes, unknown option names, non-finite attributions.

    References
    ----------
    Samek et al. (2017), Evaluating the visualization of what a deep neural network has learned.
    Blücher, Vielhaben, Strodthoff (2024), Decoupling pixel flipping and occlusion strategy for
    consistent XAI benchmarks.
    """
    x = _as_tensor(inputs, "inputs")
    if not x.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {x.dtype}; for token ids use token_deletion()")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch, (N, D) or (N, C, ...), got shape {tuple(x.shape)}")
    _check_choice("order", order, _ORDERS)
    _check_choice("channel_reduce", channel_reduce, _CHANNEL_REDUCE)
    _check_choice("patch_reduce", patch_reduce, ("sum", "max"))
    if not callable(score):
        _check_choice("score", score, _SCORES)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _warn_if_training(model)  # type: ignore[arg-type]

    n = x.shape[0]
    xc = x.unsqueeze(1) if x.ndim == 2 else x  # (N, C, *spatial)
    spatial = tuple(xc.shape[2:])

    a = _as_tensor(attributions, "attributions").to(device="cpu", dtype=torch.float64)
    if a.shape == x.shape:
        a = a.unsqueeze(1) if x.ndim == 2 else a
        a = a.sum(dim=1) if channel_reduce == "sum" else a.abs().sum(dim=1)
    elif x.ndim > 2 and a.shape == (n, *spatial):
        a = a if channel_reduce == "sum" else a.abs()
    else:
        raise ValueError(
            f"attributions must have the inputs' shape {tuple(x.shape)}"
            + (f" or {(n, *spatial)}" if x.ndim > 2 else "")
            + f", got {tuple(a.shape)}"
        )
    if not torch.isfinite(a).all():
        raise ValueError("attributions contain NaN or infinite values")

    pid, n_patches = _patch_ids(spatial, patch_size)
    flat = a.reshape(n, -1)
    index = pid.expand(n, -1)
    if patch_reduce == "sum":
        values = torch.zeros(n, n_patches, dtype=torch.float64).scatter_add_(1, index, flat)
    else:
        values = torch.zeros(n, n_patches, dtype=torch.float64)
        values.scatter_reduce_(1, index, flat, "amax", include_self=False)
    valid = torch.ones(n, n_patches, dtype=torch.bool)
    order_idx, ranks = _rank_features(values, valid, seed)
    steps = min(_default_steps(steps, n_patches), n_patches)

    baseline = _baseline(x, occluder, blur_sigma, blur_kernel_size)
    base_flat = (baseline.unsqueeze(1) if x.ndim == 2 else baseline).reshape(n, xc.shape[1], -1)
    x_flat = xc.reshape(n, xc.shape[1], -1)
    pid_dev = pid.to(x.device)

    def clean() -> Tensor:
        with torch.no_grad():
            return torch.cat([_model_output(model(x[i : i + batch_size])) for i in range(0, n, batch_size)])

    tgt = _resolve_targets(targets, n, clean)

    def evaluate(sample: Tensor, removed: Tensor) -> Tensor:
        s = sample.to(x.device)
        mask = removed.to(x.device)[:, pid_dev].unsqueeze(1)  # (B, 1, positions)
        perturbed = torch.where(mask, base_flat[s], x_flat[s]).reshape(len(s), *x.shape[1:])
        with torch.no_grad():
            return _score(model(perturbed), tgt[sample], score)

    curves = _run_curves(
        evaluate, ranks, valid, steps=steps, order=order, mode="deletion",
        batch_size=batch_size, progress=progress, desc="pixel flipping",
    )
    return PerturbationResult(
        fractions=np.arange(steps + 1, dtype=np.float64) / steps,
        morf=curves.get("morf"),
        lerf=curves.get("lerf"),
        mode="deletion",
        n_features=np.full(n, n_patches),
        ranking=order_idx.numpy(),
    )


# ============================================================================================
# text
# ============================================================================================
def _default_forward(model: Callable[..., Any], x: Tensor, attention_mask: Tensor | None) -> Any:
    return model(x) if attention_mask is None else model(x, attention_mask=attention_mask)


def _token_curves(
    mode: str,
    model: Callable[..., Any],
    inputs: Tensor,
    attributions: Tensor | np.ndarray,
    targets: Targets,
    *,
    attention_mask: Tensor | None,
    special_tokens_mask: Tensor | None,
    replacement: int | str | Tensor | None,
    steps: int | None,
    order: str,
    channel_reduce: str,
    score: str | ScoreFn,
    batch_size: int,
    seed: int,
    progress: bool,
    forward: Callable[[Any, Tensor, Tensor | None], Any] | None,
) -> PerturbationResult:
    x = _as_tensor(inputs, "inputs")
    ids = not x.is_floating_point()
    if (ids and x.ndim != 2) or (not ids and x.ndim != 3) or x.shape[0] == 0:
        raise ValueError(
            f"inputs must be a non-empty batch of token ids (N, L) or embeddings (N, L, D), "
            f"got {tuple(x.shape)} of dtype {x.dtype}"
        )
    _check_choice("order", order, _ORDERS)
    _check_choice("channel_reduce", channel_reduce, _CHANNEL_REDUCE)
    if not callable(score):
        _check_choice("score", score, _SCORES)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _warn_if_training(model)  # type: ignore[arg-type]
    n, length = x.shape[:2]

    a = _as_tensor(attributions, "attributions").to(device="cpu", dtype=torch.float64)
    if a.ndim == 3 and a.shape[:2] == (n, length):
        a = a.sum(dim=2) if channel_reduce == "sum" else a.abs().sum(dim=2)
    elif a.shape == (n, length):
        a = a if channel_reduce == "sum" else a.abs()
    else:
        raise ValueError(f"attributions must have shape ({n}, {length}) or ({n}, {length}, D), got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("attributions contain NaN or infinite values")

    am = None if attention_mask is None else _as_tensor(attention_mask, "attention_mask")
    if am is not None and am.shape != (n, length):
        raise ValueError(f"attention_mask must have shape ({n}, {length}), got {tuple(am.shape)}")
    valid = torch.ones(n, length, dtype=torch.bool) if am is None else am.cpu().bool()
    if special_tokens_mask is not None:
        sm = _as_tensor(special_tokens_mask, "special_tokens_mask")
        if sm.shape != (n, length):
            raise ValueError(f"special_tokens_mask must have shape ({n}, {length}), got {tuple(sm.shape)}")
        valid = valid & ~sm.cpu().bool()

    use_attention = isinstance(replacement, str) and replacement == "attention"
    if use_attention:
        if am is None:
            raise ValueError("replacement='attention' needs an attention_mask")
        repl = None
    elif ids:
        if replacement is None or isinstance(replacement, str):
            raise ValueError(
                "token ids need replacement=<token id> (e.g. tokenizer.mask_token_id or pad_token_id) "
                f"or replacement='attention'; got {replacement!r}"
            )
        repl = torch.as_tensor(replacement, dtype=x.dtype, device=x.device)
        if repl.ndim != 0:
            raise ValueError("replacement for token ids must be a single token id")
    else:
        if replacement is None or (isinstance(replacement, str) and replacement == "zero"):
            repl = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        elif isinstance(replacement, str):
            raise ValueError(
                f"replacement for embeddings must be 'zero', 'attention' or a (D,) tensor; got {replacement!r}"
            )
        else:
            repl = _as_tensor(torch.as_tensor(replacement), "replacement").to(device=x.device, dtype=x.dtype)
            if repl.shape not in ((), (x.shape[-1],)):
                raise ValueError(f"embedding replacement must have shape ({x.shape[-1]},), got {tuple(repl.shape)}")

    call = forward or _default_forward
    am_dev = None if am is None else am.to(x.device)

    def clean() -> Tensor:
        chunks = []
        with torch.no_grad():
            for i in range(0, n, batch_size):
                mask = None if am_dev is None else am_dev[i : i + batch_size]
                chunks.append(_model_output(call(model, x[i : i + batch_size], mask)))
        return torch.cat(chunks)

    tgt = _resolve_targets(targets, n, clean)
    values = a.masked_fill(~valid, 0.0)
    order_idx, ranks = _rank_features(values, valid, seed)
    n_valid = valid.sum(dim=1)
    steps = _default_steps(steps, int(n_valid.max()) if n else 1)

    def evaluate(sample: Tensor, removed: Tensor) -> Tensor:
        s = sample.to(x.device)
        rm = removed.to(x.device)
        mask = None if am_dev is None else am_dev[s]
        if use_attention:
            mask = mask * (~rm).to(mask.dtype)
            xb = x[s]
        elif ids:
            xb = torch.where(rm, repl, x[s])
        else:
            xb = torch.where(rm.unsqueeze(-1), repl, x[s])
        with torch.no_grad():
            return _score(call(model, xb, mask), tgt[sample], score)

    curves = _run_curves(
        evaluate, ranks, valid, steps=steps, order=order, mode=mode,
        batch_size=batch_size, progress=progress, desc=f"token {mode}",
    )
    ranking = order_idx.masked_fill(torch.arange(length).expand(n, length) >= n_valid[:, None], -1)
    return PerturbationResult(
        fractions=np.arange(steps + 1, dtype=np.float64) / steps,
        morf=curves.get("morf"),
        lerf=curves.get("lerf"),
        mode=mode,
        n_features=n_valid.numpy(),
        ranking=ranking.numpy(),
    )


_TOKEN_DOC_PARAMS = """
    Parameters
    ----------
    model : callable
        Called as ``forward(model, inputs, attention_mask)``; by default ``model(inputs)`` or
        ``model(inputs, attention_mask=attention_mask)``. Outputs may be logits ``(N, classes)``,
        a single output, or an object with ``.logits`` (Hugging Face). Never modified.
    inputs : torch.Tensor
        Token ids ``(N, L)`` (integer dtype) or input embeddings ``(N, L, D)`` (floating dtype).
    attributions : torch.Tensor or numpy.ndarray
        ``(N, L)`` token relevance, or ``(N, L, D)`` (reduced over ``D`` with ``channel_reduce``).
    targets : int, sequence of int, torch.Tensor or None
        Class per sample; by default the prediction on the unperturbed input.
    attention_mask : torch.Tensor, optional
        ``(N, L)``; padding positions (0) are never ranked nor touched and the mask is passed on.
    special_tokens_mask : torch.Tensor, optional
        ``(N, L)``, 1 for special tokens ([CLS], [SEP], <s>...): never ranked nor touched.
    replacement : int, "zero", "attention" or torch.Tensor
        What a removed token becomes. Token ids: a token id (e.g. ``tokenizer.mask_token_id``,
        ``pad_token_id``), required. Embeddings: ``"zero"`` (default) or a ``(D,)`` embedding
        (e.g. the [MASK] embedding). ``"attention"``: keep the token but set its attention mask
        to 0 (needs ``attention_mask``).
    steps : int, optional
        Number of steps; sample ``i`` with ``n_i`` ranked tokens has ``floor(k * n_i / steps)``
        tokens perturbed at step ``k``. Default ``min(max_i n_i, 100)``.
    order : {"both", "morf", "lerf"}, default "both"
    channel_reduce : {"sum", "abs_sum"}, default "sum"
    score : {"probability", "logit"} or callable, default "probability"
        As for :func:`pixel_flipping`.
    batch_size : int, default 64
        Perturbed sequences per forward pass.
    seed : int, default 0
        Seed of the random tie-breaking.
    progress : bool, default True
        Show a tqdm progress bar if tqdm is installed.
    forward : callable, optional
        ``forward(model, inputs, attention_mask) -> outputs``, e.g.
        ``lambda m, e, am: m(inputs_embeds=e, attention_mask=am)`` for a Hugging Face model fed with
        embeddings.
"""


def token_deletion(
    model: Callable[..., Any],
    inputs: Tensor,
    attributions: Tensor | np.ndarray,
    targets: Targets = None,
    *,
    attention_mask: Tensor | None = None,
    special_tokens_mask: Tensor | None = None,
    replacement: int | str | Tensor | None = None,
    steps: int | None = None,
    order: str = "both",
    channel_reduce: str = "sum",
    score: str | ScoreFn = "probability",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    forward: Callable[[Any, Tensor, Tensor | None], Any] | None = None,
) -> PerturbationResult:
    return _token_curves(
        "deletion", model, inputs, attributions, targets, attention_mask=attention_mask,
        special_tokens_mask=special_tokens_mask, replacement=replacement, steps=steps, order=order,
        channel_reduce=channel_reduce, score=score, batch_size=batch_size, seed=seed,
        progress=progress, forward=forward,
    )


def token_insertion(
    model: Callable[..., Any],
    inputs: Tensor,
    attributions: Tensor | np.ndarray,
    targets: Targets = None,
    *,
    attention_mask: Tensor | None = None,
    special_tokens_mask: Tensor | None = None,
    replacement: int | str | Tensor | None = None,
    steps: int | None = None,
    order: str = "both",
    channel_reduce: str = "sum",
    score: str | ScoreFn = "probability",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    forward: Callable[[Any, Tensor, Tensor | None], Any] | None = None,
) -> PerturbationResult:
    return _token_curves(
        "insertion", model, inputs, attributions, targets, attention_mask=attention_mask,
        special_tokens_mask=special_tokens_mask, replacement=replacement, steps=steps, order=order,
        channel_reduce=channel_reduce, score=score, batch_size=batch_size, seed=seed,
        progress=progress, forward=forward,
    )


token_deletion.__doc__ = (
    """Token deletion: remove tokens cumulatively, most (MoRF) or least (LeRF) relevant first.

    The text counterpart of pixel flipping (Samek et al. 2017): after each step the target score
    is recorded. Special and padding tokens are neither ranked nor removed. ABPC =
    AUC(LeRF) - AUC(MoRF) (Blücher et al. 2024); larger is more faithful.
"""
    + _TOKEN_DOC_PARAMS
    + """
    Returns
    -------
    PerturbationResult
        ``mode="deletion"``; ``fractions`` is the fraction of ranked tokens removed.
"""
)

token_insertion.__doc__ = (
    """Token insertion: start from a fully removed text and insert tokens, MoRF or LeRF first.

    Every ranked token starts replaced; after each step the most (MoRF) or least (LeRF) relevant
    tokens are restored and the target score recorded (the insertion game complementing deletion,
    Samek et al. 2017; Blücher et al. 2024). A faithful explanation makes the MoRF curve rise fast.
    ABPC is AUC(MoRF) - AUC(LeRF) here, so larger is again more faithful, and AOPC is the average
    gain over the fully removed input.
"""
    + _TOKEN_DOC_PARAMS
    + """
    Returns
    -------
    PerturbationResult
        ``mode="insertion"``; ``fractions`` is the fraction of ranked tokens inserted.
"""
)


# ============================================================================================
# sanity checks
# ============================================================================================
@contextlib.contextmanager
def _forked_rng(seed: int, modules: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore its previous state afterwards."""
    devices = sorted(
        {p.device.index or 0 for m in modules for p in m.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _explain(explain_fn: ExplainFn, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    out = explain_fn(model, inputs.detach().clone(), targets.clone())
    out = torch.as_tensor(out).detach()
    if out.shape[0] != inputs.shape[0]:
        raise ValueError(f"explain_fn returned shape {tuple(out.shape)} for {inputs.shape[0]} samples")
    return out


def linear_model_check(
    explain_fn: ExplainFn,
    *,
    n_features: int = 8,
    n_outputs: int = 3,
    n_samples: int = 16,
    bias: bool = True,
    scale: float | Tensor | Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Check an LRP-0/epsilon explainer against the exact answer on a random linear model.

    For ``f(x) = W x + b`` the LRP-0 relevance of input ``i`` for output ``t``, seeded with
    ``f_t(x)`` (or, in the modified-gradient view, with a unit seed), is ``W[t, i] * x_i``: the
    bias keeps its own share and every rule of the LRP-0/epsilon family must reproduce this (up
    to the stabilizer epsilon). See Samek et al. (2017) and Montavon et al. (2019), "Layer-wise
    relevance propagation: an overview".

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(model, inputs, targets) -> attributions`` of shape ``(n_samples, n_features)``.
        ``model`` is an :class:`torch.nn.Linear` in ``dtype``; ``targets`` a long tensor.
    n_features, n_outputs, n_samples : int
        Size of the random problem (``n_outputs=1`` gives a scalar model with targets 0).
    bias : bool, default True
        Give the model a random bias.
    scale : float, torch.Tensor or callable, optional
        Expected seed scaling: the expected attribution is ``W[t] * x * scale``. A callable gets
        the target outputs ``f_t(x)`` (shape ``(N,)``) and returns per-sample factors, e.g.
        ``lambda out: 1 / out`` for an explainer seeded with 1 that distributes ``f_t(x)``-fractions.
    seed : int, default 0
        Seed for weights, inputs and targets (the global RNG state is restored afterwards).
    dtype : torch.dtype, default torch.float64

    Returns
    -------
    float
        Maximum absolute difference between the attributions and ``W[t] * x * scale``. Compare it
        with a tolerance suited to the explainer (``~1e-10`` for exact float64 LRP-0).
    """
    with _forked_rng(seed):
        model = nn.Linear(n_features, n_outputs, bias=bias).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.randn(n_outputs, n_features, dtype=dtype))
            if bias:
                model.bias.copy_(torch.randn(n_outputs, dtype=dtype))
        x = torch.randn(n_samples, n_features, dtype=dtype)
        targets = torch.randint(n_outputs, (n_samples,))
    model.eval()
    weight = model.weight.detach().clone()
    with torch.no_grad():
        out_t = model(x).gather(1, targets.view(-1, 1)).squeeze(1)
    expected = weight[targets] * x
    if scale is not None:
        factor = scale(out_t) if callable(scale) else torch.as_tensor(scale, dtype=dtype)
        factor = torch.as_tensor(factor, dtype=dtype)
        expected = expected * (factor.view(-1, 1) if factor.ndim == 1 else factor)
    attr = _explain(explain_fn, model, x, targets).to(dtype)
    if attr.shape != expected.shape:
        raise ValueError(f"explain_fn returned shape {tuple(attr.shape)}, expected {tuple(expected.shape)}")
    return float((attr - expected).abs().max())


@dataclass(frozen=True)
class InputInvarianceResult:
    """Outcome of :func:`input_invariance_check`.

    Attributes
    ----------
    max_abs_difference : float
        ``max |A(f1, x) - A(f2, x + c)|``; zero for an input-invariant method.
    relative_difference : float
        ``||A(f1, x) - A(f2, x + c)|| / ||A(f1, x)||`` (Frobenius norms over the batch).
    output_difference : float
        ``max |f1(x) - f2(x + c)|``: confirms that the bias compensation made the two models
        functionally identical on these inputs (should be ~0).
    """

    max_abs_difference: float
    relative_difference: float
    output_difference: float


def _first_affine_layer(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m
    raise ValueError("input_invariance_check needs a model whose first layer is nn.Linear or nn.ConvNd")


def input_invariance_check(
    explain_fn: ExplainFn,
    model_factory: Callable[[], nn.Module] | nn.Module,
    inputs: Tensor,
    targets: Targets = None,
    *,
    shift: float | Tensor = 1.0,
) -> InputInvarianceResult:
    """Input invariance (Kindermans et al. 2017, "The (un)reliability of saliency methods").

    Two models that compute the same function up to a constant shift of the input should get
    the same explanation: ``f2(x + c) = f1(x)`` is built by copying ``f1`` and setting the first
    layer's bias to ``b - W c``. The function reports how much the attributions of ``f1`` at ``x``
    and of ``f2`` at ``x + c`` differ. Gradients pass; gradient x input and LRP-0/z-rule do not
    (they depend on the reference point), which is the paper's point, so this is a report, not a
    pass/fail test.

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(model, inputs, targets) -> attributions``.
    model_factory : callable or torch.nn.Module
        Returns the model ``f1`` (called once), or the model itself (deep-copied, never modified).
        Its first :class:`~torch.nn.Linear` / ``ConvNd`` in module order must be applied to the
        input directly, have a bias and (for convolutions) ``groups=1``.
    inputs : torch.Tensor
        ``(N, D)`` for a linear first layer, ``(N, C, ...)`` for a convolution.
    targets : int, sequence of int, torch.Tensor or None
        Classes to explain; by default the predictions of ``f1``.
    shift : float or torch.Tensor, default 1.0
        The constant ``c``: a scalar, a ``(D,)`` vector (linear) or one value per input channel
        ``(C,)`` (convolution).

    Returns
    -------
    InputInvarianceResult

    Raises
    ------
    ValueError
        If the first layer cannot absorb the shift (no bias, grouped convolution), or if the two
        models' outputs differ (e.g. zero padding of a convolution breaks the compensation at the
        borders: use ``padding=0`` or a non-zero padding mode).
    """
    base = copy.deepcopy(model_factory) if isinstance(model_factory, nn.Module) else model_factory()
    if not isinstance(base, nn.Module):
        raise TypeError("model_factory must be an nn.Module or return one")
    x = _as_tensor(inputs, "inputs")
    shifted_model = copy.deepcopy(base)
    layer = _first_affine_layer(shifted_model)
    if layer.bias is None:
        raise ValueError("the first layer has no bias to absorb the input shift")
    w = layer.weight.detach()
    c = torch.as_tensor(shift, dtype=w.dtype, device=w.device)
    if isinstance(layer, nn.Linear):
        c_vec = c.expand(layer.in_features) if c.ndim == 0 else c.reshape(-1)
        if c_vec.shape != (layer.in_features,):
            raise ValueError(f"shift must be a scalar or have {layer.in_features} entries")
        delta = w @ c_vec
        x_shift = c_vec
    else:
        if layer.groups != 1:
            raise ValueError("input_invariance_check does not support grouped convolutions")
        c_vec = c.expand(layer.in_channels) if c.ndim == 0 else c.reshape(-1)
        if c_vec.shape != (layer.in_channels,):
            raise ValueError(f"shift must be a scalar or have {layer.in_channels} entries (one per channel)")
        delta = w.flatten(2).sum(dim=2) @ c_vec
        x_shift = c_vec.view(-1, *([1] * (x.ndim - 2)))
    with torch.no_grad():
        layer.bias.sub_(delta)
    x2 = x + x_shift.to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        out1 = _model_output(base(x))
        out2 = _model_output(shifted_model(x2))
    out_diff = float((out1 - out2).abs().max())
    tol = 1e-4 * max(1.0, float(out1.abs().max()))
    if out_diff > tol:
        raise ValueError(
            f"the shifted model's outputs differ by {out_diff:.3g}: the shift is not fully absorbed by "
            "the first layer's bias (zero padding? the first module not applied to the input?)"
        )
    n = x.shape[0]
    tgt = _resolve_targets(targets, n, lambda: out1)
    a1 = _explain(explain_fn, base, x, tgt).double()
    a2 = _explain(explain_fn, shifted_model, x2, tgt).double()
    diff = a1 - a2
    norm = float(a1.norm())
    return InputInvarianceResult(
        max_abs_difference=float(diff.abs().max()),
        relative_difference=float(diff.norm()) / norm if norm > 0 else (0.0 if float(diff.norm()) == 0 else math.inf),
        output_difference=out_diff,
    )


def spearman_rank_correlation(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> np.ndarray:
    """Spearman rank correlation per sample.

    Parameters
    ----------
    a, b : torch.Tensor or numpy.ndarray
        Same shape ``(N, ...)``; each sample is flattened.

    Returns
    -------
    numpy.ndarray, shape (N,)
        Pearson correlation of the (tie-averaged) ranks; ``nan`` where a sample is constant.
    """
    x = a.detach().cpu().double().numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float64)
    y = b.detach().cpu().double().numpy() if isinstance(b, Tensor) else np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    stats = require("scipy.stats", "Spearman rank correlation")
    rx = stats.rankdata(x.reshape(x.shape[0], -1), axis=1)  # ties share their average rank
    ry = stats.rankdata(y.reshape(y.shape[0], -1), axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), math.nan)


@dataclass(frozen=True, eq=False)
class RandomisationResult:
    """Outcome of :func:`model_parameter_randomisation`.

    Attributes
    ----------
    layers : list of str
        Module names in the order they were randomised.
    correlations : numpy.ndarray, shape (len(layers), N)
        Spearman rank correlation between the original explanation and the explanation after
        randomising up to (cascading) or only (independent) ``layers[i]``, per sample.
    mode : {"cascading", "independent"}
    """

    layers: list[str]
    correlations: np.ndarray
    mode: str

    @property
    def mean(self) -> np.ndarray:
        """Mean correlation over the samples per step, shape ``(len(layers),)``."""
        return np.nanmean(self.correlations, axis=1)

    def as_dict(self) -> dict[str, float]:
        """Layer name -> mean correlation."""
        return dict(zip(self.layers, map(float, self.mean)))


def _parameter_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _reinitialise(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
            nn.init.normal_(p, std=std if std > 0 else 0.02)


def model_parameter_randomisation(
    explain_fn: ExplainFn,
    model: nn.Module,
    inputs: Tensor,
    targets: Targets = None,
    *,
    layer_order: str | Sequence[str] = "top_down",
    mode: str = "cascading",
    absolute: bool = False,
    seed: int = 0,
) -> RandomisationResult:
    """Model parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps").

    The parameters of the model are re-initialised layer by layer, by default cascading from the
    output layer down, and after each step the explanation is compared with the original one by
    Spearman rank correlation. An explanation that depends on what the model has learned must
    decorrelate as more layers are randomised.

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(model, inputs, targets) -> attributions``.
    model : torch.nn.Module
        The trained model. It is never modified: the randomisation happens on deep copies.
    inputs : torch.Tensor
        Batch to explain.
    targets : int, sequence of int, torch.Tensor or None
        Classes to explain, kept fixed throughout; by default the original model's predictions.
    layer_order : {"top_down", "bottom_up"} or sequence of str, default "top_down"
        Modules that own parameters, in reverse (``"top_down"``) or forward (``"bottom_up"``)
        registration order (which should follow the forward pass), or explicit module names.
    mode : {"cascading", "independent"}, default "cascading"
        Cascading keeps earlier randomisations; independent randomises one layer at a time on a
        fresh copy.
    absolute : bool, default False
        Compare ``|attributions|`` instead of signed attributions (Adebayo et al. report both).
    seed : int, default 0
        Seed of the re-initialisation (layer ``i`` uses ``seed + i``); the global RNG state is
        restored afterwards.

    Returns
    -------
    RandomisationResult
        Correlations per randomisation step and sample.

    Notes
    -----
    Re-initialisation uses each module's ``reset_parameters()`` (the framework's default
    initialisation; normalisation layers are reset to identity), or a normal distribution with the
    parameter's standard deviation for modules without it.
    """
    _check_choice("mode", mode, ("cascading", "independent"))
    all_layers = _parameter_layers(model)
    if isinstance(layer_order, str):
        _check_choice("layer_order", layer_order, ("top_down", "bottom_up"))
        names = all_layers[::-1] if layer_order == "top_down" else list(all_layers)
    else:
        names = list(layer_order)
        modules = dict(model.named_modules())
        unknown = [nm for nm in names if nm not in modules]
        if unknown:
            raise ValueError(f"unknown module names {unknown}; modules with parameters: {all_layers}")
    if not names:
        raise ValueError("the model has no modules with parameters to randomise")
    x = _as_tensor(inputs, "inputs")
    n = x.shape[0]

    def clean() -> Tensor:
        with torch.no_grad():
            return _model_output(model(x))

    tgt = _resolve_targets(targets, n, clean)
    reference = _explain(explain_fn, copy.deepcopy(model), x, tgt)
    if absolute:
        reference = reference.abs()
    working = copy.deepcopy(model)
    correlations = []
    for i, name in enumerate(names):
        if mode == "independent":
            working = copy.deepcopy(model)
        with _forked_rng(seed + i, [working]):
            _reinitialise(working.get_submodule(name))
        attr = _explain(explain_fn, working, x, tgt)
        if attr.shape != reference.shape:
            raise ValueError(f"explain_fn returned shape {tuple(attr.shape)}, expected {tuple(reference.shape)}")
        correlations.append(spearman_rank_correlation(reference, attr.abs() if absolute else attr))
    return RandomisationResult(layers=names, correlations=np.stack(correlations), mode=mode)
