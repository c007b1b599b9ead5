"""A zoo of tiny, randomly initialised models used to exercise the LRP engine.

Every entry is built offline from a configuration (no pretrained weights, no downloads) with tiny
dimensions (hidden size 32, two layers, four heads, eight tokens, batch two, vocabulary 128, 32x32
images) so that a forward pass takes milliseconds on a CPU.

The optional dependencies (``transformers``, ``torchvision``) are imported lazily, inside the builders
that need them, so ``import dynamiclrp.testing.zoo`` only requires :mod:`torch`.

Conventions shared by all entries
---------------------------------
``ZooEntry.run()`` performs an ordinary forward pass with freshly made, seeded inputs and returns
``(outputs, inputs)``:

* ``outputs`` has shape ``(batch,)``: the *top-scoring output per row*.  The model's scores are reduced
  to ``(batch, classes)`` (classification logits as they are; the last position for sequence outputs
  such as causal-LM or seq2seq logits; the spatial mean of segmentation maps; the projected embedding
  for CLIP towers), then the largest entry of each row is picked with
  ``scores.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)``.  ``ZooEntry.output_desc`` says what
  it is for each entry.
* ``inputs`` is the tensor whose relevance is wanted:

  - text models: the input embeddings ``emb = model.get_input_embeddings()(input_ids)``, passed as
    ``inputs_embeds=emb``.  ``emb`` is an *intermediate* tensor (its ``grad_fn`` is the embedding
    lookup).  For models whose ``forward`` has no ``inputs_embeds`` argument (CLIP's text tower) the
    output of the embedding module is captured with a forward hook instead: it is the same tensor that
    flows on through the model;
  - vision models: the pixel tensor, a leaf with ``requires_grad=True``;
  - audio models: the log-mel features (Whisper) or the raw waveform (wav2vec2), leaves;
  - Pix2Struct: the flattened patches (a leaf; its first two columns are row/column indices that the
    model casts to integers, so they receive no gradient).

Model parameters keep ``requires_grad=True`` (as after ``from_config``), so the graph contains an
``AccumulateGrad`` leaf for every parameter.

Public API
----------
:class:`ZooEntry`, :func:`build`, :func:`names`, :func:`attention_implementations`,
:func:`tiny_hf_config`, :func:`build_hf`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ZooEntry",
    "FAMILIES",
    "build",
    "names",
    "attention_implementations",
    "tiny_hf_config",
    "build_hf",
    "hf_head_for",
    "top_score",
]

FAMILIES = ("text", "vision", "audio", "multimodal", "recurrent", "custom")

# Tiny dimensions shared by every entry.
BATCH = 2
SEQ_LEN = 8
DECODER_LEN = 4
IMAGE_SIZE = 32
AUDIO_SAMPLES = 400

_HIDDEN = 32
_HEADS = 4
_KV_HEADS = 2
_LAYERS = 2
_FFN = 64
_POSITIONS = 64
_VOCAB = 128
_SPECIAL_BASE = 100  # special token ids are remapped into [100, 128); inputs use ids in [4, 100)
_PATCH = 8
_SMALL = 16

Runner = Callable[[nn.Module, torch.Generator], "tuple[Tensor, Tensor]"]


# ----------------------------------------------------------------------------------------------------
# Entry type
# ----------------------------------------------------------------------------------------------------
@dataclass
class ZooEntry:
    """A tiny model together with a recipe for a forward pass.

    Attributes
    ----------
    name : str
        Zoo name (e.g. ``"llama"``) or, for :func:`build_hf`, the transformers model type.
    family : str
        One of ``"text"``, ``"vision"``, ``"audio"``, ``"multimodal"``, ``"recurrent"``, ``"custom"``.
    model : torch.nn.Module
        The model, in eval mode, with random (seeded) weights.
    runner : callable
        ``runner(model, generator) -> (outputs, inputs)``; use :meth:`run` rather than calling it.
    seed : int
        Seed of the weights and of the inputs made by :meth:`run`.
    attn_implementation : str or None
        Attention implementation in effect (``"eager"``, ``"sdpa"``), ``None`` for models without
        attention.
    output_desc : str
        What ``outputs`` is.
    input_desc : str
        What ``inputs`` is.
    config : Any
        The transformers configuration, for transformers models.
    info : dict
        Extra facts (model class, experts implementation, ...).
    """

    name: str
    family: str
    model: nn.Module
    runner: Runner = field(repr=False)
    seed: int = 0
    attn_implementation: str | None = None
    output_desc: str = ""
    input_desc: str = ""
    config: Any = field(default=None, repr=False)
    info: dict = field(default_factory=dict)

    def run(self) -> tuple[Tensor, Tensor]:
        """Run an ordinary forward pass on fresh, deterministic inputs.

        Returns
        -------
        outputs : torch.Tensor
            Shape ``(batch,)``, the top-scoring output of each row (see :attr:`output_desc`); it has a
            ``grad_fn``.
        inputs : torch.Tensor
            The tensor to attribute relevance to (see :attr:`input_desc`); it is part of the graph of
            ``outputs``.
        """
        gen = torch.Generator().manual_seed(self.seed)
        with torch.enable_grad():
            return self.runner(self.model, gen)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def top_score(scores: Tensor) -> Tensor:
    """Reduce model scores to the top-scoring entry of each row.

    Parameters
    ----------
    scores : torch.Tensor
        ``(batch, classes)``; ``(batch, seq, classes)`` uses the last position; ``(batch, C, H, W, ...)``
        the mean over the trailing (spatial) dimensions.

    Returns
    -------
    torch.Tensor
        Shape ``(batch,)``.
    """
    if scores.dim() == 1:
        scores = scores.unsqueeze(1)
    elif scores.dim() == 3:
        scores = scores[:, -1]
    elif scores.dim() > 3:
        scores = scores.flatten(2).mean(-1)
    return scores.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for weight initialisation without leaking the state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logger (config warnings about tiny sizes) while building."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers missing
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _randn(gen: torch.Generator, *shape: int, leaf: bool = True) -> Tensor:
    x = torch.randn(*shape, generator=gen)
    return x.requires_grad_(True) if leaf else x


def _token_ids(gen: torch.Generator, vocab: int, shape: tuple[int, ...] = (BATCH, SEQ_LEN)) -> Tensor:
    hi = min(int(vocab), _SPECIAL_BASE)
    lo = 4 if hi > 8 else 0
    return torch.randint(lo, hi, shape, generator=gen)


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial running statistics (eval mode is then not the identity)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


# ----------------------------------------------------------------------------------------------------
# Tiny transformers configurations
# ----------------------------------------------------------------------------------------------------
_HIDDEN_NAMES = {
    "hidden_size", "d_model", "n_embd", "n_embed", "dim", "word_embed_proj_dim", "pooler_hidden_size",
    "pooler_output_size", "output_hidden_size", "d_embed", "model_dim", "emb_dim", "text_embed_dim",
    "vision_embed_dim", "encoder_hidden_size", "decoder_hidden_size", "projector_hidden_size",
}
_LAYER_NAMES = {
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers", "max_window_layers", "num_adapter_layers",
}
_HEAD_NAMES = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
    "decoder_attention_heads",
}
_KV_NAMES = {"num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", "n_kv_heads"}
_HEAD_DIM_NAMES = {"head_dim", "d_kv", "kv_channels", "attention_head_dim", "attention_head_size"}
_POSITION_NAMES = {
    "max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_text_positions",
    "original_max_position_embeddings", "max_seq_len", "max_sequence_length",
}
_EXPERT_NAMES = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}
_EXPERT_TOPK_NAMES = {"num_experts_per_tok", "moe_topk", "num_selected_experts", "top_k", "moe_k"}
_SMALL_NAMES = {
    "projection_dim", "proj_dim", "projection_size", "codevector_dim", "proj_codevector_dim",
    "classifier_proj_size", "xvector_output_dim", "q_lora_rank", "kv_lora_rank", "text_projection_dim",
    "embedding_size", "num_mel_bins", "num_conv_pos_embeddings",
}
_TOKEN_LISTS_TO_DROP = {"suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "alignment_heads"}


def _is_token_id_name(name: str) -> bool:
    return name.endswith(("token_id", "token_ids", "token_index")) or name == "decoder_start_token_id"


def _remap_token(value: Any) -> Any:
    """Map a special token id >= 100 into ``[100, 128)`` (deterministically, the same in sub-configs)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if value < _SPECIAL_BASE else _SPECIAL_BASE + value % (_VOCAB - _SPECIAL_BASE)
    if isinstance(value, (list, tuple)):
        return type(value)(_remap_token(v) for v in value)
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shrink(name: str, value: Any, cfg: Any, names: set[str]) -> Any:
    """Return the tiny value of configuration attribute ``name`` (``value`` itself when unchanged)."""
    lname = name.lower()
    if name == "head_dim" and value is None and any(_is_int(getattr(cfg, h, None)) for h in _HEAD_NAMES):
        return _HIDDEN // _HEADS  # some models read config.head_dim without a fallback
    if name == "rope_parameters" and isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
        sections = value["mrope_section"]  # multimodal RoPE: the sections must sum to head_dim // 2
        half, k = _HIDDEN // _HEADS // 2, len(sections)
        new_sections = [half // k + (1 if i < half % k else 0) for i in range(k)]
        return {**value, "mrope_section": new_sections}
    if name in _TOKEN_LISTS_TO_DROP and value is not None:
        return None
    if _is_token_id_name(lname):
        return _remap_token(value)
    if lname.endswith("vocab_size") and _is_int(value):
        return min(value, _VOCAB) if lname != "type_vocab_size" else value
    if name == "attention_types" and isinstance(value, list):  # GPT-Neo: [[["global", "local"], 12]]
        return [[["global", "local"], max(1, _LAYERS // 2)]]
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        n = len(value)
        if name == "depths":
            return type(value)([1] * n)
        if name == "hidden_sizes":
            return type(value)([_SMALL * 2 ** i for i in range(n)])
        if name in ("num_heads", "num_attention_heads") and ("depths" in names or "hidden_sizes" in names):
            # hierarchical models: heads per stage, 8 dims per head (stage widths 16, 32, 64, ...)
            return type(value)([max(1, _SMALL * 2 ** i // 8) for i in range(n)])
        if name in ("image_size", "input_size") and n == 2:
            return type(value)([IMAGE_SIZE, IMAGE_SIZE])
        if name == "patch_size" and n == 2:
            return type(value)([min(v, _PATCH) for v in value])
        if name in ("conv_dim", "tdnn_dim"):
            return type(value)([_SMALL] * (2 if name == "conv_dim" else n))
        if name in ("conv_kernel", "conv_stride") and n > 2:
            return type(value)(value[:2])
        return value
    if not _is_int(value) or value <= 0:
        return value
    # --- integers ---
    if name in _LAYER_NAMES or re.fullmatch(r"(num_)?(hidden_|encoder_|decoder_|text_|vision_)?layers", lname):
        return min(value, _LAYERS)
    if name in _KV_NAMES or "key_value_heads" in lname or lname.endswith("kv_heads"):
        heads = next((getattr(cfg, h) for h in _HEAD_NAMES if _is_int(getattr(cfg, h, None))), None)
        if value == 1:
            return 1
        return _HEADS if heads is not None and value >= heads else _KV_HEADS
    if name in _HEAD_NAMES or lname.endswith("attention_heads"):
        return _HEADS
    if name in ("rotary_dim", "rotary_emb_dim"):
        return min(value, _HIDDEN // _HEADS)
    if name in _HEAD_DIM_NAMES or lname.endswith("_head_dim"):
        return _HIDDEN // _HEADS
    if name == "embed_dim":
        return _SMALL if "depths" in names else _HIDDEN
    if name == "hidden_dim":  # DistilBERT: FFN size next to ``dim``; elsewhere the model width
        if "width_coefficient" in names:  # EfficientNet: derived from the scaled channel counts
            return value
        return _FFN if "dim" in names else _HIDDEN
    if name == "patch_embed_hidden_size":  # Pix2Struct: width of a flattened patch (4x4 RGB)
        return 48
    if name in _HIDDEN_NAMES or (lname.endswith("_hidden_size") and not re.search("ffn|intermediate|mlp|inner", lname)):
        return _HIDDEN
    if re.search(r"intermediate|ffn|(^|_)d_ff$|n_inner|mlp_dim|feed_forward|inner_dim", lname):
        return _FFN
    if name in _POSITION_NAMES:
        return min(value, _POSITIONS)
    if name == "max_source_positions":  # Whisper: number of encoder frames after the stride-2 conv
        return min(value, _SMALL)
    if name == "image_size":
        return IMAGE_SIZE
    if name == "patch_size":
        return min(value, _PATCH)
    if name == "window_size" and "image_size" in names:
        return min(value, 2)
    if name == "seq_len":
        return min(value, _POSITIONS)
    if name in _EXPERT_NAMES:
        return min(value, 4)
    if name in _EXPERT_TOPK_NAMES:
        return min(value, 2)
    if name in ("n_shared_experts", "num_shared_experts", "first_k_dense_replace", "n_group", "topk_group"):
        return min(value, 1)
    if name == "num_conv_pos_embedding_groups":
        return min(value, 2)
    if name == "num_codevectors_per_group":
        return min(value, 8)
    if name in _SMALL_NAMES:
        return min(value, _SMALL)
    return value


def _config_base_class() -> type:
    import transformers

    return getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


def _field_names(cls: type) -> list[str]:
    """Names a configuration class accepts as constructor arguments."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    params = inspect.signature(cls.__init__).parameters
    return [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]


def resolve_config_class(spec: str | type) -> type:
    """Resolve a model type (``"llama"``), config class name (``"LlamaConfig"``) or class to a class.

    Parameters
    ----------
    spec : str or type
        Model type, configuration class name, or configuration class.

    Returns
    -------
    type
        The transformers configuration class.

    Raises
    ------
    KeyError
        If nothing matches; the message lists close model types.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    base = _config_base_class()
    if isinstance(spec, type):
        return spec
    s = str(spec).strip()
    for cand in (s, s.lower(), s.lower().replace("-", "_"), s.lower().replace("_", "-")):
        if cand in CONFIG_MAPPING_NAMES:
            return CONFIG_MAPPING[cand]
    for model_type, class_name in CONFIG_MAPPING_NAMES.items():
        if class_name.lower() == s.lower():
            return CONFIG_MAPPING[model_type]
    obj = getattr(transformers, s, None)
    if isinstance(obj, type) and issubclass(obj, base):
        return obj
    close = difflib.get_close_matches(s.lower(), list(CONFIG_MAPPING_NAMES), n=5)
    raise KeyError(f"unknown transformers model type or config class {spec!r}; close: {close}")


def _tiny_kwargs(cfg: Any, defaults: Any | None, overrides: dict) -> dict:
    """Constructor kwargs that rebuild ``cfg`` (a config instance) with tiny sizes.

    Only arguments whose value differs from the class defaults ``defaults`` are passed, so that derived
    attributes (``layer_types``, Mamba's ``intermediate_size``...) are recomputed by the class itself.
    """
    base = _config_base_class()
    names = set(_field_names(type(cfg)))
    kwargs: dict[str, Any] = {}
    for name in sorted(names):
        if name.startswith("_") or name in ("layer_types", "id2label", "label2id", "architectures"):
            continue
        try:
            value = getattr(cfg, name)
        except Exception:  # noqa: BLE001 - e.g. per-layer attributes that refuse global access
            continue
        if isinstance(value, base):
            sub_defaults = None
            with contextlib.suppress(Exception):
                sub_defaults = type(value)()
            sub_over = overrides.get(name, {})
            kwargs[name] = type(value)(**_tiny_kwargs(value, sub_defaults, sub_over if isinstance(sub_over, dict) else {}))
            continue
        new = _shrink(name, value, cfg, names)
        changed = new is not value and new != value
        differs_from_default = defaults is not None and hasattr(defaults, name) and getattr(defaults, name) != value
        if changed:
            kwargs[name] = new
        elif differs_from_default:
            kwargs[name] = value
    # Mamba-2 style SSM heads: num_heads * head_dim must equal expand * hidden_size.
    for heads_name in ("num_heads", "mamba_n_heads"):
        hd_name = "head_dim" if heads_name == "num_heads" else "mamba_d_head"
        expand = kwargs.get("expand", getattr(cfg, "expand", None)) if heads_name == "num_heads" else \
            kwargs.get("mamba_expand", getattr(cfg, "mamba_expand", None))
        hidden = kwargs.get("hidden_size", getattr(cfg, "hidden_size", None))
        hd = kwargs.get(hd_name, getattr(cfg, hd_name, None))
        if heads_name in names and _is_int(expand) and _is_int(hidden) and _is_int(hd) and hd > 0:
            kwargs[heads_name] = max(1, expand * hidden // hd)
            for groups in ("n_groups", "mamba_n_groups"):
                if groups in names:
                    kwargs[groups] = 1
    # Hierarchical windowed models (Swin-like): the last stage must still hold a whole window.
    window, depths = kwargs.get("window_size", getattr(cfg, "window_size", None)), getattr(cfg, "depths", None)
    patch = kwargs.get("patch_size", getattr(cfg, "patch_size", None))
    if _is_int(window) and isinstance(depths, (list, tuple)) and _is_int(patch) and "image_size" in names:
        kwargs["patch_size"] = max(1, min(patch, IMAGE_SIZE // (window * 2 ** (len(depths) - 1))))
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(kwargs.get(name), base):
            continue  # merged above
        kwargs[name] = value
    return kwargs


def tiny_hf_config(model_type_or_config_class_name: str | type, **overrides: Any) -> Any:
    """Make a tiny transformers configuration for any architecture.

    The class defaults are shrunk whatever the attribute names are: widths (``hidden_size``,
    ``d_model``, ``n_embd``, ``dim``...) to 32, layer counts (``num_hidden_layers``, ``n_layer``,
    ``encoder_layers``...) to 2, heads to 4 (head dimension 8; grouped-query key/value heads to 2,
    multi-query stays 1), feed-forward sizes (``intermediate_size``, ``d_ff``, ``ffn_dim``...) to 64,
    vocabularies to 128 (special token ids are remapped into ``[100, 128)``), positions to 64, images
    to 32x32 with patches of at most 8, per-stage lists (``depths``, ``hidden_sizes``, Swin heads) to
    tiny stages, MoE to 4 experts with top-2, audio front ends (mel bins, wav2vec2 conv stack,
    Whisper source positions) to a few frames.  Nested configurations (``text_config``,
    ``vision_config``...) are shrunk recursively.

    Parameters
    ----------
    model_type_or_config_class_name : str or type
        A model type (``"llama"``, ``"gemma3_text"``), a config class name (``"LlamaConfig"``) or the
        class itself.
    **overrides
        Constructor arguments that win over the computed ones; a dict for a nested config is merged
        into that config's arguments.

    Returns
    -------
    transformers.PreTrainedConfig
        A fresh configuration instance.
    """
    cls = resolve_config_class(model_type_or_config_class_name)
    with _quiet_transformers():
        defaults = cls()
        kwargs = _tiny_kwargs(defaults, cls(), overrides)
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# transformers models
# ----------------------------------------------------------------------------------------------------
_HEAD_MAPPINGS: dict[str, tuple[str, ...]] = {
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
    "sequence_classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",),
    "token_classification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",),
    "question_answering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",),
    "image_classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",),
    "audio_classification": ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",),
    "ctc": ("MODEL_FOR_CTC_MAPPING_NAMES",),
    "image_text_to_text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",),
    "masked_lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",),
    "base": ("MODEL_MAPPING_NAMES",),
}


def _mapping_class(head: str, model_type: str) -> str | None:
    from transformers.models.auto import modeling_auto

    for mapping_name in _HEAD_MAPPINGS[head]:
        mapping = getattr(modeling_auto, mapping_name, {})
        name = mapping.get(model_type)
        if name:
            return name[0] if isinstance(name, (list, tuple)) else name
    return None


def hf_head_for(model_type: str, head: str | None = None) -> str:
    """Name of the transformers model class used for ``model_type``.

    Parameters
    ----------
    model_type : str
        A transformers model type (``config.model_type``).
    head : str, optional
        ``"seq2seq_lm"``, ``"causal_lm"``, ``"sequence_classification"``, ``"token_classification"``,
        ``"question_answering"``, ``"image_classification"``, ``"audio_classification"``, ``"ctc"``, ``"image_text_to_text"``, ``"masked_lm"``, ``"base"``, or
        a transformers class name.  Without it the head is chosen in this order: seq2seq LM (text or
        speech), causal LM for decoder-only models (those without a masked-LM head), sequence
        classification, image classification, audio classification, image-text-to-text, causal LM,
        base model.

    Returns
    -------
    str
        The class name.
    """
    if head is not None and head not in _HEAD_MAPPINGS:
        return head  # an explicit class name
    if head is not None:
        name = _mapping_class(head, model_type)
        if name is None:
            raise ValueError(f"{model_type!r} has no {head} head")
        return name
    seq2seq = _mapping_class("seq2seq_lm", model_type)
    if seq2seq:
        return seq2seq
    causal = _mapping_class("causal_lm", model_type)
    if causal and not _mapping_class("masked_lm", model_type):
        return causal
    for h in ("sequence_classification", "image_classification", "audio_classification", "image_text_to_text"):
        name = _mapping_class(h, model_type)
        if name:
            return name
    if causal:
        return causal
    name = _mapping_class("base", model_type)
    if name is None:
        name = _class_from_config_name(model_type)
    if name is None:
        raise ValueError(f"no transformers model class found for {model_type!r}")
    return name


def _class_from_config_name(model_type: str) -> str | None:
    """``FooVisionConfig`` -> ``FooVisionModel`` for sub-model types that no auto mapping lists."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_name = CONFIG_MAPPING_NAMES.get(model_type)
    if not config_name or not config_name.endswith("Config"):
        return None
    stem = config_name[: -len("Config")]
    for cand in (stem + "Model", stem + "ForCausalLM", stem + "Transformer", stem):
        obj = getattr(transformers, cand, None)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return cand
    return None


def _sub(cfg: Any, *attrs: str, sub: tuple[str, ...] = ("vision_config", "text_config", "audio_config")) -> Any:
    """First attribute found on ``cfg`` or one of its sub-configs."""
    for obj in (cfg, *(getattr(cfg, s, None) for s in sub)):
        if obj is None:
            continue
        for a in attrs:
            v = getattr(obj, a, None)
            if v is not None:
                return v
    return None


def _find_tensor_output(out: Any) -> tuple[str, Tensor]:
    """Pick the tensor to explain from a transformers ``ModelOutput`` (or a tensor/tuple)."""
    if isinstance(out, Tensor):
        return "output", out
    preferred = ("logits", "logits_per_image", "image_embeds", "text_embeds", "pooler_output",
                 "last_hidden_state", "prediction_logits", "start_logits")
    items = list(out.items()) if hasattr(out, "items") else list(enumerate(out))
    for key in preferred:
        for k, v in items:
            if k == key and isinstance(v, Tensor) and v.is_floating_point():
                return str(k), v
    for k, v in items:
        if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 2:
            return str(k), v
    raise ValueError("model output has no floating-point tensor to explain")


def _make_hf_runner(model: nn.Module, cfg: Any) -> tuple[Runner, str]:
    """A runner that builds every input ``model.forward`` needs; returns it and an input description."""
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    vocab = _sub(cfg, "vocab_size", sub=("text_config", "decoder", "vision_config")) or _VOCAB
    is_enc_dec = bool(getattr(cfg, "is_encoder_decoder", False)) and "decoder_input_ids" in params
    wants_pixels = "pixel_values" in params and (main == "pixel_values" or getattr(cfg, "vision_config", None) is not None)
    image_tokens = _image_tokens(cfg) if wants_pixels else None

    if main == "input_ids" and wants_pixels and "inputs_embeds" not in params:
        input_desc = "pixel values (leaf, requires_grad); the text is fed as input_ids"
    elif main == "input_ids" or (main not in params and "input_ids" in params):
        input_desc = "input embeddings (output of model.get_input_embeddings(), passed as inputs_embeds)"
        if "inputs_embeds" not in params:
            input_desc = "input embeddings (output of the embedding module, captured by a forward hook)"
    elif main == "pixel_values":
        input_desc = "pixel values (leaf, requires_grad)"
    else:
        input_desc = f"{main} (leaf, requires_grad)"

    def runner(m: nn.Module, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        kwargs: dict[str, Any] = {}
        rel: Tensor | None = None
        hook = None
        captured: list[Tensor] = []
        if main == "pixel_values" or wants_pixels:
            size = _sub(cfg, "image_size") or IMAGE_SIZE
            h, w = (size, size) if _is_int(size) else tuple(size)[:2]
            chans = _sub(cfg, "num_channels") or 3
            kwargs["pixel_values"] = _randn(gen, BATCH, chans, h, w)
            if main == "pixel_values" or "inputs_embeds" not in params or image_tokens is not None:
                rel = kwargs["pixel_values"]
        if main == "input_features":
            mel = _sub(cfg, "num_mel_bins")
            if mel is not None and getattr(cfg, "max_source_positions", None) is not None:
                feats = _randn(gen, BATCH, mel, 2 * cfg.max_source_positions)
            elif getattr(cfg, "input_feat_per_channel", None) is not None:
                feats = _randn(gen, BATCH, 4 * _SMALL, cfg.input_feat_per_channel * getattr(cfg, "input_channels", 1))
            elif getattr(cfg, "feature_size", None) is not None:
                feats = _randn(gen, BATCH, 4 * _SMALL, cfg.feature_size)
            else:
                feats = _randn(gen, BATCH, mel or 80, 4 * _SMALL)
            kwargs["input_features"] = rel = feats
        elif main == "input_values":
            mel = getattr(cfg, "num_mel_bins", None)
            if mel is not None and getattr(cfg, "max_length", None) is not None:
                vals = _randn(gen, BATCH, cfg.max_length, mel)
            else:
                vals = _randn(gen, BATCH, AUDIO_SAMPLES)
            kwargs["input_values"] = rel = vals
        elif main == "flattened_patches":
            width = _sub(cfg, "patch_embed_hidden_size") or 48
            n_side = 4
            rows = torch.arange(n_side).repeat_interleave(n_side).float() + 1
            cols = torch.arange(n_side).repeat(n_side).float() + 1
            patches = torch.randn(BATCH, n_side * n_side, width, generator=gen)
            idx = torch.stack([rows, cols], -1).expand(BATCH, -1, -1)
            kwargs["flattened_patches"] = rel = torch.cat([idx, patches], -1).requires_grad_(True)
        if main == "input_ids" or (rel is None and "input_ids" in params) or (wants_pixels and "input_ids" in params):
            ids = _token_ids(gen, vocab)
            if image_tokens is not None:  # a vision-language model: the image features replace these tokens
                token, count = image_tokens
                ids = torch.cat([ids[:, :1], torch.full((BATCH, count), token), ids[:, 1:]], 1)
            emb_module = None
            with contextlib.suppress(NotImplementedError, AttributeError):
                emb_module = m.get_input_embeddings()
            if emb_module is None and rel is None:
                raise ValueError(f"{type(m).__name__} has no input embeddings to attribute to")
            if emb_module is None or rel is not None:
                kwargs["input_ids"] = ids  # dual encoders: attribute to the pixels, feed the text as ids
            elif "inputs_embeds" in params:
                rel = _as_input(emb_module(ids))
                kwargs["inputs_embeds"] = rel
            else:
                def capture(_mod: nn.Module, _inp: Any, out: Tensor) -> Tensor | None:
                    if captured:
                        return None
                    captured.append(_as_input(out))
                    return captured[0]  # a frozen embedding's output becomes the input that requires grad

                hook = emb_module.register_forward_hook(capture)
                kwargs["input_ids"] = ids
        if is_enc_dec:
            start = getattr(cfg, "decoder_start_token_id", None)
            dec = _token_ids(gen, vocab, (BATCH, DECODER_LEN))
            if _is_int(start) and start < vocab:
                dec[:, 0] = start
            kwargs["decoder_input_ids"] = dec
            dec_emb = None
            with contextlib.suppress(NotImplementedError, AttributeError):
                dec_emb = m.get_decoder().get_input_embeddings()
            if ("decoder_inputs_embeds" in params and dec_emb is not None
                    and not any(p.requires_grad for p in dec_emb.parameters())):
                # a frozen decoder embedding: its output is data that requires grad (as the lookup is in the
                # trainable model), not a constant
                kwargs["decoder_inputs_embeds"] = _as_input(dec_emb(kwargs.pop("decoder_input_ids")))
        if "use_cache" in params:
            kwargs["use_cache"] = False
        try:
            out = m(**kwargs)
        finally:
            if hook is not None:
                hook.remove()
        if rel is None:
            if not captured:
                raise RuntimeError("embedding output was not captured")
            rel = captured[0]
        _, scores = _find_tensor_output(out)
        return top_score(scores), rel

    return runner, input_desc


def _image_tokens(cfg: Any) -> tuple[int, int] | None:
    """``(image token id, tokens per image)`` of a LLaVA-style vision-language model, whose forward replaces those
    tokens' embeddings by the projected image features (``masked_scatter``); ``None`` for other models."""
    token = getattr(cfg, "image_token_id", None)
    if token is None:
        token = getattr(cfg, "image_token_index", None)
    vision = getattr(cfg, "vision_config", None)
    if not _is_int(token) or vision is None:
        return None
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not (_is_int(size) and _is_int(patch)):
        return None
    count = (size // patch) ** 2
    if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
        count += 1  # the class token is kept
    return int(token), count


def _output_desc(class_name: str) -> str:
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "top next-token logit at the last position, per row"
    if class_name.endswith("ForConditionalGeneration"):
        return "top decoder logit at the last decoder position, per row"
    if "Classification" in class_name:
        return "top class logit per row"
    if "WithProjection" in class_name:
        return "largest component of the projected (pooled) embedding, per row"
    return "largest component of the first floating output (last position for sequences), per row"


def _family_of(cfg: Any, main: str) -> str:
    if main in ("input_features", "input_values"):
        return "audio"
    if main == "flattened_patches" or (getattr(cfg, "vision_config", None) is not None and getattr(cfg, "text_config", None) is not None):
        return "multimodal"
    if main == "pixel_values":
        return "vision"
    return "text"


def build_hf(
    model_type_or_config_class: str | type,
    attn_implementation: str | None = None,
    *,
    head: str | None = None,
    seed: int = 0,
    config: Any | None = None,
    **config_overrides: Any,
) -> ZooEntry:
    """Build a tiny transformers model of any architecture, with a matching forward recipe.

    Parameters
    ----------
    model_type_or_config_class : str or type
        Model type (``"llama"``), config class name (``"LlamaConfig"``) or config class.
    attn_implementation : str, optional
        ``"eager"`` or ``"sdpa"``; ``None`` keeps transformers' default (SDPA where supported).
    head : str, optional
        Head kind or class name, see :func:`hf_head_for`; chosen automatically when omitted.
    seed : int
        Seed for the weights and for the inputs of :meth:`ZooEntry.run`.
    config : transformers.PreTrainedConfig, optional
        Use this configuration instead of :func:`tiny_hf_config`.
    **config_overrides
        Passed to :func:`tiny_hf_config`.

    Returns
    -------
    ZooEntry
        The entry; ``run()`` returns the top-scoring output per row and the input embeddings (text),
        pixels (vision) or audio features, as described in the module docstring.
    """
    import transformers

    cfg = config if config is not None else tiny_hf_config(model_type_or_config_class, **config_overrides)
    class_name = hf_head_for(cfg.model_type, head)
    model_cls = getattr(transformers, class_name, None)
    if model_cls is None:
        raise ValueError(f"transformers has no class {class_name!r}")
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with _seeded(seed), _quiet_transformers():
        if hasattr(model_cls, "_from_config"):
            model = model_cls._from_config(cfg, **kwargs)
        else:  # pragma: no cover - very old transformers
            model = model_cls(cfg)
    model.eval()
    runner, input_desc = _make_hf_runner(model, model.config)
    mcfg = model.config
    info = {"model_class": class_name, "model_type": mcfg.model_type,
            "parameters": sum(p.numel() for p in model.parameters())}
    experts = getattr(mcfg, "_experts_implementation_internal", None) or getattr(mcfg, "_experts_implementation", None)
    if experts is not None and any("expert" in n.lower() for n, _ in model.named_modules()):
        info["experts_implementation"] = experts
    impl = getattr(mcfg, "_attn_implementation", None)
    return ZooEntry(
        name=str(getattr(mcfg, "model_type", model_type_or_config_class)),
        family=_family_of(mcfg, getattr(model, "main_input_name", "input_ids")),
        model=model,
        runner=runner,
        seed=seed,
        attn_implementation=impl,
        output_desc=_output_desc(class_name),
        input_desc=input_desc,
        config=mcfg,
        info=info,
    )


def _hf_supports_sdpa(class_name: str) -> bool:
    import transformers

    cls = getattr(transformers, class_name, None)
    return bool(getattr(cls, "_supports_sdpa", False))


# ----------------------------------------------------------------------------------------------------
# Custom (pure PyTorch) models
# ----------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear + ReLU stack: 16 -> 32 -> 32 -> 5."""

    def __init__(self, d_in: int = 16, hidden: int = 32, n_out: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNNBN(nn.Module):
    """Small VGG-style CNN: Conv/BatchNorm/ReLU blocks, max pooling, adaptive average pooling, Linear."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 8), *block(8, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer bidirectional ``nn.LSTM`` -> Linear on the last step."""

    def __init__(self, vocab: int = _SPECIAL_BASE, d_emb: int = 16, hidden: int = 16, n_out: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_emb)
        self.rnn = nn.LSTM(d_emb, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, n_out)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        out, _ = self.rnn(inputs_embeds)
        return self.head(out[:, -1])


class GRURegressor(nn.Module):
    """2-layer ``nn.GRU`` over a float sequence (a leaf) -> Linear on the last step."""

    def __init__(self, d_in: int = 8, hidden: int = 16, n_out: int = 4) -> None:
        super().__init__()
        self.rnn = nn.GRU(d_in, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _EagerMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that always asks for the attention weights.

    With ``need_weights=True`` PyTorch computes attention explicitly (batched matmul + softmax) instead of
    calling ``scaled_dot_product_attention``; this is the "eager" variant of the MHA-based entries.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)


def _make_mha_eager(model: nn.Module) -> None:
    """Switch every ``nn.MultiheadAttention`` in ``model`` to :class:`_EagerMHA` (in place, same weights)."""
    for mod in model.modules():
        if type(mod) is nn.MultiheadAttention:
            mod.__class__ = _EagerMHA


class TransformerEncoderClassifier(nn.Module):
    """Embedding + learned positions -> ``nn.TransformerEncoder`` (``nn.MultiheadAttention``) -> mean -> Linear."""

    def __init__(self, vocab: int = _SPECIAL_BASE, d_model: int = _HIDDEN, n_out: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, SEQ_LEN, d_model))
        layer = nn.TransformerEncoderLayer(d_model, _HEADS, dim_feedforward=_FFN, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=_LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_out)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        h = self.encoder(inputs_embeds + self.pos[:, : inputs_embeds.shape[1]])
        return self.head(h.mean(1))


class UNet(nn.Module):
    """Two-level U-Net: Conv/BN/ReLU blocks, max pooling, a transposed convolution and a bilinear
    upsampling on the way up, skip connections by concatenation, 1x1 output convolution."""

    def __init__(self, cin: int = 3, n_classes: int = 3, w: int = 8) -> None:
        super().__init__()

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                                 nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())

        self.enc1, self.enc2 = block(cin, w), block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = block(4 * w, 2 * w)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 nn.Conv2d(2 * w, w, 1))
        self.dec1 = block(2 * w, w)
        self.out = nn.Conv2d(w, n_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class STNClassifier(nn.Module):
    """Spatial transformer network (Jaderberg et al. 2015): a localisation CNN predicts an affine transform
    (initialised to the identity), ``affine_grid`` + ``grid_sample`` warp the image, a small CNN classifies it."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.loc = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                 nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 6))
        with torch.no_grad():
            self.loc[-1].weight.mul_(0.01)
            self.loc[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        theta = self.loc(x).view(-1, 2, 3)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return self.cnn(nn.functional.grid_sample(x, grid, align_corners=False))


class SegNet(nn.Module):
    """SegNet-style encoder-decoder: max pooling with indices on the way down, ``max_unpool2d`` at the same indices
    on the way up (Badrinarayanan et al. 2017)."""

    def __init__(self, n_classes: int = 3, w: int = 8) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.dec2 = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.dec1 = nn.Conv2d(w, n_classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        e1, i1 = nn.functional.max_pool2d(self.enc1(x), 2, return_indices=True)
        e2, i2 = nn.functional.max_pool2d(self.enc2(e1), 2, return_indices=True)
        d2 = self.dec2(nn.functional.max_unpool2d(e2, i2, 2))
        return self.dec1(nn.functional.max_unpool2d(d2, i1, 2))


class PackedRNN(nn.Module):
    """Variable-length sequences through ``pack_padded_sequence`` and a 2-layer bidirectional LSTM or GRU; the
    final hidden states of both directions of the last layer -> Linear."""

    LENGTHS = (SEQ_LEN, SEQ_LEN - 3)

    def __init__(self, cell: str = "lstm", d_in: int = 16, hidden: int = 16, n_out: int = 5) -> None:
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(d_in, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(self.LENGTHS), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(torch.cat([h[-2], h[-1]], -1))


class GATGraph(nn.Module):
    """Graph attention network (Veličković et al. 2018) written like PyTorch Geometric: per-edge scores, an edge
    softmax per target node with ``scatter_reduce`` (``amax``, then ``sum``), messages aggregated with a scatter
    ``sum``; two layers, mean pooling over nodes, Linear. One small fixed graph per batch row."""

    NODES = 6
    EDGES = ((0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3), (4, 5), (5, 4), (5, 0), (0, 5),
             (0, 3), (2, 5))

    def __init__(self, d_in: int = 8, hidden: int = 16, heads: int = 2, n_out: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.lin1, self.lin2 = nn.Linear(d_in, hidden * heads, bias=False), nn.Linear(hidden * heads, hidden, bias=False)
        self.att1 = nn.Parameter(0.3 * torch.randn(2, heads, hidden))
        self.att2 = nn.Parameter(0.3 * torch.randn(2, 1, hidden))
        self.head = nn.Linear(hidden, n_out)
        e = torch.tensor(self.EDGES + tuple((i, i) for i in range(self.NODES)))  # with self-loops
        self.register_buffer("src", e[:, 0], persistent=False)
        self.register_buffer("dst", e[:, 1], persistent=False)

    def _layer(self, h: Tensor, att: Tensor) -> Tensor:
        B, N, H, F = h.shape
        hs, hd = h[:, self.src], h[:, self.dst]                                # (B, E, H, F)
        score = nn.functional.leaky_relu((hs * att[0]).sum(-1) + (hd * att[1]).sum(-1), 0.2)  # (B, E, H)
        idx = self.dst.view(1, -1, 1).expand_as(score)
        m = torch.zeros(B, N, H, dtype=h.dtype).scatter_reduce(1, idx, score, "amax", include_self=False)
        w = torch.exp(score - m[:, self.dst])
        z = torch.zeros(B, N, H, dtype=h.dtype).scatter_reduce(1, idx, w, "sum", include_self=False)
        alpha = w / z[:, self.dst]
        msg = alpha.unsqueeze(-1) * hs                                         # (B, E, H, F)
        return torch.zeros(B, N, H, F, dtype=h.dtype).scatter_reduce(
            1, self.dst.view(1, -1, 1, 1).expand_as(msg), msg, "sum", include_self=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        h = nn.functional.elu(self._layer(self.lin1(x).view(B, N, self.heads, -1), self.att1)).flatten(2)
        h = self._layer(self.lin2(h).view(B, N, 1, -1), self.att2).squeeze(2)
        return self.head(h.mean(1))


class BagOfWords(nn.Module):
    """fastText-style classifier: ``nn.EmbeddingBag`` (sum of word vectors weighted per token) -> MLP. The per-token
    weights are the input, so relevance lands on tokens."""

    def __init__(self, vocab: int = _SPECIAL_BASE, dim: int = 16, n_out: int = 5) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, n_out))

    def forward(self, ids: Tensor, token_weights: Tensor) -> Tensor:
        return self.mlp(self.bag(ids, per_sample_weights=token_weights))


class BilinearNet(nn.Module):
    """Two views of the input combined by ``nn.Bilinear`` (bilinear pooling / bilinear fusion) -> Linear."""

    def __init__(self, d_in: int = 16, d: int = 12, n_out: int = 5) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.bil = nn.Bilinear(d, d, 16)
        self.head = nn.Linear(16, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bil(torch.relu(self.a(x)), torch.relu(self.b(x)))))


class SpectralNormCNN(nn.Module):
    """A GAN-discriminator-style CNN whose layers are spectrally normalised (``σ = uᵀ W v`` by power iteration)."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(sn(nn.Conv2d(3, 8, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
                                 sn(nn.Conv2d(8, 16, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), sn(nn.Linear(16, n_classes)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CheckpointedMLP(nn.Module):
    """Residual MLP blocks run under ``torch.utils.checkpoint``: the first reentrant (``use_reentrant=True``), the
    second not, as memory-saving training code does."""

    def __init__(self, d: int = 16, n_out: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
                                    for _ in range(2))
        self.head = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = x + checkpoint(self.blocks[0], x, use_reentrant=True)
        h = h + checkpoint(self.blocks[1], h, use_reentrant=False)
        return self.head(h)


class StatsMLP(nn.Module):
    """Element-wise ops and statistics that real models use, in one MLP: CELU, RReLU (evaluation slope), a layer
    norm written with ``var`` and one with ``std``, sigmoid gates chained by ``cumprod`` (stick-breaking) and
    multiplied with ``prod``, ``logsigmoid`` scores, a ``sign`` feature, ``logsumexp`` pooling over groups."""

    def __init__(self, d_in: int = 16, d: int = 24, groups: int = 4, n_out: int = 4) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d_in, d), nn.Linear(d, d), nn.Linear(d, d)
        self.gate, self.prod_gate = nn.Linear(d, d), nn.Linear(d, 3)
        self.score = nn.Linear(d, groups * n_out)
        self.sign = nn.Linear(d_in, d, bias=False)
        self.n_out, self.groups = n_out, groups

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.celu(self.l1(x), 0.8)
        h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()
        h = nn.functional.rrelu(self.l2(h) + 0.1 * torch.sign(self.sign(x)), training=False)
        h = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-5)
        h = self.l3(h) * torch.cumprod(torch.sigmoid(self.gate(h)), -1)
        h = h * torch.sigmoid(self.prod_gate(h)).prod(-1, keepdim=True)
        s = nn.functional.logsigmoid(self.score(h)).view(*h.shape[:-1], self.n_out, self.groups)
        return torch.logsumexp(s * 4.0, -1)


def _leaf_runner(*shape: int) -> Runner:
    def runner(m: nn.Module, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = _randn(gen, *shape)
        return top_score(m(x)), x

    return runner


def _as_input(emb: Tensor) -> Tensor:
    """Input embeddings to attribute to: the lookup's output when the embedding is trainable, else (a frozen
    model, as users run it) the embeddings detached as a leaf that requires grad."""
    return emb if emb.requires_grad else emb.detach().requires_grad_(True)


def _embedding_runner(vocab: int) -> Runner:
    def runner(m: nn.Module, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        emb = _as_input(m.get_input_embeddings()(_token_ids(gen, vocab)))
        return top_score(m(inputs_embeds=emb)), emb

    return runner


_IMAGE_SHAPE = (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
_PIXELS = "pixel values (leaf, requires_grad), shape (2, 3, 32, 32)"
_TOP_CLASS = "top class logit per row"


def _custom(name: str, attn: str | None) -> tuple[nn.Module, Runner, str, str, str, dict]:
    """(model, runner, family, output_desc, input_desc, info) of a pure-PyTorch entry."""
    if name == "mlp":
        return MLP(), _leaf_runner(BATCH, 16), "custom", _TOP_CLASS, "features (leaf), shape (2, 16)", {}
    if name == "cnn_bn":
        m = CNNBN()
        _randomise_batchnorm(m, torch.Generator().manual_seed(1))
        return m, _leaf_runner(*_IMAGE_SHAPE), "custom", _TOP_CLASS, _PIXELS, {}
    if name == "lstm":
        return (LSTMClassifier(), _embedding_runner(_SPECIAL_BASE), "recurrent", _TOP_CLASS,
                "token embeddings (output of model.embedding), shape (2, 8, 16)", {})
    if name == "gru":
        return GRURegressor(), _leaf_runner(BATCH, SEQ_LEN, 8), "recurrent", _TOP_CLASS, "sequence (leaf), shape (2, 8, 8)", {}
    if name == "transformer_encoder":
        m = TransformerEncoderClassifier()
        if attn == "eager":
            _make_mha_eager(m)
        return (m, _embedding_runner(_SPECIAL_BASE), "custom", _TOP_CLASS,
                "token embeddings (output of model.embedding), shape (2, 8, 32)",
                {"attention": "need_weights=True (explicit bmm/softmax)" if attn == "eager" else "need_weights=False (SDPA)"})
    if name == "unet":
        m = UNet()
        _randomise_batchnorm(m, torch.Generator().manual_seed(1))
        return (m, _leaf_runner(*_IMAGE_SHAPE), "vision", "top class of the spatially averaged segmentation logits, per row",
                _PIXELS, {})
    if name == "stn":
        return STNClassifier(), _leaf_runner(*_IMAGE_SHAPE), "vision", _TOP_CLASS, _PIXELS, {"ops": "affine_grid, grid_sample"}
    if name == "segnet":
        m = SegNet()
        _randomise_batchnorm(m, torch.Generator().manual_seed(1))
        return (m, _leaf_runner(*_IMAGE_SHAPE), "vision", "top class of the spatially averaged segmentation logits, per row",
                _PIXELS, {"ops": "max_pool2d(return_indices=True), max_unpool2d"})
    if name in ("packed_lstm", "packed_gru"):
        return (PackedRNN(name.split("_")[1]), _leaf_runner(BATCH, SEQ_LEN, 16), "recurrent", _TOP_CLASS,
                f"padded sequences (leaf), shape (2, 8, 16), lengths {PackedRNN.LENGTHS}",
                {"ops": "pack_padded_sequence, 2-layer bidirectional " + name.split("_")[1].upper()})
    if name == "gat":
        return (GATGraph(), _leaf_runner(BATCH, GATGraph.NODES, 8), "custom", "top graph-class logit per row",
                "node features (leaf), shape (2, 6, 8)", {"ops": "scatter_reduce (amax, sum): edge softmax"})
    if name == "bag_of_words":
        return (BagOfWords(), _bag_runner(), "text", _TOP_CLASS,
                "per-token weights (leaf, ones), shape (2, 8): relevance per token", {"ops": "embedding_bag"})
    if name == "bilinear":
        return BilinearNet(), _leaf_runner(BATCH, 16), "custom", _TOP_CLASS, "features (leaf), shape (2, 16)", {}
    if name == "spectral_norm":
        return (SpectralNormCNN(), _leaf_runner(*_IMAGE_SHAPE), "vision", _TOP_CLASS, _PIXELS,
                {"ops": "spectral_norm (vdot)"})
    if name == "checkpoint":
        return (CheckpointedMLP(), _leaf_runner(BATCH, 16), "custom", _TOP_CLASS, "features (leaf), shape (2, 16)",
                {"ops": "torch.utils.checkpoint, reentrant and non-reentrant"})
    if name == "stats_mlp":
        return (StatsMLP(), _leaf_runner(BATCH, 16), "custom", _TOP_CLASS, "features (leaf), shape (2, 16)",
                {"ops": "celu, rrelu, sign, var, std, cumprod, prod, logsigmoid, logsumexp"})
    raise KeyError(name)


def _bag_runner() -> Runner:
    def runner(m: nn.Module, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = _token_ids(gen, _SPECIAL_BASE)
        weights = torch.ones(BATCH, SEQ_LEN, requires_grad=True)
        return top_score(m(ids, weights)), weights

    return runner


def _torchvision(name: str, attn: str | None) -> tuple[nn.Module, Runner, str, str, str, dict]:
    from torchvision import models as tvm

    arch = name[len("tv_"):]
    info: dict[str, Any] = {"constructor": f"torchvision.models.{arch}"}
    if arch == "vgg16":
        # Full VGG-16 conv stack; the 4096-wide classifier is narrowed to 64 (same layer structure).
        with torch.device("meta"):
            m = tvm.vgg16(weights=None, num_classes=10)
        m.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True),
            nn.Dropout(), nn.Linear(64, 10),
        ).to("meta")
        m = m.to_empty(device="cpu")
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, 0, 0.01)
                nn.init.zeros_(mod.bias)
        info["note"] = "classifier narrowed from 4096 to 64 units"
    elif arch == "vit_b_16":
        from torchvision.models.vision_transformer import VisionTransformer

        m = VisionTransformer(image_size=IMAGE_SIZE, patch_size=_PATCH, num_layers=_LAYERS, num_heads=_HEADS,
                              hidden_dim=_HIDDEN, mlp_dim=_FFN, num_classes=10)
        info = {"constructor": "torchvision.models.vision_transformer.VisionTransformer (vit_b_16 layout, tiny dims)",
                "note": "zero-initialised classification head re-drawn from N(0, 0.02^2)"}
        with torch.no_grad():
            m.heads.head.weight.normal_(0.0, 0.02)
            m.heads.head.bias.normal_(0.0, 0.02)
            m.class_token.normal_(0.0, 0.02)
        if attn == "eager":
            _make_mha_eager(m)
        info["attention"] = "need_weights=True (explicit bmm/softmax)" if attn == "eager" else "need_weights=False (SDPA)"
    elif arch == "swin_v2_t":
        from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

        m = SwinTransformer(patch_size=[4, 4], embed_dim=_SMALL, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                            stochastic_depth_prob=0.0, num_classes=10, block=SwinTransformerBlockV2,
                            downsample_layer=PatchMergingV2)
        info = {"constructor": "torchvision SwinTransformer with V2 blocks (swin_v2_t layout, tiny dims)",
                "ops": "qkv bias built by in-place slicing (CopySlices), cosine attention, log-spaced CPB MLP"}
    elif arch == "mvit_v2_s":
        from torchvision.models.video.mvit import MSBlockConfig, MViT

        blocks = [MSBlockConfig(num_heads=1, input_channels=_SMALL, output_channels=_SMALL, kernel_q=[3, 3, 3],
                                kernel_kv=[3, 3, 3], stride_q=[1, 1, 1], stride_kv=[1, 2, 2]),
                  MSBlockConfig(num_heads=2, input_channels=_SMALL, output_channels=2 * _SMALL, kernel_q=[3, 3, 3],
                                kernel_kv=[3, 3, 3], stride_q=[1, 2, 2], stride_kv=[1, 1, 1])]
        m = MViT(spatial_size=(_SMALL, _SMALL), temporal_size=4, block_setting=blocks, residual_pool=True,
                 residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, num_classes=10,
                 patch_embed_kernel=(3, 4, 4), patch_embed_stride=(2, 4, 4), patch_embed_padding=(1, 0, 0))
        info = {"constructor": "torchvision MViT (mvit_v2_s layout: pooling attention, decomposed relative "
                               "positions, residual pooling; tiny dims)"}
        return m, _leaf_runner(BATCH, 3, 4, _SMALL, _SMALL), "vision", _TOP_CLASS, _VIDEO, info
    elif arch in _DETECTION:
        m = _detector(arch)
        info = {"constructor": f"torchvision.models.detection.{_DETECTION[arch]} with a 2-convolution backbone "
                               "(weights=None, weights_backbone=None)"}
        return (m, _detection_runner(), "vision", "score of the top detection of each image",
                f"images (leaf), shape (2, 3, {_DET_SIZE}, {_DET_SIZE})", info)
    else:
        m = getattr(tvm, arch)(weights=None, num_classes=10)
    return m, _leaf_runner(*_IMAGE_SHAPE), "vision", _TOP_CLASS, _PIXELS, info


_VIDEO = f"video clips (leaf), shape ({BATCH}, 3, 4, {_SMALL}, {_SMALL})"
_DETECTION = {"fasterrcnn": "FasterRCNN", "maskrcnn": "MaskRCNN", "keypointrcnn": "KeypointRCNN"}
_DET_SIZE = 64


def _detector(arch: str) -> nn.Module:
    """A tiny R-CNN detector of torchvision's detection family (RPN, RoIAlign box head, and the mask or keypoint
    head), with a two-convolution backbone; every box is kept (``box_score_thresh=0``)."""
    from torchvision.models import detection
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, _SMALL, 3, stride=2, padding=1), nn.ReLU())
    backbone.out_channels = _SMALL  # type: ignore[assignment]
    kwargs: dict[str, Any] = dict(
        num_classes=3, rpn_anchor_generator=AnchorGenerator(sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), min_size=_DET_SIZE, max_size=_DET_SIZE, box_score_thresh=0.0,
        box_detections_per_img=8)
    if arch == "maskrcnn":
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(["0"], 14, 2)
    if arch == "keypointrcnn":
        kwargs.update(keypoint_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), num_keypoints=5)
    return getattr(detection, _DETECTION[arch])(backbone, **kwargs)


def _detection_runner() -> Runner:
    def runner(m: nn.Module, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.rand(BATCH, 3, _DET_SIZE, _DET_SIZE, generator=gen).requires_grad_(True)
        dets = m(list(x.unbind(0)))
        return torch.stack([d["scores"][0] for d in dets]), x

    return runner


# ----------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _HFSpec:
    model_type: str
    head: str
    family: str
    has_attention: bool = True
    overrides: dict = field(default_factory=dict)


_SEQ_CLS, _CAUSAL, _S2S, _IMG = "sequence_classification", "causal_lm", "seq2seq_lm", "image_classification"

_HF_ENTRIES: dict[str, _HFSpec] = {
    # text encoders (sequence classification, 3 labels)
    "bert": _HFSpec("bert", _SEQ_CLS, "text", overrides={"num_labels": 3}),
    "roberta": _HFSpec("roberta", _SEQ_CLS, "text", overrides={"num_labels": 3}),
    "distilbert": _HFSpec("distilbert", _SEQ_CLS, "text", overrides={"num_labels": 3}),
    "albert": _HFSpec("albert", _SEQ_CLS, "text", overrides={"num_labels": 3}),
    "electra": _HFSpec("electra", _SEQ_CLS, "text", overrides={"num_labels": 3}),
    "deberta-v2": _HFSpec("deberta-v2", _SEQ_CLS, "text", overrides={"num_labels": 3}),
    # decoders (causal LM)
    "gpt2": _HFSpec("gpt2", _CAUSAL, "text"),
    "gpt-neo": _HFSpec("gpt_neo", _CAUSAL, "text", overrides={"window_size": 4}),
    "opt": _HFSpec("opt", _CAUSAL, "text"),
    "bloom": _HFSpec("bloom", _CAUSAL, "text"),
    "falcon": _HFSpec("falcon", _CAUSAL, "text"),
    "llama": _HFSpec("llama", _CAUSAL, "text", overrides={"num_key_value_heads": _KV_HEADS}),
    "mistral": _HFSpec("mistral", _CAUSAL, "text"),
    "mixtral": _HFSpec("mixtral", _CAUSAL, "text"),
    "qwen2": _HFSpec("qwen2", _CAUSAL, "text"),
    "qwen3": _HFSpec("qwen3", _CAUSAL, "text"),
    "gemma": _HFSpec("gemma", _CAUSAL, "text"),
    "gemma3": _HFSpec("gemma3_text", _CAUSAL, "text",
                      overrides={"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}),
    "phi3": _HFSpec("phi3", _CAUSAL, "text"),
    "t5": _HFSpec("t5", _S2S, "text"),
    "bart": _HFSpec("bart", _S2S, "text"),
    "mamba": _HFSpec("mamba", _CAUSAL, "text", has_attention=False),
    # vision
    "vit": _HFSpec("vit", _IMG, "vision", overrides={"num_labels": 10}),
    "deit": _HFSpec("deit", _IMG, "vision", overrides={"num_labels": 10}),
    "swin": _HFSpec("swin", _IMG, "vision", overrides={"num_labels": 10}),
    "convnext": _HFSpec("convnext", _IMG, "vision", has_attention=False, overrides={"num_labels": 10}),
    "resnet": _HFSpec("resnet", _IMG, "vision", has_attention=False, overrides={"num_labels": 10}),
    "clip_vision": _HFSpec("clip_vision_model", "CLIPVisionModelWithProjection", "vision"),
    "clip_text": _HFSpec("clip_text_model", "CLIPTextModelWithProjection", "text"),
    "siglip": _HFSpec("siglip", _IMG, "vision", overrides={"num_labels": 10}),
    # audio / multimodal
    "whisper": _HFSpec("whisper", _S2S, "audio"),
    "wav2vec2": _HFSpec("wav2vec2", "audio_classification", "audio", overrides={"num_labels": 3}),
    "pix2struct": _HFSpec("pix2struct", "image_text_to_text", "multimodal"),
    # coverage of issue 11: FFT mixing, GLU convolution modules, WKV/RG-LRU recurrences, chunked attention,
    # image features scattered into text embeddings
    "fnet": _HFSpec("fnet", _SEQ_CLS, "text", has_attention=False, overrides={"num_labels": 3}),
    "wav2vec2-conformer": _HFSpec("wav2vec2-conformer", "audio_classification", "audio",
                                  overrides={"num_labels": 3, "position_embeddings_type": "rotary"}),
    "rwkv": _HFSpec("rwkv", _CAUSAL, "text", has_attention=False),
    "recurrent_gemma": _HFSpec("recurrent_gemma", _CAUSAL, "text"),
    "led": _HFSpec("led", _S2S, "text", overrides={"attention_window": [4, 4]}),
    "llava": _HFSpec("llava", "image_text_to_text", "multimodal"),
}

_TORCHVISION = ("tv_vgg16", "tv_resnet50", "tv_densenet121", "tv_mobilenet_v3_small", "tv_efficientnet_b0",
                "tv_efficientnet_v2_s", "tv_vit_b_16", "tv_swin_v2_t", "tv_mvit_v2_s", "tv_fasterrcnn", "tv_maskrcnn",
                "tv_keypointrcnn")
_CUSTOM = ("lstm", "gru", "transformer_encoder", "unet", "mlp", "cnn_bn", "stn", "segnet", "packed_lstm", "packed_gru",
           "gat", "bag_of_words", "bilinear", "spectral_norm", "checkpoint", "stats_mlp")
_MHA_ENTRIES = ("transformer_encoder", "tv_vit_b_16")
#: torchvision models that compute attention explicitly (no SDPA variant)
_EAGER_ATTENTION = ("tv_swin_v2_t", "tv_mvit_v2_s")


def names() -> list[str]:
    """All zoo entry names, text first, then vision, audio/multimodal, recurrent and custom."""
    return [*_HF_ENTRIES, *_TORCHVISION, *_CUSTOM]


def _canonical(name: str) -> str:
    known = names()
    for cand in (name, name.replace("_", "-"), name.replace("-", "_"), name.lower()):
        if cand in known:
            return cand
    raise KeyError(f"unknown zoo entry {name!r}; close: {difflib.get_close_matches(name, known, n=5)}")


def attention_implementations(name: str) -> list[str]:
    """Attention implementations an entry supports (a subset of ``["eager", "sdpa"]``).

    Parameters
    ----------
    name : str
        Zoo entry name.

    Returns
    -------
    list of str
        Empty for models without attention.  ``nn.MultiheadAttention`` entries support ``"sdpa"``
        (``need_weights=False``, PyTorch's default there) and ``"eager"`` (``need_weights=True``).
    """
    name = _canonical(name)
    spec = _HF_ENTRIES.get(name)
    if spec is not None:
        if not spec.has_attention:
            return []
        return ["eager", "sdpa"] if _hf_supports_sdpa(hf_head_for(spec.model_type, spec.head)) else ["eager"]
    if name in _EAGER_ATTENTION:
        return ["eager"]
    return ["eager", "sdpa"] if name in _MHA_ENTRIES else []


def build(name: str, *, attn_implementation: str | None = None, seed: int = 0) -> ZooEntry:
    """Build a zoo entry.

    Parameters
    ----------
    name : str
        One of :func:`names` (``-`` and ``_`` are interchangeable).
    attn_implementation : str, optional
        ``"eager"`` or ``"sdpa"`` (see :func:`attention_implementations`); ``None`` keeps the default
        (SDPA where available).
    seed : int
        Seed of the weights and of the inputs of :meth:`ZooEntry.run`.

    Returns
    -------
    ZooEntry

    Raises
    ------
    KeyError
        Unknown name.
    ValueError
        Attention implementation not supported by the entry.
    """
    name = _canonical(name)
    if attn_implementation is not None and attn_implementation not in attention_implementations(name):
        raise ValueError(f"{name!r} does not support attn_implementation={attn_implementation!r} "
                         f"(supported: {attention_implementations(name)})")
    spec = _HF_ENTRIES.get(name)
    if spec is not None:
        entry = build_hf(spec.model_type, attn_implementation, head=spec.head, seed=seed, **spec.overrides)
        entry.name, entry.family = name, spec.family
        if not spec.has_attention:
            entry.attn_implementation = None
        if name == "wav2vec2":
            conv = entry.model.wav2vec2.encoder.pos_conv_embed.conv
            entry.info["pos_conv_weight_norm"] = bool(getattr(conv, "parametrizations", None)) or hasattr(conv, "weight_g")
        return entry
    with _seeded(seed):
        if name in _TORCHVISION:
            model, runner, family, out_desc, in_desc, info = _torchvision(name, attn_implementation)
        else:
            model, runner, family, out_desc, in_desc, info = _custom(name, attn_implementation)
    impl = None
    if name in _MHA_ENTRIES:
        impl = attn_implementation or "sdpa"
    elif name in _EAGER_ATTENTION:
        impl = "eager"
    return ZooEntry(name=name, family=family, model=model.eval(), runner=runner, seed=seed,
                    attn_implementation=impl, output_desc=out_desc, input_desc=in_desc, info=info)
