"""Ops that fuse a sub-network into one node, or need a structural check: fused recurrent layers (oneDNN LSTM),
weight normalisation, in-place writes into views (``CopySlices``), ops re-expressed with primitive ops
(:class:`CompositeKernel`: GLU, ``nn.Bilinear``'s trilinear product, reentrant checkpointing), known custom
``autograd.Function``s, leaves."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import contextlib
import math
import string

import torch
import torch.nn.functional as F

from ..core.graph import (call_backward, custom_saved_tensors, forward_cls, function_attr, node_type, output_meta, saved,
                          wrapped_node)
from ..errors import UnsupportedOperationError, ValueUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from ..core.step import Site

Tensor = torch.Tensor


#: oneDNN's RNN modes (``aten/src/ATen/native/mkldnn/RNN.cpp``)
_MKLDNN_LSTM = 2


def lstm_layer_forward(x: Tensor, h0: Tensor, c0: Tensor, weight: Tensor, bias: Tensor | None,
                       reverse: bool = False, proj: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction with primitive ops (PyTorch's gate order ``i, f, g, o``).

    Parameters
    ----------
    x : Tensor
        Time-major input ``(T, B, I)``.
    h0, c0 : Tensor
        Initial states ``(B, H)``.
    weight : Tensor
        ``[W_ih, W_hh]`` concatenated along the input dimension, ``(4H, I + H)``: one linear map over
        ``[x_t, h_{t-1}]`` per step, so that the linear rule sees the whole gate pre-activation at once.
    bias : Tensor or None
        ``b_ih + b_hh``, ``(4H,)``.
    reverse : bool
        Process the sequence from the last step to the first (the backward direction of a bidirectional layer).
    proj : Tensor or None
        ``W_hr``, ``(P, H)``: an LSTM with projections (``proj_size=P``) emits ``h = W_hr (o · tanh(c))``.

    Returns
    -------
    output, h_T, c_T : Tensor
        ``(T, B, H)`` (in time order; ``P`` instead of ``H`` with a projection), ``(B, H)`` (or ``P``), ``(B, H)``.
    """
    steps = x.unbind(0)
    T = len(steps)
    outs: list[Tensor | None] = [None] * T
    h, c = h0, c0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        z = F.linear(torch.cat([steps[t], h], dim=1), weight, bias)
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if proj is not None:
            h = F.linear(h, proj)
        outs[t] = h
    return torch.stack(outs, 0), h, c


