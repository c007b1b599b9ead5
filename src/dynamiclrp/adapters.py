"""Adapters for code written against Captum and Quantus.

Captum
------
:class:`LRP` has the interface of ``captum.attr.LRP``: ``LRP(model).attribute(inputs, target=...,
additional_forward_args=...)`` returns a tensor (or tuple) shaped like ``inputs``, so existing Captum code switches
with one line::

    from captum.attr import LRP          # before
    from dynamiclrp import LRP           # after

What is the same: arguments, target semantics (an int, a tuple for outputs with more than two dimensions, one per
example as a list or tensor), shapes, ``return_convergence_delta``, and the scale of the result — relevance sums
to the target output (Captum multiplies its normalised relevance back by the output). What is different:

* any model works — attention, normalisation, embeddings, reused modules, ``torch.nn.functional`` calls — because
  relevance is propagated over the autograd graph rather than through module hooks;
* rules are chosen per operation family with ``rules=`` (a preset name or a :class:`~dynamiclrp.rules.RuleSet`)
  instead of a ``rule`` attribute on each module;
* the model is never modified (Captum rewrites weights and restores a saved ``state_dict``), and inputs are
  never switched to ``requires_grad`` in place;
* the default rule set is :func:`dynamiclrp.presets.epsilon` (ε = 1e-6); Captum's default is ε = 1e-9 on every
  layer, which ``rules=dynamiclrp.presets.epsilon(1e-9)`` reproduces on the layers Captum supports.

Quantus
-------
:func:`quantus_explain` has the signature of ``quantus.explain`` (``explain_func(model, inputs, targets,
**kwargs) -> np.ndarray``), so it plugs into any Quantus metric::

    metric(model=model, x_batch=x, y_batch=y, explain_func=dynamiclrp.adapters.quantus_explain,
           explain_func_kwargs={"rules": "epsilon_plus"})
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .api import relevance as _relevance

__all__ = ["LRP", "quantus_explain"]

TargetType = Union[None, int, tuple, Tensor, Sequence[Union[int, tuple]]]


def _select_targets(output: Tensor, target: TargetType) -> Tensor:
    """The ``(batch,)`` entries of ``output`` that ``target`` names, with Captum's conventions."""
    n = output.shape[0]
    if target is None:
        if output.dim() > 1 and output[0].numel() != 1:
            raise ValueError(f"the model has {output[0].numel()} outputs per example "
                             f"(output shape {tuple(output.shape)}): pass target=<index> to say which to explain")
        return output.reshape(n)
    if output.dim() < 2:
        raise ValueError(f"the model returns one value per example (shape {tuple(output.shape)}); pass target=None")
    if isinstance(target, Tensor):
        target = target.detach().cpu()
        target = int(target) if target.numel() == 1 else target.reshape(-1).tolist()
    if isinstance(target, (int, np.integer)):
        idx: list[Any] = [int(target)] * n
    elif isinstance(target, tuple):
        idx = [target] * n
    else:
        idx = list(target)
        if len(idx) != n:
            raise ValueError(f"got {len(idx)} targets for {n} examples; give one target, or one per example")
    flat = output.reshape(n, -1)
    shape = tuple(output.shape[1:])
    positions = []
    for i, t in enumerate(idx):
        t = tuple(int(v) for v in t) if isinstance(t, (tuple, list)) else (int(t),)
        if len(t) != len(shape):
            raise ValueError(f"target {t if len(t) > 1 else t[0]} has {len(t)} index(es) but each example's output "
                             f"has {len(shape)} dimension(s) {shape}; use a tuple of {len(shape)} indices")
        for v, size in zip(t, shape):
            if not -size <= v < size:
                raise ValueError(f"target {t if len(t) > 1 else t[0]} is out of range for outputs of shape {shape}")
        positions.append(int(np.ravel_multi_index(tuple(v % s for v, s in zip(t, shape)), shape)))
    index = torch.tensor(positions, device=output.device)
    return flat.gather(1, index[:, None]).squeeze(1)


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return x if isinstance(x, tuple) else (x,)


