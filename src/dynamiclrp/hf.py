"""Explain Hugging Face ``transformers`` models from the model and tokenizer (or processor) you already have.

One function per task, named like the ``transformers`` pipelines:

- :func:`text_classification` — ``*ForSequenceClassification``: a class logit (default: the predicted class);
- :func:`token_classification` — ``*ForTokenClassification``: the label logit of one token;
- :func:`question_answering` — ``*ForQuestionAnswering``: start and end logits, together or separately;
- :func:`next_token` — ``*ForCausalLM``: the next-token logit, or "token A rather than B";
- :func:`fill_mask` — ``*ForMaskedLM``: the logit of the token predicted at a masked position;
- :func:`seq2seq` — ``*ForConditionalGeneration``: the next decoder token, over encoder *and* decoder tokens;
- :func:`image_classification` — ``*ForImageClassification``: a class logit, relevance per pixel;
- :func:`text` — any text model: you pick the output to explain with a function.

What the helpers do for you
---------------------------
* **Embeddings.** Relevance is attributed to the input embeddings, the output of
  ``model.get_input_embeddings()``. By default (``embeddings="auto"``) the model is called on ``input_ids``
  exactly as usual — no hook, no patch — and the embedding lookups are found afterwards in the autograd graph
  (the ``embedding`` nodes that read ``get_input_embeddings().weight`` with these ids); relevance is requested
  at those graph edges (``torch.autograd.graph.GradientEdge``) and their values come from the Promise System.
  Everything the model does with the token ids — finding the last non-padding token to pool (decoder-only
  classifiers such as ``LlamaForSequenceClassification``), deriving position ids (RoBERTa), scaling the
  embeddings (Gemma, BART) — stays as it is. This needs the embedding weight to require grad (the default);
  for a frozen model ``"auto"`` falls back to ``"inputs_embeds"``. With
  ``embeddings="inputs_embeds"`` the helper computes ``emb = model.get_input_embeddings()(input_ids)`` and passes
  ``inputs_embeds=emb`` instead (``decoder_inputs_embeds`` for a seq2seq decoder); ``check=True`` then re-runs
  the model on ``input_ids`` and raises if the outputs differ — they do for decoder-only classifiers with padded
  batches, which cannot find the last real token without the ids.
* **Batches and padding.** Texts are tokenised with padding and truncation. Padding positions get no relevance
  and are left out of ``tokens`` and ``scores``. Left-padded batches (e.g. from a causal-LM tokenizer) are
  re-packed to right padding before the forward pass, so that position ids are the same as for the unpadded
  text, and mapped back afterwards.
* **Per-token relevance.** ``scores`` is the relevance summed over the hidden dimension; the raw
  ``(batch, tokens, hidden)`` relevance is in ``relevance``.
* **The model is not touched**: no ``eval()``, no ``requires_grad_``, no patching. Put the model in evaluation
  mode yourself (a warning is issued otherwise: dropout makes explanations random).

Rules: AttnLRP by default
-------------------------
``rules="attnlrp"`` (Achtibat et al., ICML 2024) is the default of every helper here. Transformers multiply two
activations (``Q·Kᵀ``, ``softmax·V``, gated MLPs) and divide by a statistic of the activations (LayerNorm,
RMSNorm); the ε-rule of ordinary LRP has no answer for either, and gradient × input is known to be noisy and
unfaithful there. AttnLRP splits relevance of such products uniformly between the two operands, applies the
softmax rule to the attention logits and holds normalisers constant, which keeps relevance conserved through
every block; it is the rule set evaluated on transformers in the literature, so results are comparable. It
coincides with the library's ``"epsilon"`` default on layers that are neither products nor attention (ε on
linear layers). Pass ``rules="cplrp"`` to treat attention weights as constants, or any preset name or
:class:`~dynamiclrp.rules.RuleSet`.

Relevance that does not reach the token embeddings — position and token-type embeddings, biases, the
ε-stabilizer — is booked in the ledger: pass ``ledger=True`` and read ``ex.ledger.summary()``.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from .api import explain as _explain
from .core.ledger import Ledger

__all__ = [
    "DEFAULT_RULES",
    "TokenAttribution",
    "TextExplanation",
    "ImageExplanation",
    "text",
    "text_classification",
    "token_classification",
    "question_answering",
    "next_token",
    "fill_mask",
    "seq2seq",
    "image_classification",
]

#: Rules used by every helper unless ``rules=`` says otherwise (see the module docstring for why).
DEFAULT_RULES = "attnlrp"

Texts = Union[str, Sequence[str], Mapping[str, Any]]
Target = Union[None, int, str, Sequence[Union[int, str]], Tensor]


# ==============================================================================================================
# results
# ==============================================================================================================
@dataclass
class TokenAttribution:
    """Relevance of one tokenised batch: the input text, or the decoder side of a seq2seq model.

    Attributes
    ----------
    input_ids : torch.Tensor
        ``(batch, length)`` token ids, in the layout the caller passed (or the tokenizer produced).
    attention_mask : torch.Tensor
        ``(batch, length)`` bool, ``True`` for real tokens, ``False`` for padding.
    special_mask : torch.Tensor
        ``(batch, length)`` bool, ``True`` for special tokens (``[CLS]``, ``</s>``...) and padding.
    relevance : torch.Tensor
        ``(batch, length, hidden)`` relevance of the input embeddings; zero at padding positions.
    scores : torch.Tensor
        ``(batch, length)`` relevance per token (``relevance`` summed over ``hidden``); zero at padding.
    tokens : list of list of str
        Token strings of each sample, padding left out (same order as the non-padding positions).
    padding_relevance : torch.Tensor
        ``(batch,)`` relevance that had reached padding positions before they were zeroed. ≈ 0 for models that
        mask padding properly; a large value means the model's output depends on its padding.
    """

    input_ids: Tensor
    attention_mask: Tensor
    special_mask: Tensor
    relevance: Tensor
    scores: Tensor
    tokens: list[list[str]]
    padding_relevance: Tensor

    def token_scores(self, i: int = 0) -> Tensor:
        """Per-token relevance of sample ``i`` without padding, aligned with ``tokens[i]``."""
        return self.scores[i][self.attention_mask[i]]

    def pairs(self, i: int = 0) -> list[tuple[str, float]]:
        """``[(token, relevance), ...]`` of sample ``i`` without padding."""
        return list(zip(self.tokens[i], self.token_scores(i).tolist()))

    def special(self, i: int = 0) -> list[bool]:
        """Special-token flags of sample ``i`` without padding, aligned with ``tokens[i]``."""
        return self.special_mask[i][self.attention_mask[i]].tolist()


@dataclass
class TextExplanation:
    """Result of the text helpers of :mod:`dynamiclrp.hf`.

    Attributes
    ----------
    task : str
        ``"text_classification"``, ``"token_classification"``, ``"question_answering"``, ``"next_token"``,
        ``"fill_mask"``, ``"seq2seq"`` or ``"text"``.
    inputs : TokenAttribution
        Relevance of the input (encoder) tokens.
    decoder : TokenAttribution or None
        Relevance of the decoder tokens (seq2seq only).
    target : torch.Tensor
        ``(batch,)`` explained class / label / token id; ``(batch, 2)`` start and end positions for question
        answering.
    target_names : list of str
        Readable name of each target (label name, decoded token, answer text).
    explained : torch.Tensor
        ``(batch,)`` value of the explained output (the seed of the relevance): a logit, a logit difference,
        or the sum of start and end logits.
    prediction : torch.Tensor
        ``(batch,)`` the model's own choice (argmax) at the explained position.
    logits : torch.Tensor
        The model's output logits (detached).
    positions : torch.Tensor or None
        ``(batch,)`` sequence position whose output is explained (token classification: the token; causal
        LM and seq2seq: the last real position), in ``inputs``' (or ``decoder``'s) layout.
    contrast : torch.Tensor or None
        ``(batch,)`` contrast token ids of a contrastive next-token explanation.
    ledger : Ledger or None
        Where the seed relevance went (with ``ledger=True``).
    rules : str
        Name of the rule set used.
    """

    task: str
    inputs: TokenAttribution
    target: Tensor
    target_names: list[str]
    explained: Tensor
    prediction: Tensor
    logits: Tensor
    rules: str
    decoder: TokenAttribution | None = None
    positions: Tensor | None = None
    contrast: Tensor | None = None
    ledger: Ledger | None = None
    extras: dict = field(default_factory=dict, repr=False)

    # -- convenience ------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[list[str]]:
        """Input token strings per sample, padding left out."""
        return self.inputs.tokens

    @property
    def scores(self) -> list[Tensor]:
        """Input relevance per token and sample (1-D tensors aligned with :attr:`tokens`)."""
        return [self.inputs.token_scores(i) for i in range(len(self))]

    @property
    def relevance(self) -> Tensor:
        """Raw ``(batch, length, hidden)`` relevance of the input embeddings."""
        return self.inputs.relevance

    def __len__(self) -> int:
        return int(self.inputs.input_ids.shape[0])

    def _parts(self, i: int, decoder: bool) -> tuple[list[str], list[float], list[bool]]:
        toks = list(self.inputs.tokens[i])
        scores = self.inputs.token_scores(i).tolist()
        special = self.inputs.special(i)
        if decoder and self.decoder is not None:
            toks += ["→"] + self.decoder.tokens[i]
            scores += [0.0] + self.decoder.token_scores(i).tolist()
            special += [True] + self.decoder.special(i)
        return toks, scores, special

    def html(self, i: int = 0, *, title: str | None = None, decoder: bool = True, **kwargs: Any) -> str:
        """Sample ``i`` as a self-contained HTML document (see :func:`dynamiclrp.viz.text_html`).

        Seq2seq explanations show the encoder tokens, an arrow, then the decoder tokens, on one colour scale.
        ``title`` defaults to what was explained, e.g. ``"label 'positive' (logit 2.31)"``.
        """
        from . import viz

        toks, scores, special = self._parts(i, decoder)
        if title is None:
            title = self.title(i)
        return viz.text_html(toks, scores, special_mask=special, title=title, **kwargs)

    def save_html(self, path: str | os.PathLike[str], i: int = 0, **kwargs: Any) -> Path:
        """Write :meth:`html` of sample ``i`` to ``path``; returns the path."""
        from . import viz

        return viz.save_html(self.html(i, **kwargs), path)

    def terminal(self, i: int = 0, *, decoder: bool = True, **kwargs: Any) -> str:
        """Sample ``i`` coloured for a terminal (see :func:`dynamiclrp.viz.text_terminal`)."""
        from . import viz

        toks, scores, special = self._parts(i, decoder)
        return viz.text_terminal(toks, scores, special_mask=special, **kwargs)

    def title(self, i: int = 0) -> str:
        """What sample ``i`` explains, e.g. ``"text_classification: positive (explained value 2.31)"``."""
        return f"{self.task}: {self.target_names[i]} (explained value {float(self.explained[i]):.4g})"

    def report(self, samples: Sequence[int] | None = None, *, title: str | None = None, decoder: bool = True,
               **kwargs: Any) -> str:
        """Several samples in one HTML document (see :func:`dynamiclrp.viz.text_report`).

        Parameters
        ----------
        samples : sequence of int, optional
            Which samples, in order; default all.
        title : str, optional
            Heading of the document.
        decoder : bool, default True
            Seq2seq: show the decoder tokens after the encoder tokens.
        **kwargs
            Passed to :func:`dynamiclrp.viz.text_report` (``shared_scale``, ``merge_words``, ``cmap``...).
        """
        from . import viz

        items = []
        for i in range(len(self)) if samples is None else samples:
            toks, scores, special = self._parts(i, decoder)
            items.append({"tokens": toks, "scores": scores, "special_mask": special, "title": self.title(i)})
        return viz.text_report(items, title=title, **kwargs)

    def save_report(self, path: str | os.PathLike[str], samples: Sequence[int] | None = None,
                    **kwargs: Any) -> Path:
        """Write :meth:`report` to ``path`` (HTML); returns the path."""
        from . import viz

        return viz.save_html(self.report(samples, **kwargs), path)

    def figure(self, i: int = 0, *, title: str | None = None, decoder: bool = True, **kwargs: Any) -> Any:
        """Sample ``i`` as a matplotlib figure of coloured text (see :func:`dynamiclrp.viz.text_figure`)."""
        from . import viz

        toks, scores, special = self._parts(i, decoder)
        return viz.text_figure(toks, scores, special_mask=special, title=self.title(i) if title is None else title,
                               **kwargs)

    def save_figure(self, path: str | os.PathLike[str], i: int = 0, **kwargs: Any) -> Path:
        """Write :meth:`figure` of sample ``i`` to ``path``: PNG, PDF or SVG by the suffix; returns the path."""
        from . import viz

        return viz.save_figure(self.figure(i, **kwargs), path)


@dataclass
class ImageExplanation:
    """Result of :func:`image_classification`.

    Attributes
    ----------
    relevance : torch.Tensor
        ``(batch, channels, height, width)`` relevance of the pixel values the model saw.
    pixel_values : torch.Tensor
        The (preprocessed) model input, detached.
    target, target_names, explained, prediction, logits, ledger, rules
        As in :class:`TextExplanation`.
    image_mean, image_std : sequence of float or None
        The processor's normalisation, used by :meth:`image` to undo it for display.
    """

    relevance: Tensor
    pixel_values: Tensor
    target: Tensor
    target_names: list[str]
    explained: Tensor
    prediction: Tensor
    logits: Tensor
    rules: str
    image_mean: Sequence[float] | None = None
    image_std: Sequence[float] | None = None
    ledger: Ledger | None = None

    def __len__(self) -> int:
        return int(self.relevance.shape[0])

    def image(self, i: int = 0) -> np.ndarray:
        """The model's view of image ``i`` as ``(H, W, 3)`` uint8, with the processor's normalisation undone."""
        x = self.pixel_values[i].detach().float().cpu()
        if self.image_mean is not None and self.image_std is not None:
            mean = torch.as_tensor(self.image_mean, dtype=x.dtype).reshape(-1, 1, 1)
            std = torch.as_tensor(self.image_std, dtype=x.dtype).reshape(-1, 1, 1)
            x = x * std + mean
        else:  # unknown normalisation: stretch to [0, 1]
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return (x[:3].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def heatmap(self, i: int = 0, **kwargs: Any) -> np.ndarray:
        """Heatmap of sample ``i`` (channels summed), see :func:`dynamiclrp.viz.heatmap`."""
        from . import viz

        return viz.heatmap(self.relevance[i], **kwargs)

    def overlay(self, i: int = 0, **kwargs: Any) -> np.ndarray:
        """Heatmap of sample ``i`` blended over :meth:`image`, see :func:`dynamiclrp.viz.overlay`."""
        from . import viz

        return viz.overlay(self.image(i), self.relevance[i], **kwargs)

    def figure(self, i: int = 0, **kwargs: Any) -> Any:
        """Image ``i``, its heatmap and the overlay with a colour bar (see :func:`dynamiclrp.viz.image_figure`)."""
        from . import viz

        if "titles" not in kwargs:
            names = {"image": "input", "heatmap": f"relevance for {self.target_names[i]}", "overlay": "overlay"}
            kwargs["titles"] = [names.get(p, p) for p in kwargs.get("panels", ("image", "heatmap", "overlay"))]
        return viz.image_figure(self.image(i), self.relevance[i], **kwargs)

    def save_png(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write a grid with the image and its heatmap for every sample to ``path`` (PNG); returns the path."""
        from . import viz

        cells, titles = [], []
        for i in range(len(self)):
            cells += [self.image(i), self.heatmap(i, **kwargs)]
            titles += [f"input {i}", f"{self.target_names[i]} ({float(self.explained[i]):.3g})"]
        fig = viz.grid(cells, ncols=2, titles=titles)
        return viz.save_png(fig, path)


