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
# # Explain an image classifier
#
# A small CNN trained on scikit-learn's handwritten digits (8×8 images that ship with scikit-learn, so this runs
# offline in seconds), explained with LRP: which pixels speak for the predicted digit (red) and which against it
# (blue). The same calls work for any `torch.nn.Module` — a torchvision ResNet, a timm model, your own.
#
# Needs the `demo` extra: `pip install "dynamiclrp[demo]"` (from a checkout: `pip install ".[demo]"`).

# %%
import torch

import dynamiclrp
from dynamiclrp import demo, metrics, presets, viz

torch.manual_seed(0)
x_train, y_train, x_test, y_test = demo.load_digits_split()
model = demo.train_digits_cnn(x_train, y_train, epochs=4, progress=False)   # returned in eval() mode
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {accuracy:.1%}")

# %% [markdown]
# ## Explain the predicted class
#
# The input must require grad (the model can stay frozen); `logits[:, c]` or `gather` picks one logit per row,
# and each row is explained on its own.

# %%
x = x_test[:6].clone().requires_grad_(True)
logits = model(x)
predicted = logits.argmax(1)
explained = logits.gather(1, predicted[:, None]).squeeze(1)
ex = dynamiclrp.explain(explained, x, ledger=True, model=model)       # default rules: LRP-ε
relevance = ex.relevance[0]
print(ex.ledger.summary(top=2))

# %% [markdown]
# Relevance is conservative: what reaches the pixels plus what the biases absorbed (the ledger's sinks) adds up
# to the explained logits.

# %%
total = relevance.sum() + sum(s.total for s in ex.ledger.sinks)
print(f"explained logits {explained.sum().item():.4f} = pixels + sinks {float(total):.4f}")
assert abs(ex.unaccounted) < 1e-4 * abs(ex.ledger.seed_total)

# %% [markdown]
# ## Heatmaps
#
# `viz.image_figure` shows the input, the heatmap and an overlay whose opacity follows |relevance| (so the image
# stays visible where nothing is relevant), with a colour bar in relevance units.

# %%
fig = viz.image_figure(x[0, 0].detach(), relevance[0], suptitle=f"predicted {int(predicted[0])}",
                       clip_percentile=None)
viz.save_figure(fig, "digit_explained.png")
cells = [*x.detach()[:, 0], *viz.heatmap(relevance)]
viz.grid(cells, ncols=6, titles=[f"digit {int(y)}" for y in y_test[:6]] + [f"R for {int(p)}" for p in predicted],
         path="digits_grid.png")

# %% [markdown]
# ## Rules for images, and how faithful they are
#
# z^B on the first convolution needs the input's range — here pixels in [0, 1]. Pixel flipping removes the most
# relevant pixels first (MoRF) and the least relevant first (LeRF); ABPC, the area between the two curves, is
# larger for a more faithful explanation and about 0 for random noise.

# %%
candidates = {"epsilon": "epsilon", "epsilon_plus": "epsilon_plus",
              "epsilon_gamma_box": presets.epsilon_gamma_box(0.0, 1.0)}
xe, te = x_test[:64], model(x_test[:64]).argmax(1)
scores = {}
for name, rules in candidates.items():
    xr = xe.clone().requires_grad_(True)
    out = model(xr)
    (r,) = dynamiclrp.relevance(out.gather(1, te[:, None]).squeeze(1), xr, rules=rules)
    result = metrics.pixel_flipping(model, xe, r, te, occluder="zero", steps=16, score="logit", progress=False)
    scores[name] = result.abpc_mean
noise = metrics.pixel_flipping(model, xe, torch.randn(xe.shape), te, occluder="zero", steps=16, score="logit",
                               progress=False)
scores["random"] = noise.abpc_mean
for name, value in scores.items():
    print(f"{name:<20} ABPC {value:7.3f}")
assert scores["epsilon"] > scores["random"]
