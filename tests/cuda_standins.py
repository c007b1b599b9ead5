"""CUDA-only autograd nodes on a CPU: the same saved tensors under the CUDA node's type name and field names.

A GPU run produces node types a CPU never does (``CudnnBatchNormBackward0``, ``CudnnRnnBackward0``, the CUDA SDPA
backends, ``FusedRmsNormBackward0``). Their rules only read saved fields by name (``core.graph.saved``) and call
the node's backward, so they can be tested on a CPU with a node that *looks* like the CUDA one:

* :func:`disguised` wraps the graph that ``dynamiclrp`` reads in proxies (while the context is active, the graph
  ``core.run.compute`` walks is made of proxies of the real nodes, with the same structure and slot numbering).
  A proxy of an untranslated node is transparent. A translated one has the CUDA node's class name and exposes
  **exactly** the saved fields that torch's generated class of that name declares (``torch._C._functions``;
  a rule reading a field that the CUDA node does not have gets ``None``, as it would on the GPU), filled from the
  real CPU node (renamed fields, e.g. ``eps`` -> ``epsilon``) or from a stand-in Function's context;
* stand-in ``torch.autograd.Function``s compute what the CUDA kernel computes (with the CPU reference
  implementation) and keep the fields the CUDA node saves: :class:`CudnnRnnStandIn` (``_cudnn_rnn``: an
  LSTM/GRU/RNN with all its layers and directions in one node), :class:`FusedRmsNormStandIn`.

What this cannot show: the CUDA kernels' numerics, and that a given GPU selects these nodes (``scripts/gpu_check.py``
checks both on a GPU).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

import dynamiclrp.core.run as run_module
from dynamiclrp.core.graph import GraphView

_SAVED = "_saved_"


def cuda_saved_fields(name: str) -> frozenset[str]:
    """The saved fields torch's generated node class ``name`` declares (``_saved_<field>`` attributes)."""
    cls = getattr(torch._C._functions, name)
    return frozenset(a[len(_SAVED):] for a in dir(cls) if a.startswith(_SAVED))


class _Proxy:
    """A node as ``dynamiclrp`` sees it; see the module docstring."""

    __slots__ = ("_real", "_book", "_fields", "_call")

    def __init__(self, real: Any, book: "_Book", fields: dict[str, Callable[[], Any]] | None,
                 call: Callable[..., Any] | None):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_book", book)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_call", call)

    @property
    def next_functions(self) -> tuple:
        return tuple((None if c is None else self._book.wrap(c), nr) for c, nr in self._real.next_functions)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if fields is not None:
            if name.startswith(_SAVED):
                getter = fields.get(name[len(_SAVED):])
                if getter is None:
                    raise AttributeError(name)
                return getter()
            if name in ("_forward_cls", "saved_tensors", "apply"):  # a built-in node, not a custom Function
                raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_real"), name)

    def __call__(self, *grads: Any) -> Any:
        if self._call is not None:
            return self._call(*grads)
        return self._real(*grads)


_CLASSES: dict[str, type] = {}


def _proxy_class(name: str) -> type:
    cls = _CLASSES.get(name)
    if cls is None:
        cls = _CLASSES[name] = type(name, (_Proxy,), {"__slots__": ()})
    return cls


#: ``translate(real_node) -> (cuda type name, {field: getter}, backward or None)``
Translation = Callable[[Any], "tuple[str, dict[str, Callable[[], Any]], Callable[..., Any] | None]"]


class _Book:
    def __init__(self, translations: dict[str, Translation]):
        self.translations = translations
        self.proxies: dict[int, _Proxy] = {}
        self.seen: list[str] = []

    def wrap(self, real: Any) -> _Proxy:
        p = self.proxies.get(id(real))
        if p is None:
            t = self.translations.get(type(real).__name__)
            if t is None:
                p = _proxy_class(type(real).__name__)(real, self, None, None)
            else:
                name, fields, call = t(real)
                missing = cuda_saved_fields(name) - set(fields)
                assert not missing, f"the stand-in for {name} does not provide {sorted(missing)}"
                fields = {f: g for f, g in fields.items() if f in cuda_saved_fields(name)}
                p = _proxy_class(name)(real, self, fields, call)
                self.seen.append(name)
            self.proxies[id(real)] = p
        return p


