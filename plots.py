"""
Every figure of spectral-nanogpt, drawn from the arrays it is given: no file reads, no fits.

One engine, `draw`, lays out panels of line series and writes the PNG atomically; the named
figures below build its panels. Each returns what it drew as {panel title: {label: (x, y)}}, so a
test asserts what a figure shows, not only that a file exists. A series keeps its colour in every
panel of a figure (colours follow the order labels first appear).
"""

import math
import os
from dataclasses import dataclass, field

import numpy as np

from data.shards import atomic_write


@dataclass
class Series:
    label: str
    x: list
    y: list
    style: str = "o-"                # matplotlib format string
    color: object = None             # None: the label's colour in this figure
    yerr: list = None                # error bars
    names: list = None               # text beside each point
    lw: float = 1.2
    ms: float = 3
    alpha: float = 1.0
    in_legend: bool = True


@dataclass
class Panel:
    title: str
    series: list
    xlabel: str = ""
    ylabel: str = ""
    loglog: bool = False
    hlines: list = field(default_factory=list)   # [(y, label)]
    vlines: list = field(default_factory=list)   # [(x, label)]
    legend: bool = True


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def draw(path, panels, title="", ncols=2, panel_size=(4.6, 3.6), sharey=False, legend_size=7):
    """Write the panels to `path` (PNG); returns {panel title: {label: (x, y)}} of what was drawn."""
    plt = pyplot()
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False,
                             sharey=sharey, layout="constrained")
    colors = {}
    drawn = {}
    for ax, panel in zip(axes.flat, panels):
        drawn[panel.title] = {}
        for s in panel.series:
            color = s.color if s.color is not None else colors.setdefault(s.label, f"C{len(colors) % 10}")
            x, y = list(s.x), [math.nan if v is None else v for v in s.y]
            label = s.label if s.in_legend else None
            if s.yerr is not None:
                ax.errorbar(x, y, yerr=s.yerr, fmt=s.style, color=color, ms=s.ms, lw=s.lw, capsize=2, label=label)
            else:
                ax.plot(x, y, s.style, color=color, ms=s.ms, lw=s.lw, alpha=s.alpha, label=label)
            for name, xi, yi in zip(s.names or [], x, y):
                ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points", color=color)
            drawn[panel.title][s.label] = (x, y)
        for y, label in panel.hlines:
            ax.axhline(y, color="k", ls=":", lw=1, label=label)
        for x, label in panel.vlines:
            ax.axvline(x, color="k", ls="--", lw=1, label=label)
        if panel.loglog:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=9)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        if panel.legend and ax.get_legend_handles_labels()[0]:  # an empty legend is a matplotlib warning
            ax.legend(fontsize=legend_size)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------------
# Spectra: values against rank on log-log axes, with fitted power laws


@dataclass
class Curve:
    label: str
    values: np.ndarray               # the meaningful part of a spectrum (ranks 1..len)
    fits: list = field(default_factory=list)  # [(name, fit)]: fit as spectra.fit_power_law returns it
    color: object = None


FIT_STYLES = {"head": ":", "tail": "--"}


def spectrum_series(curve):
    """The curve's own series, then one for each fitted line over the ranks it was fitted on."""
    alphas = ", ".join(f"{name} {fit['alpha']:.2f}" for name, fit in curve.fits if math.isfinite(fit["alpha"]))
    out = [Series(f"{curve.label}  ({alphas})" if alphas else curve.label, np.arange(1, len(curve.values) + 1),
                  curve.values, style="-", ms=0, color=curve.color)]
    for name, fit in curve.fits:
        if math.isfinite(fit["alpha"]):
            i = np.arange(fit["lo"], fit["hi"] + 1)
            out.append(Series(f"{curve.label} {name} fit", i, np.exp(fit["intercept"]) * i ** -fit["alpha"],
                              style=FIT_STYLES.get(name, "--"), color="k", ms=0, lw=1, in_legend=False))
    return out


