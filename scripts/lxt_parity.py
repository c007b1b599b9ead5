"""Measure how close ``presets.attnlrp`` / ``presets.cplrp`` are to LXT 2.1 (efficient), under LXT's own convention.

LXT (``lxt`` on PyPI, version 2.1) needs transformers 4.5x and torchvision, so this runs in its own venv, with
dynamiclrp imported from source (see ``docs/dev/lxt-parity.md`` for the venv)::

    PYTHONPATH=src /work/lxt-venv/bin/python scripts/lxt_parity.py              # the table (about 1.5 minutes)
    PYTHONPATH=src /work/lxt-venv/bin/python scripts/lxt_parity.py --layers     # + relevance at every hidden state
    PYTHONPATH=src /work/lxt-venv/bin/python scripts/lxt_parity.py --bisect     # + ε = 1e-6 on one layer at a time
    PYTHONPATH=src /work/lxt-venv/bin/python scripts/lxt_parity.py --only llama:attnlrp --lxt-identity-eps 0
    PYTHONPATH=src /work/lxt-venv/bin/python scripts/lxt_parity.py --attn sdpa  # HF models on SDPA instead of eager

Every (model, rule set) case runs in its own subprocess, because LXT patches classes process-wide with no undo
(and its BERT/ViT maps patch ``torch.nn.LayerNorm``, ``torch.nn.Dropout``, ``torch.nn.GELU`` and
``torch.nn.MultiheadAttention`` themselves). Inside a case:

1. a tiny model with random weights is built from a config (float64, eval, eager attention unless ``--attn sdpa``),
   *before* ``lxt`` is imported; ours is computed on it with
   ``dynamiclrp.relevance(logit, inputs_embeds, rules=preset(epsilon=E))`` for E in (1e-6, 0), once trainable
   (parameters require grad, ``inputs_embeds = embed(ids)``), once frozen (``requires_grad_(False)``,
   ``inputs_embeds = embed(ids).detach().requires_grad_()``) and, where ``relevance`` takes ``model=``, frozen
   with ``model=model``;
2. the functions LXT will replace are recorded, then ``lxt.efficient.monkey_patch(module, patch_map)`` runs; the
   script checks that they did change (so ours ran unpatched) and that the patched model's plain forward gives
   the same logits;
3. a fresh model of the (now patched) class gets the same state dict; LXT's convention, as in its README and
   examples: parameters frozen, ``inputs_embeds.requires_grad_()``, ``logit.backward()`` (gradient 1, i.e.
   relevance seed = the logit value), relevance = ``inputs_embeds * inputs_embeds.grad``.

Reported per row: max|ours − LXT| / max|LXT| over the input relevance (element-wise) and over per-token sums
(ViT: relevance at the pixels, as in LXT's ViT example; "token" = a 4×4 patch), and the totals Σ ours, Σ LXT next
to the explained logit. Results are in ``docs/dev/lxt-parity.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

SEQ = 5          # tokens
HIDDEN = 32
LAYERS = 2
VOCAB = 64
EPSILONS = (1e-6, 0.0)
ATTN = os.environ.get("LXT_PARITY_ATTN", "eager")  # HF attention kernel; --attn sdpa sets it for the subprocesses
INIT = HIDDEN ** -0.5  # weight std: unit-scale pre-activations as in a full-size model (HF's 0.02 suits d ≈ 4096)

# model -> LXT variants it supports (LXT 2.1: BERT has only the AttnLRP map, torchvision's ViT only CP-LRP)
CASES = {
    "llama": ("attnlrp", "cplrp"),
    "qwen2": ("attnlrp", "cplrp"),
    "qwen3": ("attnlrp", "cplrp"),
    "gemma3": ("attnlrp", "cplrp"),
    "gpt2": ("attnlrp", "cplrp"),
    "bert": ("attnlrp",),
    "vit": ("cplrp",),
}


# --------------------------------------------------------------------------------------------------------------
# models (built from configs, random weights)
# --------------------------------------------------------------------------------------------------------------
def _hf_module(name):
    import importlib
    return importlib.import_module({
        "llama": "transformers.models.llama.modeling_llama",
        "qwen2": "transformers.models.qwen2.modeling_qwen2",
        "qwen3": "transformers.models.qwen3.modeling_qwen3",
        "gemma3": "transformers.models.gemma3.modeling_gemma3",
        "gpt2": "transformers.models.gpt2.modeling_gpt2",
        "bert": "transformers.models.bert.modeling_bert",
        "vit": "torchvision.models.vision_transformer",
    }[name])


def build(name):
    """A fresh tiny model, classes looked up *now* (after patching, BERT's are LXT's replacements)."""
    import torch
    mod = _hf_module(name)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=64, attn_implementation=ATTN,
                  initializer_range=INIT)
    if name == "llama":
        from transformers import LlamaConfig
        model = mod.LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif name == "qwen2":
        from transformers import Qwen2Config
        model = mod.Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    elif name == "qwen3":
        from transformers import Qwen3Config
        model = mod.Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=8, **common))
    elif name == "gemma3":
        from transformers import Gemma3TextConfig
        model = mod.Gemma3ForCausalLM(Gemma3TextConfig(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                                       sliding_window=4, **common))
    elif name == "gpt2":
        from transformers import GPT2Config
        model = mod.GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                               n_positions=64, attn_implementation=ATTN,
                                               initializer_range=INIT))
    elif name == "bert":
        from transformers import BertConfig
        model = mod.BertForSequenceClassification(BertConfig(num_labels=3, type_vocab_size=2, **common))
    elif name == "vit":
        model = mod.VisionTransformer(image_size=16, patch_size=4, num_layers=LAYERS, num_heads=4, hidden_dim=HIDDEN,
                                      mlp_dim=2 * HIDDEN, num_classes=10)
        with torch.no_grad():  # torchvision initialises the classifier head to zero
            model.heads.head.weight.copy_(INIT * torch.randn(model.heads.head.weight.shape,
                                                             generator=torch.Generator().manual_seed(3)))
    else:
        raise KeyError(name)
    _randomise_biases(model)
    return model.to(torch.float64).eval()


def _randomise_biases(model):
    """HF/torchvision initialise biases (and LayerNorm β) to 0; make them non-zero so that bias sinks matter
    (GPT-2, BERT, ViT, Qwen2's q/k/v projections)."""
    import torch
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def inputs(name):
    import torch
    g = torch.Generator().manual_seed(2)
    if name == "vit":
        return torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    return torch.randint(0, VOCAB, (1, SEQ), generator=g)


def embed(name, model, x):
    """The tensor relevance is read at: input embeddings (text), pixels (ViT, as LXT's ViT example)."""
    return x.clone() if name == "vit" else model.get_input_embeddings()(x)


def forward(name, model, e, hidden=False):
    """(explained logit vector, optional list of hidden states) from the embeddings ``e``."""
    if name == "vit":
        hs = []
        if hidden:
            hooks = [blk.register_forward_hook(lambda m, i, o: hs.append(o)) for blk in model.encoder.layers]
        out = model(e)
        if hidden:
            for h in hooks:
                h.remove()
        return out[0], hs
    out = model(inputs_embeds=e, output_hidden_states=hidden, use_cache=False) if name != "bert" else \
        model(inputs_embeds=e, output_hidden_states=hidden)
    logits = out.logits[0, -1] if name != "bert" else out.logits[0]
    return logits, (list(out.hidden_states) if hidden else [])


def token_sums(name, r):
    """Per-token relevance: sum over the hidden dimension (text) or over each patch's pixels (ViT)."""
    if name == "vit":
        p = 4
        b, c, h, w = r.shape
        return r.reshape(b, c, h // p, p, w // p, p).sum(dim=(1, 3, 5)).reshape(-1)
    return r.sum(-1).reshape(-1)


# --------------------------------------------------------------------------------------------------------------
# one case, in its own process
# --------------------------------------------------------------------------------------------------------------
def _watched(name):
    """(owner, attribute) pairs that LXT's map for this model replaces; checked before/after patching."""
    import torch
    mod = _hf_module(name)
    if name == "vit":
        return [(torch.nn.GELU, "forward"), (torch.nn.LayerNorm, "forward"), (torch.nn.MultiheadAttention, "forward")]
    if name == "bert":
        return [(torch.nn.LayerNorm, "forward"), (mod, "BertSelfAttention"), (mod, "BertForSequenceClassification")]
    if name == "gpt2":
        return [(mod.GPT2MLP, "forward"), (torch.nn.LayerNorm, "forward"), (mod, "eager_attention_forward")]
    cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}[name]
    norm = (getattr(mod, cls + "RMSNorm"), "_norm" if name == "gemma3" else "forward")
    return [(getattr(mod, cls + "MLP"), "forward"), norm, (mod, "eager_attention_forward")]


def _rel(a, b):
    d = (a - b).abs().max().item()
    s = b.abs().max().item()
    return d / s if s > 0 else float("nan")


def _linear_modules(model):
    """(label, name to pass to ``with_layers``) for every module holding a linear-type op's weight (nn.Linear,
    GPT-2's Conv1D, nn.Conv2d, the packed in-projection of nn.MultiheadAttention), in module order. A weight tied
    to an earlier module (GPT-2's and Gemma3's ``lm_head`` share the input embedding) is resolved by dynamiclrp
    under that earlier module's name, so that name is the one passed."""
    import torch
    owner = {}
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), n)
    out = []
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or type(m).__name__ == "Conv1D" or \
                isinstance(m, torch.nn.MultiheadAttention):
            w = m.in_proj_weight if isinstance(m, torch.nn.MultiheadAttention) else m.weight
            first = owner[id(w)]
            out.append((n if first == n else f"{n} (tied: {first})", first))
    return out


