#!/usr/bin/env python3
"""dynamiclrp benchmark: cost of an explanation relative to one ordinary backward pass.

    python benchmarks/run.py                      # full run (minutes)
    python benchmarks/run.py --quick              # toy sizes, seconds (used by the smoke test)
    python benchmarks/run.py --models cnn bert --presets epsilon --repeats 9 --markdown bench.md
    python benchmarks/run.py --sections main plan # only some tables

Models are frozen (``requires_grad_(False)``, ``eval()``) and only the input requires grad, as explanations are run.
Every ratio is measured in one process with the variants interleaved: each repetition runs the forward pass
alone, forward + plain backward (the baseline: ``torch.autograd.grad(y.sum(), x)``, the gradient w.r.t. the input
only — what an explanation replaces), forward + our explanation for each preset, and forward + each peer's
explanation, in an order rotated every repetition; the ratio is taken inside each repetition and the table shows
the median over repetitions and its interquartile range. Peak memory is measured in a separate process per model
(a profiler session distorts later timings in the same process). ``--trainable`` runs the old set-up (parameters
require grad; the baseline then also differentiates w.r.t. every parameter). See ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if (ROOT / "src").is_dir():
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import dynamiclrp  # noqa: E402
import dynamiclrp.core.graph as _graphs  # noqa: E402
import dynamiclrp.core.prepare as _graph  # noqa: E402  (where graph views are built)
import dynamiclrp.core.run as _engine  # noqa: E402  (where plans are made)

import models as M  # noqa: E402
import peers as P  # noqa: E402

warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True to a scalar.*")

SECTIONS = ("main", "plan", "depth", "batch", "threads")


# =========================================================================================================
# Instrumentation of the engine's phases (graph view, planner) without touching src/
# =========================================================================================================
class PhaseClock:
    """Accumulates wall time spent in ``GraphView(...)`` and ``Planner(...)`` during one explanation.

    Installed by replacing ``dynamiclrp.core.prepare.GraphView`` and ``dynamiclrp.core.run.Planner`` with timing
    subclasses for the lifetime of the benchmark (the engine looks both up at call time). When the engine
    starts caching plans, a cache hit simply shows no planner time.
    """

    def __init__(self) -> None:
        self.graph = 0.0
        self.plan = 0.0
        self.signature = 0.0
        self.installed = False

    def reset(self) -> None:
        self.graph = 0.0
        self.plan = 0.0
        self.signature = 0.0

    def install(self) -> None:
        if self.installed:
            return
        clock = self
        GV, PL = _graph.GraphView, getattr(_engine, "Planner", None)

        class TimedGraphView(GV):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **k):
                t = time.perf_counter()
                try:
                    super().__init__(*a, **k)
                finally:
                    clock.graph += time.perf_counter() - t

        if hasattr(GV, "signature"):
            def signature(self, *a, **k):
                t = time.perf_counter()
                try:
                    return GV.signature(self, *a, **k)
                finally:
                    clock.signature += time.perf_counter() - t
            TimedGraphView.signature = signature
        TimedGraphView.__name__ = GV.__name__
        _graph.GraphView = TimedGraphView
        if PL is not None:
            class TimedPlanner(PL):  # type: ignore[misc, valid-type]
                def __init__(self, *a, **k):
                    t = time.perf_counter()
                    try:
                        super().__init__(*a, **k)
                    finally:
                        clock.plan += time.perf_counter() - t

            TimedPlanner.__name__ = PL.__name__
            _engine.Planner = TimedPlanner
        self._orig = (GV, PL)
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        GV, PL = self._orig
        _graph.GraphView = GV
        if PL is not None:
            _engine.Planner = PL
        self.installed = False


PHASES = PhaseClock()


def count_nodes(y: torch.Tensor) -> int:
    G = PHASES._orig[0] if PHASES.installed else _graph.GraphView
    return len(G([(y.grad_fn, y.output_nr)]))


def graph_params(case: M.Case) -> list[torch.Tensor]:
    """Parameters that take part in the explained output's graph (the baseline differentiates w.r.t. them)."""
    y = case.forward()
    G = PHASES._orig[0] if PHASES.installed else _graph.GraphView
    g = G([(y.grad_fn, y.output_nr)])
    out, seen = [], set()
    for nd, t in zip(g.nodes, g.types):
        if t == "AccumulateGrad":
            v = _graphs.leaf_tensor(nd)
            if isinstance(v, torch.nn.Parameter) and id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


