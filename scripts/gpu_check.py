#!/usr/bin/env python3
"""The device check of issue 17: dynamiclrp on a CUDA GPU, in one run.

Run from the repository root, on a machine with one CUDA GPU (no network needed: tiny models with random weights)::

    PYTHONPATH=src python scripts/gpu_check.py --markdown gpu_check.md

It checks, in this order, within a time budget (``--budget``, default 420 s; what does not fit is reported as
skipped, never silently dropped):

1. **Saved fields**: every field a registry row reads exists in this torch's generated node classes (the GPU
   image's torch may differ from the one the rows were written against).
2. **Fused nets** (float32 and bfloat16): a BatchNorm CNN (``CudnnBatchNormBackward0``), ``nn.LSTM`` / ``nn.GRU`` /
   ``nn.RNN`` (``CudnnRnnBackward0``), ``nn.LSTMCell`` / ``nn.GRUCell`` (``ThnnFused*CellBackward0``), ``nn.RMSNorm``
   (``FusedRmsNormBackward0``), and a model split between the GPU and the CPU: relevance against the CPU float64
   result of the same model, the ledger closed, and the CUDA node types that appeared.
3. **No host sync** in the propagation loop (``torch.cuda.set_sync_debug_mode("error")`` around it), with and
   without the ledger.
4. **Benchmark**: a LLaMA-3.2-1B-shaped model (16 layers, hidden 2048, 32/8 heads, MLP 8192, vocabulary 128256),
   frozen, bfloat16, SDPA, batch 1, 1,024 tokens: forward + LRP (AttnLRP, CP-LRP; first call and with the plan
   cached) against forward + input-only backward, time and peak memory.
5. **The zoo**: every transformer, CNN and recurrent entry of ``dynamiclrp.testing.zoo`` on the GPU in float32 and
   bfloat16, the attention entries under every SDPA backend this GPU supports (forced with
   ``torch.nn.attention.sdpa_kernel``; a backend that refuses the inputs is reported as unsupported), each compared
   with the CPU float64 result (cosine, max-normalised difference) with the ledger closed.

It prints one markdown table per section and exits with status 1 when a check fails (a cosine below the target,
a ledger that does not close, a node type expected on this GPU that did not appear, an exception), 0 otherwise.
Targets (issue 17): cosine ≥ 0.999 in bfloat16 (≥ 0.99999 in float32); the 1B model at ≤ 1.3x the time and
≤ 1.2x the peak memory of forward + backward.

``--cpu`` (alias ``--dry-run``) runs every section on the CPU with tiny sizes (seconds): the test suite runs it so
the script cannot rot. Compatible with torch >= 2.4 and transformers 4.4x/5.x (APIs that differ are guarded).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import dynamiclrp  # noqa: E402
import dynamiclrp.core.run as engine  # noqa: E402
from dynamiclrp.ops import REGISTRY  # noqa: E402

#: cosine targets per dtype
COSINE = {torch.float32: 0.99999, torch.bfloat16: 0.999, torch.float16: 0.999, torch.float64: 1 - 1e-9}
#: |unaccounted| / (|seed| + Σ|sinks|) tolerated per dtype (the ledger's totals are measured in the run's dtype)
LEDGER = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float64: 1e-9}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: node types that show a GPU-only kernel ran
GPU_NODES = ("Cudnn", "Miopen", "ScaledDotProductEfficient", "ScaledDotProductFlashAttentionBackward0",
             "FlashAttentionBackward0", "EfficientAttentionBackward0", "ThnnFused", "FusedRmsNorm",
             "ScaledDotProductFlashAttentionForCpu")


# =============================================================================================================
# Results
# =============================================================================================================
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c).replace("|", "/") for c in cells])  # a cell never splits the markdown row

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


class Report:
    def __init__(self, budget: float) -> None:
        self.tables: list[Table] = []
        self.failures: list[str] = []
        self.skipped: list[str] = []
        self.t0 = time.perf_counter()
        self.budget = budget
        self.records: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def fail(self, what: str) -> str:
        self.failures.append(what)
        return "FAIL"

    def table(self, t: Table) -> Table:
        self.tables.append(t)
        return t


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:160].replace("|", "/")


# =============================================================================================================
# Helpers
# =============================================================================================================
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and max-normalised difference of ``a`` against the reference ``b`` (float64, CPU)."""
    a = a.detach().double().cpu().flatten()
    b = b.detach().double().cpu().flatten()
    den = a.norm() * b.norm()
    cos = float((a @ b) / den) if float(den) > 0 else (1.0 if torch.equal(a, b) else 0.0)
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())
    return cos, diff


