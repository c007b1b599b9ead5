"""Every zoo entry, explained: full coverage, finite relevance w.r.t. the entry's inputs, a closed ledger.

Each entry runs with the default rules, and entries with attention also with ``attnlrp`` and ``cplrp``, for every
attention implementation the entry offers (eager and SDPA). One forward pass per (entry, implementation) is shared
by its presets. ``-m slow`` adds every other preset.

A few (entry, implementation, preset) combinations hit known engine/ledger limitations (listed in ``KNOWN`` with
the reason); they are checked to still fail in the known way, so the test fails as soon as one is fixed.
"""
from __future__ import annotations

import pytest
import torch

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.testing import zoo

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

#: (entry, attention implementation or None = any, preset or None = any) -> the limitation (reported, not ours to
#: hide). "value": explain() raises ValueUnavailableError; "ledger": the ledger cannot measure some totals.
KNOWN: dict[tuple[str, str | None, str | None], tuple[str, str]] = {
    ("tv_mobilenet_v3_small", None, "paper"): (
        "unaccounted", "paper preset: ~1e-3 of the (1e-10-sized) seed unaccounted on these randomly initialised "
                       "nets whose activations vanish; the magnitude split's ε = 1e-11 is of the same size"),
    ("tv_efficientnet_v2_s", None, "paper"): ("unaccounted", "paper preset: as tv_mobilenet_v3_small"),
}

#: presets whose rule for additions needs the sum's value (Zennit's stabilized Norm, the paper's magnitude split):
#: with an attention mask added as a constant (not kept by autograd) that value is not in the graph
VALUE_NEEDING_ADD = ("paper", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat")

for _det in ("tv_fasterrcnn", "tv_maskrcnn", "tv_keypointrcnn"):
    for _preset in VALUE_NEEDING_ADD:
        KNOWN[(_det, None, _preset)] = (
            "value", "the R-CNN transform normalises the image with a constant mean and std autograd does not keep "
                     "(then resizes it); these presets' rule for the subtraction needs its value")

ATTENTION_PRESETS = ("epsilon", "attnlrp", "cplrp")


def _cases(extra: bool) -> list:
    out = []
    for name in zoo.names():
        impls = zoo.attention_implementations(name)
        for impl in impls or [None]:
            if extra:
                chosen = [p for p in presets.names() if p not in ATTENTION_PRESETS]
            else:
                chosen = list(ATTENTION_PRESETS) if impls else ["epsilon"]
            for preset in chosen:
                out.append(pytest.param(name, impl, preset, id=f"{name}-{impl or 'none'}-{preset}"))
    return out


_CACHE: dict[tuple[str, str | None], tuple] = {}


def _run(name: str, impl: str | None):
    """Build the entry and run its forward pass once per (entry, implementation); keep only the latest."""
    key = (name, impl)
    if key not in _CACHE:
        _CACHE.clear()
        entry = zoo.build(name, attn_implementation=impl)
        outputs, inputs = entry.run()
        _CACHE[key] = (entry, outputs, inputs)
    return _CACHE[key]


def _known(name: str, impl: str | None, preset: str) -> tuple[str, str] | None:
    for (n, i, p), v in KNOWN.items():
        if n == name and i in (None, impl) and p in (None, preset):
            return v
    return None


def check(name: str, impl: str | None, preset: str) -> None:
    entry, outputs, inputs = _run(name, impl)
    report = dynamiclrp.coverage(outputs, preset, inputs=(inputs,), model=entry.model)
    assert report.ok and report.share == 1.0, str(report)
    known = _known(name, impl, preset)
    if known is not None and known[0] == "value":
        with pytest.raises(dynamiclrp.ValueUnavailableError):
            dynamiclrp.explain(outputs, inputs, rules=preset, model=entry.model)
        pytest.xfail(known[1])
    try:
        ex = dynamiclrp.explain(outputs, inputs, rules=preset, model=entry.model)
    except dynamiclrp.ValueUnavailableError as err:
        if preset in VALUE_NEEDING_ADD and "of AddBackward0" in str(err) and "cannot be recovered" in str(err):
            pytest.xfail("promises: the preset's add rule needs `scores + mask`, and the constant mask is not kept")
        raise
    rel = ex.relevance[0]
    assert rel.shape == inputs.shape and torch.isfinite(rel).all()
    L = ex.ledger
    if abs(L.seed_total) > 1e-4:
        # an output that is not negligible next to the stabilizer must send some relevance to the input
        assert rel.abs().sum() > 0
    scale = abs(L.seed_total) + sum(abs(s.total) for s in L.sinks) + sum(abs(v) for v in L.inputs.values())
    if known is not None and known[0] == "ledger":  # what cannot be measured is not booked: it is unaccounted too
        assert L.unmeasured, f"known limitation fixed, remove it from KNOWN: {known[1]}"
        pytest.xfail(known[1])
    assert not L.unmeasured, L.unmeasured
    if known is not None and known[0] == "unaccounted":
        assert abs(ex.unaccounted) > 1e-5 * scale, f"known limitation fixed, remove it from KNOWN: {known[1]}"
        pytest.xfail(known[1])
    assert abs(ex.unaccounted) <= 1e-5 * scale, L.summary()


@pytest.mark.parametrize("name,impl,preset", _cases(extra=False))
def test_zoo_entry_is_covered_and_explained(name, impl, preset):
    check(name, impl, preset)


@pytest.mark.slow
@pytest.mark.parametrize("name,impl,preset", _cases(extra=True))
def test_zoo_entry_under_every_other_preset(name, impl, preset):
    check(name, impl, preset)


def test_the_zoo_has_every_architecture_of_the_issue_with_both_attention_implementations():
    names = set(zoo.names())
    for required in ("bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "gpt2", "gpt-neo", "opt",
                     "bloom", "falcon", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma3", "phi3",
                     "t5", "bart", "mamba", "vit", "deit", "swin", "convnext", "resnet", "clip_vision", "clip_text",
                     "siglip", "tv_vgg16", "tv_resnet50", "tv_densenet121", "tv_mobilenet_v3_small",
                     "tv_efficientnet_b0", "tv_efficientnet_v2_s", "tv_vit_b_16", "whisper", "wav2vec2",
                     "pix2struct", "lstm", "gru", "transformer_encoder", "unet"):
        assert required in names
    both = [n for n in zoo.names() if zoo.attention_implementations(n) == ["eager", "sdpa"]]
    assert len(both) >= 25
