"""Visualisation of relevance: image heatmaps, coloured text, ledger tables and per-layer plots.

Everything here works on plain tensors / arrays and does not depend on the relevance engine.

Optional dependencies
---------------------
Colour mapping and plotting use matplotlib; image conversion and PNG output use Pillow. Both are
imported lazily, inside the functions that need them, and are installed with::

    pip install dynamiclrp[viz]

:func:`ledger_table` needs neither. Figures are created with :class:`matplotlib.figure.Figure`
and the Agg canvas directly, never through :mod:`matplotlib.pyplot`, so nothing here selects a
GUI backend or opens a window.

Colour convention
-----------------
Relevance is signed. With ``symmetric=True`` (the default) a map is scaled so that the largest
absolute relevance becomes +-1 and zero lands exactly on the centre colour of the colour map;
relevance ``r`` and ``-r`` get mirrored colour-map entries. Positive relevance uses the upper half
of the colour map (red in ``"bwr"``), negative the lower half (blue).
"""
from __future__ import annotations

import functools
import html
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .extras import require

__all__ = [
    "DIVERGING_CMAPS",
    "heatmap",
    "overlay",
    "image_figure",
    "grid",
    "save_png",
    "save_figure",
    "colormap",
    "register_colormaps",
    "CUSTOM_CMAPS",
    "text_html",
    "text_report",
    "text_figure",
    "merge_subwords",
    "save_html",
    "text_terminal",
    "use_color",
    "ledger_table",
    "plot_layer_relevance",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

#: Diverging colour maps with positive relevance red and negative blue (blue/cyan in the
#: black-centred "coldnhot"). Any matplotlib colour map name or Colormap is accepted as well.
DIVERGING_CMAPS = ("bwr", "seismic", "RdBu_r", "coolwarm", "coldnhot")

# Odd look-up-table size: the centre entry (index 127) is exactly the colour map's midpoint, and
# ``idx(-r) == 254 - idx(r)`` holds exactly, so sign flips give mirrored colours.
_LUT_SIZE = 255
_CENTRE = (_LUT_SIZE - 1) // 2

# Zennit-like colour maps, defined by their colour stops and built with matplotlib's
# LinearSegmentedColormap. "coldnhot" is black-centred: cyan/blue for negative, black for zero,
# red/yellow for positive -- useful on dark backgrounds and when "no relevance" should read as
# "nothing there". "wred" / "wblue" run from white to red / blue, for magnitudes. ("bwr", Zennit's
# blue-white-red, is matplotlib's own "bwr".)
_CUSTOM_CMAP_STOPS = {
    "coldnhot": [
        (0.0, (0.0, 1.0, 1.0)),
        (0.25, (0.0, 0.0, 1.0)),
        (0.5, (0.0, 0.0, 0.0)),
        (0.75, (1.0, 0.0, 0.0)),
        (1.0, (1.0, 1.0, 0.0)),
    ],
    "wred": [(0.0, (1.0, 1.0, 1.0)), (1.0, (1.0, 0.0, 0.0))],
    "wblue": [(0.0, (1.0, 1.0, 1.0)), (1.0, (0.0, 0.0, 1.0))],
}

#: Names of the colour maps dynamiclrp defines itself (see :func:`colormap`).
CUSTOM_CMAPS = tuple(_CUSTOM_CMAP_STOPS)


# --------------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------------
def _require_matplotlib() -> Any:
    return require("matplotlib", "dynamiclrp.viz (colour maps and plots)")


def _require_pil() -> Any:
    return require("PIL.Image", "dynamiclrp.viz (image output)")


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure bound to an Agg canvas (no pyplot, no GUI backend)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------------------------
# colour mapping
# --------------------------------------------------------------------------------------------
def colormap(name: str) -> Any:
    """One of dynamiclrp's own colour maps (``"coldnhot"``, ``"wred"``, ``"wblue"``) as a matplotlib object.

    Parameters
    ----------
    name : str
        A name from :data:`CUSTOM_CMAPS`.

    Returns
    -------
    matplotlib.colors.LinearSegmentedColormap
        Pass it as ``cmap=`` to matplotlib or to any function here.

    Raises
    ------
    ValueError
        ``name`` is not one of :data:`CUSTOM_CMAPS`.
    """
    _require_matplotlib()
    from matplotlib.colors import LinearSegmentedColormap

    if name not in _CUSTOM_CMAP_STOPS:
        raise ValueError(f"unknown dynamiclrp colour map {name!r}; valid: {', '.join(CUSTOM_CMAPS)}")
    return LinearSegmentedColormap.from_list(name, _CUSTOM_CMAP_STOPS[name], N=256)


def register_colormaps() -> list[str]:
    """Register :data:`CUSTOM_CMAPS` with matplotlib, so that ``cmap="coldnhot"`` works in matplotlib itself.

    Nothing in dynamiclrp needs this -- its functions accept these names anyway -- and importing or using
    :mod:`dynamiclrp.viz` never changes matplotlib's global registry on its own: call this once if you want
    the names in your own matplotlib plots. Calling it again is harmless: names already registered (by an
    earlier call, or by another package) are left as they are.

    Returns
    -------
    list of str
        The names registered by this call (empty when all were there already).
    """
    mpl = _require_matplotlib()
    added = []
    for name in CUSTOM_CMAPS:
        if name not in mpl.colormaps:
            mpl.colormaps.register(colormap(name), name=name)
            added.append(name)
    return added


@functools.lru_cache(maxsize=32)
def _named_cmap(name: str) -> Any:
    mpl = _require_matplotlib()

    if name in _CUSTOM_CMAP_STOPS:
        return colormap(name).resampled(_LUT_SIZE)
    try:
        base = mpl.colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colour map {name!r}; use a matplotlib colour map name or one of the "
            f"diverging maps {', '.join(map(repr, DIVERGING_CMAPS))}"
        ) from None
    return base.resampled(_LUT_SIZE)


def _get_cmap(cmap: Any) -> Any:
    _require_matplotlib()
    if isinstance(cmap, str):
        return _named_cmap(cmap)
    from matplotlib.colors import Colormap

    if isinstance(cmap, Colormap):
        return cmap.resampled(_LUT_SIZE)
    raise TypeError(f"cmap must be a colour map name or a matplotlib Colormap, got {type(cmap).__name__}")


