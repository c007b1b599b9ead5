"""``dynamiclrp demo``: the README demo, offline and in seconds.

1. Trains a tiny CNN on scikit-learn's handwritten digits (8×8 images shipped with scikit-learn).
2. Explains a few test digits with LRP and writes ``digits.png``: each digit above its heatmap
   (red: evidence for the predicted class, blue: against it).
3. Prints the relevance ledger of one explanation: where every unit of the explained logit went.
4. Measures faithfulness with pixel flipping: ABPC (area between the LeRF and MoRF curves; larger is better)
   for several rule sets and for a random attribution (≈ 0), written to ``pixel_flipping.png``.
5. Trains a one-layer transformer on synthetic movie-review sentences and writes ``sentiment.html``: each
   review's tokens coloured by their relevance for the predicted sentiment.

Everything is seeded: the same ``--seed`` gives the same model, numbers and pictures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..demo import VOCAB, encode_words, load_digits_split, make_reviews, train_digits_cnn, train_sentiment
from ..api import explain, relevance

__all__ = ["add_arguments", "run"]


# ==============================================================================================================
# command
# ==============================================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dynamiclrp demo``."""
    from . import plain

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = plain(__doc__.split("\n\n", 1)[1]) if __doc__ else None
    parser.add_argument("--out", "-o", type=Path, default=Path("dynamiclrp-demo"),
                        help="output directory for digits.png, pixel_flipping.png and sentiment.html "
                             "(default: ./dynamiclrp-demo)")
    parser.add_argument("--seed", type=int, default=0, 
                        help="seed for data split, training and tie-breaking (default 0)")
    parser.add_argument("--digits", type=int, default=8, metavar="N", help="number of test digits to show (default 8)")
    parser.add_argument("--rules", default="epsilon", metavar="PRESET",
                        help="rule preset for the digit heatmaps, optionally with parameters "
                             "('epsilon:epsilon=0.1'; default: epsilon); epsilon_gamma_box uses the pixel range "
                             "[0, 1] as bounds unless given")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the digits CNN (default 6)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these tiny models run fastest on one thread)")
    parser.add_argument("--no-text", action="store_true", help="skip the sentiment (HTML) part")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _rules(spec: str) -> Any:
    """The rule set of ``--rules``: any preset spec; epsilon_gamma_box gets the pixel range [0, 1] as bounds."""
    from .. import presets

    return presets.parse(spec, low=0.0, high=1.0)


