"""Dataset-scale attribution: one job from a laptop to a ``torchrun`` cluster, written to a Zarr store.

:func:`attribute_dataset` explains every sample of a dataset with one :class:`~dynamiclrp.Explainer` (plans are
cached across batches) and writes, per sample, the relevance (optionally reduced), the explained target, the
explained logit, the prediction, the label, and the relevance total; per batch, the ledger's unaccounted share.

Store
-----
A Zarr v3 group (chunked, Blosc/zstd-compressed), readable with plain ``zarr`` or ``xarray.open_zarr`` without
dynamiclrp. Samples are explained in batches of ``batch_size``; ``k`` consecutive batches form a *block*
(``chunk_size = k·batch_size`` samples), which is exactly one chunk of every per-sample array, so no two processes
ever write the same chunk file. Arrays:

==================  =======================  ===============================================================
name                shape                    content
==================  =======================  ===============================================================
``relevance``       ``(N, *shape)``          relevance of each sample (after ``reduce``, in ``dtype``)
``target``          ``(N,)`` int64           the class that was explained
``logit``           ``(N,)`` float32         the explained output (the seed of the explanation)
``prediction``      ``(N,)`` int64           ``argmax`` of the model's scores
``label``           ``(N,)`` int64           the dataset's label, ``-1`` where there is none
``relevance_sum``   ``(N,)`` float64         Σ of the unreduced relevance (conservation: compare ``logit``)
``batch_seed``      ``(batches,)`` float64   the ledger's seed total of each batch (NaN: no ledger there)
``batch_unaccounted`` ``(batches,)`` float64 the ledger's unaccounted relevance of each batch (NaN: no ledger)
``block_done``      ``(blocks,)`` uint8      1 once every array of the block is written (its commit flag)
==================  =======================  ===============================================================

With ``concepts=[layer, ...]`` (Concept Relevance Propagation's reference samples, :mod:`dynamiclrp.concepts`), the
group ``concepts/<layer>`` of each layer holds ``relevance`` ``(N, units)`` float32 (the relevance of every
channel/neuron of the layer for the explained output, summed over its positions) and ``activation`` ``(N, units)``
float32 (its largest activation), from the same relevance pass as the heatmaps.

The group attribute ``"dynamiclrp"`` holds the job (rules, model class and parameter hash, target, reduction, dtype,
batch size, seed, library versions) and, once finished, the summary.

Resuming
--------
Each block is committed by writing its ``block_done`` flag after its data (every chunk write is atomic: a temporary
file renamed into place). A killed job leaves finished blocks flagged and unfinished ones unflagged; running the
same job again checks that the store was written by the same job (same model parameters, rules, data size...)
and computes exactly the unflagged blocks. A block computed twice (killed between data and flag) is overwritten
with identical values, so no sample is lost or duplicated.

Distributed
-----------
Under ``torchrun`` (or any initialised ``torch.distributed`` process group) rank 0 opens or creates the store and
broadcasts the list of unfinished blocks; rank ``r`` of ``W`` explains every ``W``-th of them. A batch's samples and
random seed do not depend on the rank that explains it, so the store equals the
single-process one bit for bit (with the same kernels: same thread count on CPUs, deterministic algorithms on
GPUs). The few messages (plan, counts, summary) travel over ``gloo``, also inside an NCCL process group.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
import platform
import queue
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .api import Explainer
from .conditions import Layer, Unit, layer_key, resolve_keys, unit_dim, unit_maxima, unit_totals
from .errors import StoreError

__all__ = ["attribute_dataset", "open_store", "AttributionSummary", "StoreError", "FORMAT", "FORMAT_VERSION",
           "reduce_relevance"]

#: Value of the ``format`` key in the store's ``"dynamiclrp"`` attribute.
FORMAT = "dynamiclrp.relevance-store"
#: Version of the store layout described in this module's docstring.
FORMAT_VERSION = 1

Target = Literal["predicted", "label"] | int | Callable[[Tensor, Tensor | None], Tensor]

_LABEL_KEYS = ("label", "labels", "label_ids", "target", "targets")
_INPUT_KEYS = ("pixel_values", "input_values", "input_features", "inputs_embeds", "input_ids", "x", "input",
               "inputs", "image", "images")
_SAMPLE_ARRAYS = ("relevance", "target", "logit", "prediction", "label", "relevance_sum")
_BATCH_ARRAYS = ("batch_seed", "batch_unaccounted")
_CHUNK_SAMPLES = 512  # default chunk: about this many samples ...
_CHUNK_BYTES = 32 << 20  # ... but at most this much uncompressed relevance (and at least one batch)
_MIN_BLOCKS = 16  # ... and at least this many blocks, when the data has a length



# ==============================================================================================================
# results
# ==============================================================================================================
@dataclass(frozen=True)
class AttributionSummary:
    """What :func:`attribute_dataset` did.

    Attributes
    ----------
    path : str
        The store.
    n_samples : int
        Samples in the store (all of them are explained when the job returns).
    n_computed : int
        Samples explained by this run, over all ranks (the rest were already in the store: resumed).
    seconds : float
        Wall-clock time of this run (rank 0's, from start to the store being final).
    samples_per_second : float
        ``n_computed / seconds``.
    mean_abs_unaccounted : float
        Mean over the ledger batches of ``|unaccounted| / |seed|`` (NaN when no block had a ledger).
    ledger_batches : int
        Number of batches with a ledger.
    store_bytes : int
        Size of the store on disk.
    world_size : int
        Number of processes that ran the job.
    """

    path: str
    n_samples: int
    n_computed: int
    seconds: float
    samples_per_second: float
    mean_abs_unaccounted: float
    ledger_batches: int
    store_bytes: int
    world_size: int

    def __str__(self) -> str:
        unacc = ("no ledger" if self.ledger_batches == 0
                 else f"{self.mean_abs_unaccounted:.3g} of the seed (over {self.ledger_batches} ledger batches)")
        resumed = self.n_samples - self.n_computed
        return "\n".join([
            f"relevance store       {self.path}",
            f"samples               {self.n_samples} ({self.n_computed} explained now"
            + (f", {resumed} already in the store" if resumed else "") + ")",
            f"time                  {self.seconds:.2f} s, {self.samples_per_second:.1f} samples/s"
            + (f" on {self.world_size} processes" if self.world_size > 1 else ""),
            f"mean |unaccounted|    {unacc}",
            f"store size            {_human_bytes(self.store_bytes)}",
        ])


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# ==============================================================================================================
# optional dependencies
# ==============================================================================================================
def _zarr() -> Any:
    from .extras import require
    zarr = require("zarr", "dataset attribution")
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"dataset attribution needs zarr>=3 (Zarr format 3), found {zarr.__version__}: "
                          'pip install -U "dynamiclrp[data]"')
    return zarr


def _tqdm(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is optional
        return None
    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, smoothing=0.1)


# ==============================================================================================================
# reduction
# ==============================================================================================================
def reduce_relevance(relevance: Tensor, reduce: str | Callable[[Tensor], Tensor] | None) -> Tensor:
    """Reduce a batch of relevance ``(N, ...)`` for storage; sums, so relevance stays conserved.

    Parameters
    ----------
    relevance : torch.Tensor
        Relevance of a batch, samples along dimension 0.
    reduce : None, str or callable
        ``None`` keeps it. A string of steps joined by ``+``, applied left to right:

        - ``"channels"``: sum over dimension 1 (``(N, C, H, W) -> (N, H, W)``);
        - ``"hidden"``: sum over the last dimension (token embeddings ``(N, L, D) -> (N, L)``);
        - ``"pool<k>"``: sum over ``k × k`` windows of the last two dimensions (zero-padded to a multiple of k).

        E.g. ``"channels+pool4"``. A callable maps the ``(N, ...)`` tensor to an ``(N, ...)`` tensor.

    Returns
    -------
    torch.Tensor
    """
    if reduce is None:
        return relevance
    if callable(reduce):
        out = reduce(relevance)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != relevance.shape[0]:
            raise ValueError("reduce=callable must return a tensor with the samples along dimension 0, "
                             f"shape ({relevance.shape[0]}, ...); got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out
    for step, k in _reduce_steps(str(reduce)):
        if step == "channels":
            if relevance.dim() < 3:
                raise ValueError(f"reduce='channels' sums dimension 1 of (N, C, ...) relevance, got shape "
                                 f"{tuple(relevance.shape)}; use 'hidden' for (N, tokens, hidden)")
            relevance = relevance.sum(1)
        elif step == "hidden":
            if relevance.dim() < 2:
                raise ValueError(f"reduce='hidden' needs (N, ..., D) relevance, got {tuple(relevance.shape)}")
            relevance = relevance.sum(-1)
        else:  # pool<k>
            if relevance.dim() < 3:
                raise ValueError(f"reduce='{step}' pools the last two dimensions of (N, ..., H, W) relevance, got "
                                 f"shape {tuple(relevance.shape)}")
            *lead, h, w = relevance.shape
            ph, pw = -h % k, -w % k
            if ph or pw:
                relevance = torch.nn.functional.pad(relevance, (0, pw, 0, ph))
                h, w = h + ph, w + pw
            relevance = relevance.reshape(*lead, h // k, k, w // k, k).sum((-3, -1))
    return relevance


def _reduce_steps(spec: str) -> list[tuple[str, int]]:
    steps = []
    for step in spec.split("+"):
        step = step.strip()
        if step in ("channels", "hidden"):
            steps.append((step, 0))
        elif step.startswith("pool") and step[4:].isdigit() and int(step[4:]) >= 1:
            steps.append((step, int(step[4:])))
        else:
            raise ValueError(f"unknown reduce step {step!r} in {spec!r}: use 'channels', 'hidden', 'pool<k>' "
                             "(e.g. 'pool4') joined by '+', None, or a callable")
    return steps


def _describe(obj: Any) -> Any:
    """A JSON-able description of an argument (callables by qualified name)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return repr(obj)


# ==============================================================================================================
# model helpers (read only: the model is never modified)
# ==============================================================================================================
def parameter_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in named:
            t = t.detach()
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            data = t.cpu().contiguous()
            if data.numel():
                h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _input_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    return value


def _accepted_kwargs(model: nn.Module) -> set[str] | None:
    """Keyword arguments ``model.forward`` accepts (``None``: anything, it has ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _scores(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model returned a {type(output).__name__}; expected a tensor of scores (N, classes), an "
                    "output with .logits, or a tuple whose first element is the scores. Pass forward=... to "
                    "compute the scores yourself")


def _leaf(x: Tensor, device: torch.device) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"the attributed input has dtype {x.dtype}; relevance needs a floating-point input. For "
                        "token ids use a dict batch with 'input_ids' (attributed to the input embeddings) or "
                        "pass forward=...")
    return x.detach().to(device).requires_grad_(True)


def _batch_size_of(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim():
                return int(v.shape[0])
        for v in batch.values():
            if isinstance(v, (list, tuple)):
                return len(v)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size_of(batch[0])
    raise TypeError(f"cannot tell the number of samples in a batch of type {type(batch).__name__}; batches must "
                    "be tensors, (input, label) tuples or dicts of tensors")


def _labels_of(batch: Any) -> Tensor | None:
    y = None
    if isinstance(batch, Mapping):
        for k in _LABEL_KEYS:
            if k in batch:
                y = batch[k]
                break
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        y = batch[1]
    if y is None:
        return None
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.is_floating_point() or y.is_complex():
        return None  # not a class label per sample (e.g. a regression target): stored as -1
    return y


def _prepare(model: nn.Module, batch: Any, inputs: str | None, device: torch.device
             ) -> tuple[Tensor, Tensor, str]:
    """Run the model on one batch; return ``(scores, attributed input, what it is)``."""
    if isinstance(batch, Tensor):
        x = _leaf(batch, device)
        return _scores(model(x)), x, "input"
    if isinstance(batch, (list, tuple)):
        if not 1 <= len(batch) <= 2:
            raise TypeError(f"tuple batches must be (input,) or (input, label), got {len(batch)} elements; use "
                            "dict batches (keyword arguments of the model) or pass forward=...")
        if not isinstance(batch[0], Tensor):
            raise TypeError(f"the input of a tuple batch must be a tensor, got {type(batch[0]).__name__}")
        x = _leaf(batch[0], device)
        return _scores(model(x)), x, "input"
    if isinstance(batch, Mapping):
        key = inputs
        if key is None:
            key = next((k for k in _INPUT_KEYS if k in batch), None)
            if key is None:
                raise KeyError(f"no input key found in the batch (keys {sorted(batch)}); pass inputs='<key>' to "
                               "name the tensor to attribute")
        elif key not in batch:
            raise KeyError(f"inputs={key!r} is not a key of the batch (keys {sorted(batch)})")
        accepted = _accepted_kwargs(model)
        kwargs = {k: v for k, v in batch.items()
                  if k not in _LABEL_KEYS and k != key and (accepted is None or k in accepted)}
        kwargs = {k: _to(v, device) for k, v in kwargs.items()}
        value = torch.as_tensor(batch[key])
        if value.is_floating_point():
            x = _leaf(value, device)
            kwargs[key] = x
            what = key
        else:
            if key != "input_ids":
                raise TypeError(f"inputs={key!r} holds integers; only 'input_ids' can be attributed through the "
                                "input embeddings. Pass forward=... for other integer inputs")
            get = getattr(model, "get_input_embeddings", None)
            if get is None:
                raise TypeError("the batch has token ids but the model has no get_input_embeddings(): pass "
                                "forward=... returning (scores, embeddings)")
            table = get()
            weight = getattr(table, "weight", None)
            where = weight.device if isinstance(weight, Tensor) else device
            # The lookup runs outside the graph: the embeddings are a fresh leaf, so a frozen model works too.
            with torch.no_grad():
                emb = table(value.to(where))
            x = emb.detach().requires_grad_(True)
            kwargs["inputs_embeds"] = x
            what = "input embeddings (of input_ids)"
        return _scores(model(**kwargs)), x, what
    raise TypeError(f"unsupported batch type {type(batch).__name__}: batches must be tensors, (input, label) "
                    "tuples or dicts of tensors, or pass forward=...")


def _targets(target: Any, scores: Tensor, labels: Tensor | None) -> Tensor:
    n, c = scores.shape
    if isinstance(target, str):
        if target == "predicted":
            t = scores.detach().argmax(1)
        elif target == "label":
            if labels is None:
                raise ValueError("target='label' but the batch has no labels (a (input, label) tuple or a dict "
                                 f"with one of {list(_LABEL_KEYS)}); use target='predicted'")
            t = labels
        else:
            raise ValueError(f"unknown target {target!r}: use 'predicted', 'label', a class index or a callable")
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = torch.full((n,), int(target), dtype=torch.long)
    elif callable(target):
        t = target(scores.detach(), labels)
        if not isinstance(t, Tensor):
            t = torch.as_tensor(t)
    else:
        raise TypeError(f"target must be 'predicted', 'label', an int or a callable, got {type(target).__name__}")
    t = t.to(device=scores.device, dtype=torch.long).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"target gives {t.shape[0]} classes for a batch of {n} samples")
    if n and (int(t.min()) < 0 or int(t.max()) >= c):
        raise ValueError(f"target class out of range: got {int(t.min())}..{int(t.max())}, the model has {c} "
                         "outputs per sample")
    return t


# ==============================================================================================================
# data sources: batches with a global index
# ==============================================================================================================
class _MapSource:
    """A map-style dataset (random access): batches are loaded by index, so each rank loads only its own."""

    def __init__(self, dataset: Any, batch: int, collate_fn: Any, num_workers: int, pin_memory: bool) -> None:
        self.dataset, self.batch = dataset, batch
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory
        self.n_samples: int | None = len(dataset)
        if not self.n_samples:
            raise ValueError("the dataset is empty: nothing to explain")
        self.n_batches: int | None = math.ceil(self.n_samples / batch)
        self.seen: int | None = None

    def describe(self) -> dict:
        return {"kind": "map", "type": _describe(type(self.dataset)), "n_samples": self.n_samples}

    def first(self) -> Any:
        return next(iter(self.batches([0])))[1]

    def batches(self, ids: Sequence[int]) -> Iterator[tuple[int, Any]]:
        """The batches ``ids`` (ascending), with their index."""
        from torch.utils.data import DataLoader, TensorDataset
        from torch.utils.data._utils.collate import default_collate
        n, size = self.n_samples, self.batch
        assert n is not None
        if not ids:
            return iter(())
        if self.collate_fn is default_collate and isinstance(self.dataset, (Tensor, TensorDataset)):
            # slicing gives the same batch as collating rows, without a Python call per sample
            tensors = self.dataset.tensors if isinstance(self.dataset, TensorDataset) else None

            def sliced(i: int) -> Any:
                sl = slice(i * size, min(n, (i + 1) * size))
                return self.dataset[sl] if tensors is None else [t[sl] for t in tensors]

            return ((i, sliced(i)) for i in ids)
        sampler = [list(range(i * size, min(n, (i + 1) * size))) for i in ids]
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory)
        return zip(ids, loader)


class _StreamSource:
    """An iterable of batches (a DataLoader over an IterableDataset, a generator...).

    Every rank iterates the whole stream and explains only the batches of its blocks. All batches but the last
    must have the same size.
    """

    def __init__(self, data: Iterable, batch_size: int | None) -> None:
        self.data = data
        self.n_samples: int | None = None
        try:
            self.n_batches: int | None = len(data)  # type: ignore[arg-type]
        except TypeError:
            self.n_batches = None
        self.batch: int | None = batch_size
        self._it: Iterator | None = None
        self._first: Any = None
        self.seen: int | None = None  # samples in the stream, once iterated to the end

    def describe(self) -> dict:
        return {"kind": "stream", "type": _describe(type(self.data)), "n_batches": self.n_batches}

    def first(self) -> Any:
        if self._it is None:
            self._it = iter(self.data)
            try:
                self._first = next(self._it)
            except StopIteration:
                raise ValueError("the data is empty: nothing to explain") from None
            n = _batch_size_of(self._first)
            if self.batch is not None and self.batch != n:
                raise ValueError(f"the data yields batches of {n} samples but batch_size={self.batch}; batch_size "
                                 "only re-batches map-style datasets: leave it out for an iterable of batches")
            self.batch = n
        return self._first

    def batches(self, want: Callable[[int], bool]) -> Iterator[tuple[int, Any]]:
        """Every batch ``i`` of the stream with ``want(i)``, with its index."""
        first = self.first()
        it = self._it
        self._it = self._first = None
        size = self.batch
        assert it is not None and size is not None

        def chain() -> Iterator[Any]:
            yield first
            yield from it

        seen, last = 0, None
        for i, batch in enumerate(chain()):
            n = _batch_size_of(batch)
            if last is not None and last != size:
                raise ValueError(f"batch {i - 1} of the data has {last} samples, but every batch except the last "
                                 f"must have {size} (the first batch's size): use a DataLoader with a fixed "
                                 "batch_size, or pass a map-style Dataset and batch_size=")
            if n > size:
                raise ValueError(f"batch {i} of the data has {n} samples, more than the first batch's {size}")
            if self.n_batches is not None and i >= self.n_batches:
                raise ValueError(f"the data yielded more batches than its len() = {self.n_batches}")
            last = n
            seen += n
            if want(i):
                yield i, batch
        self.seen = seen


def _make_source(data: Any, batch_size: int | None, collate_fn: Any, num_workers: int) -> Any:
    from torch.utils.data import DataLoader, IterableDataset, SequentialSampler
    from torch.utils.data._utils.collate import default_collate

    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return _StreamSource(data, batch_size)
        if not isinstance(data.sampler, SequentialSampler) or data.batch_sampler is None:
            raise ValueError("the DataLoader shuffles or uses a custom sampler, so its order is not stable across "
                             "runs and ranks (needed to resume and to shard): pass its dataset, or a DataLoader "
                             "with shuffle=False")
        bs = batch_size if batch_size is not None else data.batch_size
        return _MapSource(data.dataset, int(bs or 1), collate_fn or data.collate_fn,
                          num_workers if num_workers else data.num_workers, data.pin_memory)
    if type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "with_format"):
        data = data.with_format("torch")  # a Hugging Face datasets.Dataset: a new view, the user's is unchanged
    if isinstance(data, Tensor) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                    and not isinstance(data, (IterableDataset, list, tuple, Mapping, str))):
        return _MapSource(data, int(batch_size or 64), collate_fn or default_collate, num_workers, False)
    if isinstance(data, (Mapping, str)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a Dataset, a DataLoader, a datasets.Dataset or an iterable of batches, got "
                        f"{type(data).__name__}")
    return _StreamSource(data, batch_size)


# ==============================================================================================================
# distributed
# ==============================================================================================================
class _Group:
    """The processes of the job: torch.distributed if running (initialised here under torchrun), else one.

    The job only exchanges a few small Python objects (the plan, counts, the summary), always over ``gloo``: a group
    it initialises itself is ``gloo``, and in a process group initialised with another backend (NCCL) it makes a
    ``gloo`` subgroup.
    """

    def __init__(self) -> None:
        self.rank, self.world, self.created, self.group, self.dist = 0, 1, False, None, None
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover
            return
        if not dist.is_available():  # pragma: no cover
            return
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")  # launched by torchrun without a process group of its own
            self.created = True
        if dist.is_initialized():
            self.dist = dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.group is not None:
            self.dist.destroy_process_group(self.group)
        if self.created:
            self.dist.destroy_process_group()


# ==============================================================================================================
# the store
# ==============================================================================================================
def _versions(model: nn.Module) -> dict:
    from .version import __version__
    v = {"dynamiclrp": __version__, "torch": torch.__version__, "numpy": np.__version__,
         "python": platform.python_version()}
    try:
        v["zarr"] = _zarr().__version__
    except ImportError:  # pragma: no cover
        pass
    if type(model).__module__.startswith("transformers"):
        import transformers
        v["transformers"] = transformers.__version__
    return v


def _local_path(out: Any) -> Path | None:
    s = os.fspath(out)
    return None if "://" in s else Path(s)


def _store_bytes(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass(frozen=True)
class _Layout:
    """Samples -> batches -> blocks. A block (``k`` batches) is one chunk of every array and the unit of commit."""

    batch: int  # samples per batch
    k: int  # batches per block

    @property
    def chunk(self) -> int:
        return self.batch * self.k

    def block_of(self, i: int) -> int:
        return i // self.k

    def batches_of(self, b: int, n_batches: int | None) -> range:
        stop = (b + 1) * self.k
        return range(b * self.k, stop if n_batches is None else min(stop, n_batches))


def _sample_arrays(schema: Mapping[str, Any]) -> tuple[str, ...]:
    """Every per-sample array of a store: the fixed ones and those of its concept layers."""
    return (*_SAMPLE_ARRAYS, *schema.get("concept_arrays", {}))


class _Store:
    def __init__(self, group: Any, layout: _Layout, n_blocks: int, sample: Sequence[str] = _SAMPLE_ARRAYS) -> None:
        self.sample = tuple(sample)
        self.arrays = {name: group[name] for name in (*self.sample, *_BATCH_ARRAYS, "block_done")}
        self.layout, self.n_blocks = layout, n_blocks

    def ensure(self, b: int) -> None:
        """Grow the arrays (single-process streams of unknown length only) so that block ``b`` fits."""
        if b < self.n_blocks:
            return
        nb = max(b + 1, 2 * self.n_blocks)
        for name, arr in self.arrays.items():
            n = nb if name == "block_done" else nb * (self.layout.k if name in _BATCH_ARRAYS else self.layout.chunk)
            arr.resize((n, *arr.shape[1:]))
        self.n_blocks = nb

    def write(self, b: int, result: dict, pool: Any = None) -> None:
        """Write block ``b``: its data (in parallel over the arrays), then its commit flag."""
        self.ensure(b)
        start = b * self.layout.chunk
        stop = start + len(result["target"])
        first = b * self.layout.k
        jobs = [(name, slice(start, stop)) for name in self.sample]
        if not np.isnan(result["batch_unaccounted"]).all():  # no ledger in this block: the fill value (NaN) stays
            jobs += [(name, slice(first, first + len(result[name]))) for name in _BATCH_ARRAYS]

        def put(job: tuple[str, slice]) -> None:
            self.arrays[job[0]][job[1]] = result[job[0]]

        if pool is None:
            for job in jobs:
                put(job)
        else:
            list(pool.map(put, jobs))
        self.arrays["block_done"][b] = 1  # the commit: written last, after every data chunk of the block


class _Writer:
    """Writes blocks in a background thread (in order, each committed last) while the next block is explained."""

    def __init__(self, store: _Store, depth: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dynamiclrp-store")
        self.thread = threading.Thread(target=self._loop, name="dynamiclrp-store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write(*item, pool=self.pool)
                except BaseException as err:  # noqa: BLE001 - re-raised in the job's thread
                    self.error = err

    def _check(self) -> None:
        if self.error is not None:
            raise StoreError(f"writing the relevance store failed: {type(self.error).__name__}: {self.error}") \
                from self.error

    def put(self, b: int, result: dict) -> None:
        self._check()
        self.queue.put((b, result))

    def close(self) -> None:
        """Wait until every queued block is written and committed."""
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown()
        self._check()


def _create_store(zarr: Any, out: Any, job: dict, schema: dict, layout: _Layout, n_blocks: int) -> Any:
    from zarr.codecs import BloscCodec
    compress = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    group = zarr.open_group(out, mode="w", zarr_format=3)
    group.attrs["dynamiclrp"] = {"format": FORMAT, "format_version": FORMAT_VERSION, "ready": False}
    n, chunk = n_blocks * layout.chunk, layout.chunk
    rel_shape = tuple(schema["shape"])
    dims = ("sample", *(f"relevance_{i + 1}" for i in range(len(rel_shape))))
    group.create_array("relevance", shape=(n, *rel_shape), chunks=(chunk, *rel_shape), dtype=schema["dtype"],
                       fill_value=0, compressors=compress, dimension_names=dims)
    sample = {"target": ("int64", -1), "logit": ("float32", float("nan")), "prediction": ("int64", -1),
              "label": ("int64", -1), "relevance_sum": ("float64", float("nan"))}
    for name, (dtype, fill) in sample.items():
        group.create_array(name, shape=(n,), chunks=(chunk,), dtype=dtype, fill_value=fill, compressors=compress,
                           dimension_names=("sample",))
    for name, units in schema.get("concept_arrays", {}).items():
        group.create_array(name, shape=(n, units), chunks=(chunk, units), dtype="float32", fill_value=float("nan"),
                           compressors=compress, dimension_names=("sample", "unit"))
    for name in _BATCH_ARRAYS:
        group.create_array(name, shape=(n_blocks * layout.k,), chunks=(layout.k,), dtype="float64",
                           fill_value=float("nan"), compressors=None, dimension_names=("batch",))
    # one chunk per block: ranks commit their blocks without touching each other's files
    group.create_array("block_done", shape=(n_blocks,), chunks=(1,), dtype="uint8", fill_value=0,
                       compressors=None, dimension_names=("block",))
    group.attrs["dynamiclrp"] = {"format": FORMAT, "format_version": FORMAT_VERSION, "ready": True,
                                 "complete": False, "job": job, "schema": schema}
    return group


def _job_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: store has {old.get(k)!r}, this job has {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _clean_partial(path: Path | None) -> None:
    """Remove temporary files of chunk writes interrupted by a kill (Zarr writes ``*.partial`` then renames)."""
    if path is None or not path.is_dir():
        return
    for f in path.rglob("*.partial"):
        f.unlink(missing_ok=True)


def open_store(path: str | os.PathLike, *, complete: bool = True) -> Any:
    """Open a relevance store written by :func:`attribute_dataset`, read-only, as a ``zarr.Group``.

    The store is plain Zarr v3: ``zarr.open_group(path, mode="r")`` or ``xarray.open_zarr(path)`` read it too.

    Parameters
    ----------
    path : str or os.PathLike
        The store.
    complete : bool
        Raise if the job that writes it has not finished (default). ``False`` opens a partial store; samples
        not written yet have ``target == -1``.

    Returns
    -------
    zarr.Group

    Raises
    ------
    StoreError
        Not a relevance store, or not complete.
    """
    zarr = _zarr()
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise StoreError(f"no relevance store at {os.fspath(path)!r}: run dynamiclrp.attribute_dataset(..., "
                         "out=...) or `dynamiclrp attribute` first") from err
    meta = group.attrs.get("dynamiclrp")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{os.fspath(path)!r} is a Zarr group but not a dynamiclrp relevance store")
    if complete and not meta.get("complete"):
        raise StoreError(f"the relevance store {os.fspath(path)!r} is not complete (the job was interrupted): run "
                         "the same job again to finish it, or pass complete=False to read what is there")
    return group


# ==============================================================================================================
# the job
# ==============================================================================================================
def attribute_dataset(model: nn.Module, data: Any, *, rules: Any = None, target: Target = "predicted",
                      batch_size: int | None = None, out: str | os.PathLike = "relevance.zarr",
                      inputs: str | None = None, reduce: str | Callable[[Tensor], Tensor] | None = None,
                      dtype: Literal["float32", "float16", "float64"] = "float32", ledger_every: int = 16,
                      seed: int = 0, forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
                      device: str | torch.device | None = None, chunk_size: int | None = None,
                      collate_fn: Callable | None = None, num_workers: int = 0, overwrite: bool = False,
                      progress: bool = True, concepts: Sequence[str | Layer] = (),
                      concept_unit: Unit = "channel") -> AttributionSummary:
    """Explain every sample of a dataset with LRP and write the results to a resumable Zarr store.

    One :class:`~dynamiclrp.Explainer` serves the whole job, so the plan of a batch shape is made once. Runs
    unchanged under ``torchrun --nproc_per_node N`` (samples sharded over the ranks, the store equal to the
    single-process one bit for bit); a killed job continues where it stopped when run again. The model is not
    modified (no ``eval()``, ``requires_grad_``, hooks or ``.to()``): put it in evaluation mode and on its
    device(s) yourself; frozen models (``requires_grad_(False)``) are explained as they are.

    Dataset-wide explanations are what strategy analyses such as SpRAy (Lapuschkin et al. 2019, "Unmasking
    Clever Hans predictors and assessing what machines really learn", Nat. Commun. 10:1096) start from; see
    :func:`dynamiclrp.analysis.spray`.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in eval mode. Its scores must be ``(N, classes)`` (or an output with ``.logits``).
    data : Dataset, DataLoader, datasets.Dataset or iterable of batches
        A map-style ``torch.utils.data.Dataset`` (or a tensor of samples) is cut into batches of
        ``batch_size`` and each rank loads only its own; a non-shuffling ``DataLoader`` contributes its
        dataset, ``collate_fn``, ``num_workers`` and batch size; a Hugging Face ``datasets.Dataset`` is read
        with ``with_format("torch")`` (tokenise it first, with padding to one length); any other iterable (a
        list of batches, a generator, a DataLoader over an ``IterableDataset``) is taken as batches, which must
        all have the same size except the last. A batch is a tensor, an ``(input, label)`` tuple, or a dict of
        the model's keyword arguments (labels under ``"label"``/``"labels"``).
    rules : None, str or RuleSet
        As in :func:`dynamiclrp.relevance` (default ``"epsilon"``; use ``"attnlrp"`` for transformers).
    target : "predicted", "label", int or callable
        Which output of each sample to explain: the predicted class, the dataset's label, a fixed class, or
        ``target(scores, labels) -> LongTensor (N,)``. It is picked per row with ``scores.gather``.
    batch_size : int, optional
        Samples per explained batch (default 64, or the DataLoader's). The store is equal bit for bit between
        runs with the same batch size, whatever the number of processes.
    out : str or os.PathLike
        The Zarr store (a directory; for multi-node jobs on a file system all nodes see).
    inputs : str, optional
        Dict batches: the key of the tensor to attribute (default: the first of ``pixel_values``,
        ``input_values``, ``input_features``, ``inputs_embeds``, ``input_ids``...). ``"input_ids"`` is attributed
        through the input embeddings: ``model.get_input_embeddings()(input_ids)`` is passed as ``inputs_embeds``.
    reduce : None, str or callable
        Reduce relevance before storing, e.g. ``"channels"`` (sum over channels), ``"hidden"`` (sum over the
        hidden size of token embeddings), ``"channels+pool4"``; see :func:`reduce_relevance`.
    dtype : {"float32", "float16", "float64"}
        Stored relevance dtype (``"float16"`` halves the store; relative precision 1e-3).
    ledger_every : int
        Run the ledger (:func:`dynamiclrp.explain`, a second pass that costs 1.5-2.5 explanations) on every
        ``ledger_every``-th batch (batch 0, ``ledger_every``, ...) and store its seed and unaccounted relevance;
        ``1``: every batch, ``0``: never. The stored relevance always comes from
        :meth:`~dynamiclrp.Explainer.relevance`, equal to ``dynamiclrp.relevance(..., model=model)`` bit for bit.
    seed : int
        Batch ``i`` runs under ``torch.manual_seed(seed + i)`` in a forked RNG state (the caller's state is
        restored), so models with randomness give the same result on every rank and every resume.
    forward : callable, optional
        ``forward(model, batch) -> (scores, x)``: run the model yourself; ``scores`` is ``(N, classes)`` and ``x``
        the tensor to attribute (a leaf that requires grad or an intermediate tensor of the graph).
    device : str or torch.device, optional
        Where batches go (default: the device of the model's first parameter). The model is not moved: a model
        split over devices (``device_map``) is explained in place, as one autograd graph.
    chunk_size : int, optional
        Samples per store chunk, a multiple of ``batch_size``: the unit that is committed, resumed and handed to
        a rank. Default: about 512 samples, at most 32 MiB of relevance, at least 16 chunks when the data has a
        length, and at least one batch.
    collate_fn : callable, optional
        Builds a batch from samples of a map-style dataset (default ``torch``'s ``default_collate``).
    num_workers : int
        DataLoader workers loading map-style data.
    overwrite : bool
        Replace a store written by a different job (default: raise :class:`StoreError`).
    progress : bool
        A tqdm bar (rank 0 only) and a summary on stderr.
    concepts : sequence of str or Layer
        Layers (module names resolved through each batch's graph, or :class:`~dynamiclrp.conditions.Layer`) whose
        per-unit relevance and activation are stored for every sample, for Relevance Maximization
        (:func:`dynamiclrp.concepts.reference_samples`; Achtibat et al. 2023). Same relevance pass: the stored
        heatmaps are unchanged.
    concept_unit : {"channel", "neuron"} or int
        The unit dimension of those layers (1: channels or a ``Linear``'s features; ``"neuron"``: the last).

    Returns
    -------
    AttributionSummary
        The same on every rank.

    Raises
    ------
    StoreError
        ``out`` holds a store of a different job (or something else) and ``overwrite`` is false.
    ValueError, TypeError, KeyError
        Unusable data, targets or options; the message says what to pass instead.

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    >>> data = torch.utils.data.TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,)))
    >>> s = dynamiclrp.attribute_dataset(net, data, target="label", batch_size=32, out=tmp / "r.zarr",
    ...                                  progress=False)                              # doctest: +SKIP
    >>> s.n_samples                                                                   # doctest: +SKIP
    100
    """
    zarr = _zarr()
    if dtype not in ("float32", "float16", "float64"):
        raise ValueError(f"dtype must be 'float32', 'float16' or 'float64', got {dtype!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(ledger_every) < 0:
        raise ValueError(f"ledger_every must be >= 0 (0: no ledger), got {ledger_every}")
    if isinstance(reduce, str):
        _reduce_steps(reduce)  # fail before any work
    elif reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be None, a string or a callable, got {type(reduce).__name__}")
    if getattr(model, "training", False):
        warnings.warn("the model is in training mode (dropout, batch statistics): explanations are random and the "
                      "store is not reproducible; call model.eval() first", stacklevel=2)
    t0 = time.perf_counter()
    layers = [Layer(c) if isinstance(c, str) and not c.endswith(":input") else c for c in concepts]
    for c in layers:
        if not isinstance(c, (str, Layer)):
            raise TypeError(f"concepts must be module names or Layer objects, got {type(c).__name__}")
    job = _Job(model=model, explainer=Explainer(rules, model=model), device=_input_device(model, device),
               target=target, inputs=inputs, reduce=reduce, dtype=dtype, ledger_every=int(ledger_every),
               seed=int(seed), forward=forward, concepts=tuple(layers), concept_unit=concept_unit)
    source = _make_source(data, batch_size, collate_fn, num_workers)
    if chunk_size is not None:
        size = source.batch
        if int(chunk_size) < 1 or (size is not None and int(chunk_size) % size):
            raise ValueError(f"chunk_size must be a positive multiple of batch_size ({size}), got {chunk_size}")
    group = _Group()
    try:
        return _run(zarr, job, source, group, out=out, chunk_size=chunk_size, overwrite=overwrite,
                    progress=progress, t0=t0)
    finally:
        group.close()


@dataclass
class _Job:
    """What explains one batch (everything but the data and the store)."""

    model: nn.Module
    explainer: Explainer
    device: torch.device
    target: Any
    inputs: str | None
    reduce: Any
    dtype: str
    ledger_every: int
    seed: int
    forward: Any
    concepts: tuple[Any, ...] = ()
    concept_unit: Any = "channel"
    attributed: str = field(default="input", init=False)  # what the relevance is of, in words

    def fingerprint(self, source: Any) -> dict:
        """What must not change between a run and its resumption."""
        return {"model": _describe(type(self.model)), "parameters_sha256": parameter_hash(self.model),
                "rules": repr(self.explainer.rules), "target": _describe(self.target), "inputs": self.inputs,
                "reduce": _describe(self.reduce), "dtype": self.dtype, "ledger_every": self.ledger_every,
                "seed": self.seed, "forward": _describe(self.forward), "data": source.describe(),
                **({"concepts": [layer_key(c) for c in self.concepts], "concept_unit": self.concept_unit}
                   if self.concepts else {}),
                "batch_size": source.batch,
                "versions": {k: v for k, v in _versions(self.model).items() if k in ("dynamiclrp", "torch")}}

    def explain(self, i: int, batch: Any) -> dict:
        """Explain batch ``i``: numpy arrays for the store."""
        labels = _labels_of(batch)
        ledger = self.ledger_every > 0 and i % self.ledger_every == 0
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            # torch.manual_seed would also queue seeds for every accelerator type (about 1 ms a call)
            torch.default_generator.manual_seed(self.seed + i)
            if devices:
                with torch.cuda.device(devices[0]):
                    torch.cuda.manual_seed(self.seed + i)
            if self.forward is not None:
                scores, x = self.forward(self.model, batch)
                scores, self.attributed = _scores(scores), "the x of forward()"
            else:
                scores, x, self.attributed = _prepare(self.model, batch, self.inputs, self.device)
            if scores.dim() == 1:
                scores = scores.unsqueeze(1)
            if scores.dim() != 2:
                raise ValueError(f"the model's scores have shape {tuple(scores.shape)}; attribute_dataset explains "
                                 "one score per sample from (N, classes). Pass forward=... returning (N, classes) "
                                 "scores (e.g. the last token's logits of a language model)")
            t = _targets(self.target, scores, labels)
            out = scores.gather(1, t[:, None]).squeeze(1)
            units: dict[str, np.ndarray] = {}
            if self.concepts:
                rel, units = self._with_concepts(out, x)
            else:
                (rel,) = self.explainer.relevance(out, x)
            seed_total = unaccounted = float("nan")
            if ledger:
                ex = self.explainer.explain(out, x, ledger=True)
                seed_total, unaccounted = ex.ledger.seed_total, ex.unaccounted
        rel = rel.detach()
        n = out.shape[0]
        total = rel.double().reshape(n, -1).sum(1)
        reduced = reduce_relevance(rel, self.reduce).to(getattr(torch, self.dtype))
        lab = (labels.to(torch.long).cpu().numpy() if labels is not None and labels.shape[0] == n
               else np.full(n, -1, dtype=np.int64))
        return {"relevance": reduced.cpu().numpy(), "target": t.cpu().numpy().astype(np.int64),
                "logit": out.detach().float().cpu().numpy(),
                "prediction": scores.detach().argmax(1).cpu().numpy().astype(np.int64), "label": lab,
                "relevance_sum": total.cpu().numpy(), "batch_seed": np.array([seed_total]),
                "batch_unaccounted": np.array([unaccounted]), **units}

    def _with_concepts(self, out: Tensor, x: Tensor) -> tuple[Tensor, dict[str, np.ndarray]]:
        """The heatmaps and, in the same pass, every unit's relevance and activation at the concept layers."""
        edges = resolve_keys([out], list(self.concepts), self.model, self.explainer.rules)
        ex = self.explainer.explain(out, [x, *edges], ledger=False, values=True)
        units: dict[str, np.ndarray] = {}
        for k, layer in enumerate(self.concepts):
            r, v = ex.relevance[1 + k], (ex.values or ())[1 + k]
            d = unit_dim(self.concept_unit, r.dim())
            name = concept_path(layer)
            units[f"{name}/relevance"] = unit_totals(r.detach(), d).float().cpu().numpy()
            if v is not None:
                act = unit_maxima(v.detach(), d)
            else:  # the activation cannot be recovered from the graph: NaN, the store's fill value
                act = torch.full_like(unit_totals(r.detach(), d), float("nan"))
            units[f"{name}/activation"] = act.float().cpu().numpy()
        return ex.relevance[0], units


def concept_path(layer: Any) -> str:
    """Where a concept layer's arrays are in a store: ``"concepts/<layer>"`` (``:`` of ``name:input`` as ``@``)."""
    return "concepts/" + layer_key(layer).replace(":", "@")


def _concat(results: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def _default_k(batch: int, bytes_per_sample: int, n_batches: int | None) -> int:
    """Batches per block: about ``_CHUNK_SAMPLES`` samples, at most ``_CHUNK_BYTES`` of relevance, and at least
    ``_MIN_BLOCKS`` blocks when the length is known (so that a small dataset still spreads over several ranks)."""
    k = min(math.ceil(_CHUNK_SAMPLES / batch), _CHUNK_BYTES // max(1, batch * bytes_per_sample))
    if n_batches is not None:
        k = min(k, n_batches // _MIN_BLOCKS)
    return max(1, k)


def _run(zarr: Any, job: _Job, source: Any, group: _Group, *, out: Any, chunk_size: int | None, overwrite: bool,
         progress: bool, t0: float) -> AttributionSummary:
    rank, world = group.rank, group.world
    path = _local_path(out)
    stream = isinstance(source, _StreamSource)
    if stream and source.n_batches is None and world > 1:
        raise ValueError("under torch.distributed the data must have a length: pass a map-style Dataset, a "
                         "DataLoader over one, or an iterable of batches with __len__")

    # --- rank 0 opens (or creates) the store and tells everyone which blocks remain ------------------------------
    plan: dict = {}
    cached: dict[int, dict] = {}
    if rank == 0:
        try:
            if stream:
                source.first()  # a stream's batch size is its first batch's
            plan, cached = _open_or_create(zarr, out, path, job, source, chunk_size, overwrite)
        except Exception as err:  # tell the other ranks, then raise here
            group.broadcast({"error": f"{type(err).__name__} on rank 0: {err}"})
            raise
    plan = group.broadcast(plan)
    if "error" in plan:
        raise StoreError(plan["error"])
    layout = _Layout(plan["batch"], plan["k"])
    if stream:
        source.batch = layout.batch

    # --- each rank explains its share of the unfinished blocks ----------------------------------------------------
    n_here = 0
    if not plan["complete"]:
        store = _Store(zarr.open_group(out, mode="r+"), layout, plan["n_blocks"], plan["sample"])
        done = set(plan["done"])
        n_batches = source.n_batches
        if n_batches is not None:
            undone = [b for b in range(plan["n_blocks"]) if b not in done]
            mine = set(undone[rank::world])
            total = (None if source.n_samples is None else
                     sum(min(layout.chunk, source.n_samples - b * layout.chunk) for b in mine))
        else:  # a single process, a stream of unknown length
            mine, total = None, None
        if stream:
            wanted = (lambda i: layout.block_of(i) not in done) if mine is None else \
                (lambda i: layout.block_of(i) in mine)  # noqa: E731
            batches = source.batches(lambda i: wanted(i) and i not in cached)
        else:
            ids = [i for b in sorted(mine) for i in layout.batches_of(b, n_batches) if i not in cached]
            batches = source.batches(ids)
        bar = _tqdm(total or 0, f"explaining (rank 0 of {world})" if world > 1 else "explaining",
                    progress and rank == 0)
        if bar is not None and total is None:
            bar.total = None
        writer = _Writer(store)
        try:
            current, parts = -1, []
            for i, result in _with_cached(batches, cached, job):
                b = layout.block_of(i)
                if b != current and parts:
                    writer.put(current, _concat(parts))
                    parts = []
                current = b
                parts.append(result)
                n_here += len(result["target"])
                if bar is not None:
                    bar.update(len(result["target"]))
            if parts:
                writer.put(current, _concat(parts))
        finally:
            if bar is not None:
                bar.close()
            writer.close()  # also after an error: the blocks explained so far are kept
    stats = group.gather({"n": n_here, "seen": source.seen if stream else None})

    # --- rank 0 finalises: exact size (streams), summary --------------------------------------------------------
    summary: Any = None
    if rank == 0:
        try:
            summary = _finalise(zarr, out, path, plan, layout, stats, world, t0)
        except Exception as err:
            group.broadcast({"error": f"{type(err).__name__} on rank 0: {err}"})
            raise
    summary = group.broadcast(summary)
    if isinstance(summary, dict) and "error" in summary:
        raise StoreError(summary["error"])
    if progress and rank == 0:
        print(str(summary), file=sys.stderr, flush=True)
    return summary


def _with_cached(batches: Iterable[tuple[int, Any]], cached: dict[int, dict], job: _Job
                 ) -> Iterator[tuple[int, dict]]:
    """Explain the batches in order, slotting in results computed before (rank 0's first batch)."""
    pending = dict(cached)
    for i, batch in batches:
        for j in sorted(j for j in pending if j < i):
            yield j, pending.pop(j)
        yield i, job.explain(i, batch)
    for j in sorted(pending):
        yield j, pending.pop(j)


def _open_or_create(zarr: Any, out: Any, path: Path | None, job: _Job, source: Any, chunk_size: int | None,
                    overwrite: bool) -> tuple[dict, dict]:
    """Rank 0: resume a store of the same job, or make a new one (explaining batch 0 to learn the schema)."""
    fingerprint = job.fingerprint(source)
    existing = None
    try:
        existing = zarr.open_group(out, mode="r")
    except Exception:  # noqa: BLE001 - missing or unreadable: decided below from the directory
        existing = None
    if existing is None and path is not None and path.exists() and (path.is_file() or any(path.iterdir())):
        if not overwrite:
            raise StoreError(f"{os.fspath(out)!r} exists and is not a relevance store; choose another out path or "
                             "pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if existing is not None:
        meta = existing.attrs.get("dynamiclrp")
        ours = isinstance(meta, dict) and meta.get("format") == FORMAT
        if not ours and not overwrite:
            raise StoreError(f"{os.fspath(out)!r} is a Zarr group that dynamiclrp did not write; choose another out "
                             "path or pass overwrite=True (--overwrite) to replace it")
        if ours and meta.get("ready"):
            if meta.get("format_version") != FORMAT_VERSION:
                raise StoreError(f"the store at {os.fspath(out)!r} has layout version {meta.get('format_version')}; "
                                 f"this dynamiclrp writes version {FORMAT_VERSION}: use a new out path")
            diff = _job_diff(meta["job"], fingerprint)
            stored_chunk = meta["schema"]["chunk_size"]
            if chunk_size is not None and chunk_size != stored_chunk:
                diff.append(f"chunk_size: store has {stored_chunk}, this job has {chunk_size}")
            if diff and not overwrite:
                raise StoreError(f"the store at {os.fspath(out)!r} was written by a different job, so it cannot be "
                                 "resumed (" + "; ".join(diff) + "). Run the same job to resume it, choose another "
                                 "out path, or pass overwrite=True (--overwrite) to start again")
            if not diff:
                _clean_partial(path)
                g = zarr.open_group(out, mode="r")
                done = np.asarray(g["block_done"][:]).astype(bool)
                return {"complete": bool(meta.get("complete")), "done": np.flatnonzero(done).tolist(),
                        "sample": list(_sample_arrays(meta["schema"])),
                        "n_blocks": int(done.shape[0]), "batch": fingerprint["batch_size"],
                        "k": stored_chunk // fingerprint["batch_size"], "n_samples": source.n_samples}, {}
        # ours but never ready (killed while creating it), or overwrite: start again
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    # a new store: batch 0 tells the shape of the relevance
    first = job.explain(0, source.first())
    batch = fingerprint["batch_size"]
    per_sample = first["relevance"][0].nbytes if len(first["relevance"]) else 0
    k = chunk_size // batch if chunk_size is not None else _default_k(batch, per_sample, source.n_batches)
    layout = _Layout(batch, k)
    n_blocks = math.ceil(source.n_batches / k) if source.n_batches is not None else 1
    schema = {"shape": list(first["relevance"].shape[1:]), "dtype": str(first["relevance"].dtype),
              "chunk_size": layout.chunk,
              "relevance_of": job.attributed,
              "concept_arrays": {name: int(v.shape[1]) for name, v in first.items() if name.startswith("concepts/")},
              "metadata": {"model": fingerprint["model"], "parameters_sha256": fingerprint["parameters_sha256"],
                           "rules": fingerprint["rules"], "seed": job.seed, "versions": _versions(job.model)}}
    _create_store(zarr, out, fingerprint, schema, layout, n_blocks)
    return {"complete": False, "done": [], "n_blocks": n_blocks, "batch": batch, "k": k,
            "sample": list(_sample_arrays(schema)), "n_samples": source.n_samples}, {0: first}


def _finalise(zarr: Any, out: Any, path: Path | None, plan: dict, layout: _Layout, stats: list, world: int,
              t0: float) -> AttributionSummary:
    g = zarr.open_group(out, mode="r+")
    meta = dict(g.attrs["dynamiclrp"])
    n_computed = sum(s["n"] for s in stats)
    if plan["complete"]:
        n_samples = int(meta["summary"]["n_samples"])
    else:
        if plan["n_samples"] is not None:
            n_samples = plan["n_samples"]
        else:
            seen = [s["seen"] for s in stats if s["seen"] is not None]
            n_samples = max(seen)
        n_batches = math.ceil(n_samples / layout.batch)
        n_blocks = math.ceil(n_batches / layout.k)
        done = np.asarray(g["block_done"][:]).astype(bool)
        if len(done) < n_blocks or not done[:n_blocks].all():
            missing = np.flatnonzero(~done[:n_blocks]).tolist() + list(range(len(done), n_blocks))
            raise StoreError(f"blocks {missing[:10]} of {os.fspath(out)!r} were not written; run the job again to "
                             "finish them")
        if g["target"].shape[0] != n_samples:  # streams: the exact length is known only now
            for name in _sample_arrays(meta["schema"]):
                g[name].resize((n_samples, *g[name].shape[1:]))
            for name in _BATCH_ARRAYS:
                g[name].resize((n_batches,))
            g["block_done"].resize((n_blocks,))
    seed = np.asarray(g["batch_seed"][:], dtype=np.float64)
    unacc = np.asarray(g["batch_unaccounted"][:], dtype=np.float64)
    have = ~np.isnan(unacc)
    shares = np.abs(unacc[have]) / np.maximum(np.abs(seed[have]), np.finfo(np.float64).tiny)
    mean_abs = float(shares.mean()) if have.any() else float("nan")
    seconds = time.perf_counter() - t0
    if not plan["complete"]:
        history = list(meta.get("history", []))
        history.append({"n_computed": n_computed, "seconds": round(seconds, 3), "world_size": world,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        meta.update({"complete": True, "history": history,
                     "summary": {"n_samples": n_samples, "ledger_batches": int(have.sum()),
                                 "mean_abs_unaccounted": None if math.isnan(mean_abs) else mean_abs}})
        g.attrs["dynamiclrp"] = meta
    return AttributionSummary(path=os.fspath(out), n_samples=n_samples, n_computed=n_computed, seconds=seconds,
                              samples_per_second=n_computed / seconds if seconds > 0 else float("nan"),
                              mean_abs_unaccounted=mean_abs, ledger_batches=int(have.sum()),
                              store_bytes=_store_bytes(path), world_size=world)