# =========================================================================================================
# Variants: forward (prepare) + what follows (run)
# =========================================================================================================
@dataclass
class Variant:
    key: str                                  # unique within a loop
    kind: str                                 # fwd | base | ours | zennit | autolrp
    preset: str | None
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]
    threads: int | None = None                # torch.set_num_threads before the call (not timed)
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    fwd_wall: list[float] = field(default_factory=list)
    phases: list[tuple[float, float, float, float]] = field(default_factory=list)  # (graph, plan, pass, sig)
    first: tuple[float, float, float, float] | None = None                # (total wall, graph, plan, pass)
    single: bool = False                      # measured once only (too slow to repeat)
    note: str = ""
    mem: tuple[float, float, float] | None = None  # (peak total, level after forward, peak above it), bytes


def v_fwd(case: M.Case) -> Variant:
    return Variant("fwd", "fwd", None, lambda: case.forward(), lambda y: None)


def v_base(case: M.Case, params: list[torch.Tensor], key: str = "base") -> Variant:
    wrt = [case.x] + params

    def run(y):
        return torch.autograd.grad(y.sum(), wrt)
    return Variant(key, "base", None, lambda: case.forward(), run)


def v_ours(case: M.Case, preset: str, key: str | None = None) -> Variant:
    rules = P.our_rules(case, preset)

    def run(y):
        return dynamiclrp.relevance(y, case.x, rules=rules, model=case.model)
    return Variant(key or f"ours:{preset}", "ours", preset, lambda: case.forward(), run)


def v_cached(case: M.Case, preset: str, key: str | None = None) -> Variant | None:
    """``dynamiclrp.Explainer(rules).relevance``: plans cached by graph signature (None if there is none)."""
    cls = getattr(dynamiclrp, "Explainer", None)
    if cls is None:
        return None
    explainer = cls(P.our_rules(case, preset), model=case.model)

    def run(y):
        return explainer.relevance(y, case.x)
    v = Variant(key or f"cached:{preset}", "cached", preset, lambda: case.forward(), run)
    v.explainer = explainer  # type: ignore[attr-defined]
    return v


def v_peer(kind: str, runner: Any, preset: str) -> Variant:
    return Variant(f"{kind}:{preset}", kind, preset, runner.prepare, runner.run)


def _cuda() -> bool:
    return str(M.PLACEMENT["device"]).startswith("cuda")


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _time_once(v: Variant) -> tuple[float, float, float]:
    """(CPU time, wall time, wall time of the forward) of one call. On CUDA the "CPU" clock is the
    synchronised wall clock (CPU time of the host says nothing about GPU work)."""
    if v.threads is not None:
        torch.set_num_threads(v.threads)
    gc.collect()
    PHASES.reset()
    _sync()
    c0, w0 = time.process_time(), time.perf_counter()
    state = v.prepare()
    _sync()
    w1 = time.perf_counter()
    out = v.run(state)
    _sync()
    c2, w2 = time.process_time(), time.perf_counter()
    del state, out
    if _cuda():
        return w2 - w0, w2 - w0, w1 - w0
    return c2 - c0, w2 - w0, w1 - w0


def measure(variants: list[Variant], repeats: int, *, slow_factor: float = 40.0, slow_seconds: float = 60.0,
            log: Callable[[str], None] = print, default_threads: int | None = None) -> None:
    """Warm up every variant once, then run ``repeats`` interleaved rounds (order rotated every round).

    A peer whose warm-up takes more than ``slow_factor`` times the baseline (or more than ``slow_seconds``) is
    measured once more and then left out of the rounds (``single``)."""
    threads0 = torch.get_num_threads() if default_threads is None else default_threads
    base_t = None
    for v in variants:  # warm-up: first call per variant (cold for this graph)
        c, w, fw = _time_once(v)
        v.first = (w, PHASES.graph, PHASES.plan, w - fw)
        if v.kind == "base":
            base_t = w if base_t is None else min(base_t, w)
    for v in variants:
        if v.kind in ("zennit", "autolrp") and base_t is not None:
            c, w, fw = _time_once(v)
            if w > slow_factor * base_t or w > slow_seconds:
                v.single = True
                v.cpu.append(c)
                v.wall.append(w)
                v.fwd_wall.append(fw)
                v.note = "1 run"
    torch.set_num_threads(threads0)
    active = [v for v in variants if not v.single]
    n = len(active)
    for r in range(repeats):
        for j in range(n):
            v = active[(j + r) % n]
            c, w, fw = _time_once(v)
            v.cpu.append(c)
            v.wall.append(w)
            v.fwd_wall.append(fw)
            if v.kind in ("ours", "cached"):
                v.phases.append((PHASES.graph, PHASES.plan, w - fw, PHASES.signature))
        torch.set_num_threads(threads0)
    torch.set_num_threads(threads0)