def gru_layer_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                      reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer and direction with primitive ops, the way ATen computes ``nn.GRU`` on a CPU.

    PyTorch's gate order is ``r, z, n``: ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h +
    b_hz)``, ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (h − n) ⊙ z + n`` (= ``(1 − z) ⊙ n + z ⊙ h``).
    Unlike the LSTM's, the new gate's recurrent term is multiplied by ``r`` before it meets the input term, so the
    input and recurrent maps stay two linear layers, each with its own bias (as in ``aten/src/ATen/native/RNN.cpp``:
    the input map over the whole sequence at once, then one ``GRUCell`` per step): the relevance a CPU ``nn.GRU``
    gets is the relevance of this graph, under every rule set.

    Parameters
    ----------
    x : Tensor
        Time-major input ``(T, B, I)``.
    h0 : Tensor
        Initial state ``(B, H)``.
    w_ih, w_hh : Tensor
        ``(3H, I)`` and ``(3H, H)``.
    b_ih, b_hh : Tensor or None
        ``(3H,)`` each.
    reverse : bool
        Process the sequence from the last step to the first.

    Returns
    -------
    output, h_T : Tensor
        ``(T, B, H)`` (in time order) and ``(B, H)``.
    """
    gi = F.linear(x, w_ih, b_ih).unbind(0)
    T = len(gi)
    outs: list[Tensor | None] = [None] * T
    h = h0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = gru_cell(gi[t], F.linear(h, w_hh, b_hh), h)
        outs[t] = h
    return torch.stack(outs, 0), h


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """ATen's GRU cell from the input and recurrent pre-activations ``gi``, ``gh`` (``(B, 3H)``, biases included)."""
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(h_r + i_r)
    z = torch.sigmoid(h_z + i_z)
    n = torch.tanh(i_n + h_n * r)
    return (h - n) * z + n


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM cell from its gate pre-activations ``(B, 4H)`` (order ``i, f, g, o``): ``(h, c)``."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def rnn_layer_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                      reverse: bool = False, relu: bool = False) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer and direction (``nn.RNN``): ``h' = act(W_hh h + b_hh + W_ih x + b_ih)`` with ``act``
    tanh or ReLU, the input map over the whole sequence at once, as ATen computes it on a CPU.

    Returns ``output (T, B, H)`` and ``h_T (B, H)``.
    """
    gi = F.linear(x, w_ih, b_ih).unbind(0)
    T = len(gi)
    outs: list[Tensor | None] = [None] * T
    h = h0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        a = F.linear(h, w_hh, b_hh) + gi[t]
        h = torch.relu(a) if relu else torch.tanh(a)
        outs[t] = h
    return torch.stack(outs, 0), h


class RecurrentKernel:
    """``MkldnnRnnLayerBackward0``: one layer and direction of ``nn.LSTM`` fused by oneDNN (CPU).

    Forward inputs: ``input (T, B, I)``, ``weight0 = W_ih``, ``weight1 = W_hh``, ``weight2 = b_ih``,
    ``weight3 = b_hh``, ``hx``, ``cx``; outputs ``output (T, B, H)``, ``hy``, ``cy`` (saved as ``result0..2``).
    """

    inputs = ("input", "weight0", "weight1", "weight2", "weight3", "hx_", "cx_")
    fields = inputs + ("mode", "has_biases", "batch_sizes", "reverse", "result0", "result1", "result2")

    @staticmethod
    def check(site: "Site") -> None:
        node = site.node
        mode = saved(node, "mode")
        if mode != _MKLDNN_LSTM:
            raise UnsupportedOperationError(
                f"{site.describe()}: oneDNN RNN mode {mode} is not supported (only LSTM, mode {_MKLDNN_LSTM}); "
                "register a rule with RuleSet.with_ops({'MkldnnRnnLayerBackward0': ...})")
        if saved(node, "batch_sizes"):
            raise UnsupportedOperationError(
                f"{site.describe()}: packed sequences through the fused oneDNN LSTM are not supported")

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        return saved(node, f"result{nr}") if nr < 3 else None


#: cuDNN's RNN modes (``cudnnRNNMode_t``, passed as ``mode`` to ``_cudnn_rnn``); MIOpen's ``miopenRNNMode_t`` numbers
#: them the same way
RNN_RELU, RNN_TANH, RNN_LSTM, RNN_GRU = 0, 1, 2, 3
_RNN_MODES = {RNN_RELU: "RNN_RELU", RNN_TANH: "RNN_TANH", RNN_LSTM: "LSTM", RNN_GRU: "GRU"}


class CudnnRnnKernel:
    """``CudnnRnnBackward0`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` on a CUDA GPU) and ``MiopenRnnBackward0`` (ROCm):
    the whole network (every layer and direction) in one node.

    ``_cudnn_rnn(input, weight[], weight_stride0, weight_buf, hx, cx, mode, hidden_size, proj_size, num_layers,
    batch_first, dropout, train, bidirectional, batch_sizes, dropout_state)`` (``derivatives.yaml``: differentiable
    inputs ``input, weight, hx, cx``, so the node's inputs are ``input``, one per tensor of ``weight``, ``hx``,
    ``cx``; differentiable outputs ``output, hy, cy``). Saved: ``input``, ``weight`` (the list), ``weight_stride0``,
    ``hx``, ``cx``, the configuration and ``result0`` (the output), ``result3`` (cuDNN's reserve space), ``result4``
    (the flat weight buffer).

    The parameters are read from the saved ``weight`` list, in PyTorch's order (per layer, per direction:
    ``W_ih, W_hh[, b_ih, b_hh][, W_hr]``, ``weight_stride0`` tensors each) — not from ``result4``, whose layout is
    cuDNN's own (matrices per gate, padded and aligned as the cuDNN version chooses). When the module's weights were
    flattened (``flatten_parameters``) the list's tensors are views into that buffer; either way they hold the
    values cuDNN used.
    """

    #: the saved fields the rule reads (checked against torch's generated node classes by the tests)
    fields = ("input", "weight", "weight_stride0", "hx", "cx", "mode", "hidden_size", "num_layers", "batch_first",
              "dropout", "train", "bidirectional", "batch_sizes", "result0")

    @staticmethod
    def mode(node: Any) -> int:
        return int(saved(node, "mode"))

    @staticmethod
    def check(site: "Site") -> None:
        node = site.node
        mode = saved(node, "mode")
        where = site.describe()
        if mode not in _RNN_MODES:
            raise UnsupportedOperationError(f"{where}: RNN mode {mode} is unknown (0-3: RNN_RELU, RNN_TANH, LSTM, GRU)")
        if saved(node, "batch_sizes"):
            raise UnsupportedOperationError(
                f"{where}: packed sequences (nn.utils.rnn.pack_padded_sequence) through the fused cuDNN RNN are not "
                "supported; pass the padded batch and explain the positions you want")
        layers = int(saved(node, "num_layers"))
        if saved(node, "train") and float(saved(node, "dropout") or 0.0) > 0 and layers > 1:
            raise UnsupportedOperationError(
                f"{where}: the RNN ran in training mode with dropout between layers, whose random mask cuDNN does not "
                "keep; explain the model in eval() mode")
        weights = saved(node, "weight")
        stride = int(saved(node, "weight_stride0"))
        dirs = 2 if saved(node, "bidirectional") else 1
        if weights is None or len(weights) != stride * layers * dirs:
            raise UnsupportedOperationError(
                f"{where}: expected {layers * dirs} groups of {stride} saved weights, found "
                f"{None if weights is None else len(weights)}")
        # input, the weights, hx, cx (and weight_buf before hx, should a torch version make it differentiable: the
        # rule reads hx and cx from the end)
        if len(site.edges) not in (len(weights) + 3, len(weights) + 4):
            raise UnsupportedOperationError(
                f"{where}: expected {len(weights) + 3} inputs (input, {len(weights)} weights, hx, cx), found "
                f"{len(site.edges)}; this torch version lays out _cudnn_rnn's inputs differently")

    @staticmethod
    def groups(node: Any) -> list[dict[str, Tensor | None]]:
        """The parameters of every layer and direction (``k = layer · directions + direction``), by name
        (``w_ih, w_hh, b_ih, b_hh, w_hr``; ``None`` where the network has none), with their positions in the saved
        list (``pos_<name>``)."""
        weights = list(saved(node, "weight"))
        stride = int(saved(node, "weight_stride0"))
        proj = int(saved(node, "proj_size") or 0) if CudnnRnnKernel.mode(node) == RNN_LSTM else 0
        names = ["w_ih", "w_hh"]
        if stride - (1 if proj else 0) == 4:
            names += ["b_ih", "b_hh"]
        if proj:
            names.append("w_hr")
        out = []
        for k in range(len(weights) // stride):
            g: dict[str, Any] = {n: None for n in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")}
            for j, n in enumerate(names):
                g[n] = weights[k * stride + j]
                g["pos_" + n] = k * stride + j
            out.append(g)
        return out

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        return saved(node, "result0") if nr == 0 else None


class FusedCellKernel:
    """``ThnnFusedLstmCellBackward0`` / ``ThnnFusedGruCellBackward0``: the element-wise part of one LSTM or GRU
    step fused by CUDA (``nn.LSTMCell``/``nn.GRUCell`` on a GPU, and ``nn.LSTM``/``nn.GRU`` where cuDNN does not
    take the input). The gate pre-activations come in as separate inputs: ``input_gates = x W_ihᵀ`` and
    ``hidden_gates = h W_hhᵀ`` (matrix products of their own, without bias), ``cx`` (LSTM) or ``hx`` (GRU), and the
    two biases.

    derivatives.yaml: ``_thnn_fused_lstm_cell(input_gates, hidden_gates, cx, input_bias, hidden_bias) -> (hy, cy,
    workspace)``, differentiable outputs ``hy, cy``, saved ``input_gates, hidden_gates, cx, input_bias,
    hidden_bias, result1 (cy), result2 (workspace)``; ``_thnn_fused_gru_cell(input_gates, hidden_gates, hx,
    input_bias, hidden_bias) -> (hy, workspace)``, differentiable output ``hy``, saved ``input_gates, hidden_gates,
    hx, input_bias, hidden_bias, result1 (workspace)``. All five inputs are differentiable.
    """

    def __init__(self, kind: str):
        self.kind = kind  # "lstm" or "gru"
        self.state_field = "cx" if kind == "lstm" else "hx"

    @property
    def fields(self) -> tuple[str, ...]:
        """The saved fields the rule reads (checked against torch's generated node classes by the tests)."""
        return ("input_gates", "hidden_gates", self.state_field, "input_bias", "hidden_bias") + (
            ("result1",) if self.kind == "lstm" else ())

    def forward(self, ig: Tensor, hg: Tensor, state: Tensor, ib: Tensor | None,
                hb: Tensor | None) -> tuple[Tensor, ...]:
        """The cell with primitive ops, written as the CPU cell computes the same step (``aten/src/ATen/native/
        RNN.cpp``): an LSTM's four pre-activations summed, a GRU's input and recurrent halves each with its bias."""
        gi = ig if ib is None else ig + ib
        gh = hg if hb is None else hg + hb
        if self.kind == "lstm":
            return lstm_cell(gh + gi, state)
        return (gru_cell(gi, gh, state),)

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        return saved(node, "result1") if self.kind == "lstm" and nr == 1 else None


class WeightNormKernel:
    """``_weight_norm_interface(v, g, dim) -> (w, norms)`` with ``w = g · v / ‖v‖`` (norm over every dimension but
    ``dim``). Saved: ``v``, ``g``, ``dim``, ``result1`` (the norms, shaped like ``g``)."""

    @staticmethod
    def scale(node: Any) -> Tensor:
        return saved(node, "g") / saved(node, "result1")

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        v = saved(node, "v")
        if nr != 0 or v is None:
            return None
        return v * self.scale(node)


#: in-place ops whose write into a view copies (``x[i] = y``) or fills with a constant (``x[i] = 0``)
_COPYING = frozenset({"CopyBackwards", "FillBackward0", "FillBackward1", "FillBackward2", "FillBackward3",
                      "ZeroBackward0"})


class CopySlicesKernel:
    """``CopySlices``: an in-place op applied to a view of a base tensor (family ``inplace``).

    When the op copies into the view (``x[i] = y``) or fills it with a constant, every output element is a copy of
    an element of the base or of the source, or a constant: a selection (:meth:`selects`), through which the
    Promise System recovers the inputs' values on the support from the output's (as for ``index_put``), so the
    ledger can measure what each input receives (circular padding, chunked attention, bias slices).
    """

    @staticmethod
    def selects(node: Any) -> bool:
        wrapped = wrapped_node(node)
        return wrapped is not None and node_type(wrapped) in _COPYING

    @staticmethod
    def can_replay(node: Any) -> bool:
        wrapped = wrapped_node(node)
        return wrapped is not None and node_type(wrapped) in ("CopyBackwards", "ZeroBackward0")

    @staticmethod
    def replay(node: Any, xs: Sequence[Any], nr: int) -> Tensor:
        """The written tensor from the base's value and the source's: for ``x[i] = y`` (a copy) and ``x[i].zero_()``
        (``y = b.clone(); y[1:3].zero_()`` builds Swin-V2's qkv bias). Where the write goes is read from the node's
        own backward: probing it with ones marks the base elements that are kept (1) or overwritten (0), and
        probing with the output positions ``1..n`` tells each source element the position it was written to. A
        fill with another constant (not kept by autograd), a broadcast source, or any other in-place op is not
        replayed (the value is declared unavailable rather than guessed)."""
        wrapped = wrapped_node(node)
        kind = node_type(wrapped) if wrapped is not None else None
        if kind not in ("CopyBackwards", "ZeroBackward0"):
            raise ValueUnavailableError(f"the in-place write of {node_type(node)} ({kind or 'unknown op'}) cannot be "
                                        "replayed (only copies and zero_() into a view are)")
        meta = output_meta(node)[nr]
        n = math.prod(meta.shape)
        exact = {torch.float64: 2 ** 53, torch.float32: 2 ** 24}.get(meta.dtype, 0)
        if n >= exact:
            raise ValueUnavailableError("too many elements to probe an in-place write's element map exactly")
        ones = torch.ones(meta.shape, dtype=meta.dtype, device=meta.device)
        with torch.no_grad():
            probe = call_backward(node, [ones])
            keep = probe[0]
            base = xs[0]
            out = torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)
            if bool((keep != 0).any()):
                if base is None:
                    raise ValueUnavailableError("the base tensor of an in-place write is not known")
                out = torch.where(keep != 0, base.to(meta.dtype).expand(meta.shape), out)
            if kind == "CopyBackwards":
                src = xs[1] if len(xs) > 1 else None
                cnt = probe[1] if len(probe) > 1 else None
                if src is None or cnt is None or bool((cnt != 1).any()):
                    raise ValueUnavailableError("the source of an in-place copy is unknown or broadcast")
                ids = torch.arange(1, n + 1, dtype=meta.dtype, device=meta.device).reshape(meta.shape)
                pos = call_backward(node, [ids])[1].reshape(-1).round().long() - 1
                out.reshape(-1)[pos] = src.to(meta.dtype).reshape(-1)
        return out