# ==============================================================================================================
# helpers
# ==============================================================================================================
def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(model.forward).parameters


def _warn_if_training(model: nn.Module) -> None:
    if getattr(model, "training", False):
        warnings.warn("the model is in training mode (dropout is active, so explanations are random); call "
                      "model.eval() before explaining", UserWarning, stacklevel=3)


def _rules_name(rules: Any) -> str:
    if isinstance(rules, str):
        return rules
    return str(getattr(rules, "name", None) or type(rules).__name__)


def _text_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer inside a processor, or the tokenizer itself."""
    tok = getattr(tokenizer, "tokenizer", None)
    return tok if tok is not None and callable(getattr(tok, "convert_ids_to_tokens", None)) else tokenizer


def _encode(tokenizer: Any, texts: Texts, text_pair: Any = None, **kwargs: Any) -> dict[str, Tensor]:
    """Tokenise (or take over already tokenised inputs) into a dict of ``(batch, length)`` tensors."""
    if isinstance(texts, Mapping):
        if "input_ids" not in texts:
            raise ValueError("tokenised inputs must contain 'input_ids' (pass the output of tokenizer(...), or "
                             "raw strings)")
        enc = {k: torch.as_tensor(v) for k, v in texts.items() if isinstance(v, (Tensor, list, np.ndarray))}
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to explain raw text; pass tokenizer=... or tokenised inputs")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(text_pair, str):
            text_pair = [text_pair]
        opts = {"padding": True, "truncation": True, "return_tensors": "pt", **kwargs}
        enc = dict(tokenizer(list(texts), text_pair if text_pair is None else list(text_pair), **opts))
    for k, v in list(enc.items()):
        if isinstance(v, Tensor) and v.dim() == 1:
            enc[k] = v.unsqueeze(0)
    ids = enc["input_ids"]
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be integer token ids, got {ids.dtype}")
    mask = enc.get("attention_mask")
    enc["attention_mask"] = torch.ones_like(ids) if mask is None else mask
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError("nothing to explain: the tokenised batch is empty")
    return enc


def _pack_right(enc: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """Move the real tokens of left-padded rows to the front. Returns the packed inputs and the gather index
    that produced them (``None`` when nothing moved)."""
    mask = enc["attention_mask"].bool()
    length = mask.shape[1]
    if bool((mask[:, 1:] <= mask[:, :-1]).all()) if length > 1 else True:
        return enc, None
    # stable sort: real tokens first, in their order; padding after
    key = (~mask).to(torch.int64) * length + torch.arange(length, device=mask.device)
    index = key.argsort(dim=1)
    packed = {k: (v.gather(1, index) if isinstance(v, Tensor) and v.shape[:2] == mask.shape else v)
              for k, v in enc.items()}
    return packed, index


def _unpack(x: Tensor, index: Tensor | None) -> Tensor:
    """Inverse of :func:`_pack_right` for a ``(batch, length, ...)`` tensor."""
    if index is None:
        return x
    out = torch.empty_like(x)
    idx = index.to(x.device).reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter_(1, idx, x)


def _embedding_module(model: nn.Module) -> nn.Module:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, nn.Module):
        raise TypeError(f"{type(model).__name__} has no input embedding module (get_input_embeddings()); explain "
                        "its output with dynamiclrp.relevance(output, tensor) on the tensor you want relevance for")
    return emb


def _embedding_edges(outputs: Any, weight: Tensor, ids: Sequence[Tensor]) -> list[Any]:
    """The graph edges where ``weight`` was looked up with each of ``ids`` (in order), or ``[]`` (reads the
    autograd graph of ``outputs``; no hooks, nothing modified)."""
    from .core.graph import find_lookups

    roots = _tensors(outputs)
    found = []
    for want in ids:
        hits = [e for e in find_lookups(roots, weight, want) if all(e.node is not f.node for f in found)]
        if not hits:
            return []
        found.append(hits[0])
    return found


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "to_tuple"):
        return _tensors(obj.to_tuple())
    return []


def _decoder_embedding_module(model: nn.Module, encoder_module: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError):
        dec = get_decoder() if callable(get_decoder) else None
        emb = dec.get_input_embeddings() if dec is not None else None
        if isinstance(emb, nn.Module):
            return emb
    return encoder_module


def _logits(out: Any, name: str = "logits") -> Tensor:
    if isinstance(out, Tensor):
        return out
    value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
    if value is None and isinstance(out, (tuple, list)):
        value = out[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"the model output has no {name!r}; is this the right helper for {type(out).__name__}?")
    return value


def _paired_outputs(a: Any, b: Any) -> list[tuple[str, Tensor, Tensor]]:
    """Floating-point output tensors of two forward passes, paired by name."""
    if isinstance(a, Tensor):
        return [("output", a, b)]
    items_a = dict(a.items()) if hasattr(a, "items") else dict(enumerate(a))
    items_b = dict(b.items()) if hasattr(b, "items") else dict(enumerate(b))
    return [(str(k), v, items_b[k]) for k, v in items_a.items()
            if isinstance(v, Tensor) and v.is_floating_point() and isinstance(items_b.get(k), Tensor)
            and items_b[k].shape == v.shape]


def _try_logits(out: Any) -> Tensor:
    try:
        return _logits(out).detach().cpu()
    except (TypeError, IndexError, KeyError):
        return torch.empty(0)


def _per_sample(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, Tensor):
        value = value.reshape(-1).tolist()
    if isinstance(value, (int, np.integer, str)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} {what} for a batch of {n}; give one per sample or a single value")
    return values


def _label_ids(model: nn.Module, target: Target, n: int, n_labels: int, default: Tensor) -> Tensor:
    """Resolve class targets (ints, label names, None = predicted) to a ``(n,)`` long tensor, validated."""
    if target is None:
        return default.clone()
    label2id = {str(k): int(v) for k, v in (getattr(getattr(model, "config", None), "label2id", None) or {}).items()}
    out = []
    for t in _per_sample(target, n, "targets"):
        if isinstance(t, str):
            if t not in label2id:
                raise ValueError(f"unknown label {t!r}; the model's labels are {sorted(label2id)} "
                                 "(model.config.label2id), or pass a class index")
            t = label2id[t]
        t = int(t)
        if not -n_labels <= t < n_labels:
            raise ValueError(f"target {t} is out of range: the model has {n_labels} outputs (0..{n_labels - 1})")
        out.append(t % n_labels)
    return torch.tensor(out, dtype=torch.long, device=default.device)


def _label_names(model: nn.Module, ids: Tensor) -> list[str]:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return [str(id2label.get(int(i), id2label.get(str(int(i)), int(i)))) for i in ids.reshape(-1)]


def _token_ids(tokenizer: Any, target: Any, n: int, vocab: int, default: Tensor | None, what: str) -> Tensor | None:
    """Resolve next-token targets: ``None`` (-> ``default``), token ids or strings that are a single token.

    A string is rejected (``ValueError``) when it is not exactly one token, or when it tokenises to the
    tokenizer's unknown token: explaining the logit of ``<unk>`` in its place would answer another question.
    """
    if target is None:
        return None if default is None else default.clone()
    out = []
    for t in _per_sample(target, n, what):
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError(f"a tokenizer is needed to look up the {what} {t!r}; pass a token id instead")
            ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"the {what} {t!r} is no token at all after tokenisation; pass a token of the "
                                 "vocabulary or its id")
            unk = getattr(tokenizer, "unk_token_id", None)
            if unk is not None and int(unk) in [int(i) for i in ids] and t != getattr(tokenizer, "unk_token", None):
                unk_name = getattr(tokenizer, "unk_token", None) or f"id {unk}"
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(f"the {what} {t!r} is not in the tokenizer's vocabulary: it tokenises to "
                                 f"{pieces}, which contains the unknown token {unk_name!r}, so its logit would "
                                 "explain the unknown token; pass a token of the vocabulary (see "
                                 "tokenizer.get_vocab()) or a token id")
            if len(ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(f"the {what} {t!r} is {len(ids)} tokens {pieces}, not one; pass a single token "
                                 "(often with a leading space, e.g. ' Paris') or its id")
            t = ids[0]
        t = int(t)
        if not 0 <= t < vocab:
            raise ValueError(f"{what} id {t} is out of range for a vocabulary of {vocab} tokens")
        out.append(t)
    device = default.device if default is not None else None
    return torch.tensor(out, dtype=torch.long, device=device)


def _decode_tokens(tokenizer: Any, ids: Tensor) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids.reshape(-1)]
    return [str(tokenizer.decode([int(i)])) for i in ids.reshape(-1)]


def _tokens(tokenizer: Any, ids: Tensor, mask: Tensor) -> list[list[str]]:
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        real = [t for t, keep in zip(row, m) if keep]
        if tokenizer is not None and callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
            out.append([str(s) for s in tokenizer.convert_ids_to_tokens(real)])
        else:
            out.append([str(t) for t in real])
    return out


def _special_mask(tokenizer: Any, ids: Tensor, mask: Tensor) -> Tensor:
    special_ids = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    special = torch.zeros_like(mask)
    if special_ids:
        special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device))
    return special | ~mask


def _last_real(mask: Tensor) -> Tensor:
    """Index of the last real token of each row of a right-padded mask."""
    return (mask.long().sum(1) - 1).clamp_min(0)


def _attribution(tokenizer: Any, enc: dict[str, Tensor], rel: Tensor, index: Tensor | None) -> TokenAttribution:
    """Map packed relevance back to the caller's layout, zero padding, and sum over hidden."""
    ids = enc["input_ids"].cpu()
    mask = enc["attention_mask"].bool().cpu()
    rel = _unpack(rel.detach(), index).cpu()
    pad = ~mask
    padding_relevance = (rel * pad.unsqueeze(-1)).flatten(1).sum(1)
    rel = rel.masked_fill(pad.unsqueeze(-1), 0)
    return TokenAttribution(
        input_ids=ids, attention_mask=mask, special_mask=_special_mask(tokenizer, ids, mask).cpu(),
        relevance=rel, scores=rel.sum(-1), tokens=_tokens(tokenizer, ids, mask),
        padding_relevance=padding_relevance,
    )