# =========================================================================================================
# Memory: allocator events recorded by torch.profiler (separate, untimed run)
# =========================================================================================================
@contextlib.contextmanager
def _silence_fd2():
    """Kineto prints GPU-probe errors on fd 2 when the profiler starts on a CPU-only build."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _alloc_trace(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``fn`` under the profiler; return (its result, peak of live bytes above the start, net bytes)."""
    from torch.profiler import ProfilerActivity, profile
    with _silence_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            res = fn()
        evs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    evs.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in evs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return res, float(peak), float(cur)


def measure_memory(v: Variant) -> tuple[float, float, float]:
    """(peak live bytes of forward + pass, bytes live after the forward, peak of the pass above that level).

    Counted: every allocation through PyTorch's CPU allocator (tensor storages, including autograd's and our
    temporaries and the results), relative to the moment before the forward; parameters and the input exist
    before and are not counted."""
    if v.threads is not None:
        torch.set_num_threads(v.threads)
    gc.collect()
    if _cuda():
        return _cuda_memory(v)
    state, peak_f, level = _alloc_trace(v.prepare)
    holder = [state]
    del state

    def go():
        out = v.run(holder[0])
        return out
    out, peak_p, _ = _alloc_trace(go)
    del out
    holder.clear()
    gc.collect()
    return max(peak_f, level + peak_p), level, peak_p


def memory_in_child(args, build: dict, keys: list[str], log: Callable[[str], None]) -> dict[str, tuple]:
    """``measure_memory`` of the variants ``keys`` of the case ``build`` (``{"name": ..., **build kwargs}``), in a
    fresh process: a profiler session leaves the process it ran in slower, so timings and memory never share one.
    Returns ``{key: (peak, level after forward, pass peak)}``; keys that failed are left out."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps({"build": build, "keys": keys}),
           "--device", args.device, "--dtype", args.dtype]
    if args.trainable:
        cmd.append("--trainable")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        log(f"[memory] child failed for {build}: {res.stderr.strip().splitlines()[-1:] if res.stderr else ''}")
        return {}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: tuple(v) for k, v in out.items()}


def _memory_child(spec: str) -> int:
    """The child side of :func:`memory_in_child`: build the case, warm every variant up once, measure each."""
    job = json.loads(spec)
    build = dict(job["build"])
    name = build.pop("name")
    case = M.build(name, **build)
    variants: dict[str, Variant] = {"base": v_base(case, graph_params(case)), "base_x": v_base(case, [], "base_x")}
    for key in job["keys"]:
        kind, _, preset = key.partition(":")
        if kind == "ours":
            variants[key] = v_ours(case, preset)
        elif kind in ("zennit", "autolrp"):
            r = (P.zennit_for if kind == "zennit" else P.autolrp_for)(case, preset)
            if not isinstance(r, str):
                variants[key] = v_peer(kind, r, preset)
    out = {}
    for key in job["keys"]:
        v = variants.get(key)
        if v is None:
            continue
        try:
            v.run(v.prepare())  # warm-up, untraced
            out[key] = measure_memory(v)
        except Exception as err:  # noqa: BLE001 - a peer that fails is reported by the parent as missing
            print(f"{key}: {type(err).__name__}: {err}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def _cuda_memory(v: Variant) -> tuple[float, float, float]:
    """The same three numbers from the CUDA caching allocator's statistics."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    state = v.prepare()
    torch.cuda.synchronize()
    level = torch.cuda.memory_allocated() - start
    peak_f = torch.cuda.max_memory_allocated() - start
    torch.cuda.reset_peak_memory_stats()
    out = v.run(state)
    torch.cuda.synchronize()
    peak_p = torch.cuda.max_memory_allocated() - start - level
    del out, state
    gc.collect()
    return max(peak_f, level + peak_p), float(level), float(peak_p)


# =========================================================================================================
# Statistics and formatting
# =========================================================================================================
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def quart(xs):
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def paired(a: Variant, b: Variant, clock: str = "cpu") -> list[float]:
    """Per-repetition ratios a/b (same round), or a's single time over b's median."""
    xa, xb = getattr(a, clock), getattr(b, clock)
    if a.single or len(xa) != len(xb):
        return [x / med(xb) for x in xa]
    return [x / y for x, y in zip(xa, xb)]


def fmt_ratio(rs: list[float], spread: bool = True, note: str = "") -> str:
    if not rs:
        return "-"
    m = med(rs)
    s = f"{m:.2f}x"
    if spread and len(rs) >= 3:
        lo, hi = quart(rs)
        s += f" [{lo:.2f}-{hi:.2f}]"
    if note:
        s += f" ({note})"
    return s


