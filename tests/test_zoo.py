"""Tests of the tiny-model zoo (:mod:`dynamiclrp.testing.zoo`)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dynamiclrp.testing import zoo

REPRESENTATIVE = ["mlp", "cnn_bn", "bert", "gpt2", "llama", "t5", "vit", "lstm", "unet"]
NEEDS_TRANSFORMERS = {"bert", "gpt2", "llama", "t5", "vit"}


def _requires(name: str) -> None:
    if name in NEEDS_TRANSFORMERS or name in zoo._HF_ENTRIES:
        pytest.importorskip("transformers")
    if name.startswith("tv_"):
        pytest.importorskip("torchvision")


def check_entry(entry: zoo.ZooEntry) -> None:
    """Outputs are finite with a grad_fn, inputs are in their graph, and run() is deterministic."""
    assert entry.family in zoo.FAMILIES
    assert not entry.model.training
    outputs, inputs = entry.run()
    assert outputs.shape == (zoo.BATCH,)
    assert outputs.grad_fn is not None
    assert torch.isfinite(outputs).all()
    assert inputs.requires_grad
    try:
        (grad,) = torch.autograd.grad(outputs.sum(), inputs, retain_graph=True)
    except RuntimeError as exc:  # reentrant checkpointing supports .backward() only, what a training step calls
        if "use_reentrant=True" not in str(exc) or not inputs.is_leaf:
            raise
        outputs.sum().backward()
        grad = inputs.grad
    assert grad is not None and grad.shape == inputs.shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    outputs2, inputs2 = entry.run()
    assert inputs2 is not inputs
    torch.testing.assert_close(outputs2, outputs)
    torch.testing.assert_close(inputs2, inputs)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_entries(name: str) -> None:
    _requires(name)
    check_entry(zoo.build(name))


def test_names_cover_the_brief() -> None:
    names = zoo.names()
    assert len(names) == len(set(names))
    for required in ("bert", "deberta-v2", "gpt-neo", "llama", "mixtral", "gemma3", "mamba", "swin", "clip_vision",
                     "clip_text", "siglip", "tv_vgg16", "tv_vit_b_16", "whisper", "wav2vec2", "pix2struct", "lstm",
                     "gru", "transformer_encoder", "unet", "mlp", "cnn_bn"):
        assert required in names
    with pytest.raises(KeyError):
        zoo.build("no-such-model")


def test_name_aliases() -> None:
    assert zoo.build("cnn-bn").name == "cnn_bn"


def test_attention_implementations_and_errors() -> None:
    assert zoo.attention_implementations("mlp") == []
    assert zoo.attention_implementations("transformer_encoder") == ["eager", "sdpa"]
    with pytest.raises(ValueError):
        zoo.build("mlp", attn_implementation="sdpa")


def test_eager_and_sdpa_agree_for_llama() -> None:
    pytest.importorskip("transformers")
    assert zoo.attention_implementations("llama") == ["eager", "sdpa"]
    eager = zoo.build("llama", attn_implementation="eager")
    sdpa = zoo.build("llama", attn_implementation="sdpa")
    assert eager.attn_implementation == "eager" and sdpa.attn_implementation == "sdpa"
    assert eager.config.num_key_value_heads < eager.config.num_attention_heads  # grouped-query attention
    torch.testing.assert_close(eager.run()[0], sdpa.run()[0], rtol=1e-4, atol=1e-5)


def test_mha_eager_and_sdpa_agree() -> None:
    eager = zoo.build("transformer_encoder", attn_implementation="eager")
    sdpa = zoo.build("transformer_encoder", attn_implementation="sdpa")
    torch.testing.assert_close(eager.run()[0], sdpa.run()[0], rtol=1e-4, atol=1e-5)


def test_seed_changes_weights_and_inputs() -> None:
    a, b = zoo.build("mlp", seed=0), zoo.build("mlp", seed=1)
    assert not torch.equal(a.model.net[0].weight, b.model.net[0].weight)
    assert not torch.equal(a.run()[1], b.run()[1])


def test_wav2vec2_has_weight_norm_positional_conv() -> None:
    pytest.importorskip("transformers")
    entry = zoo.build("wav2vec2")
    conv = entry.model.wav2vec2.encoder.pos_conv_embed.conv
    assert getattr(conv, "parametrizations", None) is not None and "weight" in conv.parametrizations


@pytest.mark.parametrize("spec", ["llama", "LlamaConfig", "mixtral", "t5", "gpt2", "whisper", "clip", "swin",
                                  "deberta-v2", "gemma3_text"])
def test_tiny_hf_config(spec: str) -> None:
    pytest.importorskip("transformers")
    cfg = zoo.tiny_hf_config(spec)
    for obj in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if obj is None or hasattr(obj, "depths"):  # hierarchical (Swin-like) widths grow per stage
            continue
        for attr in ("hidden_size", "d_model", "n_embd"):
            value = getattr(obj, attr, None)
            assert value is None or value <= 64, (spec, attr, value)
        for attr in ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers"):
            value = getattr(obj, attr, None)
            assert value is None or value <= 2, (spec, attr, value)
        vocab = getattr(obj, "vocab_size", None)
        assert vocab is None or vocab <= 128
        heads, hidden = getattr(obj, "num_attention_heads", None), getattr(obj, "hidden_size", None)
        if isinstance(heads, int) and isinstance(hidden, int):
            assert hidden % heads == 0
            kv = getattr(obj, "num_key_value_heads", None)
            assert kv is None or heads % kv == 0


def test_tiny_hf_config_overrides_and_unknown() -> None:
    pytest.importorskip("transformers")
    cfg = zoo.tiny_hf_config("llama", num_hidden_layers=1, num_key_value_heads=1)
    assert cfg.num_hidden_layers == 1 and cfg.num_key_value_heads == 1
    with pytest.raises(KeyError):
        zoo.tiny_hf_config("definitely-not-a-model")


@pytest.mark.parametrize("spec", ["qwen2", "GPTNeoXConfig", "roberta", "convnext"])
def test_build_hf_generic(spec: str) -> None:
    pytest.importorskip("transformers")
    check_entry(zoo.build_hf(spec))


def test_import_without_optional_dependencies() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['torchvision'] = None\n"
        "from dynamiclrp.testing import zoo\n"
        "out, inp = zoo.build('cnn_bn').run(); assert out.shape == (2,)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_every_entry() -> None:
    failures = []
    for name in zoo.names():
        try:
            _requires(name)
        except pytest.skip.Exception:
            continue
        for impl in zoo.attention_implementations(name) or [None]:
            try:
                check_entry(zoo.build(name, attn_implementation=impl))
            except Exception as exc:  # noqa: BLE001 - collect them all
                failures.append(f"{name}[{impl}]: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