def _explain_digits(model: nn.Module, x: Tensor, target: Tensor, rules: Any, ledger: bool = False) -> Any:

    x = x.clone().requires_grad_(True)
    logits = model(x)
    return explain(logits.gather(1, target[:, None]).squeeze(1), x, rules=rules, ledger=ledger,
                              model=model)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    if args.threads < 1:
        print(f"dynamiclrp demo: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    progress = not args.no_progress
    from ..errors import RuleError
    from ..extras import require

    for module in ("sklearn", "matplotlib", "PIL.Image"):  # before anything is trained
        require(module, "dynamiclrp demo")
    try:
        from .. import metrics, viz

        rules = _rules(args.rules)
        if args.digits < 1:
            raise ValueError(f"--digits must be at least 1, got {args.digits}")
        if args.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (RuleError, ValueError, OSError) as err:
        print(f"dynamiclrp demo: error: {err}", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    model = train_digits_cnn(x_tr, y_tr, epochs=args.epochs, seed=args.seed, progress=progress)
    with torch.no_grad():
        pred = model(x_te).argmax(1)
    acc = float((pred == y_te).float().mean())
    print(f"digits CNN: {len(y_tr)} training images, test accuracy {acc:.1%}")

    # ---- heatmaps ---------------------------------------------------------------------------------------------
    k = min(args.digits, len(y_te))
    xs, ps, ys = x_te[:k], pred[:k], y_te[:k]
    ex = _explain_digits(model, xs, ps, rules, ledger=True)
    rel = ex.relevance[0].detach()
    heat = viz.heatmap(rel, cmap="bwr")
    cells = [xs[i, 0] for i in range(k)] + [heat[i] for i in range(k)]
    titles = [f"digit {int(ys[i])}" for i in range(k)] + [f"R for '{int(ps[i])}'" for i in range(k)]
    fig = viz.grid(cells, ncols=k, titles=titles, cell_size=1.6,
                   suptitle=f"LRP ({args.rules}) of the predicted class; red = for, blue = against")
    digits_png = viz.save_png(fig, out / "digits.png")
    print(f"\nrelevance ledger of the {k} explained digits (seed = their predicted logits, summed):")
    print(ex.ledger.summary(top=3))

    # ---- faithfulness -----------------------------------------------------------------------------------------
    n_eval = min(200, len(y_te))
    xe, te = x_te[:n_eval], pred[:n_eval]
    candidates: dict[str, Any] = {args.rules: rules}
    for name in ("epsilon", "epsilon_plus", "epsilon_gamma_box"):
        candidates.setdefault(name, _rules(name))
    results = {}
    for name, r in candidates.items():
        attr = _explain_digits(model, xe, te, r).relevance[0].detach()
        results[name] = metrics.pixel_flipping(model, xe, attr, te, occluder="zero", steps=32, score="logit",
                                               seed=args.seed, progress=False, batch_size=1024)
    noise = torch.randn(xe.shape, generator=torch.Generator().manual_seed(args.seed))
    results["random"] = metrics.pixel_flipping(model, xe, noise, te, occluder="zero", steps=32, score="logit",
                                               seed=args.seed, progress=False, batch_size=1024)
    print(f"\npixel flipping on {n_eval} test digits (pixels set to 0; target logit; ABPC = AUC(LeRF) - AUC(MoRF), "
          "larger is more faithful):")
    print(f"  {'attribution':<20} {'AUC MoRF':>9} {'AUC LeRF':>9} {'ABPC':>8}")
    for name, res in results.items():
        print(f"  {name:<20} {res.auc_morf_mean:9.3f} {res.auc_lerf_mean:9.3f} {res.abpc_mean:8.3f}")
    fig = _curves_figure(results)
    curves_png = viz.save_png(fig, out / "pixel_flipping.png")

    written = [digits_png, curves_png]
    # ---- text -------------------------------------------------------------------------------------------------
    if not args.no_text:
        written.append(_sentiment_part(out, args.seed, progress))

    print("\nwrote " + ", ".join(str(p) for p in written) + f"  ({time.perf_counter() - t0:.1f} s)")
    return 0


def _curves_figure(results: dict[str, Any]) -> Any:
    from ..viz import _new_figure

    fig = _new_figure((7.5, 3.2))
    ax_m, ax_l = fig.subplots(1, 2, sharey=True)
    for name, res in results.items():
        style = {"color": "grey", "linestyle": "--"} if name == "random" else {}
        ax_m.plot(res.fractions, res.mean_curve("morf"), label=f"{name} ({res.abpc_mean:.2f})", **style)
        ax_l.plot(res.fractions, res.mean_curve("lerf"), **style)
    ax_m.set_title("MoRF: most relevant removed first")
    ax_l.set_title("LeRF: least relevant removed first")
    for ax in (ax_m, ax_l):
        ax.set_xlabel("fraction of pixels removed")
        ax.grid(alpha=0.3)
    ax_m.set_ylabel("target logit")
    ax_m.legend(title="attribution (ABPC)", fontsize=7, title_fontsize=7)
    return fig


def _sentiment_part(out: Path, seed: int, progress: bool) -> Path:
    from .. import viz

    model = train_sentiment(seed=seed, progress=progress)
    test, labels = make_reviews(300, seed=seed + 1)
    ids, mask = encode_words(test)
    with torch.no_grad():
        acc = float((model(ids, mask).argmax(1) == labels).float().mean())
    print(f"\nsentiment transformer: test accuracy {acc:.1%} on synthetic reviews")
    examples = [["the", "acting", "was", "superb", "but", "the", "plot", "was", "dull", "and", "boring"],
                ["a", "wonderful", "film", "with", "great", "music"],
                ["this", "movie", "is", "really", "terrible"],
                test[0], test[1]]
    examples = [[w for w in s if w in VOCAB] for s in examples]
    ids, mask = encode_words(examples)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=mask)
    pred = logits.argmax(1)
    (rel,) = relevance(logits.gather(1, pred[:, None]).squeeze(1), emb, rules="attnlrp")
    scores = rel.sum(-1).masked_fill(mask == 0, 0)
    vmax = float(scores.abs().max())  # one colour scale for all reviews, so that the single legend is right
    parts = []
    for i, words in enumerate(examples):
        label = "positive" if int(pred[i]) == 1 else "negative"
        logit = float(logits[i, pred[i]].detach())
        body = viz.text_html(words, scores[i, :len(words)], title=f"predicted {label} (logit {logit:.2f})",
                             subword_style="words", vmax=vmax, legend=(i == len(examples) - 1))
        parts.append(body.split("<body>\n", 1)[1].rsplit("</body>", 1)[0])
        print(f"  {label:>8}: " + viz.text_terminal(words, scores[i, :len(words)], subword_style="words", vmax=vmax))
    first = viz.text_html(examples[0], scores[0, :len(examples[0])], subword_style="words")
    head = first.split("<body>", 1)[0].replace("<title>Relevance</title>",
                                                "<title>dynamiclrp demo: sentiment relevance</title>")
    doc = (head + "<body>\n<p>Relevance of each word for the predicted sentiment (AttnLRP), on one colour scale. "
           "Red words speak for the prediction, blue words against it.</p>\n" + "\n".join(parts) + "</body>\n</html>\n")
    return viz.save_html(doc, out / "sentiment.html")