def fmt_ms(x: float) -> str:
    if x != x:
        return "-"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


class Table:
    def __init__(self, title: str, columns: list[str], notes: list[str] | None = None):
        self.title = title
        self.columns = columns
        self.rows: list[list[str]] = []
        self.notes = notes or []

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        w = [max([len(c)] + [len(r[i]) for r in self.rows]) for i, c in enumerate(self.columns)]
        line = "  ".join(c.ljust(w[i]) for i, c in enumerate(self.columns))
        out = [self.title, "=" * len(self.title), line, "-" * len(line)]
        for r in self.rows:
            out.append("  ".join(r[i].ljust(w[i]) for i in range(len(r))))
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        for r in self.rows:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


def machine_header(args) -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        commit = (commit + ("+local changes in src/" if dirty else "")) or "unknown"
    except Exception:  # noqa: BLE001
        commit = "unknown"
    vers = []
    for mod in ("transformers", "zennit", "autolrp"):
        try:
            vers.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            try:
                from importlib.metadata import version
                vers.append(f"{mod} {version(mod)}")
            except Exception:  # noqa: BLE001
                vers.append(f"{mod} -")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, load average {' '.join(f'{x:.2f}' for x in load)}",
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), python {platform.python_version()}, "
        + ", ".join(vers),
        f"dynamiclrp {getattr(dynamiclrp, '__version__', '?')} at {commit}",
        ("models trainable (--trainable): the baseline differentiates w.r.t. the input and every parameter"
         if args.trainable else "models frozen (requires_grad_(False), eval()); baseline: forward + "
         "torch.autograd.grad(y.sum(), x), the input only"),
        f"repeats {args.repeats} (interleaved, rotated order), clock: "
        + ("wall clock, CUDA-synchronised" if _cuda() else "CPU time (time.process_time) unless noted")
        + (", QUICK (toy sizes)" if args.quick else ""),
    ]


# =========================================================================================================
# Sections
# =========================================================================================================
def _peers_for(case: M.Case, preset: str, args, notes: dict) -> list[Variant]:
    out = []
    for kind, runner_for in (("zennit", P.zennit_for), ("autolrp", P.autolrp_for)):
        if kind not in args.peers:
            continue
        r = runner_for(case, preset)
        err = r if isinstance(r, str) else P.check_runner(r)
        if err:
            notes[(kind, preset)] = err
        else:
            out.append(v_peer(kind, r, preset))
    return out


def _peer_cell(variants: dict, kind: str, preset: str, base: Variant, notes: dict) -> str:
    v = variants.get(f"{kind}:{preset}")
    if v is None:
        n = notes.get((kind, preset), "-")
        return "n/a" if n.startswith("n/a") else n
    return fmt_ratio(paired(v, base), spread=False, note=v.note)


def _zennit_cos(case: M.Case, preset: str, byk: dict) -> str:
    z = byk.get(f"zennit:{preset}")
    if z is None:
        return "-"
    zr = z.run(z.prepare()).detach()
    (ours,) = dynamiclrp.relevance(case.forward(), case.x, rules=P.our_rules(case, preset))
    cos = torch.nn.functional.cosine_similarity(zr.flatten().double(), ours.flatten().double(), dim=0)
    return f"{float(cos):.4f}"