@contextlib.contextmanager
def disguised(translations: dict[str, Translation]) -> Iterator[list[str]]:
    """Within the context, ``dynamiclrp`` reads graphs through proxies translated by ``translations`` (keyed by
    the real node's type name). Yields the list of CUDA node types met (for assertions that a test exercised
    them)."""
    seen: list[str] = []
    orig = run_module.prepare

    def prepare(outputs: Any, inputs: Any, seeds: Any, *args: Any, **kwargs: Any) -> Any:
        call = orig(outputs, inputs, seeds, *args, **kwargs)
        book = _Book(translations)
        call.graph = GraphView([(book.wrap(o.grad_fn), o.output_nr) for o in call.outputs])
        seen.extend(book.seen)
        return call

    run_module.prepare = prepare
    try:
        yield seen
    finally:
        run_module.prepare = orig


def _get(node: Any, field: str) -> Callable[[], Any]:
    return lambda: getattr(node, _SAVED + field)


def _const(v: Any) -> Callable[[], Any]:
    return lambda: v


# -------------------------------------------------------------------------------------------------------------
# Translations of real CPU nodes
# -------------------------------------------------------------------------------------------------------------
def batchnorm_as(name: str) -> Translation:
    """``NativeBatchNormBackward0`` as ``CudnnBatchNormBackward0`` / ``MiopenBatchNormBackward0``: the same
    tensors, ``eps`` saved as ``epsilon``, cuDNN's reserve space as ``result3``."""
    def t(node: Any):
        fields = {f: _get(node, f) for f in ("input", "weight", "running_mean", "running_var", "training",
                                              "result1", "result2")}
        fields["epsilon"] = _get(node, "eps")
        fields["result3"] = _const(torch.empty(0, dtype=torch.uint8))
        return name, fields, None
    return t


def sdpa_as(name: str) -> Translation:
    """The CPU flash-attention node as one of the CUDA SDPA nodes (its backward: the CPU kernel's, the same
    gradients). Fields the CPU node does not have (random-number state, sequence offsets) are empty tensors."""
    def t(node: Any):
        cuda = cuda_saved_fields(name)
        fields: dict[str, Callable[[], Any]] = {}
        rename = {"log_sumexp": "logsumexp", "softmax_logsumexp": "logsumexp", "attn_bias": "attn_mask",
                  "bias": "attn_mask"}
        for f in cuda:
            src = rename.get(f, f)
            if hasattr(node, _SAVED + src):
                fields[f] = _get(node, src)
            else:
                fields[f] = _const(torch.empty(0))
        return name, fields, None
    return t


# -------------------------------------------------------------------------------------------------------------
# Stand-in Functions
# -------------------------------------------------------------------------------------------------------------
#: ``_cudnn_rnn``'s ``mode`` (cudnnRNNMode_t)
MODES = {"RNN_RELU": 0, "RNN_TANH": 1, "LSTM": 2, "GRU": 3}


def _rnn_reference(cfg: dict, x: torch.Tensor, weights: list[torch.Tensor], hx: torch.Tensor,
                   cx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network on a CPU (ATen's reference implementation, what ``nn.LSTM``/``nn.GRU``/``nn.RNN`` call)."""
    args = (cfg["has_biases"], cfg["num_layers"], 0.0, False, cfg["bidirectional"], cfg["batch_first"])
    if cfg["mode"] == "LSTM":
        out, hy, cy = torch._VF.lstm(x, (hx, cx), weights, *args)
        return out, hy, cy
    fn = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}[cfg["mode"]]
    out, hy = fn(x, hx, weights, *args)
    return out, hy, torch.empty(0, dtype=x.dtype)


class CudnnRnnStandIn(torch.autograd.Function):
    """``_cudnn_rnn`` on a CPU: inputs ``(x, *weights, hx, cx)`` (the CUDA node's input order), outputs
    ``(output, hy, cy)``; the context keeps what ``CudnnRnnBackward0`` saves."""

    @staticmethod
    def forward(ctx: Any, cfg: dict, x: torch.Tensor, *rest: torch.Tensor) -> Any:  # type: ignore[override]
        weights, hx, cx = list(rest[:-2]), rest[-2], rest[-1]
        out, hy, cy = _rnn_reference(cfg, x, weights, hx, cx)
        ctx.cfg = cfg
        ctx.n_weights = len(weights)
        ctx.save_for_backward(x, hx, cx, out, *weights)
        return out, hy, cy

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor, g_hy: torch.Tensor, g_cy: torch.Tensor) -> Any:
        x, hx, cx, _out, *weights = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) for t in [x, *weights, hx, cx]]
        with torch.enable_grad():
            outs = _rnn_reference(ctx.cfg, leaves[0], leaves[1:-2], leaves[-2], leaves[-1])
            pairs = [(o, g) for o, g in zip(outs, (g_out, g_hy, g_cy)) if g is not None and o.numel()]
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        return (None, *grads)