def ledger_error(ex: dynamiclrp.Explanation) -> float:
    L = ex.ledger
    scale = abs(L.seed_total) + sum(abs(s.total) for s in L.sinks) + 1e-30
    return abs(ex.unaccounted) / scale


def gpu_nodes(counts: dict[str, int]) -> str:
    seen = {k: v for k, v in counts.items() if any(k.startswith(p) for p in GPU_NODES)}
    return ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())) or "-"


def node_counts(out: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    roots = [(out.grad_fn, out.output_nr)]
    from dynamiclrp.core.graph import GraphView  # the graph walker, no planning
    for t in GraphView(roots).types:
        counts[t] = counts.get(t, 0) + 1
    return counts


def _cast_in(device: torch.device, dtype: torch.dtype) -> Callable:
    """A forward pre-hook moving a module's tensor inputs to ``device`` (floating ones also to ``dtype``)."""
    def move(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            if t.is_floating_point():
                return t if (t.device == device and t.dtype == dtype) else t.to(device=device, dtype=dtype)
            return t if t.device == device else t.to(device)
        if isinstance(t, (list, tuple)):
            return type(t)(move(x) for x in t)
        if isinstance(t, dict):
            return {k: move(v) for k, v in t.items()}
        return t

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return move(args), move(kwargs)
    return hook


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``model`` on ``device`` in ``dtype``, its inputs (made on the CPU by the zoo's runners) moved there by
    pre-hooks on the model and its input embeddings. The explained input stays where the runner made it: an image
    leaf on the CPU reaches the GPU through a ``ToCopyBackward0`` node, so relevance crosses devices."""
    model.to(device=device, dtype=dtype)
    hooks = []
    mods = [model]
    for getter in (lambda m: m.get_input_embeddings(), lambda m: m.get_decoder().get_input_embeddings()):
        with contextlib.suppress(Exception):
            emb = getter(model)
            if isinstance(emb, nn.Module):
                mods.append(emb)
    for m in mods:
        hooks.append(m.register_forward_pre_hook(_cast_in(device, dtype), with_kwargs=True))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def fixed_targets(zoo: Any, holder: dict) -> Iterator[None]:
    """Patch the zoo's ``top_score``: the first call records each row's arg-max class, later calls explain the same
    classes (a bfloat16 run may rank them differently)."""
    orig = zoo.top_score

    def top(scores: torch.Tensor) -> torch.Tensor:
        if "idx" not in holder:
            holder["idx"] = scores.detach().argmax(1, keepdim=True).cpu()
        return scores.gather(1, holder["idx"].to(scores.device)).squeeze(1)
    zoo.top_score = top
    try:
        yield
    finally:
        zoo.top_score = orig


def sdpa_backends(device: torch.device) -> list[tuple[str, Any]]:
    """``(name, SDPBackend)`` pairs this torch knows (``None`` where it has no ``sdpa_kernel``)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - torch < 2.3
        return [("default", None)]
    names = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]
    if device.type != "cuda":
        names = ["MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"]
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


@contextlib.contextmanager
def forced(backend: Any) -> Iterator[None]:
    if backend is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        yield


#: the fused attention node each forced backend should produce
EXPECTED_SDPA = {
    ("cuda", "efficient_attention"): "ScaledDotProductEfficientAttentionBackward0",
    ("cuda", "flash_attention"): "ScaledDotProductFlashAttentionBackward0",
    ("cuda", "cudnn_attention"): "ScaledDotProductCudnnAttentionBackward0",
    ("cpu", "flash_attention"): "ScaledDotProductFlashAttentionForCpuBackward0",
}


# =============================================================================================================
# 1. Saved fields
# =============================================================================================================
def section_fields(rep: Report) -> None:
    t = rep.table(Table("Saved fields read by the registry rows, against this torch's node classes",
                        ["rows checked", "CUDA rows present", "missing fields", "status"]))
    problems, checked = [], 0
    cuda_rows = [n for n in REGISTRY if any(n.startswith(p) for p in ("Cudnn", "Miopen", "ThnnFused", "FusedRms",
                                                                         "ScaledDotProduct", "FlashAttention",
                                                                         "EfficientAttention"))]
    present = 0
    for name, spec in REGISTRY.items():
        cls = getattr(torch._C._functions, name, None)
        if cls is None:
            continue
        checked += 1
        present += name in cuda_rows
        have = {a[len("_saved_"):] for a in dir(cls) if a.startswith("_saved_")}
        want = {f for _, f in spec.results} | {f for _, f in spec.inputs_saved} | set(spec.static_fields)
        want |= set(getattr(spec.kernel, "fields", ()) or ())
        for attr in ("mask_field", "lse_field", "eps_field", "x_field", "y_field"):
            v = getattr(spec.kernel, attr, None)
            if isinstance(v, str):
                want.add(v)
        problems += [f"{name}.{f}" for f in sorted(want - have) if not f.startswith("saved_tensors.")]
    status = rep.fail("saved fields: " + ", ".join(problems)) if problems else "ok"
    t.add(checked, f"{present}/{len(cuda_rows)}", ", ".join(problems) or "-", status)


# =============================================================================================================
# 2. Fused nets and a split model
# =============================================================================================================
class _Split(nn.Module):
    """Two halves on two devices; the hop between them is what ``device_map`` inserts (``ToCopyBackward0``)."""

    def __init__(self, first: nn.Module, second: nn.Module, d1: torch.device, d2: torch.device):
        super().__init__()
        self.first, self.second, self.d1, self.d2 = first, second, d1, d2

    def forward(self, x):
        return self.second(self.first(x.to(self.d1)).to(self.d2))


class _Cells(nn.Module):
    def __init__(self, cls: type):
        super().__init__()
        self.cell, self.head = cls(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        hx = None
        for t in range(x.shape[1]):
            hx = self.cell(x[:, t], hx)
        return self.head(hx[0] if isinstance(hx, tuple) else hx)


class _RMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 32), nn.RMSNorm(32, eps=1e-6), nn.Linear(32, 4)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.norm(self.a(x))))