def section_main(args, log, results: dict) -> Table:
    cols = ["model", "nodes", "preset", "fwd ms", "fwd+bwd ms", "ours x [IQR]", "min x", "wall x", "cached x",
            "us/node", "bwd us/node", "Zennit x", "autoLRP x", "mem x", "cos(Zennit)"]
    t = Table("Cost of one explanation: (forward + LRP) / (forward + plain backward)", cols, [
        "ours x: CPU-time ratio of dynamiclrp.relevance (plans every call), median over repetitions of the "
        "per-repetition ratio, [interquartile range]; min x: fastest ours over fastest baseline (robust to load "
        "spikes); wall x: median ratio, wall clock; cached x: dynamiclrp.Explainer(rules).relevance, whose plan "
        "cache hits on every timed round (median ratio).",
        "us/node: (t_ours - t_backward) / autograd nodes of the explained output (CPU time); bwd us/node: "
        "autograd's own t_backward / nodes.",
        "Zennit / autoLRP x: the peer's forward + explanation over the same baseline, same rounds "
        "(Zennit on a canonized copy of the model; autoLRP on its wrapped input).",
        "mem x: peak live tensor bytes of forward + explanation over forward + backward (details in the "
        "memory table).",
        "cos(Zennit): cosine similarity of our relevance and Zennit's (same composite; checks the comparison "
        "is like for like).",
    ])
    mt = Table("Peak memory of forward + explanation vs forward + backward", MEM_COLS, MEM_NOTES)
    for name in args.models:
        log(f"[main] building {name}")
        case = M.build(name, quick=args.quick, attn=args.attn, cnn_width=args.cnn_width)
        params = graph_params(case)
        nodes = count_nodes(case.forward())
        presets = [p for p in args.presets if P.applies(case, p)] or list(P.default_presets(case))
        notes: dict = {}
        variants = [v_fwd(case), v_base(case, params)]
        for p in presets:
            variants.append(v_ours(case, p))
            if not args.no_cache:
                vc = v_cached(case, p)
                if vc is not None:
                    variants.append(vc)
            variants += _peers_for(case, p, args, notes)
        log(f"[main] {name}: {case.desc}; {nodes} nodes; variants {[v.key for v in variants]}")
        base_x = v_base(case, [], "base_x")  # memory only: the gradient w.r.t. the input alone
        t0 = time.perf_counter()
        measure(variants, args.repeats, log=log)
        log(f"[main] {name}: timed in {time.perf_counter() - t0:.0f} s")
        byk = {v.key: v for v in variants}
        if not args.no_memory:
            keys = ["base", "base_x"] + [v.key for v in variants if v.kind in ("ours", "zennit", "autolrp")
                                         and not v.single]
            mem = memory_in_child(args, {"name": name, "quick": args.quick, "attn": args.attn,
                                         "cnn_width": args.cnn_width}, keys, log)
            for v in variants + [base_x]:
                if v.key in mem:
                    v.mem = mem[v.key]
        base, fwd = byk["base"], byk["fwd"]
        tb, tf = med(base.cpu), med(fwd.cpu)
        for p in presets:
            o = byk[f"ours:{p}"]
            mem = "-"
            if o.mem and base.mem:
                mem = f"{o.mem[0] / base.mem[0]:.2f}x"
                mt.add(name, p, *_mem_cells(o, base, base_x, byk))
            t.add(name, nodes, p, fmt_ms(med(fwd.wall)), fmt_ms(med(base.wall)), fmt_ratio(paired(o, base)),
                  f"{min(o.cpu) / min(base.cpu):.2f}x", fmt_ratio(paired(o, base, "wall"), spread=False),
                  fmt_ratio(paired(byk[f"cached:{p}"], base), spread=False) if f"cached:{p}" in byk else "-",
                  f"{(med(o.cpu) - tb) / nodes * 1e6:.0f}", f"{(tb - tf) / nodes * 1e6:.0f}",
                  _peer_cell(byk, "zennit", p, base, notes), _peer_cell(byk, "autolrp", p, base, notes), mem,
                  _zennit_cos(case, p, byk))
        results[name] = {"case": case, "variants": byk, "nodes": nodes, "presets": presets}
        for row in t.rows[-len(presets):]:
            log("  " + "  ".join(row))
    return t, mt


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.3g}"


def _mem_cells(o: Variant, base: Variant, base_x: Variant, byk: dict) -> list[str]:
    def ratio(a, b, i):
        return f"{a.mem[i] / b.mem[i]:.2f}x" if a.mem and b.mem and b.mem[i] > 0 else "-"
    z, al = byk.get(f"zennit:{o.preset}"), byk.get(f"autolrp:{o.preset}")
    return [_mb(base.mem[1]), _mb(base.mem[0]), _mb(base_x.mem[0]) if base_x.mem else "-", _mb(o.mem[0]),
            ratio(o, base, 0), ratio(o, base_x, 0), ratio(o, base, 2), ratio(o, base_x, 2),
            ratio(z, base, 0) if z else "-", ratio(al, base, 0) if al else "-"]


MEM_COLS = ["model", "preset", "after fwd MB", "bwd peak MB", "dx-bwd peak MB", "ours peak MB", "ours/bwd",
            "ours/dx-bwd", "pass ours/bwd", "pass ours/dx-bwd", "Zennit/bwd", "autoLRP/bwd"]
MEM_NOTES = [
    "Live bytes of PyTorch's CPU allocator (torch.profiler memory events, an untimed run per variant in a child "
    "process), counted from just before the forward pass (parameters and the input are not counted).",
    "bwd: the timed baseline, forward + backward w.r.t. the input (and, with --trainable, every parameter); "
    "dx-bwd: forward + backward w.r.t. the input only (the same as bwd for frozen models). peak = highest live "
    "total of forward + pass; pass = highest level during the pass above the level right after the forward. "
    "Measured in a separate process per model.",
]