def cudnn_rnn_translation(node: Any):
    """The stand-in's node as ``CudnnRnnBackward0``."""
    cfg = node.cfg

    def saved(k: int) -> Callable[[], Any]:
        return lambda: node.saved_tensors[k]

    def weights() -> list[torch.Tensor]:
        return list(node.saved_tensors[4:])

    def cx() -> Any:
        t = node.saved_tensors[2]
        return t if cfg["mode"] == "LSTM" else None

    fields = {
        "input": saved(0), "hx": saved(1), "cx": cx, "result0": saved(3), "weight": weights,
        "weight_stride0": _const(cfg["stride"]), "mode": _const(MODES[cfg["mode"]]),
        "hidden_size": _const(cfg["hidden_size"]), "proj_size": _const(cfg["proj_size"]),
        "num_layers": _const(cfg["num_layers"]), "batch_first": _const(cfg["batch_first"]),
        "dropout": _const(cfg.get("dropout", 0.0)), "train": _const(cfg.get("train", False)),
        "bidirectional": _const(cfg["bidirectional"]), "batch_sizes": _const(cfg.get("batch_sizes", [])),
        "dropout_state": _const(None),
        "result3": _const(torch.empty(0, dtype=torch.uint8)), "result4": lambda: torch.cat(
            [w.detach().reshape(-1) for w in weights()]),
    }
    return "CudnnRnnBackward0", fields, lambda *grads: node.apply(*grads)[1:]


