#!/usr/bin/env python3
"""Profile one explanation pass (not the forward): where does the time go?

    python benchmarks/profile_pass.py --model bert --preset attnlrp            # cProfile + torch.profiler + steps
    python benchmarks/profile_pass.py --model cnn --preset gamma_box --top 30
    python benchmarks/profile_pass.py --model llama --what steps               # per step type only

Prints
  * the phase split: GraphView, Planner, execution (CPU time, fastest of --repeats passes);
  * time per step class and per autograd node type, measured by wrapping every planned step in a timer
    (``--what steps``), with the number of steps and µs per step;
  * cProfile's top functions by cumulative and by own time (``--what cprofile``);
  * torch.profiler's aten ops by self CPU time, for the pass and for a plain backward (``--what ops``);
  * live allocator bytes at each step's entry and its transient peak (``--what memory``).
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent / "src").is_dir():
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

import dynamiclrp  # noqa: E402
import dynamiclrp.core.run as E  # noqa: E402
import models as M  # noqa: E402
import peers as P  # noqa: E402
from run import PHASES, _silence_fd2, graph_params  # noqa: E402


def _clock() -> float:
    """CPU time of this process: not inflated while other processes hold the cores (run with --threads 1)."""
    return time.process_time()


def step_times(case: M.Case, rules, repeats: int) -> list[tuple[str, str, int, float]]:
    """(step class, node type, count, seconds) per (class, type), median over ``repeats`` passes."""
    orig = E.propagate
    per: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    counts: dict[tuple[str, str], int] = {}

    def instrumented(run, *a, **k):
        planner = run.planner
        types = planner.graph.types
        saved = list(planner.steps)
        acc: dict[tuple[str, str], float] = collections.defaultdict(float)
        cnt: dict[tuple[str, str], int] = collections.defaultdict(int)
        for i, st in enumerate(saved):
            if st is None:
                continue
            key = (type(st).__name__, types[i])

            def wrap(r, outs, _st=st, _key=key):
                t = _clock()
                res = _st(r, outs)
                acc[_key] += _clock() - t
                cnt[_key] += 1
                return res
            planner.steps[i] = wrap
        try:
            return orig(run, *a, **k)
        finally:
            planner.steps[:] = saved
            for key, v in acc.items():
                per[key].append(v)
                counts[key] = cnt[key]

    E.propagate = instrumented
    try:
        for _ in range(repeats):
            y = case.forward()
            dynamiclrp.relevance(y, case.x, rules=rules)
    finally:
        E.propagate = orig
    rows = [(k[0], k[1], counts[k], min(v)) for k, v in per.items()]
    rows.sort(key=lambda r: -r[3])
    return rows


def step_memory(case: M.Case, rules, top: int) -> None:
    """Live allocator bytes around every step of one pass: level at entry and transient peak inside."""
    from torch.profiler import ProfilerActivity, profile, record_function
    orig = E.propagate
    spans: list[tuple[str, int, int]] = []

    def instrumented(run, *a, **k):
        planner = run.planner
        types = planner.graph.types
        saved = list(planner.steps)
        for i, st in enumerate(saved):
            if st is None:
                continue
            label = f"{type(st).__name__}:{types[i]}#{i}"

            def wrap(r, outs, _st=st, _label=label):
                t0 = time.perf_counter_ns()
                with record_function("step"):
                    res = _st(r, outs)
                spans.append((_label, t0, time.perf_counter_ns()))
                return res
            planner.steps[i] = wrap
        try:
            return orig(run, *a, **k)
        finally:
            planner.steps[:] = saved

    y = case.forward()
    E.propagate = instrumented
    try:
        with _silence_fd2():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                dynamiclrp.relevance(y, case.x, rules=rules)
            evs = prof.profiler.kineto_results.events()
    finally:
        E.propagate = orig
    mem = sorted(((e.start_ns(), e.nbytes()) for e in evs if e.name() == "[memory]"))
    steps = sorted(((e.start_ns(), e.end_ns()) for e in evs if e.name() == "step"))
    # pair our perf_counter spans with the profiler's "step" events (same order)
    spans.sort(key=lambda s: s[1])
    rows = []
    cur = peak = 0
    j = 0
    for (label, _, _), (s0, s1) in zip(spans, steps):
        while j < len(mem) and mem[j][0] < s0:
            cur += mem[j][1]
            peak = max(peak, cur)
            j += 1
        entry, inner = cur, cur
        while j < len(mem) and mem[j][0] <= s1:
            cur += mem[j][1]
            inner = max(inner, cur)
            j += 1
        peak = max(peak, inner)
        rows.append((label, entry, inner - entry, cur - entry))
    while j < len(mem):
        cur += mem[j][1]
        peak = max(peak, cur)
        j += 1
    mb = 2 ** 20
    print(f"\n## memory during the pass (live bytes above the post-forward level): peak {peak / mb:.1f} MB")
    print(f"{'step':<64} {'entry MB':>9} {'transient MB':>13} {'kept MB':>8}")
    for label, entry, tr, kept in sorted(rows, key=lambda r: -(r[1] + r[2]))[:top]:
        print(f"{label:<64} {entry / mb:>9.1f} {tr / mb:>13.1f} {kept / mb:>8.1f}")


def phases(case: M.Case, rules, repeats: int) -> tuple[float, float, float]:
    PHASES.install()
    out = []
    for _ in range(repeats):
        y = case.forward()
        PHASES.reset()
        t = _clock()
        dynamiclrp.relevance(y, case.x, rules=rules)
        out.append((PHASES.graph, PHASES.plan, _clock() - t))
    PHASES.uninstall()
    return tuple(min(x[i] for x in out) for i in range(3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert")
    ap.add_argument("--preset", default="epsilon")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--what", nargs="+", default=["phases", "steps", "cprofile", "ops"],
                    choices=["phases", "steps", "cprofile", "ops", "memory"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU clocks stay exact)")
    ap.add_argument("--tokens", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    case = M.build(a.model, quick=a.quick, tokens=a.tokens)
    rules = P.our_rules(case, a.preset)
    y = case.forward()
    nodes = len(dynamiclrp.core.graph.GraphView([(y.grad_fn, 0)]))
    dynamiclrp.relevance(y, case.x, rules=rules)  # warm-up
    params = graph_params(case)
    print(f"# {case.name} ({case.desc}), preset {a.preset}, {nodes} nodes, torch threads {torch.get_num_threads()}")

    def base_once():
        y = case.forward()
        t = _clock()
        torch.autograd.grad(y.sum(), [case.x] + params)
        return _clock() - t
    tb = min(base_once() for _ in range(a.repeats))
    print(f"plain backward (x + params): {tb * 1e3:.1f} ms = {tb / nodes * 1e6:.1f} us/node")

    if "phases" in a.what:
        g, p, tot = phases(case, rules, a.repeats)
        print(f"explanation pass: {tot * 1e3:.1f} ms = graph view {g * 1e3:.1f} + planner {p * 1e3:.1f} + "
              f"execute {(tot - g - p) * 1e3:.1f} ms; {(tot - tb) / nodes * 1e6:.0f} us/node over the backward")

    if "steps" in a.what:
        rows = step_times(case, rules, a.repeats)
        tot = sum(r[3] for r in rows)
        print(f"\n## steps: {tot * 1e3:.1f} ms inside step calls (fastest of --repeats per group)")
        print(f"{'step':<22} {'node type':<44} {'n':>4} {'ms':>8} {'us/step':>8} {'share':>6}")
        for cls, typ, n, t in rows[:a.top]:
            print(f"{cls:<22} {typ:<44} {n:>4} {t * 1e3:>8.2f} {t / n * 1e6:>8.0f} {t / tot * 100:>5.1f}%")

    if "memory" in a.what:
        step_memory(case, rules, a.top)

    if "cprofile" in a.what:
        y = case.forward()
        pr = cProfile.Profile()
        pr.enable()
        dynamiclrp.relevance(y, case.x, rules=rules)
        pr.disable()
        for key in ("cumulative", "tottime"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats(key).print_stats(a.top)
            txt = s.getvalue()
            start = txt.find("   ncalls")
            print(f"\n## cProfile by {key}\n" + txt[start:])

    if "ops" in a.what:
        from torch.profiler import ProfilerActivity, profile
        for label, fn in (("explanation", lambda y: dynamiclrp.relevance(y, case.x, rules=rules)),
                          ("plain backward", lambda y: torch.autograd.grad(y.sum(), [case.x] + params))):
            y = case.forward()
            with _silence_fd2():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn(y)
            print(f"\n## torch.profiler, {label}: aten ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