def section_plan(args, log, results: dict) -> Table:
    cols = ["model", "preset", "nodes", "first call ms", "repeat ms", "first/repeat", "bwd first/repeat",
            "graph view ms", "planner ms", "execute ms", "planning share", "planner us/node", "cached: first ms",
            "cached: repeat ms", "signature ms", "cache hits"]
    t = Table("Planning vs execution (explanation pass only, wall clock, medians)", cols, [
        "first call: the first explanation of this graph in the process (warm-up round); repeat: median of the "
        "timed rounds. dynamiclrp.relevance builds GraphView + Planner on every call. "
        "bwd first/repeat: the same for the plain backward (cold kernels, allocator).",
        "execute = pass - graph view - planner (ValueStore set-up, the step loop, result conversion).",
        "cached: the same passes through dynamiclrp.Explainer (plan cache keyed by the graph signature): first "
        "call (a miss), repeat (hits), time spent computing the signature, hits/calls over the whole loop "
        "(the memory run included).",
    ])
    for name, res in results.items():
        for p in res["presets"]:
            o = res["variants"][f"ours:{p}"]
            if not o.phases or o.first is None:
                continue
            g = med([x[0] for x in o.phases])
            pl = med([x[1] for x in o.phases])
            ps = med([x[2] for x in o.phases])
            ex = ps - g - pl
            b = res["variants"]["base"]
            bfr = b.first[3] / med([w - f for w, f in zip(b.wall, b.fwd_wall)]) if b.first else float("nan")
            c = res["variants"].get(f"cached:{p}")
            cc = ["-"] * 4
            if c is not None and c.phases and c.first is not None:
                info = c.explainer.cache_info()
                cc = [fmt_ms(c.first[3]), fmt_ms(med([x[2] for x in c.phases])),
                      fmt_ms(med([x[3] for x in c.phases])), f"{info['hits']}/{info['hits'] + info['misses']}"]
            t.add(name, p, res["nodes"], fmt_ms(o.first[3]), fmt_ms(ps), f"{o.first[3] / ps:.2f}", f"{bfr:.2f}",
                  fmt_ms(g),
                  fmt_ms(pl), fmt_ms(ex), f"{(g + pl) / ps * 100:.0f}%", f"{pl / res['nodes'] * 1e6:.0f}", *cc)
    return t


def section_depth(args, log) -> Table:
    cols = ["model", "nodes", "preset", "fwd+bwd ms", "ours x [IQR]", "cached x", "us/node", "cached us/node",
            "bwd us/node", "graph view ms", "planner ms", "autoLRP x", "mem x"]
    tok = args.depth_tokens
    hid = M.QUICK["text"]["hidden"] if args.quick else 256
    t = Table(f"Depth scaling: LLaMA-style stacks (hidden {hid}, {tok} tokens, batch 1)", cols, [
        "Linear in depth means constant us/node and ratio as layers grow. graph view / planner: wall ms per "
        "uncached call; cached x: through dynamiclrp.Explainer (plan cache hits)."])
    depths = tuple(args.depths)
    for L in depths:
        name = f"llama-{L}"
        case = M.build(name, quick=args.quick, attn=args.attn, tokens=tok)
        params = graph_params(case)
        nodes = count_nodes(case.forward())
        presets = [p for p in args.presets if p in ("epsilon", "attnlrp", "cplrp")] or ["epsilon"]
        variants = [v_fwd(case), v_base(case, params)]
        for p in presets:
            variants.append(v_ours(case, p))
            if not args.no_cache:
                vc = v_cached(case, p)
                if vc is not None:
                    variants.append(vc)
            if "autolrp" in args.peers and p == presets[0]:
                r = P.autolrp_for(case, p)
                if not isinstance(r, str):
                    variants.append(v_peer("autolrp", r, p))
        log(f"[depth] {name}: {case.desc}; {nodes} nodes")
        measure(variants, args.repeats, slow_factor=args.peer_slow, log=log)
        byk = {v.key: v for v in variants}
        base, fwd = byk["base"], byk["fwd"]
        if not args.no_memory:
            mem = memory_in_child(args, {"name": name, "quick": args.quick, "attn": args.attn, "tokens": tok},
                                  ["base"] + [f"ours:{p}" for p in presets], log)
            for v in (base, *[byk[f"ours:{p}"] for p in presets]):
                v.mem = mem.get(v.key)
        tb, tf = med(base.cpu), med(fwd.cpu)
        for p in presets:
            o = byk[f"ours:{p}"]
            mem = f"{o.mem[0] / base.mem[0]:.2f}x" if o.mem and base.mem else "-"
            al = byk.get(f"autolrp:{p}")
            c = byk.get(f"cached:{p}")
            t.add(name, nodes, p, fmt_ms(med(base.wall)), fmt_ratio(paired(o, base)),
                  fmt_ratio(paired(c, base), spread=False) if c else "-",
                  f"{(med(o.cpu) - tb) / nodes * 1e6:.0f}", f"{(med(c.cpu) - tb) / nodes * 1e6:.0f}" if c else "-",
                  f"{(tb - tf) / nodes * 1e6:.0f}", fmt_ms(med([x[0] for x in o.phases])),
                  fmt_ms(med([x[1] for x in o.phases])),
                  fmt_ratio(paired(al, base), spread=False, note=al.note) if al else "-", mem)
        for row in t.rows[-len(presets):]:
            log("  " + "  ".join(row))
    return t