@dataclass
class _Forward:
    """Everything one embedding-level forward pass produced."""

    output: Any
    embeddings: list[Tensor]
    packed: list[dict[str, Tensor]]
    index: list[Tensor | None]


_EMBEDDINGS = ("auto", "inputs_embeds", "graph")


def _run(model: nn.Module, enc: dict[str, Tensor], dec: dict[str, Tensor] | None, extra: Mapping[str, Any],
         check: bool, embeddings: str = "auto") -> _Forward:
    """Forward ``model`` on ``enc`` (and decoder inputs ``dec``) with leaves at the input embeddings."""
    if embeddings not in _EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {_EMBEDDINGS}, got {embeddings!r}")
    params = _forward_params(model)
    device = _device(model)
    emb_module = _embedding_module(model)
    dec_module = _decoder_embedding_module(model, emb_module) if dec is not None else None
    packed, index = _pack_right(enc)
    packed = {k: v.to(device) for k, v in packed.items()}
    kwargs: dict[str, Any] = {k: v for k, v in packed.items() if k in params and k != "input_ids"}
    kwargs.update(extra)
    dpacked, dindex = (None, None)
    if dec is not None:
        dpacked, dindex = _pack_right(dec)
        dpacked = {k: v.to(device) for k, v in dpacked.items()}
        kwargs["decoder_attention_mask"] = dpacked["attention_mask"]
    if "use_cache" in params:
        kwargs["use_cache"] = False
    ids_kwargs = dict(kwargs, input_ids=packed["input_ids"])
    if dpacked is not None:
        ids_kwargs["decoder_input_ids"] = dpacked["input_ids"]
    has_embeds = "inputs_embeds" in params and (dpacked is None or "decoder_inputs_embeds" in params)
    mode = embeddings
    out: Any = None
    found: list[Tensor] = []
    if mode in ("auto", "graph"):
        # feed input_ids exactly as in a normal call (the model keeps any use it makes of the ids: padding
        # detection, position ids, scaling) and find the embedding lookups in the graph afterwards
        with torch.enable_grad():
            out = model(**ids_kwargs)
        weights = [emb_module.weight] + ([dec_module.weight] if dec_module is not None else [])
        id_list = [packed["input_ids"]] + ([dpacked["input_ids"]] if dpacked is not None else [])
        weight = getattr(emb_module, "weight", None)
        if isinstance(weight, Tensor) and weight.requires_grad and all(
                isinstance(w, Tensor) and w.requires_grad for w in weights):
            if dpacked is None or weights[1] is weight:
                found = _embedding_edges(out, weight, id_list)
            else:
                found = _embedding_edges(out, weight, id_list[:1]) + _embedding_edges(out, weights[1], id_list[1:])
                found = found if len(found) == 2 else []
        if not found:
            if mode == "graph" or not has_embeds:
                raise RuntimeError(
                    f"could not find the input embedding lookups of {type(model).__name__} in the autograd graph "
                    "(the embedding weight must require grad, and the model must look it up once with the "
                    "given ids); pass embeddings='inputs_embeds', or call dynamiclrp.relevance(output, embeddings) "
                    "on the tensor you want")
            mode = "inputs_embeds"
    if mode == "inputs_embeds":
        if not has_embeds:
            raise TypeError(f"{type(model).__name__}.forward has no inputs_embeds argument; use embeddings='graph'")
        with torch.enable_grad():
            emb = emb_module(packed["input_ids"]).detach().requires_grad_(True)
            kwargs["inputs_embeds"] = emb
            found = [emb]
            if dpacked is not None:
                demb = (dec_module or emb_module)(dpacked["input_ids"]).detach().requires_grad_(True)
                kwargs["decoder_inputs_embeds"] = demb
                found.append(demb)
            out = model(**kwargs)
        if check:
            with torch.no_grad():
                ref_out = model(**ids_kwargs)
            mask = packed["attention_mask"].bool() if dpacked is None else dpacked["attention_mask"].bool()
            for name, ref, got in _paired_outputs(ref_out, out):
                if got.dim() >= 2 and got.shape[:2] == mask.shape:
                    ref, got = ref[mask], got[mask]
                if not torch.allclose(ref.float(), got.detach().float(), rtol=1e-4, atol=1e-4):
                    diff = float((ref.float() - got.detach().float()).abs().max())
                    raise RuntimeError(
                        f"{type(model).__name__} gives different {name} for input_ids and for inputs_embeds computed "
                        f"by model.get_input_embeddings() (max difference {diff:.3g}): it uses the token ids for more "
                        "than the embedding lookup (e.g. to find padding or scale). Use embeddings='auto' (the "
                        "default), which feeds input_ids")
    packs = [packed] + ([dpacked] if dpacked is not None else [])
    return _Forward(out, found, packs, [index] + ([dindex] if dec is not None else []))