def run_case(name, variant, layers=False, bisect=False, lxt_identity_eps=None):
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    assert "lxt" not in sys.modules
    import dynamiclrp
    from dynamiclrp import presets

    model = build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs(name)
    watched = _watched(name)
    before = [getattr(o, a) for o, a in watched]

    # ---------------------------------------------------------------- ours, on the unpatched class
    with torch.no_grad():
        ref_logits, _ = forward(name, model, embed(name, model, x))
    target = int(ref_logits.argmax())
    preset = getattr(presets, variant)
    ours = {}
    ours_layers = {}
    import inspect
    sides = ["trainable", "frozen"]
    if "model" in inspect.signature(dynamiclrp.relevance).parameters:
        sides.append("frozen+model")  # relevance(..., model=model): lets the engine read frozen parameters
    for side in sides:
        frozen = side != "trainable"
        model.requires_grad_(not frozen)
        kw = {"model": model} if side == "frozen+model" else {}
        for eps in EPSILONS:
            key = f"{side}:{eps:g}"
            e = embed(name, model, x)
            if frozen or name == "vit":
                e = e.detach().requires_grad_()
            logits, hs = forward(name, model, e, hidden=layers)
            try:
                rules = preset(epsilon=eps)
                (r,) = dynamiclrp.relevance(logits[target], e, rules=rules, **kw)
                ours[key] = r.detach()
                if layers and not frozen:
                    ours_layers[eps] = [t.detach() for t in dynamiclrp.relevance(logits[target], hs, rules=rules)]
            except Exception as exc:  # report, do not fix
                ours[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            assert all(getattr(o, a) is f for (o, a), f in zip(watched, before)), "ours ran on a patched class"
    ours_bisect = {}
    if bisect:  # ε = 1e-6 on one linear-type module, ε = 0 everywhere else
        from dynamiclrp.rules import Epsilon
        model.requires_grad_(True)
        for label, mod_name in _linear_modules(model):
            e = embed(name, model, x)
            if name == "vit":
                e = e.detach().requires_grad_()
            logits, _ = forward(name, model, e)
            rules = preset(epsilon=0.0).with_layers({mod_name: Epsilon(1e-6)}, model=model)
            try:
                (r,) = dynamiclrp.relevance(logits[target], e, rules=rules)
                ours_bisect[label] = r.detach()
            except Exception as exc:
                ours_bisect[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    model.requires_grad_(False)

    # ---------------------------------------------------------------- LXT
    from lxt.efficient import monkey_patch
    import lxt.efficient.models as lxt_models
    lxt_mod = getattr(lxt_models, {"vit": "vit_torch"}.get(name, name))
    patch_map = getattr(lxt_mod, "attnLRP" if variant == "attnlrp" else "cp_LRP")
    import warnings
    if lxt_identity_eps is not None:  # diagnostic: the 1e-10 in LXT's identity rule, act(x) / (x + 1e-10)
        from lxt.efficient.rules import identity_rule_implicit_fn
        identity_rule_implicit_fn.forward.__defaults__ = (lxt_identity_eps,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkey_patch(_hf_module(name), patch_map=patch_map)
    after = [getattr(o, a) for o, a in watched]
    changed = [f"{getattr(o, '__name__', o)}.{a}" for (o, a), f0, f1 in zip(watched, before, after) if f0 is not f1]
    unchanged = [f"{getattr(o, '__name__', o)}.{a}" for (o, a), f0, f1 in zip(watched, before, after) if f0 is f1]

    m2 = build(name)
    m2.load_state_dict(state)
    m2.requires_grad_(False)
    e = embed(name, m2, x).detach().requires_grad_()
    logits, hs = forward(name, m2, e, hidden=layers)
    for h in hs:
        h.retain_grad()
    fwd_diff = (logits.detach() - ref_logits).abs().max().item()
    sel = logits[target]
    sel.backward()
    r_lxt = (e * e.grad).detach()
    lxt_layers = [(h * h.grad).detach() for h in hs] if layers else []

    out = {"model": name, "variant": variant, "logit": sel.item(), "target": target, "lxt_sum": r_lxt.sum().item(),
           "patched": changed, "not_patched": unchanged, "forward_diff": fwd_diff,
           "patched_class_differs": type(m2) is not type(model) or bool(changed), "rows": []}
    lt = token_sums(name, r_lxt)
    for key, r in ours.items():
        side, eps = key.split(":")
        row = {"side": side, "eps": float(eps)}
        if isinstance(r, str):
            row["error"] = r
        else:
            row.update(elem=_rel(r, r_lxt), token=_rel(token_sums(name, r), lt), ours_sum=r.sum().item())
            t = ours.get(f"trainable:{eps}")
            if side != "trainable" and isinstance(t, torch.Tensor):
                row["vs_trainable"] = _rel(r, t)  # ours frozen vs ours trainable
        out["rows"].append(row)
    if layers:
        out["layers"] = {}
        for eps, rs in ours_layers.items():
            out["layers"][f"{eps:g}"] = [
                {"layer": i, "elem": _rel(a, b), "ours_sum": a.sum().item(), "lxt_sum": b.sum().item()}
                for i, (a, b) in enumerate(zip(rs, lxt_layers))]
    if bisect:
        out["bisect"] = {k: (v if isinstance(v, str) else _rel(v, r_lxt)) for k, v in ours_bisect.items()}
    out["lxt_identity_eps"] = lxt_identity_eps
    return out


# --------------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------------
def _versions():
    import importlib.metadata as md
    v = {}
    for p in ("torch", "torchvision", "transformers", "lxt", "numpy"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = "absent"
    try:
        import dynamiclrp
        src = os.path.dirname(dynamiclrp.__file__)
        git = subprocess.run(["git", "-C", src, "describe", "--always", "--dirty"], capture_output=True, text=True)
        v["dynamiclrp"] = f"{src} ({git.stdout.strip() or 'not a git checkout'})"
    except ImportError as exc:
        v["dynamiclrp"] = f"not importable: {exc}"
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="cases as model:variant (default: all)")
    ap.add_argument("--layers", action="store_true", help="also compare relevance at every hidden state")
    ap.add_argument("--bisect", action="store_true",
                    help="ε = 1e-6 on one linear-type module at a time (ε = 0 elsewhere): which layer moves ours")
    ap.add_argument("--lxt-identity-eps", type=float, default=None,
                    help="diagnostic: replace the 1e-10 of LXT's identity rule act(x)/(x + 1e-10), e.g. by 0")
    ap.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                    help="HF attention implementation (ViT always uses nn.MultiheadAttention, i.e. fused SDPA)")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()

    if args.case:
        name, variant = args.case.split(":")
        try:
            res = run_case(name, variant, layers=args.layers, bisect=args.bisect,
                           lxt_identity_eps=args.lxt_identity_eps)
        except Exception as exc:
            res = {"model": name, "variant": variant, "fatal": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()}
        print("@@RESULT@@" + json.dumps(res))
        return 0

    cases = [f"{m}:{v}" for m, vs in CASES.items() for v in vs] if not args.only else args.only
    print("versions:", ", ".join(f"{k} {v}" for k, v in _versions().items()))
    print(f"attention: {args.attn}; float64; {LAYERS} layers, hidden {HIDDEN}, {SEQ} tokens; weight std {INIT:.3f}")
    results = []
    t0 = time.time()
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case] + (["--layers"] if args.layers else []) \
            + (["--bisect"] if args.bisect else []) \
            + (["--lxt-identity-eps", repr(args.lxt_identity_eps)] if args.lxt_identity_eps is not None else [])
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LXT_PARITY_ATTN": args.attn})
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT@@")]
        if not line:
            results.append({"model": case, "fatal": f"subprocess rc={p.returncode}: {p.stderr[-2000:]}"})
        else:
            results.append(json.loads(line[0][len("@@RESULT@@"):]))
    if args.json:
        print(json.dumps(results, indent=1))
    _print_table(results)
    if args.layers:
        _print_layers(results)
    if args.bisect:
        _print_bisect(results)
    print(f"({time.time() - t0:.0f} s)")
    return 0


def _print_table(results):
    hdr = (f"{'model':7s} {'rules':8s} {'side':12s} {'eps':>6s} {'elem rel':>9s} {'token rel':>9s} "
           f"{'sum ours':>11s} {'sum LXT':>11s} {'logit':>11s}")
    print(hdr)
    print("-" * len(hdr))
    for res in results:
        if "fatal" in res:
            print(f"{res['model']:7s} {res.get('variant', ''):8s} FAILED: {res['fatal']}")
            print(res.get("trace", ""))
            continue
        for row in res["rows"]:
            lead = f"{res['model']:7s} {res['variant']:8s} {row['side']:12s} {row['eps']:6g} "
            if "error" in row:
                print(lead + f"raises {row['error']}")
            else:
                vt = f"  (vs ours trainable {row['vs_trainable']:.0e})" if "vs_trainable" in row else ""
                print(lead + f"{row['elem']:9.1e} {row['token']:9.1e} {row['ours_sum']:11.6f} "
                      f"{res['lxt_sum']:11.6f} {res['logit']:11.6f}{vt}")
    print()
    print("checks: LXT-patched functions / plain-forward max|Δlogits| patched vs unpatched")
    for res in results:
        if "fatal" not in res:
            print(f"  {res['model']:7s} {res['variant']:8s} patched: {', '.join(res['patched']) or 'NOTHING'}"
                  f"{'; unchanged: ' + ', '.join(res['not_patched']) if res['not_patched'] else ''}"
                  f"; forward Δ {res['forward_diff']:.1e}")


def _print_layers(results):
    print()
    print("per-layer relevance (trainable side): max|ours − LXT| / max|LXT| at hidden state i (HF: "
          "hidden_states[i], h0 = the input embeddings, last = top of the stack; ViT: output of block i)")
    for res in results:
        if "layers" not in res:
            continue
        for eps, rows in res["layers"].items():
            cells = "  ".join(f"h{r['layer']}:{r['elem']:.1e}" for r in rows)
            print(f"  {res['model']:7s} {res['variant']:8s} eps={eps:6s} {cells}")


def _print_bisect(results):
    print()
    print("bisect (trainable side): ε = 1e-6 on ONE module, ε = 0 elsewhere -> max|ours − LXT| / max|LXT|")
    for res in results:
        if "bisect" not in res:
            continue
        items = sorted(res["bisect"].items(), key=lambda kv: -kv[1] if isinstance(kv[1], float) else 0)
        print(f"  {res['model']} {res['variant']}:")
        for k, v in items:
            print(f"    {k:55s} {v:.1e}" if isinstance(v, float) else f"    {k:55s} {v}")


if __name__ == "__main__":
    sys.exit(main())