def spectra(path, panels, ylabel, title="", ncols=2):
    """Spectra against rank: {panel title: [Curve]}."""
    return draw(path, [Panel(t, [s for c in curves for s in spectrum_series(c)], "rank i", ylabel, loglog=True)
                       for t, curves in panels.items()], title, ncols=ncols, panel_size=(5.2, 4.2))


# ----------------------------------------------------------------------------------------------
# Alphas against layer and against tokens, loss against tokens


def alpha_by_layer(path, panels, ylabel, title="", xlabel="layer (embed = -1, final = L)", sharey=False):
    """{panel title: {label: (layers, values) or (layers, values, errors)}}: one line per label."""
    return draw(path, [Panel(t, [Series(label, *xy[:2], yerr=xy[2] if len(xy) > 2 else None)
                                 for label, xy in lines.items()], xlabel, ylabel)
                       for t, lines in panels.items()], title, sharey=sharey)


def alpha_by_tokens(path, panels, ylabel="", title="", ncols=2):
    """{panel title: {label: (tokens, values)}}; many labels are coloured along a colormap."""
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    colors = {}
    if len(labels) > 10:
        cmap = pyplot().get_cmap("viridis")
        colors = {label: cmap(k / (len(labels) - 1)) for k, label in enumerate(labels)}
    return draw(path, [Panel(t, [Series(label, *xy, style=".-", color=colors.get(label))
                                 for label, xy in lines.items()], "tokens", ylabel) for t, lines in panels.items()],
                title, ncols=ncols, panel_size=(4.6, 3.6) if ncols <= 2 else (3.2, 2.6),
                legend_size=6 if len(labels) > 6 else 7)


def loss_by_tokens(path, runs, tokens, loss):
    """{run: (train [(tokens, loss)], val [(tokens, loss)])}: thin train curves, val with markers, and
    the matched tokens and loss as lines."""
    series = []
    for name, (train, val) in runs.items():
        if val:
            series.append(Series(f"{name} (val)", *zip(*val), style="o-"))
        if train:  # in the colour of the run's val curve
            series.append(Series(f"{name} (train)", *zip(*train), style="-", lw=0.6, alpha=0.5, in_legend=False))
    colors = {s.label: f"C{k % 10}" for k, s in enumerate(s for s in series if s.in_legend)}
    for s in series:
        s.color = colors.get(s.label.replace("(train)", "(val)"), s.color)
    panel = Panel("loss against tokens", series, "tokens", "loss (val: markers, train: thin)",
                  hlines=[(loss, f"matched loss {loss:.4g}")], vlines=[(tokens, f"matched tokens {tokens:,.0f}")])
    return draw(path, [panel], ncols=1, panel_size=(6.4, 4.4))


def forecast(path, reached, line, pending, xlabel, title):
    """Predictor against token ratio: `reached` = (names, x, y) of runs at the target, `line` =
    (slope, intercept) of the least-squares line or None, `pending` = (names, x, forecasts, error) of
    runs not there yet, drawn hollow with the error as a bar."""
    series = []
    names, xs, ys = reached
    pending_names, pending_x, forecasts, error = pending
    if line is not None and xs:
        grid = np.linspace(min(list(xs) + list(pending_x)), max(list(xs) + list(pending_x)), 50)
        series.append(Series("least-squares line", grid, line[0] * grid + line[1], style="--", color="k", ms=0, lw=1))
    if xs:
        series.append(Series("reached the target", xs, ys, style="o", color="C0", names=names))
    if pending_x:
        series.append(Series("forecast +- leave-one-out error", pending_x, forecasts, style="o", color="C3",
                             yerr=[error] * len(pending_x), names=[f"{n} (forecast)" for n in pending_names]))
    return draw(path, [Panel(title, series, xlabel, "token ratio (1 = family best)")], ncols=1, panel_size=(6.4, 4.6))