def _relevance(outputs: Tensor, fwd: _Forward, rules: Any, ledger: bool, model: nn.Module
               ) -> tuple[list[Tensor], Ledger | None]:
    # the helper chose the embeddings (encoder and decoder): an output need not depend on both
    ex = _explain(outputs, list(fwd.embeddings), rules=rules, ledger=ledger, model=model, allow_unused=True)
    return list(ex.relevance), ex.ledger


def _check_position(pos: int, n_real: int, sample: int) -> int:
    if not -n_real <= pos < n_real:
        raise ValueError(f"position {pos} is out of range for sample {sample}, which has {n_real} tokens "
                         "(padding excluded)")
    return pos % n_real


# ==============================================================================================================
# text
# ==============================================================================================================
def text(model: nn.Module, tokenizer: Any, texts: Texts, select: Callable[[Any, dict[str, Tensor]], Tensor], *,
         rules: Any = DEFAULT_RULES, ledger: bool = False, check: bool = False, embeddings: str = "auto",
         tokenizer_kwargs: Mapping[str, Any] | None = None, forward_kwargs: Mapping[str, Any] | None = None,
         ) -> TextExplanation:
    """Explain any output of a text model, chosen by ``select``.

    Parameters
    ----------
    model : torch.nn.Module
        A ``transformers`` model (or any module with ``get_input_embeddings()`` and an ``inputs_embeds``
        argument).
    tokenizer : tokenizer or processor
        Used to tokenise ``texts`` and to name the tokens.
    texts : str, sequence of str, or tokenised inputs
        Raw text(s), or the output of ``tokenizer(...)`` (a mapping with ``input_ids`` and optionally
        ``attention_mask``, ``token_type_ids``).
    select : callable
        ``select(output, inputs) -> Tensor`` of shape ``(batch,)``: the value to explain per sample, taken from
        the model output. ``inputs`` are the (right-padded) inputs that were fed, e.g. to find the last real
        position with ``inputs["attention_mask"]``.
    rules : str or RuleSet, default "attnlrp"
        See the module docstring.
    ledger : bool, default False
        Also return the ledger (where relevance that did not reach the tokens went).
    check : bool, default False
        With ``embeddings="inputs_embeds"``: also run the model on ``input_ids`` and raise if the outputs differ.
    embeddings : {"auto", "inputs_embeds", "graph"}, default "auto"
        How relevance reaches the embeddings. ``"graph"`` feeds ``input_ids`` as in a normal call and requests
        relevance at the embedding lookups found in the autograd graph (no hook: the model runs untouched), so
        that everything the model does with the ids (find the last non-padding token, derive position ids,
        scale) is unchanged. ``"inputs_embeds"`` computes ``emb = model.get_input_embeddings()(input_ids)`` and
        passes ``inputs_embeds=emb``. ``"auto"`` uses ``"graph"`` and falls back to ``"inputs_embeds"`` when the
        lookups are not in the graph (a frozen embedding weight).
    tokenizer_kwargs : mapping, optional
        Extra arguments of the tokenizer call (e.g. ``max_length=128``).
    forward_kwargs : mapping, optional
        Extra arguments of the model call.

    Returns
    -------
    TextExplanation
        ``target`` and ``prediction`` are ``-1`` (unknown); ``explained`` is the selected value.
    """
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    enc = _encode(tok, texts, **dict(tokenizer_kwargs or {}))
    fwd = _run(model, enc, None, dict(forward_kwargs or {}), check, embeddings)
    with torch.enable_grad():
        value = select(fwd.output, fwd.packed[0])
    if not isinstance(value, Tensor) or value.shape != (enc["input_ids"].shape[0],):
        raise ValueError(f"select must return a tensor of shape (batch,) = ({enc['input_ids'].shape[0]},), got "
                         f"{getattr(value, 'shape', type(value).__name__)}")
    rel, led = _relevance(value, fwd, rules, ledger, model)
    n = len(value)
    none = torch.full((n,), -1, dtype=torch.long)
    return TextExplanation(
        task="text", inputs=_attribution(tok, enc, rel[0], fwd.index[0]), target=none,
        target_names=["selected output"] * n, explained=value.detach().cpu(), prediction=none,
        logits=_try_logits(fwd.output),
        rules=_rules_name(rules), ledger=led,
    )