def section_batch(args, log) -> Table:
    B = 4 if args.quick else args.batch
    tok = args.batch_tokens
    cols = ["model", "variant", f"batch {B} ms", f"{B} x batch 1 ms", "batched speed-up", "ours/bwd (batch)",
            "ours/bwd (singles)"]
    t = Table(f"Batch: one batch of {B} vs {B} single explanations (LLaMA 4 layers, {tok} tokens, CPU time)", cols)
    single = M.build("llama", quick=args.quick, attn=args.attn, tokens=tok, batch=1)
    batched = M.with_batch(single, B, seed=0)
    rows = [M.with_batch(single, 1, seed=1000 + i) for i in range(B)]
    pb = graph_params(batched)
    presets = [p for p in args.presets if p in ("epsilon", "attnlrp", "cplrp")] or ["epsilon"]

    def loop(make):
        runs = [make(c) for c in rows]

        def prepare():
            return None

        def run(_):
            for v in runs:
                v.run(v.prepare())
        return prepare, run

    variants = [v_base(batched, pb, "base:B")]
    pr, rn = loop(lambda c: v_base(c, pb))
    variants.append(Variant("base:1xB", "base", None, pr, rn))
    for p in presets:
        variants.append(v_ours(batched, p, f"ours:{p}:B"))
        pr, rn = loop(lambda c, p=p: v_ours(c, p))
        variants.append(Variant(f"ours:{p}:1xB", "ours1", p, pr, rn))
    log(f"[batch] {batched.desc} vs {B} x batch 1")
    measure(variants, args.repeats, log=log)
    byk = {v.key: v for v in variants}
    bB, b1 = med(byk["base:B"].cpu), med(byk["base:1xB"].cpu)
    t.add("llama", "backward", fmt_ms(bB), fmt_ms(b1), f"{b1 / bB:.1f}x", "", "")
    for p in presets:
        oB, o1 = med(byk[f"ours:{p}:B"].cpu), med(byk[f"ours:{p}:1xB"].cpu)
        t.add("llama", f"ours {p}", fmt_ms(oB), fmt_ms(o1), f"{o1 / oB:.1f}x",
              fmt_ratio(paired(byk[f"ours:{p}:B"], byk["base:B"]), spread=False),
              fmt_ratio(paired(byk[f"ours:{p}:1xB"], byk["base:1xB"]), spread=False))
    return t


def section_threads(args, log) -> Table:
    n0 = torch.get_num_threads()
    cols = ["model", "preset", "threads", "fwd+bwd ms (wall)", "ours x CPU", "ours x wall", "backward speed-up"]
    t = Table(f"Threads: torch.set_num_threads(1) vs default ({n0}), interleaved", cols, [
        "backward speed-up: wall time of forward + backward at 1 thread over this row's thread count."])
    for name in args.thread_models:
        case = M.build(name, quick=args.quick, attn=args.attn, cnn_width=args.cnn_width)
        params = graph_params(case)
        variants = []
        for th in sorted({1, n0}):
            b = v_base(case, params, f"base:{th}")
            b.threads = th
            o = v_ours(case, "epsilon", f"ours:{th}")
            o.threads = th
            variants += [b, o]
        log(f"[threads] {name}")
        measure(variants, args.repeats, log=log, default_threads=n0)
        byk = {v.key: v for v in variants}
        w1 = med(byk["base:1"].wall)
        for th in sorted({1, n0}):
            b, o = byk[f"base:{th}"], byk[f"ours:{th}"]
            t.add(name, "epsilon", th, fmt_ms(med(b.wall)), fmt_ratio(paired(o, b)),
                  fmt_ratio(paired(o, b, "wall"), spread=False), f"{w1 / med(b.wall):.2f}x")
    torch.set_num_threads(n0)
    return t