class _RNN(nn.Module):
    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn
        d = rnn.hidden_size if not getattr(rnn, "proj_size", 0) else rnn.proj_size
        self.head = nn.Linear(d * (2 if rnn.bidirectional else 1), 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def fused_nets(device: torch.device) -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...], str, list[str]]]:
    """``(name, builder, input shape, rules, node types expected on a CUDA GPU in float32)``; a type ending in ``?``
    is reported, not required (whether ``F.rms_norm`` takes the fused kernel depends on the torch version)."""
    from dynamiclrp.testing import zoo

    def bn_cnn():
        m = zoo.CNNBN()
        zoo._randomise_batchnorm(m, torch.Generator().manual_seed(1))
        return m

    def split():
        first = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        second = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(8, 4))
        return _Split(first, second, torch.device("cpu"), torch.device("cpu"))  # placed by the caller
    seq = (2, 6, 8)
    return [
        ("cnn_bn (BatchNorm)", bn_cnn, (2, 3, 32, 32), "epsilon_plus", ["CudnnBatchNormBackward0"]),
        ("lstm 2x bidirectional", lambda: _RNN(nn.LSTM(8, 16, 2, batch_first=True, bidirectional=True)), seq,
         "epsilon", ["CudnnRnnBackward0"]),
        ("lstm proj_size", lambda: _RNN(nn.LSTM(8, 16, batch_first=True, proj_size=4)), seq, "epsilon",
         ["CudnnRnnBackward0"]),
        ("gru 2x", lambda: _RNN(nn.GRU(8, 16, 2, batch_first=True)), seq, "epsilon", ["CudnnRnnBackward0"]),
        ("rnn tanh bidirectional", lambda: _RNN(nn.RNN(8, 16, batch_first=True, bidirectional=True)), seq, "zero",
         ["CudnnRnnBackward0"]),
        ("LSTMCell loop", lambda: _Cells(nn.LSTMCell), seq, "epsilon", ["ThnnFusedLstmCellBackward0"]),
        ("GRUCell loop", lambda: _Cells(nn.GRUCell), seq, "epsilon", ["ThnnFusedGruCellBackward0"]),
        ("RMSNorm MLP", _RMS, (4, 8), "attnlrp", ["FusedRmsNormBackward0?"]),
        ("split GPU / CPU", split, (2, 3, 16, 16), "epsilon_plus", []),
    ]


