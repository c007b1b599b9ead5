"""dynamiclrp.hf: the task helpers on tiny random-weight transformers, with a tokenizer built offline."""
from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import dynamiclrp  # noqa: E402
from dynamiclrp import hf  # noqa: E402
from dynamiclrp.testing import zoo

WORDS = ("the a movie was great terrible good bad plot acting boring fun what is who paris capital of france "
         "really not").split()


def _tokenizer(bert_style: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def lm_tok():
    return _tokenizer(bert_style=False)


def _model(cls_name: str, model_type: str = "bert", seed: int = 0, **overrides):
    cfg = zoo.tiny_hf_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, cls_name)(cfg).eval()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def _assert_untouched(model, snap):
    state, training, grads, hooks = snap
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training == training
    assert [p.requires_grad for p in model.parameters()] == grads
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())


TEXTS = ["the movie was great", "bad plot", "really not a good movie"]


# --------------------------------------------------------------------------------------------------------------
# sequence classification
# --------------------------------------------------------------------------------------------------------------
def test_text_classification_matches_manual_relevance_and_leaves_model_alone(tok):
    model = _model("BertForSequenceClassification", num_labels=3)
    snap = _snapshot(model)
    ex = hf.text_classification(model, tok, TEXTS, target=2, ledger=True)
    _assert_untouched(model, snap)

    enc = tok(TEXTS, padding=True, return_tensors="pt")
    emb = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=enc["attention_mask"]).logits
    (expected,) = dynamiclrp.relevance(logits[:, 2], emb, rules="attnlrp")
    expected = expected.masked_fill(~enc["attention_mask"].bool()[..., None], 0)
    torch.testing.assert_close(ex.relevance, expected)
    torch.testing.assert_close(ex.explained, logits[:, 2].detach())
    assert ex.target.tolist() == [2, 2, 2] and ex.target_names == ["LABEL_2"] * 3
    assert ex.rules == "attnlrp"
    # the ledger accounts for the whole explained logit: tokens + sinks (position/type embeddings, biases...)
    assert abs(ex.ledger.unaccounted) < 1e-5 * max(1.0, float(ex.explained.abs().sum()))
    total_tokens = float(ex.inputs.scores.sum())
    assert total_tokens == pytest.approx(sum(ex.ledger.inputs.values()), rel=1e-4, abs=1e-6)


def test_padding_is_excluded_and_batches_equal_single_texts(tok):
    model = _model("BertForSequenceClassification", num_labels=2)
    ex = hf.text_classification(model, tok, TEXTS)
    mask = ex.inputs.attention_mask
    assert not mask.all(), "the batch should contain padding"
    assert (ex.inputs.scores[~mask] == 0).all() and (ex.relevance[~mask] == 0).all()
    assert ex.inputs.padding_relevance.abs().max() < 1e-6  # BERT masks padding: nothing leaked there
    for i, text in enumerate(TEXTS):
        single = hf.text_classification(model, tok, text)
        assert ex.tokens[i] == single.tokens[0] == ["[CLS]", *text.split(), "[SEP]"]
        assert len(ex.scores[i]) == len(ex.tokens[i])
        torch.testing.assert_close(ex.scores[i], single.scores[0], atol=1e-6, rtol=1e-4)
        assert int(ex.target[i]) == int(single.target[0]) == int(ex.logits[i].argmax())
    pairs = ex.inputs.pairs(1)
    assert [t for t, _ in pairs] == ex.tokens[1] and ex.inputs.special(1) == [True, False, False, True]


