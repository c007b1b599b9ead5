"""``dynamiclrp explain``: explain one prediction of a model for an image or a text and write a heatmap file.

The model is one of:

- your own: --model package.module:function or --model path/to/file.py:function, where function() returns a
  torch.nn.Module or a pair (model, preprocess); with --weights a state dict (or a pickled module) is loaded into
  it, and for torchvision builders --weights may name a weights enum (IMAGENET1K_V1, DEFAULT) that is already in
  the local torch hub cache;
- a transformers checkpoint directory (the output of save_pretrained): --hf path/to/checkpoint, with its
  tokenizer or image processor when the directory has one;
- a transformers architecture with tiny random weights (--hf bert, --hf vit, --hf gpt2 ...), built offline, to
  try the whole path end to end.

The model is put in evaluation mode (model.eval()) unless --no-eval is given; nothing else about it is changed
(its parameters keep their requires_grad). preprocess is, for images, a function from a PIL image to a (C, H, W)
tensor; for texts, a tokenizer. Without one, images are resized to --size and scaled to [0, 1] (then normalised
with --mean/--std), and texts use a word-level tokenizer made up for the random model.

Exit codes: 0 success, 2 bad arguments (missing file, unknown model, target out of range, a missing optional
dependency), 1 the explanation failed (e.g. an operation without a rule).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MissingExtraError, SpecError, UsageError
from ..extras import require
from ..loading import is_file_spec, load_attribute, on_sys_path
from ..api import explain

__all__ = ["HEADS", "add_arguments", "run", "load_model", "WordTokenizer"]

#: ``--head`` values: the transformers heads this command can explain (text or image input)
HEADS = ("sequence_classification", "token_classification", "question_answering", "causal_lm", "seq2seq_lm",
         "masked_lm", "image_classification")



# ==============================================================================================================
# arguments
# ==============================================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dynamiclrp explain``."""
    from . import plain

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = plain(__doc__.split("\n\n", 1)[1]) if __doc__ else None
    parser.epilog = ("examples:\n"
                     "  dynamiclrp explain --model torchvision.models:resnet18 --weights IMAGENET1K_V1 \\\n"
                     "      --image cat.png --target 'tabby cat'\n"
                     "  dynamiclrp explain --model mymodels.py:build --weights digits.pt --image digit.png "
                     "--out digit_lrp.png\n"
                     "  dynamiclrp explain --hf ./my-finetuned-bert --text 'a gripping, beautifully shot film'\n"
                     "  dynamiclrp explain --hf bert --text 'a gripping, beautifully shot film' --out bert.html\n"
                     "  dynamiclrp explain --hf bert --head question_answering --question 'who is nice?' "
                     "--text 'paris is nice'\n"
                     "  dynamiclrp explain --hf gpt2 --text 'The capital of France is' --ledger")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="MODULE:FUNCTION",
                     help="your model: FUNCTION() in an importable module (the current directory is searched "
                          "too) or in a .py file returns a torch.nn.Module or (model, preprocess)")
    src.add_argument("--hf", metavar="MODEL_TYPE_OR_DIR",
                     help="a transformers checkpoint directory (save_pretrained output), or a model type (bert, "
                          "gpt2, t5, vit, ...) built with tiny random weights")
    parser.add_argument("--weights", metavar="PATH_OR_NAME",
                        help="a state dict file (.pt/.pth; a checkpoint dict with a 'state_dict' entry or a "
                             "pickled nn.Module work too; unpickling runs code, so only load files you trust) "
                             "loaded into the model; for torchvision builders also a weights name such as "
                             "IMAGENET1K_V1 or DEFAULT, if already downloaded to the torch hub cache")
    parser.add_argument("--no-eval", action="store_true",
                        help="do not call model.eval(): explain the model in the mode your function returned "
                             "(dropout active in training mode makes explanations random)")
    inp = parser.add_mutually_exclusive_group(required=True)
    inp.add_argument("--image", type=Path, metavar="PATH", help="an image file (PNG, JPEG, ...)")
    inp.add_argument("--text", metavar="TEXT", help="a text (the context, for question answering)")
    parser.add_argument("--question", metavar="TEXT", help="question answering: the question about --text")
    parser.add_argument("--target", metavar="T",
                        help="what to explain: a class index or label name (classifiers), a token or token id "
                             "(language models); default: the model's prediction")
    parser.add_argument("--contrast", metavar="T",
                        help="language models: explain 'target rather than this token' (logit difference)")
    parser.add_argument("--position", type=int, metavar="I",
                        help="token classification: index of the token to explain (default 0); masked LM: the "
                             "position to fill (default: the first mask token, e.g. [MASK])")
    parser.add_argument("--rules", default=None, metavar="PRESET",
                        help="rule preset, optionally with parameters ('epsilon:epsilon=0.1'); default: attnlrp "
                             "for transformers models, epsilon otherwise. epsilon_gamma_box takes the normalised "
                             "range of a pixel as its bounds unless given ('epsilon_gamma_box:low=L,high=H')")
    parser.add_argument("--out", "-o", type=Path, metavar="PATH",
                        help="output file: .png or .pdf for images; .html, .png or .pdf for texts (default: "
                             "relevance.png / relevance.html in the current directory)")
    parser.add_argument("--head", choices=HEADS, metavar="HEAD",
                        help="--hf: the head to build or load, one of: " + ", ".join(HEADS) +
                             " (default: by model type, or the checkpoint's own class)")
    parser.add_argument("--num-labels", type=int, default=None, help="--hf model types: number of classes")
    parser.add_argument("--seed", type=int, default=0, help="--hf model types: seed of the random weights")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="a local tokenizer directory (loaded with transformers.AutoTokenizer, offline)")
    parser.add_argument("--size", type=int, default=None,
                        help="images: resize to SIZE x SIZE (default: the model's image size, else 224)")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="images: per-channel mean to subtract")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="images: per-channel std to divide by")
    parser.add_argument("--grayscale", action="store_true", help="images: feed one channel instead of RGB")
    parser.add_argument("--cmap", default="bwr",
                        help="diverging colour map (default bwr; coldnhot, seismic, RdBu_r, any matplotlib name)")
    parser.add_argument("--no-colorbar", action="store_true", help="images and text figures: no colour bar")
    parser.add_argument("--merge-words", action="store_true",
                        help="texts: colour whole words, summing the relevance of their sub-word tokens")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the tokens printed to the terminal: auto (default) when standard output is "
                             "a terminal and NO_COLOR is not set")
    parser.add_argument("--ledger", action="store_true", help="print where the relevance went (the ledger)")


