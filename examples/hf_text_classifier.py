# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explain a Hugging Face text classifier
#
# `dynamiclrp.hf.text_classification(model, tokenizer, texts)` tokenises, runs the model as usual, attributes the
# logit to the input embeddings (found in the autograd graph: no hook, no patch) and returns tokens with their
# relevance. With a checkpoint from the hub it is
#
# ```python
# model = AutoModelForSequenceClassification.from_pretrained(name).eval()
# tokenizer = AutoTokenizer.from_pretrained(name)
# ```
#
# To run offline in seconds, this notebook builds a tiny BERT from a configuration and a WordPiece tokenizer from
# a word list, and trains it for a few seconds on synthetic movie reviews.
#
# Needs `pip install "dynamiclrp[hf,viz]"` (from a checkout: `pip install ".[hf,viz]"`).

# %%
import tempfile
from pathlib import Path

import torch
import transformers

from dynamiclrp import demo, hf, viz

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as folder:        # a WordPiece vocabulary: the demo's words, some split in two
    words = [w for w in demo.VOCAB if w != "[PAD]"]
    pieces = ["##ing", "##ly", "##s"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "with", *pieces]
    (Path(folder) / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(Path(folder) / "vocab.txt"))
config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                 id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
model = transformers.BertForSequenceClassification(config)

# %% [markdown]
# ## Train it briefly (skip this with a real checkpoint)

# %%
sentences, labels = demo.make_reviews(600, seed=0)
texts = [" ".join(s) for s in sentences]
optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
model.train()
for epoch in range(3):
    for i in range(0, len(texts), 50):
        batch = tokenizer(texts[i:i + 50], padding=True, return_tensors="pt")
        loss = model(**batch, labels=labels[i:i + 50]).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
model.eval()                                          # explain in evaluation mode (dropout off)
test, test_labels = demo.make_reviews(200, seed=1)
with torch.no_grad():
    batch = tokenizer([" ".join(s) for s in test], padding=True, return_tensors="pt")
    accuracy = (model(**batch).logits.argmax(1) == test_labels).float().mean().item()
print(f"test accuracy {accuracy:.1%}")

# %% [markdown]
# ## Explain the predicted sentiment
#
# AttnLRP is the default rule set of the helpers. Each sample's relevance sums (up to the ledger's sinks: biases,
# position embeddings...) to its explained logit.

# %%
reviews = ["the acting was superb but the plot was dull and boring",
           "a wonderful film with great music",
           "superb acting but a boringly dull plot"]
ex = hf.text_classification(model, tokenizer, reviews, ledger=True)
for i in range(len(ex)):
    print(ex.title(i))
    print("  ", ex.terminal(i, color=False))
print(ex.ledger.summary(top=2))

# %% [markdown]
# ## Share it
#
# One HTML report with every review on one colour scale; sub-words merged into words (their relevance summed);
# and a PDF of one review's coloured text for a paper — no LaTeX needed.

# %%
ex.save_report("reviews.html", title="Why this sentiment?", merge_words=True)
ex.save_figure("review0.pdf", 0, merge_words=True)
viz.save_figure(ex.figure(1), "review1.png")
print(ex.tokens[2])                                   # "boringly" is two tokens: boring + ##ly
words, scores, _ = viz.merge_subwords(ex.tokens[2], ex.scores[2])
print([(w, round(float(s), 3)) for w, s in zip(words, scores)])
assert "boringly" in words and abs(scores.sum() - float(ex.scores[2].sum())) < 1e-4
