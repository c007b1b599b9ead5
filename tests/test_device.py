"""Device placement and host synchronisation (issue 17), checked on a CPU.

* **No host sync in the propagation loop**: every operator the loop dispatches is recorded; none of those that
  copy a tensor's value to the host (``.item()``, ``bool(t)``, ``torch.equal``, ``nonzero``, ``unique``...) may
  run, with or without the ledger (whose totals stay on the device until ``Ledger.finish``). Checks on values are
  deferred and read once after the loop.
* **Device-agnostic**: an explanation runs entirely on the ``meta`` device, where any read of a value on the host
  raises and a tensor created on the CPU by mistake cannot mix with the graph's; the relevance stays on ``meta``.
* **A model split across devices** (``device_map``): the hop between the halves is a ``ToCopyBackward0`` node;
  with two CPU halves the explanation equals the unsplit model's (on a GPU, ``scripts/gpu_check.py`` splits a
  model between ``cuda:0`` and the CPU).
"""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import dynamiclrp
import dynamiclrp.core.run as run_module
from dynamiclrp.core.checks import DeferredChecks
from dynamiclrp.errors import ValueUnavailableError
from dynamiclrp.testing import zoo

#: operators that read a tensor's values on the host (a device would have to finish its queue first)
SYNCS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.nonzero.default", "aten.is_nonzero.default",
         "aten.item.default", "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
         "aten.masked_select.default"}


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCS:
            self.count[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def loop_syncs(monkeypatch):
    """Counts host syncs inside ``propagate`` (the loop and its deferred checks)."""
    mode = _Syncs()
    orig = run_module.propagate

    def counted(*a, **k):
        with mode:
            return orig(*a, **k)
    monkeypatch.setattr(run_module, "propagate", counted)
    return mode.count


CASES = [("mlp", "epsilon"), ("cnn_bn", "epsilon_plus"), ("cnn_bn", "zero"), ("unet", "epsilon_plus"),
         ("llama", "attnlrp"), ("llama", "cplrp"), ("bert", "epsilon"), ("lstm", "epsilon"), ("gru", "zero"),
         ("transformer_encoder", "attnlrp")]


@pytest.mark.parametrize("name,rules", CASES)
def test_no_host_sync_in_the_propagation_loop(loop_syncs, name, rules):
    e = zoo.build(name)
    out, x = e.run()
    rel = dynamiclrp.relevance(out, x, rules=rules, model=e.model)[0]
    assert rel.abs().sum() > 0
    assert not loop_syncs, dict(loop_syncs)


@pytest.mark.parametrize("name,rules", [("cnn_bn", "epsilon_plus"), ("llama", "attnlrp"), ("lstm", "epsilon")])
def test_the_ledger_reads_its_numbers_after_the_loop(loop_syncs, name, rules):
    e = zoo.build(name)
    out, x = e.run()
    ex = dynamiclrp.explain(out, x, rules=rules, model=e.model)  # ledger=True: totals per node, kept on the device
    assert not loop_syncs, dict(loop_syncs)
    assert abs(ex.unaccounted) < 1e-4 * abs(ex.ledger.seed_total)


def test_a_non_default_seed_costs_one_sync_before_the_loop(loop_syncs):
    e = zoo.build("mlp")
    out, x = e.run()
    dynamiclrp.relevance(out, x, torch.ones_like(out), rules="epsilon")
    assert sum(loop_syncs.values()) == 1


def test_deferred_checks_raise_the_first_failed_one():
    checks = DeferredChecks()
    checks.add(torch.tensor(False), lambda: ValueUnavailableError("first"))
    checks.add(torch.tensor([True]), lambda: ValueUnavailableError("second"))
    checks.add(torch.tensor(True), lambda: ValueUnavailableError("third"))
    with pytest.raises(ValueUnavailableError, match="second"):
        checks.raise_first()
    assert len(checks) == 0
    checks.add(torch.tensor(False), lambda: ValueUnavailableError("never"))
    checks.raise_first()


@pytest.mark.parametrize("name,rules", [("mlp", "epsilon"), ("cnn_bn", "epsilon_plus"), ("llama", "attnlrp"),
                                        ("transformer_encoder", "cplrp"), ("gru", "epsilon")])
def test_an_explanation_runs_on_the_meta_device(name, rules):
    e = zoo.build(name)
    model = e.model.to("meta")
    shapes = {"mlp": (2, 16), "cnn_bn": (2, 3, 32, 32), "gru": (2, 8, 8)}
    x = torch.empty(shapes.get(name, (2, 8, 32)), device="meta", requires_grad=True)
    out = model(x) if name in shapes else model(inputs_embeds=x)
    out = out.logits if hasattr(out, "logits") else out
    y = out.reshape(out.shape[0], -1).sum(1)
    (rel,) = dynamiclrp.relevance(y, x, rules=rules, model=model)
    assert rel.device.type == "meta" and rel.shape == x.shape


class _Half(nn.Module):
    def __init__(self, mods, device):
        super().__init__()
        self.mods, self.device = nn.Sequential(*mods), device

    def forward(self, x):
        return self.mods(x.to(self.device, copy=True))  # the hop a device_map inserts: a ToCopyBackward0 node


@pytest.mark.parametrize("rules", ["epsilon", "epsilon_plus", "zero"])
def test_a_model_split_in_two_equals_the_whole(rules):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
              nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    whole = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        whole[1].running_mean.uniform_(-0.1, 0.1)
        whole[1].running_var.uniform_(0.5, 1.5)
    split = nn.Sequential(_Half(layers[:4], "cpu"), _Half(layers[4:], "cpu"))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = split(x)[:, 1]
    assert "ToCopyBackward0" in dynamiclrp.coverage(y).counts()
    torch.testing.assert_close(y, whole(x)[:, 1])
    ex = dynamiclrp.explain(y, x, rules=rules, model=split)
    ref = dynamiclrp.explain(whole(x)[:, 1], x, rules=rules, model=whole)
    torch.testing.assert_close(ex.relevance[0], ref.relevance[0], rtol=1e-12, atol=1e-14)
    assert abs(ex.unaccounted) < 1e-9