# ==============================================================================================================
# models
# ==============================================================================================================
@dataclass
class _Loaded:
    """A model and what goes with it."""

    model: nn.Module
    preprocess: Any = None  # images: PIL -> tensor; texts: a tokenizer
    processor: Any = None  # a transformers image processor
    labels: list[str] | None = None  # class names (torchvision weights)
    mean: Any = None  # the preprocessing's normalisation, if known
    std: Any = None
    is_hf: bool = False
    notes: list[str] = field(default_factory=list)


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Load ``module:function`` (or ``file.py:function``) and return ``(model, preprocess or None)``.

    The model is returned as the function made it (no ``eval()``, no weights loaded).

    Raises
    ------
    UsageError
        The module, file or attribute does not exist, or it does not give a ``torch.nn.Module``.
    """
    loaded = _load_own(spec, None)
    return loaded.model, loaded.preprocess


def _load_own(spec: str, weights: str | None) -> _Loaded:
    try:
        where = spec.rsplit(":", 1)[0] if ":" in spec else spec
        folders = [os.getcwd()] + ([str(Path(where).parent)] if is_file_spec(where) else [])
        with on_sys_path(*folders):
            obj, _, _ = load_attribute(spec, expect="FUNCTION() returns a torch.nn.Module or (model, preprocess)")
            tv_weights = None
            if weights is not None and not Path(weights).exists():
                tv_weights = _torchvision_weights(obj, weights)
            if isinstance(obj, nn.Module):
                result = obj
            elif callable(obj):
                result = obj(weights=tv_weights) if tv_weights is not None else obj()
            else:
                raise UsageError(f"--model: {spec} is a {type(obj).__name__}, not a function or a torch.nn.Module")
    except SpecError as err:
        raise UsageError(f"--model: {err}") from None
    preprocess = None
    if isinstance(result, tuple):
        if len(result) != 2:
            raise UsageError(f"--model: {spec}() returned a tuple of {len(result)}; "
                             "return model or (model, preprocess)")
        result, preprocess = result
    if not isinstance(result, nn.Module):
        raise UsageError(f"--model: {spec} gave a {type(result).__name__}, not a torch.nn.Module")
    loaded = _Loaded(result, preprocess)
    if tv_weights is not None:
        transforms = tv_weights.transforms()
        loaded.preprocess = preprocess if preprocess is not None else transforms
        loaded.labels = list(tv_weights.meta.get("categories") or []) or None
        loaded.mean, loaded.std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    elif weights is not None:
        _load_weights(result, Path(weights))
    return loaded


def _torchvision_weights(builder: Any, name: str) -> Any:
    """The torchvision weights enum member ``name`` of ``builder`` if it is cached locally (no download)."""
    module = getattr(builder, "__module__", "") or ""
    try:
        accepts = callable(builder) and "weights" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        accepts = False
    if not (module.startswith("torchvision.") and accepts):
        raise UsageError(f"--weights: no such file: {name} (weights names such as IMAGENET1K_V1 work for "
                         "torchvision model builders only)")
    from torchvision import models as tvm

    enum = tvm.get_model_weights(builder)
    key = name.rsplit(".", 1)[-1]
    try:
        member = enum[key]
    except KeyError:
        valid = [m.name for m in enum] + ["DEFAULT"]
        raise UsageError(f"--weights: {enum.__name__} has no {key!r}; valid: {', '.join(valid)}, or a state dict "
                         "file") from None
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(member.url).path).name
    if not cached.is_file():
        raise UsageError(f"--weights: {enum.__name__}.{member.name} is not in the local torch hub cache ({cached}); "
                         "dynamiclrp does not download: fetch it once with torchvision (e.g. "
                         f"torchvision.models.get_model('{getattr(builder, '__name__', 'model')}', "
                         f"weights='{member.name}')) or pass a state dict file")
    return member


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict (or a checkpoint dict, or a pickled module's weights) into ``model``, strictly."""
    if not path.is_file():
        raise UsageError(f"--weights: {'is a directory' if path.is_dir() else 'no such file'}: {path}")
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:  # a pickled nn.Module: the user named the file, as they name the .py file of --model
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - unpickling can raise anything
            raise UsageError(f"--weights: cannot load {path} ({type(err).__name__}: {err})") from None
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"--weights: cannot load {path} ({type(err).__name__}: {err})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) and k == key
                                                      for k, v in obj.items()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"--weights: {path} holds a {type(obj).__name__}, not a state dict (a mapping of "
                         "parameter names to tensors) or a torch.nn.Module")
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    unexpected = [k for k in obj if k not in own]
    mismatched = [f"{k} {tuple(obj[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in obj and tuple(obj[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = ([f"missing {few(missing)}"] if missing else []) + \
            ([f"unexpected {few(unexpected)}"] if unexpected else []) + \
            ([f"shapes differ: {few(mismatched)}"] if mismatched else [])
        raise UsageError(f"--weights: {path} does not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(dict(obj), strict=True)


def _load_hf(args: argparse.Namespace) -> _Loaded:
    require("transformers", "dynamiclrp explain --hf")
    path = Path(args.hf)
    if path.is_dir():
        return _load_hf_dir(args, path)
    if path.suffix or "/" in args.hf or "\\" in args.hf or args.hf.startswith("."):
        raise UsageError(f"--hf: no such directory: {args.hf} (give a save_pretrained directory or a model type "
                         "such as bert)")
    from ..testing import zoo

    overrides = {} if args.num_labels is None else {"num_labels": args.num_labels}
    head = args.head
    if head is None and args.image is not None:
        head = "image_classification"
    try:
        entry = zoo.build_hf(args.hf, head=head, seed=args.seed, **overrides)
    except (ValueError, KeyError) as err:
        raise UsageError(f"--hf {args.hf}: {err.args[0] if err.args else err}") from None
    return _Loaded(entry.model, is_hf=True)


def _load_hf_dir(args: argparse.Namespace, path: Path) -> _Loaded:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"--hf: {path} is not a transformers checkpoint ({_first_line(err)})") from None
    if args.head is not None:
        from ..testing import zoo

        try:
            class_name = zoo.hf_head_for(config.model_type, args.head)
        except ValueError as err:
            raise UsageError(f"--hf {path}: {err}") from None
    elif getattr(config, "architectures", None):
        class_name = config.architectures[0]
    else:
        raise UsageError(f"--hf: {path}/config.json names no architecture; choose one with --head")
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise UsageError(f"--hf: transformers has no class {class_name!r} (from {path}/config.json)")
    kwargs = {} if args.num_labels is None else {"num_labels": args.num_labels}
    try:
        with _quiet_loading():
            model = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"--hf: cannot load {class_name} from {path} ({_first_line(err)})") from None
    loaded = _Loaded(model, is_hf=True)
    if args.image is not None:
        if (path / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            try:
                loaded.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as err:
                loaded.notes.append(f"could not load the image processor of {path} ({_first_line(err)})")
    elif args.tokenizer is None and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                        "vocab.txt", "vocab.json")):
        from transformers import AutoTokenizer

        try:
            loaded.preprocess = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"--hf: cannot load the tokenizer in {path} ({_first_line(err)})") from None
    return loaded


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No transformers progress bars or info logs while a checkpoint loads (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


class WordTokenizer:
    """A stand-in tokenizer for models with random weights: lower-cased words hashed into the vocabulary.

    It has the parts of a ``transformers`` tokenizer that :mod:`dynamiclrp.hf` uses (``__call__`` with padding
    and text pairs, ``convert_ids_to_tokens``, ``decode``, ``all_special_ids``, ``pad_token_id``,
    ``mask_token``). Token ids mean nothing: use a real tokenizer (``--tokenizer``) for a trained model. The
    words ``[MASK]`` and ``<mask>`` are the mask token.
    """

    def __init__(self, vocab_size: int, bos_token_id: int | None = None) -> None:
        self.vocab_size = int(vocab_size)
        self.pad_token_id = 0
        self.sep_token_id = 2 if self.vocab_size > 4 else None
        self.mask_token_id = 3 if self.vocab_size > 4 else None
        self.mask_token = "[MASK]" if self.mask_token_id is not None else None
        self.unk_token_id = None
        self.bos_token_id = bos_token_id
        extra = [i for i in (bos_token_id, self.sep_token_id) if i is not None]
        self.all_special_ids = [0, *extra]
        self._words: dict[int, str] = {0: "<pad>"}
        if bos_token_id is not None:
            self._words[bos_token_id] = "<s>"
        if self.sep_token_id is not None:
            self._words[self.sep_token_id] = "[SEP]"
        if self.mask_token_id is not None:
            self._words[self.mask_token_id] = "[MASK]"

    def _id(self, word: str) -> int:
        if self.mask_token_id is not None and word in ("[MASK]", "<mask>"):
            return self.mask_token_id
        low = 4
        high = min(self.vocab_size, 100) if self.vocab_size > 8 else self.vocab_size
        i = low + zlib.crc32(word.lower().encode()) % max(1, high - low)
        self._words.setdefault(i, word)
        return i

    def _row(self, text: Any, pair: Any, add_special_tokens: bool) -> list[int]:
        row = ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else [])
        row += [self._id(w) for w in str(text).split()]
        if pair is not None:
            row += ([self.sep_token_id] if self.sep_token_id is not None else []) + \
                [self._id(w) for w in str(pair).split()]
        return row

    def __call__(self, texts: Any, text_pair: Any = None, add_special_tokens: bool = True, **kw: Any) -> dict:
        batch = [texts] if isinstance(texts, str) else list(texts)
        pairs = [None] * len(batch) if text_pair is None else \
            ([text_pair] if isinstance(text_pair, str) else list(text_pair))
        rows = [self._row(t, p, add_special_tokens) for t, p in zip(batch, pairs)]
        if isinstance(texts, str) and kw.get("return_tensors") is None:
            return {"input_ids": rows[0]}
        length = max(1, max(len(r) for r in rows))
        ids = torch.tensor([r + [0] * (length - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def convert_ids_to_tokens(self, ids: Any) -> list[str]:
        return [self._words.get(int(i), f"<{int(i)}>") for i in ids]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return " ".join(self._words.get(int(i), f"<{int(i)}>") for i in ids
                        if not (skip_special_tokens and int(i) in self.all_special_ids))


# ==============================================================================================================
# running
# ==============================================================================================================
def _parse_target(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _rules(spec: str | None, default: str, low: Any = None, high: Any = None) -> Any:
    from .. import presets
    from ..errors import RuleError

    try:
        return presets.parse(spec or default, low=low, high=high)
    except RuleError as err:
        raise UsageError(f"--rules: {err}") from None


def _pil(path: Path, channels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"--image: cannot read {path} as an image ({err})") from None
    return img.convert("L" if channels == 1 else "RGB")


def _image_tensor(img: Any, size: int, mean: Any, std: Any) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else [0.0] * x.shape[0]).reshape(-1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0] * x.shape[0]).reshape(-1, 1, 1)
        if m.shape[0] not in (1, x.shape[0]) or s.shape[0] not in (1, x.shape[0]):
            raise UsageError(f"--mean/--std need 1 or {x.shape[0]} values")
        x = (x - m) / s
    return x.unsqueeze(0)


def _pixel_bounds(x: torch.Tensor, mean: Any, std: Any) -> tuple[Any, Any]:
    """Bounds of epsilon_gamma_box's z^B: a black and a white pixel after the normalisation, if known."""
    if mean is None and std is None:
        return float(x.min()), float(x.max())  # unknown preprocessing: the range of this input
    c = x.shape[1]
    m = torch.as_tensor(mean if mean is not None else [0.0], dtype=x.dtype).reshape(-1)
    s = torch.as_tensor(std if std is not None else [1.0], dtype=x.dtype).reshape(-1)
    m, s = m.expand(c) if m.numel() == 1 else m, s.expand(c) if s.numel() == 1 else s
    return ((0 - m) / s).reshape(1, c, 1, 1), ((1 - m) / s).reshape(1, c, 1, 1)


def _explain_image(args: argparse.Namespace, loaded: _Loaded) -> int:
    from .. import hf, viz

    model = loaded.model
    cfg = getattr(model, "config", None)
    size = args.size or getattr(cfg, "image_size", None) or 224
    size = size if isinstance(size, int) else int(size[0]) if isinstance(size, (list, tuple)) else int(
        size.get("height", 224))
    channels = 1 if args.grayscale else int(getattr(cfg, "num_channels", 3) or 3)
    img = _pil(args.image, channels)
    mean, std = args.mean, args.std
    if loaded.processor is not None:
        proc = loaded.processor
        x = proc(images=img, return_tensors="pt")["pixel_values"]
        if getattr(proc, "do_normalize", True):
            mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    elif loaded.preprocess is not None:
        x = loaded.preprocess(img)
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"the preprocess function returned {type(x).__name__}; it must return a tensor")
        x = x if x.dim() == 4 else x.unsqueeze(0)
        mean = mean if mean is not None else loaded.mean
        std = std if std is not None else loaded.std
    else:
        if loaded.is_hf and mean is None and std is None:
            mean, std = [0.5] * channels, [0.5] * channels  # the usual ViT-style processor default
        x = _image_tensor(img, size, mean, std)
    low, high = _pixel_bounds(x, mean, std)
    rules = _rules(args.rules, "attnlrp" if loaded.is_hf else "epsilon", low, high)
    target = _parse_target(args.target)
    if loaded.is_hf:
        ex = hf.image_classification(model, None, x, target, rules=rules, ledger=args.ledger)
        ex.image_mean, ex.image_std = mean, std
    else:
        ex = _image_generic(model, x, target, rules, args.ledger, mean, std, loaded.labels)
    out = args.out or Path("relevance.png")
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out: image explanations are written as .png, .pdf or .svg; got {out}")
    _check_writable(out)
    fig = ex.figure(0, cmap=args.cmap, colorbar=not args.no_colorbar)
    viz.save_figure(fig, out)
    total = float(ex.relevance[0].sum())
    predicted = int(ex.prediction[0])
    pred_name = ex.target_names[0] if predicted == int(ex.target[0]) else (
        loaded.labels[predicted] if loaded.labels else hf._label_names(model, ex.prediction[:1])[0])
    print(f"predicted {pred_name}; explained {ex.target_names[0]} (logit {float(ex.explained[0]):.4g}); "
          f"relevance sum {total:.4g}")
    if ex.ledger is not None:
        print(ex.ledger.summary())
    print(f"wrote {out}")
    return 0


def _label_ids(target: Any, n_classes: int, labels: list[str] | None, default: torch.Tensor) -> torch.Tensor:
    if target is None:
        return default.clone()
    if isinstance(target, str):
        if not labels:
            raise ValueError(f"unknown label {target!r}: the model has no class names; pass a class index")
        matches = [i for i, name in enumerate(labels) if name == target] or \
            [i for i, name in enumerate(labels) if name.lower() == target.lower()]
        if not matches:
            close = [n for n in labels if target.lower() in n.lower()][:8]
            raise ValueError(f"unknown label {target!r}" + (f"; similar: {', '.join(close)}" if close else "")
                             + "; pass a class name or index")
        target = matches[0]
    if not -n_classes <= int(target) < n_classes:
        raise ValueError(f"target {target} is out of range: the model has {n_classes} outputs (0..{n_classes - 1})")
    return torch.tensor([int(target) % n_classes], dtype=torch.long, device=default.device)


def _image_generic(model: nn.Module, x: torch.Tensor, target: Any, rules: Any, ledger: bool, mean: Any, std: Any,
                   labels: list[str] | None) -> Any:
    """Like :func:`dynamiclrp.hf.image_classification` for a model called as ``model(x)``."""
    from .. import hf

    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else x.dtype
    device = params[0].device if params else x.device
    with torch.enable_grad():
        leaf = x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
        logits = model(leaf)
        if not isinstance(logits, torch.Tensor):
            logits = hf._logits(logits)
        if logits.dim() != 2:
            raise UsageError(f"the model returned shape {tuple(logits.shape)}; expected (1, classes) logits")
        pred = logits.argmax(-1)
        if labels is None:
            tgt = hf._label_ids(model, target, 1, logits.shape[1], pred.detach())
        else:
            tgt = _label_ids(target, logits.shape[1], labels, pred.detach())
        value = logits[:, int(tgt[0])]  # one image, one class
    ex = explain(value, leaf, rules=rules, ledger=ledger, model=model)
    names = [labels[int(t)] for t in tgt] if labels else hf._label_names(model, tgt)
    return hf.ImageExplanation(
        relevance=ex.relevance[0].detach().cpu(), pixel_values=leaf.detach().cpu(), target=tgt.cpu(),
        target_names=names, explained=value.detach().cpu(), prediction=pred.cpu(),
        logits=logits.detach().cpu(), rules=str(getattr(rules, "name", rules)), image_mean=mean, image_std=std,
        ledger=ex.ledger)


def _tokenizer(args: argparse.Namespace, loaded: _Loaded) -> Any:
    if args.tokenizer is not None:
        if not args.tokenizer.exists():
            raise UsageError(f"--tokenizer: no such directory: {args.tokenizer}")
        require("transformers", "--tokenizer")
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(args.tokenizer), local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"--tokenizer: cannot load a tokenizer from {args.tokenizer} ({_first_line(err)})") \
                from None
    if loaded.preprocess is not None:
        return loaded.preprocess
    model = loaded.model
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None)
    if vocab is None:
        raise UsageError("a text needs a tokenizer: return (model, tokenizer) from your function or pass --tokenizer")
    if args.model or Path(args.hf or "").is_dir():
        print("note: no tokenizer given; using a word-level stand-in (token ids are arbitrary)", file=sys.stderr)
    return WordTokenizer(int(vocab))