def section_fused(rep: Report, device: torch.device, dtypes: list[torch.dtype], only: list[str] | None = None) -> None:
    t = rep.table(Table("Fused nets (relevance against the CPU float64 result of the same model)",
                        ["net", "dtype", "rules", "GPU node types", "cosine", "max-norm diff", "ledger", "status"]))
    for name, builder, shape, rules, expected in fused_nets(device):
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        # the reference: the same weights, CPU float64 (the targets picked there)
        torch.manual_seed(0)
        ref_model = builder().eval().double()
        state = {k: v.clone() for k, v in ref_model.state_dict().items()}
        x_ref = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).double().requires_grad_(True)
        logits = ref_model(x_ref)
        idx = logits.detach().argmax(1, keepdim=True)
        ref = dynamiclrp.relevance(logits.gather(1, idx).squeeze(1), x_ref, rules=rules, model=ref_model)[0]
        for dtype in dtypes:
            if rep.left() < 5:
                rep.skipped.append(f"fused {name} {dtype}")
                t.add(name, str(dtype).replace("torch.", ""), rules, "-", "-", "-", "-", "skipped (time)")
                continue
            try:
                torch.manual_seed(0)
                model = builder().eval()
                model.load_state_dict(state)
                if isinstance(model, _Split):
                    model.d1, model.d2 = device, torch.device("cpu")
                    model.first.to(device=device, dtype=dtype)
                    model.second.to(dtype=dtype)
                else:
                    model.to(device=device, dtype=dtype)
                x = x_ref.detach().to(device=device, dtype=dtype).requires_grad_(True)
                out = model(x)
                y = out.gather(1, idx.to(out.device)).squeeze(1)
                counts = node_counts(y)
                ex = dynamiclrp.explain(y, x, rules=rules, model=model)
                cos, diff = compare(ex.relevance[0], ref)
                lerr = ledger_error(ex)
                status = "ok"
                problems = []
                if cos < COSINE.get(dtype, 0.999):
                    problems.append(f"cosine {cos:.6f}")
                if lerr > LEDGER.get(dtype, 1e-2):
                    problems.append(f"ledger {lerr:.1e}")
                if device.type == "cuda" and dtype == torch.float32:
                    missing = [n for n in expected if not n.endswith("?") and n not in counts and _expects(n)]
                    if missing:
                        problems.append("not exercised: " + ", ".join(missing))
                if isinstance(model, _Split) and ex.relevance[0].device != x.device:
                    problems.append(f"relevance on {ex.relevance[0].device}, input on {x.device}")
                if problems:
                    status = rep.fail(f"fused {name} {dtype}: " + "; ".join(problems))
                    status += ": " + "; ".join(problems)
                t.add(name, str(dtype).replace("torch.", ""), rules, gpu_nodes(counts), f"{cos:.6f}", f"{diff:.1e}",
                      f"{lerr:.1e}", status)
                rep.records.append({"section": "fused", "net": name, "dtype": str(dtype), "cosine": cos,
                                    "diff": diff, "ledger": lerr, "nodes": counts})
            except Exception as err:  # noqa: BLE001 - every failure is reported in the table
                traceback.print_exc()
                t.add(name, str(dtype).replace("torch.", ""), rules, "-", "-", "-", "-",
                      rep.fail(f"fused {name} {dtype}: {_first_line(err)}") + ": " + _first_line(err))
    t.notes.append("float32 on a CUDA GPU must produce the listed cuDNN / fused node types (when cuDNN is enabled); "
                   "bfloat16 may take other kernels (native batch norm, fused cells instead of cuDNN's RNN).")


def _expects(node_type: str) -> bool:
    """Whether this machine should produce ``node_type`` for float32 inputs."""
    if node_type.startswith("Cudnn"):
        return bool(torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled)
    return True


