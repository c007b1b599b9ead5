"""``dynamiclrp explain``: explain one prediction of a model for an image or a text and write a heatmap file.

The model is either your own — ``--model package.module:function`` or ``--model path/to/file.py:function``, where
``function()`` returns a ``torch.nn.Module`` or a pair ``(model, preprocess)`` — or a ``transformers`` architecture
with tiny random weights (``--hf bert``, ``--hf vit``, ``--hf gpt2``...), built offline by :mod:`dynamiclrp.zoo`.

``preprocess`` is, for images, a function from a ``PIL.Image`` to a ``(C, H, W)`` tensor; for texts, a tokenizer.
Without one, images are resized to ``--size`` and scaled to ``[0, 1]`` (then normalised with ``--mean``/``--std``),
and ``--hf`` texts use a word-level tokenizer made up for the random model.

Exit codes: 0 success, 2 bad arguments (missing file, unknown model, target out of range), 1 the explanation
failed (e.g. an operation without a rule).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["add_arguments", "run", "load_model", "WordTokenizer"]


class UsageError(Exception):
    """A problem with the command line: reported without a traceback, exit code 2."""


# ==============================================================================================================
# arguments
# ==============================================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dynamiclrp explain``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.epilog = ("examples:\n"
                     "  dynamiclrp explain --model torchvision.models:resnet18 --image cat.png --target 281\n"
                     "  dynamiclrp explain --model mymodels.py:build --image digit.png --out digit_lrp.png\n"
                     "  dynamiclrp explain --hf bert --text 'a gripping, beautifully shot film' --out bert.html\n"
                     "  dynamiclrp explain --hf gpt2 --text 'The capital of France is' --ledger")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="MODULE:FUNCTION",
                     help="your model: FUNCTION() in an importable module or a .py file returns a torch.nn.Module "
                          "or (model, preprocess)")
    src.add_argument("--hf", metavar="MODEL_TYPE",
                     help="a transformers model type (bert, gpt2, t5, vit, ...) with tiny random weights")
    inp = parser.add_mutually_exclusive_group(required=True)
    inp.add_argument("--image", type=Path, metavar="PATH", help="an image file (PNG, JPEG, ...)")
    inp.add_argument("--text", metavar="TEXT", help="a text")
    parser.add_argument("--target", metavar="T",
                        help="what to explain: a class index or label name (classifiers), a token or token id "
                             "(language models); default: the model's prediction")
    parser.add_argument("--contrast", metavar="T",
                        help="language models: explain 'target rather than this token' (logit difference)")
    parser.add_argument("--position", type=int, metavar="I",
                        help="token classification: index of the token to explain (default 0)")
    parser.add_argument("--rules", default=None,
                        help="rule preset (default: attnlrp for transformers models, epsilon otherwise)")
    parser.add_argument("--out", "-o", type=Path, metavar="PATH",
                        help="output file: .png for images, .html for texts (default: relevance.png / "
                             "relevance.html in the current directory)")
    parser.add_argument("--head", help="--hf only: the head (sequence_classification, causal_lm, seq2seq_lm, "
                                       "image_classification, token_classification ...); default: chosen by type")
    parser.add_argument("--num-labels", type=int, default=None, help="--hf classifiers: number of classes")
    parser.add_argument("--seed", type=int, default=0, help="--hf only: seed of the random weights (default 0)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="a local tokenizer directory (loaded with transformers.AutoTokenizer, offline)")
    parser.add_argument("--size", type=int, default=None,
                        help="images: resize to SIZE x SIZE (default: the model's image size, else 224)")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="images: per-channel mean to subtract")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="images: per-channel std to divide by")
    parser.add_argument("--grayscale", action="store_true", help="images: feed one channel instead of RGB")
    parser.add_argument("--cmap", default="bwr", help="diverging colour map of the heatmap (default bwr)")
    parser.add_argument("--ledger", action="store_true", help="print where the relevance went (the ledger)")


# ==============================================================================================================
# models
# ==============================================================================================================
def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Load ``module:function`` (or ``file.py:function``) and return ``(model, preprocess or None)``.

    Raises
    ------
    UsageError
        The module, file or attribute does not exist, or it does not give a ``torch.nn.Module``.
    """
    if ":" not in spec:
        raise UsageError(f"--model must look like 'package.module:function' or 'path/file.py:function', got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"--model: no such file: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise UsageError(f"--model: cannot import {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise UsageError(f"--model: cannot import module {where!r} ({err}); is it installed or on PYTHONPATH?") \
                from None
    obj = getattr(module, name, None)
    if obj is None:
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:20]
        raise UsageError(f"--model: {where!r} has no attribute {name!r}; callables there: {', '.join(public)}")
    result = obj if isinstance(obj, nn.Module) else obj()
    preprocess = None
    if isinstance(result, tuple):
        if len(result) != 2:
            raise UsageError(f"--model: {spec}() returned a tuple of {len(result)}; "
                             "return model or (model, preprocess)")
        result, preprocess = result
    if not isinstance(result, nn.Module):
        raise UsageError(f"--model: {spec} gave a {type(result).__name__}, not a torch.nn.Module")
    return result, preprocess


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


class WordTokenizer:
    """A stand-in tokenizer for models with random weights: lower-cased words hashed into the vocabulary.

    It has the parts of a ``transformers`` tokenizer that :mod:`dynamiclrp.hf` uses (``__call__`` with padding,
    ``convert_ids_to_tokens``, ``decode``, ``all_special_ids``, ``pad_token_id``). Token ids mean nothing: use a
    real tokenizer (``--tokenizer``) for a trained model.
    """

    def __init__(self, vocab_size: int, bos_token_id: int | None = None) -> None:
        self.vocab_size = int(vocab_size)
        self.pad_token_id = 0
        self.bos_token_id = bos_token_id
        self.all_special_ids = [0] + ([bos_token_id] if bos_token_id is not None else [])
        self._words: dict[int, str] = {0: "<pad>"}
        if bos_token_id is not None:
            self._words[bos_token_id] = "<s>"

    def _id(self, word: str) -> int:
        low = 4
        high = min(self.vocab_size, 100) if self.vocab_size > 8 else self.vocab_size
        i = low + zlib.crc32(word.lower().encode()) % max(1, high - low)
        self._words.setdefault(i, word)
        return i

    def __call__(self, texts: Any, text_pair: Any = None, add_special_tokens: bool = True, **_: Any) -> dict:
        batch = [texts] if isinstance(texts, str) else list(texts)
        rows = [([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else [])
                + [self._id(w) for w in str(t).split()] for t in batch]
        if isinstance(texts, str) and _.get("return_tensors") is None:
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


def _image_tensor(path: Path, preprocess: Any, size: int, channels: int, mean: Any, std: Any) -> Any:
    if not path.exists():
        raise UsageError(f"--image: no such file: {path}")
    if path.is_dir():
        raise UsageError(f"--image: {path} is a directory; give an image file")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # pragma: no cover
        raise UsageError("images need Pillow: pip install dynamiclrp[viz]") from err
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"--image: cannot read {path} as an image ({err})") from None
    img = img.convert("L" if channels == 1 else "RGB")
    if preprocess is not None:
        x = preprocess(img)
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"the preprocess function returned {type(x).__name__}; it must return a tensor")
        return (x if x.dim() == 4 else x.unsqueeze(0)), None, None
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    import numpy as np

    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else [0.0] * x.shape[0]).reshape(-1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0] * x.shape[0]).reshape(-1, 1, 1)
        if m.shape[0] not in (1, x.shape[0]) or s.shape[0] not in (1, x.shape[0]):
            raise UsageError(f"--mean/--std need 1 or {x.shape[0]} values")
        x = (x - m) / s
    return x.unsqueeze(0), mean, std


