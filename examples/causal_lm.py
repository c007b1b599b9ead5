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
# # Explain a causal language model's next token
#
# `dynamiclrp.hf.next_token(model, tokenizer, prompt)` explains the logit of the next token after a prompt — the
# model's top token, a token you name, or "this token rather than that one" (the logit difference). With a
# checkpoint from the hub it is `AutoModelForCausalLM.from_pretrained(name).eval()` and its tokenizer.
#
# To run offline in seconds, this notebook builds a tiny GPT-2 from a configuration, with a word-level tokenizer,
# and teaches it a few capitals.
#
# Needs `pip install "dynamiclrp[hf,viz]"` (from a checkout: `pip install ".[hf,viz]"`).

# %%
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from dynamiclrp import hf

capitals = {"france": "paris", "italy": "rome", "spain": "madrid", "japan": "tokyo", "peru": "lima",
            "egypt": "cairo", "kenya": "nairobi", "chile": "santiago"}
words = ["<pad>", "<unk>", "the", "capital", "of", "is", "city", "main", "a", "country", "whose", "name",
         *capitals, *capitals.values()]
core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
config = transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                 pad_token_id=0, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(config)

# %% [markdown]
# ## Teach it the capitals (skip this with a real checkpoint)

# %%
templates = ["the capital of {} is {}", "the main city of {} is {}"]
optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
model.train()
for step in range(80):
    facts = [templates[step % 2].format(country, city) for country, city in capitals.items()]
    ids = tokenizer(facts, return_tensors="pt")["input_ids"]       # one template per step: no padding
    logits = model(input_ids=ids[:, :-1]).logits[:, -1]             # predict the capital from the prompt
    loss = torch.nn.functional.cross_entropy(logits, ids[:, -1])
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
model.eval()
print(f"final loss {loss.item():.3f}")


# %% [markdown]
# ## Why "paris"?
#
# The helper finds each prompt's last real token (left- or right-padded batches both work), explains that
# position's logit with AttnLRP, and returns the relevance of every prompt token.

# %%
prompts = ["the capital of france is", "the main city of japan is"]
ex = hf.next_token(model, tokenizer, prompts, ledger=True)
for i in range(len(ex)):
    print(ex.title(i), "|", ex.terminal(i, color=False))
assert ex.target_names[0].strip() == "paris"

# %% [markdown]
# ## "paris" rather than "rome"
#
# A contrastive explanation explains `logit(paris) - logit(rome)`: what in the prompt makes the model prefer
# one answer over the other. The country should carry most of it.

# %%
why = hf.next_token(model, tokenizer, "the capital of france is", target="paris", contrast="rome")
print(why.title(0), "|", why.terminal(0, color=False))
tokens, scores = why.tokens[0], why.scores[0]
print("most relevant:", tokens[int(scores.abs().argmax())])

# %% [markdown]
# A target must be one token of the vocabulary: a word the tokenizer does not know would silently become
# `<unk>`, so it is refused with a clear message instead.

# %%
try:
    hf.next_token(model, tokenizer, "the capital of france is", target="berlin")
except ValueError as err:
    print("refused:", err)

# %% [markdown]
# ## Save the explanations
#
# One HTML report with both prompts on one colour scale, and a PNG of the contrastive explanation.

# %%
ex.save_report("next_token.html", title="Next-token explanations")
why.save_figure("paris_vs_rome.png")