# =============================================================================================================
# 3. Host syncs inside the loop
# =============================================================================================================
@contextlib.contextmanager
def sync_errors(device: torch.device) -> Iterator[list[str]]:
    """Make every synchronising CUDA call inside ``core.run._loop`` an error (``set_sync_debug_mode``)."""
    seen: list[str] = []
    orig = engine._loop

    def loop(*a, **k):
        if device.type != "cuda":
            return orig(*a, **k)
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return orig(*a, **k)
        except RuntimeError as err:
            seen.append(_first_line(err))
            raise
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    engine._loop = loop
    try:
        yield seen
    finally:
        engine._loop = orig


def section_syncs(rep: Report, device: torch.device, dtype: torch.dtype) -> None:
    from dynamiclrp.testing import zoo
    t = rep.table(Table("Host synchronisation inside the propagation loop (set_sync_debug_mode('error'))",
                        ["model", "rules", "ledger", "status"]))
    for name, rules in (("llama", "attnlrp"), ("cnn_bn", "epsilon_plus"), ("lstm", "epsilon")):
        for ledger in (False, True):
            if rep.left() < 5:
                t.add(name, rules, ledger, "skipped (time)")
                rep.skipped.append(f"sync {name}")
                continue
            e = zoo.build(name)
            try:
                with placed(e.model, device, dtype), sync_errors(device):
                    out, x = e.run()
                    if ledger:
                        dynamiclrp.explain(out, x, rules=rules, model=e.model)
                    else:
                        dynamiclrp.relevance(out, x, rules=rules, model=e.model)
                t.add(name, rules, ledger, "ok" if device.type == "cuda" else "ok (no CUDA: not measured)")
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                msg = _first_line(err)
                t.add(name, rules, ledger, rep.fail(f"sync {name} ledger={ledger}: {msg}") + ": " + msg)


# =============================================================================================================
# 4. Benchmark
# =============================================================================================================
def llama_model(device: torch.device, dtype: torch.dtype, layers: int, hidden: int, heads: int, kv: int, mlp: int,
                vocab: int) -> nn.Module:
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(seconds, peak bytes above the level before the call) of one call."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = float("nan")
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    del out
    return dt, peak