def text_classification(model: nn.Module, tokenizer: Any, texts: Texts, target: Target = None, *,
                        rules: Any = DEFAULT_RULES, ledger: bool = False, check: bool = False, embeddings: str = "auto",
                        tokenizer_kwargs: Mapping[str, Any] | None = None) -> TextExplanation:
    """Explain a sequence classifier's logit for each text.

    Parameters
    ----------
    model : transformers ``*ForSequenceClassification``
    tokenizer : tokenizer or processor
    texts : str, sequence of str, or tokenised inputs
        One text or a batch (padded automatically).
    target : None, int, str, or one per sample
        Class to explain: ``None`` for the predicted class, an index, or a label name from
        ``model.config.label2id``.
    rules, ledger, check, embeddings, tokenizer_kwargs
        As in :func:`text`.

    Returns
    -------
    TextExplanation
        ``explained`` is the target logit; ``ex.tokens[i]`` and ``ex.scores[i]`` the tokens and their relevance.

    Raises
    ------
    ValueError
        A target that is not a class of the model.

    Examples
    --------
    >>> ex = hf.text_classification(model, tokenizer, ["a great movie", "dull"])   # doctest: +SKIP
    >>> ex.inputs.pairs(0)                                                          # doctest: +SKIP
    [('[CLS]', 0.01), ('a', 0.02), ('great', 0.9), ('movie', 0.1), ('[SEP]', -0.01)]
    """
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    enc = _encode(tok, texts, **dict(tokenizer_kwargs or {}))
    fwd = _run(model, enc, None, {}, check, embeddings)
    logits = _logits(fwd.output)
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (batch, classes), got {tuple(logits.shape)}; for token-level "
                         "heads use token_classification()")
    pred = logits.argmax(-1)
    tgt = _label_ids(model, target, logits.shape[0], logits.shape[1], pred.detach())
    value = logits.gather(1, tgt[:, None]).squeeze(1)
    rel, led = _relevance(value, fwd, rules, ledger, model)
    return TextExplanation(
        task="text_classification", inputs=_attribution(tok, enc, rel[0], fwd.index[0]), target=tgt.cpu(),
        target_names=_label_names(model, tgt), explained=value.detach().cpu(), prediction=pred.detach().cpu(),
        logits=logits.detach().cpu(), rules=_rules_name(rules), ledger=led,
    )