def test_targets_by_name_and_clear_errors(tok):
    model = _model("BertForSequenceClassification", num_labels=2,
                   id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    ex = hf.text_classification(model, tok, TEXTS[:2], target="positive")
    assert ex.target.tolist() == [1, 1] and ex.target_names == ["positive", "positive"]
    ex2 = hf.text_classification(model, tok, TEXTS[:2], target=[0, 1])
    assert ex2.target.tolist() == [0, 1]
    with pytest.raises(ValueError, match="out of range: the model has 2 outputs"):
        hf.text_classification(model, tok, TEXTS[:2], target=5)
    with pytest.raises(ValueError, match="unknown label 'neutral'"):
        hf.text_classification(model, tok, TEXTS[:2], target="neutral")
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2"):
        hf.text_classification(model, tok, TEXTS[:2], target=[0, 1, 0])


def test_pretokenised_inputs_and_training_mode_warning(tok):
    model = _model("BertForSequenceClassification", num_labels=2)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    a = hf.text_classification(model, tok, enc)
    b = hf.text_classification(model, tok, TEXTS)
    torch.testing.assert_close(a.relevance, b.relevance)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        hf.text_classification(model, tok, TEXTS[:1])
    assert model.training  # the helper warns but does not switch modes


def test_html_and_terminal_rendering(tok, tmp_path):
    model = _model("BertForSequenceClassification", num_labels=2)
    ex = hf.text_classification(model, tok, TEXTS)
    path = ex.save_html(tmp_path / "t.html", 0)
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "great" in html and "background-color:#" in html
    assert "text_classification: LABEL_" in html
    term = ex.terminal(1, color=False)
    assert "bad" in term and "plot" in term


# --------------------------------------------------------------------------------------------------------------
# token classification, question answering
# --------------------------------------------------------------------------------------------------------------
def test_token_classification_explains_the_requested_token(tok):
    model = _model("BertForTokenClassification", num_labels=4)
    ex = hf.token_classification(model, tok, TEXTS, position=[1, 2, -2], target=3)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    pos = torch.tensor([1, 2, int(lengths[2]) - 2])
    assert ex.positions.tolist() == pos.tolist()
    emb = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=enc["attention_mask"]).logits
    value = logits[torch.arange(3), pos, 3]
    (expected,) = dynamiclrp.relevance(value, emb, rules="attnlrp")
    torch.testing.assert_close(ex.relevance, expected.masked_fill(~enc["attention_mask"].bool()[..., None], 0))
    with pytest.raises(ValueError, match="position 9 is out of range for sample 1"):
        hf.token_classification(model, tok, TEXTS, position=[1, 9, 1])


def test_question_answering_span_is_sum_of_start_and_end(tok):
    model = _model("BertForQuestionAnswering", num_labels=2)
    q = ["what is the capital of france", "who was great"]
    ctx = "paris is the capital of france"
    both = hf.question_answering(model, tok, q, ctx)
    start = hf.question_answering(model, tok, q, ctx, which="start")
    end = hf.question_answering(model, tok, q, ctx, which="end")
    s, e = both.target[:, 0], both.target[:, 1]
    assert (e >= s).all()
    assert (start.target == both.target).all() and (end.target == both.target).all()
    # start + end logits explained together = explained separately, summed (the sum rule is exact here)
    torch.testing.assert_close(both.explained, start.explained + end.explained)
    torch.testing.assert_close(both.relevance, start.relevance + end.relevance, atol=1e-5, rtol=1e-4)
    chosen = hf.question_answering(model, tok, q, ctx, answer=[(8, 8), (7, 9)])
    assert chosen.target.tolist() == [[8, 8], [7, 9]]
    assert chosen.target_names[0] == tok.decode([int(chosen.inputs.input_ids[0, 8])])
    with pytest.raises(ValueError, match="ends"):
        hf.question_answering(model, tok, q, ctx, answer=(5, 3))
    with pytest.raises(ValueError, match="which must be"):
        hf.question_answering(model, tok, q, ctx, which="middle")


# --------------------------------------------------------------------------------------------------------------
# causal LM
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,cls_name", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"),
                                                 ("gemma", "GemmaForCausalLM")])