def function_family(family: str) -> Callable[["Site"], str]:
    """``family_of`` for the row of a known custom Function: ``family`` when the node comes from the expected
    Function class, ``"custom"`` otherwise (whose rule refuses it with a clear error)."""
    def family_of(site: "Site") -> str:
        cls = forward_cls(site.node)
        if cls is None or (cls.__module__, cls.__qualname__) != site.spec.function:
            return "custom"
        return family
    return family_of


class CompositeKernel:
    """An op re-expressed with primitive ops, so that the caller's rule set explains it op by op (family
    ``composite``, rule :class:`~dynamiclrp.rules.Decompose`).

    ``forward(node, *inputs)`` recomputes the node's outputs (a tensor or a tuple, one per forward output) from
    the values of its forward inputs with ordinary differentiable ops; ``inputs(node)`` returns those values when
    the node itself kept them (one entry per input position, ``None`` for one to obtain from the Promise System).
    The re-expression must compute the same function as the node: it is an exact rewrite, not an approximation.
    """

    def __init__(self, forward: Callable[..., Any], inputs: Callable[[Any], Sequence[Any]] | None = None):
        self.forward = forward
        self._inputs = inputs

    def inputs(self, node: Any) -> Sequence[Any] | None:
        return None if self._inputs is None else self._inputs(node)


