"""Benchmark models: random weights, built offline, each wrapped in a :class:`Case`.

A case owns a model, one input leaf (``x``: pixels / features / input embeddings, ``requires_grad=True``) and a
``forward(x)`` that returns the explained scalar per row: the logit of a class fixed at set-up (the argmax of the
first forward), gathered per row, shape ``(batch,)``. Everything that is timed starts from the same ``x`` and
the same ``forward``, so the baseline (forward + plain backward), our explanation and the peers differ only in
what happens after (or, for peers that need it, during) the forward pass.

Sizes (full run) follow issues 2 and 5:

* ``mlp``: 784-1024-1024-1024-10 with ReLU and biases, batch 64.
* ``cnn``: VGG-11 layout (8 conv3x3 + BatchNorm + ReLU blocks, 5 max-pools, adaptive average pool to 7x7,
  Linear-ReLU-Linear-ReLU-Linear classifier) at a quarter of VGG's channel widths, 3x224x224, batch 8, BatchNorm
  with random running statistics (eval mode). Quarter width keeps one forward + backward under a second on two
  cores; ``--cnn-width 1`` gives the real VGG-11-BN widths.
* ``bert`` / ``gpt2`` / ``llama``: ``transformers.AutoConfig.for_model(...)`` with hidden 256, 4 layers, 4 heads
  (LLaMA: 2 key/value heads, grouped-query attention), MLP width 1024, 256 tokens, batch 1, SDPA attention
  (``--attn eager`` for eager). BERT has a sequence-classification head; GPT-2 and LLaMA a causal-LM head
  evaluated at the last position only (``logits_to_keep=1``, as generation does), explaining the top next token.
  The input leaf is the input embeddings (``inputs_embeds``).
* ``llama-L``: the LLaMA above with ``L`` layers (depth scaling).
* ``llama1b``: LLaMA-3.2-1B shapes (16 layers, hidden 2048, 32/8 heads, MLP 8192, vocab 128256) at 512 tokens,
  for GPU runs (``run.py --device cuda --dtype bfloat16 --models llama1b``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

#: (low, high) of the pixel values in normalised space (ImageNet normalisation of [0, 1]), per channel
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Case:
    """One benchmark model with its input and its explained output."""

    name: str
    kind: str                       # "mlp", "cnn" or "text"
    model: nn.Module
    x: Tensor                       # input leaf (requires grad)
    call: Callable[[nn.Module, Tensor], Tensor]  # model, input -> logits (B, C)
    target: Tensor                  # (B,) explained class per row
    desc: str = ""
    bounds: tuple[Tensor, Tensor] | None = None   # z^B bounds, broadcastable to x
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, x: Tensor | None = None, model: nn.Module | None = None) -> Tensor:
        return self.call(self.model if model is None else model, self.x if x is None else x)

    def forward(self, x: Tensor | None = None, model: nn.Module | None = None) -> Tensor:
        """The explained scalar per row: ``logits[b, target[b]]``, shape ``(B,)``."""
        out = self.logits(x, model)
        return out.gather(1, self.target[:, None]).squeeze(1)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))


#: where and in which dtype models are built (set by ``run.py --device/--dtype``)
PLACEMENT: dict[str, Any] = {"device": "cpu", "dtype": torch.float32, "frozen": True}


def _finish(case_name: str, kind: str, model: nn.Module, x: Tensor, call, desc: str, **kw) -> Case:
    dev, dt = PLACEMENT["device"], PLACEMENT["dtype"]
    model.to(device=dev, dtype=dt)
    x = x.to(device=dev, dtype=dt)
    if kw.get("bounds") is not None:
        kw["bounds"] = tuple(b.to(device=dev, dtype=dt) for b in kw["bounds"])
    if dt != torch.float32:
        desc += f", {str(dt).replace('torch.', '')}"
    if str(dev) != "cpu":
        desc += f", {dev}"
    model.eval()
    # as explanations are run: the model frozen, only the input requires grad (run.py --trainable: a training graph)
    model.requires_grad_(not PLACEMENT["frozen"])
    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        target = call(model, x).argmax(1)
    return Case(case_name, kind, model, x, call, target, desc, **kw)


# ---------------------------------------------------------------------------------------------------------
# MLP and CNN
# ---------------------------------------------------------------------------------------------------------
def mlp(batch: int = 64, d_in: int = 784, hidden: int = 1024, depth: int = 3, n_out: int = 10,
        seed: int = 0) -> Case:
    _seed_all(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, n_out))
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-0.1, 0.1, generator=gen)
    x = torch.rand(batch, d_in, generator=gen)
    lo, hi = torch.zeros(()), torch.ones(())
    return _finish("mlp", "mlp", model, x, lambda m, t: m(t),
                   f"{d_in}-{'-'.join([str(hidden)] * depth)}-{n_out} ReLU, batch {batch}", bounds=(lo, hi))


class VGG(nn.Module):
    """VGG-11 layout with BatchNorm (torchvision's ``vgg11_bn`` structure, module names ``features.*``,
    ``avgpool``, ``classifier.*``) at ``width`` times its channel counts."""

    def __init__(self, width: float = 0.25, n_classes: int = 1000, hidden: int = 512):
        super().__init__()
        cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                w = max(4, int(round(v * width)))
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 49, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def cnn(batch: int = 8, size: int = 224, width: float = 0.25, hidden: int = 512, seed: int = 0) -> Case:
    _seed_all(seed)
    model = VGG(width, hidden=hidden)
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise_batchnorm(model, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1, generator=gen)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    x = (torch.rand(batch, 3, size, size, generator=gen) - mean) / std
    low = ((0 - mean) / std).expand(3, size, size)[None].contiguous()
    high = ((1 - mean) / std).expand(3, size, size)[None].contiguous()
    return _finish("cnn", "cnn", model, x, lambda m, t: m(t),
                   f"VGG-11-BN layout at width x{width:g}, {batch}x3x{size}x{size}", bounds=(low, high))


# ---------------------------------------------------------------------------------------------------------
# Transformers (random weights from AutoConfig.for_model, offline)
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    import logging
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def hf_config(model_type: str, hidden: int = 256, layers: int = 4, heads: int = 4, inter: int = 1024,
              positions: int = 512, kv_heads: int | None = None, vocab: int | None = None) -> Any:
    import transformers
    if model_type == "bert":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter, max_position_embeddings=positions, num_labels=2)
    elif model_type == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, n_positions=positions)
    elif model_type == "llama":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads or max(1, heads // 2), intermediate_size=inter,
                  max_position_embeddings=positions)
    else:
        raise ValueError(model_type)
    if vocab:
        kw["vocab_size"] = vocab
    return transformers.AutoConfig.for_model(model_type, **kw)


def transformer(model_type: str, *, hidden: int = 256, layers: int = 4, heads: int = 4, inter: int = 1024,
                tokens: int = 256, batch: int = 1, attn: str = "sdpa", seed: int = 0, name: str | None = None,
                model: nn.Module | None = None, kv_heads: int | None = None, vocab: int | None = None) -> Case:
    """A random-weight transformers model; the input leaf is ``inputs_embeds`` (batch, tokens, hidden)."""
    import transformers
    _seed_all(seed)
    if model is None:
        cfg = hf_config(model_type, hidden, layers, heads, inter, positions=max(512, tokens), kv_heads=kv_heads,
                        vocab=vocab)
        cls = {"bert": transformers.BertForSequenceClassification, "gpt2": transformers.GPT2LMHeadModel,
               "llama": transformers.LlamaForCausalLM}[model_type]
        with _quiet():
            model = cls._from_config(cfg, attn_implementation=attn)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(5, min(vocab, 30000), (batch, tokens), generator=gen)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids.to(model.get_input_embeddings().weight.device))
    causal = model_type != "bert"

    def call(m: nn.Module, x: Tensor) -> Tensor:
        if causal:
            return m(inputs_embeds=x, logits_to_keep=1, use_cache=False).logits[:, -1]
        return m(inputs_embeds=x).logits

    desc = (f"{model_type} h{hidden} L{layers} {tokens} tok, batch {batch}, {attn}"
            + (f", MLP {inter}" if inter != 4 * hidden else ""))
    return _finish(name or model_type, "text", model, emb, call, desc,
                   info={"model_type": model_type, "layers": layers, "tokens": tokens, "batch": batch,
                         "hidden": hidden, "heads": heads, "inter": inter, "attn": attn, "kv_heads": kv_heads,
                         "vocab": vocab})


def with_batch(case: Case, batch: int, seed: int = 0) -> Case:
    """The same model as ``case`` with a different batch (text cases only)."""
    i = case.info
    return transformer(i["model_type"], hidden=i["hidden"], layers=i["layers"], heads=i["heads"],
                       inter=i["inter"], tokens=i["tokens"], batch=batch, attn=i["attn"], seed=seed,
                       name=f"{case.name}-b{batch}", model=case.model, kv_heads=i["kv_heads"], vocab=i["vocab"])


# ---------------------------------------------------------------------------------------------------------
# Registry of benchmark model names
# ---------------------------------------------------------------------------------------------------------
FULL = {
    "mlp": dict(),
    "cnn": dict(),
    "bert": dict(),
    "gpt2": dict(),
    "llama": dict(),
}
QUICK = {
    "mlp": dict(batch=4, d_in=32, hidden=32, depth=2),
    "cnn": dict(batch=2, size=32, width=0.0625, hidden=32),
    "text": dict(hidden=32, layers=2, heads=2, inter=64, tokens=16),
}


def build(name: str, *, quick: bool = False, attn: str = "sdpa", cnn_width: float | None = None,
          layers: int | None = None, tokens: int | None = None, batch: int | None = None) -> Case:
    """Build the case called ``name`` (``mlp``, ``cnn``, ``bert``, ``gpt2``, ``llama`` or ``llama-L``)."""
    if name == "mlp":
        kw = dict(QUICK["mlp"]) if quick else {}
        if batch:
            kw["batch"] = batch
        return mlp(**kw)
    if name == "cnn":
        kw = dict(QUICK["cnn"]) if quick else {}
        if cnn_width:
            kw["width"] = cnn_width
        if batch:
            kw["batch"] = batch
        return cnn(**kw)
    if name == "llama1b":  # LLaMA-3.2-1B shapes (GPU runs): 16 layers, hidden 2048, GQA 32/8, MLP 8192
        kw = dict(QUICK["text"]) if quick else dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192,
                                                    tokens=512, vocab=128256)
        if tokens:
            kw["tokens"] = tokens
        if batch:
            kw["batch"] = batch
        return transformer("llama", attn=attn, name=name, **kw)
    base, _, depth = name.partition("-")
    if base in ("bert", "gpt2", "llama"):
        kw = dict(QUICK["text"]) if quick else {}
        if depth:
            kw["layers"] = int(depth)
        elif layers:
            kw["layers"] = layers
        if tokens:
            kw["tokens"] = tokens
        if batch:
            kw["batch"] = batch
        return transformer(base, attn=attn, name=name, **kw)
    raise ValueError(f"unknown benchmark model {name!r}; known: mlp, cnn, bert, gpt2, llama, llama-<layers>, "
                     "llama1b")


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (for peers that modify the model, e.g. Zennit's canonizers and hooks)."""
    return copy.deepcopy(model)