def section_bench(rep: Report, device: torch.device, dtype: torch.dtype, tokens: int, size: dict, repeats: int) -> None:
    t = rep.table(Table(f"Benchmark: LLaMA-shaped, {size['layers']} layers, hidden {size['hidden']}, batch 1, "
                        f"{tokens} tokens, {str(dtype).replace('torch.', '')}, frozen, SDPA",
                        ["variant", "time (ms, median)", "vs fwd+bwd", "peak memory (GiB)", "vs fwd+bwd", "status"]))
    try:
        model = llama_model(device, dtype, **size)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        t.add("build", "-", "-", "-", "-", rep.fail(f"bench build: {_first_line(err)}") + ": " + _first_line(err))
        return
    n_params = sum(p.numel() for p in model.parameters())
    t.notes.append(f"{n_params / 1e6:,.1f} M parameters; the explained output is the top next-token logit at the last "
                   "position (logits_to_keep=1); input: the input embeddings (a leaf that requires grad)")
    ids = torch.randint(0, size["vocab"], (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        emb0 = model.get_input_embeddings()(ids)

    def forward():
        x = emb0.detach().clone().requires_grad_(True)
        try:
            logits = model(inputs_embeds=x, logits_to_keep=1, use_cache=False).logits[:, -1]
        except TypeError:  # transformers < 4.45: num_logits_to_keep
            logits = model(inputs_embeds=x, use_cache=False).logits[:, -1]
        return x, logits

    with torch.no_grad():
        x, logits = forward()
    target = logits.argmax(-1, keepdim=True)
    del x, logits

    def base():
        x, logits = forward()
        return torch.autograd.grad(logits.gather(1, target).sum(), x)

    def ours(rules: str, explainer: Any = None):
        def run():
            x, logits = forward()
            y = logits.gather(1, target).squeeze(1)
            if explainer is not None:
                return explainer.relevance(y, x)
            return dynamiclrp.relevance(y, x, rules=rules, model=model)
        return run

    variants: list[tuple[str, Callable[[], Any]]] = [("forward + input backward", base)]
    for rules in ("attnlrp", "cplrp"):
        variants.append((f"forward + LRP {rules} (plan cached)", ours(rules, dynamiclrp.Explainer(rules, model=model))))
    firsts = {}
    for rules in ("attnlrp", "cplrp"):
        try:
            firsts[rules] = _timed(ours(rules), device)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            t.add(f"forward + LRP {rules} (first call)", "-", "-", "-", "-",
                  rep.fail(f"bench {rules}: {_first_line(err)}") + ": " + _first_line(err))
    times: dict[str, list[float]] = {n: [] for n, _ in variants}
    peaks: dict[str, float] = {n: 0.0 for n, _ in variants}
    try:
        for _, fn in variants:
            fn()  # warm-up (and plan caching)
        for r in range(repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, fn in order:
                dt, peak = _timed(fn, device)
                times[name].append(dt)
                peaks[name] = max(peaks[name], peak) if not math.isnan(peak) else peak
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        t.add("timing", "-", "-", "-", "-", rep.fail(f"bench: {_first_line(err)}") + ": " + _first_line(err))
        return
    b_time, b_peak = statistics.median(times[variants[0][0]]), peaks[variants[0][0]]

    def gib(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x / 2 ** 30:.2f}"

    def ratio(a: float, b: float) -> str:
        return "n/a" if (math.isnan(a) or math.isnan(b) or b == 0) else f"{a / b:.2f}x"
    for name, _ in variants:
        tm, pk = statistics.median(times[name]), peaks[name]
        status = "ok"
        if name != variants[0][0] and device.type == "cuda":
            problems = []
            if tm > 1.3 * b_time:
                problems.append(f"time {tm / b_time:.2f}x > 1.3x")
            if not math.isnan(pk) and pk > 1.2 * b_peak:
                problems.append(f"memory {pk / b_peak:.2f}x > 1.2x")
            if problems:
                status = rep.fail(f"bench {name}: " + "; ".join(problems)) + ": " + "; ".join(problems)
        t.add(name, f"{tm * 1e3:.1f}", ratio(tm, b_time), gib(pk), ratio(pk, b_peak), status)
        rep.records.append({"section": "bench", "variant": name, "ms": tm * 1e3, "peak": pk})
    for rules, (dt, pk) in firsts.items():
        t.add(f"forward + LRP {rules} (first call: graph + plan + pass)", f"{dt * 1e3:.1f}", ratio(dt, b_time),
              gib(pk), ratio(pk, b_peak), "info")
    t.notes.append(f"median of {repeats} interleaved rounds after a warm-up; peak memory: the CUDA allocator's peak "
                   "above the level before the call (the model's weights excluded)")
    variants.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# =============================================================================================================
# 5. The zoo
# =============================================================================================================
def zoo_entries(names: list[str] | None) -> list[str]:
    from dynamiclrp.testing import zoo
    if names:
        return names
    # one of each kind first (so that a tight budget still covers every family), then the rest: transformers,
    # CNNs, recurrent. mamba has no attention and its CUDA path needs kernels this image does not ship
    first = ["llama", "bert", "gpt2", "t5", "vit", "transformer_encoder", "cnn_bn", "tv_resnet50", "lstm", "gru",
             "unet", "qwen2", "gemma3", "mistral", "whisper", "clip_text", "swin", "tv_vit_b_16", "tv_vgg16"]
    known = zoo.names()
    order = [n for n in first if n in known]
    order += [n for n in known if zoo.attention_implementations(n) and n not in order]
    order += [n for n in known if n not in order and n != "mamba"]
    return order


def _rules_for(entry: Any) -> str:
    if entry.attn_implementation is not None:
        return "attnlrp"
    return "epsilon" if entry.family == "recurrent" else "epsilon_plus"


def section_zoo(rep: Report, device: torch.device, dtypes: list[torch.dtype], names: list[str] | None,
                backends: list[str] | None) -> None:
    from dynamiclrp.testing import zoo
    t = rep.table(Table("Zoo entries against the CPU float64 result",
                        ["model", "rules", "dtype", "SDPA backend", "GPU node types", "cosine", "max-norm diff",
                         "ledger", "status"]))
    all_backends = sdpa_backends(device)
    if backends:
        all_backends = [(n, b) for n, b in all_backends if n in backends]
    for name in zoo_entries(names):
        if rep.left() < 20:
            rep.skipped.append(f"zoo {name}")
            t.add(name, "-", "-", "-", "-", "-", "-", "-", "skipped (time budget)")
            continue
        log(f"[zoo] {name} ({rep.left():.0f} s left)")
        holder: dict = {}
        try:
            impl = "sdpa" if "sdpa" in zoo.attention_implementations(name) else None
            with fixed_targets(zoo, holder):
                e = zoo.build(name, attn_implementation=impl)
                rules = _rules_for(e)
                with placed(e.model, torch.device("cpu"), torch.float64):
                    out, x = e.run()
                ref = dynamiclrp.relevance(out, x, rules=rules, model=e.model)[0]
                state = {k: v.detach().clone() for k, v in e.model.state_dict().items()}
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            t.add(name, "-", "float64 (CPU)", "-", "-", "-", "-", "-",
                  rep.fail(f"zoo {name} reference: {_first_line(err)}") + ": " + _first_line(err))
            continue
        runs = [(n, b) for n, b in all_backends] if impl == "sdpa" else [("-", None)]
        for dtype in dtypes:
            for bname, backend in runs:
                if rep.left() < 10:
                    rep.skipped.append(f"zoo {name} {dtype} {bname}")
                    t.add(name, rules, str(dtype).replace("torch.", ""), bname, "-", "-", "-", "-", "skipped (time)")
                    continue
                e.model.to(dtype=torch.float64).load_state_dict(state)  # every run from the reference's weights
                _zoo_run(rep, t, zoo, name, e, rules, holder, ref, device, dtype, bname, backend)
        del e
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t.notes.append("the explained input stays where the zoo's runner made it (an image leaf on the CPU reaches the GPU "
                   "through a ToCopyBackward0 node; text models: the input embeddings on the GPU)")
    t.notes.append(f"targets: cosine >= {COSINE[torch.bfloat16]} (bfloat16), >= {COSINE[torch.float32]} (float32); "
                   f"ledger |unaccounted| / (|seed| + sum |sinks|) <= {LEDGER[torch.bfloat16]:.0e} (bfloat16), "
                   f"{LEDGER[torch.float32]:.0e} (float32)")


def _zoo_run(rep, t, zoo, name, e, rules, holder, ref, device, dtype, bname, backend) -> None:
    dname = str(dtype).replace("torch.", "")
    try:
        with fixed_targets(zoo, holder), placed(e.model, device, dtype), forced(backend):
            try:
                out, x = e.run()
            except RuntimeError as err:
                if backend is not None and bname != "math":
                    t.add(name, rules, dname, bname, "-", "-", "-", "-", "unsupported: " + _first_line(err)[:80])
                    return
                raise
            counts = node_counts(out)
            ex = dynamiclrp.explain(out, x, rules=rules, model=e.model)
        cos, diff = compare(ex.relevance[0], ref)
        lerr = ledger_error(ex)
        problems = []
        if cos < COSINE.get(dtype, 0.999):
            problems.append(f"cosine {cos:.6f}")
        if lerr > LEDGER.get(dtype, 1e-2):
            problems.append(f"ledger {lerr:.1e}")
        want = EXPECTED_SDPA.get((device.type, bname))
        if want is not None and want not in counts:
            problems.append(f"no {want}")
        status = "ok"
        if problems:
            status = rep.fail(f"zoo {name} {dname} {bname}: " + "; ".join(problems)) + ": " + "; ".join(problems)
        t.add(name, rules, dname, bname, gpu_nodes(counts), f"{cos:.6f}", f"{diff:.1e}", f"{lerr:.1e}", status)
        rep.records.append({"section": "zoo", "model": name, "dtype": dname, "backend": bname, "cosine": cos,
                            "diff": diff, "ledger": lerr, "nodes": {k: v for k, v in counts.items()
                                                                    if any(k.startswith(p) for p in GPU_NODES)}})
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        t.add(name, rules, dname, bname, "-", "-", "-", "-",
              rep.fail(f"zoo {name} {dname} {bname}: {_first_line(err)}") + ": " + _first_line(err))


# =============================================================================================================
# Main
# =============================================================================================================
def header(device: torch.device) -> str:
    lines = ["## dynamiclrp GPU check", "",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}",
             f"- python {platform.python_version()}, {platform.machine()}, date {time.strftime('%Y-%m-%d %H:%M')}"]
    with contextlib.suppress(ImportError):
        import transformers
        lines.append(f"- transformers {transformers.__version__}")
    with contextlib.suppress(ImportError):
        import torchvision
        lines.append(f"- torchvision {torchvision.__version__}")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"- device: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, compute capability {p.major}.{p.minor}")
    else:
        lines.append("- device: CPU (dry run: tiny sizes, the CUDA-only checks are not measured)")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                   help="run every section on the CPU with tiny sizes (what the test suite runs)")
    p.add_argument("--models", nargs="*", help="zoo entries (default: every transformer, CNN and recurrent entry; "
                                                "with --cpu: llama bert cnn_bn lstm)")
    p.add_argument("--dtypes", nargs="*", default=None, help="default: float32 bfloat16 (--cpu: float32)")
    p.add_argument("--backends", nargs="*", default=None,
                   help="SDPA backends (math efficient_attention flash_attention cudnn_attention; default: all)")
    p.add_argument("--nets", nargs="*", default=None,
                   help="fused nets to run, by part of their name (cnn_bn lstm gru rnn cell rms split; default: all)")
    p.add_argument("--sections", nargs="*", default=["fields", "fused", "syncs", "bench", "zoo"],
                   choices=["fields", "fused", "syncs", "bench", "zoo"])
    p.add_argument("--tokens", type=int, default=None, help="benchmark tokens (default 1024; --cpu: 32)")
    p.add_argument("--repeats", type=int, default=None, help="benchmark rounds (default 5; --cpu: 1)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; what does not fit is reported as skipped")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    a = p.parse_args(argv)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu for the dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu") if a.cpu else torch.device("cuda", torch.cuda.current_device())
    # a CPU runs bfloat16 through ATen's decomposed kernels (an nn.GRU entirely in bfloat16 reaches cosine ~0.99):
    # the dry run checks the script in float32 unless asked
    dtypes = [DTYPES[d] for d in (a.dtypes or (["float32"] if a.cpu else ["float32", "bfloat16"]))]
    models = a.models if a.models else (["llama", "bert", "cnn_bn", "lstm"] if a.cpu else None)
    size = (dict(layers=2, hidden=64, heads=4, kv=2, mlp=128, vocab=256) if a.cpu else
            dict(layers=16, hidden=2048, heads=32, kv=8, mlp=8192, vocab=128256))
    tokens = a.tokens or (32 if a.cpu else 1024)
    repeats = a.repeats or (1 if a.cpu else 5)
    rep = Report(a.budget)
    if a.cpu:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    log(header(device))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("fields", lambda: section_fields(rep)),
        ("fused", lambda: section_fused(rep, device, dtypes, a.nets)),
        ("syncs", lambda: section_syncs(rep, device, dtypes[-1])),
        ("bench", lambda: section_bench(rep, device, torch.bfloat16 if not a.cpu else torch.float32, tokens, size,
                                        repeats)),
        ("zoo", lambda: section_zoo(rep, device, dtypes, models, a.backends)),
    ]
    for name, fn in steps:
        if name not in a.sections:
            continue
        t0 = time.perf_counter()
        log(f"[{name}] start ({rep.left():.0f} s left)")
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a section that crashes is a failed check, the others still run
            traceback.print_exc()
            rep.fail(f"section {name}: {_first_line(err)}")
        log(f"[{name}] {time.perf_counter() - t0:.1f} s")
    text = header(device) + "\n" + "\n".join(t.markdown() for t in rep.tables)
    verdict = (f"**{len(rep.failures)} failed check(s)**: " + "; ".join(rep.failures)) if rep.failures else \
        "**all checks passed**"
    if rep.skipped:
        verdict += f" ({len(rep.skipped)} skipped for time: {', '.join(rep.skipped[:8])}" + \
                   ("..." if len(rep.skipped) > 8 else "") + ")"
    text += f"\n{verdict}\n\nwall time: {time.perf_counter() - rep.t0:.0f} s\n"
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
    if a.json:
        a.json.write_text(json.dumps({"failures": rep.failures, "skipped": rep.skipped, "records": rep.records},
                                     default=str, indent=1))
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