def token_classification(model: nn.Module, tokenizer: Any, texts: Texts, position: int | Sequence[int],
                         target: Target = None, *, rules: Any = DEFAULT_RULES, ledger: bool = False,
                         check: bool = False, embeddings: str = "auto",
                         tokenizer_kwargs: Mapping[str, Any] | None = None) -> TextExplanation:
    """Explain the label logit of one token per text (NER, POS tagging...).

    Parameters
    ----------
    model : transformers ``*ForTokenClassification``
    tokenizer : tokenizer or processor
    texts : str, sequence of str, or tokenised inputs
    position : int or one per sample
        Index of the token to explain among the sample's real (non-padding) tokens, special tokens included
        (``ex.tokens[i][position]``); negative values count from the end.
    target : None, int, str, or one per sample
        Label to explain; ``None`` for the label predicted at that token.
    rules, ledger, check, embeddings, tokenizer_kwargs
        As in :func:`text`.

    Returns
    -------
    TextExplanation
        ``positions`` holds the explained token's index in the padded batch.
    """
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    enc = _encode(tok, texts, **dict(tokenizer_kwargs or {}))
    fwd = _run(model, enc, None, {}, check, embeddings)
    logits = _logits(fwd.output)
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (batch, tokens, labels), got {tuple(logits.shape)}; for "
                         "sequence-level heads use text_classification()")
    n = logits.shape[0]
    mask = fwd.packed[0]["attention_mask"].bool()
    n_real = mask.long().sum(1).tolist()
    pos = torch.tensor([_check_position(int(p), n_real[i], i) for i, p in enumerate(_per_sample(position, n,
                                                                                                "positions"))],
                       device=logits.device)
    at = logits[torch.arange(n, device=logits.device), pos]  # packed layout: real tokens first
    pred = at.argmax(-1)
    tgt = _label_ids(model, target, n, at.shape[1], pred.detach())
    value = at.gather(1, tgt[:, None]).squeeze(1)
    rel, led = _relevance(value, fwd, rules, ledger, model)
    orig_pos = pos.cpu() if fwd.index[0] is None else fwd.index[0].gather(1, pos.cpu()[:, None]).squeeze(1)
    return TextExplanation(
        task="token_classification", inputs=_attribution(tok, enc, rel[0], fwd.index[0]), target=tgt.cpu(),
        target_names=_label_names(model, tgt), explained=value.detach().cpu(), prediction=pred.detach().cpu(),
        logits=_unpack(logits.detach(), fwd.index[0]).cpu(), positions=orig_pos, rules=_rules_name(rules),
        ledger=led,
    )


def question_answering(model: nn.Module, tokenizer: Any, question: str | Sequence[str],
                       context: str | Sequence[str] | None = None, *, which: str = "both",
                       answer: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
                       rules: Any = DEFAULT_RULES, ledger: bool = False, check: bool = False, embeddings: str = "auto",
                       tokenizer_kwargs: Mapping[str, Any] | None = None) -> TextExplanation:
    """Explain an extractive QA model's answer span: start logit, end logit, or both together.

    Parameters
    ----------
    model : transformers ``*ForQuestionAnswering``
    tokenizer : tokenizer or processor
    question : str or sequence of str
        The question(s); or tokenised question/context pairs (then ``context`` is ``None``).
    context : str or sequence of str
        The passage(s) the answer is extracted from.
    which : {"both", "start", "end"}, default "both"
        Explain ``start_logit + end_logit`` of the span (one pass, the span's score), or one of them. Call twice
        with ``"start"`` and ``"end"`` to see the two separately.
    answer : (start, end) or one per sample, optional
        Token positions (inclusive, among the sample's real tokens) of the span to explain. Default: the
        model's answer — the best start, then the best end at or after it.
    rules, ledger, check, embeddings, tokenizer_kwargs
        As in :func:`text`.

    Returns
    -------
    TextExplanation
        ``target`` is ``(batch, 2)`` with start and end positions (in ``inputs``' layout), ``target_names``
        the answer texts, ``prediction`` the model's own ``(start, end)``.
    """
    if which not in ("both", "start", "end"):
        raise ValueError(f"which must be 'both', 'start' or 'end', got {which!r}")
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    if isinstance(question, Mapping):
        enc = _encode(tok, question)
    else:
        if context is None:
            raise ValueError("pass the context (the passage that contains the answer) with the question")
        q = [question] if isinstance(question, str) else list(question)
        c = [context] if isinstance(context, str) else list(context)
        if len(c) == 1 and len(q) > 1:
            c = c * len(q)
        if len(q) != len(c):
            raise ValueError(f"got {len(q)} questions and {len(c)} contexts")
        enc = _encode(tok, q, c, **dict(tokenizer_kwargs or {}))
    fwd = _run(model, enc, None, {}, check, embeddings)
    start = _logits(fwd.output, "start_logits")
    end = _logits(fwd.output, "end_logits")
    n = start.shape[0]
    mask = fwd.packed[0]["attention_mask"].bool()
    neg = torch.finfo(start.dtype).min
    s_masked = start.detach().masked_fill(~mask, neg)
    e_masked = end.detach().masked_fill(~mask, neg)
    ps = s_masked.argmax(1)
    after = torch.arange(start.shape[1], device=start.device)[None] >= ps[:, None]
    pe = e_masked.masked_fill(~after, neg).argmax(1)
    if answer is None:
        s_idx, e_idx = ps, pe
    else:
        spans = [answer] * n if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], int) \
            else list(answer)
        if len(spans) != n:
            raise ValueError(f"got {len(spans)} answer spans for a batch of {n}")
        n_real = mask.long().sum(1).tolist()
        s_list, e_list = [], []
        for i, (s, e) in enumerate(spans):
            s, e = _check_position(int(s), n_real[i], i), _check_position(int(e), n_real[i], i)
            if e < s:
                raise ValueError(f"answer span of sample {i} ends ({e}) before it starts ({s})")
            s_list.append(s)
            e_list.append(e)
        s_idx = torch.tensor(s_list, device=start.device)
        e_idx = torch.tensor(e_list, device=start.device)
    rows = torch.arange(n, device=start.device)
    value = {"both": start[rows, s_idx] + end[rows, e_idx], "start": start[rows, s_idx],
             "end": end[rows, e_idx]}[which]
    rel, led = _relevance(value, fwd, rules, ledger, model)
    ids = fwd.packed[0]["input_ids"]
    names = [str(tok.decode(ids[i, int(s_idx[i]):int(e_idx[i]) + 1].tolist(), skip_special_tokens=True)).strip()
             if tok is not None else f"tokens {int(s_idx[i])}..{int(e_idx[i])}" for i in range(n)]

    def orig(p: Tensor) -> Tensor:
        return p.cpu() if fwd.index[0] is None else fwd.index[0].gather(1, p.cpu()[:, None]).squeeze(1)

    return TextExplanation(
        task="question_answering", inputs=_attribution(tok, enc, rel[0], fwd.index[0]),
        target=torch.stack([orig(s_idx), orig(e_idx)], 1), target_names=names, explained=value.detach().cpu(),
        prediction=torch.stack([orig(ps), orig(pe)], 1),
        logits=_unpack(torch.stack([start.detach(), end.detach()], -1), fwd.index[0]).cpu(),
        rules=_rules_name(rules), ledger=led, extras={"which": which},
    )