def _glu(node: Any, x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=saved(node, "dim"))
    return a * torch.sigmoid(b)


#: ``GluBackward0`` (``nn.GLU``, Conformer/wav2vec2-Conformer convolution modules, gated CNNs): ``a · σ(b)`` with
#: ``[a, b]`` the two halves of the input. Re-expressed as a split, a sigmoid and a product, the rule set sees the
#: gate: with the default product rule the signal ``a`` takes the relevance of a sigmoid-gated product (Arras et
#: al. 2017), with AttnLRP's uniform rule each operand half of it. Exactly the node's function.
GLU = CompositeKernel(_glu, lambda node: [saved(node, "self")])


def trilinear_forward(node: Any, i1: Tensor, i2: Tensor, i3: Tensor) -> Tensor:
    """``aten._trilinear``: ``Σ_sumdim i1.unsqueeze(expand1) · i2.unsqueeze(expand2) · i3.unsqueeze(expand3)``,
    written as one ``einsum`` (which PyTorch evaluates with matmuls)."""
    e = [tuple(saved(node, f"expand{k}")) for k in (1, 2, 3)]
    ndim = i1.dim() + len(e[0])
    letters = string.ascii_letters[:ndim]
    subs = ["".join(letters[d] for d in range(ndim) if d not in ex) for ex in e]
    out = "".join(letters[d] for d in range(ndim) if d not in tuple(saved(node, "sumdim")))
    # contract the weight with a constant operand first, so the data operand meets one effective weight (a linear
    # layer); otherwise the first operand with the weight, then the product of the two data operands
    first, other = ((1, 2), 0) if _data(i1) and not _data(i3) else ((0, 1), 2)
    ops = (i1, i2, i3)
    keep = "".join(dict.fromkeys(c for c in subs[first[0]] + subs[first[1]] if c in subs[other] + out))
    mid = torch.einsum(f"{subs[first[0]]},{subs[first[1]]}->{keep}", ops[first[0]], ops[first[1]])
    pair = (mid, ops[other]) if other == 2 else (ops[other], mid)
    spec = f"{keep},{subs[other]}->{out}" if other == 2 else f"{subs[other]},{keep}->{out}"
    return torch.einsum(spec, *pair)