class LRP:
    """Captum-style Layer-wise Relevance Propagation, computed over the autograd graph.

    Parameters
    ----------
    model : callable
        A ``torch.nn.Module`` or any function of tensors (Captum's ``forward_func``); called as
        ``model(*inputs, *additional_forward_args)``.
    rules : None, str or RuleSet, optional
        ``None`` for the default preset (:func:`dynamiclrp.presets.epsilon`), a preset name, or a
        :class:`~dynamiclrp.rules.RuleSet`.

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> attr = dynamiclrp.LRP(net).attribute(torch.randn(2, 4), target=1)
    >>> attr.shape
    torch.Size([2, 4])
    """

    def __init__(self, model: Callable[..., Any], rules: Any = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
        self.model = model
        self.forward_func = model
        self.rules = rules

    @property
    def multiplies_by_inputs(self) -> bool:
        """LRP relevance is in units of the output (like gradient × input), as in Captum."""
        return True

    def has_convergence_delta(self) -> bool:
        """Whether :meth:`attribute` can return a convergence delta (it can)."""
        return True

    def attribute(self, inputs: Tensor | tuple[Tensor, ...], target: TargetType = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  verbose: bool = False) -> Any:
        """Relevance of each input feature for the target output, like ``captum.attr.LRP.attribute``.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Model input(s), batch first. Floating point: token ids cannot carry relevance — attribute to the
            embeddings instead (see :mod:`dynamiclrp.hf`). Not modified.
        target : int, tuple, Tensor or list, optional
            Captum's target: the output index for all examples (a tuple of indices for outputs with more than
            two dimensions), or one per example as a list or 1-D tensor. ``None`` for models with one output.
        additional_forward_args : Any, optional
            Extra arguments passed to the model after the inputs (a tuple for several); not attributed.
        return_convergence_delta : bool, default False
            Also return ``output - sum(attributions)`` per example (the relevance absorbed by biases and
            stabilizers; see :func:`dynamiclrp.explain` for a full account).
        verbose : bool, default False
            Print the rule set used.

        Returns
        -------
        Tensor or tuple of Tensor, or (attributions, delta)
            Attributions with the shape of ``inputs`` (a tuple when ``inputs`` is a tuple); they sum, per
            example, to the target output minus what the rules absorbed.

        Raises
        ------
        ValueError
            A target that does not fit the model's output.
        """
        is_tuple = isinstance(inputs, tuple)
        xs = _as_tuple(inputs)
        if not xs:
            raise ValueError("no inputs given")
        leaves = []
        for i, x in enumerate(xs):
            if not isinstance(x, Tensor):
                raise TypeError(f"input {i} is a {type(x).__name__}; pass tensors")
            if not x.is_floating_point():
                raise TypeError(f"input {i} has dtype {x.dtype}: relevance needs floating-point inputs. For token "
                                "ids, attribute to the embeddings (dynamiclrp.hf, or model.get_input_embeddings())")
            leaves.append(x.detach().clone().requires_grad_(True))
        extra = _as_tuple(additional_forward_args)
        if verbose:
            print(f"dynamiclrp.LRP: rules={self.rules if self.rules is not None else 'epsilon (default)'}")
        with torch.enable_grad():
            out = self.model(*leaves, *extra)
            if not isinstance(out, Tensor):
                raise TypeError(f"the model returned {type(out).__name__}; LRP needs a tensor output (wrap the "
                                "model so that it returns the logits)")
            selected = _select_targets(out, target)
        attributions = _relevance(selected, leaves, rules=self.rules, model=self.model)  # frozen biases
        result = attributions if is_tuple else attributions[0]
        if return_convergence_delta:
            return result, self.compute_convergence_delta(result, selected.detach())
        return result

    def compute_convergence_delta(self, attributions: Tensor | tuple[Tensor, ...], output: Tensor) -> Tensor:
        """``output - sum of attributions`` per example (Captum's definition).

        Parameters
        ----------
        attributions : Tensor or tuple of Tensor
            Batch-first attributions.
        output : Tensor
            The explained output value per example.
        """
        total = sum(a.reshape(a.shape[0], -1).sum(1) for a in _as_tuple(attributions))
        return output.reshape(-1) - total  # type: ignore[operator]


def quantus_explain(model: Any, inputs: np.ndarray | Tensor, targets: np.ndarray | Tensor | int | None,
                    **kwargs: Any) -> np.ndarray:
    """A ``quantus.explain``-compatible explanation function computing LRP relevance.

    Parameters
    ----------
    model : torch.nn.Module
        The model Quantus passes (put it in ``eval()`` mode yourself).
    inputs : numpy.ndarray or Tensor
        Batch of inputs, channel first ``(N, C, ...)`` (or channel last with ``channel_first=False``).
    targets : numpy.ndarray, Tensor, int or None
        Class per example.
    **kwargs
        ``rules`` (preset name or RuleSet, default ``"epsilon"``); Quantus' own ``channel_first`` (default:
        inferred as Quantus does), ``reduce_axes`` (default: the channel axis, ``(1,)`` for channel-first input as
        in Quantus' Captum backend), ``keepdims`` (default ``True``), ``device``. ``softmax=True`` is refused:
        LRP explains logits. Other keys (e.g. Quantus' ``method``) are ignored.

    Returns
    -------
    numpy.ndarray
        float32 relevance, the inputs' shape with ``reduce_axes`` summed (kept as size 1 with ``keepdims``).
        Inputs with fewer than three dimensions are never reduced, like Quantus.
    """
    if kwargs.get("softmax"):
        raise ValueError("softmax=True asks for explanations of probabilities; LRP explains logits. Pass a model "
                         "that returns logits and leave softmax unset")
    rules = kwargs.get("rules", "epsilon")
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs)
    if not x.is_floating_point():
        x = x.float()
    channel_first = kwargs.get("channel_first")
    if channel_first is None:
        channel_first = x.dim() < 3 or x.shape[1] <= x.shape[-1]  # Quantus' infer_channel_first heuristic
    if not channel_first:
        x = x.movedim(-1, 1)
    device = kwargs.get("device")
    if device is None:
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        device = params[0].device if params else x.device
        dtype = params[0].dtype if params and params[0].is_floating_point() else x.dtype
    else:
        dtype = x.dtype
    x = x.to(device=device, dtype=dtype)
    if getattr(model, "training", False):
        warnings.warn("the model is in training mode; call model.eval() before measuring", UserWarning, stacklevel=2)
    t = targets
    if isinstance(t, np.ndarray):
        t = torch.as_tensor(t)
    if isinstance(t, Tensor) and t.numel() == 1 and x.shape[0] > 1:
        t = int(t)
    attr = LRP(model, rules=rules).attribute(x, target=t)
    if not channel_first:
        attr = attr.movedim(1, -1)
    a = attr.detach().float().cpu().numpy()
    reduce_axes = tuple(kwargs.get("reduce_axes", (1,) if channel_first else (a.ndim - 1,)))
    if 0 in reduce_axes:
        raise ValueError("reduce_axes must not contain the batch axis 0")
    if reduce_axes and a.ndim >= 3:
        a = a.sum(axis=reduce_axes, keepdims=bool(kwargs.get("keepdims", True)))
    return a