def _task(model: nn.Module) -> str:
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq"
    for suffix, task in (("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
                         ("ForTokenClassification", "token_classification"),
                         ("ForQuestionAnswering", "question_answering"), ("ForMaskedLM", "masked_lm")):
        if name.endswith(suffix):
            return task
    return "sequence_classification"


def _explain_text(args: argparse.Namespace, loaded: _Loaded) -> int:
    from .. import hf

    if not args.text.strip():
        raise UsageError("--text is empty")
    model = loaded.model
    tok = _tokenizer(args, loaded)
    task = _task(model)
    rules = _rules(args.rules, "attnlrp" if loaded.is_hf else "epsilon")
    target = _parse_target(args.target)
    contrast = _parse_target(args.contrast)
    if contrast is not None and task not in ("causal_lm", "seq2seq"):
        raise UsageError("--contrast is for language models (causal LM or seq2seq)")
    if args.question is not None and task != "question_answering":
        raise UsageError(f"--question is for question answering models; this one is a {type(model).__name__}")
    common = {"rules": rules, "ledger": args.ledger}
    if task == "seq2seq":
        ex = hf.seq2seq(model, tok, args.text, target=target, contrast=contrast,
                        decoder_start_token_id=_decoder_start(model, tok), **common)
    elif task == "causal_lm":
        ex = hf.next_token(model, tok, args.text, target=target, contrast=contrast, **common)
    elif task == "token_classification":
        ex = hf.token_classification(model, tok, args.text, args.position or 0, target, **common)
    elif task == "question_answering":
        if args.question is None:
            raise UsageError("question answering needs --question (and the passage as --text)")
        ex = hf.question_answering(model, tok, args.question, args.text, **common)
    elif task == "masked_lm":
        ex = hf.fill_mask(model, tok, args.text, target, position=args.position, **common)
    else:
        ex = hf.text_classification(model, tok, args.text, target, **common)
    out = args.out or Path("relevance.html")
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png", ".pdf", ".svg"):
        raise UsageError(f"--out: text explanations are written as .html, .png, .pdf or .svg; got {out}")
    _check_writable(out)
    if suffix in (".html", ".htm"):
        ex.save_html(out, cmap=args.cmap, merge_words=args.merge_words)
    else:
        ex.save_figure(out, cmap=args.cmap, merge_words=args.merge_words, legend=not args.no_colorbar)
    color = {"auto": None, "always": True, "never": False}[args.color]
    print(f"{ex.task}: explained {ex.target_names[0]} (value {float(ex.explained[0]):.4g})")
    print(ex.terminal(0, color=color, merge_words=args.merge_words))
    if ex.ledger is not None:
        print(ex.ledger.summary())
    print(f"wrote {out}")
    return 0


def _decoder_start(model: nn.Module, tok: Any) -> int:
    for obj in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        v = getattr(obj, "decoder_start_token_id", None)
        if v is not None:
            return int(v)
    pad = getattr(tok, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UsageError(f"--out: {out} is a directory; give a file name")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--out: cannot create directory {parent} ({err})") from None


def run(args: argparse.Namespace) -> int:
    """Run ``dynamiclrp explain``; returns the exit code."""
    from ..errors import DynamicLRPError

    try:
        if args.image is not None and not args.image.is_file():
            raise UsageError(f"--image: {'is a directory' if args.image.is_dir() else 'no such file'}: {args.image}")
        if args.weights is not None and args.hf is not None and not Path(args.weights).is_file():
            raise UsageError(f"--weights: no such file: {args.weights}")
        # optional dependencies first, so that a missing one is reported before any model is built
        require("matplotlib", "dynamiclrp explain")
        if args.image is not None:
            require("PIL.Image", "dynamiclrp explain --image")
        _rules(args.rules, "epsilon", 0.0, 1.0)  # the spec is valid (bounds come later, from the input)
        if args.model is not None:
            loaded = _load_own(args.model, args.weights)
            loaded.is_hf = _is_transformers(loaded.model)
        else:
            loaded = _load_hf(args)
            if args.weights is not None:
                _load_weights(loaded.model, Path(args.weights))
        if not args.no_eval:
            loaded.model.eval()
        elif loaded.model.training:
            print("note: --no-eval: explaining the model in training mode (dropout makes explanations random)",
                  file=sys.stderr)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.image is not None:
            return _explain_image(args, loaded)
        return _explain_text(args, loaded)
    except UsageError as err:
        print(f"dynamiclrp explain: error: {err}", file=sys.stderr)
        return 2
    except MissingExtraError:
        raise  # the command line reports it (one line, exit 2)
    except ValueError as err:  # bad targets, positions, label names
        print(f"dynamiclrp explain: error: {err}", file=sys.stderr)
        return 2
    except (DynamicLRPError, TypeError, RuntimeError) as err:
        print(f"dynamiclrp explain: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