def _lm_value(logits: Tensor, pos: Tensor, tokenizer: Any, target: Any, contrast: Any
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    n, _, vocab = logits.shape
    rows = torch.arange(n, device=logits.device)
    last = logits[rows, pos]  # (n, vocab)
    pred = last.detach().argmax(-1)
    tgt = _token_ids(tokenizer, target, n, vocab, pred, "target token")
    con = _token_ids(tokenizer, contrast, n, vocab, None, "contrast token")
    value = last.gather(1, tgt[:, None]).squeeze(1)
    if con is not None:
        value = value - last.gather(1, con.to(last.device)[:, None]).squeeze(1)
    return value, tgt, pred, con


def next_token(model: nn.Module, tokenizer: Any, prompts: Texts, target: Any = None, *, contrast: Any = None,
               rules: Any = DEFAULT_RULES, ledger: bool = False, check: bool = False, embeddings: str = "auto",
               tokenizer_kwargs: Mapping[str, Any] | None = None) -> TextExplanation:
    """Explain a causal language model's next-token logit after each prompt, optionally against a contrast token.

    Parameters
    ----------
    model : transformers ``*ForCausalLM``
    tokenizer : tokenizer or processor
    prompts : str, sequence of str, or tokenised inputs
        Left- or right-padded batches both work: the logit at each prompt's last real token is explained.
    target : None, int, str, or one per sample
        Next token to explain: ``None`` for the model's top token, a token id, or a string that is exactly one
        token of the vocabulary (e.g. ``" Paris"`` for GPT-2-style tokenizers). A string that tokenises to
        several tokens, or to the unknown token (a word the vocabulary does not have), raises ``ValueError``
        rather than explaining something else: pass the id of the token you mean.
    contrast : None, int, str, or one per sample
        With a contrast token ``B``, explain ``logit(target) - logit(B)``: "why ``target`` rather than ``B``".
    rules, ledger, check, embeddings, tokenizer_kwargs
        As in :func:`text`.

    Returns
    -------
    TextExplanation
        ``target_names`` are the decoded target tokens (``"A vs B"`` for contrastive explanations).
    """
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    enc = _encode(tok, prompts, **dict(tokenizer_kwargs or {}))
    fwd = _run(model, enc, None, {}, check, embeddings)
    logits = _logits(fwd.output)
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (batch, tokens, vocab), got {tuple(logits.shape)}")
    pos = _last_real(fwd.packed[0]["attention_mask"].bool())
    value, tgt, pred, con = _lm_value(logits, pos, tok, target, contrast)
    rel, led = _relevance(value, fwd, rules, ledger, model)
    names = _decode_tokens(tok, tgt)
    if con is not None:
        names = [f"{a!r} vs {b!r}" for a, b in zip(names, _decode_tokens(tok, con))]
    orig = pos.cpu() if fwd.index[0] is None else fwd.index[0].gather(1, pos.cpu()[:, None]).squeeze(1)
    return TextExplanation(
        task="next_token", inputs=_attribution(tok, enc, rel[0], fwd.index[0]), target=tgt.cpu(),
        target_names=names, explained=value.detach().cpu(), prediction=pred.cpu(),
        logits=logits.detach()[torch.arange(len(pos)), pos].cpu(), positions=orig,
        contrast=None if con is None else con.cpu(), rules=_rules_name(rules), ledger=led,
    )


def fill_mask(model: nn.Module, tokenizer: Any, texts: Texts, target: Any = None, *,
              position: int | Sequence[int] | None = None, rules: Any = DEFAULT_RULES, ledger: bool = False,
              check: bool = False, embeddings: str = "auto",
              tokenizer_kwargs: Mapping[str, Any] | None = None) -> TextExplanation:
    """Explain a masked language model's logit for the token it predicts at a masked position.

    Parameters
    ----------
    model : transformers ``*ForMaskedLM`` (BERT, RoBERTa, ...)
    tokenizer : tokenizer or processor
    texts : str, sequence of str, or tokenised inputs
        Each text contains the tokenizer's mask token (``[MASK]``, ``<mask>``), or give ``position``.
    target : None, int, str, or one per sample
        Token to explain at the masked position: ``None`` for the model's top token, a token id, or a string
        that is exactly one token of the vocabulary (see :func:`next_token`).
    position : int or one per sample, optional
        Index of the position to explain among the sample's real tokens (special tokens included, as
        ``ex.tokens[i][position]``); default: the first mask token of each sample.
    rules, ledger, check, embeddings, tokenizer_kwargs
        As in :func:`text`.

    Returns
    -------
    TextExplanation
        ``positions`` holds the explained position in the padded batch; ``target_names`` the decoded tokens.

    Raises
    ------
    ValueError
        No position given and a sample has no mask token; a target that is not one token of the vocabulary.
    """
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    enc = _encode(tok, texts, **dict(tokenizer_kwargs or {}))
    fwd = _run(model, enc, None, {}, check, embeddings)
    logits = _logits(fwd.output)
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (batch, tokens, vocab), got {tuple(logits.shape)}")
    n, _, vocab = logits.shape
    mask = fwd.packed[0]["attention_mask"].bool()
    n_real = mask.long().sum(1).tolist()
    if position is None:
        mask_id = getattr(tok, "mask_token_id", None)
        ids = fwd.packed[0]["input_ids"]
        found = [] if mask_id is None else [(ids[i] == int(mask_id)).nonzero() for i in range(n)]
        if mask_id is None or any(len(f) == 0 for f in found):
            mask_token = getattr(tok, "mask_token", None)
            where = f"the mask token {mask_token!r}" if mask_token else "a mask token"
            raise ValueError(f"a text has no masked position: put {where} in each text or pass position=...")
        positions = [int(f[0, 0]) for f in found]
    else:
        positions = [_check_position(int(p), n_real[i], i) for i, p in enumerate(_per_sample(position, n,
                                                                                              "positions"))]
    pos = torch.tensor(positions, device=logits.device)
    at = logits[torch.arange(n, device=logits.device), pos]
    pred = at.detach().argmax(-1)
    tgt = _token_ids(tok, target, n, vocab, pred, "target token")
    value = at.gather(1, tgt[:, None]).squeeze(1)
    rel, led = _relevance(value, fwd, rules, ledger, model)
    orig = pos.cpu() if fwd.index[0] is None else fwd.index[0].gather(1, pos.cpu()[:, None]).squeeze(1)
    return TextExplanation(
        task="fill_mask", inputs=_attribution(tok, enc, rel[0], fwd.index[0]), target=tgt.cpu(),
        target_names=_decode_tokens(tok, tgt), explained=value.detach().cpu(), prediction=pred.cpu(),
        logits=at.detach().cpu(), positions=orig, rules=_rules_name(rules), ledger=led,
    )


def seq2seq(model: nn.Module, tokenizer: Any, sources: Texts, decoder_prefix: Texts | None = None,
            target: Any = None, *, contrast: Any = None, decoder_start_token_id: int | None = None,
            rules: Any = DEFAULT_RULES, ledger: bool = False, check: bool = False, embeddings: str = "auto",
            tokenizer_kwargs: Mapping[str, Any] | None = None) -> TextExplanation:
    """Explain an encoder-decoder model's next decoder token, over encoder *and* decoder tokens.

    Parameters
    ----------
    model : transformers ``*ForConditionalGeneration`` (T5, BART, Marian, ...)
    tokenizer : tokenizer or processor
    sources : str, sequence of str, or tokenised inputs
        The encoder input(s).
    decoder_prefix : str, sequence of str, tokenised inputs, or None
        The output generated so far (teacher-forced). It is tokenised without special tokens and the model's
        ``decoder_start_token_id`` is put in front. ``None``: only the start token, i.e. explain the first
        output token. Tokenised inputs are used as they are (include the start token yourself).
    target, contrast : None, int, str, or one per sample
        As in :func:`next_token`.
    decoder_start_token_id : int, optional
        Start token of the decoder; by default ``model.config.decoder_start_token_id`` (or the generation
        config's).
    rules, ledger, check, embeddings, tokenizer_kwargs
        As in :func:`text`.

    Returns
    -------
    TextExplanation
        ``inputs`` holds the encoder tokens and ``decoder`` the decoder tokens; their relevance together adds
        up to the explained logit, up to the ledger's sinks.
    """
    _warn_if_training(model)
    tok = _text_tokenizer(tokenizer)
    enc = _encode(tok, sources, **dict(tokenizer_kwargs or {}))
    n = enc["input_ids"].shape[0]
    start_id = decoder_start_token_id
    if start_id is None:
        start_id = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    if start_id is None:
        start_id = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if isinstance(decoder_prefix, Mapping):
        dec = _encode(tok, decoder_prefix)
    else:
        if start_id is None:
            raise ValueError("the model config has no decoder_start_token_id; pass decoder_start_token_id=... "
                             "(T5: the pad token id, 0) or the decoder inputs tokenised, starting with the start "
                             "token")
        prefixes = [""] * n if decoder_prefix is None else _per_sample(decoder_prefix, n, "decoder prefixes")
        rows = [[int(start_id)] + (list(tok(p, add_special_tokens=False)["input_ids"]) if p else [])
                for p in prefixes]
        length = max(len(r) for r in rows)
        pad = getattr(tok, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        dec = {"input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long),
               "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows],
                                              dtype=torch.long)}
    if dec["input_ids"].shape[0] != n:
        raise ValueError(f"got {dec['input_ids'].shape[0]} decoder inputs for {n} sources")
    fwd = _run(model, enc, dec, {}, check, embeddings)
    logits = _logits(fwd.output)
    pos = _last_real(fwd.packed[1]["attention_mask"].bool())
    value, tgt, pred, con = _lm_value(logits, pos, tok, target, contrast)
    rel, led = _relevance(value, fwd, rules, ledger, model)
    names = _decode_tokens(tok, tgt)
    if con is not None:
        names = [f"{a!r} vs {b!r}" for a, b in zip(names, _decode_tokens(tok, con))]
    orig = pos.cpu() if fwd.index[1] is None else fwd.index[1].gather(1, pos.cpu()[:, None]).squeeze(1)
    return TextExplanation(
        task="seq2seq", inputs=_attribution(tok, enc, rel[0], fwd.index[0]),
        decoder=_attribution(tok, dec, rel[1], fwd.index[1]), target=tgt.cpu(), target_names=names,
        explained=value.detach().cpu(), prediction=pred.cpu(),
        logits=logits.detach()[torch.arange(n), pos].cpu(), positions=orig,
        contrast=None if con is None else con.cpu(), rules=_rules_name(rules), ledger=led,
    )


# ==============================================================================================================
# images
# ==============================================================================================================
def image_classification(model: nn.Module, processor: Any, images: Any, target: Target = None, *,
                         rules: Any = DEFAULT_RULES, ledger: bool = False,
                         processor_kwargs: Mapping[str, Any] | None = None) -> ImageExplanation:
    """Explain an image classifier's logit, with relevance per pixel of the preprocessed input.

    Parameters
    ----------
    model : transformers ``*ForImageClassification`` (ViT, ConvNeXt, ResNet, Swin, ...)
    processor : image processor or None
        Turns ``images`` into ``pixel_values``; ``None`` if ``images`` already is the model input.
    images : PIL image, array, sequence of them, or a ``(batch, channels, height, width)`` tensor
    target : None, int, str, or one per sample
        Class to explain; ``None`` for the predicted class, or a label name from ``model.config.label2id``.
    rules : str or RuleSet, default "attnlrp"
        For convolutional models ``"epsilon_plus"`` or ``"epsilon_gamma_box"`` give sharper heatmaps.
    ledger : bool, default False
    processor_kwargs : mapping, optional
        Extra arguments of the processor call.

    Returns
    -------
    ImageExplanation
        ``relevance`` has the shape of ``pixel_values``; ``ex.save_png(path)`` writes images and heatmaps.
    """
    _warn_if_training(model)
    if processor is not None:
        proc = getattr(processor, "image_processor", processor)
        pixel_values = proc(images=images, return_tensors="pt", **dict(processor_kwargs or {}))["pixel_values"]
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        if not getattr(proc, "do_normalize", True):
            mean = std = None
    else:
        if not isinstance(images, Tensor):
            raise TypeError("without a processor, pass images as a preprocessed (batch, channels, height, width) "
                            "tensor")
        pixel_values, mean, std = images, None, None
    if pixel_values.dim() == 3:
        pixel_values = pixel_values.unsqueeze(0)
    dtype = _float_dtype(model) or pixel_values.dtype
    with torch.enable_grad():
        x = pixel_values.detach().to(device=_device(model), dtype=dtype).clone().requires_grad_(True)
        out = model(pixel_values=x)
        logits = _logits(out)
        if logits.dim() != 2:
            raise ValueError(f"expected logits of shape (batch, classes), got {tuple(logits.shape)}")
        pred = logits.argmax(-1)
        tgt = _label_ids(model, target, logits.shape[0], logits.shape[1], pred.detach())
        value = logits.gather(1, tgt[:, None]).squeeze(1)
    ex = _explain(value, x, rules=rules, ledger=ledger, model=model)
    return ImageExplanation(
        relevance=ex.relevance[0].detach().cpu(), pixel_values=x.detach().cpu(), target=tgt.cpu(),
        target_names=_label_names(model, tgt), explained=value.detach().cpu(), prediction=pred.detach().cpu(),
        logits=logits.detach().cpu(), rules=_rules_name(rules), image_mean=mean, image_std=std, ledger=ex.ledger,
    )