def _explain_image(args: argparse.Namespace, model: nn.Module, preprocess: Any, is_hf: bool, rules: Any) -> int:
    from . import hf, viz

    cfg = getattr(model, "config", None)
    size = args.size or getattr(cfg, "image_size", None) or 224
    size = size if isinstance(size, int) else int(size[0]) if isinstance(size, (list, tuple)) else int(
        size.get("height", 224))
    channels = 1 if args.grayscale else int(getattr(cfg, "num_channels", 3) or 3)
    mean, std = args.mean, args.std
    if is_hf and preprocess is None and mean is None and std is None:
        mean, std = [0.5] * channels, [0.5] * channels  # the usual ViT-style processor default
    x, mean, std = _image_tensor(args.image, preprocess if not is_hf else None, size, channels, mean, std)
    if is_hf:
        processor = preprocess if preprocess is not None and callable(getattr(preprocess, "__call__", None)) and \
            hasattr(preprocess, "image_mean") else None
        ex = hf.image_classification(model, None if processor is None else processor,
                                     x if processor is None else _pil(args.image), _parse_target(args.target),
                                     rules=rules, ledger=args.ledger)
        if processor is None:
            ex.image_mean, ex.image_std = mean, std
    else:
        ex = _image_generic(model, x, _parse_target(args.target), rules, args.ledger, mean, std)
    out = args.out or Path("relevance.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: image explanations are written as PNG; got {out}")
    _check_writable(out)
    img = ex.image(0)
    heat = ex.heatmap(0, cmap=args.cmap)
    over = ex.overlay(0, cmap=args.cmap, alpha=0.8, magnitude_weighted=True)
    fig = viz.grid([img, heat, over], ncols=3, titles=["input", f"relevance for {ex.target_names[0]}", "overlay"],
                   cell_size=3.0)
    viz.save_png(fig, out)
    total = float(ex.relevance[0].sum())
    print(f"predicted {ex.target_names[0] if int(ex.prediction[0]) == int(ex.target[0]) else int(ex.prediction[0])}; "
          f"explained {ex.target_names[0]} (logit {float(ex.explained[0]):.4g}); relevance sum {total:.4g}")
    if ex.ledger is not None:
        print(ex.ledger.summary())
    print(f"wrote {out}")
    return 0