def test_next_token_left_and_right_padding_agree_with_single_prompts(lm_tok, model_type, cls_name):
    model = _model(cls_name, model_type)
    prompts = ["the movie was", "bad plot was really"]
    right = hf.next_token(model, lm_tok, prompts, check=True)
    left = hf.next_token(model, lm_tok, prompts, tokenizer_kwargs={"padding_side": "left"})
    assert not bool(left.inputs.attention_mask[:, 0].all()), "left padding expected"
    for i, p in enumerate(prompts):
        single = hf.next_token(model, lm_tok, p)
        for ex in (right, left):
            assert ex.tokens[i] == p.split()
            assert int(ex.target[i]) == int(single.target[0])
            torch.testing.assert_close(ex.explained[i], single.explained[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ex.scores[i], single.scores[0], atol=1e-5, rtol=1e-3)
    # relevance stays at the caller's positions: left padding keeps the real tokens at the end
    assert (left.inputs.scores[left.inputs.attention_mask] == left.inputs.scores[left.inputs.attention_mask]).all()
    assert (left.inputs.scores[~left.inputs.attention_mask] == 0).all()


def test_contrastive_next_token_is_difference_of_explanations(lm_tok):
    model = _model("LlamaForCausalLM", "llama")
    good, bad = lm_tok.convert_tokens_to_ids(["good", "bad"])
    a = hf.next_token(model, lm_tok, "the movie was", target="good")
    b = hf.next_token(model, lm_tok, "the movie was", target=bad)
    c = hf.next_token(model, lm_tok, "the movie was", target="good", contrast="bad")
    assert a.target.tolist() == [good] and c.contrast.tolist() == [bad]
    assert c.target_names == ["'good' vs 'bad'"]
    torch.testing.assert_close(c.explained, a.explained - b.explained)
    torch.testing.assert_close(c.relevance, a.relevance - b.relevance, atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="is 2 tokens"):
        hf.next_token(model, lm_tok, "the movie", target="good bad")
    with pytest.raises(ValueError, match="out of range for a vocabulary"):
        hf.next_token(model, lm_tok, "the movie", target=10_000)


# --------------------------------------------------------------------------------------------------------------
# seq2seq, images
# --------------------------------------------------------------------------------------------------------------
def test_seq2seq_attributes_encoder_and_decoder_tokens(tok):
    model = _model("T5ForConditionalGeneration", "t5")
    ex = hf.seq2seq(model, tok, ["the movie was great", "bad plot"], decoder_prefix=["good", "bad plot"],
                    decoder_start_token_id=0, ledger=True, check=True)
    assert ex.decoder is not None
    assert ex.decoder.tokens == [["[PAD]", "good"], ["[PAD]", "bad", "plot"]]
    assert (ex.decoder.scores[~ex.decoder.attention_mask] == 0).all()
    assert ex.positions.tolist() == [1, 2]
    # encoder + decoder tokens + ledger sinks = explained logit
    requested = float(ex.inputs.scores.sum() + ex.decoder.scores.sum())
    assert requested == pytest.approx(sum(ex.ledger.inputs.values()), rel=1e-4, abs=1e-5)
    assert abs(ex.ledger.unaccounted) < 1e-4
    assert float(ex.decoder.scores.abs().sum()) > 0 and float(ex.inputs.scores.abs().sum()) > 0
    html = ex.html(1)
    assert "→" in html and "plot" in html
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        hf.seq2seq(model, tok, "the movie")


def test_image_classification_relevance_per_pixel(tmp_path):
    model = _model("ViTForImageClassification", "vit", num_labels=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x_before = x.clone()
    ex = hf.image_classification(model, None, x, target=[0, 2], ledger=True)
    assert torch.equal(x, x_before) and not x.requires_grad
    leaf = x.clone().requires_grad_(True)
    logits = model(pixel_values=leaf).logits
    (expected,) = dynamiclrp.relevance(logits[torch.arange(2), torch.tensor([0, 2])], leaf, rules="attnlrp")
    torch.testing.assert_close(ex.relevance, expected)
    assert abs(ex.ledger.unaccounted) < 1e-4
    assert ex.heatmap(1).shape == (32, 32, 3) and ex.image(0).shape == (32, 32, 3)
    out = ex.save_png(tmp_path / "vit.png")
    from PIL import Image

    assert Image.open(out).size[0] > 100


def test_image_processor_path_undoes_normalisation():
    from transformers import ViTImageProcessor

    model = _model("ViTForImageClassification", "vit", num_labels=3)
    proc = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    ex = hf.image_classification(model, proc, [img])
    assert ex.relevance.shape == (1, 3, 32, 32)
    shown = ex.image(0)
    assert shown.dtype.name == "uint8" and shown.shape == (32, 32, 3) and 0 < shown.mean() < 255


# --------------------------------------------------------------------------------------------------------------
# embeddings: models without inputs_embeds, scaled embeddings, the check
# --------------------------------------------------------------------------------------------------------------
class _IdsOnly(torch.nn.Module):
    """A text classifier whose forward takes token ids only."""

    def __init__(self, vocab: int = 40, d: int = 8, scale_ids_only: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.lin = torch.nn.Linear(d, 2)
        self.scale_ids_only = scale_ids_only

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.emb(input_ids) * (3.0 if self.scale_ids_only else 1.0)
        w = attention_mask[..., None].to(inputs_embeds.dtype)
        return self.lin(torch.tanh(inputs_embeds * w).sum(1))


class _NoEmbedsArg(_IdsOnly):
    def forward(self, input_ids, attention_mask=None):  # type: ignore[override]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask)


def test_embedding_modes_agree_and_no_hook_is_ever_installed(tok):
    torch.manual_seed(0)
    ref = _IdsOnly().eval()
    other = _NoEmbedsArg().eval()
    other.load_state_dict(ref.state_dict())
    a = hf.text_classification(ref, tok, TEXTS, target=1, embeddings="inputs_embeds")
    b = hf.text_classification(other, tok, TEXTS, target=1)
    c = hf.text_classification(ref, tok, TEXTS, target=1, embeddings="graph")
    torch.testing.assert_close(a.relevance, b.relevance)
    torch.testing.assert_close(a.relevance, c.relevance)
    assert not other.emb._forward_hooks and not ref.emb._forward_hooks
    with pytest.raises(TypeError, match="no inputs_embeds argument"):
        hf.text_classification(other, tok, TEXTS, embeddings="inputs_embeds")


def test_check_catches_models_that_use_ids_beyond_the_embedding_module(tok):
    torch.manual_seed(0)
    model = _IdsOnly(scale_ids_only=True).eval()
    with pytest.raises(RuntimeError, match="different .* for input_ids and for inputs_embeds"):
        hf.text_classification(model, tok, TEXTS, check=True, embeddings="inputs_embeds")
    # the default feeds input_ids, so the model computes what it computes in a normal call
    ex = hf.text_classification(model, tok, TEXTS)
    with torch.no_grad():
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        torch.testing.assert_close(ex.logits, model(**enc))


def test_decoder_only_classifier_pools_the_last_real_token_in_padded_batches(tok):
    """LlamaForSequenceClassification finds the last non-padding token from input_ids; inputs_embeds loses it."""
    model = _model("LlamaForSequenceClassification", "llama", num_labels=2, pad_token_id=0)
    with pytest.raises(RuntimeError, match="different logits"):
        hf.text_classification(model, tok, TEXTS, check=True, embeddings="inputs_embeds")
    ex = hf.text_classification(model, tok, TEXTS)
    for i, text in enumerate(TEXTS):
        single = hf.text_classification(model, tok, text)
        torch.testing.assert_close(ex.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ex.scores[i], single.scores[0], atol=1e-5, rtol=1e-3)
    gemma = _model("GemmaForCausalLM", "gemma")  # scales inside its embedding module
    a = hf.next_token(gemma, tok, TEXTS, embeddings="inputs_embeds", check=True)
    b = hf.next_token(gemma, tok, TEXTS)
    torch.testing.assert_close(a.relevance, b.relevance)


def test_unknown_embeddings_mode_is_refused(tok):
    model = _model("BertForSequenceClassification", num_labels=2)
    with pytest.raises(ValueError, match="embeddings must be one of"):
        hf.text_classification(model, tok, TEXTS, embeddings="magic")


def test_generic_text_helper_with_select(tok):
    model = _model("BertForSequenceClassification", num_labels=3)
    ex = hf.text(model, tok, TEXTS, lambda out, inputs: out.logits[:, 1] - out.logits[:, 0])
    a = hf.text_classification(model, tok, TEXTS, target=1)
    b = hf.text_classification(model, tok, TEXTS, target=0)
    torch.testing.assert_close(ex.relevance, a.relevance - b.relevance, atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="select must return a tensor of shape"):
        hf.text(model, tok, TEXTS, lambda out, inputs: out.logits)


def test_a_target_word_outside_the_vocabulary_is_refused(lm_tok):
    """'tokyo' is not in the vocabulary: explaining the <unk> logit instead would answer another question."""
    model = _model("GPT2LMHeadModel", "gpt2")
    with pytest.raises(ValueError, match=r"'tokyo' is not in the tokenizer's vocabulary.*unknown token '\[UNK\]'"):
        hf.next_token(model, lm_tok, "the capital of france is", target="tokyo")
    with pytest.raises(ValueError, match=r"contrast token 'tokyo' is not in the tokenizer's vocabulary"):
        hf.next_token(model, lm_tok, "the capital of france is", target="paris", contrast="tokyo")
    with pytest.raises(ValueError, match=r"is 2 tokens \['paris', 'france'\], not one"):
        hf.next_token(model, lm_tok, "the capital of france is", target="paris france")
    unk = hf.next_token(model, lm_tok, "the capital of france is", target="[UNK]")  # asked for by name: fine
    assert unk.target.tolist() == [lm_tok.unk_token_id]


def test_fill_mask_explains_the_masked_position(tok):
    model = _model("BertForMaskedLM")
    ex = hf.fill_mask(model, tok, ["paris is the [MASK] of france", "what a [MASK] movie"], ledger=True)
    mask_id = tok.mask_token_id
    for i in range(2):
        assert int(ex.inputs.input_ids[i, int(ex.positions[i])]) == mask_id
        assert int(ex.target[i]) == int(ex.logits[i].argmax()) == int(ex.prediction[i])
    torch.testing.assert_close(ex.explained, ex.logits.gather(1, ex.target[:, None]).squeeze(1))
    assert abs(ex.ledger.unaccounted) < 1e-4 * float(ex.explained.abs().sum())
    at = hf.fill_mask(model, tok, "paris is the capital of france", target="capital", position=4)
    assert int(at.target[0]) == tok.convert_tokens_to_ids("capital") and int(at.positions[0]) == 4
    with pytest.raises(ValueError, match=r"no masked position: put the mask token '\[MASK\]'"):
        hf.fill_mask(model, tok, "paris is the capital of france")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        hf.fill_mask(model, tok, "paris is the [MASK] of france", target="tokyo")


def test_explanations_as_a_report_and_as_figures(tok, tmp_path):
    pytest.importorskip("matplotlib")
    model = _model("BertForSequenceClassification", num_labels=2)
    ex = hf.text_classification(model, tok, TEXTS[:3])
    report = ex.save_report(tmp_path / "report.html").read_text(encoding="utf-8")
    assert report.count('<section class="dlrp-sample">') == 3 and report.count('class="dlrp-legend"') == 1
    assert all(ex.title(i) in report for i in range(3))
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
        path = ex.save_figure(tmp_path / f"sample{suffix}", 1)
        assert path.read_bytes()[:4] == magic