def _warm_up_process() -> None:
    """One explanation of a tiny unrelated graph, so that 'first call' measures a new graph, not imports."""
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(2, 4, requires_grad=True)
    dynamiclrp.relevance(lin(x)[:, 0], x)


# =========================================================================================================
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds); for smoke tests")
    ap.add_argument("--models", nargs="+", default=None,
                    help="mlp cnn bert gpt2 llama (also llama-<layers>); default: all five")
    ap.add_argument("--presets", nargs="+", default=None,
                    help=f"of {' '.join(P.ALL_PRESETS)}; default: epsilon attnlrp (transformers), "
                         "epsilon gamma_box plus alpha2beta1 (MLP/CNN)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per loop (default 7; quick 2)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--peers", nargs="*", default=["zennit", "autolrp"], choices=["zennit", "autolrp"])
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--cnn-width", type=float, default=None, help="CNN channel multiplier (default 0.25)")
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="layers (default 4 16 64; quick 2 4)")
    ap.add_argument("--depth-tokens", type=int, default=None, help="tokens for the depth section (default 128)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens for the batch section (default 64)")
    ap.add_argument("--thread-models", nargs="+", default=None, help="models for the threads section")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    ap.add_argument("--peer-slow", type=float, default=40.0,
                    help="measure a peer only once when its warm-up exceeds this multiple of the baseline")
    ap.add_argument("--no-memory", action="store_true", help="skip the (untimed) memory runs")
    ap.add_argument("--no-cache", action="store_true", help="leave out the dynamiclrp.Explainer (plan cache) variants")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; on CUDA the clock is the "
                    "synchronised wall clock and memory comes from torch.cuda's allocator statistics")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--trainable", action="store_true",
                    help="parameters require grad (a training graph); the baseline then also differentiates w.r.t. "
                         "every parameter. Default: frozen models, baseline = gradient w.r.t. the input only")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a = ap.parse_args(argv)
    all_models = ["mlp", "cnn", "bert", "gpt2", "llama"]
    a.models = a.models or all_models
    a.presets = a.presets or list(P.ALL_PRESETS[:2]) + list(P.PRESETS_VISION[1:])
    bad = [p for p in a.presets if p not in P.ALL_PRESETS]
    if bad:
        ap.error(f"unknown presets {bad}; choose from {P.ALL_PRESETS}")
    a.repeats = a.repeats or (2 if a.quick else 7)
    a.depths = a.depths or ([2, 4] if a.quick else [4, 16, 64])
    a.depth_tokens = a.depth_tokens or (16 if a.quick else 128)
    a.batch_tokens = a.batch_tokens or (16 if a.quick else 64)
    a.thread_models = a.thread_models or [m for m in ("mlp", "cnn", "bert", "llama") if m in a.models] or a.models[:1]
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    M.PLACEMENT.update(device=torch.device(args.device), dtype=getattr(torch, args.dtype), frozen=not args.trainable)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _memory_child(args.memory_child)
    if _cuda() and "threads" in args.sections:
        args.sections = [s for s in args.sections if s != "threads"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    PHASES.install()
    try:
        _warm_up_process()
        header = machine_header(args)
        tables: list[Table] = []
        results: dict = {}
        t0 = time.perf_counter()
        if "main" in args.sections or "plan" in args.sections:
            t_main, t_mem = section_main(args, log, results)
            if "main" in args.sections:
                tables.append(t_main)
                if not args.no_memory:
                    tables.append(t_mem)
        if "plan" in args.sections:
            tables.append(section_plan(args, log, results))
        if "depth" in args.sections:
            tables.append(section_depth(args, log))
        if "batch" in args.sections:
            tables.append(section_batch(args, log))
        if "threads" in args.sections:
            tables.append(section_threads(args, log))
        header.append(f"total benchmark time {time.perf_counter() - t0:.0f} s; load average at the end "
                      + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        text = "\n".join(header) + "\n\n" + "\n\n".join(tb.text() for tb in tables)
        print(text, flush=True)
        if args.markdown:
            md = "## dynamiclrp benchmark\n\n" + "\n".join(f"- {h}" for h in header) + "\n\n" + \
                 "\n\n".join(tb.markdown() for tb in tables) + "\n"
            args.markdown.write_text(md)
        return 0
    finally:
        PHASES.uninstall()
        M.PLACEMENT.update(device="cpu", dtype=torch.float32, frozen=True)


if __name__ == "__main__":
    sys.exit(main())