def _pil(path: Path) -> Any:
    from PIL import Image

    return Image.open(path).convert("RGB")


def _image_generic(model: nn.Module, x: torch.Tensor, target: Any, rules: Any, ledger: bool, mean: Any, std: Any
                   ) -> Any:
    """Like :func:`dynamiclrp.hf.image_classification` for a model called as ``model(x)``."""
    import dynamiclrp
    from . import hf

    if getattr(model, "training", False):
        print("note: the model is in training mode; explaining in that mode (call model.eval() in your function)",
              file=sys.stderr)
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
        tgt = hf._label_ids(model, target, 1, logits.shape[1], pred.detach())
        value = logits.gather(1, tgt[:, None]).squeeze(1)
    ex = dynamiclrp.explain(value, leaf, rules=rules, ledger=ledger, model=model)
    return hf.ImageExplanation(
        relevance=ex.relevance[0].detach().cpu(), pixel_values=leaf.detach().cpu(), target=tgt.cpu(),
        target_names=hf._label_names(model, tgt), explained=value.detach().cpu(), prediction=pred.cpu(),
        logits=logits.detach().cpu(), rules=str(rules), image_mean=mean, image_std=std, ledger=ex.ledger)


def _tokenizer(args: argparse.Namespace, model: nn.Module, preprocess: Any) -> Any:
    if args.tokenizer is not None:
        if not args.tokenizer.exists():
            raise UsageError(f"--tokenizer: no such directory: {args.tokenizer}")
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(args.tokenizer), local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"--tokenizer: cannot load a tokenizer from {args.tokenizer} ({err})") from None
    if preprocess is not None:
        return preprocess
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None)
    if vocab is None:
        raise UsageError("a text needs a tokenizer: return (model, tokenizer) from your function or pass --tokenizer")
    if not args.hf:
        print("note: no tokenizer given; using a word-level stand-in (token ids are arbitrary)", file=sys.stderr)
    return WordTokenizer(int(vocab))


def _explain_text(args: argparse.Namespace, model: nn.Module, preprocess: Any, rules: Any) -> int:
    from . import hf

    if not args.text.strip():
        raise UsageError("--text is empty")
    tok = _tokenizer(args, model, preprocess)
    name = type(model).__name__
    target = _parse_target(args.target)
    contrast = _parse_target(args.contrast)
    if contrast is not None and not name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        raise UsageError("--contrast is for language models (causal LM or seq2seq)")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        ex = hf.seq2seq(model, tok, args.text, target=target, contrast=contrast, rules=rules, ledger=args.ledger,
                        decoder_start_token_id=_decoder_start(model, tok))
    elif name.endswith(("ForCausalLM", "LMHeadModel")):
        ex = hf.next_token(model, tok, args.text, target=target, contrast=contrast, rules=rules, ledger=args.ledger)
    elif name.endswith("ForTokenClassification"):
        ex = hf.token_classification(model, tok, args.text, args.position or 0, target, rules=rules,
                                     ledger=args.ledger)
    elif name.endswith("ForQuestionAnswering"):
        raise UsageError("question answering needs a question and a context; use dynamiclrp.hf.question_answering "
                         "from Python")
    else:
        ex = hf.text_classification(model, tok, args.text, target, rules=rules, ledger=args.ledger)
    out = args.out or Path("relevance.html")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out: text explanations are written as HTML; got {out}")
    _check_writable(out)
    ex.save_html(out, cmap=args.cmap)
    print(f"{ex.task}: explained {ex.target_names[0]} (value {float(ex.explained[0]):.4g})")
    print(ex.terminal(0))
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
    from . import presets
    from .errors import DynamicLRPError

    try:
        if args.image is not None and not args.image.is_file():
            raise UsageError(f"--image: {'is a directory' if args.image.is_dir() else 'no such file'}: {args.image}")
        if args.rules is not None and args.rules not in presets.names():
            raise UsageError(f"--rules: unknown preset {args.rules!r}; choose one of {', '.join(presets.names())}")
        if args.model is not None:
            model, preprocess = load_model(args.model)
            is_hf = _is_transformers(model)
        else:
            from . import zoo

            overrides = {} if args.num_labels is None else {"num_labels": args.num_labels}
            head = args.head
            if head is None and args.image is not None:
                head = "image_classification"
            try:
                entry = zoo.build_hf(args.hf, head=head, seed=args.seed, **overrides)
            except (ValueError, KeyError) as err:
                raise UsageError(f"--hf {args.hf}: {err.args[0] if err.args else err}") from None
            model, preprocess, is_hf = entry.model, None, True
        rules = args.rules or ("attnlrp" if is_hf else "epsilon")
        if args.image is not None:
            return _explain_image(args, model, preprocess, is_hf, rules)
        return _explain_text(args, model, preprocess, rules)
    except UsageError as err:
        print(f"dynamiclrp explain: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad targets, positions, label names
        print(f"dynamiclrp explain: error: {err}", file=sys.stderr)
        return 2
    except (DynamicLRPError, TypeError, RuntimeError) as err:
        print(f"dynamiclrp explain: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