def _lut_indices(normalised: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to look-up-table indices, exactly mirror-symmetric around the centre."""
    r = np.clip(np.nan_to_num(normalised, nan=0.0), -1.0, 1.0)
    return (_CENTRE + np.sign(r) * np.floor(np.abs(r) * _CENTRE + 0.5)).astype(np.intp)


def _colourise(normalised: np.ndarray, cmap: Any) -> np.ndarray:
    """RGB uint8 colours (..., 3) for values in [-1, 1]."""
    return _get_cmap(cmap)(_lut_indices(normalised), bytes=True)[..., :3]


def _normalise(
    r: np.ndarray,
    *,
    symmetric: bool,
    vmax: float | None,
    clip_percentile: float | None,
) -> np.ndarray:
    """Scale one relevance map to [-1, 1] (see module docstring)."""
    r = np.nan_to_num(np.asarray(r, dtype=np.float64), nan=0.0)
    if clip_percentile is not None and not 0.0 < clip_percentile <= 100.0:
        raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
    if symmetric:
        if vmax is not None:
            scale = float(vmax)
        elif clip_percentile is not None:
            scale = float(np.percentile(np.abs(r), clip_percentile)) if r.size else 0.0
        else:
            scale = float(np.abs(r).max()) if r.size else 0.0
        if scale <= 0.0 or not math.isfinite(scale):
            return np.zeros_like(r)
        return np.clip(r / scale, -1.0, 1.0)
    if r.size == 0:
        return r
    if clip_percentile is not None:
        lo, hi = np.percentile(r, [100.0 - clip_percentile, clip_percentile])
    else:
        lo, hi = r.min(), r.max()
    if vmax is not None:
        hi = float(vmax)
    if hi <= lo:
        return np.zeros_like(r)
    return np.clip(2.0 * (r - lo) / (hi - lo) - 1.0, -1.0, 1.0)


# --------------------------------------------------------------------------------------------
# array conversion helpers
# --------------------------------------------------------------------------------------------
def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _reduce_channels(r: np.ndarray, axis: int, how: str | Callable[..., np.ndarray]) -> np.ndarray:
    if callable(how):
        return np.asarray(how(r, axis))
    if how == "sum":
        return r.sum(axis=axis)
    if how == "mean":
        return r.mean(axis=axis)
    if how == "abs_sum":
        return np.abs(r).sum(axis=axis)
    if how == "norm":
        return np.sqrt((r * r).sum(axis=axis))
    raise ValueError(
        f"unknown channel_reduce {how!r}; valid: 'sum', 'mean', 'abs_sum', 'norm' or a callable(array, axis)"
    )


def _relevance_maps(relevance: Any, channel_reduce: Any, channel_dim: int | None) -> tuple[np.ndarray, bool]:
    """Return (maps of shape (N, H, W), is_batch)."""
    r = _as_numpy(relevance).astype(np.float64, copy=False)
    if channel_dim is None:
        if r.ndim == 2:
            return r[None], False
        if r.ndim == 3:  # (C, H, W)
            return _reduce_channels(r, 0, channel_reduce)[None], False
        if r.ndim == 4:  # (N, C, H, W)
            return _reduce_channels(r, 1, channel_reduce), True
        raise ValueError(
            f"relevance must have shape (H, W), (C, H, W) or (N, C, H, W); got {tuple(r.shape)}"
        )
    if r.ndim not in (3, 4):
        raise ValueError(f"channel_dim needs a 3-D or 4-D relevance array, got shape {tuple(r.shape)}")
    batch = r.ndim == 4
    axis = channel_dim % r.ndim
    if batch and axis == 0:
        raise ValueError("channel_dim must not be the batch dimension 0")
    maps = _reduce_channels(r, axis, channel_reduce)
    return (maps if batch else maps[None]), batch


def _image_uint8(img: Any) -> np.ndarray:
    """Any image (PIL, tensor CHW/HW, array HWC/HW/CHW, float or integer) as RGB uint8 (H, W, 3)."""
    if type(img).__module__.startswith("PIL."):
        return np.asarray(img.convert("RGB"))
    is_tensor = isinstance(img, torch.Tensor)
    a = _as_numpy(img)
    integer_input = np.issubdtype(a.dtype, np.integer)
    if a.ndim == 3:
        first, last = a.shape[0] in (1, 3, 4), a.shape[-1] in (1, 3, 4)
        if (is_tensor and first) or (not is_tensor and first and not last):
            a = np.moveaxis(a, 0, -1)
        elif not last:
            raise ValueError(f"cannot interpret image of shape {tuple(a.shape)} (expected 1, 3 or 4 channels)")
        if a.shape[-1] == 4:
            a = a[..., :3]
        if a.shape[-1] == 1:
            a = a[..., 0]
    if a.ndim != 2 and not (a.ndim == 3 and a.shape[-1] == 3):
        raise ValueError(f"cannot interpret image of shape {tuple(a.shape)}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if integer_input:
            a = np.clip(a, 0, 255)
        elif lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        else:  # e.g. a standardised network input: rescale to the full range
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        a = np.round(np.nan_to_num(a)).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a


def _split_images(images: Any) -> list[Any]:
    """A batch tensor/array (N, ...) or a sequence of images as a list of images."""
    return list(images)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def heatmap(
    relevance: ArrayLike,
    *,
    channel_reduce: str | Callable[..., np.ndarray] = "sum",
    cmap: Any = "bwr",
    symmetric: bool = True,
    clip_percentile: float | None = None,
    vmax: float | None = None,
    channel_dim: int | None = None,
    as_pil: bool = False,
) -> Any:
    """Colour a relevance map.

    Parameters
    ----------
    relevance : torch.Tensor or numpy.ndarray
        ``(H, W)``, ``(C, H, W)`` or a batch ``(N, C, H, W)`` (torch layout). For other layouts,
        e.g. a channel-last ``(H, W, C)`` array, give ``channel_dim``.
    channel_reduce : {"sum", "mean", "abs_sum", "norm"} or callable, default "sum"
        How channels are combined into one value per pixel. ``"sum"`` keeps the sign (and is the
        conservation-preserving choice for LRP); a callable gets ``(array, axis)``.
    cmap : str or matplotlib.colors.Colormap, default "bwr"
        Preferably a diverging map: ``"bwr"``, ``"seismic"``, ``"RdBu_r"``, ``"coolwarm"`` or the
        black-centred ``"coldnhot"`` (see :data:`DIVERGING_CMAPS`); any matplotlib map works.
    symmetric : bool, default True
        Scale by the largest absolute relevance so that max ``|R|`` maps to +-1 and zero maps to the
        colour map's centre. With ``False`` the range ``[min, max]`` is stretched over the whole map.
    clip_percentile : float, optional
        Use this percentile of ``|R|`` (e.g. ``99.5``) instead of the maximum as the scale and clip
        larger values, so that a few extreme pixels do not wash out the rest.
    vmax : float, optional
        Fixed scale (same for every map), e.g. to compare several heatmaps on one scale.
    channel_dim : int, optional
        Channel axis to reduce; by default 0 for 3-D and 1 for 4-D input.
    as_pil : bool, default False
        Return :class:`PIL.Image.Image` (a list of them for a batch) instead of arrays.

    Returns
    -------
    numpy.ndarray or PIL.Image.Image or list of PIL.Image.Image
        RGB ``uint8`` array of shape ``(H, W, 3)``, or ``(N, H, W, 3)`` for a batch. Each map of a
        batch is normalised on its own unless ``vmax`` is given.
    """
    maps, batch = _relevance_maps(relevance, channel_reduce, channel_dim)
    out = np.stack(
        [
            _colourise(_normalise(m, symmetric=symmetric, vmax=vmax, clip_percentile=clip_percentile), cmap)
            for m in maps
        ]
    ) if len(maps) else np.zeros((0, 0, 0, 3), np.uint8)
    if as_pil:
        Image = _require_pil()
        images = [Image.fromarray(np.ascontiguousarray(o)) for o in out]
        return images if batch else images[0]
    return out if batch else out[0]


def overlay(
    image: Any,
    relevance: ArrayLike,
    *,
    alpha: float = 0.8,
    magnitude_weighted: bool = True,
    gamma: float = 0.5,
    cmap: Any = "bwr",
    channel_reduce: str | Callable[..., np.ndarray] = "sum",
    symmetric: bool = True,
    clip_percentile: float | None = None,
    vmax: float | None = None,
    channel_dim: int | None = None,
    as_pil: bool = False,
) -> Any:
    """Blend a relevance heatmap over an image, opaque where relevance is large and transparent where it is 0.

    Parameters
    ----------
    image : PIL.Image.Image, torch.Tensor or numpy.ndarray
        Tensors are read as ``(C, H, W)`` / ``(H, W)``, arrays as ``(H, W, C)`` / ``(H, W)``
        (a ``(C, H, W)`` array is recognised when only its first axis looks like channels).
        Float images in ``[0, 1]`` are scaled by 255; float images outside that range (e.g.
        standardised network inputs) are min-max rescaled. A batch ``(N, ...)`` of images with a
        batch of relevance maps gives a batch of overlays.
    relevance : torch.Tensor or numpy.ndarray
        As for :func:`heatmap`. Resized bilinearly to the image size when the sizes differ.
    alpha : float, default 0.8
        Opacity of the heatmap where ``|R|`` is largest (with ``magnitude_weighted``), or everywhere
        (without it); in ``[0, 1]``.
    magnitude_weighted : bool, default True
        The opacity of each pixel follows its relevance: ``alpha * (|R| / scale) ** gamma``, so pixels
        without relevance show the unchanged image and the heatmap's colours are not washed out by
        the photo where it matters. ``False`` blends the whole heatmap with the constant ``alpha``.
    gamma : float, default 0.5
        Exponent of the opacity curve (``magnitude_weighted`` only): below 1 it makes small relevance
        visible (LRP heatmaps are heavy-tailed); 1 is linear.
    cmap, channel_reduce, symmetric, clip_percentile, vmax, channel_dim
        As for :func:`heatmap`. ``clip_percentile=99.5`` is often a good choice for photos.
    as_pil : bool, default False
        Return a :class:`PIL.Image.Image` (list for a batch) instead of an array.

    Returns
    -------
    numpy.ndarray or PIL.Image.Image or list of PIL.Image.Image
        RGB ``uint8`` ``(H, W, 3)`` (``(N, H, W, 3)`` for a batch).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not gamma > 0.0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    Image = _require_pil()
    maps, batch = _relevance_maps(relevance, channel_reduce, channel_dim)
    images = _split_images(image) if batch else [image]
    if len(images) != len(maps):
        raise ValueError(f"got {len(images)} image(s) for {len(maps)} relevance map(s)")
    results = []
    for img, m in zip(images, maps):
        rgb = _image_uint8(img).astype(np.float64)
        norm = _normalise(m, symmetric=symmetric, vmax=vmax, clip_percentile=clip_percentile)
        if norm.shape != rgb.shape[:2]:
            resized = Image.fromarray(norm.astype(np.float32)).resize(
                (rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR
            )
            norm = np.asarray(resized, dtype=np.float64)
        heat = _colourise(norm, cmap).astype(np.float64)
        a = alpha * (np.abs(norm) ** gamma)[..., None] if magnitude_weighted else alpha
        results.append(np.round((1.0 - a) * rgb + a * heat).clip(0, 255).astype(np.uint8))
    if as_pil:
        pil = [Image.fromarray(r) for r in results]
        return pil if batch else pil[0]
    return np.stack(results) if batch else results[0]


def image_figure(
    image: Any,
    relevance: ArrayLike,
    *,
    panels: Sequence[str] = ("image", "heatmap", "overlay"),
    titles: Sequence[str] | None = None,
    colorbar: bool = True,
    cmap: Any = "bwr",
    alpha: float = 0.8,
    gamma: float = 0.5,
    channel_reduce: str | Callable[..., np.ndarray] = "sum",
    clip_percentile: float | None = 99.5,
    vmax: float | None = None,
    cell_size: float = 3.0,
    suptitle: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """One image and its relevance side by side, with a colour bar in relevance units.

    Parameters
    ----------
    image : PIL.Image.Image, torch.Tensor or numpy.ndarray
        One image, as for :func:`overlay`.
    relevance : torch.Tensor or numpy.ndarray
        Its relevance, ``(H, W)`` or ``(C, H, W)``.
    panels : sequence of {"image", "heatmap", "overlay"}, default all three
        What to show, left to right.
    titles : sequence of str, optional
        One title per panel; default: the panel names.
    colorbar : bool, default True
        Add a colour bar for the heatmap and overlay panels, labelled with relevance values (``-scale``
        to ``+scale``, the scale being the largest ``|R|``, the ``clip_percentile`` or ``vmax``).
    cmap, alpha, gamma, channel_reduce, vmax
        As for :func:`overlay` and :func:`heatmap` (always the symmetric scale).
    clip_percentile : float or None, default 99.5
        The scale is this percentile of ``|R|``, so that a few extreme pixels do not wash out the
        rest (larger values are clipped to the extreme colours); ``None`` uses the maximum.
    cell_size : float, default 3.0
        Size of one panel in inches.
    suptitle : str, optional
        Title of the whole figure.
    path : path-like, optional
        Also save the figure there (format from the suffix, see :func:`save_figure`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    valid = ("image", "heatmap", "overlay")
    if not panels or any(p not in valid for p in panels):
        raise ValueError(f"panels must be a non-empty sequence of {valid}, got {panels!r}")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"got {len(titles)} titles for {len(panels)} panels")
    maps, batch = _relevance_maps(relevance, channel_reduce, None)
    if batch:
        raise ValueError("image_figure shows one image; for a batch use grid() or call it per image")
    m = maps[0]
    if vmax is not None:
        scale = float(vmax)
    elif clip_percentile is not None:
        scale = float(np.percentile(np.abs(m), clip_percentile)) if m.size else 0.0
    else:
        scale = float(np.abs(m).max()) if m.size else 0.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    cells = {"image": lambda: _image_uint8(image),
             "heatmap": lambda: heatmap(m, cmap=cmap, vmax=scale),
             "overlay": lambda: overlay(image, m, cmap=cmap, vmax=scale, alpha=alpha, gamma=gamma)}
    extra = 0.6 if colorbar and any(p != "image" for p in panels) else 0.0
    fig = _new_figure((cell_size * len(panels) + extra, cell_size + (0.3 if suptitle else 0.0)))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, panel, title in zip(axes, panels, titles or panels):
        ax.imshow(cells[panel](), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(str(title), fontsize=9)
    if extra:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(norm=Normalize(-scale, scale), cmap=_get_cmap(cmap))
        bar = fig.colorbar(mappable, ax=list(axes), shrink=0.8, fraction=0.04, pad=0.02)
        bar.set_label("relevance", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    if path is not None:
        save_figure(fig, path)
    return fig


def grid(
    images: Sequence[Any] | ArrayLike,
    *,
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    cell_size: float = 2.5,
    suptitle: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Arrange images and heatmaps in a grid.

    Parameters
    ----------
    images : sequence of images, or a batch tensor/array ``(N, ...)``
        Anything :func:`overlay` accepts as an image: PIL images, RGB arrays from
        :func:`heatmap` / :func:`overlay`, image tensors. 2-D inputs are shown as greyscale; to show
        a raw relevance map, pass ``heatmap(relevance)``.
    ncols : int, optional
        Number of columns; by default ``ceil(sqrt(N))``.
    titles : sequence of str, optional
        One title per image.
    cell_size : float, default 2.5
        Size of one cell in inches.
    suptitle : str, optional
        Title of the whole figure.
    path : path-like, optional
        Also save the figure as PNG there.

    Returns
    -------
    matplotlib.figure.Figure
        Save it with :func:`save_png` or ``fig.savefig``.
    """
    items = _split_images(images)
    n = len(items)
    if n == 0:
        raise ValueError("grid needs at least one image")
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    ncols = ncols or math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    nrows = math.ceil(n / ncols)
    fig = _new_figure((cell_size * ncols, cell_size * nrows + (0.3 if suptitle else 0.0)))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            ax.imshow(_image_uint8(items[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    if path is not None:
        save_png(fig, path)
    return fig


def save_png(image: Any, path: str | os.PathLike[str], *, dpi: float | None = None) -> Path:
    """Write an image, array, tensor or matplotlib Figure to a PNG file.

    Parameters
    ----------
    image : PIL.Image.Image, numpy.ndarray, torch.Tensor or matplotlib.figure.Figure
        Arrays / tensors are converted like in :func:`overlay` (RGB, or greyscale for 2-D input;
        an RGBA array keeps its alpha channel). A batch cannot be saved as one PNG: use
        :func:`grid`.
    path : path-like
        Destination; missing parent directories are created.
    dpi : float, optional
        Resolution for figures.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(image, "savefig"):
        image.savefig(path, format="png", dpi=dpi)
        return path
    Image = _require_pil()
    if not isinstance(image, Image.Image):
        a = _as_numpy(image)
        if a.ndim == 4:
            raise ValueError("save_png got a batch of images; save them one by one or use grid()")
        if a.ndim == 3 and a.shape[-1] == 4 and a.dtype == np.uint8:
            image = Image.fromarray(np.ascontiguousarray(a))
        elif a.ndim == 2 and a.dtype == np.uint8:
            image = Image.fromarray(np.ascontiguousarray(a))
        else:
            image = Image.fromarray(_image_uint8(image))
    image.save(path, format="PNG")
    return path


def save_figure(figure: Any, path: str | os.PathLike[str], *, dpi: float | None = None) -> Path:
    """Write a matplotlib Figure to a file whose format follows its suffix (``.png``, ``.pdf``, ``.svg``).

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        E.g. from :func:`grid`, :func:`image_figure` or :func:`text_figure`.
    path : path-like
        Destination; missing parent directories are created.
    dpi : float, optional
        Resolution of raster formats.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError
        The suffix is not a format matplotlib can write.
    """
    path = Path(path)
    if not hasattr(figure, "savefig"):
        raise TypeError(f"save_figure needs a matplotlib Figure, got {type(figure).__name__}; use save_png for "
                        "images and arrays")
    fmt = path.suffix.lower().lstrip(".")
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot write {path}: the suffix must be one of "
                         f"{', '.join('.' + k for k in sorted(supported))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=fmt, dpi=dpi)
    return path


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
DEFAULT_SPECIAL_TOKENS = frozenset(
    {
        "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>",
        "<bos>", "<eos>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
        "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>",
    }
)

_SUBWORD_STYLES = ("auto", "bpe", "sentencepiece", "wordpiece", "words")


def _resolve_style(tokens: Sequence[str], style: str) -> str:
    if style not in _SUBWORD_STYLES:
        raise ValueError(f"unknown subword_style {style!r}; valid: {', '.join(map(repr, _SUBWORD_STYLES))}")
    if style != "auto":
        return style
    if any(t.startswith(("Ġ", "Ċ")) for t in tokens):
        return "bpe"
    if any(t.startswith("▁") for t in tokens):
        return "sentencepiece"
    if any(t.startswith("##") for t in tokens):
        return "wordpiece"
    return "words"


def _layout_tokens(
    tokens: Sequence[str],
    scores: Any,
    special_tokens: Iterable[str] | None,
    special_mask: Sequence[bool] | None,
    style: str,
) -> tuple[list[tuple[str, bool, bool]], np.ndarray, np.ndarray]:
    """Return ([(display_text, space_before, is_special)], scores, special flags)."""
    tokens = [str(t) for t in tokens]
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    if s.shape[0] != len(tokens):
        raise ValueError(f"got {len(tokens)} tokens but {s.shape[0]} scores")
    if special_mask is not None:
        special = np.asarray(_as_numpy(special_mask), dtype=bool).reshape(-1)
        if special.shape[0] != len(tokens):
            raise ValueError(f"special_mask has {special.shape[0]} entries for {len(tokens)} tokens")
    else:
        names = DEFAULT_SPECIAL_TOKENS if special_tokens is None else frozenset(special_tokens)
        special = np.array([t in names for t in tokens], dtype=bool)
    style = _resolve_style(tokens, style)
    out: list[tuple[str, bool, bool]] = []
    prev_special = False
    for i, (tok, sp) in enumerate(zip(tokens, special)):
        text, space = tok, False
        if sp:
            space = True
        elif style in ("bpe", "sentencepiece"):
            marker = "Ġ" if style == "bpe" else "▁"
            if tok.startswith(marker):
                text, space = tok[len(marker):], True
            if style == "bpe":
                text = text.replace("Ċ", "\n").replace("Ġ", " ")
            else:
                text = text.replace("▁", " ")
            space = space or prev_special
        elif style == "wordpiece":
            if tok.startswith("##") and len(tok) > 2:
                text = tok[2:]
            else:
                space = True
        else:
            space = True
        if text == "":
            text = "\u00a0"  # keep an empty/space-only token visible
        out.append((text, space and i > 0, bool(sp)))
        prev_special = bool(sp)
    return out, s, special


def _text_colours(
    s: np.ndarray, special: np.ndarray, cmap: Any, vmax: float | None, clip_percentile: float | None
) -> tuple[np.ndarray, float]:
    """Background colours (uint8 (T, 3)); special tokens do not take part in the normalisation."""
    ordinary = s[~special]
    if vmax is None:
        if ordinary.size == 0:
            vmax = 0.0
        elif clip_percentile is not None:
            vmax = float(np.percentile(np.abs(ordinary), clip_percentile))
        else:
            vmax = float(np.abs(ordinary).max())
    norm = _normalise(s, symmetric=True, vmax=vmax if vmax > 0 else None, clip_percentile=None)
    if vmax <= 0:
        norm = np.zeros_like(s)
    return _colourise(norm, cmap), float(vmax)


def _text_colour_for(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts better with the background (WCAG relative luminance)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = float(lin @ np.array([0.2126, 0.7152, 0.0722]))
    return (0, 0, 0) if lum > 0.179 else (255, 255, 255)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


_HTML_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.2em; font-weight: 600; }
.dlrp-text { line-height: 2.1; white-space: pre-wrap; font-size: 1.05em; max-width: 60em; }
.dlrp-tok { padding: 0.15em 0.1em; border-radius: 0.2em; }
.dlrp-special { outline: 1px dashed #888; color: #666; background: transparent; font-size: 0.85em; }
.dlrp-sample { margin-bottom: 1.2em; }
h2 { font-size: 1em; font-weight: 600; margin: 0.8em 0 0.3em; }
.dlrp-legend { margin-top: 1.5em; font-size: 0.8em; width: 20em; }
.dlrp-bar { height: 0.8em; border: 1px solid #999; }
.dlrp-ticks { display: flex; justify-content: space-between; }
"""


def merge_subwords(
    tokens: Sequence[str],
    scores: Any,
    *,
    subword_style: str = "auto",
    special_tokens: Iterable[str] | None = None,
    special_mask: Sequence[bool] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Join sub-word tokens into words, summing their relevance.

    A word is what lies between spaces of the decoded text: WordPiece continuations (``##ing``)
    join the token before them, SentencePiece (``▁``) and byte-level BPE (GPT-2's ``Ġ``) tokens
    start a word when they carry the marker and continue one otherwise. Special tokens stay
    words of their own. Relevance is additive, so a word's relevance is the sum over its
    tokens and the total is unchanged.

    Parameters
    ----------
    tokens : sequence of str
        Tokens as produced by a tokenizer (``tokenizer.convert_ids_to_tokens``).
    scores : sequence of float, torch.Tensor or numpy.ndarray
        One relevance value per token.
    subword_style, special_tokens, special_mask
        As for :func:`text_html`.

    Returns
    -------
    words : list of str
        The words, markers removed.
    scores : numpy.ndarray
        Summed relevance per word.
    special : numpy.ndarray
        Boolean flag per word: a special token.

    Examples
    --------
    >>> words, s, _ = merge_subwords(["[CLS]", "play", "##ing", "chess", "[SEP]"], [0, 1, 2, 3, 0])
    >>> words, s.tolist()
    (['[CLS]', 'playing', 'chess', '[SEP]'], [0.0, 3.0, 3.0, 0.0])
    """
    laid_out, s, special = _layout_tokens(tokens, scores, special_tokens, special_mask, subword_style)
    words: list[str] = []
    merged: list[float] = []
    flags: list[bool] = []
    for k, ((text, space, is_special), value) in enumerate(zip(laid_out, s)):
        starts = k == 0 or space or is_special or flags[-1]
        if starts:
            words.append(text.strip() or text)
            merged.append(float(value))
            flags.append(bool(is_special))
        else:
            words[-1] = words[-1] + text
            merged[-1] += float(value)
    return words, np.asarray(merged, dtype=np.float64), np.asarray(flags, dtype=bool)


def _prepare_text(
    tokens: Sequence[str],
    scores: Any,
    special_tokens: Iterable[str] | None,
    special_mask: Sequence[bool] | None,
    subword_style: str,
    merge_words: bool,
) -> tuple[list[str], list[tuple[str, bool, bool]], np.ndarray, np.ndarray]:
    """(raw tokens, layout, scores, special flags), words merged on request."""
    if merge_words:
        words, s, special = merge_subwords(tokens, scores, subword_style=subword_style,
                                           special_tokens=special_tokens, special_mask=special_mask)
        laid_out, s, special = _layout_tokens(words, s, None, special, "words")
        return words, laid_out, s, special
    laid_out, s, special = _layout_tokens(tokens, scores, special_tokens, special_mask, subword_style)
    return [str(t) for t in tokens], laid_out, s, special


def _tokens_html(raw: Sequence[str], laid_out: Sequence[tuple[str, bool, bool]], s: np.ndarray,
                 colours: np.ndarray, precision: int) -> str:
    parts: list[str] = []
    for (text, space, is_special), token, value, rgb in zip(laid_out, raw, s, colours):
        if space:
            parts.append(" ")
        tip = html.escape(f"{value:+.{precision}g}  (token {str(token)!r})", quote=True)
        body = html.escape(text, quote=True)
        if is_special:
            parts.append(f'<span class="dlrp-tok dlrp-special" title="{tip}">{body}</span>')
        else:
            style = f"background-color:{_hex(rgb)};color:{_hex(_text_colour_for(rgb))}"
            parts.append(f'<span class="dlrp-tok" style="{style}" title="{tip}">{body}</span>')
    return f'<div class="dlrp-text">{"".join(parts)}</div>\n'


def _legend_html(cmap: Any, scale: float) -> str:
    stops = _colourise(np.linspace(-1.0, 1.0, 11), cmap)
    gradient = ", ".join(_hex(c) for c in stops)
    return (
        '<div class="dlrp-legend">'
        f'<div class="dlrp-bar" style="background:linear-gradient(to right, {gradient})"></div>'
        f'<div class="dlrp-ticks"><span>{-scale:+.3g}</span><span>0</span><span>{scale:+.3g}</span></div>'
        "</div>\n"
    )


def _html_document(title: str | None, body: str) -> str:
    doc_title = html.escape(title if title is not None else "Relevance", quote=True)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{doc_title}</title>\n<style>{_HTML_CSS}</style>\n</head>\n<body>\n"
        f"{body}"
        "</body>\n</html>\n"
    )


def text_html(
    tokens: Sequence[str],
    scores: Any,
    *,
    cmap: Any = "bwr",
    title: str | None = None,
    vmax: float | None = None,
    clip_percentile: float | None = None,
    special_tokens: Iterable[str] | None = None,
    special_mask: Sequence[bool] | None = None,
    subword_style: str = "auto",
    merge_words: bool = False,
    precision: int = 4,
    legend: bool = True,
) -> str:
    """Render tokens as a self-contained HTML document, each coloured by its relevance.

    Parameters
    ----------
    tokens : sequence of str
        Tokens as produced by a tokenizer (``tokenizer.convert_ids_to_tokens``).
    scores : sequence of float, torch.Tensor or numpy.ndarray
        One relevance value per token.
    cmap : str or matplotlib.colors.Colormap, default "bwr"
        Diverging colour map for the token backgrounds (see :func:`heatmap`).
    title : str, optional
        Heading and ``<title>`` of the document.
    vmax : float, optional
        Fixed scale; by default the largest ``|relevance|`` of the non-special tokens, so that
        ``+-vmax`` get the extreme colours and 0 the centre colour.
    clip_percentile : float, optional
        Use this percentile of ``|relevance|`` as the scale instead of the maximum.
    special_tokens : iterable of str, optional
        Token strings treated as special (default: the usual ``[CLS]``, ``<s>``, ``<pad>``...).
    special_mask : sequence of bool, optional
        Per-token special flags; overrides ``special_tokens``. Special tokens are drawn with a
        dashed outline and no background, and are left out of the normalisation.
    subword_style : {"auto", "bpe", "sentencepiece", "wordpiece", "words"}, default "auto"
        How to join subwords: ``"bpe"`` (GPT-2/RoBERTa ``Ġ`` marks a preceding space, ``Ċ`` a newline),
        ``"sentencepiece"`` (``▁`` marks a preceding space), ``"wordpiece"`` (BERT ``##`` marks a
        continuation), ``"words"`` (space-separated). ``"auto"`` picks by the markers present.
    merge_words : bool, default False
        Colour whole words instead of tokens: sub-word tokens are merged and their relevance summed
        (see :func:`merge_subwords`).
    precision : int, default 4
        Significant digits of the relevance shown in the tooltip.
    legend : bool, default True
        Append a colour bar from ``-vmax`` to ``+vmax``.

    Returns
    -------
    str
        A complete HTML5 document with inline CSS and no external resources. Write it with
        :func:`save_html`.
    """
    raw, laid_out, s, special = _prepare_text(tokens, scores, special_tokens, special_mask, subword_style,
                                              merge_words)
    colours, scale = _text_colours(s, special, cmap, vmax, clip_percentile)
    heading = f"<h1>{html.escape(title, quote=True)}</h1>\n" if title is not None else ""
    body = heading + _tokens_html(raw, laid_out, s, colours, precision)
    if legend:
        body += _legend_html(cmap, scale)
    return _html_document(title, body)


def _report_sample(sample: Any, k: int) -> dict[str, Any]:
    if isinstance(sample, Mapping):
        if "tokens" not in sample or "scores" not in sample:
            raise ValueError(f"sample {k} must have 'tokens' and 'scores' keys, got {sorted(sample)}")
        return dict(sample)
    if isinstance(sample, (tuple, list)) and len(sample) in (2, 3):
        return {"tokens": sample[0], "scores": sample[1], **({"title": sample[2]} if len(sample) == 3 else {})}
    raise TypeError(f"sample {k} must be (tokens, scores), (tokens, scores, title) or a mapping with 'tokens', "
                    f"'scores' and optionally 'title' and 'special_mask'; got {type(sample).__name__}")


def text_report(
    samples: Sequence[Any],
    *,
    title: str | None = None,
    cmap: Any = "bwr",
    shared_scale: bool = True,
    vmax: float | None = None,
    clip_percentile: float | None = None,
    subword_style: str = "auto",
    merge_words: bool = False,
    precision: int = 4,
) -> str:
    """Several explained texts in one self-contained HTML document.

    Parameters
    ----------
    samples : sequence
        Each sample is ``(tokens, scores)``, ``(tokens, scores, title)`` or a mapping with keys
        ``"tokens"``, ``"scores"`` and optionally ``"title"`` and ``"special_mask"``.
    title : str, optional
        Heading and ``<title>`` of the document.
    cmap : str or matplotlib.colors.Colormap, default "bwr"
        As for :func:`text_html`.
    shared_scale : bool, default True
        One colour scale for every sample (the largest ``|relevance|`` over all of them) and one
        legend at the end, so that colours compare across samples. ``False``: each sample is scaled
        on its own and gets its own legend.
    vmax, clip_percentile, subword_style, merge_words, precision
        As for :func:`text_html`; ``vmax`` fixes the scale of every sample.

    Returns
    -------
    str
        An HTML5 document; write it with :func:`save_html`.
    """
    items = [_report_sample(x, k) for k, x in enumerate(samples)]
    if not items:
        raise ValueError("text_report needs at least one sample")
    prepared = [_prepare_text(it["tokens"], it["scores"], None, it.get("special_mask"), subword_style, merge_words)
                for it in items]
    if shared_scale and vmax is None:
        values = [np.abs(p[2][~p[3]]) for p in prepared]
        values = [v for v in values if v.size]
        pooled = np.concatenate(values) if values else np.zeros(0)
        if pooled.size:
            vmax = float(np.percentile(pooled, clip_percentile)) if clip_percentile is not None else float(
                pooled.max())
    heading = f"<h1>{html.escape(title, quote=True)}</h1>\n" if title is not None else ""
    parts = [heading]
    scale = 0.0
    for k, (it, (raw, laid_out, s, special)) in enumerate(zip(items, prepared)):
        colours, scale = _text_colours(s, special, cmap, vmax, None if vmax is not None else clip_percentile)
        sample_title = it.get("title")
        parts.append('<section class="dlrp-sample">\n')
        if sample_title is not None:
            parts.append(f"<h2>{html.escape(str(sample_title), quote=True)}</h2>\n")
        parts.append(_tokens_html(raw, laid_out, s, colours, precision))
        if not shared_scale:
            parts.append(_legend_html(cmap, scale))
        parts.append("</section>\n")
    if shared_scale:
        parts.append(_legend_html(cmap, scale))
    return _html_document(title, "".join(parts))


def save_html(html_text: str, path: str | os.PathLike[str]) -> Path:
    """Write an HTML document (e.g. from :func:`text_html`) as UTF-8; returns the path.

    Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_text, encoding="utf-8")
    return path


def text_figure(
    tokens: Sequence[str],
    scores: Any,
    *,
    cmap: Any = "bwr",
    title: str | None = None,
    vmax: float | None = None,
    clip_percentile: float | None = None,
    special_tokens: Iterable[str] | None = None,
    special_mask: Sequence[bool] | None = None,
    subword_style: str = "auto",
    merge_words: bool = False,
    width: float = 8.0,
    fontsize: float = 12.0,
    legend: bool = True,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Coloured text as a matplotlib figure, to save as PNG or PDF (e.g. for a paper), without LaTeX.

    Tokens are laid out left to right and wrapped at ``width``; each gets a background coloured by
    its relevance, as in :func:`text_html`. Saved as PDF or SVG the text stays text (vector).

    Parameters
    ----------
    tokens, scores, cmap, title, vmax, clip_percentile, special_tokens, special_mask, subword_style, merge_words
        As for :func:`text_html`.
    width : float, default 8.0
        Width of the figure in inches; the height follows from the number of lines.
    fontsize : float, default 12.0
        Font size in points.
    legend : bool, default True
        Add a horizontal colour bar labelled with relevance values under the text.
    path : path-like, optional
        Also save the figure there (format from the suffix, see :func:`save_figure`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    raw, laid_out, s, special = _prepare_text(tokens, scores, special_tokens, special_mask, subword_style,
                                              merge_words)
    colours, scale = _text_colours(s, special, cmap, vmax, clip_percentile)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fig = Figure(figsize=(width, 1.0))
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    font = FontProperties(size=fontsize)
    px_per_pt = fig.dpi / 72.0

    def text_width(text: str) -> float:  # in points
        w, _, _ = renderer.get_text_width_height_descent(text.replace("$", r"\$"), font, ismath=False)
        return w / px_per_pt

    pad = 0.25 * fontsize
    line_height = 2.0 * fontsize
    margin = 0.5 * fontsize
    max_x = width * 72.0 - margin
    space = text_width(" ")
    placed: list[tuple[float, int, str, bool, Any]] = []  # (x, line, text, special, colour)
    x, line = margin, 0
    for (text, space_before, is_special), rgb in zip(laid_out, colours):
        pieces = text.split("\n")
        for p_i, piece in enumerate(pieces):
            if p_i > 0:
                x, line = margin, line + 1
            if not piece:
                continue
            w = text_width(piece) + 2 * pad
            gap = space if (space_before and p_i == 0 and x > margin) else 0.0
            if x + gap + w > max_x and x > margin:
                x, line, gap = margin, line + 1, 0.0
            placed.append((x + gap, line, piece, is_special, rgb))
            x += gap + w
    n_lines = line + 1
    title_h = 1.8 * fontsize if title else 0.0
    legend_h = 3.6 * fontsize if legend else 0.0
    height_pt = margin * 2 + title_h + n_lines * line_height + legend_h
    fig.set_size_inches(width, height_pt / 72.0)
    to_fig = lambda xp, yp: (xp / (width * 72.0), 1.0 - yp / height_pt)  # noqa: E731 - points from top-left
    if title:
        fig.text(*to_fig(margin, margin + 0.9 * fontsize), title, fontsize=fontsize * 1.1, fontweight="bold",
                 va="center", ha="left")
    for xp, ln, piece, is_special, rgb in placed:
        y = margin + title_h + (ln + 0.5) * line_height
        if is_special:
            box = {"boxstyle": f"square,pad={pad / fontsize:.3f}", "facecolor": "none", "edgecolor": "#888888",
                   "linestyle": "--", "linewidth": 0.6}
            colour = "#666666"
        else:
            box = {"boxstyle": f"square,pad={pad / fontsize:.3f}", "facecolor": _hex(rgb), "edgecolor": "none"}
            colour = _hex(_text_colour_for(rgb))
        fig.text(*to_fig(xp + pad, y), piece, fontsize=fontsize, color=colour, va="center", ha="left",
                 bbox=box, usetex=False, parse_math=False)
    if legend:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar_w = min(3.0, width * 0.5) * 72.0
        left, bottom = to_fig(margin, height_pt - margin - 1.4 * fontsize)
        bar_h = 0.6 * fontsize / height_pt
        ax = fig.add_axes((left, bottom, bar_w / (width * 72.0), bar_h))
        safe = scale if scale > 0 else 1.0
        bar = fig.colorbar(ScalarMappable(norm=Normalize(-safe, safe), cmap=_get_cmap(cmap)), cax=ax,
                           orientation="horizontal")
        bar.ax.tick_params(labelsize=fontsize * 0.6)
        bar.set_label("relevance", fontsize=fontsize * 0.6, labelpad=1)
        bar.ax.xaxis.set_label_position("top")
    if path is not None:
        save_figure(fig, path)
    return fig


def use_color(stream: Any = None) -> bool:
    """Whether to write ANSI colour codes to ``stream`` (default ``sys.stdout``).

    ``NO_COLOR`` set to a non-empty value turns colour off (https://no-color.org), ``FORCE_COLOR``
    set to a non-empty value turns it on; otherwise colour is used only when the stream is a
    terminal, so that redirected output (``| cat``, ``> file``, a log) has no escape sequences.
    """
    import sys

    if os.environ.get("NO_COLOR", ""):
        return False
    if os.environ.get("FORCE_COLOR", ""):
        return True
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # closed or detached stream
        return False


def text_terminal(
    tokens: Sequence[str],
    scores: Any,
    *,
    cmap: Any = "bwr",
    vmax: float | None = None,
    clip_percentile: float | None = None,
    special_tokens: Iterable[str] | None = None,
    special_mask: Sequence[bool] | None = None,
    subword_style: str = "auto",
    merge_words: bool = False,
    color: bool | None = None,
    precision: int = 2,
) -> str:
    """Render tokens for a terminal, backgrounds coloured by relevance (ANSI 24-bit colour).

    Parameters
    ----------
    tokens, scores, cmap, vmax, clip_percentile, special_tokens, special_mask, subword_style, merge_words
        As for :func:`text_html`.
    color : bool, optional
        Force colour on or off. By default (:func:`use_color`) colour is used when standard output
        is a terminal, unless the ``NO_COLOR`` environment variable is set to a non-empty value
        (https://no-color.org); ``FORCE_COLOR`` forces it (e.g. in a notebook, which renders it).
    precision : int, default 2
        Significant digits of the values printed in the plain (no colour) fallback.

    Returns
    -------
    str
        With colour: each token wrapped in ``ESC[48;2;R;G;Bm`` (background) and a contrasting
        ``ESC[38;2;...m`` foreground, reset with ``ESC[0m``; special tokens are dimmed.
        Without colour: ``token[+0.12]`` for each token, no escape sequences. Colour mapping
        needs matplotlib; the plain fallback does not.
    """
    if color is None:
        color = use_color()
    _, laid_out, s, special = _prepare_text(tokens, scores, special_tokens, special_mask, subword_style,
                                            merge_words)
    parts: list[str] = []
    if not color:
        for (text, space, is_special), value in zip(laid_out, s):
            if space:
                parts.append(" ")
            parts.append(text if is_special else f"{text}[{value:+.{precision}g}]")
        return "".join(parts)
    colours, _ = _text_colours(s, special, cmap, vmax, clip_percentile)
    for (text, space, is_special), rgb in zip(laid_out, colours):
        if space:
            parts.append(" ")
        if is_special:
            parts.append(f"\x1b[2m{text}\x1b[0m")
        else:
            fg = _text_colour_for(rgb)
            parts.append(
                "\x1b[48;2;{};{};{}m\x1b[38;2;{};{};{}m".format(*(int(v) for v in rgb), *fg)
                + f"{text}\x1b[0m"
            )
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------------
def _scalar(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().double().sum().item()) if v.numel() != 1 else float(v.item())
    if isinstance(v, np.ndarray):
        return float(v.sum())
    return float(v)


def _ledger_row(row: Any) -> tuple[str, str, float]:
    if isinstance(row, Mapping):
        return str(row["category"]), str(row["name"]), _scalar(row["total"])
    if all(hasattr(row, a) for a in ("category", "name", "total")):
        return str(row.category), str(row.name), _scalar(row.total)
    try:
        category, name, total = row
    except (TypeError, ValueError):
        raise TypeError(
            "ledger rows must be (category, name, total) tuples, mappings or objects with "
            f"category/name/total attributes; got {row!r}"
        ) from None
    return str(category), str(name), _scalar(total)


def _clip_text(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def ledger_table(
    rows: Iterable[Any] | Any,
    *,
    seed_total: float | None = None,
    unaccounted: float | None = None,
    title: str | None = "Relevance ledger",
    precision: int = 4,
    sort: bool = False,
    max_name_width: int = 48,
) -> str:
    """Format where relevance went as a fixed-width text table.

    Parameters
    ----------
    rows : iterable
        ``(category, name, total)`` tuples, mappings with those keys, or objects with those
        attributes; ``total`` may be a number or a tensor/array (summed). An object with a ``rows``
        attribute (and optionally ``seed_total`` / ``unaccounted``) is accepted as well.
    seed_total : float, optional
        Relevance injected at the outputs; percentages are relative to it. If omitted it is the sum
        of the rows plus ``unaccounted``.
    unaccounted : float, optional
        Relevance not attributed to any row (absorbed by biases, stabilizers, dropped branches).
        If omitted it is ``seed_total - sum(rows)``.
    title : str or None, default "Relevance ledger"
        First line of the table.
    precision : int, default 4
        Significant digits of the absolute values.
    sort : bool, default False
        Sort rows by decreasing ``|total|``.
    max_name_width : int, default 48
        Longer names are shortened with an ellipsis.

    Returns
    -------
    str
        The table, lines joined by ``\\n``: one line per row with category, name, signed relevance
        and percentage of the seed total, followed by the accounted sum, the unaccounted part and the
        seed total.
    """
    if not isinstance(rows, (str, bytes)) and hasattr(rows, "rows") and not isinstance(rows, Mapping):
        container = rows
        rows = container.rows
        if seed_total is None and getattr(container, "seed_total", None) is not None:
            seed_total = container.seed_total
        if unaccounted is None and getattr(container, "unaccounted", None) is not None:
            unaccounted = container.unaccounted
    parsed = [_ledger_row(r) for r in rows]
    if sort:
        parsed.sort(key=lambda r: -abs(r[2]))
    accounted = math.fsum(r[2] for r in parsed)
    if seed_total is not None:
        seed = _scalar(seed_total)
        unacc = _scalar(unaccounted) if unaccounted is not None else seed - accounted
    else:
        unacc = _scalar(unaccounted) if unaccounted is not None else 0.0
        seed = accounted + unacc

    def pct(v: float) -> str:
        return f"{100.0 * v / seed:.1f} %" if seed != 0 and math.isfinite(seed) else "n/a"

    def num(v: float) -> str:
        return f"{v:+#.{precision}g}"

    body = [(_clip_text(c, max_name_width), _clip_text(n, max_name_width), num(t), pct(t)) for c, n, t in parsed]
    footer = [
        ("accounted", "(sum of rows)", num(accounted), pct(accounted)),
        ("unaccounted", "", num(unacc), pct(unacc)),
        ("seed total", "", num(seed), pct(seed)),
    ]
    header = ("category", "name", "relevance", "% of seed")
    cells = [header, *body, *footer]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]

    def line(row: tuple[str, str, str, str]) -> str:
        return "  ".join(
            (row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].rjust(widths[3]))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out += [line(header), rule, *(line(r) for r in body)]
    if not body:
        out.append("(no rows)")
    out += [rule, *(line(r) for r in footer)]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# per-layer plot
# --------------------------------------------------------------------------------------------
def _layer_parts(value: Any) -> tuple[float, float | None, float | None]:
    """(total, positive, negative) from a number, a tensor/array, a (total, pos, neg) tuple or a mapping."""
    if isinstance(value, Mapping):
        total = _scalar(value["total"])
        pos = value.get("positive")
        neg = value.get("negative")
        return total, None if pos is None else _scalar(pos), None if neg is None else _scalar(neg)
    if isinstance(value, (torch.Tensor, np.ndarray)) and _as_numpy(value).size > 1:
        a = _as_numpy(value).astype(np.float64)
        pos, neg = float(a[a > 0].sum()), float(a[a < 0].sum())
        return pos + neg, pos, neg
    if isinstance(value, (tuple, list)):
        if len(value) != 3:
            raise ValueError(f"layer values given as sequences must be (total, positive, negative), got {value!r}")
        return tuple(_scalar(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, (numbers.Number, torch.Tensor, np.ndarray, np.generic)):
        return _scalar(value), None, None
    raise TypeError(f"cannot read a layer relevance from {type(value).__name__}")


def plot_layer_relevance(
    layers: Mapping[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = "Relevance per layer",
    relative_to: float | None = None,
    figsize: tuple[float, float] | None = None,
) -> Any:
    """Plot the relevance reaching each layer.

    Parameters
    ----------
    layers : mapping of str to value
        Layer name -> one of: a number (total relevance); a relevance tensor/array (its total,
        positive and negative parts are computed); a ``(total, positive, negative)`` tuple; or a
        mapping with keys ``"total"`` and optionally ``"positive"`` / ``"negative"``. Plotted in the
        mapping's order (typically output to input).
    path : path-like, optional
        Save the figure there as PNG.
    title : str or None, default "Relevance per layer"
        Axes title.
    relative_to : float, optional
        Divide every value by this (e.g. the seed total), so that a conservative explanation stays
        at 1.
    figsize : (float, float), optional
        Figure size in inches; by default it grows with the number of layers.

    Returns
    -------
    matplotlib.figure.Figure
        Stacked bars for the positive (red) and negative (blue) parts where known, and a line with
        markers for the total.
    """
    if not isinstance(layers, Mapping) or len(layers) == 0:
        raise ValueError("plot_layer_relevance needs a non-empty mapping of layer name to relevance")
    names = list(layers)
    parts = [_layer_parts(layers[n]) for n in names]
    scale = 1.0 / float(relative_to) if relative_to else 1.0
    totals = np.array([p[0] for p in parts]) * scale
    x = np.arange(len(names))
    fig = _new_figure(figsize or (max(4.0, 0.5 * len(names) + 2.0), 3.5))
    ax = fig.add_subplot()
    has_parts = any(p[1] is not None or p[2] is not None for p in parts)
    if has_parts:
        pos = np.array([np.nan if p[1] is None else p[1] for p in parts]) * scale
        neg = np.array([np.nan if p[2] is None else p[2] for p in parts]) * scale
        ax.bar(x, np.nan_to_num(pos), color="#d62728", alpha=0.6, label="positive")
        ax.bar(x, np.nan_to_num(neg), color="#1f77b4", alpha=0.6, label="negative")
    else:
        ax.bar(x, totals, color=np.where(totals >= 0, "#d62728", "#1f77b4"), alpha=0.5)
    ax.plot(x, totals, color="black", marker="o", linewidth=1.2, label="total")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(x, names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("relevance" + (" (relative)" if relative_to else ""))
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig
