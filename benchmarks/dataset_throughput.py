#!/usr/bin/env python3
"""Dataset attribution throughput on a CPU: samples/s of ``dynamiclrp.attribute_dataset`` against the loops a user
would write, plain forward+backward, and 1 vs 2 ``torchrun`` ranks (issue 14).

    python benchmarks/dataset_throughput.py                     # everything (a few minutes on 2 cores)
    python benchmarks/dataset_throughput.py --models cnn --repeats 3 --no-ranks
    python benchmarks/dataset_throughput.py --ranks-only --rank-model cnn32 --rank-samples 1024

Every model is frozen (``requires_grad_(False)``) and in eval mode, and runs on one intra-op thread. Variants, all
explaining the predicted class of every sample (``logits.gather``), interleaved within each repetition (median
over repetitions, samples/s):

* ``fwd+bwd``: forward + ``torch.autograd.grad(selected.sum(), x)`` w.r.t. the input only, per batch;
* ``relevance per sample``: a loop of ``dynamiclrp.relevance`` over single samples (what a new user writes; run
  on the first ``--per-sample`` samples);
* ``relevance per batch``: a loop of ``dynamiclrp.relevance`` over batches (a new plan every call);
* ``Explainer per batch``: the same loop with one ``dynamiclrp.Explainer`` (plans cached), no storage;
* ``attribute_dataset``: the job, writing a Zarr store (``ledger_every=0``), and with its default ledger (every
  16th batch).

Rank scaling: the job on ``--rank-model`` under ``torchrun --nproc_per_node 1`` and ``2`` (one thread per rank),
timed inside the job (from the call to the store being final; interpreter start-up excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if (ROOT / "src").is_dir():
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dynamiclrp  # noqa: E402


# ==============================================================================================================
# models and data
# ==============================================================================================================
class CNN32(nn.Module):
    """A compute-bound CNN for 3×32×32 images (CIFAR-sized): 3 conv blocks (64-128-256) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*block(3, 64), *block(64, 128), *block(128, 256))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval().requires_grad_(False)


DEFAULT_SAMPLES = {"cnn": 4096, "bert": 512, "cnn32": 512}


def build(name: str, n: int) -> tuple[nn.Module, Any, str, int]:
    """``(model, dataset, rules, batch_size)``."""
    from torch.utils.data import TensorDataset
    gen = torch.Generator().manual_seed(0)
    if name == "cnn":
        from dynamiclrp import demo
        x, y, xt, yt = demo.load_digits_split()
        x, y = torch.cat([x, xt]), torch.cat([y, yt])
        reps = -(-n // len(x))
        return _seeded(demo.DigitsCNN), TensorDataset(x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]), \
            "epsilon", 64
    if name == "cnn32":
        return _seeded(CNN32), TensorDataset(torch.rand(n, 3, 32, 32, generator=gen)), "epsilon", 32
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=64, num_labels=2)
        ids = torch.randint(5, 1000, (n, 32), generator=gen)
        return _seeded(lambda: BertForSequenceClassification(cfg)), _Dicts(ids), "attnlrp", 32
    raise SystemExit(f"unknown model {name!r}: cnn, cnn32, bert")


class _Dicts(torch.utils.data.Dataset):
    """Token ids as dict samples, the way a tokenised Hugging Face dataset gives them."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def _batch(model: nn.Module, data: Any, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected logits, x)`` of samples ``[start, stop)``: a fresh forward pass."""
    if isinstance(data, _Dicts):
        ids = data.ids[start:stop]
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).logits
        x = emb
    else:
        x = data.tensors[0][start:stop].clone().requires_grad_(True)
        logits = model(x)
    return logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1), x


# ==============================================================================================================
# variants
# ==============================================================================================================
def v_backward(model: nn.Module, data: Any, rules: str, bs: int, tmp: Path) -> int:
    n = len(data)
    for i in range(0, n, bs):
        y, x = _batch(model, data, i, min(n, i + bs))
        torch.autograd.grad(y.sum(), x)
    return n


def v_per_sample(limit: int) -> Callable:
    def run(model: nn.Module, data: Any, rules: str, bs: int, tmp: Path) -> int:
        n = min(limit, len(data))
        for i in range(n):
            y, x = _batch(model, data, i, i + 1)
            dynamiclrp.relevance(y, x, rules=rules)
        return n
    return run


def v_per_batch(model: nn.Module, data: Any, rules: str, bs: int, tmp: Path) -> int:
    n = len(data)
    for i in range(0, n, bs):
        y, x = _batch(model, data, i, min(n, i + bs))
        dynamiclrp.relevance(y, x, rules=rules)
    return n


def v_explainer(model: nn.Module, data: Any, rules: str, bs: int, tmp: Path) -> int:
    n = len(data)
    explainer = dynamiclrp.Explainer(rules)
    for i in range(0, n, bs):
        y, x = _batch(model, data, i, min(n, i + bs))
        explainer.relevance(y, x)
    return n


def v_job(ledger_every: int) -> Callable:
    def run(model: nn.Module, data: Any, rules: str, bs: int, tmp: Path) -> int:
        out = tmp / f"job{ledger_every}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        s = dynamiclrp.attribute_dataset(model, data, rules=rules, batch_size=bs, out=out,
                                         ledger_every=ledger_every, progress=False)
        return s.n_computed
    return run


def measure(names: list[str], n: int | None, repeats: int, per_sample: int) -> list[dict]:
    variants = {
        "fwd+bwd (input only)": v_backward,
        f"relevance per sample (first {per_sample})": v_per_sample(per_sample),
        "relevance per batch": v_per_batch,
        "Explainer per batch (no storage)": v_explainer,
        "attribute_dataset (Zarr, no ledger)": v_job(0),
        "attribute_dataset (Zarr, ledger every 16)": v_job(16),
    }
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in names:
            model, data, rules, bs = build(name, n or DEFAULT_SAMPLES[name])
            keys = list(variants)
            for k in keys:  # warm-up (imports, first plans); the per-sample loop on a few samples only
                (v_per_sample(4) if k == keys[1] else variants[k])(model, data, rules, bs, tmp)
            rates: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(repeats):
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order
                    t = time.perf_counter()
                    done = variants[k](model, data, rules, bs, tmp)
                    rates[k].append(done / (time.perf_counter() - t))
            base = statistics.median(rates[keys[0]])
            for k in keys:
                med = statistics.median(rates[k])
                rows.append({"model": name, "variant": k, "samples_per_s": med, "vs_backward": med / base,
                             "rules": rules, "batch": bs, "n": len(data)})
    return rows


# ==============================================================================================================
# ranks
# ==============================================================================================================
def worker(args: argparse.Namespace) -> int:
    """One torchrun rank: run the job, write its summary and CPU time next to the store as JSON."""
    torch.set_num_threads(1)
    model, data, rules, bs = build(args.worker, args.rank_samples)
    cpu = time.process_time()
    s = dynamiclrp.attribute_dataset(model, data, rules=rules, batch_size=bs, out=args.out, ledger_every=0,
                                     progress=False)
    cpu = time.process_time() - cpu
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "seconds": s.seconds, "cpu": cpu,
                                                               "n": s.n_computed, "world": s.world_size}))
    return 0


def ranks(model: str, n: int, repeats: int) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    times: dict[int, list[float]] = {1: [], 2: []}
    cpus: dict[int, list[float]] = {1: [], 2: []}  # CPU seconds of the busiest rank
    with tempfile.TemporaryDirectory() as d:
        for r in range(repeats):
            for procs in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = Path(d) / f"r{r}-{procs}.zarr"  # a new store every run (a finished one is not redone)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(procs), str(Path(__file__).resolve()), "--worker", model, "--rank-samples", str(n),
                       "--out", str(out)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"torchrun failed:\n{res.stderr[-3000:]}")
                results = [json.loads(Path(f"{out}.rank{k}.json").read_text()) for k in range(procs)]
                result = next(x for x in results if x["rank"] == 0)
                if result["n"] != n or len(results) != procs:
                    raise SystemExit(f"the job explained {result['n']} samples on {len(results)} ranks, expected {n}")
                times[procs].append(result["seconds"])
                cpus[procs].append(max(x["cpu"] for x in results))
    one = statistics.median(times[1])
    return [{"model": model, "n": n, "ranks": k, "seconds": statistics.median(times[k]),
             "samples_per_s": n / statistics.median(times[k]), "speedup": one / statistics.median(times[k]),
             "cpu": statistics.median(cpus[k]), "all": times[k]} for k in (1, 2)]


# ==============================================================================================================
# report
# ==============================================================================================================
def header() -> str:
    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} logical CPUs, load average {load[0]:.2f}, "
            f"torch {torch.__version__}, python {platform.python_version()}, 1 intra-op thread per process")


def table(rows: list[dict], rank_rows: list[dict]) -> str:
    out = []
    if rows:
        out += ["| model | variant | samples/s | vs fwd+bwd |", "| --- | --- | ---: | ---: |"]
        for r in rows:
            out.append(f"| {r['model']} ({r['rules']}, batch {r['batch']}, {r['n']} samples) | {r['variant']} | "
                       f"{r['samples_per_s']:,.0f} | {r['vs_backward']:.2f}x |")
    if rank_rows:
        out += ["", "| model | ranks | job seconds (median) | samples/s | speedup | CPU s of the busiest rank |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rank_rows:
            out.append(f"| {r['model']} ({r['n']} samples) | {r['ranks']} | {r['seconds']:.2f} | "
                       f"{r['samples_per_s']:,.0f} | {r['speedup']:.2f}x | {r['cpu']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cnn", "bert"], help="cnn (digits), bert (tiny), cnn32")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per variant (default: cnn 4096, bert 512, cnn32 512)")
    p.add_argument("--per-sample", type=int, default=256, help="samples of the per-sample loop (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions (median; default 5)")
    p.add_argument("--no-ranks", action="store_true", help="skip the torchrun 1 vs 2 ranks measurement")
    p.add_argument("--ranks-only", action="store_true", help="only the torchrun measurement")
    p.add_argument("--rank-model", default="cnn32", help="model of the rank measurement (default cnn32)")
    p.add_argument("--rank-samples", type=int, default=1024, help="samples of the rank measurement (default 1024)")
    p.add_argument("--rank-repeats", type=int, default=3, help="repetitions of the rank measurement (default 3)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)
    print(header(), flush=True)
    rows = [] if args.ranks_only else measure(args.models, args.samples, args.repeats, args.per_sample)
    if rows:
        print(table(rows, []), flush=True)
    rank_rows = [] if args.no_ranks else ranks(args.rank_model, args.rank_samples, args.rank_repeats)
    if rank_rows:
        print(table([], rank_rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"header": header(), "throughput": rows, "ranks": rank_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
