"""The coverage report (``dynamiclrp.coverage``) and the ``dynamiclrp coverage`` command."""
from __future__ import annotations

import torch
import torch.nn as nn
import pytest

import dynamiclrp
from dynamiclrp.core import graph as G
from dynamiclrp.cli import main
from dynamiclrp.coverage import CoverageReport


class Flip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.flip(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1)


def small_net(custom: bool = False):
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 8), nn.Linear(8, 3)
    x = torch.randn(4, 6, requires_grad=True)
    h = torch.relu(lin1(x))
    if custom:
        h = Flip.apply(h)
    return lin2(h).max(1).values, x


# ---------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------
def test_report_lists_every_node_with_family_and_rule():
    out, x = small_net()
    report = dynamiclrp.coverage(out)
    assert isinstance(report, CoverageReport)
    assert report.ok and report.share == 1.0 and report.uncovered == []
    assert report.total == len(G.GraphView([(out.grad_fn, 0)]))
    rows = {r.node_type: r for r in report.rows}
    assert rows["AddmmBackward0"].count == 2 and rows["AddmmBackward0"].family == "linear"
    assert rows["AddmmBackward0"].rule.startswith("Epsilon(")
    assert rows["ReluBackward0"].family == "activation" and rows["ReluBackward0"].rule == "Identity()"
    assert rows["MaxBackward0"].family == "routing"
    assert sum(sum(r.steps.values()) for r in report.rows) == report.total
    text = str(report)
    assert "AddmmBackward0" in text and "100.00 %" in text and "UNCOVERED" not in text
    assert report.to_dict()["covered"] == report.total


def test_report_follows_the_rule_set():
    out, x = small_net()
    rows = {r.node_type: r for r in dynamiclrp.coverage(out, "epsilon_plus").rows}
    assert rows["AddmmBackward0"].rule.startswith("Epsilon(")  # ε on dense layers in Zennit's EpsilonPlus
    custom = dynamiclrp.presets.zero().with_families(activation=dynamiclrp.rules.Gradient())
    rows = {r.node_type: r for r in dynamiclrp.coverage(out, custom).rows}
    assert rows["ReluBackward0"].rule == "Gradient()" and rows["ReluBackward0"].steps == {"GradientStep": 1}


def test_uncovered_nodes_are_reported_not_raised():
    out, x = small_net(custom=True)
    with pytest.raises(dynamiclrp.UnsupportedOperationError):
        dynamiclrp.relevance(out, x)
    report = dynamiclrp.coverage(out)
    assert not report.ok
    (row,) = report.uncovered
    assert row.node_type == "FlipBackward" and row.count == 1 and row.family is None and row.rule is None
    assert "test_coverage.Flip" in row.note and "with_ops" in row.note
    assert report.covered == report.total - 1
    assert report.share == pytest.approx(1 - 1 / report.total)
    assert "UNCOVERED" in str(report) and "FlipBackward" in str(report)
    # registering a rule covers it
    fixed = dynamiclrp.coverage(out, dynamiclrp.presets.epsilon().with_ops({"FlipBackward": dynamiclrp.rules.Routing()}))
    assert fixed.ok


def test_a_rule_that_does_not_apply_is_reported_with_the_reason():
    out, x = small_net()
    bad = dynamiclrp.presets.epsilon().with_ops({"ReluBackward0": dynamiclrp.rules.Epsilon()})
    report = dynamiclrp.coverage(out, bad)
    (row,) = report.uncovered
    assert row.node_type == "ReluBackward0" and "RuleError" in row.note


def test_families_distinguish_linear_from_matmul():
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w = nn.Parameter(torch.randn(4, 4))
    h = x @ w  # activation x parameter: linear
    gate = torch.tanh(x @ w)
    out = (h.unsqueeze(1) @ gate.unsqueeze(2)).flatten()  # activation x activation: matmul
    families = {(r.node_type, r.family) for r in dynamiclrp.coverage(out, inputs=(x,)).rows}
    assert ("MmBackward0", "linear") in families and ("BmmBackward0", "matmul") in families


def test_coverage_is_exported_and_needs_a_graph():
    assert "coverage" in dynamiclrp.__all__
    with pytest.raises(dynamiclrp.DynamicLRPError, match="grad_fn"):
        dynamiclrp.coverage(torch.ones(3))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def flip_target():
    """A ``module:function`` target with a custom Function the registry does not know."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), FlipModule(), nn.Linear(4, 2))
    return model, torch.randn(2, 5)


class FlipModule(nn.Module):
    def forward(self, x):
        return Flip.apply(x)


def token_target():
    """A ``module:function`` target with integer inputs: explained w.r.t. its input embeddings."""
    torch.manual_seed(0)
    return EmbedNet(), torch.randint(0, 10, (2, 5))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 3)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids))).mean(1)


def test_cli_zoo_entry_all_covered(capsys):
    assert main(["coverage", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "zoo entry mlp" in out and "AddmmBackward0" in out and "100.00 %" in out


def test_cli_explain_prints_the_ledger(capsys):
    assert main(["coverage", "lstm", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "MkldnnRnnLayerBackward0" in out or "UnsafeSplit" in out or "LSTM" in out
    assert "seed relevance" in out and "unaccounted" in out and "relevance finite: True" in out


def test_cli_attention_and_rules_options(capsys):
    pytest.importorskip("transformers")
    assert main(["coverage", "bert", "--attn", "sdpa", "--rules", "cplrp"]) == 0
    out = capsys.readouterr().out
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in out and "CPLRP(" in out
    assert main(["coverage", "bert", "--attn", "eager"]) == 0
    assert "SoftmaxBackward0" in capsys.readouterr().out


def test_cli_transformers_config_class_and_torchvision_name(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    assert main(["coverage", "Qwen2Config", "--attn", "eager"]) == 0
    out = capsys.readouterr().out
    assert "transformers Qwen2ForCausalLM" in out and "100.00 %" in out
    assert main(["coverage", "squeezenet1_0"]) == 0
    out = capsys.readouterr().out
    assert "torchvision.models.squeezenet1_0" in out and "100.00 %" in out


def test_cli_function_target_with_an_uncovered_node_exits_nonzero(capsys):
    assert main(["coverage", "test_coverage:flip_target", "--explain"]) == 1
    out = capsys.readouterr().out
    assert "UNCOVERED" in out and "FlipBackward" in out and "not explaining" in out


def test_cli_function_target_with_token_ids_explains_the_embeddings(capsys):
    assert main(["coverage", "test_coverage:token_target", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "EmbeddingBackward0" in out and "w.r.t. (2, 5, 6) inputs" in out


@pytest.mark.parametrize("argv,message", [
    (["coverage", "no_such_model_anywhere"], "unknown target"),
    (["coverage", "mlp", "--rules", "nope"], "unknown preset"),
    (["coverage", "mlp", "--attn", "sdpa"], "does not offer --attn sdpa"),
    (["coverage", "no_such_module_x:f"], "cannot import module"),
    (["coverage", "test_coverage:small_net"], "must return (model, example_inputs)"),
    (["coverage", "test_coverage:missing_fn"], "has no attribute 'missing_fn'"),
])
def test_cli_bad_targets_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
