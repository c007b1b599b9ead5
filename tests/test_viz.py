"""Tests for dynamiclrp.viz: heatmap colour semantics, image I/O, HTML/terminal text, ledger, plots."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

import matplotlib  # noqa: E402
from PIL import Image  # noqa: E402

from dynamiclrp import viz  # noqa: E402

WHITE, RED, BLUE, BLACK = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 0, 0)


def rgb(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in a)


# --------------------------------------------------------------------------------------------
# heatmap
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmap", viz.DIVERGING_CMAPS)
def test_zero_relevance_maps_to_colormap_centre(cmap):
    r = torch.tensor([[0.0, 3.0], [-1.5, 0.0]])
    h = viz.heatmap(r, cmap=cmap)
    assert h.shape == (2, 2, 3) and h.dtype == np.uint8
    centre = np.asarray(viz._get_cmap(cmap)(0.5, bytes=True)[:3])
    np.testing.assert_array_equal(h[0, 0], h[1, 1])
    np.testing.assert_allclose(h[0, 0], centre, atol=1)
    if cmap in matplotlib.colormaps:  # the matplotlib map itself, evaluated at its midpoint
        np.testing.assert_allclose(h[0, 0], matplotlib.colormaps[cmap](0.5, bytes=True)[:3], atol=3)


def test_exact_colours_bwr_and_coldnhot():
    r = np.array([[0.0, 2.0, -2.0]])
    assert [rgb(c) for c in viz.heatmap(r, cmap="bwr")[0]] == [WHITE, RED, BLUE]
    assert [rgb(c) for c in viz.heatmap(r, cmap="coldnhot")[0]] == [BLACK, (255, 255, 0), (0, 255, 255)]


def test_symmetric_normalisation_uses_max_abs():
    r = np.array([[4.0, -2.0, 2.0]])
    sym = viz.heatmap(r)[0]
    assert rgb(sym[0]) == RED  # max |R| -> +1
    # -2 is half-way to blue, the exact mirror of +2
    assert rgb(sym[1]) == (rgb(sym[2])[2], rgb(sym[2])[1], rgb(sym[2])[0])
    assert rgb(sym[1]) not in (BLUE, WHITE)
    minmax = viz.heatmap(r, symmetric=False)[0]
    assert rgb(minmax[1]) == BLUE and rgb(minmax[0]) == RED  # min -> bottom of the map


@pytest.mark.parametrize("cmap", ["bwr", "coldnhot"])
def test_sign_flip_mirrors_colours(cmap):
    # bwr and coldnhot are mirror images under swapping the red and blue channels
    r = torch.randn(5, 17, generator=torch.Generator().manual_seed(0))
    h, hn = viz.heatmap(r, cmap=cmap), viz.heatmap(-r, cmap=cmap)
    np.testing.assert_array_equal(h, hn[..., ::-1])


def test_scale_invariance_and_vmax():
    r = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(viz.heatmap(r), viz.heatmap(7.5 * r))
    # a common vmax puts a map and its half on the same scale: the half is paler
    full, half = viz.heatmap(r, vmax=r.abs().max()), viz.heatmap(r / 2, vmax=r.abs().max())
    assert (np.abs(half.astype(int) - 255).sum() < np.abs(full.astype(int) - 255).sum())


def test_percentile_clipping_saturates():
    r = np.zeros((10, 10))
    r[0, 0] = 100.0  # outlier
    r[1:, :] = 1.0
    plain = viz.heatmap(r)
    clipped = viz.heatmap(r, clip_percentile=90)
    assert rgb(plain[5, 5]) != RED  # washed out by the outlier
    assert rgb(clipped[5, 5]) == RED and rgb(clipped[0, 0]) == RED


def test_channel_reduction_batch_and_numpy():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(2, 3, 5, 4, generator=g)
    batch = viz.heatmap(r)
    assert batch.shape == (2, 5, 4, 3)
    for i in range(2):  # each map normalised on its own, channels summed
        np.testing.assert_array_equal(batch[i], viz.heatmap(r[i]))
        np.testing.assert_array_equal(batch[i], viz.heatmap(r[i].sum(0).numpy()))
    hwc = r[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(viz.heatmap(hwc, channel_dim=-1), batch[0])
    abs_sum = viz.heatmap(r[0], channel_reduce="abs_sum")
    assert (abs_sum[..., 0] == 255).all()  # non-negative map: only the red half of bwr
    pil = viz.heatmap(r, as_pil=True)
    assert len(pil) == 2 and pil[0].size == (4, 5) and pil[0].mode == "RGB"


def test_heatmap_errors():
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.heatmap(np.zeros((2, 2)), cmap="no-such-map")
    with pytest.raises(ValueError, match="shape"):
        viz.heatmap(np.zeros((1, 2, 3, 4, 5)))
    with pytest.raises(ValueError, match="channel_reduce"):
        viz.heatmap(np.zeros((3, 2, 2)), channel_reduce="median")


def test_missing_matplotlib_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for call in (lambda: viz.heatmap(np.ones((2, 2))), lambda: viz.plot_layer_relevance({"a": 1.0})):
        with pytest.raises(ImportError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "needs matplotlib" in message
        assert 'pip install "dynamiclrp[viz]"' in message and 'pip install ".[viz]"' in message
    # the ledger does not need matplotlib
    assert "seed total" in viz.ledger_table([("input", "x", 1.0)])


# --------------------------------------------------------------------------------------------
# images: overlay, PNG, grid
# --------------------------------------------------------------------------------------------
def test_png_round_trip(tmp_path):
    h = viz.heatmap(torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(3)))
    path = viz.save_png(h, tmp_path / "sub" / "h.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), h)
    # PIL images and float tensors in [0, 1] (C, H, W) as well
    viz.save_png(viz.heatmap(torch.ones(4, 4), as_pil=True), tmp_path / "p.png")
    img = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(4))
    viz.save_png(img, tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as im:
        np.testing.assert_array_equal(
            np.asarray(im), np.round(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        )


def test_overlay_blending():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    r = torch.randn(8, 8, generator=torch.Generator().manual_seed(6))
    base = np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(viz.overlay(image, r, alpha=0.0), base)
    # constant opacity: a plain blend
    np.testing.assert_array_equal(viz.overlay(image, r, alpha=1.0, magnitude_weighted=False), viz.heatmap(r))
    half = viz.overlay(image, r, alpha=0.5, magnitude_weighted=False).astype(int)
    assert np.abs(half - (base.astype(int) + viz.heatmap(r).astype(int)) / 2).max() <= 1
    # low-resolution relevance is resized to the image
    assert viz.overlay(image, torch.randn(4, 4)).shape == (8, 8, 3)
    # numpy HWC uint8 image and a batch
    assert viz.overlay(base, r).shape == (8, 8, 3)
    assert viz.overlay(image.expand(2, 3, 8, 8), r.expand(2, 1, 8, 8)).shape == (2, 8, 8, 3)


def test_overlay_opacity_follows_relevance_magnitude():
    """By default the photo shows unchanged where relevance is 0 and the heatmap dominates where |R| is largest."""
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    base = np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    r = torch.zeros(8, 8)
    r[2, 3], r[5, 5], r[6, 1] = 4.0, -4.0, 1.0
    over = viz.overlay(image, r, alpha=1.0).astype(int)
    untouched = (r == 0).numpy()
    np.testing.assert_array_equal(over[untouched], base[untouched])  # transparent at 0
    assert rgb(over[2, 3]) == RED and rgb(over[5, 5]) == BLUE  # opaque at the largest |R|
    partial = viz.overlay(image, r, alpha=1.0, gamma=1.0).astype(float)[6, 1]  # |R| = 1/4 of the maximum
    expected = 0.75 * base[6, 1] + 0.25 * viz.heatmap(r)[6, 1]
    assert np.abs(partial - expected).max() <= 1
    assert np.abs(viz.overlay(image, r, alpha=1.0).astype(float)[6, 1] - viz.heatmap(r)[6, 1]).sum() < \
        np.abs(partial - viz.heatmap(r)[6, 1]).sum()  # gamma < 1 makes small relevance more visible
    with pytest.raises(ValueError, match="gamma must be positive"):
        viz.overlay(image, r, gamma=0.0)


def test_image_figure_has_a_colour_bar_in_relevance_units(tmp_path):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    r = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    fig = viz.image_figure(image, r, clip_percentile=None, path=tmp_path / "f.pdf")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["image", "heatmap", "overlay"]
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(bars) == 1
    low, high = sorted(bars[0].get_ylim())
    scale = float(r.sum(0).abs().max())
    assert low == pytest.approx(-scale) and high == pytest.approx(scale)
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    fig = viz.image_figure(image, r, panels=("overlay",), colorbar=False)
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="panels must be"):
        viz.image_figure(image, r, panels=("photo",))


def test_colormaps_are_matplotlib_objects_and_registration_is_opt_in_and_idempotent(monkeypatch):
    from matplotlib.colors import LinearSegmentedColormap

    cmap = viz.colormap("coldnhot")
    assert isinstance(cmap, LinearSegmentedColormap)
    assert np.abs(np.array(cmap(0.5)[:3])).max() < 0.01  # black-centred
    registry = matplotlib.colormaps
    for name in viz.CUSTOM_CMAPS:  # a clean registry for this test; it is matplotlib's global
        if name in registry:
            monkeypatch.setattr(matplotlib, "colormaps", type(registry)({k: registry[k] for k in registry
                                                                         if k not in viz.CUSTOM_CMAPS}))
            break
    import dynamiclrp.viz  # noqa: F401 - importing (and using) viz registers nothing
    viz.heatmap(np.ones((2, 2)), cmap="wred")
    assert not set(viz.CUSTOM_CMAPS) & set(matplotlib.colormaps)
    assert viz.register_colormaps() == list(viz.CUSTOM_CMAPS)
    assert viz.register_colormaps() == []  # a second call changes nothing
    assert all(name in matplotlib.colormaps for name in viz.CUSTOM_CMAPS)
    with pytest.raises(ValueError, match="unknown dynamiclrp colour map"):
        viz.colormap("hot")


def test_grid_figure_saved(tmp_path):
    items = [viz.heatmap(torch.randn(5, 5)), torch.rand(3, 5, 5), np.zeros((5, 5), np.uint8)]
    fig = viz.grid(items, ncols=2, titles=["a", "b", "c"], path=tmp_path / "grid.png")
    assert len([ax for ax in fig.axes if ax.images]) == 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.size[0] > 0
    with pytest.raises(ValueError, match="titles"):
        viz.grid(items, titles=["only one"])


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
def _spans(doc: str) -> list[tuple[str, str]]:
    return re.findall(r'<span class="dlrp-tok"(?: style="([^"]*)")? title="[^"]*">([^<]*)</span>', doc)


def test_html_escaping_and_self_contained():
    tokens = ["[CLS]", "<script>alert('x')</script>", 'say "hi" & bye', "[SEP]"]
    doc = viz.text_html(tokens, [0.0, 1.0, -1.0, 0.0], title="<b>T</b>")
    assert doc.startswith("<!DOCTYPE html>")
    assert "<script>" not in doc and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in doc
    assert "&quot;hi&quot; &amp; bye" in doc
    assert "<title>&lt;b&gt;T&lt;/b&gt;</title>" in doc
    for external in ("http://", "https://", "<link", "src=", "@import", "$$", "\\("):
        assert external not in doc


def test_html_colours_and_tooltips():
    doc = viz.text_html(["good", "bad", "meh"], torch.tensor([2.0, -2.0, 0.0]), cmap="bwr")
    styles = dict((text, style) for style, text in _spans(doc))
    assert "background-color:#ff0000" in styles["good"]
    assert "background-color:#0000ff" in styles["bad"]
    assert "background-color:#ffffff" in styles["meh"]
    assert "color:#ffffff" in styles["bad"] and "color:#000000" in styles["meh"]  # readable text
    assert 'title="+2  (token &#x27;good&#x27;)"' in doc and 'title="-2  (token' in doc


def test_html_subwords_and_special_tokens():
    # WordPiece: "##" joins without a space; [CLS] is special: outlined, not in the normalisation
    doc = viz.text_html(["[CLS]", "play", "##ing", "now", "[SEP]"], [50.0, 1.0, 0.5, -1.0, 0.0])
    body = re.search(r'<div class="dlrp-text">(.*)</div>\n', doc).group(1)
    text = re.sub(r"<[^>]+>", "", body)
    assert text == "[CLS] playing now [SEP]"
    assert body.count("dlrp-special") == 2
    assert "background-color:#ff0000" in dict((t, s) for s, t in _spans(doc))["play"]  # not washed out
    # byte-level BPE (Ġ = space before) and SentencePiece (▁ = space before)
    for tokens in (["Hello", "Ġwor", "ld", "!"], ["▁Hello", "▁wor", "ld", "!"]):
        body = re.search(r'<div class="dlrp-text">(.*)</div>\n', viz.text_html(tokens, [1, 2, 3, 4])).group(1)
        assert re.sub(r"<[^>]+>", "", body) == "Hello world!"  # no markers in the visible text


def test_save_html(tmp_path):
    doc = viz.text_html(["ünïcode", "✓"], [1.0, -1.0])
    path = viz.save_html(doc, tmp_path / "x" / "t.html")
    assert path.read_text(encoding="utf-8") == doc


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_terminal_colours_and_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    out = viz.text_terminal(["Ġgood", "Ġbad", "Ġmeh"], [1.0, -1.0, 0.0], color=True)
    assert "\x1b[48;2;255;0;0m" in out and "\x1b[48;2;0;0;255m" in out and "\x1b[48;2;255;255;255m" in out
    assert re.sub(r"\x1b\[[0-9;]*m", "", out) == "good bad meh"
    plain = viz.text_terminal(["Ġgood", "Ġbad", "Ġmeh"], [1.0, -1.0, 0.0], color=False)
    assert "\x1b" not in plain
    assert plain == "good[+1] bad[-1] meh[+0]"
    # the default: colour only on a terminal, NO_COLOR wins, FORCE_COLOR forces
    monkeypatch.setattr(sys, "stdout", _Stream(tty=False))
    assert "\x1b" not in viz.text_terminal(["a"], [1.0])
    monkeypatch.setattr(sys, "stdout", _Stream(tty=True))
    assert "\x1b[" in viz.text_terminal(["a"], [1.0])
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in viz.text_terminal(["a"], [1.0])
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    assert viz.use_color() and not viz.use_color(_Stream(tty=False))
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert viz.use_color(_Stream(tty=False))


def test_text_length_mismatch():
    with pytest.raises(ValueError, match="2 tokens but 3 scores"):
        viz.text_html(["a", "b"], [1, 2, 3])


# --------------------------------------------------------------------------------------------
# ledger and layer plot
# --------------------------------------------------------------------------------------------
class _Row:
    def __init__(self, category, name, total):
        self.category, self.name, self.total = category, name, total


def test_ledger_table_values_and_percentages():
    rows = [("input", "pixel_values", 0.75), _Row("bias", "layer1.0.conv1.bias", torch.tensor([0.05, 0.05]))]
    table = viz.ledger_table(rows, seed_total=1.0)
    lines = table.splitlines()
    assert lines[0] == "Relevance ledger"
    line = {ln.split()[0]: ln for ln in lines[3:] if ln and not ln.startswith("-")}
    assert re.search(r"pixel_values\s+\+0\.7500\s+75\.0 %$", line["input"])
    assert re.search(r"\+0\.1000\s+10\.0 %$", line["bias"])
    assert re.search(r"\+0\.1500\s+15\.0 %$", line["unaccounted"])  # derived: 1 - 0.85
    assert re.search(r"100\.0 %$", [ln for ln in lines if ln.startswith("seed total")][0])
    # fixed width: every value column ends at the same position
    value_lines = [ln for ln in lines[1:] if "%" in ln]
    assert len({len(ln) for ln in value_lines}) == 1


def test_ledger_container_and_inferred_total():
    class Ledger:
        rows = [("a", "x", 2.0), ("b", "y", -1.0)]
        unaccounted = 1.0
        seed_total = None

    table = viz.ledger_table(Ledger(), sort=True)
    # seed total inferred as 2 - 1 + 1 = 2
    assert re.search(r"a\s+x\s+\+2\.000\s+100\.0 %", table)
    assert re.search(r"b\s+y\s+-1\.000\s+-50\.0 %", table)
    assert re.search(r"seed total\s+\+2\.000\s+100\.0 %", table)
    assert table.index(" x ") < table.index(" y ")
    assert "n/a" in viz.ledger_table([("a", "x", 1.0)], seed_total=0.0)
    with pytest.raises(TypeError, match="category, name, total"):
        viz.ledger_table([("only", "two")])


def test_plot_layer_relevance(tmp_path):
    layers = {"fc3": 1.0, "fc2": torch.tensor([0.5, 1.0, -0.5]), "fc1": (0.9, 1.2, -0.3)}
    fig = viz.plot_layer_relevance(layers, tmp_path / "layers.png")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.0, 1.5, 1.2, 0.0, -0.5, -0.3])  # positive bars, negative bars
    line = ax.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([1.0, 1.0, 0.9])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc3", "fc2", "fc1"]
    with Image.open(tmp_path / "layers.png") as im:
        assert im.format == "PNG"
    rel = viz.plot_layer_relevance({"a": 2.0, "b": 1.0}, relative_to=2.0)
    assert list(rel.axes[0].get_lines()[0].get_ydata()) == pytest.approx([1.0, 0.5])


# --------------------------------------------------------------------------------------------
# words, reports and figures of text
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,words", [
    (["[CLS]", "play", "##ing", "chess", "##es", "[SEP]"], ["[CLS]", "playing", "chesses", "[SEP]"]),
    (["▁The", "▁cap", "ital", "▁is", "</s>"], ["The", "capital", "is", "</s>"]),
    (["<|endoftext|>", "The", "Ġcap", "ital", "Ġof", "ĠFr", "ance"], ["<|endoftext|>", "The", "capital", "of",
                                                                      "France"]),
    (["a", "b"], ["a", "b"]),
])
def test_merge_subwords_joins_words_and_sums_relevance(tokens, words):
    scores = np.arange(1.0, len(tokens) + 1)
    merged, summed, special = viz.merge_subwords(tokens, scores)
    assert merged == words
    assert summed.sum() == pytest.approx(scores.sum())  # relevance is conserved
    assert special.tolist() == [w in viz.DEFAULT_SPECIAL_TOKENS for w in words]
    if words == ["[CLS]", "playing", "chesses", "[SEP]"]:
        assert summed.tolist() == [1.0, 5.0, 9.0, 6.0]


def test_merge_words_in_html_and_terminal():
    tokens, scores = ["[CLS]", "play", "##ing", "well", "[SEP]"], [0.0, 1.0, 2.0, -1.0, 0.0]
    doc = viz.text_html(tokens, scores, merge_words=True)
    assert ">playing<" in doc and ">play<" not in doc
    assert viz.text_terminal(tokens, scores, merge_words=True, color=False) == "[CLS] playing[+3] well[-1] [SEP]"


def test_text_report_has_one_section_per_sample_on_one_scale():
    samples = [(["a", "b"], [1.0, -1.0], "first"), {"tokens": ["c"], "scores": [4.0], "title": "second"},
               (["d"], [0.5])]
    doc = viz.text_report(samples, title="three texts")
    assert doc.count('<section class="dlrp-sample">') == 3 and doc.count('class="dlrp-legend"') == 1
    assert "<h2>first</h2>" in doc and "<h2>second</h2>" in doc and "<h1>three texts</h1>" in doc
    assert "+4" in doc.split('class="dlrp-legend"')[1]  # the shared scale is the largest |R| of all samples
    # with a shared scale, "a" (1/4 of the maximum) is paler than with its own scale
    own = viz.text_report(samples, shared_scale=False)
    assert own.count('class="dlrp-legend"') == 3
    colour = re.compile(r'background-color:(#[0-9a-f]{6})[^>]*>a<')
    assert colour.search(doc).group(1) != colour.search(own).group(1)
    with pytest.raises(TypeError, match="sample 0 must be"):
        viz.text_report(["just a string"])


def test_text_figure_exports_png_and_pdf_without_latex(tmp_path):
    tokens = ["[CLS]", "the", "act", "##ing", "was", "$5", "super", "##b", "[SEP]"] * 3
    scores = np.linspace(-1, 1, len(tokens))
    fig = viz.text_figure(tokens, scores, title="why?", width=4.0, path=tmp_path / "t.png")
    texts = [t.get_text() for t in fig.texts]
    assert texts[0] == "why?" and "$5" in texts and "act" in texts
    assert not any(t.get_usetex() for t in fig.texts)
    assert fig.get_size_inches()[1] > 1.0  # wrapped onto several lines at 4 inches
    merged = viz.text_figure(tokens, scores, merge_words=True, legend=False)
    assert "acting" in [t.get_text() for t in merged.texts] and not merged.axes
    with Image.open(tmp_path / "t.png") as im:
        assert im.format == "PNG" and im.size[0] == pytest.approx(4.0 * fig.dpi, abs=2)
    assert viz.save_figure(fig, tmp_path / "t.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match="suffix must be one of"):
        viz.save_figure(fig, tmp_path / "t.docx")