def _data(t: Tensor) -> bool:
    """A data operand of a re-expression: a leaf that requires grad and is no parameter."""
    return t.requires_grad and not isinstance(t, torch.nn.Parameter)


#: ``TrilinearBackward0`` (``nn.Bilinear``: ``y_k = x₁ᵀ W_k x₂``): a product of three operands re-expressed as two
#: matmuls. With one data operand and the weight it is a linear layer (the linear rule); with two data operands the
#: second matmul multiplies two activations (the rule set's product rule: AttnLRP's uniform rule gives each half, as
#: for ``Q·Kᵀ``). With LRP-0 this equals the z-rule on the terms ``x₁ᵢ W_kij x₂ⱼ`` split uniformly between the two
#: activations.
TRILINEAR = CompositeKernel(trilinear_forward, lambda node: [saved(node, "i1"), saved(node, "i2"), saved(node, "i3")])


def _ctx(node: Any, name: str, default: Any) -> Any:
    try:
        return function_attr(node, name)
    except AttributeError:
        return default


def _checkpoint_inputs(node: Any) -> list[Any]:
    return list(custom_saved_tensors(node))


def checkpoint_forward(node: Any, *tensors: Tensor) -> Any:
    """Re-run a reentrant checkpoint's function the way its backward does: the saved tensor arguments put back
    among the non-tensor ones, the forward's CPU random state restored (dropout draws the same mask)."""
    args = list(function_attr(node, "inputs"))
    for i, idx in enumerate(function_attr(node, "tensor_indices")):
        args[idx] = tensors[i]
    preserve = bool(_ctx(node, "preserve_rng_state", False))
    with torch.random.fork_rng(devices=[], enabled=preserve):
        if preserve and _ctx(node, "fwd_cpu_state", None) is not None:
            torch.set_rng_state(function_attr(node, "fwd_cpu_state"))
        cpu_autocast = _ctx(node, "cpu_autocast_kwargs", None) or {}
        ctx = torch.amp.autocast("cpu", **cpu_autocast) if cpu_autocast else contextlib.nullcontext()
        with torch.enable_grad(), ctx:
            return function_attr(node, "run_function")(*args)


#: ``CheckpointFunctionBackward`` (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``): the forward ran
#: without recording a graph, keeping only the function and its inputs — so, like the checkpoint's own backward, the
#: function is run again with a graph, and that graph is explained with the caller's rule set (every op inside gets
#: its own rule; the result is the same as without checkpointing).
CHECKPOINT = CompositeKernel(checkpoint_forward, _checkpoint_inputs)


class LeafKernel:
    """``AccumulateGrad``: a leaf tensor (input or parameter)."""