def cudnn_rnn(module: nn.RNNBase, x: torch.Tensor, hx: Any = None, **saved: Any) -> tuple[torch.Tensor, Any]:
    """Run ``module`` (an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``) as cuDNN would: one stand-in node for the whole
    network. Returns what the module returns. ``saved`` overrides saved configuration fields the stand-in does not
    act on (``train``, ``dropout``, ``batch_sizes``: for the rule's refusals)."""
    mode = {nn.LSTM: "LSTM", nn.GRU: "GRU"}.get(type(module))
    if mode is None:
        mode = "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"
    dirs = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0) or 0
    B = x.shape[0] if module.batch_first else x.shape[1]
    h_size = proj or module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * dirs, B, h_size)
        c0 = x.new_zeros(module.num_layers * dirs, B, module.hidden_size) if mode == "LSTM" else x.new_zeros(0)
    elif mode == "LSTM":
        h0, c0 = hx
    else:
        h0, c0 = hx, x.new_zeros(0)
    weights = list(module._flat_weights)
    cfg = {"mode": mode, "has_biases": module.bias, "num_layers": module.num_layers,
           "bidirectional": module.bidirectional, "batch_first": module.batch_first,
           "hidden_size": module.hidden_size, "proj_size": proj,
           "stride": len(weights) // (module.num_layers * dirs), **saved}
    out, hy, cy = CudnnRnnStandIn.apply(cfg, x, *weights, h0, c0)
    return out, ((hy, cy) if mode == "LSTM" else hy)


class FusedRmsNormStandIn(torch.autograd.Function):
    """``_fused_rms_norm(input, normalized_shape, weight, eps)`` on a CPU: ``y = x · rstd · w`` with
    ``rstd = rsqrt(mean(x², normalised dims) + eps)``."""

    @staticmethod
    def _reference(x: torch.Tensor, w: torch.Tensor, dims: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        red = tuple(range(-dims, 0))
        rstd = torch.rsqrt(x.pow(2).mean(red, keepdim=True) + eps)
        return x * rstd * w, rstd

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, dims: int, eps: float) -> torch.Tensor:  # type: ignore[override]
        y, rstd = FusedRmsNormStandIn._reference(x, w, dims, eps)
        ctx.dims, ctx.eps, ctx.shape = dims, eps, tuple(x.shape[-dims:])
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w, _ = ctx.saved_tensors
        leaves = [x.detach().requires_grad_(True), w.detach().requires_grad_(True)]
        with torch.enable_grad():
            y, _ = FusedRmsNormStandIn._reference(*leaves, ctx.dims, ctx.eps)
            gx, gw = torch.autograd.grad(y, leaves, g)
        return gx, gw, None, None


def fused_rms_norm_translation(node: Any):
    def saved(k: int) -> Callable[[], Any]:
        return lambda: node.saved_tensors[k]
    fields = {"input": saved(0), "weight": saved(1), "result1": saved(2), "normalized_shape": _const(node.shape)}
    return "FusedRmsNormBackward0", fields, lambda g: node.apply(g)[:2]


def rms_norm(module: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.RMSNorm`` as a GPU runs it: one ``_fused_rms_norm`` node."""
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    return FusedRmsNormStandIn.apply(x, module.weight, len(module.normalized_shape), eps)


class FusedCellStandIn(torch.autograd.Function):
    """``_thnn_fused_lstm_cell`` / ``_thnn_fused_gru_cell`` on a CPU: inputs ``(input_gates, hidden_gates, state,
    input_bias, hidden_bias)``; outputs ``(hy, cy)`` (LSTM) or ``hy`` (GRU), computed as the CUDA kernel does."""

    @staticmethod
    def _reference(kind: str, ig, hg, state, ib, hb):
        if kind == "lstm":
            gates = ig + hg + ib + hb
            i, f, g, o = gates.chunk(4, 1)
            cy = torch.sigmoid(f) * state + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(cy), cy
        i_r, i_z, i_n = (ig + ib).chunk(3, 1)
        h_r, h_z, h_n = (hg + hb).chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (n + z * (state - n),)

    @staticmethod
    def forward(ctx: Any, kind: str, ig, hg, state, ib, hb):  # type: ignore[override]
        outs = FusedCellStandIn._reference(kind, ig, hg, state, ib, hb)
        ctx.kind = kind
        ctx.save_for_backward(ig, hg, state, ib, hb, *outs)
        return outs if kind == "lstm" else outs[0]

    @staticmethod
    def backward(ctx: Any, *grads):
        ig, hg, state, ib, hb = ctx.saved_tensors[:5]
        leaves = [t.detach().requires_grad_(True) for t in (ig, hg, state, ib, hb)]
        with torch.enable_grad():
            outs = FusedCellStandIn._reference(ctx.kind, *leaves)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
            res = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        return (None, *res)


def fused_cell_translation(node: Any):
    lstm = node.kind == "lstm"

    def saved(k: int) -> Callable[[], Any]:
        return lambda: node.saved_tensors[k]
    fields = {"input_gates": saved(0), "hidden_gates": saved(1), ("cx" if lstm else "hx"): saved(2),
              "input_bias": saved(3), "hidden_bias": saved(4),
              "result1": saved(6) if lstm else _const(torch.empty(0)),
              "result2": _const(torch.empty(0))}
    name = "ThnnFusedLstmCellBackward0" if lstm else "ThnnFusedGruCellBackward0"
    return name, fields, lambda *g: node.apply(*g)[1:]


def fused_cell(module: nn.RNNCellBase, x: torch.Tensor, hx: Any = None) -> Any:
    """``nn.LSTMCell`` / ``nn.GRUCell`` as a CUDA GPU runs it: ``x W_ihᵀ`` and ``h W_hhᵀ`` as matrix products, then
    one fused cell node with the biases."""
    lstm = isinstance(module, nn.LSTMCell)
    B = x.shape[0]
    if hx is None:
        z = x.new_zeros(B, module.hidden_size)
        hx = (z, z) if lstm else z
    h, state = (hx[0], hx[1]) if lstm else (hx, hx)
    ig = torch.mm(x, module.weight_ih.t())
    hg = torch.mm(h, module.weight_hh.t())
    return FusedCellStandIn.apply("lstm" if lstm else "gru", ig, hg, state, module.bias_ih, module.bias_hh)


#: every translation, keyed by the real node's type
CUDA = {
    "NativeBatchNormBackward0": batchnorm_as("CudnnBatchNormBackward0"),
    "CudnnRnnStandInBackward": cudnn_rnn_translation,
    "FusedRmsNormStandInBackward": fused_rms_norm_translation,
    "FusedCellStandInBackward": fused_cell_translation,
}
