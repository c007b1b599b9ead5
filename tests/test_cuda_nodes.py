"""Rows and rules for the node types only a GPU produces, tested on a CPU (issue 17).

The CUDA nodes' rules read saved fields by name and call the node's backward. Here they get nodes that look like
the CUDA ones (``cuda_standins``: the CUDA class name, exactly the saved fields torch's generated class of that name
declares, the same tensors the CPU computed) and must give what the CPU gives:

* **field names**: every field a registry row or its kernel reads exists in torch's generated node class of that
  name (``torch._C._functions``: the generated code of ``derivatives.yaml`` of the installed torch);
* **batch norm**: ``CudnnBatchNormBackward0`` / ``MiopenBatchNormBackward0`` give the native node's relevance,
  eval-mode ones merged into the convolution before them, training-mode ones with the batch statistics;
* **RNN**: the re-expression of a cuDNN network (all layers and directions in one node) computes ``nn.LSTM`` /
  ``nn.GRU`` / ``nn.RNN``; its relevance equals the CPU's (the oneDNN LSTM rule; ATen's GRU / Elman graph) under
  every rule set, the ledger closes, and what cannot be re-expressed is refused;
* **fused cells**, **fused RMSNorm**, **SDPA backends**: equal to the CPU graph of the same model (exactly under
  LRP-0 for the cells, whose biases a GPU adds inside the fused kernel).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from dynamiclrp.errors import UnsupportedOperationError
from dynamiclrp.ops import REGISTRY
from dynamiclrp.ops.special import gru_layer_forward, lstm_layer_forward, rnn_layer_forward
from dynamiclrp.testing import zoo

from cuda_standins import (CUDA, batchnorm_as, cuda_saved_fields, cudnn_rnn, disguised, fused_cell, rms_norm,
                           sdpa_as)

DT = torch.float64

CUDA_ROWS = ("CudnnBatchNormBackward0", "MiopenBatchNormBackward0", "CudnnRnnBackward0", "MiopenRnnBackward0",
             "ThnnFusedLstmCellBackward0", "ThnnFusedGruCellBackward0", "FusedRmsNormBackward0",
             "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductFlashAttentionBackward0",
             "ScaledDotProductCudnnAttentionBackward0", "FlashAttentionBackward0", "EfficientAttentionBackward0")


def closes(ex: dynamiclrp.Explanation, tol: float = 1e-9) -> None:
    L = ex.ledger
    scale = abs(L.seed_total) + sum(abs(s.total) for s in L.sinks) + 1e-12
    assert abs(ex.unaccounted) <= tol * scale, L.summary()
    assert not L.unmeasured, L.unmeasured


# ---------------------------------------------------------------------------------------------------------
# Saved-field names
# ---------------------------------------------------------------------------------------------------------
def _declared_fields(spec) -> set[str]:
    out = {f for _, f in spec.results} | {f for _, f in spec.inputs_saved} | set(spec.static_fields)
    out |= set(getattr(spec.kernel, "fields", ()) or ())
    for attr in ("mask_field", "lse_field", "eps_field", "x_field", "y_field"):
        v = getattr(spec.kernel, attr, None)
        if isinstance(v, str):
            out.add(v)
    return {f for f in out if not f.startswith("saved_tensors.")}


def test_every_field_a_row_reads_exists_in_the_generated_node_class():
    checked = 0
    problems = []
    for name, spec in REGISTRY.items():
        if not hasattr(torch._C._functions, name):
            continue  # custom Functions, CopySlices, node types of other torch versions
        have = cuda_saved_fields(name)
        problems += [(name, f) for f in sorted(_declared_fields(spec) - have)]
        checked += 1
    assert checked > 100
    assert not problems, problems


@pytest.mark.parametrize("name", CUDA_ROWS)
def test_cuda_node_types_have_rows(name):
    assert name in REGISTRY
    assert hasattr(torch._C._functions, name), f"torch has no node class {name}"
    assert _declared_fields(REGISTRY[name]), f"{name}: the row declares no saved field"


def test_backend_specific_sdpa_field_names():
    # the efficient backend spells its log-sum-exp log_sumexp; flash takes no mask; cuDNN's mask is attn_bias
    k = {n: REGISTRY[n].kernel for n in CUDA_ROWS if "Attention" in n}
    assert k["ScaledDotProductEfficientAttentionBackward0"].lse_field == "log_sumexp"
    assert k["ScaledDotProductEfficientAttentionBackward0"].mask_field == "attn_bias"
    assert k["ScaledDotProductFlashAttentionBackward0"].mask_field is None
    assert k["ScaledDotProductCudnnAttentionBackward0"].mask_field == "attn_bias"
    assert k["FlashAttentionBackward0"].lse_field == "softmax_logsumexp"
    assert REGISTRY["CudnnBatchNormBackward0"].kernel.eps_field == "epsilon"
    assert REGISTRY["NativeBatchNormBackward0"].kernel.eps_field == "eps"


# ---------------------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------------------
def _merged(ex: dynamiclrp.Explanation) -> int:
    return sum(1 for s in ex.ledger.sinks if "merged bias" in (s.note or ""))


@pytest.mark.parametrize("bn_type", ["CudnnBatchNormBackward0", "MiopenBatchNormBackward0"])
@pytest.mark.parametrize("name,rules", [("cnn_bn", "epsilon_plus"), ("cnn_bn", "zero"), ("unet", "epsilon")])
def test_gpu_batch_norm_equals_the_native_one_and_merges(bn_type, name, rules):
    e = zoo.build(name)
    out, x = e.run()
    ref = dynamiclrp.explain(out, x, rules=rules, model=e.model)
    with disguised({"NativeBatchNormBackward0": batchnorm_as(bn_type)}) as seen:
        ex = dynamiclrp.explain(out, x, rules=rules, model=e.model)
    assert seen.count(bn_type) == sum(isinstance(m, nn.BatchNorm2d) for m in e.model.modules())
    torch.testing.assert_close(ex.relevance[0], ref.relevance[0], rtol=0, atol=0)
    assert _merged(ex) == _merged(ref) > 0  # merged into the convolutions, as the native ones
    closes(ex, 1e-5)


def test_gpu_batch_norm_in_training_mode_uses_the_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).double()
    net.train()
    x = torch.randn(3, 3, 8, 8, dtype=DT, requires_grad=True)
    y = net(x)[:, 0]
    ref = dynamiclrp.explain(y, x, rules="epsilon")
    with disguised(CUDA) as seen:
        ex = dynamiclrp.explain(y, x, rules="epsilon")
    assert seen == ["CudnnBatchNormBackward0"]
    torch.testing.assert_close(ex.relevance[0], ref.relevance[0], rtol=0, atol=0)
    closes(ex, 1e-9)


# ---------------------------------------------------------------------------------------------------------
# cuDNN RNN
# ---------------------------------------------------------------------------------------------------------
def test_gru_and_rnn_layer_re_expressions_compute_the_modules():
    torch.manual_seed(1)
    x = torch.randn(6, 2, 3, dtype=DT)
    for cls, fn, kw in ((nn.GRU, gru_layer_forward, {}), (nn.RNN, rnn_layer_forward, {}),
                        (nn.RNN, rnn_layer_forward, {"nonlinearity": "relu"})):
        m = cls(3, 5, bidirectional=True, **kw).double()
        h0 = torch.randn(2, 2, 5, dtype=DT)
        out, h = m(x, h0)
        extra = {"relu": True} if kw else {}
        for k, sfx in enumerate(("", "_reverse")):
            p = [getattr(m, f"{n}_l0{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            o, hT = fn(x, h0[k], *p, reverse=bool(k), **extra)
            torch.testing.assert_close(o, out[..., 5 * k:5 * k + 5].detach())
            torch.testing.assert_close(hT, h[k].detach())


def test_lstm_with_projections_re_expression():
    torch.manual_seed(2)
    m = nn.LSTM(3, 5, proj_size=2).double()
    x = torch.randn(4, 2, 3, dtype=DT)
    out, (_, c) = m(x)
    W = torch.cat([m.weight_ih_l0, m.weight_hh_l0], 1)
    o, _, cT = lstm_layer_forward(x, torch.zeros(2, 2, dtype=DT), torch.zeros(2, 5, dtype=DT), W,
                                   m.bias_ih_l0 + m.bias_hh_l0, proj=m.weight_hr_l0)
    torch.testing.assert_close(o, out.detach())
    torch.testing.assert_close(cT, c[0].detach())


_NETS = [
    ("gru-2x2-batch-first", lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)),
    ("gru-no-bias", lambda: nn.GRU(3, 4, bias=False)),
    ("rnn-tanh-2", lambda: nn.RNN(3, 4, num_layers=2)),
    ("rnn-relu-bi", lambda: nn.RNN(3, 4, nonlinearity="relu", bidirectional=True)),
    ("lstm-proj", lambda: nn.LSTM(3, 4, proj_size=2, num_layers=2)),
]


def _last(out: torch.Tensor, m: nn.RNNBase) -> torch.Tensor:
    return (out[:, -1] if m.batch_first else out[-1]).sum(-1)


@pytest.mark.parametrize("rules", ["zero", "epsilon", "attnlrp", "epsilon_plus"])
@pytest.mark.parametrize("label,make", _NETS, ids=[n for n, _ in _NETS])
def test_cudnn_rnn_equals_the_cpu_network(label, make, rules):
    torch.manual_seed(3)
    m = make().double()
    x = torch.randn(*((2, 5, 3) if m.batch_first else (5, 2, 3)), dtype=DT, requires_grad=True)
    ref_out, _ = m(x)
    out, _ = cudnn_rnn(m, x)
    torch.testing.assert_close(out, ref_out)
    ref = dynamiclrp.relevance(_last(ref_out, m), x, rules=rules)[0]
    with disguised(CUDA) as seen:
        ex = dynamiclrp.explain(_last(out, m), x, rules=rules)
    assert seen == ["CudnnRnnBackward0"]
    # GRU and Elman: ATen's CPU graph exactly; an LSTM with projections is a composite graph on the CPU (separate
    # input and recurrent maps) but one linear map here: equal under LRP-0, within the stabilizer's reach otherwise
    tol = 1e-10 if (not label.startswith("lstm") or rules in ("zero", "attnlrp")) else 1e-4
    torch.testing.assert_close(ex.relevance[0], ref, rtol=tol, atol=tol)
    closes(ex, 1e-9)


@pytest.mark.parametrize("rules", ["epsilon", "epsilon_plus", "attnlrp", "zero"])
def test_cudnn_lstm_equals_the_cpu_fused_lstm(rules):
    # float32: the CPU runs nn.LSTM through oneDNN (MkldnnRnnLayerBackward0, one node per layer and direction);
    # the cuDNN node holds the whole network, and its rule must give the same relevance
    torch.manual_seed(4)
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    ref_out, _ = m(x)
    if "MkldnnRnnLayerBackward0" not in dynamiclrp.coverage(ref_out.sum()).counts():
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    ref = dynamiclrp.relevance(_last(ref_out, m), x, rules=rules)[0]
    out, _ = cudnn_rnn(m, x)
    with disguised(CUDA):
        ex = dynamiclrp.explain(_last(out, m), x, rules=rules)
    torch.testing.assert_close(ex.relevance[0], ref, rtol=1e-4, atol=1e-6)
    closes(ex, 1e-5)


def test_cudnn_rnn_parameters_states_and_final_states():
    torch.manual_seed(5)
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=DT, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=DT, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=DT, requires_grad=True)
    out, (hy, cy) = cudnn_rnn(m, x, (h0, c0))
    y = out[-1].sum(-1) + hy.sum((0, 2)) + cy.sum((0, 2))  # all three outputs seeded
    params = [m.weight_ih_l1_reverse, m.bias_hh_l0, m.bias_ih_l0]
    with disguised(CUDA):
        ex = dynamiclrp.explain(y, (x, h0, c0, *params), rules="zero")
    ref_out, (ref_hy, ref_cy) = m(x, (h0, c0))
    ref = dynamiclrp.explain(ref_out[-1].sum(-1) + ref_hy.sum((0, 2)) + ref_cy.sum((0, 2)), (x, h0, c0, *params),
                             rules="zero")
    for k, (a, b) in enumerate(zip(ex.relevance, ref.relevance)):
        assert k == 3 or a.abs().sum() > 0  # a weight gets none under LRP-0 (its input is the activation)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # (hy and cy are not saved by cuDNN, so the sums above them cannot be measured; the ledger still closes)
    assert abs(ex.unaccounted) < 1e-9
    # LRP-0: nothing is lost to a rule; what the requested inputs do not take sits in biases and in the leaves of
    # the parameters that were not requested (weights get none)
    assert set(ex.ledger.by_kind()) <= {"bias", "leaf"}


@pytest.mark.parametrize("saved,match", [({"train": True, "dropout": 0.3}, "dropout"),
                                         ({"batch_sizes": [2, 2, 1]}, "packed")])
def test_cudnn_rnn_refuses_what_it_cannot_re_express(saved, match):
    m = nn.GRU(3, 4, num_layers=2).double()
    x = torch.randn(3, 2, 3, dtype=DT, requires_grad=True)
    out, _ = cudnn_rnn(m, x, **saved)
    with disguised(CUDA), pytest.raises(UnsupportedOperationError, match=match):
        dynamiclrp.relevance(out.sum(), x)


def test_zoo_lstm_and_gru_with_a_cudnn_node():
    for name in ("lstm", "gru"):
        e = zoo.build(name)
        out_ref, x = e.run()
        ref = dynamiclrp.relevance(out_ref, x, model=e.model)[0]
        rnn = e.model.rnn
        e.model.rnn = None
        try:
            class Fused(nn.Module):  # the same module, run as cuDNN would
                def forward(self, inp, rnn=rnn):
                    return cudnn_rnn(rnn, inp)
            e.model.rnn = Fused()
            out, x2 = e.run()
            torch.testing.assert_close(out, out_ref)
            with disguised(CUDA) as seen:
                ex = dynamiclrp.explain(out, x2, model=e.model)
        finally:
            e.model.rnn = rnn
        assert seen == ["CudnnRnnBackward0"]
        torch.testing.assert_close(ex.relevance[0], ref, rtol=1e-4, atol=1e-6)
        closes(ex, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Fused cells, fused RMSNorm
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("rules", ["zero", "attnlrp", "epsilon"])
def test_fused_cells_equal_the_cpu_cells(cls, rules):
    torch.manual_seed(6)
    cell = cls(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=DT, requires_grad=True)

    def unroll(step):
        hx = None
        for t in range(x.shape[0]):
            hx = step(cell, x[t], hx)
        return (hx[0] if isinstance(hx, tuple) else hx).sum(-1)
    ref = dynamiclrp.relevance(unroll(lambda c, xt, hx: c(xt, hx)), x, rules=rules)[0]
    y = unroll(fused_cell)
    with disguised(CUDA) as seen:
        ex = dynamiclrp.explain(y, x, rules=rules)
    assert len(seen) == 5 and set(seen) == {"ThnnFusedLstmCellBackward0" if cls is nn.LSTMCell
                                            else "ThnnFusedGruCellBackward0"}
    # on a GPU the biases are added inside the fused cell (x W_ihᵀ without bias, then the cell): the same relevance
    # under LRP-0, the ε stabilizer sits on a different denominator otherwise
    tol = 1e-10 if rules != "epsilon" else 1e-2
    torch.testing.assert_close(ex.relevance[0], ref, rtol=tol, atol=tol)
    closes(ex, 1e-9)


@pytest.mark.parametrize("rules", ["epsilon", "zero", "attnlrp", "cplrp", "epsilon_plus"])
def test_fused_rms_norm_equals_the_decomposed_one(rules):
    torch.manual_seed(7)
    l1, norm, l2 = nn.Linear(6, 8).double(), nn.RMSNorm(8, eps=1e-6).double(), nn.Linear(8, 3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, dtype=DT, requires_grad=True)
    ref = dynamiclrp.explain(l2(norm(l1(x))).sum(-1), x, rules=rules)
    y = l2(rms_norm(norm, l1(x))).sum(-1)
    with disguised(CUDA) as seen:
        ex = dynamiclrp.explain(y, x, rules=rules)
    assert seen == ["FusedRmsNormBackward0"]
    torch.testing.assert_close(ex.relevance[0], ref.relevance[0], rtol=1e-12, atol=1e-14)
    closes(ex, 1e-9)


# ---------------------------------------------------------------------------------------------------------
# Fused attention
# ---------------------------------------------------------------------------------------------------------
_SDPA = [n for n in CUDA_ROWS if "Attention" in n]


@pytest.mark.parametrize("backend", _SDPA)
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_cuda_sdpa_rows(name, backend):
    # llama: causal, grouped-query attention; bert: a padding mask
    e = zoo.build(name, attn_implementation="sdpa")
    out, x = e.run()
    for rules in ("attnlrp", "cplrp"):
        ref = dynamiclrp.explain(out, x, rules=rules, model=e.model)
        with disguised({"ScaledDotProductFlashAttentionForCpuBackward0": sdpa_as(backend)}) as seen:
            ex = dynamiclrp.explain(out, x, rules=rules, model=e.model)
        assert seen == [backend] * 2
        torch.testing.assert_close(ex.relevance[0], ref.relevance[0], rtol=0, atol=0)
        closes(ex, 1e-5)
